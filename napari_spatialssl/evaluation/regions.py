"""Masked-region inspection: hide a region a person chose, see what a trained model puts there.

:func:`inspect_region` hides every cell of the region from the model at once (each method's own
pretext masking: the mask token for gnn-mask, zeroed input for spotscape, masked lattice tokens for
patch-mae: ``method.reconstruct_hidden``) and compares its prediction with what was measured, gene
by gene, beside two baselines that see the same unmasked cells:

- **neighbour mean**: the mean expression of the `n_neighbors` nearest unmasked cells of the section;
- **interpolation**: the same cells weighted by inverse squared distance.

Everything is in the model's input space (the preprocessed expression the model reconstructs).
Vectorised over cells and genes (one k-d tree query per section).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from ..data.io import SpatialDataError

BASELINES = ("neighbour mean", "interpolation")


@dataclass
class RegionReport:
    """What the model (and the baselines) put in a hidden region, against what was measured."""

    method: str
    cells: np.ndarray  # (m,) hidden cell indices
    genes: list[str]  # model genes (columns of the arrays)
    observed: np.ndarray  # (m, g)
    predicted: np.ndarray  # (m, g)
    baselines: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (m, g)
    per_gene: pd.DataFrame | None = None  # one row per gene: mse / r of the model and each baseline

    def summary(self) -> dict:
        """Headline numbers: MSE and the median per-gene correlation, model and baselines."""
        out = {"cells": int(len(self.cells)), "genes": len(self.genes),
               "model": {"mse": _mse(self.predicted, self.observed),
                         "median_gene_r": _nanmedian(self.per_gene["model r"])}}
        for name, values in self.baselines.items():
            out[name] = {"mse": _mse(values, self.observed), "median_gene_r": _nanmedian(self.per_gene[f"{name} r"])}
        return out

    def gene(self, name: str) -> dict[str, np.ndarray]:
        """Per-cell values of one gene: measured, model and baselines."""
        if name not in self.genes:
            raise SpatialDataError(f"gene {name!r} is not among the model's {len(self.genes)} genes.")
        j = self.genes.index(name)
        return {"measured": self.observed[:, j], "model": self.predicted[:, j],
                **{k: v[:, j] for k, v in self.baselines.items()}}


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a - b) ** 2)) if a.size else float("nan")


def _nanmedian(values) -> float:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(np.median(v)) if v.size else float("nan")


def columnwise_r(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each column of `a` with the same column of `b` (NaN where either is constant)."""
    a = a - a.mean(0, keepdims=True)
    b = b - b.mean(0, keepdims=True)
    den = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(0) / np.where(den > 0, den, 1.0), np.nan)


def neighbour_baselines(data, hidden: np.ndarray, n_neighbors: int = 8) -> dict[str, np.ndarray]:
    """Neighbour-mean and inverse-distance interpolation of the hidden cells from the nearest
    unmasked cells of the same section."""
    hidden = np.asarray(hidden, np.int64)
    is_hidden = np.zeros(data.n_cells, bool)
    is_hidden[hidden] = True
    mean = np.zeros((len(hidden), data.n_genes), np.float32)
    idw = np.zeros_like(mean)
    for s in np.unique(data.section[hidden]):
        rows = np.flatnonzero(data.section[hidden] == s)
        pool = np.flatnonzero((data.section == s) & ~is_hidden)
        if len(pool) == 0:
            raise SpatialDataError("the region covers a whole section: no unmasked cell is left to predict it "
                                   "from; draw a smaller region.")
        k = min(n_neighbors, len(pool))
        dist, nb = cKDTree(data.coords[pool]).query(data.coords[hidden[rows]], k=k)
        dist, nb = dist.reshape(len(rows), k), nb.reshape(len(rows), k)
        values = data.dense_rows(pool[nb.ravel()]).reshape(len(rows), k, data.n_genes)
        mean[rows] = values.mean(1)
        w = 1.0 / np.maximum(dist, 1e-12) ** 2
        idw[rows] = (values * (w / w.sum(1, keepdims=True))[..., None]).sum(1)
    return {"neighbour mean": mean, "interpolation": idw}


def inspect_region(method, cells: np.ndarray, device, *, n_neighbors: int = 8,
                   max_cells: int = 50_000) -> RegionReport:
    """Hide `cells` (indices into the trained method's dataset) from `method` and report what it
    predicts there against the measurement and the baselines (see the module docstring)."""
    data = getattr(method, "data", None)
    if data is None or getattr(method, "model", None) is None or not hasattr(method, "reconstruct_hidden"):
        raise SpatialDataError(f"{getattr(method, 'name', method)}: no trained model with its slide in memory; "
                               "train it (or load a model and predict) in this session first.")
    cells = np.unique(np.asarray(cells, np.int64))
    if len(cells) == 0:
        raise SpatialDataError("the region holds no cell; draw it over the tissue.")
    if len(cells) > max_cells:
        raise SpatialDataError(f"the region holds {len(cells):,} cells; draw one of at most {max_cells:,}.")
    if cells.max() >= data.n_cells:
        raise SpatialDataError("the region's cells are not on the slide the model was trained on.")
    predicted = np.asarray(method.reconstruct_hidden(cells, device), np.float32)
    observed = data.dense_rows(cells)
    baselines = neighbour_baselines(data, cells, n_neighbors)
    genes = [str(g) for g in data.gene_names]
    table = {"gene": genes, "model mse": ((predicted - observed) ** 2).mean(0),
             "model r": columnwise_r(predicted, observed)}
    for name, values in baselines.items():
        table[f"{name} mse"] = ((values - observed) ** 2).mean(0)
        table[f"{name} r"] = columnwise_r(values, observed)
    per_gene = pd.DataFrame(table).sort_values("model mse", ascending=False, ignore_index=True)
    return RegionReport(method.name, cells, genes, observed, predicted, baselines, per_gene)


def cells_in_polygon(positions: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Indices of the points (n, 2) inside `polygon` (k, 2), same coordinates (vectorised)."""
    from matplotlib.path import Path

    polygon = np.asarray(polygon, dtype=np.float64)[:, -2:]
    if len(polygon) < 3:
        raise SpatialDataError("a region needs at least three corners; draw a rectangle or a polygon.")
    positions = np.asarray(positions, dtype=np.float64)[:, -2:]
    lo, hi = polygon.min(0), polygon.max(0)
    box = np.flatnonzero(((positions >= lo) & (positions <= hi)).all(1))  # cheap pre-filter
    inside = Path(polygon).contains_points(positions[box])
    return box[inside]
