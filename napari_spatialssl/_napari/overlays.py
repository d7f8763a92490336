"""What the result layers show, computed from a result AnnData (numpy only: no Qt, no napari).

The model's outputs are already in the AnnData under the documented keys (``obsm['X_<m>']``,
``layers['<m>_reconstruction']``, ``obs['<m>_domain' | '<m>_cell_type' | '<m>_masked']``);
these functions only turn them into colours and per-cell values for display. Large matrices are
processed in row chunks, never densified whole.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

CHUNK_ROWS = 65_536

def pca(embeddings: np.ndarray, n_components: int) -> np.ndarray:
    """The first principal components of the rows (centred SVD; fitted on <= 50k rows)."""
    X = np.asarray(embeddings, dtype=np.float64)
    n_components = min(n_components, X.shape[1], X.shape[0])
    mean = X.mean(0)
    fit = X if len(X) <= 50_000 else X[np.random.default_rng(0).choice(len(X), 50_000, replace=False)]
    _, _, vt = np.linalg.svd(fit - mean, full_matrices=False)
    return (X - mean) @ vt[:n_components].T


def pca_rgb(embeddings: np.ndarray) -> np.ndarray:
    """(n, 4) RGBA: the first three principal components, each scaled to [0, 1] by its 1-99 percentiles."""
    pcs = pca(embeddings, 3)
    if pcs.shape[1] < 3:
        pcs = np.concatenate([pcs, np.zeros((len(pcs), 3 - pcs.shape[1]))], 1)
    lo, hi = np.percentile(pcs, 1, axis=0), np.percentile(pcs, 99, axis=0)
    rgb = np.clip((pcs - lo) / np.where(hi > lo, hi - lo, 1.0), 0, 1)
    return np.concatenate([rgb, np.ones((len(rgb), 1))], 1).astype(np.float32)


def embedding_2d(embeddings: np.ndarray, how: str = "pca", seed: int = 0) -> np.ndarray:
    """(n, 2) coordinates of the embedding for a scatter plot: 'pca' (instant) or 'umap'."""
    X = np.asarray(embeddings, dtype=np.float32)
    if how == "umap":
        import umap

        return np.asarray(umap.UMAP(n_components=2, random_state=seed).fit_transform(X), dtype=np.float64)
    out = pca(X, 2)
    if out.shape[1] < 2:
        out = np.concatenate([out, np.zeros((len(out), 1))], 1)
    return out


def place_beside(points_2d: np.ndarray, tissue_positions: np.ndarray, margin: float = 0.08) -> np.ndarray:
    """Scale a 2-D plot (x, y) to the tissue's height and put it to the right of the tissue,
    in layer (row, col) coordinates, so both show in one viewer without overlapping."""
    tissue = np.asarray(tissue_positions, dtype=np.float64)[:, -2:]
    tmin, tmax = tissue.min(0), tissue.max(0)
    height = max(tmax[0] - tmin[0], 1e-9)
    width = max(tmax[1] - tmin[1], 1e-9)
    p = np.asarray(points_2d, dtype=np.float64)
    pmin, pmax = p.min(0), p.max(0)
    span = max((pmax - pmin).max(), 1e-12)
    unit = (p - pmin) / span * height  # x -> col, y -> row (up)
    rows = tmin[0] + height - unit[:, 1]
    cols = tmax[1] + margin * max(width, height) + unit[:, 0]
    return np.stack([rows, cols], 1)


def column(matrix, j: int) -> np.ndarray:
    """Column j of a dense or sparse matrix as a float32 vector."""
    col = matrix[:, j]
    col = col.toarray() if sp.issparse(col) else np.asarray(col)
    return col.ravel().astype(np.float32)


def per_cell_error(reconstruction, observed, columns: np.ndarray | None = None) -> np.ndarray:
    """Mean squared error per cell between reconstructed and observed expression (model space).

    reconstruction: (n_cells, n_vars) with the model's genes at `columns` (None = all columns,
    aligned with `observed`); observed: (n_cells, n_model_genes) model input (dense or sparse).
    """
    n = observed.shape[0]
    out = np.empty(n, dtype=np.float32)
    for start in range(0, n, CHUNK_ROWS):
        rows = slice(start, min(start + CHUNK_ROWS, n))
        rec = reconstruction[rows]
        if columns is not None:
            rec = rec[:, columns]
        rec = rec.toarray() if sp.issparse(rec) else np.asarray(rec)
        obs = observed[rows]
        obs = obs.toarray() if sp.issparse(obs) else np.asarray(obs)
        out[rows] = ((rec.astype(np.float32) - obs.astype(np.float32)) ** 2).mean(1)
    return out


def scalar_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a (nested) metrics dict, flattened with dotted names."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalar_metrics(value, name + "."))
        elif isinstance(value, (bool, np.bool_)):
            continue
        elif isinstance(value, (int, float, np.integer, np.floating)) and np.isfinite(value):
            out[name] = float(value)
    return out
