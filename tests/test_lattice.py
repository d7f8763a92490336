"""Lattice, patches and channel selection, checked against dense references on real slides."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from napari_spatialssl.data.dataset import SpatialDataset
from napari_spatialssl.data.io import SpatialDataError, read_h5ad
from napari_spatialssl.graphs.lattice import (
    PatchBatch,
    build_lattice,
    build_lattices,
    centered_origins,
    extract_patches,
    patch_gene_variance,
    random_origins,
    rasterize,
    sample_patches,
    scatter_to_bins,
    select_channels,
    suggest_bin_size,
    tiled_origins,
)


_CACHE: dict = {}


@pytest.fixture
def merfish(shared_data):
    """The real MERFISH hypothalamus slide (2 sections, 161 genes) as a SpatialDataset (read once)."""
    path = shared_data("merfish_hypothalamus_2sections.h5ad")
    if path not in _CACHE:
        adata = read_h5ad(path)
        _CACHE[path] = SpatialDataset.from_anndata(adata, section_key="section", label_key="Cell_class",
                                                   ignore_labels=["Ambiguous"])
    return _CACHE[path]


def _naive_grid(coords, values, bin_size, origin, shape):
    H, W = shape
    grid = np.zeros((H, W, values.shape[1]))
    count = np.zeros((H, W))
    for (x, y), v in zip(coords, values):
        c, r = int(np.floor((x - origin[0]) / bin_size)), int(np.floor((y - origin[1]) / bin_size))
        if 0 <= r < H and 0 <= c < W:
            grid[r, c] += v
            count[r, c] += 1
    return grid, count


def _padded_crop(dense, origin, h, w):
    H, W, G = dense.shape
    out = np.zeros((h, w, G), dtype=dense.dtype)
    r0, c0 = origin
    rs, cs = max(r0, 0), max(c0, 0)
    re, ce = min(r0 + h, H), min(c0 + w, W)
    if re > rs and ce > cs:
        out[rs - r0:re - r0, cs - c0:ce - c0] = dense[rs:re, cs:ce]
    return out


def test_rasterize_mean_sum_orientation_and_aspect():
    rng = np.random.default_rng(0)
    coords = rng.uniform([10, 50], [310, 150], size=(800, 2))  # 300 wide, 100 tall
    values = rng.normal(size=(800, 3)).astype(np.float32)
    grid, occ, origin, b = rasterize(coords, values, 10.0)
    assert grid.shape == (10, 30, 3) and grid.dtype == np.float32  # rows = y, cols = x: aspect kept
    ref_sum, count = _naive_grid(coords, values, 10.0, origin, (10, 30))
    np.testing.assert_array_equal(occ, count > 0)
    np.testing.assert_allclose(grid[occ], (ref_sum[occ] / count[occ][:, None]), atol=1e-5)
    gsum, _, _, _ = rasterize(coords, values, 10.0, agg="sum")
    np.testing.assert_allclose(gsum, ref_sum, atol=1e-4)
    # one cell at the top-right corner lands in row 0, last column (y down, x across)
    g1, o1, _, _ = rasterize(np.array([[0.0, 0.0], [95.0, 1.0], [0.0, 45.0]]), np.arange(3.0), 10.0)
    assert g1.shape == (5, 10, 1) and g1[0, 9, 0] == 1.0 and g1[4, 0, 0] == 2.0
    # explicit origin / shape: cells outside are dropped
    g2, o2, org, _ = rasterize(coords, values[:, 0], 10.0, origin=(110.0, 50.0), shape=(4, 5))
    inside = (coords[:, 0] >= 110) & (coords[:, 0] < 160) & (coords[:, 1] < 90)
    assert org == (110.0, 50.0) and g2.shape == (4, 5, 1)
    np.testing.assert_allclose(rasterize(coords, values[:, 0], 10.0, origin=(110.0, 50.0), shape=(4, 5),
                                         agg="sum")[0].sum(), values[inside, 0].sum(), rtol=1e-4)
    gs, os_, _, _ = rasterize(coords, sp.csr_matrix(values), 10.0)  # sparse values accepted
    np.testing.assert_allclose(gs, grid, atol=1e-6)
    with pytest.raises(SpatialDataError):
        rasterize(coords, values, 0.0)
    with pytest.raises(SpatialDataError):
        rasterize(coords, values, 5.0, agg="max")
    with pytest.raises(SpatialDataError):
        rasterize(coords, values[:10], 5.0)


def test_lattices_of_real_merfish_match_dense_rasterisation(merfish):
    lats = build_lattices(merfish, 25.0)
    assert len(lats) == 2
    for lat in lats:
        cells = merfish.section_indices(lat.section)
        np.testing.assert_array_equal(lat.cells, cells)
        assert sp.issparse(lat.bin_expr) and lat.bin_expr.dtype == np.float32
        assert lat.n_cells_per_bin.sum() == len(cells)
        np.testing.assert_array_equal(lat.occupancy, lat.n_cells_per_bin > 0)
        assert lat.bin_rows.dtype == np.int32 and lat.bin_rows.max() == lat.n_occupied - 1
        grid, occ, origin, _ = rasterize(merfish.coords[cells], merfish.dense_rows(cells), 25.0)
        assert lat.shape == occ.shape and np.allclose(lat.origin, origin)
        np.testing.assert_array_equal(occ, lat.occupancy)
        np.testing.assert_allclose(lat.dense(), grid, atol=1e-4)
        # every cell's bin contains it
        rc = lat.cell_rowcol()
        assert lat.occupancy[rc[:, 0], rc[:, 1]].all()
        centres = lat.bin_centers()[rc[:, 0], rc[:, 1]]
        assert np.abs(centres - merfish.coords[cells]).max() <= 12.5 + 1e-6


def test_patches_equal_dense_crops_for_every_origin_kind(merfish):
    lat = build_lattices(merfish, 20.0)[0]
    dense = lat.dense()
    rng = np.random.default_rng(0)
    h, w, m = 16, 12, 24
    origins = np.concatenate([
        random_origins(lat, 20, h, w, 0.5, rng),
        tiled_origins(lat, h, w, 8)[:20],
        centered_origins(lat, lat.cells[[0, 5, 100, -1]], h, w),
        np.array([[-5, -7], [lat.shape[0] - 3, lat.shape[1] - 2]]),  # sticking out: padded
    ])
    genes = select_channels(lat, origins, h, w, m, rng)
    batch = extract_patches(lat, origins, h, w, genes)
    assert isinstance(batch, PatchBatch) and len(batch) == len(origins)
    assert batch.values.shape == (len(origins), h, w, m) and batch.values.dtype == np.float32
    assert batch.genes.shape == (len(origins), m) and batch.genes.dtype == np.int64
    for p, o in enumerate(origins):
        crop = _padded_crop(dense, o, h, w)
        np.testing.assert_allclose(batch.values[p], crop[..., genes[p]], atol=1e-6)
        np.testing.assert_array_equal(batch.occupancy[p], _padded_crop(lat.occupancy[..., None], o, h, w)[..., 0])
    assert (batch.section == lat.section).all()
    combined = sample_patches(lat, origins, h, w, m, np.random.default_rng(9))
    np.testing.assert_array_equal(combined.genes, select_channels(lat, origins, h, w, m, np.random.default_rng(9)))
    np.testing.assert_array_equal(combined.values, extract_patches(lat, origins, h, w, combined.genes).values)
    shared = extract_patches(lat, origins[:3], h, w, np.array([3, 1, 2]))
    np.testing.assert_allclose(shared.values[1], _padded_crop(dense, origins[1], h, w)[..., [3, 1, 2]])


def test_origin_samplers(merfish):
    lat = build_lattices(merfish, 20.0)[1]
    rng = np.random.default_rng(1)
    h = w = 16
    o = random_origins(lat, 50, h, w, 0.6, rng)
    assert o.shape == (50, 2) and (o >= 0).all()
    assert (o[:, 0] + h <= lat.shape[0]).all() and (o[:, 1] + w <= lat.shape[1]).all()
    occ = extract_patches(lat, o, h, w, np.array([0])).occupancy.mean(axis=(1, 2))
    assert (occ >= 0.6).all()
    np.testing.assert_array_equal(o, random_origins(lat, 50, h, w, 0.6, np.random.default_rng(1)))
    with pytest.raises(SpatialDataError, match="min_occupancy"):
        random_origins(lat, 5, h, w, 1.01, rng)
    # tiles cover every occupied bin (and thus every cell)
    t = tiled_origins(lat, h, w, 10)
    covered = np.zeros(lat.shape, dtype=bool)
    for r, c in t:
        covered[r:r + h, c:c + w] = True
    assert covered[lat.occupancy].all()
    assert len(tiled_origins(lat, h, w, skip_empty=False)) >= len(tiled_origins(lat, h, w))
    # centred: the cell's bin sits at (h // 2, w // 2)
    cells = lat.cells[::500]
    c = centered_origins(lat, cells, h, w)
    rc = lat.cell_rowcol()[np.searchsorted(lat.cells, cells)]
    np.testing.assert_array_equal(c + [h // 2, w // 2], rc)
    with pytest.raises(SpatialDataError, match="not in section"):
        centered_origins(lat, np.array([build_lattices(merfish, 20.0)[0].cells[0]]), h, w)


def test_channel_selection_is_variance_weighted_without_replacement(merfish):
    lat = build_lattices(merfish, 20.0)[0]
    rng = np.random.default_rng(2)
    origins = random_origins(lat, 300, 16, 16, 0.5, rng)
    genes = select_channels(lat, origins, 16, 16, 20, rng)
    assert genes.shape == (300, 20)
    assert (np.diff(genes, axis=1) > 0).all()  # distinct (without replacement), sorted
    var = patch_gene_variance(lat, origins, 16, 16)
    # reference variance of one patch from the dense crop's occupied bins
    crop = _padded_crop(lat.dense(), origins[0], 16, 16)
    occ = _padded_crop(lat.occupancy[..., None], origins[0], 16, 16)[..., 0]
    np.testing.assert_allclose(var[0], crop[occ].var(axis=0), rtol=1e-3, atol=1e-6)
    # the most variable gene of a patch is chosen far more often than the least variable ones
    top = var.argmax(1)
    low = np.argsort(var, axis=1)[:, :20]
    chosen = np.zeros_like(var, dtype=bool)
    np.put_along_axis(chosen, genes, True, axis=1)
    assert chosen[np.arange(300), top].mean() > 0.9
    assert np.take_along_axis(chosen, low, 1).mean() < 0.1
    # zero-variance genes only once the variable ones are used up; all genes when G <= m
    all_g = select_channels(lat, origins[:4], 16, 16, lat.n_genes + 5, rng)
    np.testing.assert_array_equal(all_g, np.tile(np.arange(lat.n_genes), (4, 1)))
    empty = select_channels(lat, np.array([[-100, -100]]), 16, 16, 5, rng)
    assert len(np.unique(empty)) == 5


def test_scatter_back_and_suggested_bin_size(merfish):
    lat = build_lattices(merfish, 20.0)[0]
    origins = tiled_origins(lat, 16, 16, 8)
    batch = extract_patches(lat, origins, 16, 16, np.arange(5))
    grid, covered = scatter_to_bins(lat, origins, batch.values)
    np.testing.assert_allclose(grid[lat.occupancy], lat.dense(np.arange(5))[lat.occupancy], atol=1e-6)
    assert covered[lat.occupancy].all()
    size = suggest_bin_size(merfish.coords, merfish.section)
    assert 11.0 <= size <= 15.0  # median nearest-neighbour spacing of this MERFISH slide, ~12.9 um


def test_lattice_of_dense_expression_and_errors():
    rng = np.random.default_rng(3)
    coords = rng.uniform(0, 100, size=(300, 2))
    X = rng.normal(size=(300, 4)).astype(np.float32)  # dense, negative values (scaled data)
    lat = build_lattice(coords, X, 10.0)
    grid, _, _, _ = rasterize(coords, X, 10.0)
    np.testing.assert_allclose(lat.dense(), grid, atol=1e-5)
    with pytest.raises(SpatialDataError):
        build_lattice(coords, X, 10.0, cells=np.array([], dtype=np.int64))
    with pytest.raises(SpatialDataError):
        extract_patches(lat, np.array([[0, 0]]), 4, 4, np.array([9]))
    with pytest.raises(SpatialDataError):
        select_channels(lat, np.array([[0, 0]]), 4, 4, 0)
