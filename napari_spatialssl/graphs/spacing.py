"""The typical spacing of cells on a slide: one estimate, used for every distance default.

The radius of gnn-mask's graph, the cut of spotscape's SNN graph, patch-mae's bin side and the
size of points in napari are all multiples of :func:`neighbour_distance`, the median distance
from a cell to its k-th nearest cell of the same section, so that every default follows the
slide's own unit (micrometres, pixels, Visium array units).
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from ..data.io import SpatialDataError


def _block_sample(points: np.ndarray, max_tree: int, rng: np.random.Generator) -> np.ndarray:
    """The cells of random square blocks (about 5,000 cells each, about `max_tree` in all): inside a
    block every cell keeps its true neighbours, unlike a random thinning, which stretches distances."""
    n = len(points)
    lo = points.min(axis=0)
    span = np.maximum(np.ptp(points, axis=0), 1e-12)
    side = float(np.sqrt(span[0] * span[1] / (n / 5_000)))
    ij = np.floor((points - lo) / side).astype(np.int64)
    _, block, counts = np.unique(ij[:, 0] * (ij[:, 1].max() + 1) + ij[:, 1], return_inverse=True,
                                 return_counts=True)
    order = rng.permutation(len(counts))
    n_blocks = int(np.searchsorted(np.cumsum(counts[order]), max_tree)) + 1
    keep = np.zeros(len(counts), dtype=bool)
    keep[order[:n_blocks]] = True
    return points[keep[block.ravel()]]


def section_neighbour_distances(points: np.ndarray, k: int = 1, *, max_queries: int = 20_000,
                                max_tree: int = 250_000, seed: int = 0) -> np.ndarray:
    """Distances from (up to `max_queries` sampled) cells of one section to their k-th nearest
    other cell, zero distances (duplicated positions) dropped."""
    points = np.asarray(points, dtype=np.float64)
    rng = np.random.default_rng(seed)
    if len(points) > max_tree:
        points = _block_sample(points, max_tree, rng)
    n = len(points)
    if n < 2:
        return np.zeros(0)
    kk = min(k + 1, n)
    query = points if n <= max_queries else points[rng.choice(n, max_queries, replace=False)]
    dist, _ = cKDTree(points).query(query, k=kk)
    d = dist[:, -1] if dist.ndim > 1 else dist
    return d[d > 0]


def neighbour_distance(coords: np.ndarray, section: np.ndarray | None = None, k: int = 1, *,
                       max_queries: int = 20_000, max_tree: int = 250_000, seed: int = 0) -> float:
    """Median distance from a cell to its `k`-th nearest cell of the same section (median per
    section, then the median over sections), in the coordinates' units.

    Up to `max_queries` cells per section are queried; sections above `max_tree` cells use the
    cells of random blocks (see :func:`_block_sample`), which keeps it under a second at millions
    of cells. Raises SpatialDataError when no section has two distinct positions."""
    coords = np.asarray(coords, dtype=np.float64)
    section = np.zeros(len(coords), np.int64) if section is None else np.asarray(section)
    meds = []
    for s in np.unique(section):
        d = section_neighbour_distances(coords[section == s], k, max_queries=max_queries, max_tree=max_tree,
                                        seed=seed)
        if d.size:
            meds.append(float(np.median(d)))
    if not meds:
        raise SpatialDataError("cannot measure the spacing of the cells: every section has fewer than 2 "
                               "distinct positions; check the coordinates.")
    return float(np.median(meds))
