"""Neighbour graphs: exactness against brute force / scikit-learn, per-section isolation, budgets."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from napari_spatialssl.data.io import SpatialDataError, read_h5ad, section_codes
from napari_spatialssl.graphs.neighbors import (
    CellGraph,
    estimate_radius_edges,
    knn_graph,
    radius_graph,
    snn_graph,
)


def _random_slide(n=1500, n_sections=3, seed=0):
    rng = np.random.default_rng(seed)
    coords = rng.uniform(0, 250, size=(n, 2))
    coords[7] = coords[8]  # duplicated position: a zero-distance edge must survive
    section = rng.integers(0, n_sections, size=n).astype(np.int32)
    section[8] = section[7]
    return coords, section


def _brute_radius(coords, radius, section):
    d = np.sqrt(((coords[:, None] - coords[None]) ** 2).sum(-1))
    same = section[:, None] == section[None]
    return (d <= radius) & same & ~np.eye(len(coords), dtype=bool), d


def _merfish(shared_data):
    adata = read_h5ad(shared_data("merfish_hypothalamus_2sections.h5ad"))
    section, _ = section_codes(adata, "section")
    return np.asarray(adata.obsm["spatial"], dtype=np.float64), section


def test_radius_graph_matches_brute_force_within_sections():
    coords, section = _random_slide()
    g = radius_graph(coords, 15.0, section)
    want, d = _brute_radius(coords, 15.0, section)
    A = g.to_scipy().toarray() > 0
    np.testing.assert_array_equal(A, want)
    rows = np.repeat(np.arange(g.n_nodes), g.degrees())
    np.testing.assert_allclose(g.distances, d[rows, g.indices], atol=1e-4)
    assert 8 in g.indices[g.indptr[7]:g.indptr[8]]  # zero-distance neighbour kept
    # sorted neighbour lists, symmetric, int32 indices
    assert g.indices.dtype == np.int32
    assert all(np.all(np.diff(g.indices[g.indptr[i]:g.indptr[i + 1]]) > 0) for i in range(50))
    assert (g.to_scipy() != g.to_scipy().T).nnz == 0
    assert not (section[rows] != section[g.indices]).any()


def test_self_loops_and_summary():
    coords, section = _random_slide(600, 2, seed=1)
    g = radius_graph(coords, 10.0, section)
    gl = radius_graph(coords, 10.0, section, self_loops=True)
    assert gl.n_edges == g.n_edges + g.n_nodes
    A = gl.to_scipy("distance")
    assert np.all(A.diagonal() == 0) and (gl.to_scipy().diagonal() == 1).all()
    s = g.summary()
    deg = g.degrees()
    assert s["n_edges"] == g.n_edges and s["isolated_cells"] == int((deg == 0).sum())
    assert s["mean_degree"] == pytest.approx(deg.mean())
    assert s["radius"] == 10.0 and s["self_loops"] is False


def test_edge_index_convention_and_subgraph():
    coords, section = _random_slide(400, 1, seed=2)
    g = radius_graph(coords, 20.0, section)
    ei = g.edge_index().numpy()
    assert ei.shape == (2, g.n_edges)
    # row 1 = centre (CSR row), row 0 = neighbour (CSR column)
    np.testing.assert_array_equal(ei[1], np.repeat(np.arange(g.n_nodes), g.degrees()))
    np.testing.assert_array_equal(ei[0], g.indices)
    nodes = np.arange(0, 400, 3)
    sub_ei, sub_d = g.subgraph(nodes)
    A = g.to_scipy().toarray()[np.ix_(nodes, nodes)]
    assert sub_ei.shape[1] == int(A.sum()) and len(sub_d) == sub_ei.shape[1]
    assert A[sub_ei[1], sub_ei[0]].all()


def test_knn_and_snn_graphs_match_sklearn():
    from sklearn.neighbors import NearestNeighbors

    coords, section = _random_slide(900, 3, seed=3)
    k = 6
    directed = knn_graph(coords, k, section, symmetric=False)
    assert (directed.degrees() == k).all() and directed.params["directed"]
    sym = knn_graph(coords, k, section)
    snn = snn_graph(coords, k, 12.0, section)
    for s in range(3):
        idx = np.flatnonzero(section == s)
        dist, nb = NearestNeighbors(n_neighbors=k + 1).fit(coords[idx]).kneighbors(coords[idx])
        mine = directed.to_scipy()[idx][:, idx].toarray() > 0
        # duplicated coordinates can displace the self entry: then one tie may differ
        for i in range(len(idx)):
            got = set(np.flatnonzero(mine[i]).tolist())
            assert len(got) == k and i not in got
            if i in nb[i]:
                assert got == set(nb[i].tolist()) - {i}
            else:
                assert len(got & set(nb[i].tolist())) >= k - 1
        D = knn_graph(coords[idx], k, symmetric=False).to_scipy().toarray() > 0
        S = sym.to_scipy()[idx][:, idx].toarray() > 0
        np.testing.assert_array_equal(S, D | D.T)  # union symmetrisation
        Dd = np.sqrt(((coords[idx][:, None] - coords[idx][None]) ** 2).sum(-1))
        N = snn.to_scipy()[idx][:, idx].toarray() > 0
        Dc = D & (Dd <= 12.0)
        np.testing.assert_array_equal(N, Dc | Dc.T)  # k nearest, then the radius cutoff
    assert snn.kind == "snn" and snn.params["max_distance"] == 12.0
    assert snn.distances.max() <= 12.0 + 1e-4


def test_edge_budget_refuses_with_a_radius_that_fits():
    coords, section = _random_slide(4000, 2, seed=4)
    with pytest.raises(SpatialDataError, match=r"use radius <= ([0-9.]+)") as err:
        radius_graph(coords, 60.0, section, max_memory_gb=0.001)
    fit = float(err.value.args[0].split("use radius <= ")[1].split(" ")[0])
    assert 0 < fit < 60.0
    g = radius_graph(coords, fit * 0.9, section, max_memory_gb=0.001)
    assert g.n_edges > 0
    with pytest.raises(SpatialDataError, match="k="):
        knn_graph(coords, 50, section, max_memory_gb=1e-4)


def test_bad_inputs_are_refused():
    coords, section = _random_slide(100, 1)
    with pytest.raises(SpatialDataError, match="radius"):
        radius_graph(coords, -1.0, section)
    with pytest.raises(SpatialDataError, match="k must"):
        knn_graph(coords, 0, section)
    bad = coords.copy()
    bad[3, 0] = np.nan
    with pytest.raises(SpatialDataError, match="NaN"):
        radius_graph(bad, 5.0)
    with pytest.raises(SpatialDataError, match="section"):
        radius_graph(coords, 5.0, section[:10])


def test_tiny_sections_and_empty_graph():
    coords = np.array([[0.0, 0.0], [1.0, 0.0], [100.0, 0.0]])
    section = np.array([0, 1, 1])
    g = knn_graph(coords, 3, section)
    assert g.n_edges == 2  # cells 1 and 2 only; cell 0 alone in its section
    g = radius_graph(coords, 0.5, section)
    assert g.n_edges == 0 and g.summary()["isolated_cells"] == 3


def test_real_merfish_radius_graph_matches_sklearn(shared_data):
    from sklearn.neighbors import radius_neighbors_graph

    coords, section = _merfish(shared_data)
    g = radius_graph(coords, 25.0, section)
    for s in np.unique(section):
        idx = np.flatnonzero(section == s)
        ref = radius_neighbors_graph(coords[idx], 25.0, mode="distance", include_self=False)
        mine = g.to_scipy("distance")[idx][:, idx]
        assert (ref > 0).nnz == mine.nnz
        assert abs((ref > 0).astype(np.int8) - (mine > 0).astype(np.int8)).nnz == 0
        np.testing.assert_allclose(np.sort(mine.data), np.sort(ref.data), atol=1e-3)
    s = g.summary()
    assert 2.0 < s["mean_degree"] < 5.0  # MERFISH at 25 um: a few neighbours
    est = estimate_radius_edges(coords, 25.0, section)
    assert est == pytest.approx(g.n_edges, rel=0.1)


def test_real_starmap_snn_graph_per_section(shared_data):
    adata = read_h5ad(shared_data("starmap_mpfc_3slices.h5ad"))
    section, names = section_codes(adata, "sample_id")
    coords = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    g = snn_graph(coords, 10, None, section)
    rows = np.repeat(np.arange(g.n_nodes), g.degrees())
    assert len(names) == 3 and not (section[rows] != section[g.indices]).any()
    assert (g.degrees() >= 10).all()
    assert isinstance(g.to_scipy(), sp.csr_matrix) and isinstance(g, CellGraph)
