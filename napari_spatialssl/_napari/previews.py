"""Geometry for the widget's previews, computed from the core's views (no Qt, no napari).

The core builds the views (graphs, ego-nets, patches) in the slide's own coordinates (x, y per
section). The widget draws them over a Points layer whose positions may be flipped to napari's
(row, col) and tiled by section. Rather than re-deriving the layer's layout, each section's map
from slide coordinates to layer positions is *fitted* from the cells themselves (a scale and an
offset per section, least squares), so any layout that is a per-section translation and
uniform scaling of (y, x) is honoured. Everything here is vectorised over cells and edges.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..graphs.egonet import EgoNetSampler
from ..graphs.neighbors import CellGraph


@dataclass
class SectionTransform:
    """positions(row, col) = scale * (y, x) + offset, one (scale, offset) per section code."""

    scale: np.ndarray  # (n_sections,)
    offset: np.ndarray  # (n_sections, 2) row, col

    def apply(self, xy: np.ndarray, section: np.ndarray | int) -> np.ndarray:
        """(n, 2) slide (x, y) -> (n, 2) layer (row, col) for cells/points of the given section(s)."""
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        s = np.broadcast_to(np.asarray(section), (len(xy),))
        return self.scale[s, None] * xy[:, ::-1] + self.offset[s]

    def length(self, value: float, section: int = 0) -> float:
        """A length in slide units (e.g. a patch side) in layer units."""
        return float(value * self.scale[section])


def fit_section_transform(coords_xy: np.ndarray, section: np.ndarray, positions_rc: np.ndarray,
                          n_sections: int | None = None) -> SectionTransform:
    """Fit each section's uniform scale + offset from slide (x, y) to layer (row, col) positions."""
    coords_xy = np.asarray(coords_xy, dtype=np.float64)
    positions_rc = np.asarray(positions_rc, dtype=np.float64)[:, -2:]
    section = np.asarray(section, dtype=np.int64)
    n_sec = int(n_sections if n_sections is not None else section.max() + 1)
    yx = coords_xy[:, ::-1]
    counts = np.bincount(section, minlength=n_sec).astype(np.float64)
    safe = np.maximum(counts, 1)[:, None]
    mean_src = np.stack([np.bincount(section, yx[:, j], n_sec) for j in range(2)], 1) / safe
    mean_dst = np.stack([np.bincount(section, positions_rc[:, j], n_sec) for j in range(2)], 1) / safe
    src_c = yx - mean_src[section]
    dst_c = positions_rc - mean_dst[section]
    num = np.bincount(section, (src_c * dst_c).sum(1), n_sec)
    den = np.bincount(section, (src_c * src_c).sum(1), n_sec)
    scale = np.divide(num, den, out=np.ones(n_sec), where=den > 0)
    offset = mean_dst - scale[:, None] * mean_src
    return SectionTransform(scale, offset)


def neighbours_of(graph: CellGraph, cell: int) -> np.ndarray:
    """Global indices of the graph neighbours of `cell`."""
    return graph.indices[graph.indptr[cell]:graph.indptr[cell + 1]].astype(np.int64)


def edges_of(graph: CellGraph, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All (centre, neighbour) pairs whose centre is in `cells` (vectorised CSR slicing)."""
    cells = np.asarray(cells, dtype=np.int64)
    starts, ends = graph.indptr[cells], graph.indptr[cells + 1]
    deg = ends - starts
    centre = np.repeat(cells, deg)
    pos = np.repeat(starts - np.cumsum(np.r_[0, deg[:-1]]), deg) + np.arange(deg.sum())
    return centre, graph.indices[pos].astype(np.int64)


def sample_edges(graph: CellGraph, n_edges: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A uniform sample of at most `n_edges` undirected edges (each drawn once, row < col)."""
    target = np.repeat(np.arange(graph.n_nodes, dtype=np.int64), graph.degrees())
    upper = np.flatnonzero(target < graph.indices)
    pick = upper if len(upper) <= n_edges else rng.choice(upper, size=n_edges, replace=False)
    return target[pick], graph.indices[pick].astype(np.int64)


def edge_vectors(positions: np.ndarray, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """napari Vectors data (E, 2, D): each edge as [start position, displacement]."""
    positions = np.asarray(positions, dtype=np.float64)
    start = positions[src]
    return np.stack([start, positions[dst] - start], axis=1)


def egonet_members(graph: CellGraph, cell: int, num_hops: int) -> np.ndarray:
    """Global indices of the k-hop ego-net of `cell` (the core's sampler; sorted, includes the cell)."""
    return EgoNetSampler(graph, num_hops).sample(np.array([cell])).node_set(0)


def nearest_point(positions: np.ndarray, where: np.ndarray) -> int:
    """Index of the point nearest to `where` (layer coordinates; last two axes)."""
    positions = np.asarray(positions, dtype=np.float64)[:, -2:]
    d = ((positions - np.asarray(where, dtype=np.float64)[-2:]) ** 2).sum(1)
    return int(np.argmin(d))


def rectangles(origins_xy: np.ndarray, size_xy: tuple[float, float], section: np.ndarray | int,
               transform: SectionTransform) -> np.ndarray:
    """napari Shapes rectangles (n, 4, 2) (row, col corners) for boxes given by (x, y) lower corners."""
    origins_xy = np.asarray(origins_xy, dtype=np.float64).reshape(-1, 2)
    w, h = size_xy
    corners = np.stack([origins_xy, origins_xy + [w, 0], origins_xy + [w, h], origins_xy + [0, h]], 1)
    sec = np.broadcast_to(np.asarray(section), (len(origins_xy),))
    flat = transform.apply(corners.reshape(-1, 2), np.repeat(sec, 4))
    return flat.reshape(-1, 4, 2)
