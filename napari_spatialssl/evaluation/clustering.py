"""Spatial domains from embeddings, and how well they match reference labels."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


def kmeans(embeddings: np.ndarray, k: int, seed: int = 0, n_init: int = 10) -> np.ndarray:
    """k-means labels (0..k-1) of the rows of `embeddings`."""
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(np.asarray(embeddings, np.float64))


def gmm_bic(embeddings: np.ndarray, k_range=range(2, 16), seed: int = 0, max_fit_cells: int = 50_000):
    """Gaussian mixture with the number of components chosen by BIC; returns (labels, chosen k).

    Fitted on at most `max_fit_cells` random cells (BIC on a sample), then applied to all.
    """
    from sklearn.mixture import GaussianMixture

    X = np.asarray(embeddings, np.float64)
    rng = np.random.default_rng(seed)
    fit_idx = rng.choice(len(X), size=min(max_fit_cells, len(X)), replace=False)
    best, best_bic = None, np.inf
    for k in k_range:
        if k >= len(fit_idx):
            break
        g = GaussianMixture(k, covariance_type="diag", random_state=seed).fit(X[fit_idx])
        bic = g.bic(X[fit_idx])
        if bic < best_bic:
            best, best_bic = g, bic
    return best.predict(X), int(best.n_components)


def smooth_labels(labels: np.ndarray, adjacency: sp.csr_matrix) -> np.ndarray:
    """Each cell takes the majority label of itself and its graph neighbours (one pass, vectorised)."""
    labels = np.asarray(labels)
    n, k = len(labels), int(labels.max()) + 1
    onehot = sp.csr_matrix((np.ones(n), (np.arange(n), labels)), shape=(n, k))
    votes = (adjacency @ onehot + onehot).toarray()
    return votes.argmax(1)


def hungarian_accuracy(pred: np.ndarray, truth: np.ndarray) -> float:
    """Accuracy after the best one-to-one matching of predicted clusters to true classes."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    p_vals, p = np.unique(pred, return_inverse=True)
    t_vals, t = np.unique(truth, return_inverse=True)
    counts = np.zeros((len(p_vals), len(t_vals)))
    np.add.at(counts, (p, t), 1)
    r, c = linear_sum_assignment(-counts)
    return float(counts[r, c].sum() / len(truth))


def domain_scores(pred: np.ndarray, truth: np.ndarray) -> dict:
    """ARI, NMI and Hungarian accuracy on the cells with a known reference label (truth >= 0)."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    keep = truth >= 0
    return {
        "ari": float(adjusted_rand_score(truth[keep], pred[keep])),
        "nmi": float(normalized_mutual_info_score(truth[keep], pred[keep])),
        "accuracy": hungarian_accuracy(pred[keep], truth[keep]),
        "n_cells": int(keep.sum()),
    }


# -- graph clustering (Leiden) with a resolution search ------------------------------------------

# Above this many cells the k-NN graph of the Leiden search is approximate (pynndescent) by default:
# the exact search grows as N^2 (51 s at 100k cells on 2 cores, ~26 h extrapolated at 4.3M), while
# pynndescent costs a fixed ~2-3 minutes of numba compilation per process on this machine, then
# near-linear time (benchmarks/clustering_scale.py).
EXACT_KNN_MAX_CELLS = 150_000
KNN_METHODS = ("auto", "exact", "approximate")


def knn_indices(embeddings: np.ndarray, n_neighbors: int = 15, seed: int = 0, method: str = "auto") -> np.ndarray:
    """(n, k) indices of each row's k nearest other rows (Euclidean), k = min(n_neighbors, n - 1).

    method: "exact" (scikit-learn, deterministic), "approximate" (pynndescent's nearest-neighbour
    descent on every row: near-linear time after a fixed compilation cost; its recall against the
    exact graph is measured in benchmarks/clustering_scale.py), or "auto": exact up to
    EXACT_KNN_MAX_CELLS rows, else approximate."""
    if method not in KNN_METHODS:
        raise ValueError(f"k-NN method {method!r}: choose one of {KNN_METHODS}.")
    X = np.ascontiguousarray(embeddings, dtype=np.float32)
    n = len(X)
    k = min(n_neighbors, max(n - 1, 1))
    if method == "auto":
        method = "exact" if n <= EXACT_KNN_MAX_CELLS else "approximate"
    if method == "exact" or n <= k + 1:
        from sklearn.neighbors import NearestNeighbors

        return NearestNeighbors(n_neighbors=k + 1).fit(X).kneighbors(X, return_distance=False)[:, 1:]
    from pynndescent import NNDescent

    index = NNDescent(X, n_neighbors=k + 1, metric="euclidean", random_state=seed, low_memory=True,
                      n_jobs=-1, compressed=True, verbose=False)
    nb, _ = index.neighbor_graph
    del index
    # Each row's own index is normally first; drop it (or, if absent, the farthest neighbour).
    own = nb == np.arange(n)[:, None]
    drop = np.where(own.any(1), own.argmax(1), k)
    keep = np.ones_like(nb, dtype=bool)
    keep[np.arange(n), drop] = False
    return nb[keep].reshape(n, k)


def _knn_edges(embeddings: np.ndarray, n_neighbors: int = 15, seed: int = 0, method: str = "exact") -> np.ndarray:
    """(m, 2) int32 undirected edges (i < j, sorted by i then j, each once) of the union-symmetrised
    k-nearest-neighbour graph of the embeddings (Euclidean); `method` as in :func:`knn_indices`.
    One int64 key per directed edge and one sort (~0.5 GB per array at 4.3M cells), instead of a
    sparse matrix, its transpose and their maximum."""
    X = np.asarray(embeddings, np.float32)
    n = len(X)
    nb = knn_indices(X, n_neighbors, seed, method)
    i = np.repeat(np.arange(n, dtype=np.int64), nb.shape[1])
    j = nb.ravel().astype(np.int64)
    del nb
    keys = np.unique(np.minimum(i, j) * n + np.maximum(i, j))
    del i, j
    keys = keys[keys // n != keys % n]  # no self-loops
    return np.column_stack([(keys // n).astype(np.int32), (keys % n).astype(np.int32)])


def _knn_connectivities(embeddings: np.ndarray, n_neighbors: int = 15, seed: int = 0,
                        method: str = "exact") -> sp.csr_matrix:
    """Symmetric k-nearest-neighbour graph of the embeddings (Euclidean), unit weights,
    union-symmetrised; `method` as in :func:`knn_indices` (exact by default: deterministic)."""
    n = len(embeddings)
    e = _knn_edges(embeddings, n_neighbors, seed, method)
    rows, cols = np.concatenate([e[:, 0], e[:, 1]]), np.concatenate([e[:, 1], e[:, 0]])
    return sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n, n))


def _edges_igraph(n: int, edges: np.ndarray):
    """The undirected unweighted igraph of (m, 2) edges, in one ``add_edges`` call on an empty
    graph (see :func:`_igraph`). Not ``Graph(n, edges)``: that constructor peaks at ~180 bytes per
    edge (it keeps 34), against ~64 for ``add_edges`` (benchmarks/igraph_build_memory.py, 20M edges,
    igraph 1.0): ~8.6 GB against ~3.1 GB for the 4.3M-cell atlas's ~48M edges, which is what ran
    the atlas pipeline out of memory. Same graph, same edge order."""
    import igraph as ig

    g = ig.Graph(n=n, directed=False)
    if len(edges):
        g.add_edges(np.ascontiguousarray(edges))
    return g


def _igraph(connectivities: sp.spmatrix):
    """The undirected igraph of a symmetric adjacency, built once for all the resolutions tried
    (converting the edges is the slow part at atlas scale: ~2 microseconds per edge); unit weights
    are left out (Leiden's default weight is 1). One call (34 bytes per edge kept, measured):
    adding edges in chunks re-sorts every edge added so far on each call
    (igraph_vector_int_pair_order), which at 4.3M cells ran for over 12 minutes."""
    A = sp.triu(sp.csr_matrix(connectivities), k=1).tocoo()
    weights = A.data.astype(float)
    unit = bool(np.all(weights == 1.0))
    g = _edges_igraph(connectivities.shape[0], np.column_stack([A.row, A.col]))
    if not unit:
        g.es["weight"] = weights.tolist()
    return g


def leiden_iterations(n_cells: int) -> int:
    """Leiden iterations for a graph of `n_cells` rows: until the partition stops changing (-1) up to
    EXACT_KNN_MAX_CELLS rows; above, 2 (igraph's default, scanpy's igraph flavour). On a 400k-cell
    gnn-mask embedding the partition never settles (nodes keep swapping between communities of
    equal quality): 30 iterations of ~8 s each gained 0.0006 modularity over 2 and 0.004 ARI against
    the planted domains, and at 4.3M cells each resolution would run for hours."""
    return -1 if n_cells <= EXACT_KNN_MAX_CELLS else 2


def leiden_labels(connectivities, resolution: float, seed: int = 0, n_iterations: int | None = None) -> np.ndarray:
    """Leiden communities (labels 0..m-1) of a weighted graph at one resolution (igraph backend).
    `connectivities`: a symmetric sparse adjacency, or an igraph Graph made by :func:`_igraph`;
    `n_iterations`: None = :func:`leiden_iterations` of the graph's size (-1: until stable)."""
    import igraph as ig

    g = connectivities if isinstance(connectivities, ig.Graph) else _igraph(connectivities)
    import random

    random.seed(seed)  # igraph's community_leiden draws from Python's RNG
    ig.set_random_number_generator(random)
    if n_iterations is None:
        n_iterations = leiden_iterations(g.vcount())
    part = g.community_leiden(objective_function="modularity",
                              weights="weight" if "weight" in g.es.attributes() else None,
                              resolution=float(resolution), n_iterations=int(n_iterations))
    labels = np.asarray(part.membership, dtype=np.int64)
    # Number communities by size (largest first) so that labels are stable to read.
    _, inv, counts = np.unique(labels, return_inverse=True, return_counts=True)
    rank = np.empty_like(counts)
    rank[np.argsort(-counts, kind="stable")] = np.arange(len(counts))
    return rank[inv]


def _silhouette(embeddings: np.ndarray, labels: np.ndarray, seed: int, max_cells: int = 10_000) -> float:
    from sklearn.metrics import silhouette_score

    if len(np.unique(labels)) < 2:
        return -1.0
    n = len(labels)
    idx = np.random.default_rng(seed).choice(n, size=min(n, max_cells), replace=False)
    if len(np.unique(labels[idx])) < 2:
        return -1.0
    return float(silhouette_score(embeddings[idx], labels[idx]))


def assign_by_neighbours(query: np.ndarray, reference: np.ndarray, reference_labels: np.ndarray, *,
                         n_neighbors: int = 15, block_size: int = 100_000) -> np.ndarray:
    """Label each query row by the majority label of its `n_neighbors` nearest reference rows.

    Exact Euclidean search against the reference (brute force, as the reference is small), in
    blocks of `block_size` query rows so memory is O(block x reference); votes are counted with
    one bincount per block (ties go to the lower label).
    """
    from sklearn.neighbors import NearestNeighbors

    reference_labels = np.asarray(reference_labels, np.int64)
    m = int(reference_labels.max()) + 1
    k = min(n_neighbors, len(reference))
    nn = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(np.asarray(reference, np.float32))
    out = np.empty(len(query), np.int64)
    for start in range(0, len(query), block_size):
        q = np.asarray(query[start:start + block_size], np.float32)
        nb = nn.kneighbors(q, return_distance=False)
        rows = np.repeat(np.arange(len(q)), k)
        votes = np.bincount(rows * m + reference_labels[nb].ravel(), minlength=len(q) * m).reshape(len(q), m)
        out[start:start + len(q)] = votes.argmax(1)
    return out


def graph_cluster_search(embeddings: np.ndarray, n_clusters: int | None = None, *, n_neighbors: int = 15,
                         resolutions: Sequence[float] = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.4, 2.0),
                         max_clusters: int = 30, seed: int = 0, max_steps: int = 20,
                         max_graph_cells: int | None = None,
                         assign_reference_cells: int = 20_000, knn: str = "auto") -> tuple[np.ndarray, dict]:
    """Leiden clustering of the embeddings' k-NN graph with a search over the resolution.

    With `n_clusters` given: bisection on the resolution (0.01 .. 5) until Leiden finds exactly
    that many clusters (else the closest found). Without it: every resolution in `resolutions` is
    tried, from the lowest, and the partition with the best silhouette (on up to 10k cells) among those
    with 2 .. `max_clusters` clusters is kept; the sweep ends at the first resolution that gives more
    than `max_clusters` (higher ones split further; at 4.3M cells each costs minutes). Returns
    (labels, info) with info = {resolution, n_clusters, criterion, tried: [(resolution, n_clusters,
    score)]}.

    Atlas scale: the graph holds every row; above EXACT_KNN_MAX_CELLS rows (`knn="auto"`) its
    k-NN search is approximate (pynndescent, :func:`knn_indices`), as the exact one grows as N^2;
    info records ``knn`` and ``leiden_iterations`` (:func:`leiden_iterations`). The graph is built
    once for all the resolutions tried. With
    `max_graph_cells` (None = never, the default) the graph and the search run on that many random
    rows instead, and every other row takes the majority label of its `n_neighbors` nearest among
    `assign_reference_cells` of the clustered rows (`assign_by_neighbours`; the earlier atlas
    path, which can miss domains of fewer than ~1 in 10,000 cells); info then records
    ``n_graph_cells`` and ``assigned``. Measured in benchmarks/clustering_scale.py.
    """
    X = np.asarray(embeddings, np.float32)
    n = len(X)
    if max_graph_cells is not None and n > max_graph_cells:
        rng = np.random.default_rng(seed)
        sub = np.sort(rng.choice(n, size=max_graph_cells, replace=False))
        sub_labels, info = graph_cluster_search(
            X[sub], n_clusters, n_neighbors=n_neighbors, resolutions=resolutions, max_clusters=max_clusters,
            seed=seed, max_steps=max_steps, max_graph_cells=None, knn=knn)
        ref = rng.choice(len(sub), size=min(len(sub), assign_reference_cells), replace=False)
        rest = np.ones(n, bool)
        rest[sub] = False
        labels = np.empty(n, np.int64)
        labels[sub] = sub_labels
        labels[rest] = assign_by_neighbours(X[rest], X[sub][ref], sub_labels[ref], n_neighbors=n_neighbors)
        info.update(n_graph_cells=int(len(sub)), assigned={
            "cells": int(rest.sum()), "reference_cells": int(len(ref)), "n_neighbors": int(n_neighbors),
            "how": "majority of the nearest clustered cells"})
        info["n_clusters"] = int(len(np.unique(labels)))
        return labels, info
    knn_used = knn if knn != "auto" else ("exact" if n <= EXACT_KNN_MAX_CELLS else "approximate")
    edges = _knn_edges(X, n_neighbors, seed, knn_used)
    if n > EXACT_KNN_MAX_CELLS:  # the k-NN search's temporaries back to the system before igraph's peak
        from ..budget import release_freed_memory

        release_freed_memory()
    conn = _edges_igraph(n, edges)
    del edges
    tried = []
    if n_clusters is not None:
        lo, hi = 0.01, 5.0
        best = None
        for _ in range(max_steps):
            mid = float(np.sqrt(lo * hi))  # geometric bisection: resolution acts multiplicatively
            lab = leiden_labels(conn, mid, seed)
            m = int(lab.max()) + 1
            tried.append((mid, m, None))
            if best is None or abs(m - n_clusters) < abs(best[1] - n_clusters):
                best = (mid, m, lab)
            if m == n_clusters:
                break
            lo, hi = (mid, hi) if m < n_clusters else (lo, mid)
        res, m, lab = best
        return lab, {"method": "leiden", "resolution": res, "n_clusters": m, "criterion": "target_k",
                     "tried": tried, "knn": knn_used, "leiden_iterations": leiden_iterations(n)}
    best = None
    for r in sorted(resolutions):
        lab = leiden_labels(conn, r, seed)
        m = int(lab.max()) + 1
        score = _silhouette(X, lab, seed) if 2 <= m <= max_clusters else -np.inf
        tried.append((float(r), m, float(score)))
        if best is None or score > best[2]:
            best = (float(r), m, score, lab)
        if m > max_clusters:
            break
    res, m, score, lab = best
    return lab, {"method": "leiden", "resolution": res, "n_clusters": m, "criterion": "silhouette",
                 "silhouette": score, "tried": tried, "knn": knn_used, "leiden_iterations": leiden_iterations(n)}


# -- integration of several slices ----------------------------------------------------------------

def batch_mixing_scores(embeddings: np.ndarray, batch: np.ndarray, labels: np.ndarray | None = None, *,
                        n_neighbors: int = 30, max_cells: int = 20_000, seed: int = 0) -> dict:
    """How well slices (batches) mix in the embedding; higher is better mixing for both scores.

    - ``batch_asw``: 1 - |silhouette on batch labels| per cell, averaged (scIB's batch ASW; when
      reference `labels` (>= 0) are given, computed within each label and averaged over labels, so
      that real biological differences between domains are not counted as poor mixing). 1 = fully
      mixed, 0 = batches separated.
    - ``batch_entropy``: Shannon entropy of the batch labels among each cell's `n_neighbors`
      nearest neighbours, divided by the entropy of the global batch proportions (1 = neighbourhoods
      as mixed as the whole data, 0 = every neighbourhood from one batch). kNN on up to
      `max_cells` random cells.
    """
    from sklearn.metrics import silhouette_samples
    from sklearn.neighbors import NearestNeighbors

    X = np.asarray(embeddings, np.float32)
    batch = np.asarray(batch)
    _, b = np.unique(batch, return_inverse=True)
    n_b = int(b.max()) + 1
    if n_b < 2:
        return {"batch_asw": None, "batch_entropy": None, "n_batches": n_b}
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(X), size=min(len(X), max_cells), replace=False)
    Xs, bs = X[idx], b[idx]
    ls = np.asarray(labels)[idx] if labels is not None else np.zeros(len(idx), np.int64)
    asw_groups = []
    for lab in np.unique(ls[ls >= 0]):
        sel = ls == lab
        if len(np.unique(bs[sel])) < 2 or sel.sum() < 3:
            continue
        s = silhouette_samples(Xs[sel], bs[sel])
        asw_groups.append(float(np.mean(1.0 - np.abs(s))))
    kk = min(n_neighbors + 1, len(Xs))
    nb = NearestNeighbors(n_neighbors=kk).fit(Xs).kneighbors(Xs, return_distance=False)[:, 1:]
    counts = np.zeros((len(Xs), n_b))
    np.add.at(counts, (np.repeat(np.arange(len(Xs)), nb.shape[1]), bs[nb].ravel()), 1.0)
    p = counts / counts.sum(1, keepdims=True)
    ent = -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)).sum(1)
    glob = np.bincount(bs, minlength=n_b) / len(bs)
    h_glob = float(-(glob[glob > 0] * np.log(glob[glob > 0])).sum())
    return {
        "batch_asw": float(np.mean(asw_groups)) if asw_groups else None,
        "batch_entropy": float(ent.mean() / h_glob) if h_glob > 0 else None,
        "n_batches": n_b,
        "n_cells_scored": int(len(idx)),
    }
