"""Spatial domains from embeddings, and how well they match reference labels."""

from __future__ import annotations

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
