"""Slides as images: a lattice of square bins per section, h x w patches, m gene channels per patch.

Geometry. A section is rasterised onto a grid of square bins of side ``bin_size`` in the
coordinates' units (micrometres for MERFISH): column = floor((x - x0) / bin_size) (x across),
row = floor((y - y0) / bin_size) (y down the rows, as in an image), so the aspect ratio of the
tissue is kept. ``origin = (x0, y0)`` is the physical position of the top-left corner of bin
(0, 0). Patch origins are (row, col) bin indices of a patch's top-left bin.

Aggregation. Several cells in one bin are aggregated by the **mean of the cells' preprocessed
expression** (the ``SpatialDataset.X`` values, e.g. normalised + log1p), so a bin's value does
not grow with the number of cells in it; the number of cells per bin is kept
(``Lattice.n_cells_per_bin``) and an occupancy mask records empty bins (value 0, occupancy False).

Memory. A dense H x W x G grid is too big for 550 genes at atlas scale, so a :class:`Lattice`
keeps only its occupied bins, as a CSR matrix ``bin_expr`` (n_occupied_bins, G) plus an (H, W)
int32 table ``bin_rows`` that points each bin to its row of ``bin_expr`` (-1 = empty). Patches
gather from these without building the dense grid.

Channels. Each patch gets m gene channels chosen by variance-weighted sampling without
replacement (weight = variance of the gene over the patch's occupied bins), drawn for all
patches at once with Efraimidis-Spirakis keys ``log(u) / w`` (the m largest keys per patch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ..data.io import SpatialDataError

AGGREGATIONS = ("mean", "sum")


# --------------------------------------------------------------------------- rasterisation


def _grid_geometry(coords: np.ndarray, bin_size: float, origin, shape):
    if not np.isfinite(bin_size) or bin_size <= 0:
        raise SpatialDataError(f"bin_size must be a positive number (coordinates' units), got {bin_size}.")
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] < 2:
        raise SpatialDataError(f"coords must be (n_cells, 2) x, y; got shape {coords.shape}.")
    if len(coords) == 0 and (origin is None or shape is None):
        raise SpatialDataError("cannot rasterise zero cells without an explicit origin and shape.")
    if origin is None:
        origin = coords[:, :2].min(axis=0)
    x0, y0 = float(origin[0]), float(origin[1])
    col = np.floor((coords[:, 0] - x0) / bin_size).astype(np.int64)
    row = np.floor((coords[:, 1] - y0) / bin_size).astype(np.int64)
    if shape is None:
        shape = (int(row.max()) + 1, int(col.max()) + 1)
    H, W = int(shape[0]), int(shape[1])
    if H < 1 or W < 1:
        raise SpatialDataError(f"lattice shape must be at least 1 x 1 bins, got {shape}.")
    inside = (row >= 0) & (row < H) & (col >= 0) & (col < W)
    return row, col, inside, (x0, y0), (H, W)


def _bin_operator(flat_bins: np.ndarray, n_bins: int, agg: str):
    """(occupied bins x cells) sparse operator that sums or averages cells into their bins,
    the occupied flat bin ids (sorted) and the number of cells in each."""
    occupied, inverse, counts = np.unique(flat_bins, return_inverse=True, return_counts=True)
    n = len(flat_bins)
    if agg == "mean":
        weight = (1.0 / counts)[inverse].astype(np.float32)
    else:
        weight = np.ones(n, dtype=np.float32)
    op = sp.csr_matrix((weight, (inverse.astype(np.int64), np.arange(n))), shape=(len(occupied), n))
    return op, occupied, counts


def rasterize(coords: np.ndarray, values: np.ndarray, bin_size: float, origin=None, shape=None,
              agg: str = "mean"):
    """Rasterise cells onto a dense grid of square bins.

    Parameters
    ----------
    coords : (n, 2) x, y in the data's units (micrometres).
    values : (n,) or (n, C) per-cell values (expression, labels as one-hot, embeddings...); a
        scipy sparse (n, C) matrix is accepted too (the grid itself is dense: keep C small).
    bin_size : side of a bin, in the coordinates' units.
    origin : (x0, y0) physical position of the top-left corner of bin (0, 0); default the
        coordinates' minimum.
    shape : (H, W) bins; default just large enough for every cell. Cells outside are dropped.
    agg : 'mean' (average of the cells in a bin) or 'sum'.

    Returns
    -------
    grid : (H, W, C) float32 (0 where no cell), occupancy : (H, W) bool,
    origin : (x0, y0), bin_size : float. Rows go down y, columns across x.
    """
    if agg not in AGGREGATIONS:
        raise SpatialDataError(f"agg must be one of {AGGREGATIONS}, got {agg!r}.")
    values = sp.csr_matrix(values) if sp.issparse(values) else np.asarray(values)
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2 or values.shape[0] != len(coords):
        raise SpatialDataError(
            f"values must be (n_cells,) or (n_cells, C) with n_cells = {len(coords)}, got {values.shape}."
        )
    row, col, inside, origin, (H, W) = _grid_geometry(coords, bin_size, origin, shape)
    flat = row[inside] * W + col[inside]
    vals = values[np.flatnonzero(inside)]
    grid = np.zeros((H * W, values.shape[1]), dtype=np.float32)
    occupancy = np.zeros(H * W, dtype=bool)
    if len(flat):
        op, occupied, _ = _bin_operator(flat, H * W, agg)
        agg_vals = op @ (vals.astype(np.float32) if sp.issparse(vals) else vals.astype(np.float32, copy=False))
        grid[occupied] = agg_vals.toarray() if sp.issparse(agg_vals) else np.asarray(agg_vals, dtype=np.float32)
        occupancy[occupied] = True
    return grid.reshape(H, W, -1), occupancy.reshape(H, W), origin, float(bin_size)


# --------------------------------------------------------------------------- the lattice


@dataclass
class Lattice:
    """One section rasterised into bins, kept sparse (only occupied bins store expression).

    section : section code (``SpatialDataset.section``); bin_size : bin side (coordinates' units);
    origin : (x0, y0) physical top-left corner of bin (0, 0); shape : (H, W) bins;
    cells : (n,) global cell ids of the section (sorted); bin_of_cell : (n,) flat bin index
    (row * W + col) of each of those cells; bin_rows : (H, W) int32 row of ``bin_expr`` for each
    bin, -1 where empty; bin_expr : CSR (n_occupied_bins, G) float32, mean preprocessed expression
    of the cells in each bin; occupancy : (H, W) bool; n_cells_per_bin : (H, W) int32.
    """

    section: int
    bin_size: float
    origin: tuple[float, float]
    shape: tuple[int, int]
    cells: np.ndarray
    bin_of_cell: np.ndarray
    bin_rows: np.ndarray
    bin_expr: sp.csr_matrix
    occupancy: np.ndarray
    n_cells_per_bin: np.ndarray

    @property
    def n_genes(self) -> int:
        return int(self.bin_expr.shape[1])

    @property
    def n_occupied(self) -> int:
        return int(self.bin_expr.shape[0])

    def squared_expr(self) -> sp.csr_matrix:
        """``bin_expr`` squared element-wise (cached; used for per-patch gene variances)."""
        sq = self.__dict__.get("_squared")
        if sq is None:
            sq = self.bin_expr.multiply(self.bin_expr).tocsr()
            self.__dict__["_squared"] = sq
        return sq

    def cell_rowcol(self) -> np.ndarray:
        """(n, 2) (row, col) bin of each cell of ``cells``."""
        W = self.shape[1]
        return np.stack([self.bin_of_cell // W, self.bin_of_cell % W], axis=1)

    def dense(self, genes: np.ndarray | None = None) -> np.ndarray:
        """(H, W, len(genes)) float32 dense grid of some genes (all genes by default: small data only)."""
        genes = np.arange(self.n_genes) if genes is None else np.asarray(genes, dtype=np.int64)
        H, W = self.shape
        out = np.zeros((H * W, len(genes)), dtype=np.float32)
        flat = np.flatnonzero(self.bin_rows.ravel() >= 0)
        out[flat] = self.bin_expr[self.bin_rows.ravel()[flat]][:, genes].toarray()
        return out.reshape(H, W, len(genes))

    def bin_centers(self) -> np.ndarray:
        """(H, W, 2) physical x, y of every bin's centre."""
        H, W = self.shape
        x = self.origin[0] + (np.arange(W) + 0.5) * self.bin_size
        y = self.origin[1] + (np.arange(H) + 0.5) * self.bin_size
        xx, yy = np.meshgrid(x, y)
        return np.stack([xx, yy], axis=-1)


def build_lattice(coords: np.ndarray, X, bin_size: float, *, cells: np.ndarray | None = None,
                  section: int = 0) -> Lattice:
    """Lattice of the cells `cells` (global ids, kept sorted; default all) of one section.

    ``X`` is the whole slide's preprocessed expression (CSR or dense); only the section's rows
    are read and they are aggregated as a sparse product, never densified as a whole.
    """
    cells = np.arange(len(coords)) if cells is None else np.unique(np.asarray(cells, dtype=np.int64))
    if len(cells) == 0:
        raise SpatialDataError(f"section {section} has no cells; cannot build its lattice.")
    pts = np.asarray(coords, dtype=np.float64)[cells]
    row, col, _, origin, (H, W) = _grid_geometry(pts, bin_size, None, None)
    flat = row * W + col
    op, occupied, counts = _bin_operator(flat, H * W, "mean")
    rows_x = X[cells]
    expr = op @ rows_x
    bin_expr = sp.csr_matrix(expr, dtype=np.float32)
    bin_expr.sort_indices()
    bin_rows = np.full(H * W, -1, dtype=np.int32)
    bin_rows[occupied] = np.arange(len(occupied), dtype=np.int32)
    n_per = np.zeros(H * W, dtype=np.int32)
    n_per[occupied] = counts
    return Lattice(
        section=int(section), bin_size=float(bin_size), origin=origin, shape=(H, W), cells=cells,
        bin_of_cell=flat, bin_rows=bin_rows.reshape(H, W), bin_expr=bin_expr,
        occupancy=(bin_rows >= 0).reshape(H, W), n_cells_per_bin=n_per.reshape(H, W),
    )


def build_lattices(dataset, bin_size: float | None = None) -> list[Lattice]:
    """One :class:`Lattice` per section of a ``SpatialDataset`` (bin size in its coordinate units;
    default :func:`suggest_bin_size`)."""
    if bin_size is None:
        bin_size = suggest_bin_size(dataset.coords, dataset.section)
    return [
        build_lattice(dataset.coords, dataset.X, bin_size, cells=dataset.section_indices(s), section=s)
        for s in range(dataset.n_sections)
        if np.any(dataset.section == s)
    ]


def suggest_bin_size(coords: np.ndarray, section: np.ndarray | None = None, *, factor: float = 1.0,
                     n_probe: int = 20000, seed: int = 0) -> float:
    """A bin side about one cell wide: ``factor`` x the median distance from a cell to its nearest
    neighbour in its own section (estimated on up to `n_probe` random cells per section),
    rounded to 2 significant figures. Same units as the coordinates."""
    from .spacing import neighbour_distance

    d = neighbour_distance(coords, section, k=1, max_queries=n_probe, seed=seed)
    value = d * factor
    return float(f"{value:.2g}")


# --------------------------------------------------------------------------- patch origins


@dataclass
class PatchBatch:
    """P patches of h x w bins with m gene channels each.

    values : (P, h, w, m) float32 (0 in empty bins); genes : (P, m) int64 gene index (column of
    the dataset's X) of each channel; occupancy : (P, h, w) bool; origins : (P, 2) (row, col) of
    each patch's top-left bin in its lattice; section : (P,) section code.
    """

    values: np.ndarray
    genes: np.ndarray
    occupancy: np.ndarray
    origins: np.ndarray
    section: np.ndarray

    def __len__(self) -> int:
        return int(self.values.shape[0])


def _window_occupancy(lattice: Lattice, h: int, w: int) -> np.ndarray:
    """Fraction of occupied bins of every in-lattice h x w window, indexed by its origin
    (shape (max(H-h,0)+1, max(W-w,0)+1)); windows larger than the lattice count padding as empty."""
    H, W = lattice.shape
    occ = np.zeros((max(H, h), max(W, w)), dtype=np.int64)
    occ[:H, :W] = lattice.occupancy
    sat = np.zeros((occ.shape[0] + 1, occ.shape[1] + 1), dtype=np.int64)
    sat[1:, 1:] = occ.cumsum(0).cumsum(1)
    nr, nc = occ.shape[0] - h + 1, occ.shape[1] - w + 1
    total = sat[h:h + nr, w:w + nc] - sat[:nr, w:w + nc] - sat[h:h + nr, :nc] + sat[:nr, :nc]
    return total / float(h * w)


def _check_patch(h: int, w: int) -> None:
    if int(h) < 1 or int(w) < 1:
        raise SpatialDataError(f"patch size must be at least 1 x 1 bins, got {h} x {w}.")


def random_origins(lattice: Lattice, n: int, h: int, w: int, min_occupancy: float = 0.5,
                   rng: np.random.Generator | None = None) -> np.ndarray:
    """`n` random patch origins (row, col) inside the lattice whose h x w window has at least
    `min_occupancy` (fraction 0-1) of its bins occupied. Sampled without replacement when there
    are at least `n` such windows, else with replacement. (n, 2) int64."""
    _check_patch(h, w)
    rng = rng or np.random.default_rng()
    frac = _window_occupancy(lattice, h, w)
    ok = np.flatnonzero(frac.ravel() >= min_occupancy - 1e-12)
    if ok.size == 0:
        raise SpatialDataError(
            f"no {h} x {w} patch of section {lattice.section} has {min_occupancy:.0%} of its bins occupied "
            f"(best {frac.max():.0%}); lower min_occupancy, use smaller patches, or a larger bin size."
        )
    pick = ok[rng.choice(ok.size, size=n, replace=n > ok.size)]
    return np.stack(np.unravel_index(pick, frac.shape), axis=1).astype(np.int64)


def tiled_origins(lattice: Lattice, h: int, w: int, stride: int | None = None, *,
                  skip_empty: bool = True) -> np.ndarray:
    """Origins of patches tiling the whole lattice with the given stride (default h, w: no
    overlap; a smaller stride overlaps). The last row / column of tiles is shifted back to end at
    the lattice's edge, so every bin is covered. With `skip_empty`, tiles without any occupied bin
    are dropped (they hold no cell). (P, 2) int64."""
    _check_patch(h, w)
    H, W = lattice.shape
    sr, sc = (h, w) if stride is None else ((stride, stride) if np.isscalar(stride) else stride)
    if sr < 1 or sc < 1:
        raise SpatialDataError(f"stride must be >= 1 bin, got {stride}.")

    def starts(size, patch, step):
        last = max(size - patch, 0)
        s = np.arange(0, last + 1, step)
        return np.unique(np.append(s, last))

    rr, cc = np.meshgrid(starts(H, h, sr), starts(W, w, sc), indexing="ij")
    origins = np.stack([rr.ravel(), cc.ravel()], axis=1).astype(np.int64)
    if skip_empty and len(origins):
        frac = _window_occupancy(lattice, h, w)
        origins = origins[frac[origins[:, 0], origins[:, 1]] > 0]
    return origins


def centered_origins(lattice: Lattice, cells: np.ndarray, h: int, w: int) -> np.ndarray:
    """Origins of h x w patches centred on the bins of `cells` (global cell ids of this section):
    the cell's bin is at (h // 2, w // 2) of its patch. Patches may stick out of the lattice
    (those bins are padded as empty). (len(cells), 2) int64."""
    _check_patch(h, w)
    cells = np.asarray(cells, dtype=np.int64)
    pos = np.searchsorted(lattice.cells, cells)
    pos = np.clip(pos, 0, len(lattice.cells) - 1)
    bad = lattice.cells[pos] != cells
    if bad.any():
        raise SpatialDataError(
            f"{int(bad.sum())} cell(s) (e.g. {cells[bad][:5].tolist()}) are not in section {lattice.section}'s lattice."
        )
    rc = lattice.cell_rowcol()[pos]
    return rc - np.array([h // 2, w // 2], dtype=np.int64)


# --------------------------------------------------------------------------- gathering patches


def _patch_bin_rows(lattice: Lattice, origins: np.ndarray, h: int, w: int) -> np.ndarray:
    """(P, h, w) int64 row of bin_expr of every bin of every patch; -1 where empty or outside."""
    origins = np.asarray(origins, dtype=np.int64).reshape(-1, 2)
    H, W = lattice.shape
    r = origins[:, 0, None, None] + np.arange(h)[None, :, None]
    c = origins[:, 1, None, None] + np.arange(w)[None, None, :]
    inside = (r >= 0) & (r < H) & (c >= 0) & (c < W)
    rows = np.where(inside, lattice.bin_rows[np.clip(r, 0, H - 1), np.clip(c, 0, W - 1)], -1)
    return rows.astype(np.int64)


def patch_gene_variance(lattice: Lattice, origins: np.ndarray, h: int, w: int) -> np.ndarray:
    """(P, G) variance of each gene over the occupied bins of each patch (0 for empty patches).

    Sums and sums of squares come from sparse products (patch x bin membership) @ ``bin_expr``
    (and its element-wise square, cached on the lattice): ~4x faster than densifying the bins.
    """
    origins = np.asarray(origins, dtype=np.int64).reshape(-1, 2)
    P, G = len(origins), lattice.n_genes
    out = np.zeros((P, G), dtype=np.float64)
    sq = lattice.squared_expr()
    step = max(1, int(4e6 // max(G, 1)))  # (step, G) float64 results: ~32 MB each
    for start in range(0, P, step):
        rows = _patch_bin_rows(lattice, origins[start:start + step], h, w).reshape(-1, h * w)
        p, k = np.nonzero(rows >= 0)
        member = sp.csr_matrix(
            (np.ones(len(p), dtype=np.float32), (p, rows[p, k])), shape=(len(rows), lattice.n_occupied)
        )
        cnt = np.bincount(p, minlength=len(rows)).astype(np.float64)
        s1 = (member @ lattice.bin_expr).toarray().astype(np.float64)
        s2 = (member @ sq).toarray().astype(np.float64)
        safe = np.maximum(cnt, 1.0)[:, None]
        mean = s1 / safe
        out[start:start + len(rows)] = np.maximum(s2 / safe - mean * mean, 0.0)
    return out


def select_channels(lattice: Lattice, origins: np.ndarray, h: int, w: int, m: int,
                    rng: np.random.Generator | None = None) -> np.ndarray:
    """(P, m) int64 gene indices per patch, drawn without replacement with probability
    proportional to the gene's variance over the patch's occupied bins (Efraimidis-Spirakis keys
    log(u) / variance for all patches at once, the m largest kept). Genes of zero variance are
    only drawn (uniformly) once the variable ones are used up. When G <= m every patch gets all
    genes in order (0..G-1). Within a patch the chosen genes are returned in increasing index."""
    if m < 1:
        raise SpatialDataError(f"m (gene channels per patch) must be >= 1, got {m}.")
    origins = np.asarray(origins, dtype=np.int64).reshape(-1, 2)
    P, G = len(origins), lattice.n_genes
    if G <= m:
        return np.broadcast_to(np.arange(G, dtype=np.int64), (P, G)).copy()
    rng = rng or np.random.default_rng()
    return _variance_keys(patch_gene_variance(lattice, origins, h, w), m, rng)


def _chunk_size(h: int, w: int, G: int) -> int:
    """Patches per chunk so one chunk's dense bins stay about 64 MB (float32)."""
    return max(1, int(16e6 // max(h * w * G, 1)))


def _dense_patch_bins(lattice: Lattice, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Occupied bins of a chunk of patches: (patch, bin) positions and their dense expression
    (n_occupied_in_chunk, G), densified from ``bin_expr`` rows only for this chunk."""
    p, b = np.nonzero(rows >= 0)
    dense = lattice.bin_expr[rows[p, b]].toarray()
    return p, b, dense


def _check_genes(genes, P: int, G: int) -> np.ndarray:
    genes = np.asarray(np.arange(G) if genes is None else genes, dtype=np.int64)
    if genes.ndim == 1:
        genes = np.broadcast_to(genes, (P, len(genes)))
    if genes.ndim != 2 or genes.shape[0] != P:
        raise SpatialDataError(f"genes must be (m,) or (P={P}, m), got shape {genes.shape}.")
    if genes.size and (genes.min() < 0 or genes.max() >= G):
        raise SpatialDataError(f"gene indices must lie in [0, {G}); got {genes.min()}..{genes.max()}.")
    return genes


def extract_patches(lattice: Lattice, origins: np.ndarray, h: int, w: int,
                    genes: np.ndarray | None = None) -> PatchBatch:
    """Cut h x w patches at `origins` ((P, 2) row, col) with channels `genes`: (P, m) per-patch
    gene indices (e.g. from :func:`select_channels`), or (m,) shared by all patches, or None for
    all genes. Vectorised over patches: bins come from ``bin_rows``; the CSR rows of the occupied
    bins of a chunk of patches (about 64 MB) are densified and the channels gathered from them,
    which measured ~2x faster than walking the CSR entries. Bins outside the lattice are empty."""
    _check_patch(h, w)
    origins = np.asarray(origins, dtype=np.int64).reshape(-1, 2)
    P, G = len(origins), lattice.n_genes
    genes = _check_genes(genes, P, G)
    m = genes.shape[1]
    values = np.zeros((P, h * w, m), dtype=np.float32)
    rows_all = _patch_bin_rows(lattice, origins, h, w).reshape(P, h * w)
    chunk = _chunk_size(h, w, G)
    for start in range(0, P, chunk):
        p, b, dense = _dense_patch_bins(lattice, rows_all[start:start + chunk])
        if len(p):
            values[start + p, b] = np.take_along_axis(dense, genes[start + p], axis=1)
    return PatchBatch(
        values=values.reshape(P, h, w, m),
        genes=np.ascontiguousarray(genes, dtype=np.int64),
        occupancy=(rows_all >= 0).reshape(P, h, w),
        origins=origins,
        section=np.full(P, lattice.section, dtype=np.int64),
    )


def _variance_keys(var: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """(P, m) sorted gene indices drawn without replacement with weights `var` (P, G)."""
    u = np.maximum(rng.random(var.shape), np.finfo(np.float64).tiny)
    positive = var > 0
    with np.errstate(divide="ignore"):
        keys = np.log(u) / np.where(positive, var, 1.0)
    # Zero-variance genes rank below every positive-weight gene, in random order among themselves.
    keys = np.where(positive, keys, -1e300 * (1.0 + u))
    top = np.argpartition(-keys, m - 1, axis=1)[:, :m]
    return np.sort(top, axis=1).astype(np.int64)


def sample_patches(lattice: Lattice, origins: np.ndarray, h: int, w: int, m: int,
                   rng: np.random.Generator | None = None) -> PatchBatch:
    """Patches at `origins` with m variance-weighted gene channels each:
    :func:`select_channels` then :func:`extract_patches`."""
    genes = select_channels(lattice, origins, h, w, m, rng)
    return extract_patches(lattice, origins, h, w, genes)


def scatter_to_bins(lattice: Lattice, origins: np.ndarray, patch_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Average per-bin patch outputs (P, h, w, C) back onto the lattice, where tiles overlap.

    Returns (grid (H, W, C) float32, covered (H, W) bool). A cell's value is then
    ``grid.reshape(-1, C)[lattice.bin_of_cell]``.
    """
    patch_values = np.asarray(patch_values, dtype=np.float32)
    if patch_values.ndim == 3:
        patch_values = patch_values[..., None]
    P, h, w, C = patch_values.shape
    origins = np.asarray(origins, dtype=np.int64).reshape(-1, 2)
    H, W = lattice.shape
    r = (origins[:, 0, None, None] + np.arange(h)[None, :, None]) + np.zeros((1, 1, w), dtype=np.int64)
    c = (origins[:, 1, None, None] + np.arange(w)[None, None, :]) + np.zeros((1, h, 1), dtype=np.int64)
    inside = ((r >= 0) & (r < H) & (c >= 0) & (c < W)).ravel()
    flat = (r * W + c).ravel()[inside]
    vals = patch_values.reshape(-1, C)[inside]
    op, occupied, counts = _bin_operator(flat, H * W, "mean")
    grid = np.zeros((H * W, C), dtype=np.float32)
    grid[occupied] = np.asarray(op @ vals, dtype=np.float32)
    covered = np.zeros(H * W, dtype=bool)
    covered[occupied] = True
    return grid.reshape(H, W, C), covered.reshape(H, W)
