"""`napari-spatialssl demo --headless`: napari renders the sample slide into a PNG, with a summary JSON.

Runs the console command in a subprocess with no DISPLAY, so the demo must start its own virtual X
server (the path `make demo` takes on a headless machine).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest


@pytest.mark.viewer
@pytest.mark.skipif(shutil.which("Xvfb") is None, reason="Xvfb not installed (scripts/system_deps.sh installs it)")
def test_headless_demo_writes_tissue_png(tmp_path):
    from imageio.v3 import imread

    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}
    env["OMP_NUM_THREADS"] = "1"
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "napari_spatialssl.cli", "demo", "--headless", "--out", str(out),
                           "--epochs", "2"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rendered 6,471 cells" in proc.stdout and "trained gnn-mask for 2 epochs" in proc.stdout

    shot = imread(out / "tissue.png")
    assert shot.shape[0] >= 600 and shot.shape[1] >= 800
    rgb = shot[..., :3].reshape(-1, 3).astype(np.int32)
    tissue = rgb[rgb.max(axis=1) > 16]
    assert len(tissue) / len(rgb) > 0.02, "PNG is (nearly) blank"

    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_cells"] == 6471 and summary["n_genes"] == 33
    assert summary["color_by"]["key"] == "cell_type" and summary["color_by"]["n_categories"] == 32
    # the PNG shows the cell-type colours: count categories whose exact colour is painted somewhere
    found = 0
    for hexcol in summary["colors"].values():
        c = np.array([int(hexcol[i:i + 2], 16) for i in (1, 3, 5)])
        found += int((np.abs(tissue - c).max(axis=1) <= 6).sum() >= 5)
    assert found >= 15, f"only {found} cell-type colours visible in the PNG"

    # the main job: domains trained by the widget, rendered by napari, and the run's metrics
    run = summary["run"]
    assert run["method"] == "gnn-mask" and run["epochs"] == 2 and "masked" in run["headline"][0]["figure"]
    assert "domains" in run["metrics"] and run["metrics"]["domains"]["n_domains"] == 11  # the 11 osmFISH regions
    for name in ("domains.png", "reconstruction.png"):
        img = imread(out / name)[..., :3].reshape(-1, 3).astype(np.int32)
        painted = img[img.max(axis=1) > 30]
        assert len(painted) / len(img) > 0.02, f"{name} is (nearly) blank"
    dom = imread(out / "domains.png")[..., :3].reshape(-1, 3).astype(np.int32)
    colours = {tuple(c) for c in (dom[dom.max(1) > 30] // 24).tolist()}
    assert len(colours) >= 11, "the domains PNG does not show distinct domain colours"


def test_summary_of_a_slide(starmap_path):
    import anndata as ad

    from napari_spatialssl._napari.layers import adata_to_points
    from napari_spatialssl._napari.demo import summarize_adata

    a = ad.read_h5ad(starmap_path)
    _, kw, _ = adata_to_points(a)
    s = summarize_adata(a, kw["metadata"])
    assert s["sections"]["key"] == "sample_id" and sum(s["sections"]["cells"].values()) == 3190
    assert s["X"]["raw_counts"] and s["display"]["layout"] == "tiled"
    json.dumps(s)  # JSON-ready


@pytest.mark.viewer
@pytest.mark.skipif(not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")),
                    reason="no display: run under Xvfb (make test)")
def test_interactive_demo_opens_slide_and_widget(monkeypatch):
    """With a display, the demo opens napari with the sample slide and the plugin's dock widget."""
    napari = pytest.importorskip("napari")
    from napari_spatialssl._napari.demo import run_demo

    monkeypatch.setattr(napari, "run", lambda *a, **k: None)  # do not block on the event loop
    assert run_demo(sample="starmap", headless=False) == 0
    viewer = napari.current_viewer()
    try:
        assert [len(layer.data) for layer in viewer.layers] == [3190]
        docks = list(viewer.window.dock_widgets)
        assert any("Self-supervised learning" in name for name in docks), docks
    finally:
        viewer.close()
