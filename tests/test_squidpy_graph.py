"""squidpy's graph keys: our graphs written under them, squidpy's graphs read back, squidpy on our results.

The squidpy tests skip without squidpy (it comes with the `[spatialdata]` extra's stack); the key layout
is checked against squidpy's own ``spatial_neighbors`` output when it is there.
"""

from __future__ import annotations

from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from napari_spatialssl.data.io import SpatialDataError
from napari_spatialssl.graphs.neighbors import knn_graph, radius_graph
from napari_spatialssl.graphs.squidpy_graph import (
    graph_of_run,
    has_squidpy_graph,
    is_spatialssl_graph,
    read_squidpy_graph,
    squidpy_keys,
    write_run_graph,
    write_squidpy_graph,
)

NEEDS_SQUIDPY = "needs squidpy (installed with the test extra beside spatialdata)"


@pytest.fixture(scope="module")
def slide(starmap_path):
    """STARmap, 3 slices (obs['sample_id']), pixel coordinates."""
    a = ad.read_h5ad(starmap_path)
    a.obs["sample_id"] = a.obs["sample_id"].astype("category")
    return a


def _sections(a):
    return a.obs["sample_id"].cat.codes.to_numpy()


def _same_graph(g, h):
    np.testing.assert_array_equal(g.indptr, h.indptr)
    np.testing.assert_array_equal(g.indices, h.indices)
    np.testing.assert_allclose(g.distances, h.distances, rtol=1e-5, atol=1e-4)


def test_keys_follow_squidpy_key_added():
    assert squidpy_keys() == ("spatial_connectivities", "spatial_distances", "spatial_neighbors")
    assert squidpy_keys("run1") == ("run1_connectivities", "run1_distances", "run1_neighbors")
    assert squidpy_keys("x_connectivities")[0] == "x_connectivities"
    with pytest.raises(SpatialDataError):
        squidpy_keys("")


def test_write_radius_and_knn_graphs(slide):
    xy, sec = slide.obsm["spatial"], _sections(slide)
    g = radius_graph(xy, 300.0, sec)
    a = slide.copy()
    entry = write_squidpy_graph(a, g)
    assert entry == {"connectivities_key": "spatial_connectivities", "distances_key": "spatial_distances",
                     "params": {"coord_type": "generic", "transform": None, "radius": 300.0},
                     "spatialssl": {"kind": "radius", "radius": 300.0, "self_loops": False}}
    assert is_spatialssl_graph(a) and not is_spatialssl_graph(slide)
    assert a.uns["spatial_neighbors"] is entry
    C, D = a.obsp["spatial_connectivities"], a.obsp["spatial_distances"]
    assert sp.isspmatrix_csr(C) and C.dtype == np.float32 and C.shape == (a.n_obs, a.n_obs)
    assert (C != g.to_scipy("ones")).nnz == 0 and np.all(C.data == 1.0)
    np.testing.assert_allclose(D.toarray(), g.to_scipy("distance").toarray())
    assert C.indices is not D.indices and C.indices is not g.indices  # editing one never changes another
    # an SNN/k-NN graph cut at a distance records both, as squidpy's params would
    k = knn_graph(xy, 6, sec, max_distance=500.0)
    write_squidpy_graph(a, k, key_added="knn")
    assert a.uns["knn_neighbors"]["params"] == {"coord_type": "generic", "transform": None, "n_neighbors": 6,
                                                "radius": 500.0}
    assert has_squidpy_graph(a, "knn") and has_squidpy_graph(a)
    with pytest.raises(SpatialDataError, match="the graph has 10 cells but the AnnData has"):
        write_squidpy_graph(a, knn_graph(xy[:10], 3))


def test_read_back_is_the_same_graph_after_h5ad(tmp_path, slide):
    xy, sec = slide.obsm["spatial"], _sections(slide)
    g = radius_graph(xy, 300.0, sec)
    a = slide.copy()
    write_squidpy_graph(a, g)
    a.write_h5ad(tmp_path / "g.h5ad")
    b = ad.read_h5ad(tmp_path / "g.h5ad")
    h = read_squidpy_graph(b, section=sec)
    assert h.kind == "squidpy" and h.params["radius"] == 300.0 and h.params["cross_section_edges_dropped"] == 0
    _same_graph(g, h)
    # without coordinates the edge lengths come from the distances matrix
    del b.obsm["spatial"]
    _same_graph(g, read_squidpy_graph(b))
    assert read_squidpy_graph(ad.AnnData(np.zeros((3, 2)))) is None


def test_read_directed_graph_with_loops_and_cross_section_edges():
    # 4 cells on a line, two sections {0, 1} and {2, 3}
    xy = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    rows = np.array([0, 1, 1, 2, 3, 0])
    cols = np.array([1, 2, 1, 3, 3, 0])  # 0->1, 1->2 (crosses), 1->1 and 3->3 and 0->0 (loops), 2->3
    A = sp.csr_matrix((np.ones(6, np.float32), (rows, cols)), shape=(4, 4))
    a = ad.AnnData(np.zeros((4, 2)), obsm={"spatial": xy}, obsp={"spatial_connectivities": A})
    g = read_squidpy_graph(a, section=np.array([0, 0, 1, 1]))
    dense = g.to_scipy().toarray()
    expected = np.zeros((4, 4))
    expected[[0, 1, 2, 3], [1, 0, 3, 2]] = 1  # symmetric, no loops, no edge between the sections
    np.testing.assert_array_equal(dense, expected)
    np.testing.assert_allclose(g.distances, 1.0)
    assert g.params["self_loops_dropped"] == 3 and g.params["cross_section_edges_dropped"] == 1
    assert g.params["directed_edges_read"] == 2 and g.params["symmetrized"]
    directed = read_squidpy_graph(a, symmetrize=False)
    assert directed.n_edges == 3  # 0->1, 1->2, 2->3
    # distances looked up the other way round when only one direction is stored
    del a.obsm["spatial"]
    D = sp.csr_matrix((np.array([1.0, 1.0, 1.0]), ([0, 1, 2], [1, 2, 3])), shape=(4, 4))
    a.obsp["spatial_distances"] = D
    np.testing.assert_allclose(read_squidpy_graph(a).distances, 1.0)
    del a.obsp["spatial_distances"]
    with pytest.raises(SpatialDataError, match="edge lengths"):
        read_squidpy_graph(a)
    fake = SimpleNamespace(obsp={"spatial_connectivities": sp.eye(2, format="csr")}, n_obs=4, uns={}, obsm={})
    with pytest.raises(SpatialDataError, match=r"shape \(2, 2\); expected \(4, 4\)"):
        read_squidpy_graph(fake)


def test_graph_of_run_prefers_the_methods_graph(slide):
    xy, sec = slide.obsm["spatial"], _sections(slide)
    data = SimpleNamespace(coords=xy, section=sec, n_cells=len(xy))
    g = radius_graph(xy, 300.0, sec)
    assert graph_of_run(SimpleNamespace(graph=g), data) is g  # spotscape
    assert graph_of_run(SimpleNamespace(view=SimpleNamespace(graph=g)), data) is g  # gnn-mask
    built = []
    m = SimpleNamespace(graph=None, build_graph=lambda d: built.append(d) or g)
    assert graph_of_run(m, data) is g and built == [data]  # after predict on a new slide
    other = radius_graph(xy[:50], 300.0)  # a graph of another slide is not this run's
    fallback = graph_of_run(SimpleNamespace(graph=other), data)  # patch-mae: squidpy's default 6-NN
    _same_graph(fallback, knn_graph(xy, 6, sec))
    a = slide.copy()
    write_run_graph(a, SimpleNamespace(), data, key_added="patch")
    assert a.uns["patch_neighbors"]["params"]["n_neighbors"] == 6


def test_squidpy_reads_our_graph_and_we_read_squidpys(slide):
    sq = pytest.importorskip("squidpy", reason=NEEDS_SQUIDPY)
    a = slide.copy()
    sq.gr.spatial_neighbors(a, coord_type="generic", n_neighs=6, library_key="sample_id")
    ours = knn_graph(a.obsm["spatial"], 6, _sections(a))
    theirs = read_squidpy_graph(a, section=_sections(a))
    assert not is_spatialssl_graph(a)  # a user's graph, not one of ours
    assert theirs.params["n_neighbors"] == 6 and theirs.params["cross_section_edges_dropped"] == 0
    # squidpy's k-NN graph, symmetrised, is our k-NN graph (ties aside: none in these coordinates)
    _same_graph(ours, theirs)
    # the keys we write are the ones squidpy writes
    b = slide.copy()
    write_squidpy_graph(b, ours)
    assert set(b.uns["spatial_neighbors"]) - {"spatialssl"} == set(a.uns["spatial_neighbors"])
    assert set(b.uns["spatial_neighbors"]["params"]) >= {"coord_type", "transform", "n_neighbors"}
    b.obs["domain"] = pd.Categorical(b.obs["layer"].astype(str))
    sq.gr.nhood_enrichment(b, cluster_key="domain", n_perms=20, seed=0, show_progress_bar=False)
    z = b.uns["domain_nhood_enrichment"]["zscore"]
    k = b.obs["domain"].cat.categories.size
    assert z.shape == (k, k) and np.isfinite(z).all()
    assert np.diag(z).mean() > 0  # cortical layers are spatially coherent: same-layer neighbours enriched
