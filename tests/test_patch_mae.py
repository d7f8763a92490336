"""patch-mae: the ViT masked autoencoder, its held-out tiles and baselines, and the pipeline contract."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from napari_spatialssl.data.io import SpatialDataError
from napari_spatialssl.models.patch_mae import PatchMAE, _window_sum
from napari_spatialssl.models.vit import PatchMaskedAutoencoder, random_token_mask, sincos_2d
from napari_spatialssl.pipeline import dataset_from_config, fit, make_config, predict


def hex_slide(n_side: int = 30, n_genes: int = 30, n_sections: int = 2, seed: int = 0) -> ad.AnnData:
    """A tiny Visium-like slide: hexagonal spots (10 units apart) in an ellipse, 4 banded domains,
    Poisson counts from domain profiles."""
    rng = np.random.default_rng(seed)
    xs, ys, secs, doms = [], [], [], []
    for s in range(n_sections):
        r, c = np.meshgrid(np.arange(n_side), np.arange(n_side), indexing="ij")
        x = (c + 0.5 * (r % 2)) * 10.0
        y = r * 8.66
        keep = ((x - x.mean()) / (x.std() * 1.9)) ** 2 + ((y - y.mean()) / (y.std() * 1.9)) ** 2 < 1.0
        x, y = x[keep], y[keep]
        band = y + 0.3 * x
        d = np.clip((band / band.max() * 4).astype(int), 0, 3)
        xs.append(x)
        ys.append(y)
        secs += [f"s{s}"] * len(x)
        doms.append(d)
    x, y, d = np.concatenate(xs), np.concatenate(ys), np.concatenate(doms)
    prof = rng.gamma(0.5, 2.0, size=(4, n_genes))
    X = rng.poisson(prof[d] * rng.gamma(5, 0.2, size=(len(d), 1))).astype(np.float32)
    a = ad.AnnData(X=X, obs=pd.DataFrame({"section": secs, "domain": pd.Categorical([f"D{k}" for k in d])},
                                         index=[f"c{i}" for i in range(len(d))]))
    a.var_names = [f"g{i}" for i in range(n_genes)]
    a.obsm["spatial"] = np.stack([x, y], 1)
    return a


FAST = ["epochs=2", "patch_size=8", "n_channels=12", "patches_per_epoch=64", "batch_size=32", "dim=32",
        "decoder_dim=32", "depth=1", "eval_mask_sizes=2,4", "eval_mask_repeats=2", "eval.n_domains=4",
        "eval.domain_key=domain", "data.label_key=domain", "probe_hidden=16"]
# the tests of per-bin loss arithmetic and of learning on this tiny slide (8 x 8-bin patches) use
# one bin per token; everything else runs with the default 2 x 2-bin tokens
BIN_TOKENS = ["token_bins=1"]


@pytest.fixture(scope="module")
def slide():
    return hex_slide()


@pytest.fixture(scope="module")
def fitted(slide, tmp_path_factory):
    out = tmp_path_factory.mktemp("patch_mae")
    return fit(slide, "patch-mae", out, overrides=FAST), out


# -- the model ------------------------------------------------------------------------------


def _random_batch(B=5, h=8, m=6, n_genes=20, occ_p=0.7, seed=0):
    g = torch.Generator().manual_seed(seed)
    occ = torch.rand(B, h, h, generator=g) < occ_p
    occ[:, 0, 0] = True
    values = torch.randn(B, h, h, m, generator=g) * occ[..., None]
    genes = torch.stack([torch.randperm(n_genes, generator=g)[:m] for _ in range(B)])
    return values, occ, genes


def test_sincos_positions_are_distinct_and_need_dim_divisible_by_4():
    pos = sincos_2d(4, 5, 16)
    assert pos.shape == (20, 16)
    assert torch.cdist(pos, pos).add(torch.eye(20) * 10).min() > 1e-3
    with pytest.raises(ValueError):
        sincos_2d(2, 2, 6)


def test_random_token_mask_ratio_and_at_least_one_visible():
    occ = torch.zeros(3, 64, dtype=torch.bool)
    occ[0, :40] = True
    occ[1, :1] = True  # a single occupied token stays visible
    occ[2, :] = True
    masked = random_token_mask(occ, 0.75)
    assert not (masked & ~occ).any()
    assert int(masked[0].sum()) == 30 and int(masked[1].sum()) == 0 and int(masked[2].sum()) == 48
    assert ((occ & ~masked).sum(1) >= 1).all()


@pytest.mark.parametrize("residual", ["local", "patch_mean", "none", "attend"])
def test_encoder_never_sees_masked_or_empty_bins(residual):
    torch.manual_seed(0)
    # a random readout start, so that the encoder's states reach the output before any training
    mae = PatchMaskedAutoencoder(20, (8, 8), 1, dim=16, depth=1, heads=2, decoder_dim=16, decoder_depth=1,
                                 decoder_heads=2, residual=residual, readout_init_std=0.02).eval()
    values, occ, genes = _random_batch()
    masked = random_token_mask(mae.token_occupancy(occ), 0.75)
    out = mae(values, occ, genes, masked)
    changed = values.clone()
    hidden = (masked.reshape(occ.shape) & occ) | ~occ
    changed[hidden] = torch.randn_like(changed[hidden]) * 5
    assert torch.allclose(mae(changed, occ, genes, masked), out, atol=1e-5)
    # ... while a visible bin's value does change the reconstruction
    vis = (occ & ~masked.reshape(occ.shape)).nonzero()[0]
    changed = values.clone()
    changed[tuple(vis)] += 3.0
    assert not torch.allclose(mae(changed, occ, genes, masked), out, atol=1e-4)


def test_padding_does_not_leak_between_patches_and_channels_are_permutation_equivariant():
    torch.manual_seed(1)
    mae = PatchMaskedAutoencoder(20, (8, 8), 1, dim=16, depth=2, heads=2, decoder_dim=16, decoder_depth=1,
                                 decoder_heads=2).eval()
    values, occ, genes = _random_batch(occ_p=0.5)
    masked = random_token_mask(mae.token_occupancy(occ), 0.5)
    together = mae(values, occ, genes, masked)
    for i in range(len(values)):  # different visible counts per patch: padded when batched
        alone = mae(values[i:i + 1], occ[i:i + 1], genes[i:i + 1], masked[i:i + 1])
        assert torch.allclose(alone, together[i:i + 1], atol=1e-5)
    perm = torch.randperm(values.shape[-1])
    permuted = mae(values[..., perm], occ, genes[:, perm], masked)
    assert torch.allclose(permuted, together[..., perm], atol=1e-5)
    emb = mae.token_embeddings(values, occ, genes)
    assert emb.shape == (5, 64, 16) and torch.all(emb[~mae.token_occupancy(occ)] == 0)


def test_multi_bin_tokens():
    mae = PatchMaskedAutoencoder(20, (8, 8), 2, dim=16, depth=1, heads=2, decoder_dim=16, decoder_heads=2)
    values, occ, genes = _random_batch()
    tok = mae.token_occupancy(occ)
    assert tok.shape == (5, 16)
    x = torch.arange(5 * 8 * 8 * 2, dtype=torch.float32).reshape(5, 8, 8, 2)
    assert torch.equal(mae.from_tokens(mae.to_tokens(x)), x)
    out = mae(values, occ, genes, random_token_mask(tok, 0.75))
    assert out.shape == values.shape
    with pytest.raises(ValueError, match="divide"):
        PatchMaskedAutoencoder(20, (8, 8), 3)
    with pytest.raises(ValueError, match="residual"):
        PatchMaskedAutoencoder(20, (8, 8), 1, residual="median")


def test_local_context_base_is_a_gaussian_mean_of_visible_bins():
    mae = PatchMaskedAutoencoder(5, (4, 4), 1, dim=8, depth=1, heads=2, decoder_dim=8, decoder_heads=2)
    values = torch.zeros(1, 4, 4, 1)
    values[0, 0, 0, 0], values[0, 0, 2, 0] = 1.0, 3.0
    occ = torch.zeros(1, 4, 4, dtype=torch.bool)
    occ[0, 0, 0] = occ[0, 0, 2] = occ[0, 0, 1] = True
    visible = torch.zeros(1, 16, dtype=torch.bool)
    visible[0, 0] = visible[0, 2] = True
    base = mae.context_base(values, occ, visible)
    bw2 = float(torch.exp(2 * mae.log_bandwidth))
    w0, w2 = np.exp(-1 / (2 * bw2)), np.exp(-1 / (2 * bw2))  # bin (0, 1) is one bin from both
    assert float(base[0, 0, 1, 0]) == pytest.approx((w0 * 1 + w2 * 3) / (w0 + w2), rel=1e-5)
    far = np.exp(-np.array([9 + 0, 9 + 4]) / (2 * bw2))  # bin (3, 0): from (0,0) and (0,2)
    assert float(base[0, 3, 0, 0]) == pytest.approx((far[0] * 1 + far[1] * 3) / far.sum(), rel=1e-5)


def test_zero_readout_init_starts_exactly_at_the_context_base():
    """readout_init_std=0: the untrained model predicts its base exactly (no random per-gene
    deviation, which would stay on rarely drawn genes); with the old 0.02 start it does not; one
    optimiser step on the deviation moves it off the base (the readout still learns)."""
    values, occ, genes = _random_batch()
    masked = random_token_mask(occ.reshape(occ.shape[0], -1), 0.75, torch.rand(occ.shape[0], 64,
                                                                               generator=torch.Generator().manual_seed(1)))
    tok = occ.reshape(occ.shape[0], -1)
    for std, exact in ((0.0, True), (0.02, False)):
        torch.manual_seed(0)
        mae = PatchMaskedAutoencoder(20, (8, 8), 1, dim=16, depth=1, heads=2, decoder_dim=16, decoder_heads=2,
                                     readout_init_std=std)
        out = mae(values, occ, genes, masked)
        base = mae.context_base(values, occ, tok & ~masked)
        assert torch.allclose(out, base, atol=1e-6) == exact
    torch.manual_seed(0)
    mae = PatchMaskedAutoencoder(20, (8, 8), 1, dim=16, depth=1, heads=2, decoder_dim=16, decoder_heads=2,
                                 readout_init_std=0.0)
    opt = torch.optim.Adam(mae.parameters(), lr=1e-2)
    t = masked.reshape(occ.shape) & occ
    ((mae(values, occ, genes, masked) - values)[t] ** 2).mean().backward()
    opt.step()
    with torch.no_grad():
        assert not torch.allclose(mae(values, occ, genes, masked), mae.context_base(values, occ, tok & ~masked),
                                  atol=1e-4)


def test_attend_base_starts_as_the_gaussian_base_and_uses_visible_bins_only():
    torch.manual_seed(2)
    mae = PatchMaskedAutoencoder(20, (8, 8), 1, dim=16, depth=1, heads=2, decoder_dim=16, decoder_depth=1,
                                 decoder_heads=2, residual="attend").eval()
    values, occ, genes = _random_batch()
    tok = mae.token_occupancy(occ)
    masked = random_token_mask(tok, 0.75)
    visible = tok & ~masked
    states, order, pad = mae.encode(values, occ, genes, visible)
    x = mae.decode(states, order, pad, tok, genes, context=(values, occ, visible))
    dev = mae.decode(states, order, pad, tok, genes)  # the readout's deviation alone
    gauss = mae.context_base(values, occ, visible)
    assert torch.allclose(x - dev, gauss, atol=1e-5)  # content term starts at zero
    with torch.no_grad():  # a content term changes the weights, still over visible bins only
        mae.attn_q.weight.normal_()
    z = torch.randn(5, 64, 16)
    base = mae.attend_base(z, values, occ, visible)
    assert not torch.allclose(base, gauss, atol=1e-3)
    changed = values.clone()
    hidden = (masked.reshape(occ.shape) & occ) | ~occ
    changed[hidden] = 7.0
    assert torch.allclose(mae.attend_base(z, changed, occ, visible), base, atol=1e-5)
    lo = torch.where(visible.reshape(occ.shape)[..., None], values, torch.full_like(values, 1e9)).amin((1, 2))
    hi = torch.where(visible.reshape(occ.shape)[..., None], values, torch.full_like(values, -1e9)).amax((1, 2))
    assert (base >= lo[:, None, None] - 1e-5).all() and (base <= hi[:, None, None] + 1e-5).all()  # a convex mix


def test_region_mix_masks_squares_in_a_fraction_of_training_patches(slide):
    cfg = make_config("patch-mae", FAST + ["region_mix=0.5", "mask.region_size=3", "mask.n_regions=2",
                                           "patches_per_epoch=256", "batch_size=256"])
    method = PatchMAE(cfg)
    method.prepare(dataset_from_config(slide, cfg))
    batch = next(iter(method.train_batches(1, np.random.default_rng(0))))
    assert batch.use_regions is not None and 0.3 < batch.use_regions.mean() < 0.7
    g = method.h // cfg.token_bins  # the token grid's side
    sq = batch.token_mask.reshape(-1, g, g)
    n = sq.sum((1, 2))
    assert n.min() >= 1 and n.max() <= 2 * 9  # 1-2 squares of side 1-3 tokens
    _, _, occ, _, masked = method._tensors(batch, torch.device("cpu"))
    masked = masked.numpy()
    use = batch.use_regions
    tok_occ = method.model.mae.token_occupancy(occ).numpy()  # (patches, tokens): any bin occupied
    assert not (masked & ~tok_occ).any()
    assert np.array_equal(masked[use], batch.token_mask[use] & tok_occ[use])
    loss = method.training_loss(batch, torch.device("cpu"))["loss"]
    assert torch.isfinite(loss)


def test_attend_without_deviation_predicts_a_convex_mix_of_visible_bins():
    torch.manual_seed(3)
    mae = PatchMaskedAutoencoder(20, (8, 8), 1, dim=16, depth=1, heads=2, decoder_dim=16, decoder_depth=1,
                                 decoder_heads=2, residual="attend", deviation=False).eval()
    assert mae.readout is None
    values, occ, genes = _random_batch()
    tok = mae.token_occupancy(occ)
    masked = random_token_mask(tok, 0.75)
    out = mae(values, occ, genes, masked)
    assert torch.allclose(out, mae.context_base(values, occ, tok & ~masked), atol=1e-5)  # zero-initialised content
    with torch.no_grad():
        mae.attn_q.weight.normal_()
        mae.attn_bw.weight.normal_(std=0.3)
    out = mae(values, occ, genes, masked)
    assert not torch.allclose(out, mae.context_base(values, occ, tok & ~masked), atol=1e-3)
    out.sum().backward()  # the encoder learns through the interpolation weights alone
    assert mae.embed.gene.weight.grad is not None and float(mae.embed.gene.weight.grad.abs().sum()) > 0


def test_per_patch_loss_weighs_every_patch_equally(slide):
    cfg = make_config("patch-mae", FAST + BIN_TOKENS + ["region_mix=0.5", "loss_per_patch=true", "loss_l1=0"])
    method = PatchMAE(cfg)
    method.prepare(dataset_from_config(slide, cfg))
    batch = next(iter(method.train_batches(1, np.random.default_rng(0))))
    torch.manual_seed(0)
    loss = float(method.training_loss(batch, torch.device("cpu"))["loss"].detach())
    _, x, occ, genes, masked = method._tensors(batch, torch.device("cpu"))
    torch.manual_seed(0)
    with torch.no_grad():
        pred = method.model.mae(x, occ, genes, masked)
    t = masked.reshape(occ.shape) & occ
    err = ((pred - x) ** 2).mean(-1)
    per = [float(err[i][t[i]].mean()) for i in range(len(t)) if t[i].any()]
    assert loss == pytest.approx(float(np.mean(per)), rel=1e-4)


def test_l1_loss_term_adds_lambda_times_the_masked_absolute_error(slide):
    """loss_l1 = lambda: the loss is the masked MSE plus lambda x the masked mean absolute error
    (same masks, same bins), in both the pooled and the per-patch form."""
    for per_patch in ("false", "true"):
        losses = {}
        for lam in (0.0, 0.5):
            cfg = make_config("patch-mae", FAST + BIN_TOKENS + [f"loss_l1={lam}", f"loss_per_patch={per_patch}"])
            method = PatchMAE(cfg)
            torch.manual_seed(0)
            method.prepare(dataset_from_config(slide, cfg))
            batch = next(iter(method.train_batches(1, np.random.default_rng(0))))
            losses[lam] = float(method.training_loss(batch, torch.device("cpu"))["loss"].detach())
        _, x, occ, genes, masked = method._tensors(batch, torch.device("cpu"))
        with torch.no_grad():
            d = method.model.mae(x, occ, genes, masked) - x
        t = masked.reshape(occ.shape) & occ
        if per_patch == "false":
            mse, mae = float((d[t] ** 2).mean()), float(d[t].abs().mean())
        else:
            mse = float(np.mean([float((d[i][t[i]] ** 2).mean()) for i in range(len(t)) if t[i].any()]))
            mae = float(np.mean([float(d[i][t[i]].abs().mean()) for i in range(len(t)) if t[i].any()]))
        assert losses[0.0] == pytest.approx(mse, rel=1e-4)
        assert losses[0.5] == pytest.approx(mse + 0.5 * mae, rel=1e-4)


# -- data view, hold-out and baselines ------------------------------------------------------


def test_training_windows_never_overlap_held_out_tiles(slide):
    cfg = make_config("patch-mae", FAST + ["holdout_fraction=0.3"])
    method = PatchMAE(cfg)
    method.prepare(dataset_from_config(slide, cfg))
    h = cfg.patch_size
    assert sum(len(t) for t in method.holdout) >= 2
    for lat, held, origins in zip(method.lattices, method.holdout, method.train_origins):
        blocked = np.zeros(lat.shape, bool)
        for r, c in held:
            blocked[r:r + h, c:c + h] = True
        assert len(origins)
        hit = _window_sum(blocked, h, h)[origins[:, 0], origins[:, 1]]
        assert (hit == 0).all()
        occ = _window_sum(lat.occupancy, h, h)[origins[:, 0], origins[:, 1]]
        assert (occ >= cfg.min_occupancy * h * h - 1e-9).all()
    batch = next(iter(method.train_batches(1, np.random.default_rng(0))))
    pb = batch.patches
    assert pb.values.shape == (32, h, h, 12) and pb.genes.shape == (32, 12)
    assert (pb.values[~pb.occupancy] == 0).all()
    # the dense-cache cut equals the lattice's sparse cut
    from napari_spatialssl.graphs.lattice import extract_patches

    lat = method.lattices[0]
    ref = extract_patches(lat, method.train_origins[0][:7], h, h, pb.genes[:7])
    mine = method._extract(lat, method.train_origins[0][:7], pb.genes[:7])
    assert np.array_equal(ref.values, mine.values) and np.array_equal(ref.occupancy, mine.occupancy)


def test_baselines_on_a_hand_made_patch():
    h = 4
    raw = torch.zeros(1, h, h, 1)
    raw[0, 0, 0, 0] = 2.0
    raw[0, 3, 3, 0] = 6.0
    occ = torch.zeros(1, h, h, dtype=torch.bool)
    occ[0, 0, 0] = occ[0, 3, 3] = occ[0, 1, 1] = True
    mask = torch.zeros(1, h, h, dtype=torch.bool)
    mask[0, 1, 1] = True
    rr, cc = torch.meshgrid(torch.arange(h), torch.arange(h), indexing="ij")
    xy = torch.stack([rr.ravel(), cc.ravel()], 1).float()
    b = PatchMAE._baselines(raw, occ, mask, torch.cdist(xy, xy))
    assert float(b["zeros"][0, 1, 1, 0]) == 0.0
    assert float(b["patch_mean"][0, 1, 1, 0]) == pytest.approx(4.0)
    assert float(b["nearest"][0, 1, 1, 0]) == pytest.approx(2.0)  # (0,0) at sqrt 2, (3,3) at sqrt 8
    assert float(b["idw"][0, 1, 1, 0]) == pytest.approx((2.0 / 2 + 6.0 / 8) / (1 / 2 + 1 / 8))


def test_config_validation():
    for bad, match in [("token_bins=3", "divide"), ("mask.strategy=niches", "mask.strategy"),
                       ("domain_clustering=x", "joint"), ("eval_mask_sizes=40", "eval_mask_sizes"),
                       ("region_mix=1.5", "region_mix"), ("residual_readout=median", "residual_readout"),
                       ("decoder_deviation=false", "decoder_deviation"), ("loss_l1=-0.1", "loss_l1")]:
        with pytest.raises(SpatialDataError, match=match):  # refused when the config is made
            make_config("patch-mae", [bad])


def test_patch_larger_than_section_is_a_clear_error(slide):
    cfg = make_config("patch-mae", FAST + ["patch_size=64"])
    with pytest.raises(SpatialDataError, match="smaller than one 64 x 64 patch"):
        PatchMAE(cfg).prepare(dataset_from_config(slide, cfg))


# -- the pipeline contract ------------------------------------------------------------------


def test_fit_writes_documented_keys_and_metrics(fitted, slide):
    out, folder = fitted
    r = out.adata
    assert r.obsm["X_patch-mae"].shape == (slide.n_obs, 32)
    assert np.isfinite(r.obsm["X_patch-mae"]).all()
    rec = r.layers["patch-mae_reconstruction"]
    assert rec.shape == slide.shape
    assert r.obs["patch-mae_domain"].dtype == "category" and r.obs["patch-mae_domain"].nunique() == 4
    m = json.loads((folder / "metrics.json").read_text())
    rc = m["reconstruction"]
    assert set(rc["baselines"]) == {"zeros", "patch_mean", "nearest", "idw"}
    assert rc["masked_mse"] > 0 and set(rc["by_mask_size"]) == {"2", "4"}
    assert m["domains"]["n_domains"] == 4 and set(m["domains"]["per_section"]) == {"s0", "s1"}
    for key in ("ari", "nmi", "accuracy"):
        assert 0 <= m["domains"][key] <= 1 or key == "ari"
    for p in ("knn", "mlp"):
        assert 0 <= m["probes"][p]["accuracy"] <= 1 and "ari" in m["probes"][p]
    assert m["probes"]["train_fraction"] == 0.2
    # the banded synthetic domains are easy: embeddings must carry them well above chance
    assert m["probes"]["knn"]["accuracy"] > 0.6


def test_predict_rebuilds_the_model_and_reproduces_embeddings(fitted, slide, tmp_path):
    out, folder = fitted
    again = predict(slide, folder, tmp_path / "pred")
    assert np.allclose(again.adata.obsm["X_patch-mae"], out.adata.obsm["X_patch-mae"], atol=1e-5)
    assert again.metrics["patch_mae"]["bin_size"] == out.metrics["patch_mae"]["bin_size"]
    assert (tmp_path / "pred" / "result.h5ad").exists()
    # a new slide whose genes come in another order gets the same per-gene treatment
    shuffled = slide[:, slide.var_names[::-1]].copy()
    res = predict(shuffled, folder)
    assert np.allclose(res.adata.obsm["X_patch-mae"], out.adata.obsm["X_patch-mae"], atol=1e-5)


def test_training_beats_the_patch_mean_on_held_out_tiles(slide):
    """A slightly longer run on the synthetic slide: the masked-region reconstruction must beat
    the zero and unmasked-mean baselines (domain profiles are learnable from the context)."""
    out = fit(slide, "patch-mae", overrides=FAST + BIN_TOKENS + ["epochs=6", "patches_per_epoch=192",
                                                                 "reconstruction_layer=false", "lr=3e-3"])
    rc = out.metrics["reconstruction"]
    assert rc["masked_mse"] < rc["baselines"]["zeros"]
    assert rc["masked_mse"] < rc["baselines"]["patch_mean"]
    hist = out.train_result.history
    assert hist[-1]["val_loss"] < hist[0]["val_loss"]


def test_small_panels_use_every_gene_as_a_channel(slide):
    cfg = make_config("patch-mae", FAST + ["n_channels=256"])
    method = PatchMAE(cfg)
    method.prepare(dataset_from_config(slide, cfg))
    batch = next(iter(method.train_batches(1, np.random.default_rng(0))))
    assert batch.patches.genes.shape[1] == slide.n_vars
    assert (batch.patches.genes == np.arange(slide.n_vars)).all()
    assert len(method.channel_genes) == slide.n_vars


def test_no_dense_imputation_layer_when_eval_reconstruction_keeps_none(slide, monkeypatch):
    """Above eval.reconstruction_max_values ('auto' -> masked rows; patch-mae masks no cells) the
    (cells x genes) imputation is never computed, and metrics say the layer was left out."""
    def refuse(*a, **k):
        raise AssertionError("the dense imputation layer was computed although nothing keeps it")

    monkeypatch.setattr(PatchMAE, "reconstruct_cells", refuse)
    out = fit(slide, "patch-mae", overrides=FAST + ["epochs=1", "patches_per_epoch=32",
                                                     "eval.reconstruction_max_values=10"])
    assert "patch-mae_reconstruction" not in out.adata.layers
    assert out.metrics["reconstruction_layer"]["cells_kept"] == 0
    assert out.metrics["reconstruction"]["masked_mse"] > 0  # the held-out benchmark does not need it


def test_encoder_plus_input_readout_adds_each_bins_own_features_beside_the_encoder_output(fitted, slide):
    """embed_readout='encoder+input': 2 x dim per cell; the first dim columns are the 'encoder'
    embedding of the same model, the rest the bins' own input features, which (unlike the
    encoder's output) do not depend on the neighbouring bins."""
    out, _ = fitted
    method = out.method
    dev = torch.device("cpu")
    enc = method.embed_cells(dev)
    method.config.embed_readout = "encoder+input"
    try:
        both = method.embed_cells(dev)
    finally:
        method.config.embed_readout = "encoder"
    d = enc.shape[1]
    assert both.shape == (slide.n_obs, 2 * d)
    np.testing.assert_allclose(both[:, :d], enc, atol=1e-5)
    mae = method.model.mae
    values, occ, genes = _random_batch(B=2, h=mae.h, m=4, n_genes=slide.n_vars, occ_p=1.0)
    changed = values.clone()
    changed[:, 0, 0] = changed[:, 0, 0] + 3.0  # only bin (0, 0) changes
    a = mae.token_embeddings(values, occ, genes, "encoder+input")
    b = mae.token_embeddings(changed, occ, genes, "encoder+input")
    far = torch.arange(a.shape[1]) != 0
    assert torch.allclose(a[:, far, d:], b[:, far, d:], atol=1e-6)  # own features: only bin 0 moves
    assert not torch.allclose(a[:, far, :d], b[:, far, :d], atol=1e-4)  # the encoder mixes bins
    with pytest.raises(ValueError, match="readout"):
        mae.token_embeddings(values, occ, genes, "decoder")
    with pytest.raises(SpatialDataError, match="embed_readout"):
        make_config("patch-mae", ["embed_readout=decoder"]).validate()
