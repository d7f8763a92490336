"""4.3M cells in napari without a random subsample, against today's 2M-point subsample, same run.

Plain napari (a Viewer, add_points / add_image), under a virtual X server:

    xvfb-run -a -s "-screen 0 1400x1000x24" python benchmarks/napari_scale.py [--atlas /tmp/atlas.h5ad]

Both displays show the synthetic atlas (4.3M cells, 59 sections in the plugin's tiled layout,
coloured by cell type), each in its own process (so its memory is its own):

- today (the baseline, the plugin before it drew huge slides whole): a Points layer of a seeded
  2,000,000-cell random subsample, coloured by category, as ``adata_to_points`` used to make it;
- pyramid: the plugin's own path: ``_napari.layers.adata_to_points`` (above 2M cells an overview
  image of every cell's colour, ``big_slides``) added as the reader adds it (``with_overviews``),
  and ``viewport.ViewportPoints`` filling the slide layer with the cells in view (at most
  ``big_slides.IN_VIEW_MAX_POINTS``) after each camera move, hiding the overview while they show.

Figures: time to first frame (from the layer's data to the first rendered frame, pyramid building
included), and the frame time while panning (the median of 12 camera moves, each: move the
camera, let napari update the layers, render a frame). A frame is rendered with
``viewer.screenshot(canvas_only=True)`` (an offscreen render plus a pixel read-back, the same
for both), on Mesa's software OpenGL here. Peak RSS of each process.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

TODAY_POINTS = 2_000_000  # the subsample the plugin drew before


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def load_atlas(path: str | None, n_cells: int):
    """An AnnData with obs (section, cell_type) and obsm['spatial'] only (no expression needed)."""
    import anndata as ad

    if path and Path(path).exists():
        b = ad.read_h5ad(path, backed="r")
        out = ad.AnnData(obs=b.obs.copy(), obsm={"spatial": np.asarray(b.obsm["spatial"])})
        b.file.close()
        return out
    import pandas as pd

    from napari_spatialssl.data.synthetic import synthetic_atlas

    at = synthetic_atlas(n_cells, 8, 59, 30, n_domains=12, seed=0)
    obs = pd.DataFrame({"section": pd.Categorical.from_codes(at.section, [f"section_{s:02d}" for s in range(59)]),
                        "cell_type": pd.Categorical.from_codes(at.cell_type, [f"type_{t}" for t in range(30)])},
                       index=pd.RangeIndex(n_cells).astype(str))
    return ad.AnnData(obs=obs, obsm={"spatial": at.coords})


def _frames(viewer, app, centres, before=None) -> list[float]:
    out = []
    for c in centres:
        t0 = time.perf_counter()
        viewer.camera.center = tuple(c)
        if before is not None:
            before()
        app.processEvents()
        viewer.screenshot(canvas_only=True, flash=False)
        out.append(time.perf_counter() - t0)
    return out


def run(kind: str, path: str | None, n_cells: int, queue) -> None:
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_spatialssl._napari import layers as L

    adata = load_atlas(path, n_cells)
    rss_data = rss_gb()
    viewer = napari.Viewer(show=False)
    viewer.window._qt_window.resize(1400, 1000)
    app = QApplication.instance()
    rec = {"display": kind, "n_cells": int(adata.n_obs)}
    t0 = time.perf_counter()
    if kind == "today":
        data, kwargs, _ = L.adata_to_points(adata, color_by="cell_type", max_points=adata.n_obs + 1)
        rows = np.sort(np.random.default_rng(0).choice(adata.n_obs, size=min(TODAY_POINTS, adata.n_obs),
                                                       replace=False))
        kwargs["features"] = kwargs["features"].iloc[rows].reset_index(drop=True)
        kwargs.pop("feature_defaults", None)
        layer = viewer.add_points(data[rows], **kwargs)
        rec["points_shown"] = int(len(rows))
    else:
        from napari.layers import Layer

        from napari_spatialssl._napari.big_slides import OVERVIEW, with_overviews
        from napari_spatialssl._napari.viewport import ViewportPoints

        data, kwargs, kind_ = L.adata_to_points(adata, color_by="cell_type")  # the overview: built here
        pyr = kwargs["metadata"][OVERVIEW]
        rec["pyramid_levels"] = [list(lv.shape[:2]) for lv in pyr.levels]
        rec["pyramid_mb"] = pyr.nbytes / 1e6
        for layer_data in with_overviews([(data, kwargs, kind_)]):
            layer = viewer.add_layer(Layer.create(*layer_data))
        viewport = ViewportPoints(viewer)
        rec["points_shown"] = 0
    viewer.reset_view()
    app.processEvents()
    viewer.screenshot(canvas_only=True, flash=False)
    rec["first_frame_s"] = time.perf_counter() - t0
    # panning at overview: 12 moves around the middle of the tiled sections
    extent = np.array(viewer.layers.extent.world)[:, -2:]
    mid = extent.mean(0)
    span = extent[1] - extent[0]
    rng = np.random.default_rng(0)
    overview = mid + (rng.random((12, 2)) - 0.5) * span * 0.2
    rec["overview_frame_s"] = float(np.median(_frames(viewer, app, overview)))
    # zoomed in on one section (~150 cells across the canvas' width)
    zoom_span = span[1] / 30.0
    canvas_hw = tuple(int(v) for v in viewer.canvas.size)  # (height, width) in screen pixels
    viewer.camera.zoom = canvas_hw[1] / zoom_span
    centre = np.array(viewer.camera.center[-2:])
    zoomed = centre + (rng.random((12, 2)) - 0.5) * zoom_span
    shown, refresh_ms = [], []

    def refresh_viewport():  # what the viewport's timer runs once the camera stops
        viewport.refresh()
        shown.append(len(layer.data))
        refresh_ms.append(viewport.last_refresh_ms)

    refresh = None if kind == "today" else refresh_viewport
    rec["zoomed_frame_s"] = float(np.median(_frames(viewer, app, zoomed, refresh)))
    rec["canvas_hw"] = list(canvas_hw)
    if shown:
        rec["zoomed_points_in_view_median"] = int(np.median(shown))
        rec["viewport_refresh_ms_median"] = float(np.median(refresh_ms))
        rec["viewport_refresh_ms_max"] = float(np.max(refresh_ms))
    rec["rss_after_data_gb"] = rss_data
    rec["peak_rss_gb"] = rss_gb()
    viewer.close()
    queue.put(rec)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--atlas", default=None, help="an .h5ad of the synthetic atlas (else its geometry is drawn)")
    p.add_argument("--n-cells", type=int, default=4_300_000)
    args = p.parse_args(argv)
    ctx = mp.get_context("spawn")
    records = []
    for kind in ("today", "pyramid"):
        q = ctx.Queue()
        proc = ctx.Process(target=run, args=(kind, args.atlas, args.n_cells, q))
        proc.start()
        while True:
            try:
                rec = q.get(timeout=10)
                break
            except Exception:
                if not proc.is_alive():
                    raise SystemExit(f"{kind} display failed (exit code {proc.exitcode})")
        proc.join()
        records.append(rec)
        print(json.dumps(rec), flush=True)
    today, new = records
    print(json.dumps({"first_frame_ratio_today_over_pyramid": today["first_frame_s"] / new["first_frame_s"],
                      "overview_frame_ratio": today["overview_frame_s"] / new["overview_frame_s"],
                      "zoomed_frame_ratio": today["zoomed_frame_s"] / new["zoomed_frame_s"],
                      "cells_drawn": {"today": today["points_shown"], "pyramid": new["n_cells"]},
                      "load_average": os.getloadavg()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
