"""How much can spatial context add to cell-type prediction on the gnn-mask benchmark split?

Non-GNN reference classifiers on the same split as benchmarks/gnn_mask.py (train on
Animal1_Bregma_+0.26, test on the held-out Animal1_Bregma_+0.21, "Ambiguous" = unknown), same
preprocessing and the same logistic regression as the method's `expression_logreg` baseline:

- logistic regression on the cell's own expression (the baseline), per-class F1 with the class
  sizes of both sections (macro F1 weighs a 1-cell class as much as a 1,700-cell one);
- logistic regression on [own expression, mean expression of the spatial neighbours within
  20 / 30 / 50 um] (hand-made context features: does context help a linear model at all?);
- an MLP (128 hidden, sklearn) on the cell's own expression, seeds 0-2 (does a non-linear
  classifier of the cell alone do better?).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gnn_mask_celltype_ceiling.py
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gnn_mask import DATA, DATA_OVERRIDES, TEST, TRAIN  # noqa: E402


def neighbour_mean(coords: np.ndarray, section: np.ndarray, X: np.ndarray, radius: float) -> np.ndarray:
    """Mean expression of each cell's neighbours within `radius` (same section; 0 if none)."""
    import scipy.sparse as sp
    from scipy.spatial import cKDTree

    rows, cols = [], []
    for s in np.unique(section):
        idx = np.flatnonzero(section == s)
        pairs = cKDTree(coords[idx]).query_pairs(radius, output_type="ndarray")
        rows += [idx[pairs[:, 0]], idx[pairs[:, 1]]]
        cols += [idx[pairs[:, 1]], idx[pairs[:, 0]]]
    r, c = np.concatenate(rows), np.concatenate(cols)
    A = sp.csr_matrix((np.ones(len(r), np.float32), (r, c)), shape=(len(X), len(X)))
    deg = np.asarray(A.sum(1)).ravel()
    return np.asarray(sp.diags(1.0 / np.maximum(deg, 1)) @ A @ X), float(deg.mean())


def main() -> int:
    if not DATA.exists():
        print(f"skipped: {DATA} not found (the shared data folder is not beside this clone)")
        return 0
    from sklearn.metrics import f1_score
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler

    from napari_spatialssl.data.io import read_h5ad
    from napari_spatialssl.evaluation.classification import logistic_regression_baseline
    from napari_spatialssl.pipeline import dataset_from_config, make_config

    warnings.simplefilter("ignore")
    cfg = make_config("gnn-mask", overrides=DATA_OVERRIDES)
    data = dataset_from_config(read_h5ad(DATA), cfg)
    y, k = data.labels, len(data.label_names)
    tr = np.flatnonzero((data.section == data.section_code(TRAIN)) & (y >= 0))
    te = np.flatnonzero((data.section == data.section_code(TEST)) & (y >= 0))
    X = data.dense_rows(np.arange(data.n_cells))
    cw = cfg.finetune.class_weights  # the same weighting as the method's logreg baseline

    def scores(pred):
        return f1_score(y[te], pred, average="macro"), f1_score(y[te], pred, average=None, labels=np.arange(k))

    base, per_class = scores(logistic_regression_baseline(X[tr], y[tr], X[te], class_weights=cw))
    print(f"logistic regression, own expression: macro F1 {base:.4f}\n")
    print("| class | train cells | test cells | F1 (logreg) |\n|---|---|---|---|")
    for i, name in enumerate(data.label_names):
        print(f"| {name} | {(y[tr] == i).sum()} | {(y[te] == i).sum()} | {per_class[i]:.3f} |")
    print("\n| classifier | macro F1 on the held-out section |\n|---|---|")
    print(f"| logreg, own expression (the baseline) | {base:.4f} |")
    for radius in (20.0, 30.0, 50.0):
        N, deg = neighbour_mean(data.coords, data.section, X, radius)
        F = np.hstack([X, N])
        f, _ = scores(logistic_regression_baseline(F[tr], y[tr], F[te], class_weights=cw))
        print(f"| logreg, [own, neighbour mean within {radius:g} um] (mean degree {deg:.1f}) | {f:.4f} |")
    sc = StandardScaler().fit(X[tr])
    mlp = []
    for seed in (0, 1, 2):
        clf = MLPClassifier((128,), alpha=1.0, max_iter=300, random_state=seed).fit(sc.transform(X[tr]), y[tr])
        mlp.append(scores(clf.predict(sc.transform(X[te])))[0])
    print(f"| MLP (128 hidden, alpha 1), own expression, seeds 0-2 | {np.mean(mlp):.4f} "
          f"({', '.join(f'{v:.4f}' for v in mlp)}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
