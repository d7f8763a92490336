"""Export annotated slides to `.h5ad` or `.csv` (core: no Qt, no napari).

Every write is atomic (temp file + rename, see :func:`atomic_write`) and refuses to replace an existing
file unless ``overwrite=True``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .io import SpatialDataError, atomic_write, atomic_write_h5ad, get_coordinates, read_h5ad

EXPORT_SUFFIXES = (".h5ad", ".csv")


def check_export_path(path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Validate an output path: suffix `.h5ad` or `.csv`, not a folder, not existing unless ``overwrite``."""
    p = Path(path)
    if p.suffix.lower() not in EXPORT_SUFFIXES:
        raise SpatialDataError(
            f"{p}: cannot export to {p.suffix or 'a file without suffix'!r}; use .h5ad (everything) or .csv "
            "(one row per cell: obs columns and x, y)."
        )
    if p.is_dir():
        raise SpatialDataError(f"{p}: is a folder; give a file name ending in .h5ad or .csv.")
    if p.exists() and not overwrite:
        raise FileExistsError(f"{p} already exists; pass overwrite=True (CLI: --overwrite) to replace it.")
    return p


def adata_to_table(adata, *, spatial_key: str = "spatial", include_expression: bool = False,
                   max_expression_values: int = 50_000_000) -> pd.DataFrame:
    """One row per cell: ``cell`` (obs name), ``x``, ``y`` (slide units), every obs column, and
    optionally one column per gene (``X``, densified: refused above ``max_expression_values`` values)."""
    table = {"cell": adata.obs_names.astype(str)}
    if spatial_key in adata.obsm:
        xy = get_coordinates(adata, spatial_key=spatial_key, name="export")
        table["x"], table["y"] = xy[:, 0], xy[:, 1]
    frame = pd.DataFrame(table, index=range(adata.n_obs))
    obs = adata.obs.reset_index(drop=True)
    obs = obs.drop(columns=[c for c in obs.columns if c in frame.columns])
    parts = [frame, obs]
    if include_expression:
        n_values = adata.n_obs * adata.n_vars
        if n_values > max_expression_values:
            raise SpatialDataError(
                f"expression has {adata.n_obs} x {adata.n_vars} values, too many for a CSV; export .h5ad instead."
            )
        X = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
        parts.append(pd.DataFrame(X, columns=[f"gene:{g}" for g in adata.var_names]))
    return pd.concat(parts, axis=1)


def write_table(table: pd.DataFrame, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a table as CSV atomically."""
    return atomic_write(path, lambda p: table.to_csv(p, index=False), overwrite=overwrite)


def adata_to_csv(adata, path: str | os.PathLike, *, overwrite: bool = False, include_expression: bool = False,
                 spatial_key: str = "spatial") -> Path:
    """Write one row per cell (obs name, x, y, obs columns[, genes]) to ``path`` atomically."""
    p = check_export_path(path, overwrite=overwrite)
    table = adata_to_table(adata, spatial_key=spatial_key, include_expression=include_expression)
    return write_table(table, p, overwrite=overwrite)


def write_adata(adata, path: str | os.PathLike, *, overwrite: bool = False, include_expression: bool = False) -> Path:
    """Write an AnnData to ``.h5ad`` (everything) or ``.csv`` (table), chosen by suffix; atomic."""
    p = check_export_path(path, overwrite=overwrite)
    if p.suffix.lower() == ".csv":
        return adata_to_csv(adata, p, overwrite=overwrite, include_expression=include_expression)
    return atomic_write_h5ad(_h5ad_safe(adata), p, overwrite=overwrite)


def _h5ad_safe(adata):
    """h5ad cannot store mixed-type object columns; turn those into strings (on a shallow copy)."""
    bad = [c for c in adata.obs.columns
           if adata.obs[c].dtype == object and not adata.obs[c].map(lambda v: isinstance(v, str)).all()]
    if not bad:
        return adata
    import anndata as ad

    obs = adata.obs.copy()
    for c in bad:
        obs[c] = obs[c].astype(str)
    return ad.AnnData(X=adata.X, obs=obs, var=adata.var, uns=dict(adata.uns), obsm=dict(adata.obsm),
                      varm=dict(adata.varm), layers=dict(adata.layers), obsp=dict(adata.obsp))


def export_file(src_path: str | os.PathLike, dst_path: str | os.PathLike, overwrite: bool = False,
                include_expression: bool = False) -> Path:
    """Export the slide in ``src_path`` (.h5ad, e.g. a result.h5ad) to ``dst_path`` (.h5ad or .csv).

    Refuses to replace ``dst_path`` unless ``overwrite``; refuses to write onto ``src_path`` itself.
    """
    src, dst = Path(src_path), Path(dst_path)
    check_export_path(dst, overwrite=overwrite)
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise SpatialDataError(f"{dst}: is the input file; choose another output name.")
    adata = read_h5ad(src)
    return write_adata(adata, dst, overwrite=overwrite, include_expression=include_expression)
