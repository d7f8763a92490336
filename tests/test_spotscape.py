"""Spotscape: exact linear-memory losses against their dense references, graph, training, CLI, predict."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from napari_spatialssl.models.losses import (
    prototype_contrast_loss,
    prototype_counts,
    similarity_scale_loss,
    similarity_scale_loss_dense,
    similarity_telescope_loss,
    similarity_telescope_loss_dense,
    torch_kmeans,
)


def _pair(n, d, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g, dtype=dtype, requires_grad=True)
    z2 = torch.randn(n, d, generator=g, dtype=dtype, requires_grad=True)
    return z1, z2


@pytest.mark.parametrize("n,d", [(7, 3), (60, 16), (200, 64)])
def test_telescope_matches_dense_values_and_gradients(n, d):
    z1, z2 = _pair(n, d, seed=n)
    fast = similarity_telescope_loss(z1, z2)
    g_fast = torch.autograd.grad(fast, (z1, z2))
    dense = similarity_telescope_loss_dense(z1, z2)
    g_dense = torch.autograd.grad(dense, (z1, z2))
    assert fast.item() > 0
    torch.testing.assert_close(fast, dense, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_fast, g_dense):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_telescope_float32_inputs_accumulate_in_float64():
    z1, z2 = _pair(300, 32, seed=3, dtype=torch.float32)
    fast = similarity_telescope_loss(z1, z2)
    assert fast.dtype == torch.float32
    dense = similarity_telescope_loss_dense(z1.double(), z2.double())
    assert abs(fast.item() - dense.item()) < 1e-6 * max(dense.item(), 1e-3)


def test_telescope_zero_for_identical_views_and_symmetric_case():
    z = torch.randn(50, 8, dtype=torch.float64)
    assert similarity_telescope_loss(z, z).item() == pytest.approx(0.0, abs=1e-12)
    # S symmetric when view 2 is the same as view 1 up to a scale per row: still zero
    assert similarity_telescope_loss(z, 3.0 * z).item() == pytest.approx(0.0, abs=1e-12)


def test_telescope_memory_linear_in_n():
    """Peak memory of the exact loss (forward + backward) grows ~linearly with N, far below N^2."""

    def peak(n):
        z1, z2 = _pair(n, 16, seed=1, dtype=torch.float32)
        tracemalloc.start()
        loss = similarity_telescope_loss(z1, z2)
        loss.backward()
        _, p = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return p

    # torch's CPU allocations are not traced by tracemalloc; measure with the profiler instead.
    from torch.profiler import ProfilerActivity, profile

    def torch_peak(n):
        z1, z2 = _pair(n, 16, seed=1, dtype=torch.float32)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            similarity_telescope_loss(z1, z2).backward()
        return max(e.cpu_memory_usage for e in prof.key_averages())

    p_small, p_big = torch_peak(4_000), torch_peak(64_000)
    n2_bytes = 64_000**2 * 4  # the dense similarity matrix alone
    assert p_big < 0.01 * n2_bytes
    assert p_big < 40 * max(p_small, 1)  # 16x more spots: ~16x, never ~256x
    assert peak(1000) >= 0


@pytest.mark.parametrize("n_slices", [2, 3])
def test_scale_loss_matches_dense_in_blocks(n_slices):
    n, d = 90, 8
    z1, z2 = _pair(n, d, seed=n_slices)
    section = torch.from_numpy(np.random.default_rng(0).integers(0, n_slices, n))
    dense = similarity_scale_loss_dense(z1, z2, section, k=3)
    g_dense = torch.autograd.grad(dense, (z1, z2))
    for block in (7, 1000):
        fast = similarity_scale_loss(z1, z2, section, k=3, block_size=block)
        g_fast = torch.autograd.grad(fast, (z1, z2))
        torch.testing.assert_close(fast, dense, rtol=1e-9, atol=1e-12)
        for a, b in zip(g_fast, g_dense):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


def test_scale_loss_detach_own_same_value_gradient_only_through_other_slices():
    n, d = 80, 6
    z1, z2 = _pair(n, d, seed=11)
    section = torch.from_numpy(np.random.default_rng(2).integers(0, 2, n))
    both = similarity_scale_loss(z1, z2, section, k=3, block_size=16)
    det = similarity_scale_loss(z1, z2, section, k=3, block_size=16, detach_own=True)
    torch.testing.assert_close(det, both)  # the value is unchanged
    g_det = torch.autograd.grad(det, (z1, z2))
    dense = similarity_scale_loss_dense(z1, z2, section, k=3, detach_own=True)
    for a, b in zip(g_det, torch.autograd.grad(dense, (z1, z2))):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)
    g_both = torch.autograd.grad(similarity_scale_loss(z1, z2, section, k=3), (z1, z2))
    assert not torch.allclose(g_det[1], g_both[1])
    # with one embedding per view, detached own: moving z2 inside a slice alone cannot change the
    # loss through the own-slice term, so the z2 gradient equals the inter-slice part only
    z = torch.zeros(40, 4, dtype=torch.float64)
    z[:20, 0] = 1 + 0.01 * torch.randn(20, dtype=torch.float64)
    z[20:, 1] = 1 + 0.01 * torch.randn(20, dtype=torch.float64)
    z.requires_grad_(True)
    sec = torch.tensor([0] * 20 + [1] * 20)
    loss = similarity_scale_loss(z, z.detach(), sec, k=3, detach_own=True)
    (g,) = torch.autograd.grad(loss, z)
    # descending the loss raises the inter-slice similarity: each spot moves towards the other slice
    assert (g[:20, 1] < 0).all() and (g[20:, 0] < 0).all()


def test_scale_loss_anchors():
    z1, z2 = _pair(60, 6, seed=5)
    section = torch.from_numpy(np.random.default_rng(1).integers(0, 3, 60))
    full = similarity_scale_loss(z1, z2, section, k=3)
    torch.testing.assert_close(similarity_scale_loss(z1, z2, section, k=3, anchors=torch.arange(60)), full)
    # averaging over disjoint anchor sets of equal size recovers the full loss (unbiasedness)
    parts = [similarity_scale_loss(z1, z2, section, k=3, anchors=torch.arange(i, 60, 4)) for i in range(4)]
    counts = [int(torch.isin(torch.arange(i, 60, 4), torch.arange(60)).sum()) for i in range(4)]
    assert all(c == 15 for c in counts)
    torch.testing.assert_close(torch.stack(parts).mean(), full, rtol=1e-9, atol=1e-12)


def test_scale_loss_single_slice_is_zero_and_detects_offset():
    z1, z2 = _pair(40, 4)
    assert similarity_scale_loss(z1, z2, torch.zeros(40, dtype=torch.long)).item() == 0.0
    # two slices whose embeddings live in orthogonal subspaces: intra >> inter similarity
    z = torch.zeros(40, 4, dtype=torch.float64)
    z[:20, 0] = 1 + 0.01 * torch.randn(20, dtype=torch.float64)
    z[20:, 1] = 1 + 0.01 * torch.randn(20, dtype=torch.float64)
    section = torch.tensor([0] * 20 + [1] * 20)
    assert similarity_scale_loss(z, z, section, k=3).item() == pytest.approx(1.0, abs=1e-3)


def test_torch_kmeans_recovers_blobs_and_prototype_loss():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0]])
    x = torch.cat([c + 0.3 * torch.randn(100, 2, generator=g) for c in centres])
    truth = np.repeat(np.arange(3), 100)
    cent, lab = torch_kmeans(x, 3, generator=torch.Generator().manual_seed(1))
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(truth, lab.numpy()) == pytest.approx(1.0)
    good = prototype_contrast_loss(x, cent, lab, tau=0.5)
    bad = prototype_contrast_loss(x, cent, torch.roll(lab, 100), tau=0.5)
    assert good.item() < bad.item()
    assert prototype_counts(7, [1, 1.5, 2]) == [7, 11, 14]
    assert prototype_counts(1, [1, 1.2]) == [2, 3]


# -- the method end to end ------------------------------------------------------------------------

def _toy_adata(n_side=14, n_genes=40, n_slices=1, seed=0):
    """Slices of a hex-like lattice with 3 horizontal bands (domains) of distinct expression."""
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(seed)
    blocks, obs, coords = [], [], []
    for s in range(n_slices):
        yy, xx = np.mgrid[0:n_side, 0:n_side]
        x = (xx + 0.5 * (yy % 2)).ravel() * 100.0
        y = yy.ravel() * 100.0 * np.sqrt(3) / 2
        band = np.minimum((yy.ravel() * 3) // n_side, 2)
        rates = np.full((len(x), n_genes), 1.0)
        for b in range(3):
            rates[band == b, b * 10:(b + 1) * 10] = 8.0
        rates *= 1.0 + 0.5 * s  # a batch effect: library size per slice
        blocks.append(rng.poisson(rates))
        coords.append(np.column_stack([x, y]))  # every slice in the same frame (like DLPFC)
        obs.append(pd.DataFrame({"sample_id": f"s{s}", "layer": [f"L{b}" for b in band]}))
    a = ad.AnnData(X=sp.csr_matrix(np.vstack(blocks).astype(np.float32)),
                   obs=pd.concat(obs, ignore_index=True))
    a.obs_names = [f"c{i}" for i in range(a.n_obs)]
    a.var_names = [f"g{i}" for i in range(n_genes)]
    a.obsm["spatial"] = np.vstack(coords)
    a.obs.loc[a.obs.index[:3], "layer"] = np.nan
    return a


def _config(**kw):
    from napari_spatialssl.pipeline import make_config

    cfg = make_config("spotscape", {"epochs": 30, "device": "cpu", "hidden_dims": [32, 8], "lr": 5e-3, **kw})
    cfg.eval.domain_key = "layer"
    cfg.eval.n_domains = 3
    return cfg


def test_graph_default_radius_gives_hex_neighbours_and_no_cross_slice_edges():
    from napari_spatialssl.models.spotscape import Spotscape
    from napari_spatialssl.pipeline import dataset_from_config

    a = _toy_adata(n_slices=2)
    cfg = _config()
    data = dataset_from_config(a, cfg)
    m = Spotscape(cfg)
    g = m.build_graph(data)
    deg = g.degrees()
    assert np.median(deg) == 6  # 1.1 x the pitch keeps the first hexagonal ring only
    assert m.graph_info["radius"] == pytest.approx(110.0, rel=1e-6)
    rows = np.repeat(np.arange(g.n_nodes), deg)
    assert (data.section[rows] == data.section[g.indices]).all()


def test_fit_single_slice_results_and_metrics():
    from napari_spatialssl.pipeline import Pipeline

    a = _toy_adata(n_slices=1)
    out = Pipeline("spotscape", _config()).fit(a)
    r = out.adata
    assert r.obsm["X_spotscape"].shape == (a.n_obs, 8)
    assert r.obs["spotscape_domain"].dtype == "category"
    assert r.layers["spotscape_reconstruction"].shape == a.shape
    dom = out.metrics["domains"]
    assert {"ari", "nmi", "accuracy", "per_section", "smoothed"} <= set(dom)
    assert dom["n_cells"] == a.n_obs - 3  # NaN = unlabelled, excluded
    assert dom["ari"] > 0.8, dom
    assert "telescope" in out.train_result.history[-1] and "scale" not in out.train_result.history[-1]
    rec = out.metrics["reconstruction"]
    assert np.isfinite(rec["masked_mse"]) and rec["n_masked_genes"] >= 1


def test_fit_multi_slice_uses_scale_and_prototypes_and_reports_mixing():
    from napari_spatialssl.pipeline import Pipeline

    a = _toy_adata(n_side=10, n_slices=3)
    cfg = _config(epochs=12, proto_start_epoch=8)
    assert cfg.lambda_scale == 0  # scale matching is off by default (chosen on the tuning pair)
    cfg.lambda_scale = 1.0
    out = Pipeline("spotscape", cfg).fit(a)
    hist = out.train_result.history
    assert "scale" in hist[0] and "proto" not in hist[0] and "proto" in hist[-1]
    dom = out.metrics["domains"]
    assert set(dom["per_section"]) == {"s0", "s1", "s2"}
    integ = out.metrics["integration"]
    assert integ["n_batches"] == 3 and 0 <= integ["batch_entropy"] <= 1.0 + 1e-9
    assert 0 <= integ["batch_asw"] <= 1


def test_leiden_domains_when_k_not_given():
    from napari_spatialssl.pipeline import Pipeline

    a = _toy_adata(n_slices=1)
    cfg = _config(epochs=20)
    cfg.eval.n_domains = None
    out = Pipeline("spotscape", cfg).fit(a)
    info = out.metrics["domains"]["clustering"]
    assert info["method"] == "leiden" and info["n_domains"] >= 2


def test_cli_fit_then_predict(tmp_path):
    from napari_spatialssl.cli import main

    a = _toy_adata(n_slices=1)
    src = tmp_path / "toy.h5ad"
    a.write_h5ad(src)
    out = tmp_path / "run"
    rc = main(["fit", str(src), "--method", "spotscape", "--out", str(out), "--domain-key", "layer",
               "--n-domains", "3", "--epochs", "15", "--device", "cpu", "--quiet",
               "--set", "hidden_dims=32,8", "--set", "lr=0.005"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["domains"]["per_section"]) == {"s0"}
    assert 0 <= metrics["domains"]["accuracy"] <= 1
    rc = main(["predict", str(src), "--model", str(out), "--out", str(tmp_path / "pred"), "--device", "cpu"])
    assert rc == 0
    import anndata as ad

    fitted = ad.read_h5ad(out / "result.h5ad")
    pred = ad.read_h5ad(tmp_path / "pred" / "result.h5ad")
    np.testing.assert_allclose(pred.obsm["X_spotscape"], fitted.obsm["X_spotscape"], rtol=1e-4, atol=1e-4)
    assert (pred.obs["spotscape_domain"].astype(str) == fitted.obs["spotscape_domain"].astype(str)).mean() > 0.95


def test_postprocess_embedding_variants():
    from napari_spatialssl.data.io import SpatialDataError
    from napari_spatialssl.models.spotscape import postprocess_embedding

    rng = np.random.default_rng(0)
    e = rng.normal(size=(50, 6)) * np.arange(1, 7) + 3.0
    e[0] = 0.0  # an all-zero row must not divide by zero
    np.testing.assert_allclose(postprocess_embedding(e, "none"), e.astype(np.float32))
    l2 = postprocess_embedding(e, "l2")
    assert l2.dtype == np.float32 and np.isfinite(l2).all()
    np.testing.assert_allclose(np.linalg.norm(l2[1:], axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(l2[5], e[5] / np.linalg.norm(e[5]), rtol=1e-5)
    st = postprocess_embedding(e, "standardize")
    np.testing.assert_allclose(st.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(st.std(0), 1.0, rtol=1e-4)
    pc = postprocess_embedding(e, "pca", pca_dims=3)
    assert pc.shape == (50, 3)
    var = pc.var(0)
    assert (np.diff(var) <= 1e-6).all()  # components in decreasing variance
    with pytest.raises(SpatialDataError, match="post-processing"):
        postprocess_embedding(e, "bogus")


def test_domains_are_clustered_on_the_configured_embedding_space(monkeypatch):
    """k-means sees the L2-normalised embeddings by default, the raw ones with 'none'; the stored
    domain centroids live in the same space (predict assigns new spots there)."""
    from napari_spatialssl.evaluation import clustering
    from napari_spatialssl.models.spotscape import SpotscapeConfig
    from napari_spatialssl.pipeline import Pipeline

    assert SpotscapeConfig().embedding_postprocess == "l2"
    seen = []
    real = clustering.kmeans
    monkeypatch.setattr(clustering, "kmeans", lambda emb, k, **kw: seen.append(np.array(emb)) or real(emb, k, **kw))
    a = _toy_adata(n_slices=1)
    out = Pipeline("spotscape", _config(epochs=10)).fit(a)
    assert out.metrics["domains"]["clustering"]["embedding_postprocess"] == "l2"
    np.testing.assert_allclose(np.linalg.norm(seen[-1], axis=1), 1.0, rtol=1e-4)
    emb = out.adata.obsm["X_spotscape"]
    assert not np.allclose(np.linalg.norm(emb, axis=1), 1.0)  # the stored embedding stays raw
    seen.clear()
    cfg = _config(epochs=10, embedding_postprocess="none")
    out = Pipeline("spotscape", cfg).fit(a)
    np.testing.assert_allclose(seen[-1], out.adata.obsm["X_spotscape"], rtol=1e-5, atol=1e-6)


def test_bad_settings_are_clear_errors():
    from napari_spatialssl.data.io import SpatialDataError
    from napari_spatialssl.pipeline import Pipeline

    a = _toy_adata(n_slices=1)
    with pytest.raises(SpatialDataError, match="edge_drop"):
        Pipeline("spotscape", _config(edge_drop=1.5)).fit(a)
    with pytest.raises(SpatialDataError, match="embedding_postprocess"):
        Pipeline("spotscape", _config(embedding_postprocess="cosine")).fit(a)
    with pytest.raises(SpatialDataError, match="n_domains"):  # refused when the config is made
        _config(domain_method="kmeans")  # the old name of eval.domain_method still works
    cfg = _config()
    cfg.eval.domain_key = "nope"
    with pytest.raises(SpatialDataError, match="nope"):
        Pipeline("spotscape", cfg).fit(a)


@pytest.mark.shared_data
def test_dlpfc_graph_has_about_six_neighbours(shared_data):
    from napari_spatialssl.data.io import read_h5ad
    from napari_spatialssl.models.spotscape import Spotscape
    from napari_spatialssl.pipeline import dataset_from_config

    a = read_h5ad(shared_data("dlpfc_151673-151676.h5ad"))
    cfg = _config()
    cfg.data.preprocess.n_top_genes = None
    data = dataset_from_config(a[:, :50].copy(), cfg)
    m = Spotscape(cfg)
    g = m.build_graph(data)
    info = g.summary()
    assert 5.5 < info["mean_degree"] <= 6.0
    rows = np.repeat(np.arange(g.n_nodes), g.degrees())
    assert (data.section[rows] == data.section[g.indices]).all()  # 4 slices share one frame


def test_reconstruction_decoded_in_blocks_only_where_kept():
    """Only the reconstruction that is kept is decoded: selected gene columns in row blocks equal
    the full decoding; a slide above eval.reconstruction_max_values gets no dense layer at all
    (spotscape masks no cells, so 'auto' keeps nothing there), and its metrics still come."""
    import torch

    from napari_spatialssl.pipeline import Pipeline

    a = _toy_adata(n_slices=1)
    pipe = Pipeline("spotscape", _config(epochs=3))
    out = pipe.fit(a)
    m = pipe.method
    dev = torch.device("cpu")
    emb, full = m.embed(m.data, dev, m.graph, genes=np.arange(m.data.n_genes))
    cols = np.array([1, 5, 7])
    emb2, part = m.embed(m.data, dev, m.graph, genes=cols, block_rows=17)
    np.testing.assert_allclose(part, full[:, cols], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(emb, emb2)
    np.testing.assert_allclose(out.adata.layers["spotscape_reconstruction"], full, rtol=1e-5, atol=1e-6)
    assert m.embed(m.data, dev, m.graph, genes=None)[1] is None
    big = Pipeline("spotscape", _config(epochs=3, **{"eval.reconstruction_max_values": 10})).fit(a)
    assert "spotscape_reconstruction" not in big.adata.layers
    assert big.metrics["reconstruction_layer"]["cells_kept"] == 0
    assert np.isfinite(big.metrics["reconstruction"]["masked_mse"])
