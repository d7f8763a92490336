"""Spotscape hyper-parameter tuning on the DLPFC *tuning* slices only (151674, 151675).

The evaluation slices (151673, 151676, and the four-slice file) are never read here: the defaults of
`SpotscapeConfig` are chosen from these runs, then evaluated with `benchmarks/spotscape.py`.

One training per (slice, config, seed); ARI (K = 7, `layer` labels) is measured at several epochs
of the same training (embeddings in eval mode, k-means with `n_init` restarts), both with k-means on
all spots (unlabelled spots excluded from the score only) and with unlabelled spots dropped before
k-means (the published protocol). Results are appended as JSON lines.

Usage:
  python benchmarks/spotscape_tune.py --slice 151674 --name base --checkpoints 50 100 150 \
      --set lr=1e-3 --set data.preprocess.n_top_genes=3000
`--set` takes any config field (dotted for nested ones, see SpotscapeConfig).
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
DATA = Path(os.environ.get("SPATIALSSL_SHARED_DATA", REPO.parent / "shared" / "data"))
TUNING = {"151674": "dlpfc_151674.h5ad", "151675": "dlpfc_151675.h5ad"}
# Two-slice joint tuning case: the two single-slice files concatenated on their common genes
# (the four-slice evaluation file is not read).
PAIR = "151674+151675"
OUT = REPO / "benchmarks" / "results" / "spotscape" / "tuning_151674_151675.jsonl"


POSTS = ("none", "l2", "standardize", "pca")


def scores(emb: np.ndarray, truth: np.ndarray, seed: int, n_init: int, posts=POSTS,
           kmeans_seeds: int = 1, section: np.ndarray | None = None, section_names=None) -> dict:
    """ARI / NMI of k-means (K = 7) on the embeddings after each post-processing in `posts`.

    Keys without a suffix: the raw embeddings ("none"); `_<post>` for the others. With
    `kmeans_seeds` > 1, the k-means is repeated with seeds seed .. seed + kmeans_seeds - 1 and
    the mean ARI is stored too (`ari_all_kmean[_<post>]`; k-means' own seed spread on one embedding).
    """
    from napari_spatialssl.evaluation.clustering import domain_scores, kmeans
    from napari_spatialssl.models.spotscape import postprocess_embedding

    lab = truth >= 0
    out = {}
    for post in posts:
        e = postprocess_embedding(emb, post, seed=seed)
        suf = "" if post == "none" else f"_{post}"
        all_spots = domain_scores(kmeans(e, 7, seed=seed, n_init=n_init), truth)
        dropped = domain_scores(kmeans(postprocess_embedding(emb[lab], post, seed=seed), 7, seed=seed,
                                       n_init=n_init), truth[lab])
        out.update({f"ari_all{suf}": all_spots["ari"], f"nmi_all{suf}": all_spots["nmi"],
                    f"ari_drop{suf}": dropped["ari"], f"nmi_drop{suf}": dropped["nmi"]})
        if section is not None and len(np.unique(section)) > 1:  # per slice, from the joint clustering
            pred = kmeans(e, 7, seed=seed, n_init=n_init)
            out[f"per_slice{suf}"] = {str(section_names[s]): domain_scores(pred[section == s], truth[section == s])["ari"]
                                      for s in np.unique(section)}
        if kmeans_seeds > 1:
            out[f"ari_all_kmean{suf}"] = float(np.mean(
                [domain_scores(kmeans(e, 7, seed=seed + s, n_init=n_init), truth)["ari"]
                 for s in range(kmeans_seeds)]))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--slice", choices=[*TUNING, PAIR], required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--checkpoints", type=int, nargs="+", default=[50, 100, 150])
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--n-init", type=int, default=10)
    p.add_argument("--posts", nargs="+", default=list(POSTS),
                   help="embedding post-processings scored before k-means (see postprocess_embedding)")
    p.add_argument("--kmeans-seeds", type=int, default=3)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from napari_spatialssl.data.io import read_h5ad
    from napari_spatialssl.models.spotscape import Spotscape
    from napari_spatialssl.pipeline import dataset_from_config, make_config
    from napari_spatialssl.training import Trainer, seed_everything

    if args.slice == PAIR:
        import anndata

        parts = [read_h5ad(DATA / TUNING[s]) for s in TUNING]
        adata = anndata.concat(parts, join="inner", merge="same")
        adata.obs["sample_id"] = adata.obs["sample_id"].astype(str).astype("category")
    else:
        adata = read_h5ad(DATA / TUNING[args.slice])
    data = None
    for seed in args.seeds:
        cfg = make_config("spotscape", args.overrides)
        cfg.seed, cfg.device = seed, "cpu"
        cfg.epochs = max(args.checkpoints)
        cfg.eval.domain_key, cfg.eval.n_domains = "layer", 7
        if data is None:
            data = dataset_from_config(adata, cfg)
        method = Spotscape(cfg)
        method.data = data
        seed_everything(seed)
        method.prepare(data)
        trainer = Trainer(cfg)
        t0 = time.perf_counter()
        for ev in trainer.run(method):
            if ev.kind == "epoch" and ev.epoch in args.checkpoints:
                t_train = time.perf_counter() - t0
                emb, _ = method.embed(data, trainer.device, method.graph)
                rec = {"slice": args.slice, "name": args.name, "seed": seed, "epoch": ev.epoch,
                       "overrides": args.overrides, "n_genes": data.n_genes, "train_s": round(t_train, 1),
                       "losses": ev.losses, **scores(emb, data.domains, seed, args.n_init, args.posts, args.kmeans_seeds,
                                         data.section, data.section_names)}
                with open(args.out, "a") as fh:
                    fh.write(json.dumps(rec, default=float) + "\n")
                print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in rec.items()
                                  if k in ("slice", "name", "seed", "epoch", "train_s") or k.startswith("ari_all")},
                                 default=float), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
