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


def box_edges(boxes: np.ndarray) -> np.ndarray:
    """The outline of (n, 4, 2) boxes as napari vectors (4n, 2, 2): each side's start and its direction."""
    boxes = np.asarray(boxes, np.float64)
    nxt = np.roll(boxes, -1, axis=1)
    return np.stack([boxes, nxt - boxes], axis=2).reshape(-1, 2, 2)


# ------------------------------------------------------------------------------------ preview layers
# Built off the main thread (the Session's side jobs); layer_updates only writes them.

PREVIEW_EDGE_SAMPLE = 4000  # edges drawn in the "sample of edges" preview


def _vectors_spec(key: str, name: str, vectors: np.ndarray, color: str, width: float):
    from .displays import LayerSpec

    return LayerSpec(key, "vectors", name, vectors, {"edge_color": color, "edge_width": float(width),
                                                     "vector_style": "line"}, None,
                     {"spatialssl_role": "preview"}, "preview")


def graph_preview(slide, graph, report, cell: int | None = None, hops: int = 1):
    """A sample of the graph's edges; with `cell`, its edges and k-hop ego-net highlighted."""
    from .displays import Display, points_spec

    pos = slide.positions
    size = slide.point_size
    specs = []
    src, dst = sample_edges(graph, PREVIEW_EDGE_SAMPLE, np.random.default_rng(0))
    specs.append(_vectors_spec("preview:edges", f"view: {len(src):,} of {graph.n_edges // 2:,} edges",
                               edge_vectors(pos, src, dst), "#f0f0f0", size * 0.15))
    text = f"Showing {len(src):,} of {graph.n_edges // 2:,} edges; click a cell to see its {hops}-hop ego-net."
    if cell is not None:
        members = egonet_members(graph, int(cell), hops)
        s2, d2 = edges_of(graph, members)
        specs.append(_vectors_spec("preview:ego-edges", f"view: edges of cell {cell}'s {hops}-hop ego-net",
                                   edge_vectors(pos, s2, d2), "#ffd84d", size * 0.25))
        rgba = np.tile(np.array([[0.2, 0.9, 1.0, 1.0]], np.float32), (len(members), 1))
        rgba[members == cell] = (1.0, 0.2, 0.6, 1.0)
        spec = points_spec("preview:ego-net", f"view: {hops}-hop ego-net of cell {cell} ({len(members):,} cells)",
                           pos[members], rgba, size * 1.6, members, role="preview")
        specs.append(spec)
        deg = int(graph.indptr[cell + 1] - graph.indptr[cell])
        text = f"Cell {cell}: {deg} neighbours; its {hops}-hop ego-net has {len(members):,} cells (cyan, the cell pink)."
    return Display(specs, top=specs[-1].key, hide_roles=("preview", "compare", "region"), text=text, slide="dim")


def patch_preview(slide, geometry, lattices: dict, bin_size: float, shape: tuple[int, int], n_channels: int,
                  seed: int, mask_cfg, token_bins: int, gene_names, cell: int | None = None):
    """The tiled patch grid of every section and one patch (the one around `cell`, else the most
    occupied of section 0) as its first three gene channels, with the pretext mask drawn over it."""
    from ..graphs.lattice import centered_origins, extract_patches, select_channels, tiled_origins
    from ..masking import random_cells, regions
    from .displays import Display, LayerSpec

    h, w = shape
    tr = fit_section_transform(geometry.coords, geometry.section, slide.positions, geometry.n_sections)
    boxes = []
    for s, lat in lattices.items():
        org = tiled_origins(lat, h, w)
        xy = np.stack([lat.origin[0] + org[:, 1] * bin_size, lat.origin[1] + org[:, 0] * bin_size], 1)
        boxes.append(rectangles(xy, (w * bin_size, h * bin_size), s, tr))
    # The grid as line segments (4 per patch) in one Vectors layer: napari triangulates every Shapes
    # rectangle in Python on the main thread (~2 ms each), a Vectors layer takes them as one array.
    specs = [_vectors_spec("preview:patch-grid", f"view: patch grid ({h} x {w} bins of {bin_size:.3g})",
                           box_edges(np.concatenate(boxes)), "#f0f0f0", tr.length(bin_size * 0.15))]
    section = int(geometry.section[cell]) if cell is not None else 0
    lat = lattices[section]
    if cell is not None:
        origin = centered_origins(lat, np.array([cell]), h, w)
    else:
        org = tiled_origins(lat, h, w)
        occ = [lat.occupancy[r:r + h, c:c + w].mean() for r, c in org[:64]]
        origin = org[[int(np.argmax(occ))]]
    rng = np.random.default_rng(seed)
    genes = select_channels(lat, origin, h, w, n_channels, rng)
    batch = extract_patches(lat, origin, h, w, genes)
    names = [str(gene_names[g]) for g in batch.genes[0]]
    x0, y0 = lat.origin[0] + origin[0, 1] * bin_size, lat.origin[1] + origin[0, 0] * bin_size
    corner = tr.apply([[x0 + bin_size / 2, y0 + bin_size / 2]], section)[0]
    scale = tr.length(bin_size, section)
    for c, cmap in zip(range(min(3, len(names))), ("magenta", "green", "cyan")):
        img = batch.values[0, :, :, c]
        specs.append(LayerSpec(f"preview:channel{c}", "image", f"view: patch channel {c + 1}: {names[c]}", img,
                               {"colormap": cmap, "blending": "additive", "translate": tuple(corner),
                                "scale": (scale, scale), "contrast_limits": (0.0, float(max(img.max(), 1e-6)))},
                               None, {"spatialssl_role": "preview"}, "preview"))
    t = max(int(token_bins), 1)  # the model masks tokens (t x t bins), and so does the preview
    if mask_cfg.strategy == "regions":
        side = min(int(mask_cfg.region_size), h // t, w // t)
        tokens = regions((h // t, w // t), side, int(mask_cfg.n_regions), rng)
        what = f"{mask_cfg.n_regions} region(s) of {side} x {side} tokens ({t} x {t} bins each)"
    else:
        tokens = random_cells((h // t) * (w // t), float(mask_cfg.ratio), rng).reshape(h // t, w // t)
        what = f"{int(tokens.sum())} of {tokens.size} tokens ({t} x {t} bins each)"
    mask = np.kron(tokens, np.ones((t, t), dtype=bool))
    # The hidden bins as one translucent red image over the patch (same grid as the channel images).
    overlay = np.zeros(mask.shape + (4,), np.float32)
    overlay[mask] = (1.0, 0.2, 0.2, 0.45)
    specs.append(LayerSpec("preview:patch-mask", "image", f"mask preview: {what} hidden (red)", overlay,
                           {"rgb": True, "translate": tuple(corner), "scale": (scale, scale)}, None,
                           {"spatialssl_role": "preview"}, "preview"))
    text = (f"Patch at bin (row {origin[0, 0]}, col {origin[0, 1]}) of section {geometry.section_names[section]}: "
            f"{len(names)} channels by variance-weighted sampling ({', '.join(names[:6])}"
            f"{'…' if len(names) > 6 else ''}; the first three drawn magenta / green / cyan). Masked: {what}, a new "
            "draw for every patch and step. Click a cell to see the patch around it.")
    return Display(specs, top=specs[-1].key, hide_roles=("preview", "compare", "region"), text=text, slide="dim")


def cell_mask_preview(slide, mask: np.ndarray, strategy: str):
    """The cells a per-cell mask hides (red), over the tissue."""
    from .displays import Display, points_spec

    idx = np.flatnonzero(mask)
    rgba = np.tile(np.array([[1.0, 0.25, 0.25, 0.95]], np.float32), (len(idx), 1))
    spec = points_spec("preview:mask-cells", f"mask preview: {len(idx):,} of {len(mask):,} cells hidden ({strategy})",
                       slide.positions[idx], rgba, slide.point_size * 1.3, idx, role="preview")
    text = (f"'{strategy}' hides {len(idx):,} of {len(mask):,} cells ({mask.mean():.1%}), in red. Training draws a "
            "new mask every step; this is the first draw with the training seed.")
    return Display([spec], top=spec.key, hide_roles=("preview", "compare", "region"), text=text, slide="dim")


def view_mask_preview(slide, graph, edge_drop: float, feature_mask: float, seed: int, gene_names):
    """Spotscape's augmented view: the edges it drops (red) among a sample of the kept ones, and
    the genes it hides from every spot."""
    from .displays import Display

    rng = np.random.default_rng(seed)
    src, dst = sample_edges(graph, PREVIEW_EDGE_SAMPLE, rng)
    drop = rng.random(len(src)) < edge_drop
    pos, size = slide.positions, slide.point_size
    hidden = np.flatnonzero(rng.random(len(gene_names)) < feature_mask)
    specs = [_vectors_spec("preview:mask-kept", "mask preview: kept edges (one augmented view)",
                           edge_vectors(pos, src[~drop], dst[~drop]), "#d0d0d0", size * 0.15),
             _vectors_spec("preview:mask-dropped", f"mask preview: dropped edges ({edge_drop:.0%})",
                           edge_vectors(pos, src[drop], dst[drop]), "#ff3030", size * 0.3)]
    names = [str(gene_names[j]) for j in hidden[:8]]
    text = (f"Each step makes two views; in each, {edge_drop:.0%} of edges are dropped (red) and {feature_mask:.0%} "
            f"of genes are hidden from every spot (this draw: {len(hidden)} genes, e.g. {', '.join(names)}).")
    return Display(specs, top=specs[-1].key, hide_roles=("preview", "compare", "region"), text=text, slide="dim")
