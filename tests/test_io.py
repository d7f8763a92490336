"""Reading slides into Points-layer data (no Qt): bad inputs give clear errors, layouts and colours are right."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import anndata as ad

from napari_spatialssl._napari import genes as G
from napari_spatialssl._napari import layers as L
from napari_spatialssl._napari.reader import get_reader, read_slide, read_slides, read_slides_for_napari
from napari_spatialssl.data.io import SpatialDataError, get_coordinates


def _adata(n=60, seed=0, sections=None, spacing=10.0):
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n)))
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:n] * spacing
    X = sp.csr_matrix(rng.poisson(2.0, size=(n, 5)).astype(np.float32))
    obs = pd.DataFrame({
        "cell_type": pd.Categorical(rng.choice(["A", "B", "C"], n)),
        "score": rng.normal(size=n),
        "cell_id": [f"c{i}" for i in range(n)],
        "region": rng.choice(["r1", "r2"], n),
    }, index=[f"cell{i}" for i in range(n)])
    if sections is not None:
        obs["section"] = sections
    a = ad.AnnData(X, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(5)]))
    a.obsm["spatial"] = grid.astype(np.float64)
    return a


def _write(a, path):
    a.write_h5ad(path)
    return path


# ---------------------------------------------------------------------------------------------- bad inputs


def test_missing_coordinates(tmp_path):
    a = _adata()
    del a.obsm["spatial"]
    p = _write(a, tmp_path / "nocoords.h5ad")
    with pytest.raises(SpatialDataError, match=r"obsm\['spatial'\] missing.*coord_columns"):
        read_slide(p)
    with pytest.raises(SpatialDataError, match=r"obs column\(s\) \['x', 'y'\] not found"):
        read_slide(p, coord_columns=("x", "y"))


def test_non_numeric_coordinates(tmp_path):
    a = _adata()
    a.obs["x"] = ["left"] * a.n_obs
    a.obs["y"] = np.arange(a.n_obs, dtype=float)
    with pytest.raises(SpatialDataError, match="not numeric"):
        L.adata_to_points(a, coord_columns=("x", "y"))
    a.obsm["spatial"] = np.array([["a", "b"]] * a.n_obs, dtype=object)
    with pytest.raises(SpatialDataError, match="not numeric"):
        L.adata_to_points(a)


def test_coordinates_from_obs_columns(tmp_path):
    a = _adata()
    a.obs["px"] = a.obsm["spatial"][:, 0] + 1
    a.obs["py"] = a.obsm["spatial"][:, 1] + 2
    data, _, _ = L.adata_to_points(a, coord_columns=("px", "py"))
    np.testing.assert_allclose(data, L.xy_to_rowcol(a.obsm["spatial"] + [1, 2]), rtol=1e-6)
    # a file without obsm['spatial'] but with center_x / center_y columns opens as is
    xy = a.obsm["spatial"].copy()
    del a.obsm["spatial"]
    a.obs["center_x"], a.obs["center_y"] = xy[:, 0], xy[:, 1]
    data, kw, _ = read_slide(_write(a, tmp_path / "obs_xy.h5ad"))
    np.testing.assert_allclose(data, L.xy_to_rowcol(xy), rtol=1e-6)
    assert kw["metadata"]["coord_columns"] == ["center_x", "center_y"]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_coordinates(tmp_path, bad):
    a = _adata()
    a.obsm["spatial"][3, 1] = bad
    p = _write(a, tmp_path / "nan.h5ad")
    with pytest.raises(SpatialDataError, match=r"1 cell\(s\) have NaN or infinite coordinates.*first rows \[3\]"):
        read_slide(p)


def test_length_mismatch_file(tmp_path):
    p = _write(_adata(n=10), tmp_path / "mismatch.h5ad")
    with h5py.File(p, "r+") as f:  # a file whose coordinates describe fewer cells than its expression
        attrs = dict(f["obsm/spatial"].attrs)
        del f["obsm/spatial"]
        f["obsm"].create_dataset("spatial", data=np.zeros((7, 2)))
        f["obsm/spatial"].attrs.update(attrs)
    with pytest.raises(SpatialDataError, match="mismatch.h5ad.*could not be read as AnnData.*shape"):
        read_slide(p)


def test_length_mismatch_in_memory():
    class FakeAnnData:  # e.g. a backed or hand-assembled object whose obsm was not validated
        n_obs = 10
        obsm = {"spatial": np.zeros((7, 2))}
        obs = pd.DataFrame(index=range(10))

    with pytest.raises(SpatialDataError, match="has 7 rows but the expression has 10 cells"):
        get_coordinates(FakeAnnData())


def test_empty_file(tmp_path):
    p = tmp_path / "empty.h5ad"
    p.write_bytes(b"")
    with pytest.raises(SpatialDataError, match="empty"):
        read_slide(p)


def test_no_cells(tmp_path):
    a = ad.AnnData(np.zeros((0, 3), dtype=np.float32))
    a.obsm["spatial"] = np.zeros((0, 2))
    p = _write(a, tmp_path / "nocells.h5ad")
    with pytest.raises(SpatialDataError, match="no cells"):
        read_slide(p)


def test_non_h5ad_files(tmp_path):
    csv = tmp_path / "cells.csv"
    csv.write_text("x,y\n1,2\n")
    assert get_reader(str(csv)) is None  # not claimed: napari tries other readers
    with pytest.raises(SpatialDataError, match="not an .h5ad file"):
        read_slide(csv)
    fake = tmp_path / "fake.h5ad"
    fake.write_text("this is text, not HDF5")
    assert get_reader(str(fake)) is read_slides_for_napari
    with pytest.raises(SpatialDataError, match="not an HDF5 file"):
        read_slides(str(fake))
    with pytest.raises(SpatialDataError, match="file not found"):
        read_slide(tmp_path / "absent.h5ad")


def test_missing_label_and_section_keys(tmp_path):
    p = _write(_adata(), tmp_path / "ok.h5ad")
    with pytest.raises(SpatialDataError, match=r"'no_such_label' is not an obs column.*available"):
        read_slide(p, color_by="no_such_label")
    with pytest.raises(SpatialDataError, match=r"section key 'no_such_section' is not an obs column"):
        read_slide(p, section_key="no_such_section")
    with pytest.raises(SpatialDataError, match="ok.h5ad"):  # the message names the file
        read_slide(p, color_by="no_such_label")


# ---------------------------------------------------------------------------------------------- layer data


def test_xy_to_rowcol_is_the_flip():
    xy = np.array([[10.0, 3.0], [0.5, 7.0]])
    rc = L.xy_to_rowcol(xy)
    np.testing.assert_array_equal(rc, [[3.0, 10.0], [7.0, 0.5]])
    np.testing.assert_array_equal(L.rowcol_to_xy(rc), xy)


def test_points_layer_data_single_section(tmp_path):
    a = _adata(n=64, spacing=10.0)
    data, kw, kind = read_slide(_write(a, tmp_path / "s.h5ad"))
    assert kind == "points" and data.shape == (64, 2)
    np.testing.assert_allclose(data, a.obsm["spatial"][:, ::-1])  # one section: coordinates untouched
    assert kw["size"] == pytest.approx(10.0)  # median nearest-neighbour distance of a 10-unit grid
    f = kw["features"]
    assert isinstance(f["cell_type"].dtype, pd.CategoricalDtype)
    assert isinstance(f["region"].dtype, pd.CategoricalDtype)  # text with few values -> category
    assert not isinstance(f["cell_id"].dtype, pd.CategoricalDtype)  # one value per cell stays text
    assert f["score"].dtype == np.float64
    np.testing.assert_array_equal(f["cell_index"], np.arange(64))
    assert kw["face_color"] == "cell_type" and set(kw["face_color_cycle"]) == {"A", "B", "C"}
    assert len(set(kw["face_color_cycle"].values())) == 3
    meta = kw["metadata"]
    assert meta["adata"].n_obs == 64 and meta["section_key"] is None and not meta["subsampled"]
    assert kw["feature_defaults"]["cell_index"] == -1


def test_sections_are_tiled_without_overlap():
    sections = np.repeat(["s1", "s2", "s3"], 50)
    a = _adata(n=150, sections=sections)
    # all three sections share the same coordinates: without tiling they would sit on top of each other
    a.obsm["spatial"] = np.tile(a.obsm["spatial"][:50], (3, 1))
    data, kw, _ = L.adata_to_points(a)
    assert kw["metadata"]["section_key"] == "section" and kw["metadata"]["layout"] == "tiled"
    boxes = [(data[sections == s].min(0), data[sections == s].max(0)) for s in ("s1", "s2", "s3")]
    for i in range(3):
        for j in range(i + 1, 3):
            (lo1, hi1), (lo2, hi2) = boxes[i], boxes[j]
            overlap = np.all((lo1 <= hi2) & (lo2 <= hi1))
            assert not overlap, (i, j, boxes)
    # each tile keeps its section's shape (a pure shift)
    for s in ("s1", "s2", "s3"):
        d = data[sections == s]
        np.testing.assert_allclose(d - d[0], L.xy_to_rowcol(a.obsm["spatial"][:50] - a.obsm["spatial"][0]), atol=1e-3)
    # the same layout can be recomputed for every cell (gene images overlay the points)
    np.testing.assert_allclose(L.display_coordinates(a, kw["metadata"]), data, atol=1e-3)


def test_explicit_section_key_and_none():
    a = _adata(n=40, sections=np.repeat(["a", "b"], 20))
    a.obs["slab"] = np.repeat(["u", "v", "w", "x"], 10)
    _, kw, _ = L.adata_to_points(a, section_key="slab")
    assert kw["metadata"]["section_names"] == ["u", "v", "w", "x"]
    _, kw, _ = L.adata_to_points(a, section_key=None)
    assert kw["metadata"]["section_names"] == ["all"]


def test_colours_from_uns_and_stable_palette():
    a = _adata()
    a.uns["cell_type_colors"] = np.array(["#ff0000", "#00ff00", "#0000ff"])
    _, kw, _ = L.adata_to_points(a, color_by="cell_type")
    assert kw["face_color_cycle"] == {"A": "#ff0000", "B": "#00ff00", "C": "#0000ff"}
    del a.uns["cell_type_colors"]
    first = L.category_colors(a, "cell_type")
    assert first == L.category_colors(a, "cell_type") == dict(zip("ABC", L.stable_palette(3)))
    many = L.stable_palette(60)
    assert len(set(many)) == 60 and many[:5] == L.stable_palette(5)


def test_unknown_labels_are_grey_and_numeric_colouring():
    a = _adata(n=30)
    a.obs["cell_type"] = pd.Categorical(["Excluded"] * 10 + ["T"] * 10 + ["B"] * 10)
    cols = L.category_colors(a, "cell_type")
    assert cols["Excluded"] == L.UNKNOWN_COLOR and cols["T"] != L.UNKNOWN_COLOR
    _, kw, _ = L.adata_to_points(a, color_by="score")
    lo, hi = kw["face_contrast_limits"]
    assert kw["face_colormap"] == "viridis" and lo < hi
    _, kw, _ = L.adata_to_points(a, color_by=None)
    assert kw["face_color"] == "#e0e0e0"


@pytest.mark.filterwarnings("ignore:Transforming to str index")
def test_large_slide_draws_every_cell_as_an_overview_not_a_subsample():
    """A synthetic slide above the 2 million point threshold: no random subsample; the layer holds the
    cells in view (none at first), its source holds every cell, and an overview image of every cell."""
    from napari_spatialssl._napari import big_slides as B

    n = L.DEFAULT_MAX_POINTS + 50_000
    rng = np.random.default_rng(0)
    a = ad.AnnData(sp.csr_matrix((n, 1), dtype=np.float32),
                   obs=pd.DataFrame({"cell_type": pd.Categorical(rng.integers(0, 4, n).astype(str))}))
    a.obsm["spatial"] = rng.uniform(0, 20_000, size=(n, 2))
    data, kw, _ = L.adata_to_points(a)
    assert len(data) == 0 and kw["name"] == "cells"
    meta = kw["metadata"]
    assert meta["overview"] and not meta["subsampled"] and meta["n_cells_total"] == n and meta["adata"] is a
    source = meta[B.VIEWPORT]
    np.testing.assert_array_equal(source.features["cell_index"], np.arange(n))
    np.testing.assert_allclose(source.positions, L.xy_to_rowcol(a.obsm["spatial"]), rtol=1e-6)
    pyramid = meta[B.OVERVIEW]
    assert pyramid.n_cells == n and pyramid.levels[0].shape[2] == 4


def test_point_size_is_seeded_and_the_same_for_a_small_threshold():
    a = _adata(n=500)
    d1, k1, _ = L.adata_to_points(a, max_points=100, seed=3)
    d2, k2, _ = L.adata_to_points(a, seed=3)
    assert len(d1) == 0 and len(d2) == 500 and k1["size"] == k2["size"]
    assert k1["metadata"]["overview"] and not k2["metadata"]["overview"]


def test_gene_expression_is_log_normalised():
    a = _adata(n=20)
    X = a.X.toarray()
    expected = np.log1p(X[:, 2] / X.sum(1) * 1e4)
    got = G.gene_expression(a, ["g2"])[:, 0]
    np.testing.assert_allclose(got, np.nan_to_num(expected), rtol=1e-5)
    with pytest.raises(SpatialDataError, match=r"gene\(s\) \['nope'\] not in var_names"):
        G.gene_expression(a, ["nope"])


def test_gene_image_bins_align_with_points():
    a = ad.AnnData(np.array([[1, 0], [3, 1], [0, 5]], dtype=np.float32),
                   var=pd.DataFrame(index=["ga", "gb"]))
    a.obsm["spatial"] = np.array([[0.0, 0.0], [2.0, 0.5], [25.0, 12.0]])  # (x, y)
    layers = G.gene_image_layers(a, ["ga", "gb"], bin_size=10.0)
    assert len(layers) == 2
    img, kw, kind = layers[0]
    assert kind == "image" and img.shape == (2, 3)  # rows over y (0..12), cols over x (0..25)
    expr = G.gene_expression(a, ["ga"])[:, 0]
    assert img[0, 0] == pytest.approx(expr[:2].mean())  # two cells share bin (0, 0)
    assert img[1, 2] == pytest.approx(expr[2])
    assert img[0, 1] == 0 and img[1, 0] == 0
    # the bin holding cell 3 is centred within half a bin of its (row, col) = (12, 25)
    centre = np.asarray(kw["translate"]) + np.array([1, 2]) * np.asarray(kw["scale"])
    assert np.all(np.abs(centre - [12.0, 25.0]) <= 5.0)
    assert kw["blending"] == "additive" and layers[1][1]["colormap"] != kw["colormap"]
    with pytest.raises(SpatialDataError, match="bin size"):
        G.gene_image_layers(a, ["ga"], bin_size=0)


# ---------------------------------------------------------------------------------------------- real data

SAMPLES = {"osmfish_cortex.h5ad": (6471, None, 1), "starmap_mpfc_3slices.h5ad": (3190, "sample_id", 3)}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_shipped_samples(name):
    from napari_spatialssl._napari.sample_data import sample_path

    n, key, n_sec = SAMPLES[name]
    data, kw, _ = read_slide(sample_path(name))
    assert len(data) == n and kw["metadata"]["section_key"] == key
    assert len(kw["metadata"]["section_names"]) == n_sec
    assert kw["metadata"]["color_by"] == "cell_type"


SHARED = {
    "osmfish_cortex.h5ad": (None, 1),
    "starmap_mpfc_3slices.h5ad": ("sample_id", 3),
    "merfish_hypothalamus_2sections.h5ad": ("section", 2),
    "dlpfc_151673-151676.h5ad": ("sample_id", 4),
    "dlpfc_151673.h5ad": ("sample_id", 1),
    "dlpfc_151674.h5ad": ("sample_id", 1),
    "dlpfc_151675.h5ad": ("sample_id", 1),
    "dlpfc_151676.h5ad": ("sample_id", 1),
}


@pytest.mark.shared_data
@pytest.mark.parametrize("name", sorted(SHARED))
def test_every_shared_file_gives_one_point_per_cell(shared_data, name):
    path = shared_data(name)
    key, n_sec = SHARED[name]
    data, kw, _ = read_slide(path)
    adata = kw["metadata"]["adata"]
    assert data.shape == (adata.n_obs, 2) and np.isfinite(data).all()
    assert kw["metadata"]["section_key"] == key
    names = kw["metadata"]["section_names"]
    assert len(names) == n_sec
    if key:
        assert names == sorted(adata.obs[key].astype(str).unique())
        counts = adata.obs[key].astype(str).value_counts()
        shown = kw["features"][key].astype(str).value_counts()
        assert counts.sort_index().equals(shown.sort_index())
    assert kw["size"] > 0
