"""Mask strategies. Every mask is seeded (a numpy Generator) and returned as a boolean array the
UI can draw: True = masked (hidden from the model, to be reconstructed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import scipy.sparse as sp

from .data.io import SpatialDataError

STRATEGIES = ("random_cells", "cell_types", "niches", "regions", "gene_channels")


@dataclass
class MaskConfig:
    """Which cells (or channels) to mask.

    strategy: one of STRATEGIES;
    ratio: fraction of cells masked (random_cells; niches: seed cells plus their neighbours are
        added until about this fraction of cells is covered), of gene entries (gene_channels);
    cell_types: class names to mask entirely (cell_types);
    niche_hops: graph hops around each seed cell (niches);
    region_size: side of each square region in bins (regions, for patches);
    n_regions: squares per patch (regions).
    """

    strategy: str = "random_cells"
    ratio: float = 0.2
    cell_types: list[str] = field(default_factory=list)
    niche_hops: int = 1
    region_size: int = 4
    n_regions: int = 1

    FIELD_DOCS = {
        "strategy": "What the pretext task hides: random cells, whole cell types, spatial niches (a cell and "
                    "its neighbours), square regions of a patch, or gene channels.",
        "ratio": "Share of cells (or of tokens / gene entries) hidden at every training step.",
        "cell_types": "The cell types hidden entirely (strategy cell_types).",
        "niche_hops": "How many graph hops around each seed cell a niche covers (strategy niches).",
        "region_size": "Side of each hidden square, in bins (strategy regions).",
        "n_regions": "Hidden squares per patch (strategy regions).",
    }

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise SpatialDataError(f"mask strategy {self.strategy!r} unknown; choose one of {STRATEGIES}.")
        if not 0.0 < self.ratio < 1.0 and self.strategy in ("random_cells", "niches", "gene_channels"):
            raise SpatialDataError(f"mask ratio must be between 0 and 1 (exclusive), got {self.ratio}.")
        if self.niche_hops < 0:
            raise SpatialDataError(f"mask niche_hops must be >= 0, got {self.niche_hops}.")
        if self.region_size < 1 or self.n_regions < 1:
            raise SpatialDataError(
                f"mask region_size and n_regions must be >= 1, got {self.region_size} and {self.n_regions}."
            )


def random_cells(n_cells: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Exactly round(ratio * n) cells chosen uniformly (at least one)."""
    mask = np.zeros(n_cells, dtype=bool)
    k = max(1, int(round(ratio * n_cells))) if n_cells else 0
    mask[rng.choice(n_cells, size=k, replace=False)] = True
    return mask


def cell_types(labels: np.ndarray, label_names: Sequence[str], chosen: Sequence[str]) -> np.ndarray:
    """All cells whose label is one of `chosen` (class names)."""
    unknown = [c for c in chosen if c not in label_names]
    if unknown:
        raise SpatialDataError(f"cell types {unknown} not among the labels {list(label_names)[:30]}.")
    if not chosen:
        raise SpatialDataError("mask strategy 'cell_types' needs at least one cell type to mask.")
    codes = [list(label_names).index(c) for c in chosen]
    return np.isin(labels, codes)


def niches(adjacency: sp.csr_matrix, ratio: float, hops: int, rng: np.random.Generator) -> np.ndarray:
    """Spatial niches: random seed cells plus their `hops`-hop neighbours in `adjacency` (a
    per-section graph, so niches never cross sections), about a `ratio` of all cells in total.

    Seeds are added in a few vectorised rounds (each a few sparse mat-vec products), each round
    drawing new seeds for most of the missing coverage at the niche size seen so far, until the
    masked fraction reaches `ratio` (it overshoots by at most about one niche).
    """
    n = adjacency.shape[0]
    if adjacency.shape != (n, n):
        raise SpatialDataError(f"niche masks need a square adjacency matrix, got shape {adjacency.shape}.")
    mask = np.zeros(n, dtype=bool)
    if n == 0:
        return mask
    A = sp.csr_matrix(adjacency, dtype=np.float32)
    target = max(1, int(round(ratio * n)))
    order = rng.permutation(n)
    pos, covered = 0, 0
    # First guess of a niche's size (a 2-D ego-net grows like hops^2), refined from each round;
    # each round aims at 70% of the missing coverage so overlaps do not make it overshoot.
    niche_size = 1.0 + float(A.nnz) / n * max(hops, 0) ** 2
    while covered < target and pos < n:
        want = max(1, int(np.ceil(0.7 * (target - covered) / niche_size)))
        seeds = order[pos:pos + want]
        pos += len(seeds)
        reached = np.zeros(n, dtype=np.float32)
        reached[seeds] = 1.0
        for _ in range(hops):
            reached = np.maximum(reached, A @ reached)
        new = (reached > 0) & ~mask
        gained = int(new.sum())
        mask |= new
        covered += gained
        niche_size = max(1.0, gained / len(seeds)) if gained else niche_size
    return mask


def regions(shape: tuple[int, int], size: int, n_regions: int, rng: np.random.Generator,
            batch: int | None = None) -> np.ndarray:
    """Square regions of side `size` bins inside an (h, w) patch; (batch, h, w) when batch is given."""
    h, w = shape
    if size > min(h, w):
        raise SpatialDataError(f"mask region size {size} is larger than the patch ({h} x {w}).")
    nb = 1 if batch is None else batch
    mask = np.zeros((nb, h, w), dtype=bool)
    ys = rng.integers(0, h - size + 1, size=(nb, n_regions))
    xs = rng.integers(0, w - size + 1, size=(nb, n_regions))
    dy, dx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    bi = np.repeat(np.arange(nb), n_regions * size * size)
    yy = (ys[..., None, None] + dy).ravel()
    xx = (xs[..., None, None] + dx).ravel()
    mask[bi, yy, xx] = True
    return mask[0] if batch is None else mask


def gene_channels(n_cells: int, n_genes: int, ratio: float, rng: np.random.Generator, *,
                  exact: bool = False) -> np.ndarray:
    """(n_cells, n_genes) boolean, True = gene hidden in that cell. Each entry is masked with
    probability `ratio`, or with ``exact`` exactly round(ratio * n_genes) genes per cell (at least
    one). Draw it per batch at atlas scale (a whole 4.3M x 550 mask is 2.4 GB)."""
    if not exact:
        return rng.random((n_cells, n_genes)) < ratio
    k = min(n_genes, max(1, int(round(ratio * n_genes))))
    keys = rng.random((n_cells, n_genes))
    chosen = np.argpartition(keys, k - 1, axis=1)[:, :k]
    mask = np.zeros((n_cells, n_genes), dtype=bool)
    np.put_along_axis(mask, chosen, True, axis=1)
    return mask


def draw_patch_mask(config: MaskConfig, batch: int, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """(batch, h, w) boolean mask of square regions of patches (strategy 'regions')."""
    config.validate()
    return regions(shape, config.region_size, config.n_regions, rng, batch=batch)


def draw_gene_mask(config: MaskConfig, n_cells: int, n_genes: int, rng: np.random.Generator) -> np.ndarray:
    """(n_cells, n_genes) boolean mask of gene channels (strategy 'gene_channels')."""
    config.validate()
    return gene_channels(n_cells, n_genes, config.ratio, rng)


def draw_cell_mask(config: MaskConfig, n_cells: int, rng: np.random.Generator, *,
                   labels: np.ndarray | None = None, label_names: Sequence[str] | None = None,
                   adjacency: sp.csr_matrix | None = None) -> np.ndarray:
    """A per-cell mask for graph methods, by the configured strategy."""
    config.validate()
    if config.strategy == "random_cells":
        return random_cells(n_cells, config.ratio, rng)
    if config.strategy == "cell_types":
        if labels is None or label_names is None:
            raise SpatialDataError("mask strategy 'cell_types' needs a label key (--label-key).")
        return cell_types(labels, label_names, config.cell_types)
    if config.strategy == "niches":
        if adjacency is None:
            raise SpatialDataError("mask strategy 'niches' needs a neighbour graph.")
        return niches(adjacency, config.ratio, config.niche_hops, rng)
    raise SpatialDataError(
        f"mask strategy {config.strategy!r} does not give a per-cell mask; use random_cells, cell_types or niches."
    )
