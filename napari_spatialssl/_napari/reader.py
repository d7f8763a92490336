"""npe2 reader contribution: a slide becomes Points layers (see :mod:`.layers`).

`get_reader` claims `.h5ad` files and SpatialData `.zarr` stores (folders; recognised without spatialdata
installed, so that opening one without the extra says what to install). An `.h5ad` gives one layer named
after the file; a store gives one layer per table/region that annotates cells (circles, polygons, points
or labels), each cell at its centroid in the table's coordinate system (see :mod:`..data.stores`). Store
layers also carry what napari-spatialdata reads from a layer (``sdata``, ``name``, ``region_key``,
``instance_key``, ``table_names``, ``_current_cs``, ``_active_in_cs``, ``indices``), so its widgets work on
them. The reader validates with the core's functions; a bad input raises :class:`SpatialDataError` whose
message says what is wrong and how to fix it. napari shows that message (notification / reader dialog)
and keeps the viewer and its layers as they were.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from ..data.io import H5AD_SUFFIXES, SpatialDataError, read_h5ad
from ..data.stores import is_spatialdata_store, read_store_layers
from .layers import DEFAULT_MAX_POINTS, LayerData, adata_to_points


def _is_ours(path) -> bool:
    p = Path(path)
    if str(p).lower().endswith(H5AD_SUFFIXES) and not p.is_dir():
        return True
    return is_spatialdata_store(p)


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """Return :func:`read_slides_for_napari` when every path is an `.h5ad` file or a SpatialData store, else None."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths or not all(_is_ours(p) for p in paths):
        return None
    return read_slides_for_napari


def read_slides_for_napari(path: str | list[str]) -> list[LayerData]:
    """:func:`read_slides`, with each huge slide's overview image of every cell under its points layer."""
    from .big_slides import with_overviews

    return with_overviews(read_slides(path))


def read_slides(path: str | list[str]) -> list[LayerData]:
    """Read `.h5ad` files (one Points layer each, named after the file) and SpatialData stores (one
    Points layer per table/region)."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    layers: list[LayerData] = []
    for p in paths:
        if Path(p).is_dir():
            layers.extend(read_store(p))
        else:
            layers.append(read_slide(p))
    return layers


def read_store(path: str | os.PathLike, *, coordinate_system=None, section_key: str | None = "auto",
               color_by: str | None = "auto", max_points: int = DEFAULT_MAX_POINTS) -> list[LayerData]:
    """Points layer data for every table/region of a SpatialData store that annotates cells.

    One region of one table: the layer is named after the store; several: ``<store> [<table>: <region>]``.
    ``metadata['adata']`` is that region's slide in our format (``uns['spatialssl_store']`` says where it came
    from, for writing results back); the napari-spatialdata keys name the element and the store's SpatialData.
    """
    p = Path(path)
    entries = read_store_layers(p, coordinate_system=coordinate_system)
    out = []
    for entry in entries:
        name = p.stem if len(entries) == 1 else f"{p.stem} [{entry['table']}: {entry['region']}]"
        adata = entry["adata"]
        try:
            layer_data = adata_to_points(adata, name=name, section_key=section_key, color_by=color_by,
                                         max_points=max_points)
        except SpatialDataError as exc:
            msg = str(exc)
            if not msg.startswith(str(p)):
                msg = f"{p}: {msg}"
            raise SpatialDataError(msg) from None
        _add_spatialdata_metadata(layer_data, entry)
        meta = layer_data[1]["metadata"]
        if meta["overview"]:
            _notify(_overview_note(name, meta))
        out.append(layer_data)
    return out


def points_from_spatialdata_layer(metadata: dict, name: str, *, coordinate_system: str | None = None,
                                  section_key: str | None = "auto", color_by: str | None = "auto",
                                  max_points: int = DEFAULT_MAX_POINTS) -> LayerData:
    """Our Points layer data for a layer napari-spatialdata opened (its ``layer.metadata``: ``sdata``,
    ``adata``, ``name``, ``region_key``, ``instance_key``, ``_current_cs``): the element's cells at their
    centroids in the layer's coordinate system (or `coordinate_system`), with the same napari-spatialdata
    keys, so that the widget trains on it and results can go back into its store."""
    from ..data.stores import slide_from_layer_metadata

    adata = slide_from_layer_metadata(metadata, coordinate_system=coordinate_system, name=f"layer {name!r}")
    layer_data = adata_to_points(adata, name=name, section_key=section_key, color_by=color_by,
                                 max_points=max_points)
    src = adata.uns.get("spatialssl_store", {})
    region = str(metadata["name"]) if metadata.get("name") else None
    if metadata.get("sdata") is not None and region:
        cs = src.get("coordinate_system")
        _add_spatialdata_metadata(layer_data, {
            "adata": adata, "sdata": metadata["sdata"], "region": region, "region_key": src["region_key"],
            "instance_key": src["instance_key"], "coordinate_system": cs if isinstance(cs, str) else cs[region],
            "table_names": metadata.get("table_names") or ([src["table"]] if src.get("table") else []),
        })
    return layer_data


def _add_spatialdata_metadata(layer_data: LayerData, entry: dict) -> None:
    """The keys napari-spatialdata reads from a layer's metadata (see its ``get_sdata_circles``):
    the SpatialData, the element name, the table keys, the coordinate system, and the instance id of
    every point shown (points are placed in that coordinate system already, so no affine is needed)."""
    kwargs = layer_data[1]
    adata = entry["adata"]
    ids = adata.obs[entry["instance_key"]].to_numpy()
    features = kwargs.get("features")
    rows = features["cell_index"].to_numpy() if features is not None and "cell_index" in features else None
    shown = ids if rows is None else ids[rows]
    cs = entry["coordinate_system"]
    kwargs["metadata"].update({
        "sdata": entry["sdata"],
        "name": entry["region"],
        "region_key": entry["region_key"],
        "instance_key": entry["instance_key"],
        "table_names": list(entry["table_names"]),
        "_current_cs": cs,
        "_active_in_cs": {cs},
        "indices": shown.tolist(),
        "_n_indices": int(len(ids)),
        "_columns_df": None,
    })


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
    if meta["overview"]:
        _notify(_overview_note(p.name, meta))
    return layer_data


def _overview_note(name: str, meta: dict) -> str:
    from .big_slides import IN_VIEW_MAX_POINTS

    return (f"{name}: {meta['n_cells_total']:,} cells, drawn as an image of every cell; zoom in to under "
            f"{IN_VIEW_MAX_POINTS:,} cells in view to see the cells themselves.")


def _notify(message: str) -> None:
    """An info notification in napari (a no-op when napari is not running this reader)."""
    try:
        from napari.utils.notifications import show_info
    except ImportError:
        return
    show_info(message)
