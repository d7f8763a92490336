"""SpatialData `.zarr` stores: a table's cells read as a slide, and results written back as a table.

A SpatialData store (written by ``spatialdata`` / ``spatialdata-io`` for Xenium, MERSCOPE, CosMx, Visium...)
holds elements (``shapes``, ``points``, ``labels``, ``images``) and tables. A table (AnnData) *annotates*
one or more elements, its *regions*: ``obs[region_key]`` says which region a row belongs to and
``obs[instance_key]`` which instance (circle, polygon, point or label id) of it. Each element maps to one
or more named *coordinate systems* through transformations.

:func:`read_store` turns one table into a slide in our format: the cells are the table's rows, their
coordinates (``obsm['spatial']``, x, y) the centroids of the annotated instances in the chosen coordinate
system, transformations applied; obs keeps the table's columns and ``uns['spatialssl_store']`` records
where the slide came from, so that :func:`write_results_to_store` can write the results back as a table
annotating the same region(s). The validation is the one `.h5ad` files get (:func:`~.io.get_coordinates`);
errors are :class:`~.io.SpatialDataError` naming the store and what to do.

spatialdata is an optional extra (``pip install 'napari-spatialssl[spatialdata]'``) imported only inside
the functions that need it; :func:`is_spatialdata_store` needs nothing beyond the standard library, so the
napari reader can claim a store and say which extra to install.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import json
import os
import shutil
import sys
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from .io import H5AD_SUFFIXES, SpatialDataError, get_coordinates, read_h5ad

EXTRA_HINT = "pip install 'napari-spatialssl[spatialdata]'"
UNS_KEY = "spatialssl_store"  # uns entry recording the store, table, regions, keys and coordinate system
ELEMENT_TYPES = ("shapes", "points", "labels")  # element types whose instances are cells
STORE_GROUPS = ("images", "labels", "points", "shapes", "tables")
DEFAULT_TABLE_NAME = "spatialssl"
DEFAULT_COORDINATE_SYSTEM = "global"  # spatialdata's default name, preferred when several are shared
SECTION_COLUMN = "section"  # added for tables over several regions, so that graphs never join regions


# --------------------------------------------------------------------------------------------------
# recognising a store (standard library only)
# --------------------------------------------------------------------------------------------------

def _group_attrs(path: Path) -> dict | None:
    """Attributes of the zarr group at `path` (zarr v3 `zarr.json` or v2 `.zgroup`), None if not a group."""
    zj = path / "zarr.json"
    if zj.is_file():
        meta = json.loads(zj.read_text())
        if meta.get("node_type") != "group":
            return None
        return meta.get("attributes") or {}
    if (path / ".zgroup").is_file():
        za = path / ".zattrs"
        return json.loads(za.read_text()) if za.is_file() else {}
    return None


def _is_group(path: Path) -> bool:
    try:
        return path.is_dir() and _group_attrs(path) is not None
    except (OSError, ValueError):
        return False


def is_spatialdata_store(path: str | os.PathLike) -> bool:
    """Whether `path` is a SpatialData zarr store: a zarr group folder whose attributes carry
    ``spatialdata_attrs`` or that holds an images / labels / points / shapes / tables group."""
    p = Path(path)
    if not p.is_dir():
        return False
    try:
        attrs = _group_attrs(p)
    except (OSError, ValueError):
        return False
    if attrs is None:
        return False
    return "spatialdata_attrs" in attrs or any(_is_group(p / g) for g in STORE_GROUPS)


def _zarr_format(p: Path) -> int:
    return 3 if (p / "zarr.json").is_file() else 2


def _has_consolidated_metadata(p: Path) -> bool:
    if _zarr_format(p) == 3:
        return json.loads((p / "zarr.json").read_text()).get("consolidated_metadata") is not None
    return (p / ".zmetadata").is_file()


# --------------------------------------------------------------------------------------------------
# opening a store
# --------------------------------------------------------------------------------------------------

def _spatialdata(path):
    """The spatialdata module, or a SpatialDataError saying which extra to install."""
    try:
        import spatialdata
    except ImportError:
        raise SpatialDataError(
            f"{path}: is a SpatialData store; reading or writing stores needs the optional spatialdata packages: "
            f"{EXTRA_HINT}"
        ) from None
    return spatialdata


def _check_store(path) -> Path:
    p = Path(path)
    if not p.exists():
        raise SpatialDataError(f"{p}: not found; check the path.")
    if not p.is_dir():
        raise SpatialDataError(
            f"{p}: is a file, not a SpatialData .zarr store (a folder); pass the store folder or an .h5ad file."
        )
    if not is_spatialdata_store(p):
        raise SpatialDataError(
            f"{p}: not a SpatialData store (no zarr group with tables, shapes, points, labels or images); "
            "write one with spatialdata.SpatialData.write or spatialdata-io, or pass an .h5ad file."
        )
    return p


def _as_list(region) -> list[str]:
    if region is None:
        return []
    if isinstance(region, str):
        return [region]
    return [str(r) for r in np.asarray(region).ravel().tolist()]


def _table_names(p: Path) -> list[str]:
    tables = p / "tables"
    if not tables.is_dir():
        return []
    return sorted(c.name for c in tables.iterdir() if not c.name.startswith(".") and _is_group(c))


def _table_keys(p: Path, name: str) -> dict:
    """region(s), region_key, instance_key and n_cells of a table, from its zarr metadata (no data read)."""
    import zarr

    g = zarr.open_group(str(p / "tables" / name), mode="r")
    attrs = dict(g.attrs)
    if "spatialdata_attrs" in attrs:  # some writers nest them
        attrs = {**attrs, **dict(attrs["spatialdata_attrs"])}
    if attrs.get("region") is None and "uns" in g and "spatialdata_attrs" in g["uns"]:
        from anndata.io import read_elem

        attrs.update(read_elem(g["uns"]["spatialdata_attrs"]))
    n_cells = 0
    if "obs" in g:
        obs = g["obs"]
        index = dict(obs.attrs).get("_index", "_index")
        if index in obs:
            n_cells = int(obs[index].shape[0])
    return {"regions": _as_list(attrs.get("region")), "region_key": attrs.get("region_key"),
            "instance_key": attrs.get("instance_key"), "n_cells": n_cells}


def _element_type(p: Path, region: str) -> str | None:
    for kind in ELEMENT_TYPES + ("images",):
        if _is_group(p / kind / region):
            return kind
    return None


@contextlib.contextmanager
def _no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _read_elements(sd, p: Path, kinds: Iterable[str]) -> dict[str, Any]:
    """name -> element for every element of the given types (points and labels stay lazy)."""
    kinds = tuple(sorted(set(kinds)))
    if not kinds:
        return {}
    try:
        with _no_warnings():
            sdata = sd.read_zarr(p, selection=kinds)
    except Exception as exc:  # spatialdata raises many types for damaged stores
        raise SpatialDataError(f"{p}: could not read its {', '.join(kinds)} ({exc}); check the store.") from exc
    out: dict[str, Any] = {}
    for kind in kinds:
        out.update(getattr(sdata, kind))
    return out


def _coordinate_systems(element) -> list[str]:
    from spatialdata.transformations import get_transformation

    return sorted(get_transformation(element, get_all=True))


def _describe(info: dict) -> str:
    regions = ", ".join(f"{r} ({info['element_types'].get(r) or 'missing'})" for r in info["regions"]) or "none"
    return f"{info['table']!r} ({info['n_cells']:,} cells; regions: {regions})"


def _usable(info: dict) -> bool:
    return bool(info["regions"]) and bool(info["region_key"]) and bool(info["instance_key"]) and all(
        info["element_types"].get(r) in ELEMENT_TYPES for r in info["regions"])


def _infos(p: Path, sd) -> tuple[list[dict], dict[str, Any]]:
    """Per-table descriptions and the elements they annotate (read once)."""
    keys = {name: _table_keys(p, name) for name in _table_names(p)}
    types = {r: _element_type(p, r) for k in keys.values() for r in k["regions"]}
    elements = _read_elements(sd, p, {t for t in types.values() if t in ELEMENT_TYPES})
    infos = []
    for name, k in keys.items():
        cs = {r: _coordinate_systems(elements[r]) for r in k["regions"] if r in elements}
        common = sorted(set.intersection(*(set(v) for v in cs.values()))) if cs else []
        infos.append({"table": name, **k, "element_types": {r: types[r] for r in k["regions"]},
                      "coordinate_systems": cs, "common_coordinate_systems": common})
    return infos, elements


def list_tables(path: str | os.PathLike) -> list[dict]:
    """The tables of a store, each as a dict: ``table`` (name), ``regions`` (the elements it annotates),
    ``region_key``, ``instance_key``, ``n_cells``, ``element_types`` (region -> 'shapes' / 'points' /
    'labels' / 'images' / None when absent), ``coordinate_systems`` (region -> names) and
    ``common_coordinate_systems`` (those every region has), plus ``usable`` (it annotates cells that
    :func:`read_store` can place)."""
    p = _check_store(path)
    sd = _spatialdata(p)
    infos, _ = _infos(p, sd)
    for info in infos:
        info["usable"] = _usable(info)
    return infos


# --------------------------------------------------------------------------------------------------
# choosing a table, regions and coordinate system
# --------------------------------------------------------------------------------------------------

def _choose_table(p: Path, infos: list[dict], table: str | None) -> dict:
    usable = [i for i in infos if _usable(i)]
    if table is not None:
        match = [i for i in infos if i["table"] == table]
        if not match:
            names = [i["table"] for i in infos]
            raise SpatialDataError(f"{p}: no table {table!r}; the store has {names or 'no tables'}.")
        info = match[0]
        if not _usable(info):
            raise SpatialDataError(f"{p}: table {_describe(info)} {_why_unusable(info)}")
        return info
    if not usable:
        if not infos:
            raise SpatialDataError(
                f"{p}: holds no table, so no cells with expression; add a table annotating the cell shapes "
                "(spatialdata.models.TableModel.parse(adata, region=..., region_key=..., instance_key=...))."
            )
        raise SpatialDataError(
            f"{p}: no table annotates cells (shapes, points or labels): "
            + "; ".join(f"{_describe(i)} {_why_unusable(i)}" for i in infos)
        )
    if len(usable) > 1:
        raise SpatialDataError(
            f"{p}: has {len(usable)} tables: " + "; ".join(_describe(i) for i in usable)
            + "; choose one with table='NAME' (CLI: --table NAME)."
        )
    return usable[0]


def _why_unusable(info: dict) -> str:
    if not info["regions"] or not info["region_key"] or not info["instance_key"]:
        return ("annotates no element (no region / region_key / instance_key); set them with "
                "spatialdata.models.TableModel.parse.")
    bad = {r: t for r, t in info["element_types"].items() if t not in ELEMENT_TYPES}
    missing = [r for r, t in bad.items() if t is None]
    if missing:
        return f"annotates {missing}, which the store does not hold."
    return f"annotates {sorted(bad)}, which are {sorted(set(bad.values()))}, not cell shapes, points or labels."


def _choose_regions(p: Path, info: dict, region) -> list[str]:
    if region is None:
        return list(info["regions"])
    wanted = _as_list(region)
    unknown = [r for r in wanted if r not in info["regions"]]
    if unknown:
        raise SpatialDataError(
            f"{p}: table {info['table']!r} does not annotate {unknown}; its regions are {info['regions']}."
        )
    return wanted


def _choose_coordinate_systems(p: Path, info: dict, regions: list[str], requested) -> dict[str, str]:
    """region -> coordinate system. A name applies to every region; a dict names one per region; None
    takes the one all regions share (or 'global' among several), else each region's only one."""
    cs = {r: info["coordinate_systems"][r] for r in regions}
    where = f"{p}: table {info['table']!r}"
    if isinstance(requested, dict):
        missing = [r for r in regions if r not in requested]
        if missing:
            raise SpatialDataError(f"{where}: coordinate_system has no entry for region(s) {missing}.")
        chosen = {r: str(requested[r]) for r in regions}
    elif requested is not None:
        chosen = {r: str(requested) for r in regions}
    else:
        common = sorted(set.intersection(*(set(v) for v in cs.values())))
        if len(common) == 1:
            chosen = {r: common[0] for r in regions}
        elif DEFAULT_COORDINATE_SYSTEM in common:
            chosen = {r: DEFAULT_COORDINATE_SYSTEM for r in regions}
        elif len(common) > 1:
            raise SpatialDataError(
                f"{where}: its regions are in several coordinate systems {common}; choose one with "
                "coordinate_system='NAME' (CLI: --coordinate-system NAME)."
            )
        elif all(len(v) == 1 for v in cs.values()):  # regions in separate systems (e.g. one per sample)
            chosen = {r: v[0] for r, v in cs.items()}
        else:
            raise SpatialDataError(
                f"{where}: its regions share no coordinate system ({cs}); pass coordinate_system as a dict "
                "region -> name."
            )
    bad = {r: c for r, c in chosen.items() if c not in cs[r]}
    if bad:
        raise SpatialDataError(
            f"{where}: coordinate system {sorted(set(bad.values()))} not available for region(s) {sorted(bad)}; "
            f"available: {cs}."
        )
    return chosen


# --------------------------------------------------------------------------------------------------
# centroids and the slide
# --------------------------------------------------------------------------------------------------

def _centroids(element, coordinate_system: str) -> pd.DataFrame:
    """x, y of every instance of `element` in `coordinate_system` (transformation applied), indexed by id."""
    import spatialdata as sd

    with _no_warnings():
        df = sd.get_centroids(element, coordinate_system=coordinate_system)
    df = df.compute() if hasattr(df, "compute") else df
    return pd.DataFrame(df[["x", "y"]].to_numpy(dtype=np.float64), index=pd.Index(df.index))


def _positions(element_ids: pd.Index, table_ids: pd.Series) -> np.ndarray:
    """Row of each table instance id in the element's ids (-1 when absent); ids compared as strings when
    their dtypes differ (an int label id against a string cell id)."""
    ids = pd.Index(element_ids)
    values = pd.Index(table_ids.to_numpy())
    pos = ids.get_indexer(values)
    if len(values) and (pos < 0).all() and ids.dtype != values.dtype:
        pos = pd.Index(ids.astype(str)).get_indexer(values.astype(str))
    return pos


def _as_slide(table, elements: dict, regions: list[str], region_key: str, instance_key: str,
              coordinate_systems: dict[str, str], label: str, source: dict, *, own: bool = False):
    """The rows of `table` annotating `regions`, in our format (see module docstring). ``own``: `table` was
    read for this slide alone, so it is filled in place when every row is kept (no copy of X)."""
    for key, what in ((region_key, "region_key"), (instance_key, "instance_key")):
        if key not in table.obs.columns:
            raise SpatialDataError(f"{label}: {what} column {key!r} is not in the table's obs; "
                                   f"columns: {list(table.obs.columns)[:20]}.")
    region_values = table.obs[region_key].astype(str).to_numpy()
    keep = np.isin(region_values, regions)
    if not keep.any():
        raise SpatialDataError(f"{label}: holds no cells (no table row annotates {regions}).")
    adata = table[keep].copy() if not keep.all() else (table if own else table.copy())
    region_values = region_values[keep]
    ids = adata.obs[instance_key]
    coords = np.full((adata.n_obs, 2), np.nan)
    for region in regions:  # a handful of regions; each is matched in one vectorised lookup
        rows = np.flatnonzero(region_values == region)
        if not len(rows):
            continue
        cen = _centroids(elements[region], coordinate_systems[region])
        if not cen.index.is_unique:
            raise SpatialDataError(f"{label}: region {region!r} has duplicated instance ids; its index must be unique.")
        pos = _positions(cen.index, ids.iloc[rows])
        missing = pos < 0
        if missing.any():
            first = ids.iloc[rows[missing][:5]].tolist()
            raise SpatialDataError(
                f"{label}: {int(missing.sum())} of {len(rows)} table rows of region {region!r} name no instance of "
                f"it (obs[{instance_key!r}] e.g. {first}); match the table to the element first "
                "(spatialdata.match_table_to_element)."
            )
        coords[rows] = cen.to_numpy()[pos]
    if "spatial" in adata.obsm:
        old = np.asarray(adata.obsm["spatial"])
        if old.shape != coords.shape or not np.allclose(old[:, :2], coords, equal_nan=True):
            adata.obsm["spatial_table"] = old  # the table's own coordinates, kept when it is written back
    adata.obsm["spatial"] = coords
    added = []
    if len(regions) > 1 and SECTION_COLUMN not in adata.obs.columns:
        adata.obs[SECTION_COLUMN] = pd.Categorical(region_values)
        added.append(SECTION_COLUMN)
    cs_values = sorted(set(coordinate_systems[r] for r in regions))
    adata.uns[UNS_KEY] = {
        **source,
        "regions": list(regions),
        "region_key": region_key,
        "instance_key": instance_key,
        "coordinate_system": cs_values[0] if len(cs_values) == 1 else {r: coordinate_systems[r] for r in regions},
        "added_columns": added,
    }
    get_coordinates(adata, name=label)  # the .h5ad checks: shape, numbers, NaN / inf
    return adata


def _read_table(p: Path, name: str):
    import anndata as ad

    try:
        with _no_warnings():
            table = ad.read_zarr(p / "tables" / name)
    except Exception as exc:
        raise SpatialDataError(f"{p}: table {name!r} could not be read ({exc}); check the store.") from exc
    # as spatialdata reads tables: several regions come back from zarr as an array, keys left out when None
    keys = _table_keys(p, name)
    attrs = dict(table.uns.get("spatialdata_attrs", {}))
    region = keys["regions"] if len(keys["regions"]) != 1 else keys["regions"][0]
    attrs.update({"region": region or None, "region_key": keys["region_key"], "instance_key": keys["instance_key"]})
    table.uns["spatialdata_attrs"] = attrs
    return table


def read_store(path: str | os.PathLike, table: str | None = None, coordinate_system: str | dict | None = None,
               name: str | None = None, *, region: str | list[str] | None = None):
    """A table of a SpatialData store as a slide (AnnData in our format).

    table: which table (needed when several annotate cells; the error lists them).
    coordinate_system: where the centroids are computed: a name, a dict region -> name, or None = the one
    the regions share ('global' when they share several); transformations are applied.
    region: only these regions of the table (default: all).
    name: how messages name the slide (default: the store path and table).

    Returns an AnnData: the table's rows of those regions (X, var, obs, layers, obsm as stored),
    ``obsm['spatial']`` the centroids (x, y; the table's own ``obsm['spatial']``, when different, kept as
    ``obsm['spatial_table']``), ``obs['section']`` = region when there are several regions and no such
    column, and ``uns['spatialssl_store']`` = {path, table, regions, region_key, instance_key,
    coordinate_system, element_types, added_columns}.
    """
    p = _check_store(path)
    sd = _spatialdata(p)
    infos, elements = _infos(p, sd)
    info = _choose_table(p, infos, table)
    regions = _choose_regions(p, info, region)
    chosen = _choose_coordinate_systems(p, info, regions, coordinate_system)
    label = name or f"{p} (table {info['table']!r})"
    t = _read_table(p, info["table"])
    if t.n_obs == 0:
        raise SpatialDataError(f"{label}: holds no cells (n_obs = 0).")
    source = {"path": str(p.resolve()), "table": info["table"],
              "element_types": {r: info["element_types"][r] for r in regions}}
    return _as_slide(t, elements, regions, info["region_key"], info["instance_key"], chosen, label, source,
                     own=True)


def read_store_layers(path: str | os.PathLike, *, coordinate_system: str | dict | None = None) -> list[dict]:
    """Every (table, region) of a store that annotates cells, read once: a list of dicts with ``table``,
    ``region``, ``adata`` (as :func:`read_store` with that region), ``sdata`` (an in-memory SpatialData of
    those tables and elements, its path the store: what napari-spatialdata reads from a layer),
    ``coordinate_system``, ``table_names`` (the tables annotating that region), ``region_key`` and
    ``instance_key``. This is what the napari reader turns into one layer per table/region."""
    p = _check_store(path)
    sd = _spatialdata(p)
    infos, elements = _infos(p, sd)
    usable = [i for i in infos if _usable(i)]
    if not usable:
        _choose_table(p, infos, None)  # raises the message saying why
    tables = {i["table"]: _read_table(p, i["table"]) for i in usable}
    used = {r for i in usable for r in i["regions"]}
    kinds = {r: i["element_types"][r] for i in usable for r in i["regions"]}
    with _no_warnings():
        sdata = sd.SpatialData(**{k: {r: elements[r] for r in used if kinds[r] == k} for k in ELEMENT_TYPES},
                               tables=tables)
    sdata.path = p
    out = []
    for info in usable:
        for region in info["regions"]:
            cs = _choose_coordinate_systems(p, info, [region], coordinate_system)
            label = f"{p} (table {info['table']!r}, region {region!r})"
            source = {"path": str(p.resolve()), "table": info["table"],
                      "element_types": {region: info["element_types"][region]}}
            adata = _as_slide(tables[info["table"]], elements, [region], info["region_key"], info["instance_key"],
                              cs, label, source)
            out.append({"table": info["table"], "region": region, "adata": adata, "sdata": sdata,
                        "coordinate_system": cs[region], "region_key": info["region_key"],
                        "instance_key": info["instance_key"],
                        "table_names": sorted(i["table"] for i in usable if region in i["regions"])})
    return out


def read_slide(path: str | os.PathLike, *, table: str | None = None, coordinate_system=None,
               region=None, name: str | None = None, backed: bool = False):
    """One slide from an `.h5ad` file (:func:`~.io.read_h5ad`) or a SpatialData store (:func:`read_store`)."""
    p = Path(path)
    if p.suffix.lower() in H5AD_SUFFIXES and not p.is_dir():
        store_only = {k: v for k, v in (("table", table), ("coordinate_system", coordinate_system),
                                         ("region", region)) if v is not None}
        if store_only:
            raise SpatialDataError(f"{p}: {', '.join(store_only)} apply to SpatialData stores only, not .h5ad files.")
        return read_h5ad(p, backed=backed)
    if p.is_dir() and is_spatialdata_store(p):
        if backed:
            raise SpatialDataError(f"{p}: backed mode applies to .h5ad files only.")
        return read_store(p, table=table, coordinate_system=coordinate_system, name=name, region=region)
    if not p.exists():
        raise SpatialDataError(f"{p}: file not found; check the path.")
    if p.is_dir():
        _check_store(p)  # raises: a folder that is no SpatialData store
    raise SpatialDataError(
        f"{p}: not an .h5ad file or a SpatialData .zarr store (suffix {p.suffix or 'none'!r}); convert it to "
        "AnnData (e.g. scanpy.read_csv(...).write_h5ad('slide.h5ad'))."
    )


# --------------------------------------------------------------------------------------------------
# napari-spatialdata layers
# --------------------------------------------------------------------------------------------------

def is_spatialdata_layer_metadata(metadata: dict) -> bool:
    """Whether a layer's metadata is napari-spatialdata's (an ``sdata`` and an element ``name``)."""
    return metadata.get("sdata") is not None and bool(metadata.get("name"))


def slide_from_layer_metadata(metadata: dict, *, coordinate_system: str | None = None, name: str | None = None):
    """The slide behind a napari layer, from its metadata: ours (``metadata['adata']`` with
    ``obsm['spatial']``) as it is, or napari-spatialdata's (``sdata``, ``adata`` = the rows of the table
    annotating the element ``name``, ``region_key``, ``instance_key``, ``_current_cs``) as :func:`read_store`
    would give it: centroids of the element's instances in the layer's coordinate system (or
    `coordinate_system`), ``uns['spatialssl_store']`` naming the store when the SpatialData is backed."""
    adata = metadata.get("adata")
    if not is_spatialdata_layer_metadata(metadata):
        if adata is None:
            raise SpatialDataError(
                f"layer {name or ''}: has no cells (metadata['adata'] missing); open an .h5ad or a SpatialData store."
            )
        return adata
    if adata is not None and "spatial" in adata.obsm and UNS_KEY in adata.uns:
        return adata  # one of our own layers, already in our format
    element_name = str(metadata["name"])
    label = name or f"layer {element_name!r}"
    if adata is None or adata.n_obs == 0:
        raise SpatialDataError(
            f"{label}: no table annotates this element, so it has no expression; pick a layer whose element a "
            "table annotates (napari-spatialdata shows the table under 'Tables')."
        )
    sdata = metadata["sdata"]
    attrs = adata.uns.get("spatialdata_attrs", {})
    region_key = metadata.get("region_key") or attrs.get("region_key")
    instance_key = metadata.get("instance_key") or attrs.get("instance_key")
    if not region_key or not instance_key:
        raise SpatialDataError(f"{label}: the table has no region_key / instance_key; set them with "
                               "spatialdata.models.TableModel.parse.")
    cs = coordinate_system or metadata.get("_current_cs") or DEFAULT_COORDINATE_SYSTEM
    _spatialdata(label)
    element = sdata[element_name]
    available = _coordinate_systems(element)
    if cs not in available:
        raise SpatialDataError(f"{label}: coordinate system {cs!r} not available; available: {available}.")
    table_name = _table_of(sdata, adata, metadata.get("table_names") or [])
    path = getattr(sdata, "path", None)
    source = {"path": str(Path(path).resolve()) if path else None, "table": table_name,
              "element_types": {element_name: _kind_in(sdata, element_name)}}
    if source["path"] is None:
        source.pop("path")
    return _as_slide(adata, {element_name: element}, [element_name], region_key, instance_key,
                     {element_name: cs}, label, source)


def _kind_in(sdata, element_name: str) -> str | None:
    for kind in ELEMENT_TYPES:
        if element_name in getattr(sdata, kind):
            return kind
    return None


def _table_of(sdata, adata, table_names: list[str]) -> str | None:
    """Which of the SpatialData's tables `adata` (a subset of one) came from."""
    for t in table_names:
        if t in sdata.tables and adata.obs_names.isin(sdata.tables[t].obs_names).all():
            return t
    return table_names[0] if len(table_names) == 1 else None


# --------------------------------------------------------------------------------------------------
# writing results back
# --------------------------------------------------------------------------------------------------

def _check_table_name(p: Path, name: str) -> None:
    if not isinstance(name, str) or not name or name in (".", "..") or name.startswith((".", "__")) or not all(
            c.isalnum() or c in "_-." for c in name):
        raise SpatialDataError(
            f"{p}: table name {name!r} is not valid; use letters, digits, '_', '-' and '.' "
            "(not starting with '.' or '__')."
        )
    for kind in ("images", "labels", "points", "shapes"):
        d = p / kind
        if d.is_dir() and any(c.name.lower() == name.lower() for c in d.iterdir()):
            raise SpatialDataError(f"{p}: {kind} element named {name!r} exists; element names must be unique, "
                                   "choose another table_name.")
    clash = [t for t in _table_names(p) if t.lower() == name.lower() and t != name]
    if clash:
        raise SpatialDataError(f"{p}: table {clash[0]!r} differs from {name!r} only by case; choose another name.")


def _results_table(result, regions: list[str], region_key: str, instance_key: str, drop: list[str],
                   keep_expression: bool):
    """A new AnnData with the result's keys (arrays shared, not copied) for the store."""
    import anndata as ad

    obs = result.obs.drop(columns=[c for c in drop if c in result.obs.columns]).copy()
    if instance_key not in obs.columns:
        raise SpatialDataError(f"the result has no obs[{instance_key!r}] (instance ids); results must keep the "
                               "columns of the table they were read from.")
    if region_key not in obs.columns:
        if len(regions) != 1:
            raise SpatialDataError(f"the result has no obs[{region_key!r}] to say which of {regions} each cell is in.")
        obs[region_key] = regions[0]
    obs[region_key] = pd.Categorical(obs[region_key].astype(str), categories=sorted(set(regions)))
    if obs[region_key].isna().any():
        raise SpatialDataError(f"obs[{region_key!r}] names regions outside {regions}.")
    uns = copy.deepcopy({k: v for k, v in result.uns.items() if k != "spatialdata_attrs"})
    return ad.AnnData(X=result.X if keep_expression else None, obs=obs, var=result.var.copy(), uns=uns,
                      obsm=dict(result.obsm), varm=dict(result.varm), obsp=dict(result.obsp),
                      varp=dict(result.varp), layers=dict(result.layers))


def _sdata_formats(p: Path):
    """Formats matching the store's zarr version (older stores are zarr v2)."""
    if _zarr_format(p) == 3:
        return None
    from spatialdata._io.format import SpatialDataContainerFormatV01, TablesFormatV01

    return [SpatialDataContainerFormatV01(), TablesFormatV01()]


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL / ENOSYS / EOPNOTSUPP: the file system cannot; use two renames
        return False
    raise OSError(err, os.strerror(err), str(a))


def _swap_in(new: Path, target: Path, aside: Path) -> None:
    """Put `new` at `target`; an existing `target` ends up at `aside` (atomically where possible)."""
    if not target.exists():
        os.rename(new, target)
        return
    if _exchange(new, target):
        os.rename(new, aside)  # `new` now holds the old table
        return
    os.rename(target, aside)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(aside, target)
        raise


def _consolidate(p: Path) -> None:
    import zarr

    with _no_warnings():
        zarr.consolidate_metadata(str(p), zarr_format=_zarr_format(p))


def write_results_to_store(store_path: str | os.PathLike, result_adata, table_name: str = DEFAULT_TABLE_NAME,
                           overwrite: bool = False, *, region: str | list[str] | None = None,
                           region_key: str | None = None, instance_key: str | None = None,
                           keep_expression: bool = True, sdata=None) -> Path:
    """Write a result AnnData into a SpatialData store as the table `table_name`, annotating the same
    region(s) as the table it was read from; returns the table's folder.

    The result keeps the keys the pipeline writes (``obsm['X_<method>']``, ``obs['<method>_domain']``,
    ``layers['<method>_reconstruction']``, ``uns['spatialssl']``, the squidpy graph in ``obsp``) plus the
    table's own columns and ``obsm['spatial']``; columns :func:`read_store` added are left out.
    `region`, `region_key`, `instance_key` default to ``uns['spatialssl_store']`` (set by
    :func:`read_store`). ``keep_expression=False`` leaves X out (the source table already holds it).

    Atomic: the table is written beside the store, then renamed into ``tables/`` (an existing table of
    that name, with ``overwrite=True``, is swapped out in the same step) and the store's consolidated
    metadata is refreshed; on any failure the store is as it was. An existing table without
    ``overwrite`` raises FileExistsError. With `sdata` (an in-memory SpatialData of this store, e.g. a
    napari-spatialdata layer's), the table is also set in it, so open viewers see it.
    """
    p = _check_store(store_path)
    sd = _spatialdata(p)
    src = result_adata.uns.get(UNS_KEY, {}) or {}
    regions = _as_list(region) or _as_list(src.get("regions"))
    region_key = region_key or src.get("region_key")
    instance_key = instance_key or src.get("instance_key")
    if not regions or not region_key or not instance_key:
        raise SpatialDataError(
            f"{p}: the result does not say which region it annotates (uns[{UNS_KEY!r}] missing); read the slide "
            "with read_store, or pass region=, region_key= and instance_key=."
        )
    missing = [r for r in regions if _element_type(p, r) is None]
    if missing:
        raise SpatialDataError(f"{p}: region(s) {missing} are not in the store; a table must annotate its elements.")
    _check_table_name(p, table_name)
    target = p / "tables" / table_name
    if target.exists() and not overwrite:
        raise FileExistsError(f"{p}: table {table_name!r} already exists; pass overwrite=True (CLI: --overwrite) "
                              "or choose another table name.")
    table = _results_table(result_adata, regions, region_key, instance_key, list(src.get("added_columns", [])),
                           keep_expression)
    try:
        table = sd.models.TableModel.parse(table, region=regions if len(regions) > 1 else regions[0],
                                           region_key=region_key, instance_key=instance_key,
                                           overwrite_metadata=True)
    except (ValueError, TypeError, KeyError) as exc:
        raise SpatialDataError(f"{p}: the result is not a valid SpatialData table ({exc}).") from exc

    staging = p.parent / f".{p.name}.spatialssl-{uuid.uuid4().hex[:12]}"
    try:
        try:
            with _no_warnings():
                sd.SpatialData(tables={table_name: table}).write(staging, sdata_formats=_sdata_formats(p))
        except OSError as exc:
            raise SpatialDataError(f"{p}: cannot write beside the store ({exc}); check permissions and space.") \
                from exc
        new = staging / "tables" / table_name
        consolidated = _has_consolidated_metadata(p)
        if not (p / "tables").exists():
            os.rename(staging / "tables", p / "tables")
            placed_group = True
        else:
            placed_group = False
            _swap_in(new, target, staging / "replaced")
        try:
            if consolidated:
                _consolidate(p)
        except BaseException:
            # undo: the old table (if any) back in place, then the metadata as it was
            if placed_group:
                os.rename(p / "tables", staging / "tables")
            elif (staging / "replaced").exists():
                _swap_in(staging / "replaced", target, staging / "failed")
            else:
                os.rename(target, staging / "failed")
            with contextlib.suppress(Exception):
                _consolidate(p)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if sdata is not None:
        with _no_warnings():
            sdata.tables[table_name] = table
    return target
