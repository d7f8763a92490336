"""Domains without K on every cell: the Leiden resolution search on an approximate k-NN graph
(pynndescent) against the exact graph and against the earlier 100k-cell subsample, same run.

Synthetic 64-d embeddings: 15 overlapping Gaussian clusters of unequal sizes (as
benchmarks/clustering_scale.py) plus one rare, tight cluster of 1 cell in 20,000 (215 cells at
4.3M), the kind of domain a subsample can lose. Each (size, path) runs in its own process, so its
peak RSS is its own:

  exact        graph_cluster_search(X, knn="exact")          every cell, exact k-NN (the baseline)
  approximate  graph_cluster_search(X, knn="approximate")    every cell, pynndescent (the default above 150k)
  subsample    graph_cluster_search(X, max_graph_cells=100_000, knn="exact")   the earlier default

Reported: wall time (pynndescent's numba compilation, ~2-3 min per process here, included and
also shown apart), peak RSS, k-NN recall@15 of the approximate graph on 2,000 random cells (their
exact neighbours by brute force), clusters found, ARI against the planted clusters, the rare
cluster's best Jaccard overlap with a found domain, and the ARI between paths where both ran.

    python benchmarks/knn_domains_scale.py --sizes 100000 200000 1000000 --exact-max 200000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def embeddings(n: int, seed: int = 0):
    """15 overlapping clusters (clustering_scale.py's recipe) + a rare tight one (label 15)."""
    rng = np.random.default_rng(seed)
    k, d = 15, 64
    centres = rng.normal(0, 1.0, size=(k + 1, d))
    weights = rng.dirichlet(np.full(k, 2.0)) * (1 - 1 / 20_000)
    y = rng.choice(k + 1, size=n, p=np.r_[weights, 1 / 20_000])
    X = np.empty((n, d), np.float32)
    for start in range(0, n, 500_000):
        stop = min(n, start + 500_000)
        yy = y[start:stop]
        noise = np.where(yy[:, None] == k, 0.3, 1.1)
        X[start:stop] = centres[yy] + noise * rng.normal(size=(stop - start, d))
    return X, y


def recall_at(X: np.ndarray, k: int = 15, n_probe: int = 2000, seed: int = 1) -> float:
    from napari_spatialssl.evaluation.clustering import knn_indices

    approx = knn_indices(X, k, method="approximate")
    rng = np.random.default_rng(seed)
    probe = rng.choice(len(X), size=min(n_probe, len(X)), replace=False)
    hits = 0
    for start in range(0, len(probe), 250):  # brute force, 250 probe rows at a time
        rows = probe[start:start + 250]
        d = (X[rows] ** 2).sum(1)[:, None] - 2 * X[rows] @ X.T + (X ** 2).sum(1)[None, :]
        d[np.arange(len(rows)), rows] = np.inf
        exact = np.argpartition(d, k, axis=1)[:, :k]
        hits += sum(len(np.intersect1d(a, e)) for a, e in zip(approx[rows], exact))
    return hits / (len(probe) * k)


def one(n: int, path: str, out: str) -> dict:
    from napari_spatialssl.evaluation.clustering import domain_scores, graph_cluster_search

    X, y = embeddings(n)
    rec = {"n": n, "path": path}
    if path == "approximate":  # compile pynndescent first, to show the fixed cost apart
        t0 = time.perf_counter()
        from napari_spatialssl.evaluation.clustering import knn_indices

        knn_indices(X[:2000], 15, method="approximate")
        rec["numba_compile_s"] = round(time.perf_counter() - t0, 1)
    kw = {"approximate": {"knn": "approximate"}, "exact": {"knn": "exact"},
          "subsample": {"max_graph_cells": 100_000, "knn": "exact"}}[path]
    t0 = time.perf_counter()
    labels, info = graph_cluster_search(X, None, **kw)
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    rare = y == 15
    jac = 0.0
    for lab in np.unique(labels[rare]):
        inter = int((rare & (labels == lab)).sum())
        jac = max(jac, inter / int((rare | (labels == lab)).sum()))
    rec.update(peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
               n_clusters=int(info["n_clusters"]), resolution=info["resolution"],
               ari_vs_planted=round(domain_scores(labels, y)["ari"], 4), rare_cells=int(rare.sum()),
               rare_best_jaccard=round(jac, 3), knn=info.get("knn"), n_graph_cells=info.get("n_graph_cells", n))
    if path == "approximate":
        t0 = time.perf_counter()
        rec["knn_recall_at_15"] = round(recall_at(X), 4)
        rec["recall_seconds"] = round(time.perf_counter() - t0, 1)
    np.save(out, labels.astype(np.int16))
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 200_000, 1_000_000])
    p.add_argument("--exact-max", type=int, default=200_000, help="largest size for the exact graph")
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--out", type=Path, default=None, help="append the JSON records to this file")
    p.add_argument("--one", nargs=3, metavar=("N", "PATH", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(int(args.one[0]), args.one[1], args.one[2])))
        return 0
    import tempfile

    from sklearn.metrics import adjusted_rand_score

    tmp = Path(tempfile.mkdtemp(prefix="knn_domains_"))
    for n in args.sizes:
        paths = ["approximate"] + (["exact"] if n <= args.exact_max else []) + (["subsample"] if n > 100_000 else [])
        recs = {}
        for path in paths:
            out = tmp / f"{path}_{n}.npy"
            try:
                res = subprocess.run([sys.executable, __file__, "--one", str(n), path, str(out)], capture_output=True,
                                     text=True, timeout=args.timeout, env={**os.environ, "PYTHONPATH": str(REPO)})
                recs[path] = json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else \
                    {"n": n, "path": path, "error": res.stderr.strip().splitlines()[-1][:300]}
            except subprocess.TimeoutExpired:
                recs[path] = {"n": n, "path": path, "note": f"did not finish in {args.timeout:.0f} s"}
            print(json.dumps(recs[path]), flush=True)
        labels = {k: np.load(tmp / f"{k}_{n}.npy") for k in recs if (tmp / f"{k}_{n}.npy").exists()}
        summary = {"n": n, "load_average": os.getloadavg()}
        for a, b in (("approximate", "exact"), ("approximate", "subsample"), ("exact", "subsample")):
            if a in labels and b in labels:
                summary[f"ari_{a}_vs_{b}"] = round(adjusted_rand_score(labels[a], labels[b]), 4)
                ta, tb = recs[a].get("seconds"), recs[b].get("seconds")
                if ta and tb:
                    summary[f"time_{b}_over_{a}"] = round(tb / ta, 2)
        print(json.dumps(summary), flush=True)
        if args.out:
            with open(args.out, "a") as fh:
                for r in (*recs.values(), summary):
                    fh.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
