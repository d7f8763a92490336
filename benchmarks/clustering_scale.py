"""Domain clustering without K at atlas scale: the Leiden resolution search on a subsample, then
every other cell assigned by its nearest clustered cells, against the search on the full k-NN graph.

`graph_cluster_search` (used by patch-mae and spotscape when `--n-domains` is not given) builds the
exact k-NN graph of the embeddings and runs Leiden at 8 resolutions. Above `max_graph_cells`
(default 100,000) it now does that on a random subsample and assigns the rest
(`assign_by_neighbours`). This script measures both paths in the same run, each in its own process
(peak RSS is that process's), on synthetic 64-d embeddings with known clusters:

- the subsampled path at every size;
- the full-graph path (the baseline: what the code did before) at the sizes up to `--full-max`,
  under a wall-clock cap `--full-timeout` (a size that does not finish is reported as such);
- wall time, peak RSS, clusters found, ARI against the planted clusters, and, where both ran, the
  ARI between the two paths' labels and the time ratio.

Usage:
  python benchmarks/clustering_scale.py                       # 50k, 200k, 1M; full graph up to 200k
  python benchmarks/clustering_scale.py --sizes 4300000 --full-max 0
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


def synthetic_embeddings(n: int, k: int = 15, d: int = 64, seed: int = 0):
    """`k` Gaussian clusters of unequal sizes in `d` dimensions (overlapping: planted ARI < 1)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1.0, size=(k, d))
    weights = rng.dirichlet(np.full(k, 2.0))
    y = rng.choice(k, size=n, p=weights)
    X = np.empty((n, d), np.float32)
    for start in range(0, n, 500_000):  # in blocks: the float64 noise of 4.3M x 64 is 2.2 GB
        stop = min(n, start + 500_000)
        X[start:stop] = centres[y[start:stop]] + 1.1 * rng.normal(size=(stop - start, d))
    return X, y


def one(n: int, mode: str, labels_out: str) -> dict:
    from napari_spatialssl.evaluation.clustering import domain_scores, graph_cluster_search

    X, y = synthetic_embeddings(n)
    t0 = time.perf_counter()
    # "subsample": the library default (max_graph_cells=100,000); "full": the graph of every cell
    labels, info = graph_cluster_search(X, None, **({"max_graph_cells": None} if mode == "full" else {}))
    seconds = time.perf_counter() - t0
    np.save(labels_out, labels.astype(np.int16))
    return {"n": n, "mode": mode, "seconds": round(seconds, 1),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "n_clusters": int(info["n_clusters"]), "resolution": info["resolution"],
            "n_graph_cells": info.get("n_graph_cells", n),
            "ari_vs_planted": round(domain_scores(labels, y)["ari"], 4)}


def run_child(n: int, mode: str, timeout: float, tmp: Path) -> dict:
    out = tmp / f"labels_{mode}_{n}.npy"
    cmd = [sys.executable, __file__, "--one", str(n), mode, str(out)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    except subprocess.TimeoutExpired:
        return {"n": n, "mode": mode, "seconds": None, "note": f"did not finish in {timeout:.0f} s"}
    rec = json.loads(res.stdout.strip().splitlines()[-1])
    rec["labels"] = str(out)
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000, 1_000_000])
    p.add_argument("--full-max", type=int, default=200_000, help="largest size the full-graph baseline is run at")
    p.add_argument("--full-timeout", type=float, default=1800.0)
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "clustering_scale.jsonl"))
    p.add_argument("--one", nargs=3, metavar=("N", "MODE", "LABELS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(int(args.one[0]), args.one[1], args.one[2])))
        return 0

    import tempfile

    from sklearn.metrics import adjusted_rand_score

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for n in args.sizes:
            sub = run_child(n, "subsample", args.timeout, tmp)
            rec = {"subsample": sub}
            if n <= args.full_max:
                full = run_child(n, "full", args.full_timeout, tmp)
                rec["full"] = full
                if full.get("seconds") and sub.get("seconds"):
                    rec["speedup_full_over_subsample"] = round(full["seconds"] / sub["seconds"], 2)
                    rec["ari_subsample_vs_full"] = round(float(adjusted_rand_score(
                        np.load(full["labels"]), np.load(sub["labels"]))), 4)
            for r in (rec.get("full"), rec["subsample"]):
                if r:
                    r.pop("labels", None)
            rec["n"] = n
            print(json.dumps(rec), flush=True)
            with open(args.out, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
