"""`napari-spatialssl demo`: show a sample slide in napari, or render it headless to a PNG.

With a display, napari opens with the sample slide (cells coloured by cell type) and the plugin's dock
widget. Without one (or with ``headless=True``) the same layer is rendered by napari's own OpenGL canvas
into ``<out_dir>/tissue.png``, beside ``summary.json`` describing the loaded AnnData. When there is no X
display at all, a private virtual X server (Xvfb) is started for the render and stopped afterwards, so the
PNG is a real napari rendering (Qt's "offscreen" platform cannot draw OpenGL).

This module imports napari / Qt only inside the functions that need them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

RENDER_SIZE = (1200, 1600)  # (height, width) of the napari canvas, screen pixels


def _has_display() -> bool:
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _die_with_parent() -> None:
    """In the Xvfb child: ask Linux to terminate it when this Python process dies (even on a crash)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # not Linux / no glibc: stop() still terminates it on a normal exit
        pass


def _qt_app_exists() -> bool:
    if "PyQt6" not in sys.modules and "PyQt5" not in sys.modules and "PySide6" not in sys.modules:
        return False
    from qtpy.QtWidgets import QApplication

    return QApplication.instance() is not None


class VirtualDisplay:
    """A private Xvfb server; sets ``DISPLAY`` while running. ``with VirtualDisplay(): ...``."""

    def __init__(self, size: tuple[int, int] = (1920, 1400), depth: int = 24):
        self.size, self.depth = size, depth
        self.proc: subprocess.Popen | None = None
        self._old_display: str | None = None

    def start(self) -> "VirtualDisplay":
        xvfb = shutil.which("Xvfb")
        if xvfb is None:
            raise RuntimeError(
                "no display and no Xvfb: install it (Debian/Ubuntu: sudo apt-get install xvfb libgl1-mesa-dri, "
                "or run `bash scripts/system_deps.sh`) to render the demo headless."
            )
        read_fd, write_fd = os.pipe()
        w, h = self.size
        # -displayfd: Xvfb picks a free display number and writes it to the pipe when it is ready.
        self.proc = subprocess.Popen(
            [xvfb, "-displayfd", str(write_fd), "-screen", "0", f"{w}x{h}x{self.depth}", "-nolisten", "tcp"],
            pass_fds=(write_fd,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        os.close(write_fd)
        number = b""
        deadline = time.monotonic() + 20
        with os.fdopen(read_fd, "rb") as pipe:
            while time.monotonic() < deadline and not number.endswith(b"\n"):
                chunk = pipe.read(1)
                if not chunk:
                    break
                number += chunk
        if not number.strip():
            self.stop()
            raise RuntimeError("Xvfb did not start (no display number reported).")
        self._old_display = os.environ.get("DISPLAY")
        os.environ["DISPLAY"] = f":{number.decode().strip()}"
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None
        if self._old_display is None:
            os.environ.pop("DISPLAY", None)
        else:
            os.environ["DISPLAY"] = self._old_display

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


_DISPLAY: VirtualDisplay | None = None


def _private_display() -> VirtualDisplay:
    """Start (once per process) a private Xvfb. It lives as long as the process: the QApplication that
    napari creates stays bound to it, so stopping it earlier would break any later Qt use."""
    global _DISPLAY
    if _DISPLAY is None:
        import atexit

        _DISPLAY = VirtualDisplay().start()
        atexit.register(_DISPLAY.stop)
    return _DISPLAY


def summarize_adata(adata, layer_metadata: dict | None = None, color_by: str | None = None) -> dict:
    """JSON-ready summary of a slide: size, expression type, coordinates, sections, labels, colours."""
    import scipy.sparse as sp

    from ..data.dataset import looks_like_counts
    from ..data.io import get_coordinates

    meta = layer_metadata or {}
    coords = get_coordinates(adata, spatial_key=meta.get("spatial_key", "spatial"),
                             coord_columns=meta.get("coord_columns"))
    out: dict = {
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "genes_first": [str(g) for g in adata.var_names[:10]],
        "X": {"sparse": bool(sp.issparse(adata.X)), "dtype": str(adata.X.dtype),
              "raw_counts": bool(looks_like_counts(adata.X))},
        "obs_columns": {str(c): str(adata.obs[c].dtype) for c in adata.obs.columns},
        "obsm_keys": [str(k) for k in adata.obsm.keys()],
        "coordinates": {"x_min": float(coords[:, 0].min()), "x_max": float(coords[:, 0].max()),
                        "y_min": float(coords[:, 1].min()), "y_max": float(coords[:, 1].max())},
    }
    skey = meta.get("section_key")
    if skey:
        counts = adata.obs[skey].astype(str).value_counts(sort=False)
        out["sections"] = {"key": skey, "cells": {str(k): int(v) for k, v in counts.sort_index().items()}}
    else:
        out["sections"] = {"key": None, "cells": {"all": int(adata.n_obs)}}
    key = color_by or meta.get("color_by")
    if key and key in adata.obs.columns:
        counts = adata.obs[key].astype(str).value_counts()
        out["color_by"] = {"key": key, "n_categories": int(len(counts)),
                           "cells": {str(k): int(v) for k, v in counts.items()}}
    if meta:
        out["display"] = {"layout": meta.get("layout"), "point_size": meta.get("point_size"),
                          "subsampled": meta.get("subsampled"), "points_shown": meta.get("points_shown")}
    return out


def _sample_layer(sample: str, color_by: str | None):
    from .reader import read_slide
    from .sample_data import SAMPLES, sample_path

    path = sample_path(sample)
    data, kwargs, layer_type = read_slide(path, color_by=color_by or "auto",
                                          name=Path(SAMPLES.get(sample.lower(), (path.name,))[0]).stem)
    kwargs["metadata"]["points_shown"] = int(len(data))
    return path, (data, kwargs, layer_type)


def _add_layer(viewer, layer_data):
    from napari.layers import Layer

    data, kwargs, layer_type = layer_data
    return viewer.add_layer(Layer.create(data, kwargs, layer_type))


def render_tissue_png(layer_data, png_path: Path, caption: str = "", size=RENDER_SIZE) -> np.ndarray:
    """Render a Points layer with napari (needs a display, real or virtual) and save it as a PNG.

    Returns the RGBA screenshot array (height, width, 4) uint8.
    """
    import napari
    from qtpy.QtWidgets import QApplication

    # The window must be shown for the OpenGL canvas to draw; on a virtual display nobody sees it.
    viewer = napari.Viewer(show=True, title="napari-spatialssl demo")
    try:
        viewer.window._qt_window.resize(size[1], size[0])
        _add_layer(viewer, layer_data)
        QApplication.processEvents()
        viewer.reset_view(margin=0.02)
        if caption:
            viewer.text_overlay.text = caption
            viewer.text_overlay.visible = True
            viewer.text_overlay.color = "white"
            viewer.text_overlay.font_size = 12
        viewer.scale_bar.visible = True
        QApplication.processEvents()
        image = viewer.screenshot(size=size, canvas_only=True, flash=False)
    finally:
        viewer.close()
    from imageio.v3 import imwrite

    png_path.parent.mkdir(parents=True, exist_ok=True)
    imwrite(png_path, image)
    return image


def _caption(layer_data) -> str:
    _, kwargs, _ = layer_data
    meta = kwargs["metadata"]
    n_sec = len(meta["section_names"])
    parts = [f"{kwargs['name']}: {meta['n_cells_total']:,} cells"]
    if n_sec > 1:
        parts.append(f"{n_sec} sections tiled")
    if meta.get("color_by"):
        parts.append(f"coloured by {meta['color_by']}")
    return ", ".join(parts)


DEMO_REFERENCE = {"osmfish": ("region", "cell_type"), "starmap": ("layer", "cell_type")}


def _train_in_viewer(viewer, method: str, epochs: int | None, sample: str, settings_file: Path):
    """The plugin's widget on `viewer`, set up to train `method` on the slide (the method's default
    epochs unless `epochs`): the main job, as a person would run it from the dock. The widget keeps its
    settings in `settings_file` (a fresh one: a user's saved settings never change the demo)."""
    from .widget import SpatialSSLWidget
    from .widget_settings import ENV_VAR

    os.environ[ENV_VAR] = str(settings_file)

    w = SpatialSSLWidget(viewer)
    viewer.window.add_dock_widget(w, name="Self-supervised learning", area="right")
    s = w.session
    domain_key, label_key = DEMO_REFERENCE.get(sample.lower(), (None, None))
    adata = s.slide.adata
    if domain_key in adata.obs.columns:
        from ..data.io import label_codes

        s.set_keys(domain_key=domain_key, label_key=label_key if label_key in adata.obs.columns else None)
        s.set_setting("eval.n_domains", len(label_codes(adata, domain_key)[1]), method)
    s.set_method(method)
    if epochs is not None:
        s.set_setting("epochs", int(epochs), method)
    if method == "gnn-mask":
        s.set_setting("finetune.epochs", min(50, int(epochs or 50)), method)
    return w


def run_headless(sample: str = "osmfish", out_dir: str | os.PathLike = "demo_output",
                 color_by: str | None = None, method: str = "gnn-mask", epochs: int | None = None) -> dict:
    """The main job without a display: the sample slide in napari (``tissue.png``), `method` trained on
    it for `epochs` by the plugin's widget (``domains.png``: the trained domains on the tissue;
    ``reconstruction.png``: one gene measured beside its reconstruction) and ``summary.json`` (the
    slide and the run's metrics). Starts a private Xvfb when there is no display."""
    import napari
    from qtpy.QtWidgets import QApplication

    from .workers import SYNC_ENV

    out = Path(out_dir)
    path, layer_data = _sample_layer(sample, color_by)
    if not _qt_app_exists() and (not _has_display() or shutil.which("Xvfb")):
        _private_display()
    if os.environ.get("QT_QPA_PLATFORM", "") in ("offscreen", "minimal"):
        os.environ["QT_QPA_PLATFORM"] = "xcb"  # the offscreen platform cannot render OpenGL screenshots
    os.environ[SYNC_ENV] = "1"  # the widget's jobs run inline: the screenshots wait for them
    image = render_tissue_png(layer_data, out / "tissue.png", caption=_caption(layer_data))
    _, kwargs, _ = layer_data
    adata = kwargs["metadata"]["adata"]
    summary = summarize_adata(adata, kwargs["metadata"], color_by)
    summary["sample"] = {"name": sample, "file": str(path)}
    rgb = image[..., :3].reshape(-1, 3)
    summary["png"] = {"path": str(out / "tissue.png"), "height": int(image.shape[0]), "width": int(image.shape[1]),
                      "non_background_fraction": float((rgb.max(axis=1) > 16).mean())}
    cycle = kwargs.get("face_color_cycle")
    if isinstance(cycle, dict):
        summary["colors"] = {str(k): str(v) for k, v in cycle.items()}

    viewer = napari.Viewer(show=True, title="napari-spatialssl demo")
    try:
        viewer.window._qt_window.resize(RENDER_SIZE[1] + 450, RENDER_SIZE[0])
        _add_layer(viewer, layer_data)
        QApplication.processEvents()
        w = _train_in_viewer(viewer, method, epochs, sample, out / "widget_settings.json")
        w.session.train()
        result = w.session.result(method)
        QApplication.processEvents()
        viewer.reset_view(margin=0.02)
        viewer.text_overlay.text = w.status.text()
        viewer.text_overlay.visible = True
        domains = viewer.screenshot(str(out / "domains.png"), size=RENDER_SIZE, canvas_only=True, flash=False)
        gene = _demo_gene(result)
        w.session.compare(gene, [method])
        QApplication.processEvents()
        viewer.reset_view(margin=0.02)
        viewer.text_overlay.text = f"{gene}: measured (left) and reconstructed by {method} (right)"
        recon = viewer.screenshot(str(out / "reconstruction.png"), size=RENDER_SIZE, canvas_only=True, flash=False)
        summary["run"] = {"method": method, "epochs": int(w.session.config(method).epochs), "status": w.status.text(),
                          "headline": [{"figure": f, "value": v, "baselines": b} for f, v, b, _ in result.headline()],
                          "metrics": result.metrics, "gene_shown": gene,
                          "layers": [layer.name for layer in viewer.layers],
                          "domains_png": str(out / "domains.png"), "reconstruction_png": str(out / "reconstruction.png"),
                          "non_background_fraction": {
                              "domains": float((domains[..., :3].max(-1) > 16).mean()),
                              "reconstruction": float((recon[..., :3].max(-1) > 16).mean())}}
        w.close()
    finally:
        viewer.close()
    from ..data.io import atomic_write_text

    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=_json_default))
    return summary


def _demo_gene(result) -> str:
    """A well-expressed gene the model reconstructs (the most variable of the first model genes)."""
    genes = result.model_genes()
    data = getattr(result.trained, "data", None)
    if data is None:
        return genes[0]
    from .overlays import column

    spread = [float(np.var(column(data.X, j))) for j in range(min(len(genes), 50))]
    return genes[int(np.argmax(spread))]


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (pd.Timestamp, Path)):
        return str(obj)
    return repr(obj)


def run_interactive(sample: str = "osmfish", color_by: str | None = None, method: str = "gnn-mask",
                    epochs: int | None = None) -> int:
    """Open napari with the sample slide and the plugin's dock widget, and start training `method` in the
    background (progress and results in the dock); blocks until the window closes."""
    import napari

    _, layer_data = _sample_layer(sample, color_by)
    viewer = napari.Viewer(title="napari-spatialssl demo")
    _add_layer(viewer, layer_data)
    try:
        import tempfile

        w = _train_in_viewer(viewer, method, epochs, sample, Path(tempfile.mkdtemp()) / "widget_settings.json")
        w.session.guarded(w.session.train)
    except Exception as exc:  # the viewer stays usable without the widget
        print(f"napari-spatialssl demo: could not open the dock widget ({exc})", file=sys.stderr)
    napari.run()
    return 0


def run_demo(sample: str = "osmfish", out_dir: str | os.PathLike = "demo_output", headless: bool = False,
             color_by: str | None = None, method: str = "gnn-mask", epochs: int | None = None) -> int:
    """Entry point of ``napari-spatialssl demo`` / ``make demo``; returns a process exit code.

    With a display (and ``headless=False``) opens napari interactively; otherwise writes
    ``out_dir/tissue.png`` (rendered by napari, coloured by cell type) and ``out_dir/summary.json``.
    """
    import torch  # noqa: F401  (torch's libraries must load before Qt's)

    if not headless and _has_display():
        return run_interactive(sample, color_by, method, epochs)
    try:
        summary = run_headless(sample, out_dir, color_by, method, epochs)
    except RuntimeError as exc:
        print(f"napari-spatialssl demo: {exc}", file=sys.stderr)
        return 1
    png = summary["png"]
    print(f"rendered {summary['n_cells']:,} cells x {summary['n_genes']} genes "
          f"({len(summary['sections']['cells'])} section(s)) with napari -> {png['path']} "
          f"({png['width']}x{png['height']}, {png['non_background_fraction']:.0%} tissue pixels)")
    run = summary["run"]
    print(f"trained {run['method']} for {run['epochs']} epochs: {run['status']}")
    for row in run["headline"]:
        base = ", ".join(f"{k} {v:.3g}" for k, v in row["baselines"].items() if v is not None)
        print(f"  {row['figure']}: {row['value']:.3g}" + (f" (baselines: {base})" if base else ""))
    print(f"domains -> {run['domains_png']}; {run['gene_shown']} measured vs reconstructed -> {run['reconstruction_png']}")
    print(f"summary -> {Path(out_dir) / 'summary.json'}")
    return 0
