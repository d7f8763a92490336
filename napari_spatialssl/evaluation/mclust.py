"""The mclust protocol for spatial domains, in Python (no R).

Published spatial-domain methods score their embeddings with R's ``mclust``: STAGATE runs
``Mclust(embedding, G=K, modelNames="EEE")`` on its 30-d embedding, GraphST first reduces its
embedding to 20 principal components (scikit-learn PCA) and then runs the same EEE model. EEE is a
Gaussian mixture whose components share one full covariance matrix (equal volume, shape and
orientation): scikit-learn's ``GaussianMixture(covariance_type="tied")``. A 0.05-0.1 ARI gap on
DLPFC can come from this protocol against k-means alone, so every method here can be scored both
ways.

Differences from R's mclust, stated once: mclust initialises EM from a model-based hierarchical
agglomeration, this module from k-means (scikit-learn's default), restarted ``n_init`` times and
the best likelihood kept (on the same 20 components the two reach different local optima of the
same likelihood, either of them the higher one); mclust's BIC is ``2 log L - p log n`` (higher is better), scikit-learn's
its negative (lower is better): the same choice of K.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

#: GraphST's number of principal components before mclust; STAGATE's 30-d embedding is used as is,
#: which is the same thing up to a rotation (an EEE mixture is invariant to rotations).
DEFAULT_N_PCS = 20
#: Above this many rows, PCA and the mixture are fitted on a seeded random subsample of this size
#: and every row is then projected and assigned (atlas scale: 4.3M cells).
DEFAULT_MAX_FIT_CELLS = 100_000
#: Number of components tried by the BIC choice when no K is given.
DEFAULT_K_RANGE = range(2, 16)
#: mclust's default model for this use (STAGATE and GraphST both pass modelNames="EEE").
EEE = "tied"


def _fit_rows(n: int, max_fit_cells: int | None, rng: np.random.Generator) -> np.ndarray | None:
    """Indices of the rows the model is fitted on (None = all rows)."""
    if max_fit_cells is None or n <= max_fit_cells:
        return None
    return np.sort(rng.choice(n, size=int(max_fit_cells), replace=False))


def leading_components(embedding: np.ndarray, n_pcs: int | None = DEFAULT_N_PCS, *, seed: int = 0,
                       fit_rows: np.ndarray | None = None, block_size: int = 1_000_000) -> np.ndarray:
    """The embedding projected on its `n_pcs` leading principal components (float64).

    PCA is fitted on `fit_rows` (all rows if None) and applied to every row in blocks of
    `block_size`. With `n_pcs` None, or not below the embedding's width, the embedding is only
    centred: a rotation would not change an EEE mixture.
    """
    X = np.asarray(embedding)
    if X.ndim != 2 or len(X) == 0:
        raise ValueError(f"embedding must be a non-empty 2-d array (cells x dimensions), got shape {X.shape}")
    if not np.isfinite(X).all():
        bad = int((~np.isfinite(X)).any(1).sum())
        raise ValueError(f"embedding has {bad} rows with NaN or inf; drop or impute them before clustering")
    fit = X if fit_rows is None else X[fit_rows]
    mean = fit.mean(0, dtype=np.float64)
    if n_pcs is None or n_pcs >= X.shape[1]:
        return X.astype(np.float64) - mean
    from sklearn.decomposition import PCA

    pca = PCA(n_components=int(n_pcs), random_state=seed).fit(fit.astype(np.float64))
    comps = pca.components_.T
    out = np.empty((len(X), comps.shape[1]), np.float64)
    for start in range(0, len(X), block_size):
        out[start:start + block_size] = (X[start:start + block_size].astype(np.float64) - pca.mean_) @ comps
    return out


def _mixture(k: int, seed: int, n_init: int, covariance_type: str, max_iter: int, reg_covar: float):
    from sklearn.mixture import GaussianMixture

    return GaussianMixture(n_components=int(k), covariance_type=covariance_type, n_init=n_init,
                           max_iter=max_iter, reg_covar=reg_covar, random_state=seed)


def _predict_blocks(model, X: np.ndarray, block_size: int) -> np.ndarray:
    out = np.empty(len(X), np.int64)
    for start in range(0, len(X), block_size):
        out[start:start + block_size] = model.predict(X[start:start + block_size])
    return out


def _by_size(labels: np.ndarray) -> np.ndarray:
    """Relabel 0..m-1 by decreasing size (components the data left empty are dropped)."""
    _, inv, counts = np.unique(labels, return_inverse=True, return_counts=True)
    rank = np.empty_like(counts)
    rank[np.argsort(-counts, kind="stable")] = np.arange(len(counts))
    return rank[inv].astype(np.int64)


def gmm_domains(embedding: np.ndarray, n_domains: int | None = None, *, n_pcs: int | None = DEFAULT_N_PCS,
                seed: int = 0, covariance_type: str = EEE, n_init: int | None = None,
                k_range: Iterable[int] = DEFAULT_K_RANGE, max_fit_cells: int | None = DEFAULT_MAX_FIT_CELLS,
                max_iter: int = 200, reg_covar: float = 1e-6, block_size: int = 1_000_000,
                return_info: bool = False):
    """Spatial domains by the mclust protocol: PCA to `n_pcs` components, then a Gaussian mixture.

    Parameters
    ----------
    embedding : (n_cells, d) array of per-cell embeddings (any units).
    n_domains : number of mixture components K; None chooses K in `k_range` by BIC.
    n_pcs : leading principal components kept (GraphST: 20); None keeps every dimension.
    seed : seeds the subsample, PCA and the mixture's k-means initialisation (same seed, same labels).
    covariance_type : "tied" = mclust's EEE (the default of STAGATE and GraphST); any scikit-learn
        type ("full" = VVV, "diag" = VVI, "spherical" = VII) is accepted.
    n_init : EM restarts from seeded k-means starts; the one with the best likelihood is kept.
        None = 10 with K given, 3 per K in the BIC search. EM's local optima matter: on DLPFC
        embeddings single starts differ by up to 0.05 ARI, and R's hierarchical start is one more
        local optimum (sometimes a better, sometimes a worse likelihood; benchmarks/peers.md).
    max_fit_cells : above this many rows, PCA and the mixture (and the BIC search) are fitted on a
        seeded random subsample of this size; every row is then projected and assigned. None = all.

    Returns
    -------
    labels : (n_cells,) int64 in 0..m-1, numbered by decreasing domain size. With `return_info`,
        ``(labels, info)`` where info records K, how it was chosen, the BIC values and the
        fitted-row count.
    """
    X = np.asarray(embedding)
    n = len(X)
    rng = np.random.default_rng(seed)
    rows = _fit_rows(n, max_fit_cells, rng)
    Z = leading_components(X, n_pcs, seed=seed, fit_rows=rows, block_size=block_size)
    fit = Z if rows is None else Z[rows]
    info = {"protocol": "gmm", "model": {"tied": "EEE", "full": "VVV", "diag": "VVI",
                                        "spherical": "VII"}.get(covariance_type, covariance_type),
            "n_pcs": int(Z.shape[1]), "n_fit_cells": int(len(fit)), "n_cells": int(n), "seed": int(seed)}
    if n_domains is not None:
        n_init = 10 if n_init is None else int(n_init)
        k = int(n_domains)
        if not 1 <= k <= len(fit):
            raise ValueError(f"n_domains={n_domains} must lie in 1..{len(fit)} (the number of fitted cells)")
        model = _mixture(k, seed, n_init, covariance_type, max_iter, reg_covar).fit(fit)
        info.update(k=k, criterion="given")
    else:
        n_init = 3 if n_init is None else int(n_init)
        bics, model, best = {}, None, np.inf
        for k in k_range:
            if k >= len(fit):
                break
            m = _mixture(k, seed, n_init, covariance_type, max_iter, reg_covar).fit(fit)
            bics[int(k)] = float(m.bic(fit))
            if bics[int(k)] < best:
                model, best = m, bics[int(k)]
        if model is None:
            raise ValueError(f"no K in k_range fits {len(fit)} cells; pass n_domains")
        info.update(k=int(model.n_components), criterion="bic", bic=bics)
    info["converged"] = bool(model.converged_)
    info["n_init"] = n_init
    info["log_likelihood_per_cell"] = float(model.score(fit))
    labels = _by_size(_predict_blocks(model, Z, block_size))
    info["n_domains_found"] = int(labels.max()) + 1
    return (labels, info) if return_info else labels
