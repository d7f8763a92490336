"""Genes on the tissue: log-normalised expression as point colours, or rasterised as Image layers.

Reads only the requested genes' columns, never densifies the whole matrix; images are binned from
every cell (not the display subsample), aligned with the slide's Points layer.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..data.io import SpatialDataError
from .layers import LayerData, color_kwargs, display_coordinates, robust_limits, rowcol_to_xy


def gene_expression(adata, genes: Sequence[str], rows: np.ndarray | None = None,
                    target_sum: float = 1e4) -> np.ndarray:
    """Log-normalised expression (n_rows, n_genes) float32 of ``genes``, for ``rows`` (None = all cells).

    Raw counts are scaled to ``target_sum`` per cell (over all genes) then log1p'd; non-negative
    non-count values (e.g. volume-normalised MERFISH) are log1p'd; anything else is used as is.
    Reads only the requested columns, never densifies the whole matrix.
    """
    from ..data.dataset import looks_like_counts

    genes = [str(g) for g in genes]
    var_index = pd.Index(adata.var_names.astype(str))
    missing = [g for g in genes if g not in var_index]
    if missing:
        raise SpatialDataError(
            f"gene(s) {missing[:10]} not in var_names ({adata.n_vars} genes, e.g. {list(var_index[:5])})."
        )
    cols = var_index.get_indexer(genes)
    X = adata.X
    sel = X[:, cols] if rows is None else X[rows][:, cols]
    sel = sel.toarray() if sp.issparse(sel) else np.asarray(sel)
    sel = sel.astype(np.float32)
    if looks_like_counts(X):
        if rows is None:
            totals = np.asarray(X.sum(axis=1)).ravel()
        else:
            totals = np.asarray(X[rows].sum(axis=1)).ravel()
        scale = np.divide(target_sum, totals, out=np.zeros_like(totals, dtype=np.float64), where=totals > 0)
        return np.log1p(sel * scale[:, None].astype(np.float32))
    if sel.size and sel.min() >= 0:
        return np.log1p(sel)
    return sel


def _layer_adata(layer):
    adata = layer.metadata.get("adata")
    if adata is None:
        raise SpatialDataError(
            f"layer {layer.name!r} carries no AnnData (metadata['adata']); open the slide with the "
            "napari-spatialssl reader to colour it by gene."
        )
    return adata


def _shown_rows(layer) -> np.ndarray:
    """Row in metadata['adata'] of every point (-1 for points added by hand)."""
    if "cell_index" in layer.features.columns:
        return layer.features["cell_index"].to_numpy(dtype=np.int64)
    return np.arange(len(layer.data), dtype=np.int64)


def color_by_gene(layer, gene: str, colormap: str = "magma",
                  percentiles: tuple[float, float] = (1.0, 99.5)) -> str:
    """Colour a Points layer by a gene's log-normalised expression; returns the feature column name.

    The values go into ``layer.features['<gene> (log-norm)']`` and the contrast limits are set at robust
    percentiles so that a few extreme cells do not wash the colours out.
    """
    adata = _layer_adata(layer)
    rows = _shown_rows(layer)
    valid = rows >= 0
    values = np.full(len(rows), np.nan, dtype=np.float32)
    values[valid] = gene_expression(adata, [gene], rows[valid])[:, 0]
    col = f"{gene} (log-norm)"
    features = layer.features.copy()
    features[col] = values
    layer.features = features  # assign the table so napari's colour manager sees the new column
    layer.face_color_mode = "direct"
    layer.face_colormap = colormap
    layer.face_color = col
    layer.face_color_mode = "colormap"
    layer.face_contrast_limits = robust_limits(values, percentiles)
    _border_follows_face(layer)
    layer.refresh_colors(update_color_mapping=False)
    layer.metadata["color_by"] = col
    return col


def _border_follows_face(layer) -> None:
    """Give the border the face's colours (see color_kwargs)."""
    layer.border_color_mode = "direct"
    layer.border_color = layer.face_color


def color_by_feature(layer, key: str) -> None:
    """Colour a Points layer by one of its features (categorical: palette / uns colours; numeric: viridis)."""
    adata = layer.metadata.get("adata")
    kw = color_kwargs(adata, layer.features, key)
    # Leave the current mode first: napari validates the new column against the current mode's mapping.
    layer.face_color_mode = "direct"
    if "face_color_cycle" in kw:
        layer.face_color_cycle = kw["face_color_cycle"]
        layer.face_color = key
        layer.face_color_mode = "cycle"
    else:
        layer.face_colormap = kw["face_colormap"]
        layer.face_color = key
        layer.face_color_mode = "colormap"
        layer.face_contrast_limits = kw["face_contrast_limits"]
    _border_follows_face(layer)
    layer.metadata["color_by"] = key


def rasterize_rowcol(rowcol: np.ndarray, values: np.ndarray, bin_size: float,
                     max_bins: int = 50_000_000) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``values`` (n, C) per square bin of side ``bin_size`` (units of the coordinates).

    Returns ``(grid (C, H, W) float32, origin (row0, col0))``: bin (i, j) covers
    ``[row0 + i*bin_size, row0 + (i+1)*bin_size)`` x the same in columns; empty bins are 0.
    Uses the core lattice rasteriser (:func:`napari_spatialssl.graphs.lattice.rasterize`).
    """
    from ..graphs.lattice import rasterize

    if not np.isfinite(bin_size) or bin_size <= 0:
        raise SpatialDataError(f"bin size must be a positive number (slide units), got {bin_size!r}.")
    rowcol = np.asarray(rowcol, dtype=np.float64)
    span = np.ptp(rowcol, axis=0) if len(rowcol) else np.zeros(2)
    n_bins = float(np.prod(np.floor(span / bin_size) + 1))
    if n_bins > max_bins:
        raise SpatialDataError(
            f"bin size {bin_size:g} gives a {int(span[0] // bin_size) + 1} x {int(span[1] // bin_size) + 1} "
            "image (too large); use a larger bin size."
        )
    grid, _occupancy, origin_xy, _ = rasterize(rowcol_to_xy(rowcol), values, float(bin_size))
    origin = np.array([origin_xy[1], origin_xy[0]], dtype=np.float64)  # (x0, y0) -> (row0, col0)
    return np.ascontiguousarray(np.moveaxis(grid, -1, 0)), origin


GENE_COLORMAPS = ("magenta", "green", "cyan", "yellow", "red", "blue")


def gene_image_layers(layer_or_adata, genes: Sequence[str], bin_size: float,
                      metadata: dict | None = None) -> list[LayerData]:
    """One Image layer per gene: mean log-normalised expression per ``bin_size`` square bin.

    ``bin_size`` is in the slide's coordinate units (micrometres for most imaging platforms, pixels when
    ``obsm['spatial']`` holds image pixels). Every cell is used, also when the Points layer shows a
    subsample. The images are placed (scale, translate) to overlay the reader's Points layer; several
    genes get additive blending and distinct colormaps.
    """
    if hasattr(layer_or_adata, "metadata") and hasattr(layer_or_adata, "features"):
        adata = _layer_adata(layer_or_adata)
        metadata = layer_or_adata.metadata
    else:
        adata = layer_or_adata
        metadata = metadata or {"spatial_key": "spatial", "section_key": None}
    genes = list(genes)
    if not genes:
        raise SpatialDataError("choose at least one gene for the gene image.")
    rowcol = display_coordinates(adata, metadata)
    expr = gene_expression(adata, genes)
    grid, origin = rasterize_rowcol(rowcol, expr, float(bin_size))
    out = []
    for c, gene in enumerate(genes):
        img = grid[c]
        occupied = img[img > 0]
        limits = robust_limits(occupied, (1.0, 99.5)) if occupied.size else (0.0, 1.0)
        out.append((
            img,
            {
                "name": f"{gene} (log-norm, bin {bin_size:g})",
                "scale": (bin_size, bin_size),
                "translate": tuple(origin + bin_size / 2.0),
                "colormap": GENE_COLORMAPS[c % len(GENE_COLORMAPS)] if len(genes) > 1 else "magma",
                "blending": "additive" if len(genes) > 1 else "translucent",
                "contrast_limits": limits,
                "metadata": {"gene": gene, "bin_size": float(bin_size)},
            },
            "image",
        ))
    return out
