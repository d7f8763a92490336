"""Domain clustering and scores: k-means, GMM-BIC, Leiden resolution search, smoothing, batch mixing."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from napari_spatialssl.evaluation.clustering import (
    batch_mixing_scores,
    domain_scores,
    gmm_bic,
    assign_by_neighbours,
    graph_cluster_search,
    hungarian_accuracy,
    kmeans,
    leiden_labels,
    smooth_labels,
)


def _blobs(n_per=80, k=4, d=6, spread=0.4, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 5, size=(k, d))
    X = np.vstack([c + spread * rng.normal(size=(n_per, d)) for c in centres])
    return X, np.repeat(np.arange(k), n_per)


def test_kmeans_gmm_recover_blobs():
    X, y = _blobs()
    assert domain_scores(kmeans(X, 4), y)["ari"] == pytest.approx(1.0)
    labels, k = gmm_bic(X, range(2, 8))
    assert k == 4 and domain_scores(labels, y)["ari"] == pytest.approx(1.0)


def test_domain_scores_ignore_unlabelled_and_hungarian():
    truth = np.array([0, 0, 1, 1, 2, 2, -1, -1])
    pred = np.array([5, 5, 3, 3, 9, 9, 0, 1])
    s = domain_scores(pred, truth)
    assert s["ari"] == pytest.approx(1.0) and s["accuracy"] == pytest.approx(1.0) and s["n_cells"] == 6
    assert hungarian_accuracy(np.array([0, 0, 1, 1]), np.array([1, 1, 1, 0])) == pytest.approx(0.75)


def test_leiden_search_hits_target_k_and_chooses_without_k():
    X, y = _blobs(k=5)
    labels, info = graph_cluster_search(X, n_clusters=5)
    assert info["n_clusters"] == 5 and domain_scores(labels, y)["ari"] > 0.95
    labels, info = graph_cluster_search(X)
    assert info["criterion"] == "silhouette" and 2 <= info["n_clusters"] <= 30
    assert domain_scores(labels, y)["ari"] > 0.9
    assert len(info["tried"]) >= 3


def test_leiden_search_subsamples_large_inputs_then_assigns_every_cell():
    X, y = _blobs(n_per=300, k=5)  # 1,500 cells, graph on 400 of them
    labels, info = graph_cluster_search(X, max_graph_cells=400, assign_reference_cells=200)
    assert labels.shape == (1500,) and info["n_graph_cells"] == 400
    assert info["assigned"]["cells"] == 1100 and info["assigned"]["reference_cells"] == 200
    assert domain_scores(labels, y)["ari"] > 0.9
    labels_k, info_k = graph_cluster_search(X, n_clusters=5, max_graph_cells=400)
    assert info_k["n_clusters"] == 5 and domain_scores(labels_k, y)["ari"] > 0.95
    # below the threshold the full graph is used and nothing is assigned
    _, full = graph_cluster_search(X, n_clusters=5, max_graph_cells=5000)
    assert "assigned" not in full and "n_graph_cells" not in full


def test_assign_by_neighbours_majority_vote_in_blocks():
    ref = np.array([[0.0], [0.1], [0.2], [10.0], [10.1], [10.2]])
    ref_labels = np.array([1, 1, 0, 0, 0, 1])  # majority of 3 nearest: 1 near 0, 0 near 10
    query = np.array([[0.05], [10.05], [0.15], [9.9]])
    out = assign_by_neighbours(query, ref, ref_labels, n_neighbors=3, block_size=3)
    np.testing.assert_array_equal(out, [1, 0, 1, 0])


def test_leiden_labels_ordered_by_size_and_seeded():
    X, _ = _blobs(k=3)
    from napari_spatialssl.evaluation.clustering import _knn_connectivities

    A = _knn_connectivities(X, 10)
    a = leiden_labels(A, 0.5, seed=1)
    b = leiden_labels(A, 0.5, seed=1)
    np.testing.assert_array_equal(a, b)
    counts = np.bincount(a)
    assert (np.diff(counts) <= 0).all()


def test_resolution_sweep_stops_past_max_clusters_and_big_graphs_iterate_twice(monkeypatch):
    from napari_spatialssl.evaluation import clustering as C

    X, _ = _blobs(n_per=60, k=6, spread=1.5)
    _, full = graph_cluster_search(X, resolutions=(2.0, 0.1, 0.5, 1.0, 5.0, 10.0, 20.0), max_clusters=8)
    counts = [m for _r, m, _s in full["tried"]]
    assert [r for r, _m, _s in full["tried"]] == sorted(r for r, _m, _s in full["tried"])  # lowest first
    assert counts[-1] > 8 and all(m <= 8 for m in counts[:-1]) and len(counts) < 7
    assert full["leiden_iterations"] == -1  # a small graph: until the partition is stable
    calls = []
    real = C.leiden_labels
    monkeypatch.setattr(C, "leiden_labels", lambda g, r, seed=0: calls.append(g.vcount()) or real(g, r, seed))
    monkeypatch.setattr(C, "EXACT_KNN_MAX_CELLS", 100)
    labels, big = graph_cluster_search(X, 6)
    assert big["leiden_iterations"] == 2 and big["knn"] == "approximate" and calls and set(calls) == {len(X)}
    assert C.leiden_iterations(100) == -1 and C.leiden_iterations(101) == 2


def test_smooth_labels_majority_of_neighbourhood():
    # a path 0-1-2-3-4 with one odd label in the middle
    rows = np.array([0, 1, 1, 2, 2, 3, 3, 4])
    cols = np.array([1, 0, 2, 1, 3, 2, 4, 3])
    A = sp.csr_matrix((np.ones(8), (rows, cols)), shape=(5, 5))
    out = smooth_labels(np.array([0, 0, 1, 0, 0]), A)
    np.testing.assert_array_equal(out, [0, 0, 0, 0, 0])


def test_batch_mixing_separated_vs_mixed():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 5))
    batch = np.repeat([0, 1], 200)
    mixed = batch_mixing_scores(X, batch)
    shifted = X.copy()
    shifted[batch == 1] += 20.0
    separated = batch_mixing_scores(shifted, batch)
    assert mixed["batch_entropy"] > 0.9 and separated["batch_entropy"] < 0.05
    assert mixed["batch_asw"] > 0.9 and separated["batch_asw"] < 0.2
    # per-label ASW: two domains that differ biologically but mix across batches stay "mixed"
    labels = np.tile(np.repeat([0, 1], 100), 2)
    Y = X.copy()
    Y[labels == 1] += 20.0
    assert batch_mixing_scores(Y, batch, labels)["batch_asw"] > 0.9
    assert batch_mixing_scores(X, np.zeros(400))["batch_asw"] is None


def test_edges_igraph_is_the_graph_of_the_edges_in_their_order():
    """The Leiden search's graph (built by add_edges, for its lower memory peak) is exactly the
    graph igraph's edge-list constructor makes: same vertices, same edges in the same order."""
    import igraph as ig

    from napari_spatialssl.evaluation.clustering import _edges_igraph, _knn_edges

    X = np.random.default_rng(3).normal(size=(400, 5)).astype(np.float32)
    edges = _knn_edges(X, 6)
    g = _edges_igraph(400, edges)
    ref = ig.Graph(n=400, edges=edges.tolist(), directed=False)
    assert g.vcount() == 400 and not g.is_directed()
    assert g.get_edgelist() == ref.get_edgelist() == [tuple(e) for e in edges.tolist()]
    empty = _edges_igraph(7, np.zeros((0, 2), np.int32))
    assert empty.vcount() == 7 and empty.ecount() == 0
