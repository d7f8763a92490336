"""SpatialData `.zarr` stores: recognising, reading (tables, regions, coordinate systems, centroids),
writing results back atomically, napari-spatialdata layer metadata, and the napari reader.

Stores are built here from 300 cells of the osmFISH sample (circles / polygons / points / labels for
cells, a table annotating them). Tests that need spatialdata skip without it (the `[spatialdata]` extra);
the "extra missing" path is simulated, so it runs either way.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from napari_spatialssl.data import stores as S
from napari_spatialssl.data.io import SpatialDataError

NEEDS_SD = "needs the optional spatialdata packages (pip install 'napari-spatialssl[spatialdata]')"
N_CELLS = 300


@pytest.fixture(scope="module")
def cells(osmfish_path):
    """300 neighbouring osmFISH cells (raw counts, cell types, x-y in micrometres)."""
    a = ad.read_h5ad(osmfish_path)
    xy = a.obsm["spatial"]
    centre = np.median(xy, axis=0)
    keep = np.sort(np.argsort(((xy - centre) ** 2).sum(1))[:N_CELLS])
    a = a[keep].copy()
    a.obs_names = [f"cell{i}" for i in range(a.n_obs)]
    # 'region' is the region key of SpatialData tables (as spatialdata-io writes them): rename osmFISH's own
    a.obs = a.obs.rename(columns={"region": "cortex_region"})
    return a


def _dense(X):
    return X.toarray() if hasattr(X, "toarray") else np.asarray(X)


def _sd():
    return pytest.importorskip("spatialdata", reason=NEEDS_SD)


def _table(cells, region, instance_ids, region_values=None):
    from spatialdata.models import TableModel

    t = cells.copy()
    t.obs["region"] = pd.Categorical(region_values if region_values is not None else [region] * t.n_obs)
    t.obs["cell_id"] = instance_ids
    return TableModel.parse(t, region=region, region_key="region", instance_key="cell_id")


AFFINE = np.array([[0.0, -2.0, 100.0], [2.0, 0.0, -50.0], [0.0, 0.0, 1.0]])  # rotate 90 deg, scale 2, shift


def _affine():
    from spatialdata.transformations import Affine

    return Affine(AFFINE, input_axes=("x", "y"), output_axes=("x", "y"))


def _apply(xy):
    return xy @ AFFINE[:2, :2].T + AFFINE[:2, 2]


def make_store(path: Path, cells, kind: str = "circles", *, transformations=None, extra_tables: int = 0,
               formats=None) -> Path:
    """A store with one element `cells` (circles / polygons / points) and a table `table` annotating it;
    instance ids 1000.. in shuffled order (the table's rows are not in the element's order)."""
    import geopandas as gpd
    import shapely
    import spatialdata as sd
    from spatialdata.models import PointsModel, ShapesModel
    from spatialdata.transformations import Identity

    xy = np.asarray(cells.obsm["spatial"], dtype=np.float64)
    ids = np.arange(1000, 1000 + len(xy))
    order = np.random.default_rng(0).permutation(len(xy))
    tf = transformations or {"global": _affine(), "aligned": Identity()}
    if kind == "circles":
        g = gpd.GeoDataFrame({"radius": np.full(len(xy), 4.0)}, geometry=shapely.points(xy[order]),
                             index=pd.Index(ids[order]))
        element = ShapesModel.parse(g, transformations=tf)
        elements = {"shapes": {"cells": element}}
    elif kind == "polygons":
        h = 3.0  # squares centred on the cells: centroid = the cell
        boxes = shapely.box(xy[order, 0] - h, xy[order, 1] - h, xy[order, 0] + h, xy[order, 1] + h)
        element = ShapesModel.parse(gpd.GeoDataFrame(geometry=boxes, index=pd.Index(ids[order])), transformations=tf)
        elements = {"shapes": {"cells": element}}
    elif kind == "points":
        df = pd.DataFrame({"x": xy[order, 0], "y": xy[order, 1]}, index=pd.Index(ids[order]))
        element = PointsModel.parse(df, transformations=tf)
        elements = {"points": {"cells": element}}
    else:
        raise ValueError(kind)
    tables = {"table": _table(cells, "cells", ids)}
    for i in range(extra_tables):
        tables[f"table{i + 2}"] = _table(cells[: 100 + i].copy(), "cells", ids[: 100 + i])
    sdata = sd.SpatialData(**elements, tables=tables)
    sdata.write(path, sdata_formats=formats)
    return path


# --------------------------------------------------------------------------------------------------
# without spatialdata: recognising stores, the "install the extra" message
# --------------------------------------------------------------------------------------------------

def _fake_store(path: Path) -> Path:
    path.mkdir()
    (path / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group",
                                                "attributes": {"spatialdata_attrs": {"version": "0.2"}}}))
    return path


def test_is_spatialdata_store_needs_no_extra(tmp_path, osmfish_path):
    store = _fake_store(tmp_path / "run.zarr")
    assert S.is_spatialdata_store(store)
    old = tmp_path / "old.zarr"  # zarr v2, pre-versioned: recognised by its element groups
    (old / "shapes").mkdir(parents=True)
    (old / ".zgroup").write_text('{"zarr_format": 2}')
    (old / "shapes" / ".zgroup").write_text('{"zarr_format": 2}')
    assert S.is_spatialdata_store(old)
    plain = tmp_path / "plain.zarr"  # a zarr group that is no SpatialData store
    plain.mkdir()
    (plain / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
    assert not S.is_spatialdata_store(plain)
    empty = tmp_path / "empty.zarr"
    empty.mkdir()
    assert not S.is_spatialdata_store(empty)
    assert not S.is_spatialdata_store(osmfish_path)
    assert not S.is_spatialdata_store(tmp_path / "missing.zarr")


def test_missing_extra_says_what_to_install(tmp_path, monkeypatch):
    store = _fake_store(tmp_path / "run.zarr")
    monkeypatch.setitem(sys.modules, "spatialdata", None)  # `import spatialdata` now raises ImportError
    for call in (lambda: S.read_store(store), lambda: S.list_tables(store), lambda: S.read_slide(store),
                 lambda: S.write_results_to_store(store, ad.AnnData(np.zeros((2, 2))))):
        with pytest.raises(SpatialDataError) as info:
            call()
        msg = str(info.value)
        assert msg.startswith(str(store)) and "pip install 'napari-spatialssl[spatialdata]'" in msg
        assert "\n" not in msg
    # the napari reader still claims the store, and its error is the same one line
    from napari_spatialssl._napari.reader import get_reader, read_slides, read_slides_for_napari

    assert get_reader(str(store)) is read_slides_for_napari
    with pytest.raises(SpatialDataError, match=r"napari-spatialssl\[spatialdata\]"):
        read_slides(str(store))


def test_read_slide_dispatch_and_path_errors(tmp_path, osmfish_path):
    a = S.read_slide(osmfish_path)
    assert a.n_obs == 6471
    with pytest.raises(SpatialDataError, match="apply to SpatialData stores only"):
        S.read_slide(osmfish_path, table="table")
    with pytest.raises(SpatialDataError, match="not found"):
        S.read_slide(tmp_path / "nope.zarr")
    (tmp_path / "folder.zarr").mkdir()
    with pytest.raises(SpatialDataError, match="not a SpatialData store"):
        S.read_slide(tmp_path / "folder.zarr")
    (tmp_path / "cells.csv").write_text("x,y\n1,2\n")
    with pytest.raises(SpatialDataError, match=r"not an \.h5ad file or a SpatialData \.zarr store"):
        S.read_slide(tmp_path / "cells.csv")


# --------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["circles", "polygons", "points"])
def test_read_store_centroids_in_coordinate_system(tmp_path, cells, kind):
    _sd()
    store = make_store(tmp_path / f"{kind}.zarr", cells, kind)
    [info] = S.list_tables(store)
    assert info["table"] == "table" and info["regions"] == ["cells"] and info["usable"]
    assert info["element_types"] == {"cells": "points" if kind == "points" else "shapes"}
    assert info["common_coordinate_systems"] == ["aligned", "global"] and info["n_cells"] == N_CELLS

    xy = cells.obsm["spatial"]
    a = S.read_store(store)  # two shared systems: 'global' is taken
    assert a.n_obs == N_CELLS and list(a.obs_names) == list(cells.obs_names)  # the table's rows, in order
    np.testing.assert_allclose(a.obsm["spatial"], _apply(xy), rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(a.obsm["spatial_table"], xy)  # the table's own coordinates kept
    assert a.uns["spatialssl_store"] == {
        "path": str(store.resolve()), "table": "table", "regions": ["cells"], "region_key": "region",
        "instance_key": "cell_id", "coordinate_system": "global",
        "element_types": {"cells": "points" if kind == "points" else "shapes"}, "added_columns": []}
    for col in cells.obs.columns:  # the table's columns kept
        assert (a.obs[col].astype(str).to_numpy() == cells.obs[col].astype(str).to_numpy()).all()
    np.testing.assert_array_equal(_dense(a.X), _dense(cells.X))

    b = S.read_store(store, coordinate_system="aligned")
    np.testing.assert_allclose(b.obsm["spatial"], xy, atol=1e-6)
    assert b.uns["spatialssl_store"]["coordinate_system"] == "aligned"
    assert "spatial_table" not in b.obsm  # identical to the table's own: not kept twice


def test_read_store_labels_centroids(tmp_path, cells):
    sd = _sd()
    from spatialdata.models import Labels2DModel
    from spatialdata.transformations import Scale

    img = np.zeros((40, 60), dtype=np.uint16)
    # spatialdata's pixel convention: pixel (row i, col j) is centred at (x j + 0.5, y i + 0.5)
    img[2:6, 10:20] = 7  # rows y 2..5, cols x 10..19: centroid (x 15, y 4)
    img[30:40, 0:4] = 9  # centroid (x 2, y 35)
    labels = Labels2DModel.parse(img, dims=("y", "x"), transformations={"global": Scale([2.0, 0.5], axes=("x", "y"))})
    t = _table(cells[:2].copy(), "nuclei", np.array([9, 7]))
    sd.SpatialData(labels={"nuclei": labels}, tables={"table": t}).write(tmp_path / "labels.zarr")
    a = S.read_store(tmp_path / "labels.zarr")
    np.testing.assert_allclose(a.obsm["spatial"], [[2 * 2, 35 * 0.5], [15 * 2, 4 * 0.5]])
    assert a.uns["spatialssl_store"]["element_types"] == {"nuclei": "labels"}


def test_several_tables_must_be_chosen(tmp_path, cells):
    _sd()
    store = make_store(tmp_path / "two.zarr", cells, extra_tables=1)
    with pytest.raises(SpatialDataError) as info:
        S.read_store(store)
    msg = str(info.value)
    assert msg.startswith(str(store)) and "'table'" in msg and "'table2'" in msg and "table='NAME'" in msg
    assert "--table" in msg and "\n" not in msg
    assert S.read_store(store, table="table2").n_obs == 100
    with pytest.raises(SpatialDataError, match=r"no table 'nope'; the store has \['table', 'table2'\]"):
        S.read_store(store, table="nope")


def test_coordinate_system_choice_and_errors(tmp_path, cells):
    _sd()
    from spatialdata.transformations import Identity, Scale

    store = make_store(tmp_path / "cs.zarr", cells,
                       transformations={"um": Identity(), "px": Scale([4.0, 4.0], axes=("x", "y"))})
    with pytest.raises(SpatialDataError, match=r"several coordinate systems \['px', 'um'\].*coordinate_system="):
        S.read_store(store)
    np.testing.assert_allclose(S.read_store(store, coordinate_system="px").obsm["spatial"],
                               4 * cells.obsm["spatial"])
    with pytest.raises(SpatialDataError, match=r"coordinate system \['mm'\] not available.*'px', 'um'"):
        S.read_store(store, coordinate_system="mm")


def test_table_over_two_regions(tmp_path, cells):
    sd = _sd()
    import geopandas as gpd
    import shapely
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Identity, Translation

    xy = cells.obsm["spatial"]
    half = N_CELLS // 2
    ids = np.arange(N_CELLS)
    shapes = {}
    for name, rows, tf in (("slice_a", slice(0, half), {"slice_a": Identity()}),
                           ("slice_b", slice(half, None), {"slice_b": Translation([10.0, 0.0], axes=("x", "y"))})):
        g = gpd.GeoDataFrame({"radius": np.ones(len(ids[rows]))}, geometry=shapely.points(xy[rows]),
                             index=pd.Index(ids[rows]))
        shapes[name] = ShapesModel.parse(g, transformations=tf)
    t = cells.copy()
    t.obs["region"] = pd.Categorical(np.where(np.arange(N_CELLS) < half, "slice_a", "slice_b"))
    t.obs["cell_id"] = ids  # instance ids repeat across regions in general; here they do not need to
    t = TableModel.parse(t, region=["slice_a", "slice_b"], region_key="region", instance_key="cell_id")
    store = tmp_path / "two_regions.zarr"
    sd.SpatialData(shapes=shapes, tables={"table": t}).write(store)

    a = S.read_store(store)  # no shared system; each region has one
    expected = xy.copy()
    expected[half:, 0] += 10.0
    np.testing.assert_allclose(a.obsm["spatial"], expected)
    assert a.uns["spatialssl_store"]["coordinate_system"] == {"slice_a": "slice_a", "slice_b": "slice_b"}
    assert list(a.obs["section"].cat.categories) == ["slice_a", "slice_b"]  # graphs never join the regions
    assert a.uns["spatialssl_store"]["added_columns"] == ["section"]
    only_b = S.read_store(store, region="slice_b")
    assert only_b.n_obs == N_CELLS - half and "section" not in only_b.obs
    layers = S.read_store_layers(store)
    assert [(e["table"], e["region"], e["adata"].n_obs) for e in layers] == [
        ("table", "slice_a", half), ("table", "slice_b", N_CELLS - half)]


def test_table_validation_messages(tmp_path, cells):
    sd = _sd()
    import geopandas as gpd
    import shapely
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity

    xy = cells.obsm["spatial"]
    g = gpd.GeoDataFrame({"radius": np.ones(N_CELLS)}, geometry=shapely.points(xy), index=pd.Index(np.arange(N_CELLS)))
    circles = ShapesModel.parse(g, transformations={"global": Identity()})
    wrong_ids = np.arange(N_CELLS) + 5  # the last 5 rows name no circle
    store = tmp_path / "bad_ids.zarr"
    sd.SpatialData(shapes={"cells": circles}, tables={"table": _table(cells, "cells", wrong_ids)}).write(store)
    with pytest.raises(SpatialDataError, match=r"5 of 300 table rows of region 'cells' name no instance"):
        S.read_store(store)

    store2 = tmp_path / "no_table.zarr"
    sd.SpatialData(shapes={"cells": circles}).write(store2)
    with pytest.raises(SpatialDataError, match="holds no table"):
        S.read_store(store2)

    store3 = tmp_path / "orphan.zarr"  # a table annotating an element the store does not hold
    sd.SpatialData(shapes={"cells": circles}, tables={"t": _table(cells, "gone", np.arange(N_CELLS))}).write(store3)
    with pytest.raises(SpatialDataError, match=r"'t'.*annotates \['gone'\], which the store does not hold"):
        S.read_store(store3)


# --------------------------------------------------------------------------------------------------
# writing results back
# --------------------------------------------------------------------------------------------------

FAST_SPOTSCAPE = {"epochs": 2, "hidden_dims": [16, 8], "eval.n_domains": 3, "recon_spots": 64}


def test_round_trip_read_fit_write_read(tmp_path, cells):
    sd = _sd()
    from napari_spatialssl.graphs.squidpy_graph import write_run_graph
    from napari_spatialssl.pipeline import fit

    store = make_store(tmp_path / "run.zarr", cells)
    slide = S.read_store(store)
    out = fit(slide, "spotscape", overrides=FAST_SPOTSCAPE)
    result = out.adata
    write_run_graph(result, out.method, out.method.data)  # what the pipeline will do (see the report)
    path = S.write_results_to_store(store, result, table_name="spotscape_run")
    assert path == store / "tables" / "spotscape_run"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left beside the store

    back = sd.read_zarr(store)
    assert set(back.tables) == {"table", "spotscape_run"}
    t = back.tables["spotscape_run"]
    assert t.uns["spatialdata_attrs"] == {"region": "cells", "region_key": "region", "instance_key": "cell_id"}
    assert list(t.obs_names) == list(result.obs_names)
    assert t.obs["spotscape_domain"].dtype == "category" and t.obs["spotscape_domain"].nunique() == 3
    assert (t.obs["spotscape_domain"].astype(str).to_numpy() == result.obs["spotscape_domain"].astype(str)).all()
    np.testing.assert_allclose(t.obsm["X_spotscape"], result.obsm["X_spotscape"])
    np.testing.assert_allclose(t.obsm["spatial"], _apply(cells.obsm["spatial"]), atol=1e-6)
    assert (t.obsp["spatial_connectivities"] != result.obsp["spatial_connectivities"]).nnz == 0
    assert t.uns["spatial_neighbors"]["connectivities_key"] == "spatial_connectivities"
    assert json.loads(t.uns["spatialssl"]["spotscape"]["config"])["epochs"] == 2
    assert "spotscape_reconstruction" in t.layers
    np.testing.assert_array_equal(_dense(t.X), _dense(cells.X))
    # the original table is untouched, and the results table is itself a slide that reads again
    np.testing.assert_array_equal(_dense(back.tables["table"].X), _dense(cells.X))
    again = S.read_store(store, table="spotscape_run")
    np.testing.assert_allclose(again.obsm["spatial"], slide.obsm["spatial"])
    assert "X_spotscape" in again.obsm and again.uns["spatialssl_store"]["table"] == "spotscape_run"


def _result(cells, store, value: float):
    a = S.read_store(store, table="table")
    a.obs["spotscape_domain"] = pd.Categorical(np.where(np.arange(a.n_obs) % 2, "d1", "d2"))
    a.obsm["X_spotscape"] = np.full((a.n_obs, 4), value, dtype=np.float32)
    return a


def test_cli_fit_and_predict_on_a_store(tmp_path, cells):
    """`napari-spatialssl fit store.zarr` and `predict store.zarr` read the store's table, and
    --write-to-store puts the results back into it."""
    sd = _sd()
    from napari_spatialssl.cli import main

    store = make_store(tmp_path / "run.zarr", cells, extra_tables=1)
    sets = [a for k, v in FAST_SPOTSCAPE.items() if k != "epochs"
            for a in ("--set", f"{k}={v if not isinstance(v, list) else ','.join(map(str, v))}")]
    assert main(["fit", str(store), "--method", "spotscape", "--epochs", "2", "--table", "table",
                 "--out", str(tmp_path / "fit"), "--write-to-store", "spotscape_run", *sets]) == 0
    fitted = ad.read_h5ad(tmp_path / "fit" / "result.h5ad")
    assert fitted.n_obs == N_CELLS and fitted.obs["spotscape_domain"].nunique() == 3
    assert (tmp_path / "fit" / "manifest.json").is_file()
    back = sd.read_zarr(store)
    assert back.tables["spotscape_run"].obs["spotscape_domain"].nunique() == 3
    assert main(["predict", str(store), "--table", "table", "--model", str(tmp_path / "fit"),
                 "--out", str(tmp_path / "pred")]) == 0
    pred = ad.read_h5ad(tmp_path / "pred" / "result.h5ad")
    assert pred.n_obs == N_CELLS and "X_spotscape" in pred.obsm
    # a store with several tables and none chosen: one line that names them
    assert main(["fit", str(store), "--method", "spotscape", "--epochs", "2", "--out", str(tmp_path / "x")]) == 2


def test_write_refuses_then_replaces_atomically(tmp_path, cells, monkeypatch):
    sd = _sd()
    store = make_store(tmp_path / "run.zarr", cells)
    S.write_results_to_store(store, _result(cells, store, 1.0))
    with pytest.raises(FileExistsError, match=r"table 'spatialssl' already exists; pass overwrite=True"):
        S.write_results_to_store(store, _result(cells, store, 2.0))
    S.write_results_to_store(store, _result(cells, store, 2.0), overwrite=True)
    assert float(sd.read_zarr(store).tables["spatialssl"].obsm["X_spotscape"][0, 0]) == 2.0

    # a failure after the swap (refreshing the metadata) puts the old table back
    calls = []

    def failing(p):
        calls.append(p)
        if len(calls) == 1:
            raise OSError("disk full")

    real = S._consolidate
    monkeypatch.setattr(S, "_consolidate", lambda p: (failing(p), real(p)))
    with pytest.raises(OSError, match="disk full"):
        S.write_results_to_store(store, _result(cells, store, 3.0), overwrite=True)
    monkeypatch.undo()
    back = sd.read_zarr(store)
    assert float(back.tables["spatialssl"].obsm["X_spotscape"][0, 0]) == 2.0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    # where the file system cannot swap folders atomically, two renames do it
    monkeypatch.setattr(S, "_exchange", lambda a, b: False)
    S.write_results_to_store(store, _result(cells, store, 4.0), overwrite=True)
    assert float(sd.read_zarr(store).tables["spatialssl"].obsm["X_spotscape"][0, 0]) == 4.0


def test_write_checks_names_and_regions(tmp_path, cells):
    sd = _sd()
    store = make_store(tmp_path / "run.zarr", cells)
    res = _result(cells, store, 1.0)
    with pytest.raises(SpatialDataError, match="shapes element named 'cells' exists"):
        S.write_results_to_store(store, res, table_name="cells")
    with pytest.raises(SpatialDataError, match="not valid"):
        S.write_results_to_store(store, res, table_name="a/b")
    with pytest.raises(SpatialDataError, match="only by case"):
        S.write_results_to_store(store, res, table_name="TABLE")
    bare = ad.AnnData(np.zeros((3, 2)))
    with pytest.raises(SpatialDataError, match="does not say which region it annotates"):
        S.write_results_to_store(store, bare)
    slim = S.write_results_to_store(store, res, table_name="slim", keep_expression=False)
    t = sd.read_zarr(store).tables["slim"]
    assert t.X is None and t.n_vars == cells.n_vars and "X_spotscape" in t.obsm and slim.is_dir()


def test_write_into_store_without_tables_and_into_zarr_v2(tmp_path, cells):
    sd = _sd()
    store = make_store(tmp_path / "run.zarr", cells)
    res = _result(cells, store, 5.0)
    import shutil

    shutil.rmtree(store / "tables")  # a store of shapes only (metadata refreshed below)
    import zarr

    zarr.consolidate_metadata(str(store))
    S.write_results_to_store(store, res, table_name="results")
    assert set(sd.read_zarr(store).tables) == {"results"}

    from spatialdata._io.format import ShapesFormatV02, SpatialDataContainerFormatV01, TablesFormatV01

    old = make_store(tmp_path / "old.zarr", cells,
                     formats=[SpatialDataContainerFormatV01(), ShapesFormatV02(), TablesFormatV01()])
    assert (old / ".zgroup").is_file()
    S.write_results_to_store(old, _result(cells, old, 6.0), table_name="results")
    assert (old / "tables" / "results" / ".zgroup").is_file()  # written in the store's own zarr version
    back = sd.read_zarr(old)
    assert float(back.tables["results"].obsm["X_spotscape"][0, 0]) == 6.0


def test_write_updates_an_open_spatialdata(tmp_path, cells):
    sd = _sd()
    store = make_store(tmp_path / "run.zarr", cells)
    sdata = sd.read_zarr(store)
    S.write_results_to_store(store, _result(cells, store, 1.0), sdata=sdata)
    assert "spatialssl" in sdata.tables and sdata.tables["spatialssl"].n_obs == N_CELLS


# --------------------------------------------------------------------------------------------------
# napari-spatialdata layers and the napari reader (layer data; no viewer needed)
# --------------------------------------------------------------------------------------------------

def napari_spatialdata_metadata(store, coordinate_system: str = "global") -> dict:
    """The metadata napari-spatialdata gives a layer of the store's "cells" element: the SpatialData,
    the table joined to the element (rows in the element's order), the keys, the coordinate system."""
    from spatialdata import join_spatialelement_table

    sdata = _sd().read_zarr(store)
    _, table = join_spatialelement_table(sdata=sdata, spatial_element_names="cells", table_name="table",
                                         how="left", match_rows="left")
    return {"sdata": sdata, "adata": table, "name": "cells", "region_key": "region", "instance_key": "cell_id",
            "table_names": ["table"], "_current_cs": coordinate_system, "_active_in_cs": {coordinate_system}}


def test_slide_from_napari_spatialdata_layer_metadata(tmp_path, cells):
    sd = _sd()
    store = make_store(tmp_path / "run.zarr", cells)
    meta = napari_spatialdata_metadata(store, "aligned")
    slide = S.slide_from_layer_metadata(meta)
    order = pd.Index(cells.obs_names).get_indexer(slide.obs_names)  # rows follow the element's order
    assert (order >= 0).all()
    np.testing.assert_allclose(slide.obsm["spatial"], cells.obsm["spatial"][order], atol=1e-6)
    assert slide.uns["spatialssl_store"]["path"] == str(store.resolve())
    assert slide.uns["spatialssl_store"]["table"] == "table"
    np.testing.assert_allclose(S.slide_from_layer_metadata(meta, coordinate_system="global").obsm["spatial"],
                               _apply(cells.obsm["spatial"][order]), atol=1e-6)
    # results of such a slide go back into its store
    slide.obs["spotscape_domain"] = pd.Categorical(["a"] * slide.n_obs)
    S.write_results_to_store(store, slide)
    assert "spotscape_domain" in sd.read_zarr(store).tables["spatialssl"].obs
    # a layer of an element no table annotates, and our own layers
    with pytest.raises(SpatialDataError, match="no table annotates this element"):
        S.slide_from_layer_metadata({**meta, "adata": None})
    assert S.slide_from_layer_metadata({"adata": cells}) is cells
    ours = S.read_store(store, table="table")
    assert S.slide_from_layer_metadata({**meta, "adata": ours}) is ours


def test_reader_one_layer_per_table_and_region(tmp_path, cells):
    _sd()
    from napari_spatialssl._napari.layers import xy_to_rowcol
    from napari_spatialssl._napari.reader import get_reader, read_slides, read_slides_for_napari

    store = make_store(tmp_path / "xenium_run.zarr", cells, extra_tables=1)
    assert get_reader(str(store)) is read_slides_for_napari
    assert get_reader(str(store) + os.sep) is read_slides_for_napari
    layers = read_slides(str(store))
    assert [kw["name"] for _, kw, _ in layers] == ["xenium_run [table: cells]", "xenium_run [table2: cells]"]
    data, kwargs, kind = layers[0]
    assert kind == "points" and len(data) == N_CELLS
    meta = kwargs["metadata"]
    np.testing.assert_allclose(data, xy_to_rowcol(_apply(cells.obsm["spatial"])), rtol=1e-6)
    assert meta["adata"].uns["spatialssl_store"]["table"] == "table"
    assert meta["name"] == "cells" and meta["region_key"] == "region" and meta["instance_key"] == "cell_id"
    assert meta["table_names"] == ["table", "table2"] and meta["_current_cs"] == "global"
    assert meta["indices"] == list(range(1000, 1000 + N_CELLS)) and meta["_n_indices"] == N_CELLS
    assert set(meta["sdata"].tables) == {"table", "table2"} and Path(meta["sdata"].path) == store
    assert "cell_type" in kwargs["features"] and meta["color_by"] == "cell_type"
    assert len(layers[1][0]) == 100
    single = read_slides(str(make_store(tmp_path / "one.zarr", cells)))
    assert [kw["name"] for _, kw, _ in single] == ["one"]


def test_points_layer_from_a_napari_spatialdata_layer(tmp_path, cells):
    _sd()
    from napari_spatialssl._napari.layers import xy_to_rowcol
    from napari_spatialssl._napari.reader import points_from_spatialdata_layer

    store = make_store(tmp_path / "run.zarr", cells)
    meta = napari_spatialdata_metadata(store)
    sdata = meta["sdata"]
    data, kwargs, kind = points_from_spatialdata_layer(meta, "cells (spatialssl)")
    adata = kwargs["metadata"]["adata"]
    assert kind == "points" and len(data) == N_CELLS and kwargs["name"] == "cells (spatialssl)"
    np.testing.assert_allclose(data, xy_to_rowcol(adata.obsm["spatial"]), rtol=1e-6)
    order = pd.Index(cells.obs_names).get_indexer(adata.obs_names)
    np.testing.assert_allclose(adata.obsm["spatial"], _apply(cells.obsm["spatial"][order]), atol=1e-6)
    m = kwargs["metadata"]
    assert m["sdata"] is sdata and m["name"] == "cells" and m["_current_cs"] == "global"
    assert m["indices"] == adata.obs["cell_id"].tolist() and m["table_names"] == ["table"]


@pytest.mark.viewer
@pytest.mark.skipif(not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")),
                    reason="no display: run under Xvfb (make test / xvfb-run -a pytest)")
def test_open_store_in_napari(request, tmp_path, cells):
    _sd()
    pytest.importorskip("napari")
    make_napari_viewer = request.getfixturevalue("make_napari_viewer")  # only once spatialdata is there
    store = make_store(tmp_path / "run.zarr", cells)
    viewer = make_napari_viewer()
    layers = viewer.open(str(store), plugin="napari-spatialssl")
    assert len(layers) == 1 and layers[0].name == "run" and len(layers[0].data) == N_CELLS
    assert layers[0].metadata["adata"].uns["spatialssl_store"]["region_key"] == "region"
    assert layers[0].metadata["sdata"] is not None


@pytest.mark.viewer
@pytest.mark.skipif(not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")),
                    reason="no display: run under Xvfb (make test / xvfb-run -a pytest)")
def test_widget_trains_on_a_napari_spatialdata_layer_and_writes_back(request, tmp_path, cells, monkeypatch):
    """What a napari-spatialdata user does: its layer (metadata 'sdata' and 'adata', as napari-spatialdata
    sets them) is picked in our widget as the slide, a method trains, the Export panel writes the results
    back into the store, and spatialdata.read_zarr finds them there."""
    import torch  # noqa: F401  (torch before Qt)

    sd = _sd()
    pytest.importorskip("napari")
    from napari_spatialssl._napari.layers import xy_to_rowcol
    from napari_spatialssl._napari.widget import SpatialSSLWidget
    from napari_spatialssl._napari.workers import SYNC_ENV

    monkeypatch.setenv(SYNC_ENV, "1")
    monkeypatch.setenv("NAPARI_SPATIALSSL_SETTINGS", str(tmp_path / "settings.json"))
    store = make_store(tmp_path / "run.zarr", cells)
    meta = napari_spatialdata_metadata(store)
    viewer = request.getfixturevalue("make_napari_viewer")()
    viewer.add_points(xy_to_rowcol(np.asarray(cells.obsm["spatial"])), name="cells", metadata=meta)
    w = SpatialSSLWidget(viewer)
    viewer.window.add_dock_widget(w, area="right")
    s = w.session
    from napari_spatialssl._napari.layer_updates import slide_layers

    # the widget takes the layer as its slide at once, through one twin layer of ours
    assert s.slide is not None and s.slide.adata.n_obs == N_CELLS, w.status.text()
    assert [lay.name for lay in slide_layers(viewer)] == ["cells", "cells (spatialssl)"]
    assert s.slide.name == "cells (spatialssl)" and len(viewer.layers) == 2  # one twin layer of ours
    s.guarded(s.choose_slide, "cells")  # picked again: the same twin, nothing added
    assert len(viewer.layers) == 2 and s.slide.name == "cells (spatialssl)"
    s.set_method("spotscape")
    for k, v in {"epochs": 2, "eval.n_domains": 3, "hidden_dims": [16, 8], "k_neighbors": 8}.items():
        s.set_setting(k, v)
    s.guarded(s.train)
    assert "spotscape" in s.results, w.status.text()
    export = w.panels["export"]
    assert export.store_row.isVisibleTo(export)  # the Export panel offers the store
    s.guarded(s.write_to_store, "spatialssl", False)
    back = sd.read_zarr(store)
    assert "spatialssl" in back.tables and back.tables["spatialssl"].n_obs == N_CELLS
    assert back.tables["spatialssl"].obs["spotscape_domain"].nunique() == 3
    assert "X_spotscape" in back.tables["spatialssl"].obsm
    assert "table" in back.tables  # the store's own table is left as it was
