"""npe2 writer contribution: a Points layer (cells) to `.h5ad` or `.csv`.

For a layer made by this plugin's reader the output holds the original expression, coordinates and every
AnnData field, restricted to the cells still in the layer (in layer order), with the layer's features
(including results added later, e.g. ``gnn-mask_domain``) written as obs columns. For any other Points
layer the output holds its points as (x, y) coordinates and its features as obs columns.
The file is written atomically (temporary file, then rename). An existing file is replaced, as napari's
own writers do: napari's Save dialog has already asked the user to confirm that. The core export
functions and the CLI still refuse to replace a file unless told (`overwrite=True`, `--overwrite`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ..data.export import check_export_path, write_adata
from ..data.io import SpatialDataError
from .big_slides import VIEWPORT
from .layers import rowcol_to_xy

_DISPLAY_ONLY = ("cell_index",)


def layer_to_adata(data: np.ndarray, features: pd.DataFrame | None, metadata: dict | None):
    """AnnData for a Points layer's data (row, col), features and metadata (see module docstring)."""
    import anndata as ad

    metadata = metadata or {}
    whole = metadata.get(VIEWPORT)
    if whole is not None:  # a huge slide's layer holds the cells in view: it stands for every cell
        data, features = whole.positions.astype(np.float64), whole.features
    features = pd.DataFrame() if features is None else pd.DataFrame(features).reset_index(drop=True)
    source = metadata.get("adata")
    data = np.asarray(data)
    if len(features) and len(features) != len(data):
        raise SpatialDataError(f"layer has {len(data)} points but {len(features)} feature rows.")
    if source is None:
        obs = features.drop(columns=[c for c in _DISPLAY_ONLY if c in features.columns])
        obs.index = pd.Index([str(i) for i in range(len(data))])
        out = ad.AnnData(X=np.zeros((len(data), 0), dtype=np.float32), obs=obs)
        out.obsm["spatial"] = rowcol_to_xy(data[:, -2:]).astype(np.float64)
        return out
    if "cell_index" in features.columns:
        rows = features["cell_index"].to_numpy(dtype=np.int64)
    elif len(data) == source.n_obs:
        rows = np.arange(source.n_obs)
    else:
        raise SpatialDataError(
            f"layer has {len(data)} points for an AnnData of {source.n_obs} cells and no 'cell_index' feature "
            "to match them; re-open the slide with the napari-spatialssl reader."
        )
    keep = (rows >= 0) & (rows < source.n_obs)  # points added by hand are not cells
    rows = rows[keep]
    if len(rows) == source.n_obs and np.array_equal(rows, np.arange(source.n_obs)):
        # every cell, in order: share the arrays instead of copying a possibly huge matrix
        out = ad.AnnData(X=source.X, obs=source.obs.copy(), var=source.var, uns=dict(source.uns),
                         obsm=dict(source.obsm), varm=dict(source.varm), layers=dict(source.layers),
                         obsp=dict(source.obsp))
    else:
        out = source[rows].copy()
    feats = features.loc[keep].reset_index(drop=True)
    for col in feats.columns:
        if col in _DISPLAY_ONLY:
            continue
        values = feats[col]
        out.obs[col] = values.to_numpy() if not isinstance(values.dtype, pd.CategoricalDtype) else \
            pd.Categorical(values.to_numpy(), categories=values.cat.categories)
    return out


def write_points(path: str, data: Any, meta: dict) -> list[str]:
    """npe2 single-layer writer: ``path`` ending in .h5ad or .csv; returns the written path.

    Replaces an existing file (atomically; the Save dialog confirmed it); the suffix and folder
    checks run before the layer is converted."""
    check_export_path(path, overwrite=True)
    adata = layer_to_adata(data, meta.get("features"), meta.get("metadata"))
    return [str(write_adata(adata, path, overwrite=True))]


def write_layer(layer, path: str, *, overwrite: bool = False, include_expression: bool = False) -> str:
    """Python API: write a live Points layer (same output as the writer contribution)."""
    adata = layer_to_adata(layer.data, layer.features, layer.metadata)
    return str(write_adata(adata, path, overwrite=overwrite, include_expression=include_expression))
