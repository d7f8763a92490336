"""The headless pipeline: configs, events and stop, results placed in AnnData, saved runs, seeds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp

from napari_spatialssl.data.io import SpatialDataError, read_h5ad
from napari_spatialssl.pipeline import Pipeline, fit, load_model, make_config, predict

FAST = {"epochs": 3, "finetune.epochs": 2, "hidden_dims": "16,8", "decoder_hidden": 16, "radius": 300,
        "data.section_key": "sample_id"}


@pytest.fixture(scope="module")
def starmap(starmap_path):
    return read_h5ad(starmap_path)


def test_make_config_fields_and_overrides():
    cfg = make_config("gnn-mask", ["mask.ratio=0.3", "hidden_dims=64,32", "encoder=gat"], epochs=7)
    assert cfg.epochs == 7 and cfg.mask.ratio == 0.3 and cfg.hidden_dims == [64, 32] and cfg.encoder == "gat"
    assert cfg.data.preprocess.log1p is True  # gnn-mask's preprocessing default
    # list values written as Python/JSON lists too
    assert make_config("gnn-mask", ["hidden_dims=[128, 16]"]).hidden_dims == [128, 16]
    assert make_config("spotscape", ["proto_granularity=(1,2.5)"]).proto_granularity == [1.0, 2.5]
    with pytest.raises(SpatialDataError, match="unknown setting"):
        make_config("gnn-mask", ["mask.nope=1"])
    with pytest.raises(ValueError, match="unknown method"):
        make_config("no-such-method")


def test_run_streams_events_and_stop_keeps_evaluating(starmap):
    pipe = Pipeline("gnn-mask", make_config("gnn-mask", {**FAST, "epochs": 50}))
    kinds, epochs = [], []
    for event in pipe.run(starmap):
        kinds.append(event.kind)
        if event.kind == "epoch":
            epochs.append(event.epoch)
            if event.epoch == 2:
                pipe.stop()  # as the widget's Stop button does, from the consumer
    assert kinds[0] == "stage" and "start" in kinds and "end" in kinds and kinds[-1] == "stage"
    assert epochs == [1, 2]
    out = pipe.output
    assert out.train_result.stopped_by_user and out.metrics["stopped_by_user"] and out.metrics["epochs"] == 2
    assert "X_gnn-mask" in out.adata.obsm  # evaluation still ran on the model trained so far


def test_stop_before_finetuning_reports_skipped_cell_types(starmap):
    """A Stop during pretraining skips fine-tuning: no scores from an untrained classification head."""
    pipe = Pipeline("gnn-mask", make_config("gnn-mask", {**FAST, "epochs": 50, "data.label_key": "cell_type"}))
    for event in pipe.run(starmap):
        if event.kind == "epoch" and event.epoch == 1:
            pipe.stop()
    out = pipe.output
    assert out.metrics["stopped_by_user"] and "skipped" in out.metrics["cell_type"]
    assert "gnn-mask_cell_type" not in out.adata.obs and "X_gnn-mask" in out.adata.obsm


def test_finetuning_progress_is_streamed_and_stoppable(starmap):
    """Trainings a method runs while evaluating (gnn-mask's fine-tuning) report their events through
    `run` under their own stage name, and Stop reaches them too."""
    pipe = Pipeline("gnn-mask", make_config("gnn-mask", {**FAST, "finetune.epochs": 40,
                                                          "finetune.patience": 0, "data.label_key": "cell_type"}))
    downstream = []
    for event in pipe.run(starmap):
        if event.kind in ("start", "step", "epoch", "end") and event.stage != "pretraining":
            downstream.append(event)
            if event.kind == "epoch" and event.epoch == 3:
                pipe.stop()
    stages = list(dict.fromkeys(e.stage for e in downstream))
    assert len(stages) >= 1 and all(s != "pretraining" for s in stages)
    first = [e for e in downstream if e.stage == stages[0]]
    assert first[0].kind == "start" and first[-1].kind == "end" and first[-1].message == "stopped by user"
    # Stop is asked for on epoch 3's event; the fine-tuning runs in its own thread and may finish the
    # epoch it is in before it sees the request, so it ends after epoch 3 or a little later, never at 40.
    epochs = [e.epoch for e in first if e.kind == "epoch"]
    assert epochs == list(range(1, len(epochs) + 1)) and 3 <= len(epochs) < 40, epochs
    assert pipe.output is not None and pipe.output.metrics["stopped_by_user"] is False  # pretraining ran fully


def test_an_error_while_evaluating_reaches_the_caller(starmap, monkeypatch):
    pipe = Pipeline("gnn-mask", make_config("gnn-mask", FAST))

    def broken(*_args, **_kw):
        raise SpatialDataError("evaluation failed on purpose")

    monkeypatch.setattr(pipe.method, "evaluate", broken)
    with pytest.raises(SpatialDataError, match="on purpose"):
        for _ in pipe.run(starmap):
            pass
    assert pipe.output is None


def test_results_are_placed_in_the_input_columns_with_hvg(starmap):
    out = fit(starmap, "gnn-mask", overrides={**FAST, "data.preprocess.n_top_genes": 40})
    rec = out.adata.layers["gnn-mask_reconstruction"]
    assert rec.shape == starmap.shape
    rec = rec.toarray() if sp.issparse(rec) else rec
    used = out.method.data.gene_index
    unused = np.setdiff1d(np.arange(starmap.n_vars), used)
    assert len(used) == 40 and np.all(rec[:, unused] == 0) and np.abs(rec[:, used]).sum() > 0
    assert list(out.adata.uns["spatialssl"]["gnn-mask"]["genes"]) == list(starmap.var_names[used])
    assert json.loads(out.adata.uns["spatialssl"]["gnn-mask"]["config"])["data"]["preprocess"]["n_top_genes"] == 40
    assert starmap.layers.keys() == set() or "gnn-mask_reconstruction" not in starmap.layers  # input untouched
    assert "X_gnn-mask" not in starmap.obsm and "gnn-mask_masked" not in starmap.obs
    assert "spatialssl" not in starmap.uns or "gnn-mask" not in starmap.uns["spatialssl"]
    assert out.adata.X is starmap.X  # the expression is shared, not copied (GBs on an atlas)


def test_reconstruction_layer_policy_keeps_masked_rows_or_none(starmap):
    """Large slides keep only the masked cells' reconstruction (sparse rows); 'none' leaves it out."""
    full = fit(starmap, "gnn-mask", overrides=FAST)
    masked = fit(starmap, "gnn-mask", overrides={**FAST, "eval.reconstruction_max_values": 10})  # auto -> masked
    m = masked.adata.obs["gnn-mask_masked"].to_numpy().astype(bool)
    assert m.any() and np.array_equal(masked.adata.obs["gnn-mask_reconstructed"].to_numpy(), m)
    rec = masked.adata.layers["gnn-mask_reconstruction"]
    assert sp.issparse(rec) and rec.shape == starmap.shape
    ref = full.adata.layers["gnn-mask_reconstruction"]
    ref = ref.toarray() if sp.issparse(ref) else np.asarray(ref)
    np.testing.assert_allclose(rec.toarray()[m], ref[m], rtol=1e-6)  # same run, same seed
    assert rec[~m].nnz == 0
    assert masked.metrics["reconstruction_layer"]["cells_kept"] == int(m.sum())
    assert "gnn-mask_reconstructed" not in full.adata.obs and "reconstruction_layer" not in full.metrics
    none = fit(starmap, "gnn-mask", overrides={**FAST, "eval.reconstruction": "none"})
    assert "gnn-mask_reconstruction" not in none.adata.layers and "X_gnn-mask" in none.adata.obsm
    assert none.metrics["reconstruction_layer"]["cells_kept"] == 0  # the skipped layer is reported
    assert "masked_mse" in none.metrics["reconstruction"]  # the metrics do not need the layer
    with pytest.raises(SpatialDataError, match="eval.reconstruction"):
        fit(starmap, "gnn-mask", overrides={**FAST, "eval.reconstruction": "some"})


def test_same_seed_same_result_other_seed_differs(starmap):
    a = fit(starmap, "gnn-mask", overrides={**FAST, "seed": 4})
    b = fit(starmap, "gnn-mask", overrides={**FAST, "seed": 4})
    c = fit(starmap, "gnn-mask", overrides={**FAST, "seed": 5})
    np.testing.assert_array_equal(a.adata.obsm["X_gnn-mask"], b.adata.obsm["X_gnn-mask"])
    assert a.metrics["reconstruction"]["masked_mse"] == b.metrics["reconstruction"]["masked_mse"]
    assert not np.array_equal(a.adata.obsm["X_gnn-mask"], c.adata.obsm["X_gnn-mask"])


def test_saved_run_rebuilds_the_model(starmap, tmp_path):
    out = fit(starmap, "gnn-mask", tmp_path, overrides={**FAST, "data.label_key": "cell_type"})
    assert set(out.files) == {"result", "metrics", "config", "model", "model_meta", "loss", "manifest"}
    method, cfg = load_model(tmp_path)
    assert cfg.radius == 300 and method.label_names == out.method.label_names
    assert method.model.cell_type is not None  # classifier restored from config + extra state
    with pytest.raises(SpatialDataError, match="already holds a complete run"):
        fit(starmap, "gnn-mask", tmp_path, overrides=FAST)
    again = predict(starmap, tmp_path, device="cpu")
    np.testing.assert_allclose(again.adata.obsm["X_gnn-mask"], out.adata.obsm["X_gnn-mask"], atol=1e-5)
    assert again.metrics["cell_type"]["accuracy"] is not None
