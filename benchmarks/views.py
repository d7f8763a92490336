"""Benchmarks of the spatial views at whole-brain atlas scale (issue 3).

    python benchmarks/views.py            # 4.3M-cell / 59-section / 550-gene synthetic atlas
    python benchmarks/views.py --quick    # a 430k-cell atlas (same 59 sections), minutes less

1. Radius graph of the whole synthetic atlas (per section, r = 20 um), run in a fresh subprocess
   so its peak resident memory (``ru_maxrss``: the whole process, coordinates and interpreter
   included) belongs to it alone. Baseline, measured in the same run: scikit-learn's
   ``radius_neighbors_graph`` per section on a slice of sections both can handle; the edge sets
   are compared and the time ratio printed.
2. K-hop ego-nets (k = 1, 2, 3) on the radius graph of one atlas section: ``EgoNetSampler``
   over every cell of the section in batches (its construction timed with it), against ``torch_geometric.utils.k_hop_subgraph``
   called once per cell (the published approach) on a random sample of cells, whose per-cell rate
   is extrapolated; node sets of the sampled cells are checked identical. The baseline runs with
   the faster of 1 or the default number of torch threads (measured first).
3. Patch extraction: the same section's lattice (550 genes, preprocessed expression, bins of
   the median nearest-neighbour spacing), 16 x 16 patches with 256 variance-weighted gene
   channels (patch-mae's defaults): random patches per second, channel selection included.

The last line printed is one JSON object with the headline figures.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from napari_spatialssl.data.synthetic import ATLAS_N_CELLS, ATLAS_N_SECTIONS, synthetic_coords  # noqa: E402
from napari_spatialssl.graphs.neighbors import radius_graph  # noqa: E402


def _peak_rss_gb() -> float:
    # ru_maxrss is in kilobytes on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# --------------------------------------------------------------------------- subprocess workers


def worker_radius(args) -> dict:
    t = time.perf_counter()
    coords, section = synthetic_coords(args.n_cells, args.n_sections, seed=args.seed)
    t_coords = time.perf_counter() - t
    rss_before = _peak_rss_gb()
    t = time.perf_counter()
    g = radius_graph(coords, args.radius, section)
    seconds = time.perf_counter() - t
    s = g.summary()
    return {
        "coords_seconds": t_coords,
        "radius_graph_seconds": seconds,
        "peak_rss_gb": _peak_rss_gb(),
        "peak_rss_before_graph_gb": rss_before,
        "n_cells": g.n_nodes,
        "n_edges": g.n_edges,
        "mean_degree": s["mean_degree"],
        "isolated_fraction": s["isolated_fraction"],
        "result_bytes": int(g.indptr.nbytes + g.indices.nbytes + g.distances.nbytes),
    }


def worker_baseline(args) -> dict:
    from sklearn.neighbors import radius_neighbors_graph

    coords, section = synthetic_coords(args.n_cells, args.n_sections, seed=args.seed)
    counts = np.bincount(section)
    n_keep = int(np.searchsorted(np.cumsum(counts), args.slice_cells) + 1)
    n_keep = min(n_keep, len(counts))
    keep = section < n_keep
    c, s = coords[keep], section[keep]
    t = time.perf_counter()
    ours = radius_graph(c, args.radius, s)
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    ref = []
    for sec in range(n_keep):
        idx = np.flatnonzero(s == sec)
        ref.append((idx, radius_neighbors_graph(c[idx], args.radius, mode="distance", include_self=False,
                                                n_jobs=-1)))
    t_ref = time.perf_counter() - t
    A = ours.to_scipy()
    identical = True
    n_ref = 0
    for idx, R in ref:
        n_ref += R.nnz
        mine = A[idx][:, idx]
        identical &= mine.nnz == R.nnz and abs((mine > 0).astype(np.int8) - (R > 0).astype(np.int8)).nnz == 0
    identical &= n_ref == ours.n_edges
    return {
        "slice_sections": n_keep,
        "slice_cells": int(keep.sum()),
        "ours_seconds": t_ours,
        "sklearn_seconds": t_ref,
        "ratio": t_ref / t_ours,
        "identical_edges": bool(identical),
    }


def _run_worker(name: str, args) -> dict:
    cmd = [sys.executable, __file__, f"--worker={name}", f"--n-cells={args.n_cells}",
           f"--n-sections={args.n_sections}", f"--radius={args.radius}", f"--seed={args.seed}",
           f"--slice-cells={args.slice_cells}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- in-process benchmarks


def _pick_section(section: np.ndarray) -> int:
    counts = np.bincount(section)
    return int(np.argsort(counts)[len(counts) // 2])  # a typical (median-sized) section


def bench_egonets(coords: np.ndarray, radius: float, n_baseline: int, batch_size: int, seed: int) -> dict:
    import torch
    from torch_geometric.utils import k_hop_subgraph

    from napari_spatialssl.graphs.egonet import EgoNetSampler

    graph = radius_graph(coords, radius)
    ei = graph.edge_index()
    rng = np.random.default_rng(seed)
    cells = rng.choice(graph.n_nodes, size=min(n_baseline, graph.n_nodes), replace=False)

    def per_cell(k, sample, threads):
        torch.set_num_threads(threads)
        t = time.perf_counter()
        out = [k_hop_subgraph(int(c), k, ei, relabel_nodes=True, num_nodes=graph.n_nodes)[0] for c in sample]
        return (time.perf_counter() - t) / len(sample), out

    default_threads = torch.get_num_threads()
    probe = cells[:30]
    t1, _ = per_cell(2, probe, 1)
    tn, _ = per_cell(2, probe, default_threads)
    threads = 1 if t1 <= tn else default_threads
    results = {"n_cells": graph.n_nodes, "n_edges": graph.n_edges, "baseline_torch_threads": threads,
               "baseline_cells": len(cells), "by_hops": {}}
    for k in (1, 2, 3):
        base_per_cell, ref = per_cell(k, cells, threads)
        all_cells = np.arange(graph.n_nodes)
        t = time.perf_counter()
        sampler = EgoNetSampler(graph, k)  # construction (incl. any precomputation) is timed too
        n_sub = 0
        for batch in sampler.batches(all_cells, batch_size):
            n_sub += len(batch.nodes)
        ours_per_cell = (time.perf_counter() - t) / graph.n_nodes
        identical = True
        for start in range(0, len(cells), batch_size):
            b = sampler.sample(cells[start:start + batch_size])
            for i in range(len(b.centers)):
                identical &= np.array_equal(b.node_set(i), np.sort(ref[start + i].numpy()))
        results["by_hops"][k] = {
            "baseline_us_per_cell": base_per_cell * 1e6,
            "sampler_us_per_cell": ours_per_cell * 1e6,
            "sampler_cells_per_second": 1.0 / ours_per_cell,
            "speedup": base_per_cell / ours_per_cell,
            "precomputed_reach": sampler._reach is not None,
            "identical": bool(identical),
        }
    torch.set_num_threads(default_threads)
    return results


def bench_patches(coords: np.ndarray, X, n_patches: int, h: int, m: int, min_occupancy: float, seed: int) -> dict:
    from napari_spatialssl.graphs.lattice import (
        build_lattice,
        extract_patches,
        random_origins,
        sample_patches,
        select_channels,
        suggest_bin_size,
        tiled_origins,
    )

    bin_size = suggest_bin_size(coords)
    t = time.perf_counter()
    lat = build_lattice(coords, X, bin_size)
    t_lattice = time.perf_counter() - t
    rng = np.random.default_rng(seed)
    origins = random_origins(lat, n_patches, h, h, min_occupancy, rng)
    sample_patches(lat, origins[:64], h, h, m, rng)  # warm-up
    best = {"total": np.inf, "select": np.inf, "extract": np.inf}
    for _ in range(3):
        t = time.perf_counter()
        genes = select_channels(lat, origins, h, h, m, rng)
        t_sel = time.perf_counter() - t
        t = time.perf_counter()
        extract_patches(lat, origins, h, h, genes)
        t_ext = time.perf_counter() - t
        best["select"] = min(best["select"], t_sel)
        best["extract"] = min(best["extract"], t_ext)
        best["total"] = min(best["total"], t_sel + t_ext)
    tiles = tiled_origins(lat, h, h, h // 2)
    t = time.perf_counter()
    for start in range(0, len(tiles), 512):  # batches, as inference does (all tiles at once: ~2 GB)
        sample_patches(lat, tiles[start:start + 512], h, h, m, rng)
    t_tiles = time.perf_counter() - t
    return {
        "bin_size_um": bin_size,
        "lattice_shape": list(lat.shape),
        "occupied_bins": lat.n_occupied,
        "lattice_seconds": t_lattice,
        "patch": [h, h, m],
        "n_patches": n_patches,
        "patches_per_second": n_patches / best["total"],
        "select_patches_per_second": n_patches / best["select"],
        "extract_patches_per_second": n_patches / best["extract"],
        "tiled_patches": len(tiles),
        "tiled_patches_per_second": len(tiles) / t_tiles,
    }


def bench_real_merfish(radius: float, n_baseline: int, batch_size: int, seed: int) -> dict | None:
    path = ROOT.parent / "shared" / "data" / "merfish_hypothalamus_2sections.h5ad"
    if not path.exists():
        return None
    import anndata as ad

    adata = ad.read_h5ad(path)
    keep = (adata.obs["section"].astype(str) == str(adata.obs["section"].astype(str).iloc[0])).to_numpy()
    return bench_egonets(np.asarray(adata.obsm["spatial"], dtype=np.float64)[keep], radius, n_baseline,
                         batch_size, seed)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a 430k-cell atlas instead of 4.3M")
    p.add_argument("--n-cells", type=int, default=None)
    p.add_argument("--n-sections", type=int, default=ATLAS_N_SECTIONS)
    p.add_argument("--n-genes", type=int, default=550)
    p.add_argument("--radius", type=float, default=20.0, help="micrometres")
    p.add_argument("--slice-cells", type=int, default=None, help="cells in the scikit-learn baseline slice")
    p.add_argument("--egonet-baseline-cells", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.n_cells is None:
        args.n_cells = ATLAS_N_CELLS // 10 if args.quick else ATLAS_N_CELLS
    if args.slice_cells is None:
        args.slice_cells = 100_000 if args.quick else 400_000

    if args.worker:
        res = worker_radius(args) if args.worker == "radius" else worker_baseline(args)
        print(json.dumps(res))
        return res

    print(f"load average at start: {_load()} (2-core machine shared with other jobs)", flush=True)
    print(f"== radius graph, r = {args.radius:g} um, synthetic atlas {args.n_cells:,} cells / "
          f"{args.n_sections} sections", flush=True)
    rg = _run_worker("radius", args)
    print(f"   ours: {rg['radius_graph_seconds']:.2f} s, {rg['n_edges']:,} directed edges "
          f"(mean degree {rg['mean_degree']:.2f}, isolated {rg['isolated_fraction']:.1%}), "
          f"process peak RSS {rg['peak_rss_gb']:.2f} GB (before the graph: {rg['peak_rss_before_graph_gb']:.2f} GB; "
          f"coordinates drawn in {rg['coords_seconds']:.1f} s, not counted)", flush=True)
    bl = _run_worker("baseline", args)
    print(f"   slice of {bl['slice_sections']} sections / {bl['slice_cells']:,} cells: ours {bl['ours_seconds']:.2f} s, "
          f"scikit-learn radius_neighbors_graph {bl['sklearn_seconds']:.2f} s -> {bl['ratio']:.1f}x faster; "
          f"identical edges: {bl['identical_edges']}", flush=True)

    from napari_spatialssl.data.dataset import normalize_total_log1p
    from napari_spatialssl.data.synthetic import synthetic_atlas

    atlas = synthetic_atlas(args.n_cells, args.n_genes, args.n_sections, seed=args.seed)
    sec = _pick_section(atlas.section)
    idx = np.flatnonzero(atlas.section == sec)
    coords = atlas.coords[idx]
    print(f"== k-hop ego-nets on section {sec} ({len(idx):,} cells, r = {args.radius:g} um)", flush=True)
    eg = bench_egonets(coords, args.radius, args.egonet_baseline_cells, args.batch_size, args.seed)
    for k, r in eg["by_hops"].items():
        print(f"   k={k}: k_hop_subgraph per cell {r['baseline_us_per_cell']:.0f} us "
              f"({eg['baseline_torch_threads']} torch thread(s)), sampler {r['sampler_us_per_cell']:.1f} us/cell "
              f"(batches of {args.batch_size}) -> {r['speedup']:.0f}x; identical node sets on "
              f"{eg['baseline_cells']} cells: {r['identical']}", flush=True)
    real = bench_real_merfish(25.0, args.egonet_baseline_cells, args.batch_size, args.seed)
    if real:
        for k, r in real["by_hops"].items():
            print(f"   real MERFISH section ({real['n_cells']:,} cells, r = 25 um) k={k}: "
                  f"{r['baseline_us_per_cell']:.0f} vs {r['sampler_us_per_cell']:.1f} us/cell -> "
                  f"{r['speedup']:.0f}x; identical: {r['identical']}", flush=True)

    t = time.perf_counter()
    X = normalize_total_log1p(atlas.expression(int(idx[0]), int(idx[-1]) + 1))
    t_expr = time.perf_counter() - t
    print(f"== patches on section {sec}: expression {X.shape[0]:,} x {X.shape[1]} drawn lazily + "
          f"normalised in {t_expr:.1f} s ({X.nnz / X.shape[0]:.0f} non-zeros per cell)", flush=True)
    pt = bench_patches(coords, X, 2048, 16, 256, 0.3, args.seed)
    print(f"   bins of {pt['bin_size_um']:g} um -> lattice {pt['lattice_shape']} ({pt['occupied_bins']:,} occupied) "
          f"in {pt['lattice_seconds']:.2f} s; 16 x 16 x 256 patches: {pt['patches_per_second']:.0f}/s "
          f"(channel selection {pt['select_patches_per_second']:.0f}/s, extraction "
          f"{pt['extract_patches_per_second']:.0f}/s); tiling the section (stride {16 // 2}): {pt['tiled_patches']} "
          f"tiles in batches of 512 at {pt['tiled_patches_per_second']:.0f}/s", flush=True)

    speedups = {k: r["speedup"] for k, r in eg["by_hops"].items()}
    summary = {
        "radius_graph_seconds": round(rg["radius_graph_seconds"], 3),
        "radius_graph_peak_gb": round(rg["peak_rss_gb"], 3),
        "n_cells": rg["n_cells"],
        "n_edges": rg["n_edges"],
        "egonet_speedup": round(min(speedups.values()), 1),
        "egonet_identical": bool(all(r["identical"] for r in eg["by_hops"].values())
                                 and (real is None or all(r["identical"] for r in real["by_hops"].values()))),
        "patches_per_second": round(pt["patches_per_second"], 1),
        "radius_graph_vs_sklearn": round(bl["ratio"], 2),
        "radius_graph_identical_to_sklearn": bl["identical_edges"],
        "egonet_speedup_by_hops": {str(k): round(v, 1) for k, v in speedups.items()},
        "load_average": _load(),
    }
    print(f"load average at end: {_load()}", flush=True)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
