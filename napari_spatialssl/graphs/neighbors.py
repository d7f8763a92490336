"""Spatial neighbour graphs, built per section with scipy's cKDTree, never across sections.

A :class:`CellGraph` stores its edges in CSR form (row = centre cell, columns = its neighbours)
with the distance of every edge, in the coordinates' units. Graphs are symmetric unless stated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.spatial import cKDTree

from ..data.io import SpatialDataError

DEFAULT_EDGE_BUDGET_GB = 6.0
# Bytes per stored edge while building: the pair arrays (2 x int64), distances (float64),
# the symmetrised copy and the CSR result (int32 index + float32 distance).
BUILD_BYTES_PER_EDGE = 48


@dataclass
class CellGraph:
    """Edges of a spatial graph in CSR form.

    indptr, indices: CSR structure over all cells of the slide (global cell indices);
    distances: float32 distance of each edge (same order as indices);
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
        data = np.ones(self.n_edges, dtype=np.float32) if weights == "ones" else self.distances
        return sp.csr_matrix((data, self.indices, self.indptr), shape=(self.n_nodes, self.n_nodes))

    def edge_index(self):
        """torch (2, E) int64 in PyG's convention: row 0 = source (neighbour), row 1 = target (centre)."""
        import torch

        target = np.repeat(np.arange(self.n_nodes, dtype=np.int64), self.degrees())
        return torch.from_numpy(np.stack([self.indices.astype(np.int64), target]))

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
        }

    def subgraph(self, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Induced subgraph on `nodes`: (edge_index (2, E) local int64, distances)."""
        A = self.to_scipy("distance")[nodes][:, nodes].tocoo()
        return np.stack([A.col.astype(np.int64), A.row.astype(np.int64)]), A.data.astype(np.float32)


def _section_groups(section: np.ndarray | None, n: int) -> list[np.ndarray]:
    if section is None:
        return [np.arange(n)]
    order = np.argsort(section, kind="stable")
    bounds = np.flatnonzero(np.diff(section[order])) + 1
    return np.split(order, bounds)


def estimate_radius_edges(coords: np.ndarray, radius: float, section: np.ndarray | None = None,
                          n_probe: int = 4000, seed: int = 0) -> float:
    """Estimated number of directed edges of the radius graph (no self loops), from a random probe.

    Counts neighbours within `radius` of `n_probe` random cells in their own section, and scales.
    """
    rng = np.random.default_rng(seed)
    total = 0.0
    for idx in _section_groups(section, len(coords)):
        pts = coords[idx]
        tree = cKDTree(pts)
        probe = pts[rng.choice(len(pts), size=min(n_probe, len(pts)), replace=False)]
        counts = tree.query_ball_point(probe, r=radius, return_length=True, workers=-1)
        total += (np.mean(counts) - 1.0) * len(pts)
    return max(total, 0.0)


def check_edge_budget(n_edges: float, radius: float, budget_gb: float, what: str = "radius") -> None:
    need_gb = n_edges * BUILD_BYTES_PER_EDGE / 1e9
    if need_gb > budget_gb:
        fit = radius * np.sqrt(budget_gb / need_gb)
        raise SpatialDataError(
            f"{what}={radius:g} would give about {n_edges:,.0f} edges (~{need_gb:.1f} GB to build), over the "
            f"memory budget of {budget_gb:g} GB; use {what} <= {fit:.3g} (same units as the coordinates), "
            "or raise the budget (max_memory_gb)."
        )


def radius_graph(coords: np.ndarray, radius: float, section: np.ndarray | None = None, *,
                 self_loops: bool = False, max_memory_gb: float = DEFAULT_EDGE_BUDGET_GB) -> CellGraph:
    """All pairs of cells of the same section closer than `radius` (coordinates' units)."""
    coords = np.asarray(coords, dtype=np.float64)
    if not radius > 0:
        raise SpatialDataError(f"radius must be positive, got {radius}.")
    check_edge_budget(estimate_radius_edges(coords, radius, section), radius, max_memory_gb)
    rows, cols = [], []
    for idx in _section_groups(section, len(coords)):
        tree = cKDTree(coords[idx])
        pairs = tree.query_pairs(r=radius, output_type="ndarray")
        if len(pairs):
            rows.append(idx[pairs[:, 0]])
            cols.append(idx[pairs[:, 1]])
    return _symmetric_graph(coords, rows, cols, "radius", {"radius": float(radius)}, self_loops)


def knn_graph(coords: np.ndarray, k: int, section: np.ndarray | None = None, *, max_distance: float | None = None,
              symmetric: bool = True, self_loops: bool = False, kind: str = "knn") -> CellGraph:
    """Each cell's k nearest cells in its section, optionally cut at `max_distance`, symmetrised."""
    coords = np.asarray(coords, dtype=np.float64)
    if k < 1:
        raise SpatialDataError(f"k must be >= 1, got {k}.")
    rows, cols = [], []
    for idx in _section_groups(section, len(coords)):
        kk = min(k + 1, len(idx))
        if kk < 2:
            continue
        tree = cKDTree(coords[idx])
        ub = np.inf if max_distance is None else max_distance
        dist, nb = tree.query(coords[idx], k=kk, distance_upper_bound=ub, workers=-1)
        centre = np.repeat(np.arange(len(idx)), kk).reshape(len(idx), kk)
        ok = np.isfinite(dist) & (nb != centre) & (nb < len(idx))
        rows.append(idx[centre[ok]])
        cols.append(idx[nb[ok]])
    params = {"k": int(k)}
    if max_distance is not None:
        params["max_distance"] = float(max_distance)
    if not symmetric:
        return _directed_graph(coords, rows, cols, kind, params, self_loops)
    return _symmetric_graph(coords, rows, cols, kind, params, self_loops)


def snn_graph(coords: np.ndarray, k: int = 50, radius: float | None = None,
              section: np.ndarray | None = None, *, self_loops: bool = False) -> CellGraph:
    """Spotscape's spatial nearest-neighbour graph: k nearest cells, then a radius cutoff."""
    g = knn_graph(coords, k, section, max_distance=radius, symmetric=True, self_loops=self_loops, kind="snn")
    return g


def _finish(coords, rows, cols, kind, params, self_loops) -> CellGraph:
    n = len(coords)
    r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    if self_loops:
        r = np.concatenate([r, np.arange(n)])
        c = np.concatenate([c, np.arange(n)])
    d = np.sqrt(((coords[r] - coords[c]) ** 2).sum(1)).astype(np.float32)
    index_dtype = np.int32 if n < 2**31 - 1 else np.int64
    A = sp.csr_matrix((d + 1.0, (r.astype(index_dtype), c.astype(index_dtype))), shape=(n, n))
    A.sum_duplicates()
    A.sort_indices()
    # +1 above keeps zero-distance edges (duplicated coordinates, self loops) from being dropped.
    return CellGraph(A.indptr.astype(np.int64), A.indices, (A.data - 1.0).astype(np.float32),
                     kind, {**params, "self_loops": bool(self_loops)})


def _symmetric_graph(coords, rows, cols, kind, params, self_loops) -> CellGraph:
    both_r = [np.concatenate([a, b]) for a, b in zip(rows, cols)]
    both_c = [np.concatenate([b, a]) for a, b in zip(rows, cols)]
    g = _finish(coords, both_r, both_c, kind, params, self_loops)
    # Duplicates (an edge found from both ends) were summed: recompute exact distances.
    target = np.repeat(np.arange(g.n_nodes), g.degrees())
    g.distances = np.sqrt(((coords[target] - coords[g.indices]) ** 2).sum(1)).astype(np.float32)
    return g


def _directed_graph(coords, rows, cols, kind, params, self_loops) -> CellGraph:
    return _finish(coords, rows, cols, kind, {**params, "directed": True}, self_loops)
