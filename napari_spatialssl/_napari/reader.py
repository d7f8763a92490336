"""npe2 reader contribution: an `.h5ad` slide becomes a Points layer (see :mod:`.layers`).

`get_reader` claims only `.h5ad` paths. The reader function validates the file with the core's
:func:`read_h5ad` / :func:`get_coordinates`; a bad file raises :class:`SpatialDataError` whose message says
what is wrong and how to fix it. napari shows that message (notification / reader dialog) and keeps the
viewer and its layers as they were.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from ..data.io import H5AD_SUFFIXES, SpatialDataError, read_h5ad
from .layers import DEFAULT_MAX_POINTS, LayerData, adata_to_points


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """Return :func:`read_slides` when every path is an `.h5ad` file, else None (not ours)."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths or not all(str(p).lower().endswith(H5AD_SUFFIXES) for p in paths):
        return None
    return read_slides


def read_slides(path: str | list[str]) -> list[LayerData]:
    """Read one or several `.h5ad` files; one Points layer per file, named after the file."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    return [read_slide(p) for p in paths]


# obs column pairs (x, y) used when a file has no obsm['spatial'] (common exports of imaging platforms).
COORD_COLUMN_CANDIDATES = (
    ("x", "y"), ("X", "Y"), ("center_x", "center_y"), ("x_centroid", "y_centroid"), ("global_x", "global_y"),
    ("x_um", "y_um"), ("centroid_x", "centroid_y"), ("spatial_x", "spatial_y"),
)


def detect_coord_columns(adata, spatial_key: str = "spatial") -> tuple[str, str] | None:
    """None when ``obsm[spatial_key]`` exists; else the first known (x, y) obs column pair, or None."""
    if spatial_key in adata.obsm:
        return None
    for pair in COORD_COLUMN_CANDIDATES:
        if all(c in adata.obs.columns for c in pair):
            return pair
    return None


def read_slide(path: str | os.PathLike, *, section_key: str | None = "auto", color_by: str | None = "auto",
               spatial_key: str = "spatial", coord_columns="auto", max_points: int = DEFAULT_MAX_POINTS,
               name: str | None = None) -> LayerData:
    """Points layer data for one slide file. Raises :class:`SpatialDataError` with a clear message.

    ``coord_columns='auto'`` uses ``obsm[spatial_key]`` and, only when that is missing, a known pair of obs
    columns such as ``x``/``y`` or ``center_x``/``center_y``; pass two names to choose, None to require obsm.
    """
    p = Path(path)
    adata = read_h5ad(p)
    if isinstance(coord_columns, str) and coord_columns == "auto":
        coord_columns = detect_coord_columns(adata, spatial_key)
    try:
        layer_data = adata_to_points(adata, name=name or p.stem, spatial_key=spatial_key,
                                     coord_columns=coord_columns, section_key=section_key, color_by=color_by,
                                     max_points=max_points)
    except SpatialDataError as exc:
        msg = str(exc)
        # Name the file, not the in-memory object, in messages napari shows to the user.
        if not msg.startswith(str(p)):
            msg = f"{p}: {msg}"
        raise SpatialDataError(msg) from None
    meta = layer_data[1]["metadata"]
    if meta["subsampled"]:
        _notify(f"{p.name}: {meta['n_cells_total']:,} cells; showing a random {len(layer_data[0]):,} for speed "
                "(training, gene images and exports use every cell).")
    return layer_data


def _notify(message: str) -> None:
    """An info notification in napari (a no-op when napari is not running this reader)."""
    try:
        from napari.utils.notifications import show_info
    except ImportError:
        return
    show_info(message)
