"""AnnData <-> napari layers: cells as a Points layer, genes as colours or rasterised Image layers.

Conventions (see ARCHITECTURE.md):

- AnnData stores (x, y) in ``obsm['spatial']``; napari wants (row, col) = (y, x). The flip happens in
  :func:`xy_to_rowcol` / :func:`rowcol_to_xy` and nowhere else.
- Several sections are tiled side by side on a grid, never overlapping. A tiled 2D layout (rather than a
  slider axis) lets a user compare all sections at a glance, keeps every layer 2D (the widgets, the
  writer and the gene images all work on plain (row, col) points) and shows the whole slide in one
  screenshot. Each tile keeps the section's own geometry (shifted only), so distances stay in the
  slide's units (micrometres or pixels, whatever ``obsm['spatial']`` holds).
- obs columns become the layer's ``features`` (categoricals as ``category`` dtype) plus an integer
  ``cell_index`` column (the row in ``metadata['adata']``, -1 for points a user adds), so that results
  and exports map back to cells even after points are deleted.
- ``layer.metadata['adata']`` is the AnnData (the napari-spatialdata convention).
- Huge slides (more than ``max_points`` cells, default 2 million) show every cell: an overview image of
  all of them, and the real points of the cells in view when zoomed in (big_slides.py).

This module is the only place that knows the layout; it imports napari only inside the functions that
touch live layers, so building layer data stays cheap and testable without Qt.
"""

from __future__ import annotations

import colorsys
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..data.io import (
    SpatialDataError,
    is_unknown_label,
    check_obs_key,
    get_coordinates,
    resolve_section_key,
    section_codes,
)

LayerData = tuple  # (data, kwargs, layer_type), napari's LayerDataTuple

DEFAULT_MAX_POINTS = 2_000_000
"""Above this many cells the slide is drawn as an overview image plus the cells in view (big_slides.py):
napari draws millions of points at seconds per frame."""

LABEL_KEY_CANDIDATES = (
    "cell_type", "celltype", "cell_types", "Cell_type", "CellType", "cell_class", "Cell_class",
    "class", "subclass", "annotation", "cell_annotation", "labels", "label", "cluster", "clusters",
    "leiden", "louvain",
)
"""obs columns tried, in order, when a slide is coloured by cell type automatically."""

UNKNOWN_COLOR = "#6e6e6e"

# tab10 then its light variants (greys left out: grey means "unknown").
_BASE_PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5",
)
GAP_FRACTION = 0.08
"""Gap between tiles, as a fraction of the largest section's width / height."""


# --------------------------------------------------------------------------------------------------
# coordinates: the one place that flips (x, y) <-> (row, col)
# --------------------------------------------------------------------------------------------------

def xy_to_rowcol(xy: np.ndarray) -> np.ndarray:
    """(n, 2) slide coordinates (x, y) -> napari (row, col) = (y, x). The only flip in the package."""
    xy = np.asarray(xy)
    return xy[:, ::-1].copy()


def rowcol_to_xy(rowcol: np.ndarray) -> np.ndarray:
    """Inverse of :func:`xy_to_rowcol`."""
    return xy_to_rowcol(rowcol)


def tile_offsets(coords_xy: np.ndarray, codes: np.ndarray, n_sections: int,
                 gap_fraction: float = GAP_FRACTION, n_cols: int | None = None) -> np.ndarray:
    """Per-section (dx, dy) shifts that place sections on a grid without overlap.

    One section is left where it is (offset 0). For several, each section's bounding box is moved to a
    cell of a near-square grid (``n_cols`` columns) whose cells are as large as the largest section
    plus a gap. Returns (n_sections, 2) float64 in the slide's units; displayed = coords + offsets[code].
    """
    if n_sections <= 1:
        return np.zeros((max(n_sections, 1), 2))
    frame = pd.DataFrame({"x": coords_xy[:, 0], "y": coords_xy[:, 1], "s": codes})
    grouped = frame.groupby("s", sort=True)
    lo = grouped[["x", "y"]].min().reindex(range(n_sections)).to_numpy()
    hi = grouped[["x", "y"]].max().reindex(range(n_sections)).to_numpy()
    lo = np.nan_to_num(lo)
    hi = np.nan_to_num(hi)
    extent = (hi - lo).max(axis=0)
    extent = np.where(extent > 0, extent, 1.0)
    step = extent * (1.0 + gap_fraction)
    n_cols = n_cols or int(np.ceil(np.sqrt(n_sections)))
    k = np.arange(n_sections)
    origin = lo.min(axis=0)
    tile_xy = np.stack([k % n_cols, k // n_cols], axis=1) * step + origin
    return tile_xy - lo


def median_nn_distance(points: np.ndarray, max_queries: int = 20_000, max_tree: int = 250_000,
                       seed: int = 0) -> float:
    """Median distance from a cell to its nearest other cell (units of ``points``), from a sample of cells.

    Above ``max_tree`` points only the cells of randomly chosen square blocks (about 5,000 cells each,
    about ``max_tree`` in all) are used: inside a block every cell keeps its true neighbours (only block
    edges differ), unlike a random thinning, which would stretch the distances. Keeps this well under a
    second for millions of cells.
    """
    from ..graphs.spacing import section_neighbour_distances

    points = np.asarray(points, dtype=np.float64)
    if len(points) < 2:
        return 1.0
    d = section_neighbour_distances(points, 1, max_queries=max_queries, max_tree=max_tree, seed=seed)
    if d.size == 0:
        span = float(np.ptp(points, axis=0).max())
        return span / 100 if span > 0 else 1.0
    return float(np.median(d))


# --------------------------------------------------------------------------------------------------
# features and colours
# --------------------------------------------------------------------------------------------------

def obs_to_features(obs: pd.DataFrame, rows: np.ndarray | None = None) -> pd.DataFrame:
    """obs (optionally a subset of rows) as a napari features table.

    Categoricals stay ``category``; text columns with few distinct values become ``category`` (napari
    guesses colour modes from dtype); per-cell text (ids, barcodes) stays text. Adds ``cell_index``.
    """
    sub = obs if rows is None else obs.iloc[rows]
    feats = {}
    n = len(sub)
    for col in sub.columns:
        s = sub[col]
        if isinstance(s.dtype, pd.CategoricalDtype):
            s = s.cat.remove_unused_categories() if rows is not None else s
            feats[str(col)] = s.reset_index(drop=True)
        elif s.dtype == object or pd.api.types.is_string_dtype(s.dtype):
            nunique = s.nunique(dropna=True)
            if nunique <= max(2, min(1000, n // 2)):
                feats[str(col)] = s.astype("category").reset_index(drop=True)
            else:
                feats[str(col)] = s.astype(str).reset_index(drop=True)
        else:
            feats[str(col)] = s.reset_index(drop=True)
    feats["cell_index"] = pd.Series(np.arange(len(obs)) if rows is None else np.asarray(rows), dtype=np.int64)
    return pd.DataFrame(feats)


def feature_defaults(features: pd.DataFrame) -> dict[str, Any]:
    """Values napari gives points a user adds by hand: missing labels / numbers, ``cell_index`` -1."""
    out: dict[str, Any] = {}
    for col in features.columns:
        s = features[col]
        if col == "cell_index":
            out[col] = -1
        elif isinstance(s.dtype, pd.CategoricalDtype) or pd.api.types.is_float_dtype(s.dtype):
            out[col] = np.nan
        else:
            out[col] = s.iloc[0] if len(s) else None
    return out


def stable_palette(n: int) -> list[str]:
    """``n`` distinct hex colours that depend only on ``n`` (tab10 and light tab10, then golden-ratio hues)."""
    colours = list(_BASE_PALETTE[:n])
    k = 0
    while len(colours) < n:
        hue = (0.11 + 0.618033988749895 * k) % 1.0
        sat = (0.55, 0.85, 0.40)[k % 3]
        val = (0.95, 0.75, 0.85)[(k // 3) % 3]
        r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
        colours.append("#%02x%02x%02x" % (int(r * 255), int(g * 255), int(b * 255)))
        k += 1
    return colours



def category_colors(adata, key: str) -> dict[str, str]:
    """Colour for every category of ``obs[key]``: ``uns['<key>_colors']`` when it matches, else a stable palette.

    The palette follows the category order (sorted when the column is not categorical) and gives
    "unknown" values (``Excluded``, ``Ambiguous``, ``nan``...) a neutral grey.
    """
    check_obs_key(adata, key, what="colour key")
    values = adata.obs[key]
    cats = list(values.cat.categories) if isinstance(values.dtype, pd.CategoricalDtype) else sorted(
        pd.unique(values.dropna().astype(str)))
    stored = adata.uns.get(f"{key}_colors") if hasattr(adata, "uns") else None
    if stored is not None and len(stored) >= len(cats):
        return {str(c): _to_hex(col) for c, col in zip(cats, stored)}
    known = [c for c in cats if not is_unknown_label(c)]
    palette = dict(zip(map(str, known), stable_palette(len(known))))
    return {str(c): palette.get(str(c), UNKNOWN_COLOR) for c in cats}


def _to_hex(colour) -> str:
    from matplotlib.colors import to_hex

    try:
        return to_hex(colour, keep_alpha=False)
    except (ValueError, TypeError):
        return UNKNOWN_COLOR


def detect_label_key(obs: pd.DataFrame) -> str | None:
    """The obs column to colour by when none is given: a cell-type-like name, else the first categorical
    column with 2 to 200 values (not the section column), else None."""
    lower = {c.lower(): c for c in obs.columns}
    for cand in LABEL_KEY_CANDIDATES:
        col = lower.get(cand.lower())
        if col is not None and 2 <= obs[col].nunique(dropna=True) <= 1000:
            return col
    for col in obs.columns:
        if isinstance(obs[col].dtype, pd.CategoricalDtype) and 2 <= len(obs[col].cat.categories) <= 200:
            return col
    return None


# --------------------------------------------------------------------------------------------------
# AnnData -> Points layer data
# --------------------------------------------------------------------------------------------------

def adata_to_points(
    adata,
    *,
    name: str = "cells",
    spatial_key: str = "spatial",
    coord_columns: Sequence[str] | None = None,
    section_key: str | None = "auto",
    color_by: str | None = "auto",
    max_points: int = DEFAULT_MAX_POINTS,
    seed: int = 0,
) -> LayerData:
    """Points layer data ``(data, kwargs, 'points')`` for one AnnData (one or several sections).

    Parameters
    ----------
    adata : AnnData with coordinates in ``obsm[spatial_key]`` (x, y) or in the obs columns ``coord_columns``.
    section_key : obs column of section ids; 'auto' detects common names; None = one section.
    color_by : obs column to colour by; 'auto' picks a cell-type-like column; None = plain colour.
    max_points : above this many cells the layer holds only the cells in view, over an overview image of
        every cell (big_slides.py); ``seed`` draws the cells that measure the point size.

    Raises :class:`SpatialDataError` (clear message) for missing / non-numeric / non-finite coordinates,
    unknown section or colour keys.
    """
    coords = get_coordinates(adata, spatial_key=spatial_key, coord_columns=coord_columns, name=name)
    skey = resolve_section_key(adata, section_key, name=name)
    codes, sec_names = section_codes(adata, skey)
    offsets = tile_offsets(coords, codes, len(sec_names))
    n_total = adata.n_obs

    data = xy_to_rowcol(coords + offsets[codes]).astype(np.float32)
    size = median_nn_distance(data.astype(np.float64), seed=seed)
    features = obs_to_features(adata.obs, None)
    huge = n_total > max_points

    metadata = {
        "adata": adata,
        "spatial_key": spatial_key,
        "coord_columns": list(coord_columns) if coord_columns is not None else None,
        "section_key": skey,
        "section_names": sec_names,
        "tile_offsets_xy": {s: tuple(map(float, offsets[i])) for i, s in enumerate(sec_names)},
        "point_size": size,
        "n_cells_total": n_total,
        "subsampled": False,  # every cell is drawn; above max_points as an overview image + the cells in view
        "overview": huge,
        "layout": "tiled" if len(sec_names) > 1 else "single",
    }
    kwargs: dict[str, Any] = {
        "name": name,
        "features": features,
        "feature_defaults": feature_defaults(features),
        "size": size,
        "border_width": 0,
        "metadata": metadata,
    }
    key = detect_label_key(adata.obs) if color_by == "auto" else color_by
    if key:
        kwargs.update(color_kwargs(adata, features, key))
        metadata["color_by"] = key
    else:
        kwargs["face_color"] = kwargs["border_color"] = "#e0e0e0"
        metadata["color_by"] = None
    if huge:  # napari draws millions of points at seconds per frame: an overview image and the cells in view
        from .big_slides import slide_overview

        slide_overview(data, features, kwargs, adata, key)
        data = np.zeros((0, 2), np.float32)
    return data, kwargs, "points"


def color_kwargs(adata, features: pd.DataFrame, key: str) -> dict[str, Any]:
    """napari face-colour keyword arguments that colour points by the feature ``key``.

    Categorical / text columns: one colour per category (see :func:`category_colors`). Numbers: the
    'viridis' colormap with contrast limits at the 1st and 99th percentiles.
    """
    if key not in features.columns:
        raise SpatialDataError(
            f"colour key {key!r} is not an obs column / layer feature; available: {list(features.columns)[:30]}."
        )
    col = features[key]
    if isinstance(col.dtype, pd.CategoricalDtype) or col.dtype == object or pd.api.types.is_bool_dtype(col):
        if adata is not None and key in adata.obs.columns:
            cmap = category_colors(adata, key)
        else:
            cats = sorted(pd.unique(col.dropna().astype(str)))
            cmap = dict(zip(cats, stable_palette(len(cats))))
        if pd.api.types.is_bool_dtype(col):
            cmap = {k_: v for k_, v in zip((False, True), stable_palette(2))}
        # the border follows the face: napari draws a border of about a pixel even at width 0, and
        # its default dim grey would cover points that are a pixel or two wide at overview zoom
        return {"face_color": key, "face_color_cycle": cmap, "border_color": key, "border_color_cycle": cmap}
    values = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64)
    limits = robust_limits(values)
    return {"face_color": key, "face_colormap": "viridis", "face_contrast_limits": limits,
            "border_color": key, "border_colormap": "viridis", "border_contrast_limits": limits}


def robust_limits(values: np.ndarray, percentiles: tuple[float, float] = (1.0, 99.0)) -> tuple[float, float]:
    """Contrast limits at robust percentiles of the finite values (never equal)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(v, percentiles)
    if hi <= lo:
        lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def display_coordinates(adata, metadata: dict) -> np.ndarray:
    """(n_cells, 2) (row, col) display coordinates of every cell of ``adata`` in a reader layer's layout."""
    coords = get_coordinates(adata, spatial_key=metadata.get("spatial_key", "spatial"),
                             coord_columns=metadata.get("coord_columns"))
    codes, names = section_codes(adata, metadata.get("section_key"))
    offs = metadata.get("tile_offsets_xy") or {}
    table = np.array([offs.get(s, (0.0, 0.0)) for s in names], dtype=np.float64).reshape(-1, 2)
    return xy_to_rowcol(coords + table[codes])
