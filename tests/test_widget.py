"""The real dock widget under Xvfb, judged by what a person sees: after training, coloured domains on top of
the tissue (at least K distinct colours, not grey) and a dock that kept its width; results that survive
a reopened widget; a hostile model file refused; the region workflow for every method; an event loop that
keeps serving while a thread trains. Workers run inline (``NAPARI_SPATIALSSL_SYNC_WORKERS=1``) except where
the event loop itself is measured."""

from __future__ import annotations

import os
import pickle
import time

import numpy as np
import pytest

napari = pytest.importorskip("napari")

from napari_spatialssl._napari.layer_updates import REGION_LAYER  # noqa: E402
from napari_spatialssl._napari.reader import read_slides  # noqa: E402
from napari_spatialssl._napari.widget import SpatialSSLWidget  # noqa: E402
from napari_spatialssl._napari.widget_settings import ENV_VAR  # noqa: E402
from napari_spatialssl._napari.workers import SYNC_ENV  # noqa: E402

pytestmark = pytest.mark.viewer

TINY = {
    "gnn-mask": {"hidden_dims": [32, 16], "decoder_hidden": 32, "finetune.epochs": 2},
    "spotscape": {"hidden_dims": [32, 16], "k_neighbors": 10},
    "patch-mae": {"patch_size": 8, "patches_per_epoch": 32, "batch_size": 16, "dim": 32, "decoder_dim": 32,
                  "depth": 1, "eval_mask_repeats": 1, "n_channels": 12, "eval_mask_sizes": [2]},
}
DOCK = "Self-supervised learning"


@pytest.fixture
def settings_file(tmp_path, monkeypatch):
    path = tmp_path / "widget_settings.json"
    monkeypatch.setenv(ENV_VAR, str(path))
    return path


@pytest.fixture
def sync(monkeypatch):
    monkeypatch.setenv(SYNC_ENV, "1")


def open_widget(viewer, path=None):
    if path is not None:
        for data, kwargs, kind in read_slides(str(path)):
            viewer.add_points(data, **kwargs)
    viewer.window._qt_window.resize(1500, 950)
    w = SpatialSSLWidget(viewer)
    dock = viewer.window.add_dock_widget(w, name=DOCK, area="right")
    return w, dock


def pump(qtbot, w, timeout=600):
    """Let the event loop run until the Session's jobs are done."""
    deadline = time.time() + timeout
    qtbot.wait(50)
    while w.session.busy and time.time() < deadline:
        qtbot.wait(50)
    assert not w.session.busy, "jobs did not finish"


def configure(w, method, k=6, epochs=2):
    s = w.session
    s.set_method(method)
    s.set_setting("epochs", epochs)
    s.set_setting("eval.n_domains", k)
    for key, value in TINY[method].items():
        s.set_setting(key, value)


def legend_colours_on_screen(viewer, legend_items, min_pixels=20) -> int:
    """How many legend colours are painted on at least `min_pixels` pixels of a screenshot (a domain of
    a few cells still shows; a grey blob shows none)."""
    shot = viewer.screenshot(canvas_only=True, flash=False)
    if os.environ.get("SPATIALSSL_DEBUG_SHOTS"):
        from imageio.v3 import imwrite

        imwrite(os.path.join(os.environ["SPATIALSSL_DEBUG_SHOTS"], f"shot_{time.time():.0f}.png"), shot)
    img = shot[..., :3].astype(int).reshape(-1, 3)
    tissue = img[img.max(1) > 30]
    hits = 0
    for _, rgba, count in legend_items:
        if not count:
            continue
        c = np.asarray(rgba[:3], float) * 255
        if (np.abs(tissue - c).max(1) < 28).sum() >= min_pixels:
            hits += 1
    return hits


def errors(w) -> bool:
    return w.status.styleSheet().startswith("color: #e05050")


SLIDES = {"osmfish": ("osmfish_cortex.h5ad", 6), "starmap": ("starmap_mpfc_3slices.h5ad", 4),
          "dlpfc": ("dlpfc_151673.h5ad", 7)}


@pytest.mark.parametrize("slide", list(SLIDES))
@pytest.mark.parametrize("method", list(TINY))
def test_training_shows_coloured_domains_on_top_and_the_dock_keeps_its_width(make_napari_viewer, shared_data,
                                                                              settings_file, sync, qtbot, method,
                                                                              slide):
    from conftest import SAMPLE_DATA

    name, k = SLIDES[slide]
    path = shared_data(name) if slide == "dlpfc" else SAMPLE_DATA / name
    viewer = make_napari_viewer(show=True)
    w, dock = open_widget(viewer, path)
    pump(qtbot, w)
    width = dock.width()
    assert w.session.slide is not None and not errors(w), w.status.text()
    configure(w, method, k=k)
    w.panels["train"].train_button.click()
    pump(qtbot, w)
    assert not errors(w), w.status.text()
    top = viewer.layers[-1]
    assert top.metadata.get("spatialssl_key") == f"result:{method}" and top.visible
    assert "domains" in top.name and top.name.startswith(method)
    legend = w.panels["results"].legend
    assert not legend.isHidden() and len(legend.names()) >= k
    qtbot.wait(200)
    items = w.panels["results"]._last_legend
    assert legend_colours_on_screen(viewer, items) >= k, "fewer than K distinct colours visible over the tissue"
    assert abs(dock.width() - width) <= 2, (width, dock.width())
    assert "pretraining done after 2 epoch(s)" in w.status.text()


def test_results_survive_a_reopened_widget(make_napari_viewer, osmfish_path, settings_file, sync, qtbot):
    viewer = make_napari_viewer(show=True)
    w, dock = open_widget(viewer, osmfish_path)
    pump(qtbot, w)
    configure(w, "gnn-mask")
    w.session.train()
    pump(qtbot, w)
    viewer.window.remove_dock_widget(dock)
    again, _ = open_widget(viewer)
    pump(qtbot, again)
    assert "gnn-mask" in again.session.results and again.session.results["gnn-mask"].trained is not None
    assert again.panels["results"].method.currentText() == "gnn-mask"
    assert "adopted" in again.status.text() or "gnn-mask" in again.status.text()
    assert again.session.config("gnn-mask").epochs == 2  # the settings were saved and restored


def test_a_crafted_model_file_runs_nothing_in_the_widget(make_napari_viewer, osmfish_path, settings_file, sync,
                                                          qtbot, tmp_path):
    marker = tmp_path / "PWNED"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil"
    evil.mkdir()
    with open(evil / "model.pt", "wb") as fh:
        pickle.dump({"format": "napari-spatialssl/1", "extra": Exploit()}, fh)
    viewer = make_napari_viewer(show=True)
    w, _ = open_widget(viewer, osmfish_path)
    pump(qtbot, w)
    w.session.load_model(evil)
    pump(qtbot, w)
    assert errors(w) and "refused" in w.status.text() and "model.pt" in w.status.text()
    assert not marker.exists()
    assert len(viewer.layers) >= 1 and w.session.job.kind == "idle"


@pytest.mark.parametrize("method", list(TINY))
def test_hide_a_drawn_region_and_see_what_the_model_puts_there(make_napari_viewer, osmfish_path, settings_file,
                                                                sync, qtbot, method):
    viewer = make_napari_viewer(show=True)
    w, _ = open_widget(viewer, osmfish_path)
    pump(qtbot, w)
    configure(w, method)
    w.session.train()
    pump(qtbot, w)
    w.session.request_region_layer()
    shapes = viewer.layers[REGION_LAYER]
    xy = w.session.slide.positions
    lo, hi = np.percentile(xy, 40, axis=0), np.percentile(xy, 55, axis=0)
    shapes.add_rectangles(np.array([[lo[0], lo[1]], [hi[0], hi[1]]]))  # as the rectangle tool does
    assert w.session.region_polygon is not None
    panel = w.panels["region"]
    panel.method.setCurrentText(method)
    panel._inspect()
    pump(qtbot, w)
    assert not errors(w), w.status.text()
    assert panel.table.rowCount() > 0 and "hidden" in panel.text.text()
    keys = {lay.metadata.get("spatialssl_key") for lay in viewer.layers if lay.visible}
    assert {"region:panels", "region:outline"} <= keys
    gene = panel.table.item(1, 0).text()
    panel._pick(1)
    pump(qtbot, w)
    assert gene in viewer.layers[-1].name or any(gene in lay.name for lay in viewer.layers if lay.visible)


def test_the_event_loop_keeps_serving_while_a_thread_trains(make_napari_viewer, osmfish_path, settings_file,
                                                            qtbot, monkeypatch):
    from qtpy.QtCore import QTimer

    monkeypatch.delenv(SYNC_ENV, raising=False)
    viewer = make_napari_viewer(show=True)
    w, _ = open_widget(viewer, osmfish_path)
    pump(qtbot, w)
    configure(w, "gnn-mask", epochs=6)
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(10)
    w.session.train()
    pump(qtbot, w)
    timer.stop()
    gaps = np.diff(ticks) * 1000
    assert "gnn-mask" in w.session.results
    assert len(gaps) > 20 and gaps.max() < 1500, f"the event loop stalled for {gaps.max():.0f} ms"


def test_save_and_load_a_model(make_napari_viewer, osmfish_path, settings_file, sync, qtbot, tmp_path):
    from napari_spatialssl.runs import verify_run

    viewer = make_napari_viewer(show=True)
    w, _ = open_widget(viewer, osmfish_path)
    pump(qtbot, w)
    configure(w, "spotscape")
    w.session.train()
    pump(qtbot, w)
    w.session.save_model(tmp_path / "model")
    pump(qtbot, w)
    verify_run(tmp_path / "model")
    w.session.load_model(tmp_path / "model")
    pump(qtbot, w)
    assert not errors(w), w.status.text()
    assert w.session.results["spotscape"].source == "predicted"


def test_a_bad_file_is_one_clear_line(make_napari_viewer, settings_file, sync, qtbot, tmp_path):
    bad = tmp_path / "slide.h5ad"
    bad.write_text("not hdf5")
    viewer = make_napari_viewer(show=True)
    w, _ = open_widget(viewer)
    w.session.open_file(bad)
    pump(qtbot, w)
    assert errors(w) and "slide.h5ad" in w.status.text() and "HDF5" in w.status.text()
    w.session.guarded(w.session.train)
    assert "no slide yet" in w.status.text()
