"""Spatial domains from embeddings: one function, one rule for "automatic", one label format.

Every method, ``Pipeline.run`` (for methods that give no domains of their own), the CLI, the
Python API and the napari widget call :func:`cluster_domains`, so the same slide, embedding and
seed give the same domains everywhere:

- ``method="auto"`` (the default): k-means when K is given, otherwise a Leiden resolution search
  on the embeddings' k-NN graph (``evaluation.clustering.graph_cluster_search``; subsampled and
  assigned above 100,000 cells);
- ``"kmeans"`` (needs K), ``"leiden"`` (K given: resolution bisection to exactly K when possible),
  ``"gmm"``: the mclust protocol of published methods (PCA, then a tied-covariance Gaussian mixture,
  K by BIC when not given; ``evaluation.mclust``).

Labels are integers 0..K-1 numbered by decreasing domain size; in AnnData they are a categorical
of the strings "0".."K-1" in numeric order (:func:`domain_categorical`). ``info`` always holds
``method``, ``n_domains`` and ``seed``.
"""

from __future__ import annotations

import numpy as np

from ..data.io import SpatialDataError

DOMAIN_METHODS = ("auto", "kmeans", "leiden", "gmm")


def _by_size(labels: np.ndarray) -> np.ndarray:
    """Relabel 0..m-1 by decreasing cluster size (ties by first label): stable to read."""
    _, inv, counts = np.unique(labels, return_inverse=True, return_counts=True)
    rank = np.empty_like(counts)
    rank[np.argsort(-counts, kind="stable")] = np.arange(len(counts))
    return rank[inv.ravel()].astype(np.int64)


def cluster_domains(embedding: np.ndarray, n_domains: int | None = None, *, seed: int = 0,
                    method: str = "auto") -> tuple[np.ndarray, dict]:
    """(labels (n_cells,) int64 in 0..K-1, info) of the rows of `embedding` (see the module docstring)."""
    X = np.asarray(embedding, dtype=np.float32)
    if X.ndim != 2 or len(X) == 0:
        raise SpatialDataError(f"domains need a (cells x dimensions) embedding, got shape {X.shape}.")
    if method not in DOMAIN_METHODS:
        raise SpatialDataError(f"domain method {method!r}: choose one of {', '.join(DOMAIN_METHODS)}.")
    if n_domains is not None:
        n_domains = int(n_domains)
        if not 2 <= n_domains <= len(X):
            raise SpatialDataError(f"n_domains={n_domains}: choose between 2 and {len(X)} (the number of cells), "
                                   "or leave it empty for automatic.")
    if method == "auto":
        method = "kmeans" if n_domains is not None else "leiden"
    if method == "kmeans":
        if n_domains is None:
            raise SpatialDataError("domain method 'kmeans' needs K (--n-domains K).")
        from .clustering import kmeans

        labels, extra = kmeans(X, n_domains, seed=seed), {}
    elif method == "leiden":
        from .clustering import graph_cluster_search

        labels, extra = graph_cluster_search(X, n_domains, seed=seed)
        extra = {k: v for k, v in extra.items() if k not in ("method", "n_clusters")}
    else:
        from .mclust import gmm_domains

        labels, extra = gmm_domains(X, n_domains, seed=seed, return_info=True)
        extra = {k: v for k, v in extra.items() if k not in ("k", "protocol")}
    labels = _by_size(np.asarray(labels))
    info = {"method": method, "n_domains": int(labels.max()) + 1, "seed": int(seed), **extra}
    return labels, info


def domain_categorical(labels: np.ndarray):
    """Labels 0..K-1 as the categorical stored in ``obs['<method>_domain']``: "0".."K-1", numeric order."""
    import pandas as pd

    labels = np.asarray(labels, dtype=np.int64)
    k = int(labels.max()) + 1 if labels.size else 0
    return pd.Categorical.from_codes(labels, categories=[str(i) for i in range(k)])


def score_domains(labels: np.ndarray, reference: np.ndarray | None, section: np.ndarray,
                  section_names: list[str], reference_key: str | None) -> dict:
    """ARI / NMI / matched accuracy against `reference` (-1 = unlabelled), overall and per section."""
    from .clustering import domain_scores

    if reference is None:
        return {"note": "no reference domains (set eval.domain_key, CLI --domain-key) - no ARI / NMI"}
    out = domain_scores(labels, reference)
    per = {}
    for code, name in enumerate(section_names):
        sel = section == code
        if (reference[sel] >= 0).sum() > 1:
            s = domain_scores(labels[sel], reference[sel])
            per[name] = {"ari": s["ari"], "nmi": s["nmi"], "accuracy": s["accuracy"]}
    out["per_section"] = per
    out["mean_section_ari"] = float(np.mean([v["ari"] for v in per.values()])) if per else None
    out["reference_key"] = reference_key
    return out
