"""gnn-mask: graph views, masking, ego-net exactness, fine-tuning, results and metrics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from napari_spatialssl.config import TrainConfig
from napari_spatialssl.data.dataset import SpatialDataset
from napari_spatialssl.data.io import SpatialDataError, read_h5ad
from napari_spatialssl.evaluation.classification import (
    class_weight_vector,
    classification_scores,
    logistic_regression_baseline,
)
from napari_spatialssl.models.gnn_mask import GnnMask, GnnMaskConfig
from napari_spatialssl.pipeline import fit, make_config
from napari_spatialssl.training import Trainer

FAST = {"epochs": 3, "finetune.epochs": 3, "hidden_dims": "32,16", "decoder_hidden": 32, "heads": 2, "radius": 300}
# STARmap coordinates are in pixels: radius 300 gives ~4 neighbours per cell
BZ5, BZ14 = "20180417_BZ5_control", "20180424_BZ14_control"


@pytest.fixture(scope="module")
def starmap(starmap_path):
    adata = read_h5ad(starmap_path)
    # unknown labels: a user-listed value, NaN and empty strings stay in the graph
    ct = adata.obs["cell_type"].astype(object).to_numpy().copy()
    ct[:40] = "Ambiguous"
    ct[40:60] = np.nan
    ct[60:70] = ""
    adata.obs["ct"] = pd.Categorical(ct)
    return adata


def _dataset(adata, **kw):
    cfg = GnnMaskConfig()
    return SpatialDataset.from_anndata(adata, section_key="sample_id", label_key="ct",
                                       ignore_labels=["Ambiguous"], preprocess=cfg.data.preprocess, **kw)


def _method(adata, **over):
    cfg = make_config("gnn-mask", {**FAST, **over})
    m = GnnMask(cfg)
    data = _dataset(adata)
    torch.manual_seed(0)
    m.prepare(data)
    return m, data


@pytest.mark.parametrize("encoder,root", [("gcn", False), ("gat", False), ("gcn", True)])
def test_egonet_centre_outputs_equal_whole_graph(starmap, encoder, root):
    whole, data = _method(starmap, encoder=encoder, graph_mode="whole", radius=300, root_skip=root)
    ego, _ = _method(starmap, encoder=encoder, graph_mode="egonet", radius=300, batch_size=400, root_skip=root)
    ego.model.load_state_dict(whole.model.state_dict())
    cells = np.arange(data.n_cells)
    mask = np.zeros(data.n_cells, bool)
    mask[::5] = True
    e1, r1, _ = whole._reconstruct(cells, mask, torch.device("cpu"))
    e2, r2, _ = ego._reconstruct(cells, mask, torch.device("cpu"))
    assert ego.view.sampler is not None and ego.view.num_hops == 2
    np.testing.assert_allclose(e1, e2, atol=2e-5)
    np.testing.assert_allclose(r1, r2, atol=2e-5)


def test_radius_graph_is_built_once_per_section(starmap):
    m, data = _method(starmap, radius=300)
    g = m.view.graph
    src = np.repeat(np.arange(g.n_nodes), g.degrees())
    assert (data.section[src] == data.section[g.indices]).all()  # never across sections
    ids = [id(m.view.section_sub(s)[1]) for s in range(data.n_sections)]
    batches = list(m.train_batches(1, np.random.default_rng(0)))
    assert len(batches) == data.n_sections  # whole mode: one section per step
    assert [id(m.view.section_sub(s)[1]) for s in range(data.n_sections)] == ids  # cached, not rebuilt


def test_sections_per_step_and_egonet_batches(starmap):
    m, data = _method(starmap, sections_per_step=2)
    batches = list(m.train_batches(1, np.random.default_rng(0)))
    assert len(batches) == 2 and sum(len(b[0].nodes) for b in batches) == data.n_cells
    e, _ = _method(starmap, graph_mode="egonet", batch_size=256)
    bs = list(e.train_batches(1, np.random.default_rng(0)))
    assert len(bs) == len(e.train_batches(1, np.random.default_rng(0)))
    centres = np.concatenate([b[0].cells for b in bs])
    assert np.array_equal(np.sort(centres), np.flatnonzero(e.target_ok))  # each scorable cell once
    assert max(len(b[0].nodes) for b in bs) < data.n_cells


def test_masks_are_new_every_step_and_held_out_cells_never_scored(starmap):
    m, data = _method(starmap)
    rng = np.random.default_rng(0)
    (s1, m1), (s2, m2) = list(m.train_batches(1, rng))[:1] + list(m.train_batches(2, rng))[:1]
    assert m1.mean() == pytest.approx(0.2, abs=0.01)
    assert not (len(m1) == len(m2) and np.array_equal(m1, m2))
    # evaluation and validation cells are disjoint and excluded from the training targets
    assert not (m.eval_mask[m.val_cells]).any()
    assert not m.target_ok[m.eval_mask].any() and not m.target_ok[m.val_cells].any()
    # the loss equals the MSE over masked, scorable cells only
    sub, mask = s1, m1
    loss = m.training_loss((sub, mask), torch.device("cpu"))["loss"]
    with torch.no_grad():
        m.model.eval()
        x = m._x(sub.nodes)
        _, rec = m.model(x, sub.edge_index, sub.edge_weight, torch.from_numpy(mask))
    m.model.train()
    score = mask & m.target_ok[sub.nodes]
    torch.manual_seed(0)
    expected = ((rec[score] - x[score]) ** 2).mean()
    m.model.eval()
    with torch.no_grad():
        loss_eval = m.training_loss((sub, mask), torch.device("cpu"))["loss"]
    assert float(loss_eval) == pytest.approx(float(expected), rel=1e-5)
    assert float(loss) > 0


@pytest.mark.parametrize("token", ["zeros", "learned"])
def test_mask_token_replaces_masked_inputs(starmap, token):
    m, _ = _method(starmap, mask_token=token)
    assert m.model.mask_token.requires_grad == (token == "learned")
    h = torch.randn(5, len(m.genes))
    mask = torch.tensor([True, False, True, False, False])
    out = m.model.hide(h, mask)
    assert torch.equal(out[~mask], h[~mask])
    assert torch.equal(out[mask], m.model.mask_token.detach().expand(2, -1))


def test_other_mask_strategies(starmap):
    m, data = _method(starmap, **{"mask.strategy": "niches", "mask.ratio": 0.05, "mask.niche_hops": 1})
    sub, mask = next(iter(m.train_batches(1, np.random.default_rng(1))))
    assert 0.05 < mask.mean() < 0.9
    name = data.label_names[0]
    c, data = _method(starmap, **{"mask.strategy": "cell_types", "mask.cell_types": name})
    assert np.array_equal(c.eval_mask, data.labels == 0) and not c.eval_held_out
    sub, mask = next(iter(c.train_batches(1, np.random.default_rng(1))))
    assert np.array_equal(mask, data.labels[sub.nodes] == 0)


def test_config_errors(starmap):
    with pytest.raises(SpatialDataError, match="divisible"):
        _method(starmap, encoder="gat", heads=3, hidden_dims="32,16")
    with pytest.raises(SpatialDataError, match="graph_mode"):
        _method(starmap, graph_mode="patches")


def test_fit_results_metrics_and_unknown_labels(starmap):
    out = fit(starmap, "gnn-mask", overrides={
        **FAST, "data.section_key": "sample_id", "data.label_key": "ct", "data.ignore_labels": "Ambiguous",
        "eval.test_sections": BZ5, "finetune.mode": "linear"})
    a, m = out.adata, out.metrics
    n = starmap.n_obs
    assert a.obsm["X_gnn-mask"].shape == (n, 16)
    assert a.layers["gnn-mask_reconstruction"].shape == starmap.shape
    assert a.obs["gnn-mask_masked"].dtype == bool and 0.15 < a.obs["gnn-mask_masked"].mean() < 0.25
    ct = a.obs["gnn-mask_cell_type"]
    assert ct.dtype == "category" and ct.notna().all()  # one prediction for every cell
    assert "Ambiguous" not in set(ct.cat.categories) and "" not in set(ct.cat.categories)
    rec = m["reconstruction"]
    assert {"masked_mse", "masked_r2"} <= set(rec) and set(rec["baselines"]) == {"train_mean", "neighbor_mean"}
    c = m["cell_type"]
    assert c["test_sections"] == [BZ5] and BZ5 not in c["train_sections"]
    test_labelled = ((starmap.obs["sample_id"] == BZ5).to_numpy()
                     & ~pd.Series(starmap.obs["ct"]).astype(str).isin(["Ambiguous", "nan", ""]).to_numpy())
    assert c["n_test_cells"] == int(test_labelled.sum())  # unknown labels left out of the metrics
    for block in (c, c["baselines"]["random_init"], c["baselines"]["expression_logreg"]):
        assert 0 <= block["macro_f1"] <= 1 and 0 <= block["accuracy"] <= 1 and 0 <= block["balanced_accuracy"] <= 1
    for key in ("method", "seed", "device", "train_seconds", "epochs", "seconds_per_epoch", "cells_per_second"):
        assert key in m


def test_egonet_full_finetune_gat(starmap):
    out = fit(starmap, "gnn-mask", overrides={
        **FAST, "encoder": "gat", "graph_mode": "egonet", "batch_size": 1024, "data.section_key": "sample_id",
        "data.label_key": "ct", "data.ignore_labels": "Ambiguous", "finetune.mode": "full"})
    assert out.metrics["graph_mode"] == "egonet"
    assert out.metrics["cell_type"]["test_sections"] == [BZ14]  # default: the last section held out
    assert out.method.model.cell_type is not None


def test_one_section_split_and_no_labels(osmfish_path):
    adata = read_h5ad(osmfish_path)
    out = fit(adata, "gnn-mask", overrides={**FAST, "data.label_key": "cell_type",
                                             "data.ignore_labels": "Excluded", "radius": 400})
    assert out.metrics["cell_type"]["split"].startswith("one section")
    plain = fit(adata, "gnn-mask", overrides={**FAST, "radius": 400})
    assert "cell_type" not in plain.metrics and "gnn-mask_cell_type" not in plain.adata.obs


def test_pretraining_learns_better_than_baselines(starmap):
    """A modest run must beat the training-mean reconstruction on held-out masked cells."""
    out = fit(starmap, "gnn-mask", overrides={"epochs": 15, "lr": 3e-3, "hidden_dims": "32,16", "data.section_key": "sample_id", "radius": 300,
                                              "seed": 1})
    rec = out.metrics["reconstruction"]
    assert rec["masked_mse"] < rec["baselines"]["train_mean"]
    assert rec["masked_r2"] > 0


def test_classification_helpers():
    y = np.array([0, 0, 1, 1, 2, 2])
    s = classification_scores(y, np.array([0, 0, 1, 0, 2, 1]))
    assert s["accuracy"] == pytest.approx(4 / 6) and s["balanced_accuracy"] == pytest.approx((1 + .5 + .5) / 3)
    w = class_weight_vector(np.array([0, 0, 0, 1, -1]), 3, "balanced")
    assert w[2] == 0 and w[1] > w[0] > 0
    assert np.allclose(class_weight_vector(np.array([0, 1]), 2, "none"), 1)
    X = np.r_[np.random.default_rng(0).normal(0, 1, (30, 3)), np.random.default_rng(1).normal(4, 1, (30, 3))]
    yy = np.r_[np.zeros(30, int), np.ones(30, int)]
    assert (logistic_regression_baseline(X, yy, X) == yy).mean() > 0.95


def test_finetune_trainer_is_the_shared_trainer(starmap):
    made = []

    def make_trainer(cfg, stage=None):
        assert isinstance(cfg, TrainConfig)
        t = Trainer(cfg)
        made.append(t)
        return t

    m, data = _method(starmap, **{"finetune.epochs": 2, "finetune.mode": "linear"})
    m.evaluate(data, torch.device("cpu"), make_trainer)
    # pretrained and random-init fine-tuning, each early-stopped then refitted, all by the Trainer
    assert len(made) == 4
    assert made[0].result.epochs_run == 2 and made[2].result.epochs_run == 2


def test_lpft_probe_then_full_finetune_and_finetune_dropout(starmap):
    made = []

    def make_trainer(cfg, stage=None):
        t = Trainer(cfg)
        made.append(t)
        return t

    m, data = _method(starmap, **{"finetune.epochs": 2, "finetune.probe_epochs": 2, "finetune.probe_lr": 7e-3,
                                  "finetune.refit": False, "finetune.dropout": 0.3})
    m.evaluate(data, torch.device("cpu"), make_trainer)
    # (probe, full) x (pretrained, random init)
    assert [t.config.lr for t in made] == [7e-3, m.config.finetune.lr] * 2
    assert made[0].config.patience == 0 and made[0].result.epochs_run == 2
    enc = m.model.cell_type.encoder
    assert all(p.requires_grad for p in enc.parameters())  # unfrozen after the probe
    assert enc.dropout == 0.3 and m.model.encoder.dropout == m.config.dropout


def test_root_skip_adds_the_nodes_own_input():
    from napari_spatialssl.models.gnn_mask import GraphEncoder

    torch.manual_seed(0)
    enc = GraphEncoder(4, [3], "gcn", dropout=0.0, norm="none", residual=False, root_skip=True).eval()
    plain = GraphEncoder(4, [3], "gcn", dropout=0.0, norm="none", residual=False).eval()
    assert plain.roots is None and enc.roots[0].weight.shape == (3, 4)
    x = torch.randn(3, 4)
    ei = torch.tensor([[0, 1, 0, 1, 2], [1, 0, 0, 1, 2]])  # 0-1 edge plus self loops
    ew = torch.full((5,), 0.5)
    with torch.no_grad():
        plain.convs[0].lin.weight.copy_(enc.convs[0].lin.weight)
        plain.convs[0].bias.copy_(enc.convs[0].bias)
        expected = torch.nn.functional.elu(enc.convs[0](x, ei, ew) + x @ enc.roots[0].weight.T)
        assert torch.allclose(enc(x, ei, ew), expected, atol=1e-6)
        assert not torch.allclose(enc(x, ei, ew), plain(x, ei, ew))
        # with the GCN weights zeroed only the node's own input is left
        enc.convs[0].lin.weight.zero_()
        enc.convs[0].bias.zero_()
        assert torch.allclose(enc(x, ei, ew), torch.nn.functional.elu(x @ enc.roots[0].weight.T), atol=1e-6)


def test_finetune_refit_on_all_labelled_training_cells(starmap, monkeypatch):
    import napari_spatialssl.models.gnn_mask as gm

    made, tasks = [], []

    def make_trainer(cfg, stage=None):
        t = Trainer(cfg)
        made.append(t)
        return t

    class Spy(gm._CellTypeTask):
        def __init__(self, method, model, train, val, *a, **kw):
            tasks.append((np.asarray(train).copy(), np.asarray(val).copy()))
            super().__init__(method, model, train, val, *a, **kw)

    monkeypatch.setattr(gm, "_CellTypeTask", Spy)
    m, data = _method(starmap, **{"finetune.epochs": 4, "finetune.patience": 2, "finetune.refit": True,
                                  "finetune.label_smoothing": 0.1, "eval.test_sections": BZ5})
    c = m.evaluate(data, torch.device("cpu"), make_trainer).metrics["cell_type"]
    assert c["refit"] and len(made) == 4  # (early-stopped run + refit) x (pretrained, random init)
    for (first, refit), ((tr, va), (tr2, va2)) in zip((made[:2], made[2:]), (tasks[:2], tasks[2:])):
        assert refit.config.patience == 0
        assert refit.result.epochs_run == (first.result.best_epoch or first.result.epochs_run)
        # refit: all labelled training-section cells (train + validation), nothing held out
        assert len(va) and not np.intersect1d(tr, va).size and len(va2) == 0
        assert np.array_equal(tr2, np.sort(np.concatenate([tr, va])))
        assert (data.section[tr2] != data.section_code(BZ5)).all() and (data.labels[tr2] >= 0).all()
    info = c["finetune"]
    assert info["refit_epochs"] == (info["best_epoch"] or info["epochs"])
    assert c["validation"]["n_cells"] == len(tasks[0][1])  # scored by the early-stopped model
    assert m.model.cell_type.encoder.dropout == 0.5  # the default fine-tuning dropout


def test_stop_during_finetuning_keeps_the_pretrained_head_and_names_stages(starmap):
    """A Stop that lands while the pretrained head fine-tunes: later trainers start stopped (as
    Pipeline.make_trainer does), so the random-init baseline is reported skipped, while the
    pretrained head's predictions and scores are kept."""
    made, stages = [], []

    def make_trainer(cfg, stage=None):
        t = Trainer(cfg)
        stages.append(stage)
        if made:  # the first (pretrained, early-stopped) run completes; everything after is stopped
            t.stop()
        made.append(t)
        return t

    m, data = _method(starmap, **{"finetune.epochs": 2, "eval.test_sections": BZ5})
    res = m.evaluate(data, torch.device("cpu"), make_trainer)
    c = res.metrics["cell_type"]
    assert 0 <= c["macro_f1"] <= 1 and "gnn-mask_cell_type" in res.obs
    assert "skipped" in c["baselines"]["random_init"]
    assert 0 <= c["baselines"]["expression_logreg"]["macro_f1"] <= 1
    assert "refit_epochs" not in c["finetune"] and "refit_skipped" in c["finetune"]
    assert stages[0] == "fine-tuning cell types (pretrained encoder)"
    assert stages[-1] == "fine-tuning cell types (random-init encoder, baseline)"


@pytest.mark.parametrize("policy", ["all", "masked", "none"])
def test_evaluation_computes_only_the_reconstructions_it_keeps(starmap, monkeypatch, policy):
    """eval.reconstruction=masked (what `auto` picks on an atlas) must not build any dense
    (cells x genes) array: the reconstruction is computed for the masked cells only and handed
    over as sparse rows; the metrics are the same as with the dense layer."""
    sizes = []
    m, data = _method(starmap, **{"eval.reconstruction": policy, "data.label_key": None})
    orig = m._reconstruct

    def spy(cells, mask, device, model=None, *, outputs=True):
        sizes.append((len(cells), outputs))
        return orig(cells, mask, device, model, outputs=outputs)

    monkeypatch.setattr(m, "_reconstruct", spy)
    res = m.evaluate(data, torch.device("cpu"), lambda cfg, stage=None: Trainer(cfg))
    n, n_masked = data.n_cells, int(m.eval_mask.sum())
    assert sizes[0] == (n, False)  # the embeddings pass builds no (cells x genes) array
    assert sizes[1] == ((n, True) if policy == "all" else (n_masked, True))
    layer = res.layers.get("gnn-mask_reconstruction")
    if policy == "none":
        assert layer is None
    elif policy == "masked":
        import scipy.sparse as sp

        assert sp.issparse(layer) and layer.shape == (n, len(m.genes))
        rows = np.flatnonzero(np.diff(layer.indptr))
        assert np.array_equal(rows, np.flatnonzero(m.eval_mask))
    if policy != "all":  # same metrics as the dense evaluation
        dense = GnnMask(m.config)
        dense.__dict__.update({k: v for k, v in m.__dict__.items() if k != "_reconstruct"})
        dense.config = make_config("gnn-mask", {**FAST, "eval.reconstruction": "all", "data.label_key": None})
        ref = dense.evaluate(data, torch.device("cpu"), lambda cfg, stage=None: Trainer(cfg))
        a, b = res.metrics["reconstruction"], ref.metrics["reconstruction"]
        assert a["masked_mse"] == pytest.approx(b["masked_mse"], rel=1e-5)
        assert a["baselines"] == pytest.approx(b["baselines"], rel=1e-5)
        if policy == "masked":
            full = ref.layers["gnn-mask_reconstruction"]
            np.testing.assert_allclose(layer[m.eval_mask].toarray(), full[m.eval_mask], rtol=1e-5, atol=1e-6)
