"""The mclust protocol (PCA + EEE Gaussian mixture) for spatial domains."""

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from napari_spatialssl.evaluation.mclust import gmm_domains, leading_components


def planted(n_per=(300, 200, 400, 250), d=32, sep=6.0, seed=0):
    """Clusters with one shared, correlated (non-spherical) covariance: EEE's own model."""
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(d, d)) / np.sqrt(d)
    centres = rng.normal(scale=sep, size=(len(n_per), d))
    X = np.concatenate([c + rng.normal(size=(m, d)) @ A for c, m in zip(centres, n_per)])
    y = np.repeat(np.arange(len(n_per)), n_per)
    perm = rng.permutation(len(y))
    return X[perm].astype(np.float32), y[perm]


def test_planted_clusters_recovered_with_k_given():
    X, y = planted()
    labels = gmm_domains(X, 4, seed=0)
    assert labels.dtype == np.int64 and labels.shape == y.shape
    assert adjusted_rand_score(y, labels) > 0.99
    # numbered by decreasing size: the largest planted cluster (400) is label 0
    assert np.bincount(labels)[0] == np.bincount(labels).max()


def test_bic_chooses_k_when_not_given():
    X, y = planted()
    labels, info = gmm_domains(X, None, seed=0, k_range=range(2, 8), return_info=True)
    assert info["criterion"] == "bic" and info["k"] == 4
    assert set(info["bic"]) == set(range(2, 8))
    assert adjusted_rand_score(y, labels) > 0.99


def test_same_seed_same_labels():
    X, _ = planted(sep=1.5)  # overlapping clusters: the initialisation matters
    a = gmm_domains(X, 4, seed=3)
    b = gmm_domains(X, 4, seed=3)
    np.testing.assert_array_equal(a, b)


def test_subsample_path_fits_on_a_sample_and_labels_every_cell():
    X, y = planted(n_per=(3000, 2000, 4000, 2500), d=16)
    labels, info = gmm_domains(X, 4, seed=1, max_fit_cells=2000, return_info=True)
    assert info["n_fit_cells"] == 2000 and info["n_cells"] == len(X)
    assert labels.shape == (len(X),)
    assert adjusted_rand_score(y, labels) > 0.99
    # the full fit finds the same partition
    full = gmm_domains(X, 4, seed=1, max_fit_cells=None)
    assert adjusted_rand_score(full, labels) > 0.99


def test_pca_keeps_leading_components_and_skips_when_narrow():
    X, _ = planted(d=32)
    Z = leading_components(X, 20, seed=0)
    assert Z.shape == (len(X), 20)
    np.testing.assert_allclose(Z.mean(0), 0, atol=1e-8)
    assert np.all(np.diff(Z.var(0)) <= 1e-9)  # decreasing variance
    narrow = leading_components(X[:, :8], 20)
    np.testing.assert_allclose(narrow, X[:, :8] - X[:, :8].mean(0), rtol=1e-5, atol=1e-5)


def test_bad_inputs_name_the_problem():
    X, _ = planted()
    X[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        gmm_domains(X, 4)
    with pytest.raises(ValueError, match="n_domains"):
        gmm_domains(np.zeros((5, 3)), 10)
