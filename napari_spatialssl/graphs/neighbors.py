"""Spatial neighbour graphs, built per section with scipy's cKDTree, never across sections.

A :class:`CellGraph` stores its edges in CSR form (row = centre cell, columns = its neighbours,
sorted by cell index) with the distance of every edge, in the coordinates' units (micrometres
for MERFISH). Graphs are symmetric unless stated.

Building is linear in the number of edges: every section's pairs are turned into a section-local
CSR by sorting one int64 key per edge (row * n_section + col), then the sections are placed into
the global CSR by their degrees. Edge indices are int32 and distances float32 (8 bytes per
directed edge in the result); transient memory is one section's worth of edges.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.spatial import cKDTree

from ..data.io import SpatialDataError

DEFAULT_EDGE_BUDGET_GB = 6.0
# Bytes per directed edge budgeted for building and using a graph: the result is 8 (int32 index +
# float32 distance), transient per-section arrays (pairs, int64 keys, float64 distances) add a
# section's worth, and a torch int64 edge_index later takes 16. The 4.3M-cell atlas build peaked
# at ~21 bytes per edge above its coordinates (benchmarks/views.md); 48 leaves room for the rest.
BUILD_BYTES_PER_EDGE = 48


@dataclass
class CellGraph:
    """Edges of a spatial graph in CSR form.

    indptr (n_cells + 1,) int64, indices (n_edges,) int32: CSR structure over all cells of the
    slide (global cell indices), each row's neighbours sorted by index; distances (n_edges,)
    float32 distance of each edge (same order as indices, coordinates' units);
    kind / params: how it was built (for the UI and the config).
    """

    indptr: np.ndarray
    indices: np.ndarray
    distances: np.ndarray
    kind: str
    params: dict

    @property
    def n_nodes(self) -> int:
        return int(self.indptr.shape[0] - 1)

    @property
    def n_edges(self) -> int:
        return int(self.indices.shape[0])

    def degrees(self) -> np.ndarray:
        return np.diff(self.indptr)

    def to_scipy(self, weights: str = "ones") -> sp.csr_matrix:
        """The adjacency as a CSR matrix; weights 'ones' or 'distance'."""
        if weights not in ("ones", "distance"):
            raise ValueError(f"weights must be 'ones' or 'distance', got {weights!r}")
        data = np.ones(self.n_edges, dtype=np.float32) if weights == "ones" else self.distances
        indptr = self.indptr
        if self.indices.dtype == np.int32 and self.n_edges < np.iinfo(np.int32).max:
            indptr = indptr.astype(np.int32)  # same index dtype: scipy keeps `indices` without a copy
        A = sp.csr_matrix((data, self.indices, indptr), shape=(self.n_nodes, self.n_nodes))
        A.has_sorted_indices = True
        return A

    def edge_index(self):
        """torch (2, E) int64 in PyG's convention: row 0 = source (neighbour), row 1 = target (centre)."""
        import torch

        out = torch.empty((2, self.n_edges), dtype=torch.int64)
        out[0] = torch.from_numpy(self.indices)
        out[1] = torch.repeat_interleave(torch.arange(self.n_nodes), torch.from_numpy(self.degrees()))
        return out

    def summary(self) -> dict:
        deg = self.degrees()
        return {
            "kind": self.kind,
            **self.params,
            "n_cells": self.n_nodes,
            "n_edges": self.n_edges,
            "mean_degree": float(deg.mean()) if deg.size else 0.0,
            "median_degree": float(np.median(deg)) if deg.size else 0.0,
            "max_degree": int(deg.max()) if deg.size else 0,
            "isolated_cells": int((deg == 0).sum()),
            "isolated_fraction": float((deg == 0).mean()) if deg.size else 0.0,
            "mean_distance": float(self.distances.mean()) if self.n_edges else 0.0,
        }

    def subgraph(self, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Induced subgraph on `nodes`: (edge_index (2, E) local int64, distances)."""
        nodes = np.asarray(nodes, dtype=np.int64)
        A = self.to_scipy("distance")
        # +1 so zero-distance edges (self loops, duplicated coordinates) survive the slicing.
        A = sp.csr_matrix((A.data + 1.0, A.indices, A.indptr), shape=A.shape)
        A = A[nodes][:, nodes].tocoo()
        return np.stack([A.col.astype(np.int64), A.row.astype(np.int64)]), (A.data - 1.0).astype(np.float32)


def _section_groups(section: np.ndarray | None, n: int) -> list[np.ndarray]:
    """Cell indices of each section (each sorted ascending)."""
    if section is None:
        return [np.arange(n)]
    section = np.asarray(section)
    if section.shape != (n,):
        raise SpatialDataError(f"section must have one entry per cell ({n}), got shape {section.shape}.")
    order = np.argsort(section, kind="stable")
    bounds = np.flatnonzero(np.diff(section[order])) + 1
    return np.split(order, bounds)


def _check_coords(coords) -> np.ndarray:
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise SpatialDataError(f"coords must be (n_cells, 2) x, y, got shape {coords.shape}.")
    if not np.isfinite(coords).all():
        raise SpatialDataError("coords hold NaN or infinite values; drop those cells first.")
    return coords


def estimate_radius_edges(coords: np.ndarray, radius: float, section: np.ndarray | None = None,
                          n_probe: int = 4000, seed: int = 0, *, n_sample: int = 50000) -> float:
    """Estimated number of directed edges of the radius graph (no self loops), from a random probe.

    For each section, counts the neighbours within `radius` of up to `n_probe` random cells
    among a random sample of up to `n_sample` cells of the section, and scales by the sampling
    fraction and the section's size (unbiased; cheap even for millions of cells).
    """
    coords = np.asarray(coords, dtype=np.float64)
    rng = np.random.default_rng(seed)
    total = 0.0
    for idx in _section_groups(section, len(coords)):
        n_s = len(idx)
        sample = idx if n_s <= n_sample else idx[rng.choice(n_s, size=n_sample, replace=False)]
        tree = cKDTree(coords[sample], balanced_tree=False)
        probe = idx[rng.choice(n_s, size=min(n_probe, n_s), replace=False)]
        counts = tree.query_ball_point(coords[probe], r=radius, return_length=True, workers=-1)
        # A probe cell is in the sample with probability len(sample) / n_s: remove its self-count.
        others = np.mean(counts) - len(sample) / n_s
        total += max(others, 0.0) * (n_s - 1) / max(len(sample) - 1, 1) * n_s
    return max(total, 0.0)


def check_edge_budget(n_edges: float, radius: float, budget_gb: float, what: str = "radius") -> None:
    """Refuse (SpatialDataError) when `n_edges` would need more than `budget_gb` to build, naming the
    largest `what` that would fit (edges grow with the square of a radius in 2-D)."""
    need_gb = n_edges * BUILD_BYTES_PER_EDGE / 1e9
    if need_gb > budget_gb:
        fit = radius * np.sqrt(budget_gb / need_gb)
        raise SpatialDataError(
            f"{what}={radius:g} would give about {n_edges:,.0f} edges (~{need_gb:.1f} GB to build), over the "
            f"memory budget of {budget_gb:g} GB; use {what} <= {fit:.3g} (same units as the coordinates), "
            "or raise the budget (max_memory_gb)."
        )


class _Assembler:
    """Collects section-local CSR pieces and places them into one global CSR."""

    def __init__(self, coords: np.ndarray):
        self.coords = coords
        self.n = len(coords)
        self.pieces = []  # (global ids, local degrees, local cols int32, distances float32)

    def add_keys(self, idx: np.ndarray, keys: np.ndarray) -> None:
        self.pieces.append(self.piece(idx, keys))

    def piece(self, idx: np.ndarray, keys: np.ndarray):
        """Section piece from `keys` = row * n_s + col (local ids), sorted and unique."""
        n_s = len(idx)
        rows = keys // n_s
        cols = (keys - rows * n_s).astype(np.int32)
        deg = np.bincount(rows, minlength=n_s)
        del keys
        pts = self.coords[idx]
        diff = pts[rows] - pts[cols]
        dist = np.sqrt(np.einsum("ij,ij->i", diff, diff)).astype(np.float32)
        return idx, deg, cols, dist

    def finish(self, kind: str, params: dict) -> CellGraph:
        deg = np.zeros(self.n, dtype=np.int64)
        for idx, d, _, _ in self.pieces:
            deg[idx] = d
        indptr = np.zeros(self.n + 1, dtype=np.int64)
        np.cumsum(deg, out=indptr[1:])
        n_edges = int(indptr[-1])
        index_dtype = np.int32 if self.n < np.iinfo(np.int32).max else np.int64
        indices = np.empty(n_edges, dtype=index_dtype)
        distances = np.empty(n_edges, dtype=np.float32)
        while self.pieces:
            idx, d, cols, dist = self.pieces.pop()
            if len(cols) == 0:
                continue
            local_start = np.cumsum(d) - d
            pos = np.repeat(indptr[idx] - local_start, d) + np.arange(len(cols), dtype=np.int64)
            indices[pos] = idx[cols]
            distances[pos] = dist
        return CellGraph(indptr, indices, distances, kind, params)


def _map_sections(fn, groups, n_jobs: int | None):
    """[fn(g) for g in groups], on a thread pool when there are several sections and cores."""
    n_jobs = (os.cpu_count() or 1) if n_jobs is None or n_jobs < 1 else int(n_jobs)
    if n_jobs == 1 or len(groups) == 1:
        return [fn(g) for g in groups]
    with ThreadPoolExecutor(max_workers=min(n_jobs, len(groups))) as pool:
        return list(pool.map(fn, groups))


def _pair_keys(i: np.ndarray, j: np.ndarray, n_s: int, self_loops: bool, symmetric: bool) -> np.ndarray:
    """Sorted unique int64 keys row * n_s + col of the edges (i -> j) (and (j -> i) if symmetric)."""
    i = i.astype(np.int64, copy=False)
    j = j.astype(np.int64, copy=False)
    parts = [i * n_s + j]
    if symmetric:
        parts.append(j * n_s + i)
    if self_loops:
        a = np.arange(n_s, dtype=np.int64)
        parts.append(a * n_s + a)
    keys = np.concatenate(parts) if len(parts) > 1 else parts[0]
    keys.sort()
    if len(keys) > 1:
        dup = np.zeros(len(keys), dtype=bool)
        np.equal(keys[1:], keys[:-1], out=dup[1:])
        if dup.any():
            keys = keys[~dup]
    return keys


def radius_graph(coords: np.ndarray, radius: float, section: np.ndarray | None = None, *,
                 self_loops: bool = False, max_memory_gb: float = DEFAULT_EDGE_BUDGET_GB,
                 n_jobs: int | None = None) -> CellGraph:
    """All pairs of cells of the same section closer than `radius` (coordinates' units), symmetric.

    Estimates the edge count first and refuses (SpatialDataError, naming a radius that would fit)
    when building would need more than `max_memory_gb`. Sections are processed by `n_jobs` threads
    (default: all cores; cKDTree and numpy release the GIL).
    """
    coords = _check_coords(coords)
    if not (np.isfinite(radius) and radius > 0):
        raise SpatialDataError(f"radius must be a positive number (coordinates' units), got {radius}.")
    groups = _section_groups(section, len(coords))
    check_edge_budget(estimate_radius_edges(coords, radius, section), radius, max_memory_gb)
    out = _Assembler(coords)

    def one_section(idx):
        tree = cKDTree(coords[idx], balanced_tree=False)
        pairs = tree.query_pairs(r=radius, output_type="ndarray")  # i < j, each pair once
        del tree
        keys = _pair_keys(pairs[:, 0], pairs[:, 1], len(idx), self_loops, symmetric=True)
        del pairs
        return out.piece(idx, keys)

    out.pieces = _map_sections(one_section, groups, n_jobs)
    return out.finish("radius", {"radius": float(radius), "self_loops": bool(self_loops)})


def knn_graph(coords: np.ndarray, k: int, section: np.ndarray | None = None, *, max_distance: float | None = None,
              symmetric: bool = True, self_loops: bool = False, kind: str = "knn",
              max_memory_gb: float = DEFAULT_EDGE_BUDGET_GB) -> CellGraph:
    """Each cell's k nearest cells in its section (ties broken by the tree), optionally only those
    closer than `max_distance`; symmetrised (union: i~j when either lists the other) unless
    ``symmetric=False`` (then row i holds exactly i's own neighbours)."""
    coords = _check_coords(coords)
    if int(k) != k or k < 1:
        raise SpatialDataError(f"k must be an integer >= 1, got {k}.")
    k = int(k)
    if max_distance is not None and not max_distance > 0:
        raise SpatialDataError(f"max_distance must be positive (coordinates' units), got {max_distance}.")
    n_edges = len(coords) * k * (2 if symmetric else 1)
    check_edge_budget(n_edges, float(k), max_memory_gb, what="k")
    out = _Assembler(coords)
    ub = np.inf if max_distance is None else float(max_distance) * (1 + 1e-12)
    for idx in _section_groups(section, len(coords)):
        n_s = len(idx)
        kk = min(k + 1, n_s)
        if kk < 2:
            keys = _pair_keys(np.zeros(0, np.int64), np.zeros(0, np.int64), n_s, self_loops, symmetric)
            out.add_keys(idx, keys)
            continue
        pts = coords[idx]
        dist, nb = cKDTree(pts).query(pts, k=kk, distance_upper_bound=ub, workers=-1)
        centre = np.broadcast_to(np.arange(n_s)[:, None], nb.shape)
        ok = (nb < n_s) & (nb != centre)
        # A cell's own entry is normally its first; with duplicated coordinates it may be
        # displaced, so drop self and keep at most k others per row.
        rank = np.cumsum(ok, axis=1)
        ok &= rank <= k
        keys = _pair_keys(centre[ok], nb[ok], n_s, self_loops, symmetric)
        del dist, nb, centre, ok
        out.add_keys(idx, keys)
    params = {"k": k, "self_loops": bool(self_loops)}
    if max_distance is not None:
        params["max_distance"] = float(max_distance)
    if not symmetric:
        params["directed"] = True
    return out.finish(kind, params)


def snn_graph(coords: np.ndarray, k: int = 50, radius: float | None = None,
              section: np.ndarray | None = None, *, self_loops: bool = False,
              max_memory_gb: float = DEFAULT_EDGE_BUDGET_GB) -> CellGraph:
    """Spotscape's spatial nearest-neighbour graph: each cell's k nearest cells of its section, kept
    only when closer than `radius` (coordinates' units; None = no cutoff), symmetrised."""
    return knn_graph(coords, k, section, max_distance=radius, symmetric=True, self_loops=self_loops,
                     kind="snn", max_memory_gb=max_memory_gb)
