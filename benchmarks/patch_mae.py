"""patch-mae on the shared DLPFC slides (151673-151676): pretrain on the four slices, then
domains (K = 7, ARI / NMI per slice), k-NN / MLP probes, masked-region reconstruction against
the baselines on held-out tiles, for several seeds; train time per epoch and patches per second.

``--validation`` runs the tuning protocol instead: the held-out tiles are left untouched (never
trained on, never scored); 4 further non-overlapping tiles per slice are cut out of the *training*
area (no training window touches them) and the masked-region benchmark (square masks) plus
random-token masks at ratios 0.25 / 0.75 are scored on those validation tiles only. Every
configuration in the tuning table of benchmarks/patch_mae.md was chosen this way.

Baseline measured in the same run: PCA (same number of dimensions as the embeddings) of the same
preprocessed expression, clustered and probed identically, so every ratio printed compares the
two on the same cells, the same K and the same probe split.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/patch_mae.py --seeds 0 1 2 --epochs 40 \
        --out benchmarks/results/patch_mae_dlpfc.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from napari_spatialssl.data.io import read_h5ad  # noqa: E402
from napari_spatialssl.evaluation.clustering import domain_scores, kmeans  # noqa: E402
from napari_spatialssl.evaluation.probes import run_probes  # noqa: E402
from napari_spatialssl.pipeline import Pipeline, dataset_from_config, make_config  # noqa: E402

DATA = Path(os.environ.get("SPATIALSSL_SHARED_DATA", REPO.parent / "shared" / "data")) / "dlpfc_151673-151676.h5ad"


def per_slice_kmeans(emb: np.ndarray, data, k: int, seed: int) -> dict:
    """k-means with K clusters inside each slice separately (the published DLPFC protocol)."""
    out = {}
    for s, name in enumerate(data.section_names):
        idx = data.section_indices(s)
        out[name] = domain_scores(kmeans(emb[idx], k, seed=seed), data.domains[idx])
    return out


REPORTED = ("151673", "151676")  # never used to choose a setting (151674 / 151675 are the tuning slices)


def reported_slice_probes(emb: np.ndarray, data, cfg, seed: int) -> dict:
    """The probes (same protocol) on the spots of the reported slices only."""
    idx = np.concatenate([data.section_indices(s) for s, name in enumerate(data.section_names) if name in REPORTED])
    return run_probes(np.asarray(emb)[idx], data.labels[idx], train_fraction=cfg.probe_train_fraction, seed=seed,
                      k=cfg.probe_k, hidden=cfg.probe_hidden)


def joint_scores(emb: np.ndarray, data, k: int, seed: int) -> dict:
    pred = kmeans(emb, k, seed=seed)
    per = {name: domain_scores(pred[data.section_indices(s)], data.domains[data.section_indices(s)])
           for s, name in enumerate(data.section_names)}
    return {**domain_scores(pred, data.domains), "per_section": per}


def pca_embedding(data, n_comp: int, seed: int) -> np.ndarray:
    from sklearn.decomposition import TruncatedSVD

    X = data.X
    mu = np.asarray(X.mean(axis=0)).ravel()
    # TruncatedSVD on the sparse matrix, centred through the mean row (PCA without densifying)
    svd = TruncatedSVD(n_comp, random_state=seed).fit(X)
    return (np.asarray(X @ svd.components_.T) - mu @ svd.components_.T).astype(np.float32)


def validation_run(adata, overrides: list[str], seed: int, per_slice: int = 4, split_seed: int = 1234) -> dict:
    """Tuning protocol: train on the training area minus `per_slice` validation tiles per slice;
    score on the validation tiles only (the held-out tiles are neither trained on nor scored)."""
    from napari_spatialssl.graphs.lattice import tiled_origins
    from napari_spatialssl.models.patch_mae import PatchMAE, _window_sum
    from napari_spatialssl.models.vit import random_token_mask
    from napari_spatialssl.training import Trainer

    cfg = make_config("patch-mae", overrides + [f"seed={seed}"])
    method = PatchMAE(cfg)
    method.prepare(dataset_from_config(adata, cfg))
    h = method.h
    rng = np.random.default_rng(split_seed)
    val = []
    for i, lat in enumerate(method.lattices):
        tiles = tiled_origins(lat, h, h)
        tiles = tiles[_window_sum(lat.occupancy, h, h)[tiles[:, 0], tiles[:, 1]] >= cfg.min_occupancy * h * h]
        held = np.zeros(lat.shape, bool)
        for r, c in method.holdout[i]:
            held[r:r + h, c:c + h] = True
        tiles = tiles[[not held[r:r + h, c:c + h].any() for r, c in tiles]]
        pick = tiles[np.sort(rng.choice(len(tiles), size=min(per_slice, len(tiles)), replace=False))]
        blocked = np.zeros(lat.shape, bool)
        for r, c in pick:
            blocked[r:r + h, c:c + h] = True
        o = method.train_origins[i]
        method.train_origins[i] = o[_window_sum(blocked, h, h)[o[:, 0], o[:, 1]] == 0]
        val.append(pick)
    method.holdout = val  # validation tiles stand in for the held-out ones from here on
    method._val = None
    trainer = Trainer(cfg)
    trainer.fit(method)
    dev = torch.device("cpu")
    rec = method.masked_region_benchmark(dev)

    @torch.no_grad()
    def random_masks(ratio: float) -> dict:
        model = method.model.eval()
        mae = model.mae
        g = torch.Generator().manual_seed(7)
        se, n = {"model": 0.0, "context_base": 0.0}, 0
        for b in method._holdout_batch_list(np.random.default_rng(99)):
            pb = b.patches
            genes, occ, raw = (torch.as_tensor(pb.genes), torch.as_tensor(pb.occupancy), torch.as_tensor(pb.values))
            x = model.standardise(raw, occ, genes)
            tocc = mae.token_occupancy(occ)
            for _ in range(4):
                msk = random_token_mask(tocc, ratio, torch.rand(tocc.shape, generator=g))
                t = mae.from_tokens(msk[:, :, None]).squeeze(-1) & occ
                pred = model.unstandardise(mae(x, occ, genes, msk).float(), genes)
                base = model.unstandardise(mae.context_base(x, occ, tocc & ~msk).float(), genes)
                se["model"] += float(((pred - raw)[t] ** 2).sum())
                se["context_base"] += float(((base - raw)[t] ** 2).sum())
                n += int(t.sum()) * raw.shape[-1]
        return {k: v / max(n, 1) for k, v in se.items()}

    hist = trainer.result.history
    return {"overrides": overrides, "seed": seed, "validation_tiles": int(sum(len(v) for v in val)),
            "train_seconds": trainer.result.train_seconds, "final_loss": hist[-1]["loss"],
            "final_val_loss": hist[-1]["val_loss"], "bandwidth_bins": rec.get("bandwidth_bins"),
            "square_masks": {z: {k: r[k] for k in ("model", "context_base", "zeros", "patch_mean", "nearest", "idw")}
                             for z, r in rec["by_mask_size"].items()},
            "random_masks": {str(r): random_masks(r) for r in (0.25, 0.75)}}


def _print_epoch(event) -> None:
    if event.kind == "epoch":
        print(f"    epoch {event.epoch}: loss {event.losses.get('loss', float('nan')):.4f} "
              f"val {event.val_loss if event.val_loss is None else round(event.val_loss, 4)} "
              f"({event.elapsed:.0f} s)", flush=True)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", nargs="*", default=[], help="extra config overrides name=value")
    ap.add_argument("--out", type=str, default=None)
    ap.add_argument("--validation", action="store_true",
                    help="tuning protocol: score on validation tiles cut from the training area only")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not DATA.exists():
        print(f"{DATA} absent; nothing to benchmark")
        return {}
    adata = read_h5ad(DATA)
    overrides = [f"epochs={args.epochs}", "eval.n_domains=7", "eval.domain_key=layer", "data.label_key=layer",
                 "data.section_key=sample_id", "holdout_fraction=0.2", "reconstruction_layer=false", *args.set]
    if args.validation:
        vals = []
        for seed in args.seeds:
            v = validation_run(adata, overrides, seed)
            sq = v["square_masks"]
            print(f"seed {seed} (validation tiles): " + " | ".join(
                f"{z}x{z} model {r['model']['mse']:.4f}/{r['model']['mae']:.4f} base {r['context_base']['mse']:.4f} "
                f"patch-mean {r['patch_mean']['mse']:.4f} idw {r['idw']['mse']:.4f}/{r['idw']['mae']:.4f}"
                for z, r in sq.items()) + " | " + " ".join(
                f"random {q}: {r['model']:.4f} vs base {r['context_base']:.4f}" for q, r in v["random_masks"].items()),
                flush=True)
            vals.append(v)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"validation_runs": vals}, indent=1, default=float))
        return {"validation_runs": vals}
    runs = []
    load_start = os.getloadavg()
    for seed in args.seeds:
        cfg = make_config("patch-mae", overrides + [f"seed={seed}"])
        t0 = time.perf_counter()
        out = Pipeline("patch-mae", cfg).fit(adata, callback=_print_epoch)
        wall = time.perf_counter() - t0
        m = out.metrics
        data = out.method.data
        emb = out.adata.obsm["X_patch-mae"]
        n_epochs = max(m["epochs"], 1)
        run = {
            "seed": seed,
            "train_seconds": m["train_seconds"],
            "seconds_per_epoch": m["train_seconds"] / n_epochs,
            "patches_per_second": cfg.patches_per_epoch * n_epochs / m["train_seconds"],
            "wall_seconds": wall,
            "final_loss": out.train_result.history[-1]["loss"],
            "final_val_loss": out.train_result.history[-1]["val_loss"],
            "domains_joint": m["domains"],
            "domains_per_slice_kmeans": per_slice_kmeans(emb, data, 7, seed),
            "probes": m["probes"],
            "probes_reported_slices": reported_slice_probes(emb, data, cfg, seed),
            "reconstruction": m["reconstruction"],
            "summary": m["patch_mae"],
        }
        # baseline on the same cells / K / probe split
        pca = pca_embedding(data, emb.shape[1], seed)
        run["baseline_pca"] = {
            "domains_joint": joint_scores(pca, data, 7, seed),
            "domains_per_slice_kmeans": per_slice_kmeans(pca, data, 7, seed),
            "probes": run_probes(pca, data.labels, train_fraction=cfg.probe_train_fraction, seed=seed,
                                 k=cfg.probe_k, hidden=cfg.probe_hidden),
            "probes_reported_slices": reported_slice_probes(pca, data, cfg, seed),
        }
        runs.append(run)
        rec = run["reconstruction"]
        print(f"seed {seed}: {run['seconds_per_epoch']:.1f} s/epoch, {run['patches_per_second']:.0f} patches/s "
              f"({args.threads} thread(s)); loss {run['final_loss']:.4f} val {run['final_val_loss']:.4f}")
        for size, r in rec["by_mask_size"].items():
            base = {b: r[b]["mse"] for b in ("zeros", "patch_mean", "nearest", "idw")}
            best = min(base, key=base.get)
            base["own_context_base"] = r["context_base"]["mse"]
            print(f"  mask {size}x{size}: model MSE {r['model']['mse']:.4f} MAE {r['model']['mae']:.4f} | "
                  + " ".join(f"{b} {v:.4f}" for b, v in base.items())
                  + f" | ratio to best baseline ({best}) {r['model']['mse'] / base[best]:.3f}")
        pj = run["domains_per_slice_kmeans"]
        bj = run["baseline_pca"]["domains_per_slice_kmeans"]
        for name in pj:
            print(f"  slice {name}: ARI per-slice k-means {pj[name]['ari']:.3f} (PCA {bj[name]['ari']:.3f}); "
                  f"joint {m['domains']['per_section'][name]['ari']:.3f} "
                  f"(PCA {run['baseline_pca']['domains_joint']['per_section'][name]['ari']:.3f})")
        for p in ("knn", "mlp"):
            print(f"  probe {p}: acc {m['probes'][p]['accuracy']:.3f} ARI {m['probes'][p]['ari']:.3f} "
                  f"(PCA acc {run['baseline_pca']['probes'][p]['accuracy']:.3f})")
        sys.stdout.flush()
    summary = summarise(runs)
    print(json.dumps(summary, indent=1))
    result = {"config_overrides": overrides, "threads": args.threads, "runs": runs, "summary": summary,
              "load_average_start": load_start, "load_average_end": os.getloadavg()}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1, default=float))
    return result


def summarise(runs: list[dict]) -> dict:
    def ms(values):
        v = np.asarray(values, dtype=np.float64)
        return [float(v.mean()), float(v.std())]

    slices = list(runs[0]["domains_per_slice_kmeans"])
    sizes = list(runs[0]["reconstruction"]["by_mask_size"])
    out = {
        "seconds_per_epoch": ms([r["seconds_per_epoch"] for r in runs]),
        "patches_per_second": ms([r["patches_per_second"] for r in runs]),
        "ari_per_slice_kmeans": {s: ms([r["domains_per_slice_kmeans"][s]["ari"] for r in runs]) for s in slices},
        "nmi_per_slice_kmeans": {s: ms([r["domains_per_slice_kmeans"][s]["nmi"] for r in runs]) for s in slices},
        "ari_joint_per_slice": {s: ms([r["domains_joint"]["per_section"][s]["ari"] for r in runs]) for s in slices},
        "pca_ari_per_slice_kmeans": {s: ms([r["baseline_pca"]["domains_per_slice_kmeans"][s]["ari"] for r in runs])
                                     for s in slices},
        "pca_nmi_per_slice_kmeans": {s: ms([r["baseline_pca"]["domains_per_slice_kmeans"][s]["nmi"] for r in runs])
                                     for s in slices},
        "probe_knn_acc": ms([r["probes"]["knn"]["accuracy"] for r in runs]),
        "probe_mlp_acc": ms([r["probes"]["mlp"]["accuracy"] for r in runs]),
        "probe_knn_ari": ms([r["probes"]["knn"]["ari"] for r in runs]),
        "probe_mlp_ari": ms([r["probes"]["mlp"]["ari"] for r in runs]),
        "pca_probe_knn_acc": ms([r["baseline_pca"]["probes"]["knn"]["accuracy"] for r in runs]),
        "pca_probe_mlp_acc": ms([r["baseline_pca"]["probes"]["mlp"]["accuracy"] for r in runs]),
        "reported_slices": list(REPORTED),
        **{f"{who}probe_{p}_acc_reported_slices": ms([(r["baseline_pca"] if who else r)["probes_reported_slices"][p]
                                                      ["accuracy"] for r in runs if "probes_reported_slices" in r])
           for who in ("", "pca_") for p in ("knn", "mlp")},
        "reconstruction_mse": {
            z: {k: ms([r["reconstruction"]["by_mask_size"][z][k]["mse"] for r in runs])
                for k in ("model", "zeros", "patch_mean", "nearest", "idw", "context_base")} for z in sizes},
        "reconstruction_mae": {
            z: {k: ms([r["reconstruction"]["by_mask_size"][z][k]["mae"] for r in runs])
                for k in ("model", "zeros", "patch_mean", "nearest", "idw", "context_base")} for z in sizes},
        "beats_all_baselines_mse_every_seed": all(r["reconstruction"]["beats_all_baselines_mse"] for r in runs),
        "beats_all_baselines_mae_every_seed": all(r["reconstruction"]["beats_all_baselines_mae"] for r in runs),
    }
    return out


if __name__ == "__main__":
    main()
