"""The plugin's Session without a display: open, view, mask, train 2 epochs, stop, results, regions, reopen."""

from __future__ import annotations

import numpy as np
import pytest

from napari_spatialssl._napari.results import RESULTS_META, adopt
from napari_spatialssl._napari.session import Session, Slide
from napari_spatialssl._napari.workers import InlineRunner
from napari_spatialssl.data.io import read_h5ad

TINY = {
    "gnn-mask": {"hidden_dims": [16, 8], "decoder_hidden": 16, "finetune.epochs": 2},
    "spotscape": {"hidden_dims": [32, 8], "k_neighbors": 10},
    "patch-mae": {"patch_size": 8, "patches_per_epoch": 16, "batch_size": 8, "dim": 16, "decoder_dim": 16,
                  "depth": 1, "eval_mask_repeats": 1, "n_channels": 8, "eval_mask_sizes": [2]},
}


class Recorder:
    def __init__(self, session):
        self.events: dict[str, list] = {}
        for name in ("slide", "settings", "method", "job", "progress", "view", "display", "results", "region",
                     "message", "busy", "selection"):
            getattr(session.events, name).connect(lambda *a, n=name: self.events.setdefault(n, []).append(a))

    def last(self, name):
        return self.events[name][-1]

    def errors(self):
        return [m for m, level in self.events.get("message", []) if level == "error"]


@pytest.fixture(scope="module")
def osmfish(osmfish_path):
    return read_h5ad(osmfish_path)


def new_session(adata, name="osmfish"):
    session = Session(InlineRunner())
    rec = Recorder(session)
    session.open_slide(Slide.from_adata(adata, name))
    return session, rec


def test_open_sets_keys_and_checks_the_view(osmfish):
    session, rec = new_session(osmfish)
    assert session.config().data.label_key == "cell_type"
    assert "unlabelled" in session.label_summary() and "Excluded" in session.label_summary()
    view = rec.last("view")[0]
    assert view.kind == "graph" and view.facts["isolated_fraction"] < 0.3  # the radius follows the slide's spacing
    assert "radius" in view.summary() and "slide units" in view.summary()
    assert not rec.errors()


def test_settings_are_validated_and_kept_in_one_config(osmfish):
    session, rec = new_session(osmfish)
    assert session.set_setting("epochs", 3) and session.config().epochs == 3
    with pytest.raises(ValueError, match="epochs=0"):
        session.set_setting("epochs", 0)
    assert session.config().epochs == 3  # the bad value never reached the config
    session.set_keys(label_key="region", ignore_labels=["Excluded"])
    assert all(c.data.label_key == "region" for c in session.configs.values())
    saved = session.settings_dict()
    again = Session(InlineRunner())
    again.restore_settings(saved)
    assert again.configs["gnn-mask"].epochs == 3


def test_previews_for_each_view(osmfish):
    session, rec = new_session(osmfish)
    session.preview_view()
    d = rec.last("display")[0]
    assert d.specs[0].kind == "vectors" and "edges" in d.specs[0].name
    session.preview_view(cell=10)
    assert any("ego-net" in s.name for s in rec.last("display")[0].specs)
    session.preview_mask()
    assert "hidden" in rec.last("display")[0].specs[0].name
    session.set_method("spotscape")
    session.preview_mask()
    assert any("dropped" in s.name for s in rec.last("display")[0].specs)
    session.set_method("patch-mae")
    session.preview_view()
    specs = {s.key: s for s in rec.last("display")[0].specs}
    grid, mask = specs["preview:patch-grid"], specs["preview:patch-mask"]
    # the grid as line segments, 4 per patch; the hidden bins as one RGBA image over the patch
    assert grid.kind == "vectors" and grid.data.shape[1:] == (2, 2) and len(grid.data) % 4 == 0
    assert mask.kind == "image" and mask.data.ndim == 3 and mask.data.shape[2] == 4
    assert 0 < (mask.data[..., 3] > 0).mean() < 1  # some bins hidden, not all
    assert sum(s.kind == "image" for s in specs.values()) >= 2  # the patch's gene channels too
    # the model hides tokens (token_bins x token_bins bins), and so does the preview, for both masks
    t = session.config().token_bins
    assert t == 2
    for strategy, word in (("random_cells", "tokens"), ("regions", "region(s) of 3 x 3 tokens")):
        session.set_setting("mask.strategy", strategy)
        session.set_setting("mask.region_size", 3)
        session.preview_view()
        mask = {s.key: s for s in rec.last("display")[0].specs}["preview:patch-mask"]
        hidden = mask.data[..., 3] > 0
        blocks = hidden.reshape(hidden.shape[0] // t, t, hidden.shape[1] // t, t)
        assert (blocks.all((1, 3)) == blocks.any((1, 3))).all()  # whole tokens only
        assert hidden.any() and word in mask.name, mask.name
    # the last draw: n_regions squares of 3 x 3 tokens = 6 x 6 bins each (they may overlap)
    assert 36 <= hidden.sum() <= 36 * session.config().mask.n_regions
    assert not rec.errors(), rec.errors()


@pytest.mark.parametrize("method", list(TINY))
def test_train_two_epochs_results_and_regions(osmfish, method):
    session, rec = new_session(osmfish)
    session.set_method(method)
    session.set_setting("epochs", 2)
    for k, v in TINY[method].items():
        session.set_setting(k, v)
    session.set_keys(domain_key="region")
    session.set_setting("eval.n_domains", 5)
    session.train()
    assert not rec.errors(), rec.errors()
    assert method in session.results and session.job.kind == "idle"
    progress = [p[0] for p in rec.events["progress"]]
    assert any("pretraining: epoch 2 of 2" in p.text for p in progress)
    shown = rec.last("display")[0]
    assert shown.specs[0].key == f"result:{method}" and shown.legend is not None  # domains shown at once
    colours = np.unique(np.round(shown.specs[0].style["face_color"], 3), axis=0)
    assert len(colours) >= 5  # K distinct colours
    for what in ("embedding", "error", "cell types" if method == "gnn-mask" else "domains"):
        session.show(method, what)
        assert rec.last("display")[0].specs[0].key == f"result:{method}", rec.errors()
    gene = session.result(method).model_genes()[0]
    session.show(method, "reconstruction", gene)
    session.compare(gene)
    assert any(s.role == "compare" for s in rec.last("display")[0].specs)
    session.recompute_domains(method, 4)
    assert session.result(method).adata.obs[f"{method}_domain"].nunique() == 4
    xy = session.slide.positions
    lo, hi = np.percentile(xy, 40, axis=0), np.percentile(xy, 55, axis=0)
    session.inspect_region(method, np.array([[lo[0], lo[1]], [lo[0], hi[1]], [hi[0], hi[1]], [hi[0], lo[1]]]))
    report = rec.last("region")[0]
    assert report.method == method and len(report.cells) > 10
    assert any(s.role == "region" for s in rec.last("display")[0].specs)
    assert not rec.errors(), rec.errors()


def test_stop_keeps_the_model_and_makes_results(osmfish):
    session, rec = new_session(osmfish)
    session.set_setting("epochs", 50)
    for k, v in TINY["gnn-mask"].items():
        session.set_setting(k, v)
    session.events.progress.connect(lambda p: session.stop() if "epoch 1 of 50" in p.text else None)
    session.train()
    result = session.result("gnn-mask")
    assert result.train_result.stopped_by_user and result.train_result.epochs_run < 50
    assert result.has("domains") and not rec.errors()


def test_results_survive_a_new_session(osmfish):
    session, rec = new_session(osmfish)
    session.set_setting("epochs", 2)
    for k, v in TINY["gnn-mask"].items():
        session.set_setting(k, v)
    session.train()
    layer_metadata = {"adata": session.slide.adata, RESULTS_META: session.results}
    again = Session(InlineRunner())
    again.open_slide(session.slide, adopted=adopt(layer_metadata))
    assert "gnn-mask" in again.results and again.results["gnn-mask"].trained is not None
    # a slide opened from disk with results in it: adopted from uns['spatialssl']
    from_disk = adopt({"adata": session.slide.adata})
    assert "gnn-mask" in from_disk and from_disk["gnn-mask"].source == "adopted"


def test_training_on_two_local_processes(tmp_path):
    """The Train panel's 'Processes' (fit --devices): the Session trains on 2 local gloo processes, this
    one rank 0, and the result is adopted like any other; impossible counts are one clear line."""
    from napari_spatialssl.data.io import SpatialDataError
    from napari_spatialssl.data.synthetic import synthetic_slide

    adata = synthetic_slide(n_cells=600, n_genes=24, n_sections=2, n_cell_types=4, n_domains=3, seed=2)
    session = Session(InlineRunner())
    rec = Recorder(session)
    session.open_slide(Slide.from_adata(adata, "synthetic"))
    with pytest.raises(SpatialDataError, match="devices: 0 .* offers 1 to"):
        session.set_devices(0)
    with pytest.raises(SpatialDataError, match="devices: 10000"):
        session.set_devices(10_000)
    assert session.devices == 1
    session.set_devices(2)
    session.set_method("patch-mae")
    for k, v in {**TINY["patch-mae"], "epochs": 2, "eval.n_domains": 3, "device": "cpu"}.items():
        session.set_setting(k, v)
    session.train()
    assert not rec.errors(), rec.errors()
    result = session.result("patch-mae")
    assert result.metrics["training_processes"] == 2
    assert result.has("domains") and len(set(result.adata.obs["patch-mae_domain"])) == 3
