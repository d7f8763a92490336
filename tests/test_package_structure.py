"""Conventions of the package, enforced: the core imports no Qt or napari; the Session is Qt-free; panels
never import each other; plugin files stay small; the widget only assembles."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "napari_spatialssl"
GUI_MODULES = ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "napari", "magicgui", "vispy", "superqt")


def _imports(path: Path) -> set[str]:
    """Top-level names of every module `path` imports (anywhere in the file)."""
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_the_core_imports_no_gui_toolkit():
    offenders = {}
    for path in PKG.rglob("*.py"):
        if "_napari" in path.relative_to(PKG).parts:
            continue
        bad = _imports(path) & set(GUI_MODULES)
        if bad:
            offenders[str(path.relative_to(PKG))] = sorted(bad)
    assert not offenders, offenders


def test_the_session_and_what_it_computes_are_qt_free():
    for name in ("session.py", "actions.py", "result_actions.py", "displays.py", "results.py", "progress.py",
                 "previews.py", "overlays.py"):
        path = PKG / "_napari" / name
        if path.exists():
            assert not _imports(path) & set(GUI_MODULES), name
    code = ("import napari_spatialssl._napari.session as s, sys; s.Session(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in %r))" % (GUI_MODULES,))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"a Session imported GUI modules: {out.stdout}"


def test_no_panel_imports_another_panel():
    panels = {p.stem for p in (PKG / "_napari" / "panels").glob("*.py")} - {"__init__", "common"}
    for path in (PKG / "_napari" / "panels").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                assert (node.module or "") not in panels, f"{path.name} imports panel {node.module}"


def test_plugin_files_are_small_and_the_widget_only_assembles():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (PKG / "_napari").rglob("*.py")}
    too_big = {k: v for k, v in sizes.items() if v > 450}
    assert not too_big, too_big
    assert sizes["widget.py"] < 250


def test_one_trainer_and_no_second_training_loop():
    """Only training.py steps an optimiser over batches (methods and the plugin use the Trainer)."""
    for path in PKG.rglob("*.py"):
        if path.name == "training.py":
            continue
        text = path.read_text()
        assert "optimiser.step()" not in text and "optimizer.step()" not in text, path
