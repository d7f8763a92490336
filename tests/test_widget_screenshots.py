"""Screenshots of the dock widget for the README (docs/images/widget_*.png).

Not part of the default run: set ``SPATIALSSL_SCREENSHOTS=docs/images`` (a folder) to write them:
``SPATIALSSL_SCREENSHOTS=docs/images xvfb-run -a .venv/bin/pytest tests/test_widget_screenshots.py``.
The test still checks what it draws (layers present, images written and not blank).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

napari = pytest.importorskip("napari")

from napari_spatialssl._napari import widget as W  # noqa: E402
from napari_spatialssl._napari.widget import SpatialSSLWidget  # noqa: E402
from napari_spatialssl._napari.widget_settings import ENV_VAR  # noqa: E402

OUT = os.environ.get("SPATIALSSL_SCREENSHOTS")
pytestmark = [pytest.mark.viewer,
              pytest.mark.skipif(not OUT, reason="set SPATIALSSL_SCREENSHOTS=<folder> to write the README screenshots")]


def _shot(viewer, name: str) -> Path:
    from imageio.v3 import imread

    path = Path(OUT) / f"widget_{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(path), canvas_only=False, flash=False)
    img = imread(path)
    assert img.shape[0] > 400 and img[..., :3].std() > 10, f"{path} looks blank"
    return path


def _only(viewer, *names):
    for layer in viewer.layers:
        layer.visible = layer.name in names


def test_readme_screenshots(make_napari_viewer, starmap_path, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "settings.json"))
    monkeypatch.setenv(W.SYNC_ENV, "1")
    viewer = make_napari_viewer()
    viewer.window._qt_window.resize(1500, 950)
    w = SpatialSSLWidget(viewer)
    viewer.window.add_dock_widget(w, name="Self-supervised learning", area="right")
    w.open_h5ad(starmap_path)
    slide = w.data_layer.name

    # 2 View: radius graph, the ego-net of one cell
    w.method_combo.setCurrentText("gnn-mask")
    w.form().set_values({"radius": 400, "hidden_dims": "64,32", "decoder_hidden": 64, "finetune.epochs": 30})
    w.preview_view()
    w.preview_cell(1500)
    w.tabs.setCurrentIndex(1)
    _only(viewer, slide, W.EDGES_LAYER, W.EGONET_LAYER)
    pos = w.cell_positions()[1500]
    viewer.camera.center = tuple(pos)
    viewer.camera.zoom = 0.25
    _shot(viewer, "view_egonet")

    # 3 Masking: niches
    w.mask_strategy.setCurrentText("niches")
    w.mask_ratio.setValue(0.03)
    w.preview_mask()
    w.tabs.setCurrentIndex(2)
    _only(viewer, slide, W.MASK_LAYER)
    viewer.layers[slide].face_color = "#5a5a5a"  # grey tissue under the red masked cells
    viewer.reset_view()
    _shot(viewer, "masking")

    from napari_spatialssl._napari.genes import color_by_feature

    color_by_feature(viewer.layers[slide], "cell_type")
    # 4 Train: a short real run, loss curve
    w.mask_strategy.setCurrentText("random_cells")
    w.mask_ratio.setValue(0.2)
    w.epochs_spin.setValue(25)
    w.k_spin.setValue(5)
    w.train()
    assert "gnn-mask" in w.results, w.status.text()
    w.tabs.setCurrentIndex(3)
    _shot(viewer, "training")

    # 5 Results: domains beside the linked 2-D embedding, a selection shown in both
    _only(viewer, "gnn-mask: domains", "gnn-mask: embedding 2-D (pca)", W.SELECTION_LAYER)
    w.show_categories("gnn-mask")
    plot = viewer.layers["gnn-mask: embedding 2-D (pca)"]
    xy = np.asarray(plot.data)
    corner = np.flatnonzero(xy[:, 0] < np.percentile(xy[:, 0], 6))  # the top of the 2-D plot
    plot.selected_data = set(corner.tolist())
    ring = viewer.layers[W.SELECTION_LAYER]
    assert len(ring.data) == 2 * len(corner)
    viewer.layers.selection.active = viewer.layers["gnn-mask: domains"]
    w.tabs.setCurrentIndex(4)
    viewer.reset_view()
    _shot(viewer, "results_domains")

    # reconstruction of one gene with masked cells ringed
    gene = "Pcp4" if "Pcp4" in w.adata.var_names else str(w.adata.var_names[0])
    w.show_reconstruction("gnn-mask", gene)
    _only(viewer, f"gnn-mask: reconstruction {gene}")
    viewer.layers.selection.active = viewer.layers[f"gnn-mask: reconstruction {gene}"]
    viewer.reset_view()
    tissue = w.cell_positions()
    viewer.camera.center = tuple((tissue.min(0) + tissue.max(0)) / 2)
    viewer.camera.zoom *= 1.7  # reset_view also fits the 2-D plot beside the tissue
    _shot(viewer, "reconstruction")

    # embedding as RGB
    _only(viewer, "gnn-mask: embedding RGB")
    _shot(viewer, "embedding_rgb")

    # patch-mae: patch grid and one patch's channels
    w.method_combo.setCurrentText("patch-mae")
    w.form().set_values({"patch_size": 8, "n_channels": 16, "bin_factor": 2.0})
    w.preview_view()
    w.preview_cell(1500)
    w.tabs.setCurrentIndex(1)
    _only(viewer, slide, W.PATCH_GRID_LAYER, *[lay.name for lay in viewer.layers
                                                if lay.name.startswith(W.PATCH_LAYER + " channel")])
    viewer.layers[slide].opacity = 0.5
    viewer.camera.center = tuple(w.cell_positions()[1500])
    viewer.camera.zoom = 0.09
    _shot(viewer, "patches")
