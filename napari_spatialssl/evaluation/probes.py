"""Probes of frozen embeddings: k-NN and a small MLP, trained on a stated fraction of
the labelled cells and tested on the rest (or on held-out sections).

The probes measure how much of a reference labelling (cell types, cortical layers) the
self-supervised embeddings make easy to read out. The split is stratified by class and seeded;
unlabelled cells (label -1) are never used. Scores on the test cells: accuracy, macro F1, and
the ARI between predicted and true labels (so probes and clustering share one scale).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import adjusted_rand_score, f1_score

from ..data.io import SpatialDataError


def split_labelled(labels: np.ndarray, train_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices of the labelled cells (label >= 0): a class-stratified random
    `train_fraction` of each class for training (at least one cell per class when the class has
    two or more cells), the rest for testing."""
    if not 0.0 < train_fraction < 1.0:
        raise SpatialDataError(f"probe train fraction must be between 0 and 1 (exclusive), got {train_fraction}.")
    labels = np.asarray(labels)
    idx = np.flatnonzero(labels >= 0)
    if idx.size < 2:
        raise SpatialDataError(f"probes need at least 2 labelled cells, got {idx.size}.")
    rng = np.random.default_rng(seed)
    perm = idx[rng.permutation(idx.size)]
    lab = labels[perm]
    order = np.argsort(lab, kind="stable")
    perm, lab = perm[order], lab[order]
    # rank of each cell within its class (in random order), and class sizes
    starts = np.r_[0, np.flatnonzero(np.diff(lab)) + 1]
    sizes = np.diff(np.r_[starts, lab.size])
    rank = np.arange(lab.size) - np.repeat(starts, sizes)
    n_train = np.where(sizes >= 2, np.maximum(1, np.round(train_fraction * sizes)), 0).astype(np.int64)
    n_train = np.minimum(n_train, sizes - 1)
    train = rank < np.repeat(n_train, sizes)
    return np.sort(perm[train]), np.sort(perm[~train])


def split_by_sections(labels: np.ndarray, section: np.ndarray, section_names: list[str],
                      train_sections: list[str], test_sections: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) labelled-cell indices by section names (test sections never seen in training)."""
    unknown = [s for s in [*train_sections, *test_sections] if s not in section_names]
    if unknown:
        raise SpatialDataError(f"probe sections {unknown} not found; sections are {list(section_names)}.")
    if set(train_sections) & set(test_sections):
        raise SpatialDataError(f"sections {sorted(set(train_sections) & set(test_sections))} are both train and test.")
    codes = {n: i for i, n in enumerate(section_names)}
    tr = np.isin(section, [codes[s] for s in train_sections]) & (labels >= 0)
    te_secs = test_sections or [s for s in section_names if s not in train_sections]
    te = np.isin(section, [codes[s] for s in te_secs]) & (labels >= 0)
    return np.flatnonzero(tr), np.flatnonzero(te)


def _scores(pred: np.ndarray, truth: np.ndarray) -> dict:
    return {
        "accuracy": float(np.mean(pred == truth)),
        "macro_f1": float(f1_score(truth, pred, average="macro")),
        "ari": float(adjusted_rand_score(truth, pred)),
        "n_test": int(truth.size),
    }


def _standardise(emb: np.ndarray, train: np.ndarray) -> np.ndarray:
    X = np.asarray(emb, dtype=np.float64)
    mu, sd = X[train].mean(0), X[train].std(0)
    return (X - mu) / np.where(sd > 1e-12, sd, 1.0)


def knn_probe(emb: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray, k: int = 15) -> dict:
    """k-nearest-neighbour classifier (distance-weighted, standardised features) fit on `train`."""
    from sklearn.neighbors import KNeighborsClassifier

    X = _standardise(emb, train)
    clf = KNeighborsClassifier(n_neighbors=min(k, len(train)), weights="distance").fit(X[train], labels[train])
    out = _scores(clf.predict(X[test]), labels[test])
    out["k"] = int(min(k, len(train)))
    return out


def mlp_probe(emb: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray,
              hidden: int = 64, seed: int = 0, max_iter: int = 300) -> dict:
    """One-hidden-layer MLP (sklearn, Adam; with 500 or more training cells, early stopping on 10%
    of them, else a fixed `max_iter` epochs)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    X = _standardise(emb, train)
    early = len(train) >= 500
    clf = MLPClassifier(hidden_layer_sizes=(hidden,), alpha=1e-3, max_iter=max_iter, random_state=seed,
                        early_stopping=early, validation_fraction=0.1, n_iter_no_change=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(X[train], labels[train])
    out = _scores(clf.predict(X[test]), labels[test])
    out["hidden"] = int(hidden)
    return out


def run_probes(emb: np.ndarray, labels: np.ndarray, *, train_fraction: float = 0.2, seed: int = 0, k: int = 15,
               hidden: int = 64, section: np.ndarray | None = None, section_names: list[str] | None = None,
               train_sections: list[str] | None = None, test_sections: list[str] | None = None) -> dict:
    """k-NN and MLP probes on one split; returns {'split', 'train_fraction', 'n_train', 'knn', 'mlp'}.

    The split is a stratified random `train_fraction` of the labelled cells, or, when
    `train_sections` is given, the labelled cells of those sections (tested on `test_sections`,
    default every other section)."""
    labels = np.asarray(labels)
    emb = np.asarray(emb)
    if emb.shape[0] != labels.shape[0]:
        raise SpatialDataError(f"probes: {emb.shape[0]} embeddings but {labels.shape[0]} labels.")
    if train_sections:
        if section is None or section_names is None:
            raise SpatialDataError("probes by section need the cells' sections.")
        train, test = split_by_sections(labels, section, section_names, list(train_sections), list(test_sections or []))
        split = {"split": "sections", "train_sections": list(train_sections),
                 "test_sections": list(test_sections or [s for s in section_names if s not in train_sections])}
    else:
        train, test = split_labelled(labels, train_fraction, seed)
        split = {"split": "random_stratified", "train_fraction": float(train_fraction)}
    if len(train) == 0 or len(test) == 0:
        raise SpatialDataError(f"probe split left {len(train)} training and {len(test)} test cells; need both.")
    return {
        **split,
        "n_train": int(len(train)),
        "knn": knn_probe(emb, labels, train, test, k),
        "mlp": mlp_probe(emb, labels, train, test, hidden, seed),
    }
