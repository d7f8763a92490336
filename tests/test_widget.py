"""The napari dock widget, driven with qtbot from the STARmap sample slide (3 sections, 3,190 cells).

Every method is trained for 2 epochs with tiny settings; workers run synchronously
(``NAPARI_SPATIALSSL_SYNC_WORKERS=1``) except in the test that checks the event loop keeps
serving while a real thread worker trains. Run under Xvfb: ``xvfb-run -a .venv/bin/pytest``.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

napari = pytest.importorskip("napari")

from napari_spatialssl._napari import widget as W  # noqa: E402
from napari_spatialssl._napari.widget import SpatialSSLWidget  # noqa: E402
from napari_spatialssl._napari.widget_settings import ENV_VAR, settings_path  # noqa: E402

pytestmark = pytest.mark.viewer

# Small models so that 2 epochs plus each method's evaluation take a few seconds on one CPU core.
TINY = {
    "gnn-mask": {"radius": 400, "hidden_dims": "32,16", "decoder_hidden": 32, "finetune.epochs": 2},
    "spotscape": {"hidden_dims": "32,16", "k_neighbors": 10, "proto_start_epoch": 1000},
    "patch-mae": {"patch_size": 8, "patches_per_epoch": 32, "batch_size": 16, "dim": 32, "decoder_dim": 32,
                  "eval_mask_repeats": 1, "n_channels": 16, "bin_factor": 2.0},
}
METHODS = list(TINY)


@pytest.fixture
def settings_file(tmp_path, monkeypatch):
    path = tmp_path / "widget_settings.json"
    monkeypatch.setenv(ENV_VAR, str(path))
    return path


@pytest.fixture
def viewer_widget(make_napari_viewer, settings_file):
    viewer = make_napari_viewer()
    w = SpatialSSLWidget(viewer)
    viewer.window.add_dock_widget(w, name="Self-supervised learning")
    return viewer, w


@pytest.fixture
def sync(monkeypatch):
    monkeypatch.setenv(W.SYNC_ENV, "1")


def _open(w, path):
    w.open_h5ad(path)
    w.epochs_spin.setValue(2)
    w.k_spin.setValue(4)
    assert w.adata is not None, w.status.text()


def _use(w, method):
    if method not in W._available_methods():
        pytest.skip(f"method module for {method!r} not written yet")
    w.method_combo.setCurrentText(method)
    w.form().set_values(TINY[method])


def _error_shown(w, *words):
    text = w.status.text()
    assert all(word in text for word in words), text
    assert "Traceback" not in text


# ---------------------------------------------------------------------------------- opening
def test_widget_contributed_by_manifest(make_napari_viewer, settings_file):
    viewer = make_napari_viewer()
    dock, widget = viewer.window.add_plugin_dock_widget("napari-spatialssl", "Self-supervised learning")
    assert isinstance(widget, SpatialSSLWidget)


def test_wrong_choices_are_explained_not_raised(viewer_widget, starmap_path, sync):
    viewer, w = viewer_widget
    w.train()  # no data layer yet
    _error_shown(w, "no slide layer", "Open")
    assert not w.training and not w.results

    _open(w, starmap_path)
    _use(w, "gnn-mask")
    w.form().set_value("radius", 30)  # STARmap cells are ~165 units apart: nobody has a neighbour
    w.preview_view()
    _error_shown(w, "isolates every cell", "radius")
    w.train()
    _error_shown(w, "isolates every cell")
    assert not w.results

    w.form().set_value("radius", 400)
    w.adata.obs["one_class"] = "A"
    w._on_layer_changed()
    w.label_combo.setCurrentText("one_class")
    _error_shown(w, "one_class", "1 class")
    w.train()
    _error_shown(w, "one_class", "at least two classes")
    w.label_combo.setCurrentText("cell_type")

    w.lr_edit.setText("fast")
    w.train()
    _error_shown(w, "learning rate", "fast")
    w.lr_edit.setText("0.001")

    if "patch-mae" in W._available_methods():
        _use(w, "patch-mae")
        w.form().set_value("patch_size", 64)
        w.train()
        _error_shown(w, "larger than every section", "patch_size")
        w.preview_view()
        _error_shown(w, "larger than every section")
    assert not w.results
    assert w.train_button.isEnabled()


# ---------------------------------------------------------------------------------- previews
def test_graph_preview_edges_egonet_and_click(viewer_widget, starmap_path, sync):
    from napari_spatialssl.graphs.egonet import EgoNetSampler
    from napari_spatialssl.graphs.neighbors import radius_graph

    viewer, w = viewer_widget
    _open(w, starmap_path)
    _use(w, "gnn-mask")
    w.preview_view()
    edges = viewer.layers[W.EDGES_LAYER]
    assert 0 < len(edges.data) <= W.PREVIEW_EDGE_SAMPLE
    ds = w.dataset()
    ref = radius_graph(ds.coords, 400.0, ds.section)
    s = ref.summary()
    assert f"mean degree {s['mean_degree']:.2f}" in w.view_summary.text()
    assert f"isolated cells {s['isolated_cells']:,}" in w.view_summary.text()

    cell = int(np.argmax(ref.degrees()))
    w.preview_cell(cell)
    ego = viewer.layers[W.EGONET_LAYER]
    hops = len(w.config().hidden_dims)
    expected = EgoNetSampler(ref, hops).sample(np.array([cell])).node_set(0)
    assert set(ego.features["cell_index"]) == set(expected.tolist())
    assert set(ref.indices[ref.indptr[cell]:ref.indptr[cell + 1]]) <= set(ego.features["cell_index"])
    pos = w.cell_positions()
    # edge vectors start at ego-net members and end at their neighbours (on the tissue layout)
    starts = viewer.layers[W.EDGES_LAYER].data[:, 0, :]
    assert np.isin(np.round(starts, 3), np.round(pos[expected], 3)).all(axis=1).all()

    # a click near another cell previews that one
    other = int(np.flatnonzero(ref.degrees() > 0)[5])
    layer = w.data_layer
    click = SimpleNamespace(type="mouse_press", position=tuple(layer.data_to_world(layer.data[other])))
    w._on_click(viewer, click)
    assert other in set(viewer.layers[W.EGONET_LAYER].features["cell_index"])
    assert f"Cell {other}" in w.status.text()


def test_mask_previews(viewer_widget, starmap_path, sync):
    viewer, w = viewer_widget
    _open(w, starmap_path)
    _use(w, "gnn-mask")
    n = w.adata.n_obs
    w.mask_strategy.setCurrentText("random_cells")
    w.mask_ratio.setValue(0.2)
    w.preview_mask()
    assert len(viewer.layers[W.MASK_LAYER].data) == round(0.2 * n)

    w.mask_strategy.setCurrentText("cell_types")
    w.preview_mask()
    _error_shown(w, "select at least one cell type")
    for i in range(w.mask_types.count()):
        w.mask_types.item(i).setSelected(w.mask_types.item(i).text() == "Astro")
    w.preview_mask()
    masked = viewer.layers[W.MASK_LAYER].features["cell_index"].to_numpy()
    assert len(masked) == int((w.adata.obs["cell_type"] == "Astro").sum())
    assert set(w.adata.obs["cell_type"].iloc[masked]) == {"Astro"}
    assert w.config().mask.cell_types == ["Astro"]

    w.mask_strategy.setCurrentText("niches")
    w.mask_ratio.setValue(0.05)
    w.preview_mask()
    niche = viewer.layers[W.MASK_LAYER].features["cell_index"].to_numpy()
    assert abs(len(niche) - 0.05 * n) < 0.03 * n
    A = w.graph().to_scipy()
    in_mask = np.zeros(n, bool)
    in_mask[niche] = True
    has_masked_neighbour = np.asarray(A[niche] @ in_mask.astype(float)).ravel() > 0
    assert has_masked_neighbour.mean() > 0.7  # spatial niches, not scattered cells

    w.mask_strategy.setCurrentText("gene_channels")
    w.preview_mask()
    frac = viewer.layers[W.MASK_LAYER].features["masked_gene_fraction"].to_numpy()
    assert abs(frac.mean() - 0.05) < 0.02


def test_patch_preview_grid_channels_and_regions(viewer_widget, starmap_path, sync):
    from napari_spatialssl.graphs.lattice import tiled_origins

    viewer, w = viewer_widget
    _open(w, starmap_path)
    _use(w, "patch-mae")
    w.preview_view()
    grid = viewer.layers[W.PATCH_GRID_LAYER]
    cfg = w.config()
    ds = w.dataset(cfg)
    n_tiles = sum(len(tiled_origins(w._lattice(cfg, s), 8, 8)) for s in range(ds.n_sections))
    assert len(grid.data) == n_tiles
    channels = [lay for lay in viewer.layers if lay.name.startswith(W.PATCH_LAYER + " channel")]
    assert len(channels) == 3 and channels[0].data.shape == (8, 8)
    assert "16 channels" in w.view_summary.text()

    cell = 1500
    w.preview_cell(cell)
    img = [lay for lay in viewer.layers if lay.name.startswith(W.PATCH_LAYER + " channel")][0]
    top_left = np.asarray(img.translate)
    extent = np.asarray(img.scale) * 8
    p = w.cell_positions()[cell]
    assert np.all(p >= top_left - extent) and np.all(p <= top_left + extent)  # patch around the cell

    w.mask_strategy.setCurrentText("regions")
    w.region_size.setValue(2)
    w.n_regions.setValue(3)
    w.preview_mask()
    regions = viewer.layers[W.PATCH_LAYER + " masked"]
    assert 4 <= len(regions.data) <= 12  # 3 squares of 2 x 2 bins, possibly overlapping


# ---------------------------------------------------------------------------------- train + results
@pytest.mark.parametrize("method", METHODS)
def test_train_overlays_export_reread(viewer_widget, starmap_path, sync, tmp_path, method):
    import anndata as ad

    viewer, w = viewer_widget
    _open(w, starmap_path)
    _use(w, method)
    w.train()
    assert method in w.results, w.status.text()
    out = w.results[method]
    assert out.train_result.epochs_run == 2
    assert w.progress.value() == W.PROGRESS_MAX
    assert len(w.loss_curve.epoch_losses) == 2 and np.isfinite(w.loss_curve.epoch_losses).all()

    names = {lay.name for lay in viewer.layers}
    for what in ("domains", "embedding RGB", "embedding 2-D (pca)"):
        assert f"{method}: {what}" in names, names
    assert f"{method}_domain" in out.adata.obs
    k = out.adata.obs[f"{method}_domain"].nunique()
    assert w.legend.list.count() == k
    rgb = viewer.layers[f"{method}: embedding RGB"].face_color
    assert rgb.shape == (out.adata.n_obs, 4) and rgb[:, :3].std(0).min() > 0

    if f"{method}_reconstruction" in out.adata.layers:
        gene = str(out.method.data.gene_names[0])
        layer = w.show_reconstruction(method, gene)
        col = f"{gene} reconstructed"
        j = list(out.adata.var_names).index(gene)
        expected = np.asarray(out.adata.layers[f"{method}_reconstruction"][:, j].todense()).ravel() \
            if hasattr(out.adata.layers[f"{method}_reconstruction"], "todense") else \
            np.asarray(out.adata.layers[f"{method}_reconstruction"])[:, j]
        np.testing.assert_allclose(layer.features[col].to_numpy(), expected, rtol=1e-5)
        masked = out.adata.obs.get(f"{method}_masked")
        if masked is not None and masked.any():
            assert (layer.border_width[masked.to_numpy().astype(bool)] > 0).all()
        err = viewer.layers[f"{method}: per-cell error"].features["reconstruction MSE"].to_numpy()
        assert np.isfinite(err).all() and (err >= 0).all()
        if masked is not None and masked.any():
            # a large slide keeps only the masked cells' reconstruction: the others are blank, not 0
            kept = masked.to_numpy().astype(bool)
            out.adata.obs[f"{method}_reconstructed"] = kept
            layer = w.show_reconstruction(method, gene)
            shown = layer.features[col].to_numpy()
            assert np.isnan(shown[~kept]).all() and np.isfinite(shown[kept]).all()
            assert (layer.face_color[~kept, 3] == 0).all() and "Only the" in w.status.text()
            w.show_error(method)
            err = viewer.layers[f"{method}: per-cell error"].features["reconstruction MSE"].to_numpy()
            assert np.isnan(err[~kept]).all() and np.isfinite(err[kept]).all()
            del out.adata.obs[f"{method}_reconstructed"]
    assert "domains vs 'cell_type'" in w.metrics_text.toPlainText()

    # linked selection: cells picked in the 2-D plot are selected on the tissue and ringed
    plot = viewer.layers[f"{method}: embedding 2-D (pca)"]
    tissue = viewer.layers[f"{method}: domains"]
    plot.selected_data = {0, 5, 7}
    assert set(tissue.selected_data) == {0, 5, 7}
    ring = viewer.layers[W.SELECTION_LAYER]
    assert len(ring.data) == 6
    tissue.selected_data = {11}
    assert set(plot.selected_data) == {11}

    n_domains = out.adata.obs[f"{method}_domain"].nunique()
    if method == "gnn-mask":  # once is enough (k-means is the slow part)
        w.result_k_spin.setValue(3)
        w.recompute_domains(method)
        n_domains = 3
        assert w.results[method].adata.obs[f"{method}_domain"].nunique() == 3
        assert w.legend.list.count() == 3

    # export: the slide layer carries every result
    h5 = tmp_path / "cells.h5ad"
    csv = tmp_path / "cells.csv"
    w.export(h5)
    w.export(csv)
    back = ad.read_h5ad(h5)
    assert f"X_{method}" in back.obsm and back.obsm[f"X_{method}"].shape[0] == out.adata.n_obs
    assert back.obs[f"{method}_domain"].nunique() == n_domains
    if f"{method}_reconstruction" in out.adata.layers:
        assert f"{method}_reconstruction" in back.layers
    table = pd.read_csv(csv)
    assert f"{method}_domain" in table.columns and len(table) == out.adata.n_obs
    w.export(h5)  # never overwrites silently
    _error_shown(w, "already exists")
    png = w.save_png(tmp_path / "view.png")
    assert png.stat().st_size > 1000


def test_downstream_training_events_drive_the_bar_not_the_loss_curve(viewer_widget):
    """Fine-tuning a method runs after pretraining shows as its own stage in the progress bar and
    label; the loss curve keeps the pretraining losses only."""
    from napari_spatialssl.training import TrainEvent

    _viewer, w = viewer_widget
    w._on_event(TrainEvent("epoch", 1, 2, 3, 3, {"loss": 0.5}, None, 0.1))
    assert len(w.loss_curve.epoch_losses) == 1
    stage = "fine-tuning cell types (pretrained encoder)"
    w._on_event(TrainEvent("start", 0, 10, message="training on cpu", stage=stage))
    assert w.progress.value() == 0 and stage in w.progress_label.text()
    w._on_event(TrainEvent("epoch", 4, 10, 2, 2, {"loss": 1.25}, 0.7, 0.2, stage=stage))
    assert w.progress.value() == int(W.PROGRESS_MAX * 0.4)
    assert "epoch 4/10" in w.progress_label.text() and stage in w.progress_label.text()
    w._on_event(TrainEvent("end", 4, 10, message="stopped by user", stage=stage))
    assert "stopped by user" in w.progress_label.text()
    assert len(w.loss_curve.epoch_losses) == 1  # untouched by the fine-tuning events


def test_save_and_load_model(viewer_widget, starmap_path, sync, tmp_path):
    viewer, w = viewer_widget
    _open(w, starmap_path)
    _use(w, "gnn-mask")
    w.save_model(tmp_path / "none")
    _error_shown(w, "no trained")
    w.train()
    trained = w.results["gnn-mask"]
    files = w.save_model(tmp_path / "model")
    assert (tmp_path / "model" / "model.pt").exists() and "config" in files

    w.form().set_value("radius", 123)  # loading restores the saved settings
    w.epochs_spin.setValue(9)
    w.load_model(tmp_path / "model")
    assert float(w.form().overrides()["radius"]) == 400
    assert w.epochs_spin.value() == 2
    loaded = w.results["gnn-mask"]
    assert loaded is not trained and loaded.train_result is None
    np.testing.assert_allclose(loaded.adata.obsm["X_gnn-mask"], trained.adata.obsm["X_gnn-mask"], atol=1e-4)
    assert "saved model applied" in w.status.text()


# ---------------------------------------------------------------------------------- threading
def test_event_loop_serves_while_worker_trains_and_stop_keeps_model(viewer_widget, starmap_path, qtbot,
                                                                     monkeypatch):
    from qtpy.QtCore import QTimer

    monkeypatch.delenv(W.SYNC_ENV, raising=False)
    viewer, w = viewer_widget
    _open(w, starmap_path)
    _use(w, "gnn-mask")
    w.epochs_spin.setValue(10_000)  # far more than will run: Stop ends it
    ticks: list[float] = []
    progress_seen: list[int] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: (ticks.append(time.perf_counter()), progress_seen.append(w.progress.value())))
    timer.start()
    w.train()
    assert w.training and not w.train_button.isEnabled() and w.stop_button.isEnabled()
    t0 = time.perf_counter()
    qtbot.waitUntil(lambda: len(w.loss_curve.epoch_losses) >= 3 and time.perf_counter() - t0 > 3,
                    timeout=120_000)
    during = [t for t in ticks if t >= t0]
    elapsed = time.perf_counter() - t0
    viewer.camera.zoom *= 1.5  # the viewer still takes commands while training
    w.stop()
    qtbot.waitUntil(lambda: not w.training, timeout=120_000)
    timer.stop()
    gaps = np.diff(during)
    assert len(during) >= 10, (len(during), elapsed)
    assert gaps.max() < 2.0, gaps.max()  # the loop never froze (generous: CI machines are shared)
    assert any(0 < p < W.PROGRESS_MAX for p in progress_seen)  # progress moved live, before the end
    out = w.results["gnn-mask"]
    assert out.train_result.stopped_by_user
    assert 3 <= out.train_result.epochs_run < 10_000
    assert "stopped by you" in w.status.text()
    assert "gnn-mask: domains" in viewer.layers  # the model trained so far still gave results

    # domains and the graph preview are computed off the main thread too, then drawn
    w.result_k_spin.setValue(3)
    w.recompute_domains("gnn-mask")
    assert "Clustering" in w.status.text()
    qtbot.waitUntil(lambda: w.results["gnn-mask"].adata.obs["gnn-mask_domain"].nunique() == 3, timeout=60_000)
    qtbot.waitUntil(lambda: w._bg_worker is None, timeout=10_000)
    w._graph_cache.clear()
    w.preview_view()
    assert "Building the gnn-mask graph" in w.status.text() and W.EDGES_LAYER not in viewer.layers
    qtbot.waitUntil(lambda: W.EDGES_LAYER in viewer.layers, timeout=60_000)
    assert len(viewer.layers[W.EDGES_LAYER].data) > 0 and "edges" in w.status.text()


# ---------------------------------------------------------------------------------- settings
def test_settings_persist_in_overridable_file(make_napari_viewer, settings_file, starmap_path, sync):
    assert settings_path() == settings_file
    viewer = make_napari_viewer()
    w = SpatialSSLWidget(viewer)
    _open(w, starmap_path)
    _use(w, "gnn-mask")
    w.form().set_value("radius", 222)
    w.epochs_spin.setValue(7)
    w.lr_edit.setText("0.005")
    w.mask_ratio.setValue(0.35)
    w.label_combo.setCurrentText("layer")
    w.save_settings()
    assert settings_file.exists()

    w2 = SpatialSSLWidget(make_napari_viewer())
    assert w2.method == "gnn-mask"
    assert float(w2.form().overrides()["radius"]) == 222
    assert w2.epochs_spin.value() == 7 and w2.lr_edit.text() == "0.005"
    assert abs(w2.mask_ratio.value() - 0.35) < 1e-9
    w2.open_h5ad(starmap_path)
    assert w2.label_key == "layer"

    settings_file.write_text("{not json")  # a corrupt file means defaults, not a crash
    w3 = SpatialSSLWidget(make_napari_viewer())
    assert w3.epochs_spin.value() == 50
