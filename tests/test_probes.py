"""k-NN and MLP probes: honest splits (stratified fraction, or held-out sections) and scores."""

from __future__ import annotations

import numpy as np
import pytest

from napari_spatialssl.data.io import SpatialDataError
from napari_spatialssl.evaluation.probes import run_probes, split_by_sections, split_labelled


def _blobs(n_per=120, k=4, dim=8, spread=0.3, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, size=(k, dim))
    labels = np.repeat(np.arange(k), n_per)
    return centres[labels] + rng.normal(0, spread, size=(len(labels), dim)), labels


def test_split_is_stratified_disjoint_and_skips_unlabelled():
    labels = np.array([0] * 100 + [1] * 50 + [2] * 10 + [-1] * 40)
    train, test = split_labelled(labels, 0.2, seed=3)
    assert len(np.intersect1d(train, test)) == 0
    assert set(train) | set(test) == set(np.flatnonzero(labels >= 0))
    counts = np.bincount(labels[train], minlength=3)
    assert counts.tolist() == [20, 10, 2]
    again = split_labelled(labels, 0.2, seed=3)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    other = split_labelled(labels, 0.2, seed=4)
    assert not np.array_equal(train, other[0])


def test_split_keeps_a_test_cell_for_tiny_classes():
    labels = np.array([0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2])
    train, test = split_labelled(labels, 0.9, seed=0)
    assert 0 in labels[test] and 1 in labels[test]
    assert 2 not in labels[train]  # a singleton class cannot be both trained and tested


def test_split_rejects_bad_fraction():
    with pytest.raises(SpatialDataError, match="between 0 and 1"):
        split_labelled(np.zeros(10, int), 1.0)


def test_probes_read_separable_classes_and_not_random_ones():
    X, y = _blobs()
    res = run_probes(X, y, train_fraction=0.3, seed=0, k=5, hidden=32)
    assert res["split"] == "random_stratified" and res["train_fraction"] == 0.3
    assert res["n_train"] == int(round(0.3 * 120)) * 4
    for p in ("knn", "mlp"):
        assert res[p]["accuracy"] > 0.95 and res[p]["ari"] > 0.85
        assert res[p]["n_test"] == len(y) - res["n_train"]
    rng = np.random.default_rng(1)
    shuffled = rng.permutation(y)
    res = run_probes(X, shuffled, train_fraction=0.3, seed=0, k=5, hidden=32)
    assert res["knn"]["accuracy"] < 0.45 and res["mlp"]["accuracy"] < 0.45


def test_probes_by_section_never_train_on_test_sections():
    X, y = _blobs(n_per=60, k=3)
    section = np.tile([0, 1, 2], len(y) // 3)
    train, test = split_by_sections(y, section, ["a", "b", "c"], ["a", "b"], [])
    assert set(section[train]) == {0, 1} and set(section[test]) == {2}
    res = run_probes(X, y, section=section, section_names=["a", "b", "c"], train_sections=["a"],
                     test_sections=["c"], k=5)
    assert res["split"] == "sections" and res["test_sections"] == ["c"]
    assert res["knn"]["n_test"] == int((section == 2).sum())
    with pytest.raises(SpatialDataError, match="not found"):
        split_by_sections(y, section, ["a", "b", "c"], ["z"], [])
    with pytest.raises(SpatialDataError, match="both train and test"):
        split_by_sections(y, section, ["a", "b", "c"], ["a"], ["a"])
