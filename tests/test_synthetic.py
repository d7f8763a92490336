"""Synthetic atlas-shaped slides: density, coherent domains / cell types, lazy sparse expression."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.spatial import cKDTree

from napari_spatialssl.data.dataset import SpatialDataset
from napari_spatialssl.data.io import SpatialDataError
from napari_spatialssl.data.synthetic import synthetic_atlas, synthetic_coords, synthetic_slide
from napari_spatialssl.graphs.neighbors import radius_graph


def test_coords_shape_sections_and_realistic_density():
    coords, section = synthetic_coords(30_000, 5, seed=0)
    assert coords.shape == (30_000, 2) and coords.dtype == np.float64
    assert section.dtype == np.int32 and np.array_equal(np.unique(section), np.arange(5))
    assert np.all(np.diff(section) >= 0)  # grouped by section
    counts = np.bincount(section)
    assert counts[2] > counts[0]  # middle sections are larger, as in a brain
    g = radius_graph(coords, 20.0, section)
    assert 2.5 <= g.summary()["mean_degree"] <= 6.0  # a few neighbours at 20 um
    d, _ = cKDTree(coords[section == 2]).query(coords[section == 2], k=2)
    assert 5.0 < np.median(d[:, 1]) < 20.0  # micrometre spacing of cells
    c2, s2 = synthetic_coords(30_000, 5, seed=0)
    np.testing.assert_array_equal(c2, coords)
    with pytest.raises(SpatialDataError):
        synthetic_coords(3, 5)


def test_domains_and_cell_types_are_spatially_coherent():
    atlas = synthetic_atlas(20_000, 40, 2, 10, n_domains=6, seed=1)
    g = radius_graph(atlas.coords, 20.0, atlas.section)
    rows = np.repeat(np.arange(g.n_nodes), g.degrees())
    same_domain = (atlas.domain[rows] == atlas.domain[g.indices]).mean()
    same_type = (atlas.cell_type[rows] == atlas.cell_type[g.indices]).mean()
    shuffled = np.random.default_rng(0).permutation(atlas.cell_type)
    chance_type = (shuffled[rows] == shuffled[g.indices]).mean()
    assert same_domain > 0.9
    assert same_type > 1.3 * chance_type
    assert len(np.unique(atlas.domain)) == 6 and len(np.unique(atlas.cell_type)) >= 8


def test_expression_is_lazy_sparse_and_reproducible():
    atlas = synthetic_atlas(40_000, 550, 3, 12, seed=2)
    X = atlas.expression(1000, 1200)
    assert sp.isspmatrix_csr(X) and X.shape == (200, 550) and X.dtype == np.float32
    assert 0.05 < X.nnz / (200 * 550) < 0.8  # sparse counts
    np.testing.assert_array_equal(X.toarray(), atlas.expression(1000, 1200).toarray())
    # rows across a chunk boundary (4096) agree with the rows of a larger request
    big = atlas.expression(4_000, 4_300)
    np.testing.assert_array_equal(big[96:110].toarray(), atlas.expression(4_096, 4_110).toarray())
    assert np.allclose(X.data, np.round(X.data)) and (X.data > 0).all()
    # cell types differ in expression: type means are far apart relative to noise
    Xa = atlas.expression(0, 4000).toarray()
    types = atlas.cell_type[:4000]
    big_types = [t for t in np.unique(types) if (types == t).sum() > 100][:2]
    m0, m1 = (Xa[types == t].mean(0) for t in big_types)
    assert np.abs(np.log1p(m0) - np.log1p(m1)).max() > 1.0


def test_synthetic_slide_is_a_valid_anndata():
    adata = synthetic_slide(3000, 60, 2, 5, seed=3)
    assert sp.issparse(adata.X) and adata.shape == (3000, 60)
    data = SpatialDataset.from_anndata(adata, label_key="cell_type")
    assert data.n_sections == 2 and data.preprocessing["normalized"] and data.labels.min() >= 0
    assert set(adata.obs.columns) >= {"section", "domain", "cell_type"}
