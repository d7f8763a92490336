"""Memory of building the Leiden search's igraph: ``Graph(n, edges)`` (the baseline, what the search
did until the atlas pipeline ran out of memory in it) against ``Graph(n)`` + one ``add_edges`` call
(``evaluation.clustering._edges_igraph`` now), same edges, each in a process of its own.

Prints, per way: seconds, bytes per edge at the peak over the process's RSS before the call (from
``ru_maxrss``) and bytes per edge kept after it; then one JSON line with the ratio of the peaks. The
4.3M-cell atlas's k-NN graph (k = 15, union-symmetrised) has ~48M edges.

    python benchmarks/igraph_build_memory.py [--cells 2000000 --edges 20000000]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rss_gb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096 / 1e9


def _build(way: str, n: int, m: int, queue) -> None:
    import gc

    import igraph as ig
    import numpy as np

    edges = np.sort(np.random.default_rng(0).integers(0, n, size=(m, 2)), axis=1).astype(np.int32)
    gc.collect()
    base, peak_before = _rss_gb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    t0 = time.perf_counter()
    if way == "Graph(n, edges) (baseline)":
        g = ig.Graph(n=n, edges=edges, directed=False)
    else:
        from napari_spatialssl.evaluation.clustering import _edges_igraph

        g = _edges_igraph(n, edges)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    queue.put({"way": way, "cells": n, "edges": m, "ecount": g.ecount(), "seconds": round(seconds, 1),
               "peak_bytes_per_edge": round((max(peak, peak_before) - base) * 1e9 / m, 1),
               "kept_bytes_per_edge": round((_rss_gb() - base) * 1e9 / m, 1)})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=2_000_000)
    p.add_argument("--edges", type=int, default=20_000_000)
    args = p.parse_args(argv)
    ctx = mp.get_context("spawn")
    out = {}
    for way in ("Graph(n, edges) (baseline)", "Graph(n) + add_edges (_edges_igraph)"):
        queue = ctx.Queue()
        proc = ctx.Process(target=_build, args=(way, args.cells, args.edges, queue))
        proc.start()
        rec = queue.get()
        proc.join()
        print(rec, flush=True)
        out[way] = rec
    base, new = out.values()
    print(json.dumps({"edges": args.edges, "peak_ratio_baseline_over_new":
                      round(base["peak_bytes_per_edge"] / max(new["peak_bytes_per_edge"], 1e-9), 2),
                      "atlas_48M_edges_peak_gb": {"baseline": round(base["peak_bytes_per_edge"] * 48e6 / 1e9, 1),
                                                  "new": round(new["peak_bytes_per_edge"] * 48e6 / 1e9, 1)}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
