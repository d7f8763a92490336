"""Cell-type prediction scores and the expression-only baseline.

Every score is computed on labelled cells only (label code >= 0); unknown labels (-1) are the
caller's to drop. `macro_f1` averages over the classes present in the truth or the prediction
(scikit-learn's default), so a class predicted but absent from the truth counts against it.
"""

from __future__ import annotations

import warnings

import numpy as np


def classification_scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """accuracy, balanced_accuracy (mean per-class recall) and macro_f1 of integer labels."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ in shape")
    if y_true.size == 0:
        return {"accuracy": None, "balanced_accuracy": None, "macro_f1": None, "n_cells": 0}
    with warnings.catch_warnings():
        # balanced accuracy warns when a predicted class is absent from the truth: expected here.
        warnings.simplefilter("ignore")
        return {
            "accuracy": float(accuracy_score(y_true, y_pred)),
            "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
            "n_cells": int(y_true.size),
        }


def class_weight_vector(labels: np.ndarray, n_classes: int, scheme: str = "balanced",
                        max_weight: float = 50.0) -> np.ndarray:
    """Per-class loss weights from the training labels (codes >= 0).

    scheme: 'balanced' = n / (k * count_c) (scikit-learn's), 'sqrt' = its square root, 'none' = ones.
    Classes absent from training get weight 0 (they cannot be learned); weights are capped at
    `max_weight` so that a class of two cells does not dominate.
    """
    labels = np.asarray(labels)
    labels = labels[labels >= 0]
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(n_classes)
    if scheme == "none":
        w[present] = 1.0
        return w.astype(np.float32)
    if scheme not in ("balanced", "sqrt"):
        raise ValueError(f"class weight scheme {scheme!r} unknown; choose balanced, sqrt or none")
    w[present] = counts.sum() / (present.sum() * counts[present])
    if scheme == "sqrt":
        w[present] = np.sqrt(w[present])
    return np.minimum(w, max_weight).astype(np.float32)


def logistic_regression_baseline(X_train, y_train, X_test, *, class_weights: str = "balanced",
                                 seed: int = 0, max_iter: int = 500, C: float = 1.0) -> np.ndarray:
    """Multinomial logistic regression on each cell's own (preprocessed) expression.

    Features are standardised with the training cells' mean and s.d.; returns test predictions.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(X_train)
    if class_weights == "balanced":
        cw = "balanced"
    elif class_weights == "none":
        cw = None
    else:
        classes = np.unique(y_train)
        wv = class_weight_vector(y_train, int(classes.max()) + 1, class_weights)
        cw = {int(c): float(wv[c]) for c in classes}
    clf = LogisticRegression(max_iter=max_iter, C=C, class_weight=cw, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings on tiny classes
        clf.fit(scaler.transform(X_train), y_train)
    return clf.predict(scaler.transform(X_test))
