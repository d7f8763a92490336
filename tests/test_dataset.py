"""SpatialDataset: validation, sparse-preserving preprocessing, recorded choices, on real slides."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from napari_spatialssl.data.dataset import (
    PreprocessConfig,
    SpatialDataset,
    gene_mean_var,
    normalize_total_log1p,
    scale_genes,
)
from napari_spatialssl.data.io import SpatialDataError, read_h5ad


def _toy(n=50, g=8, seed=0, sparse=True):
    rng = np.random.default_rng(seed)
    X = rng.poisson(1.5, size=(n, g)).astype(np.float32)
    X[0] = 0  # an empty cell must not divide by zero
    adata = ad.AnnData(X=sp.csr_matrix(X) if sparse else X)
    adata.obsm["spatial"] = rng.uniform(0, 100, size=(n, 2))
    adata.obs["section"] = np.where(np.arange(n) < n // 2, "a", "b")
    adata.var_names = [f"g{i}" for i in range(g)]
    return adata


def test_real_merfish_sections_labels_and_sparse(shared_data):
    adata = read_h5ad(shared_data("merfish_hypothalamus_2sections.h5ad"))
    d = SpatialDataset.from_anndata(adata, label_key="Cell_class", ignore_labels=["Ambiguous"])
    assert d.section_key == "section" and d.n_sections == 2 and d.n_cells == 11162
    assert sp.isspmatrix_csr(d.X) and d.X.dtype == np.float32 and d.X.has_sorted_indices
    # volume-normalised (not counts): no library-size normalisation, recorded as such
    assert d.preprocessing["input_looked_like_counts"] is False and d.preprocessing["normalized"] is False
    assert "Ambiguous" not in d.label_names and (d.labels == -1).sum() == 1543
    idx = d.section_indices(d.section_names[1])
    assert len(idx) + len(d.section_indices(0)) == d.n_cells
    rows = d.dense_rows(idx[:10])
    np.testing.assert_allclose(rows, adata.X[idx[:10]].toarray(), rtol=1e-6)
    assert d.summary()["n_unlabelled"] == 1543


def test_real_osmfish_counts_normalised_like_scanpy(shared_data):
    import scanpy as sc

    adata = read_h5ad(shared_data("osmfish_cortex.h5ad"))
    d = SpatialDataset.from_anndata(adata, label_key="cell_type", ignore_labels=["Excluded"])
    ref = adata.copy()
    ref.X = sp.csr_matrix(ref.X, dtype=np.float32)
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    assert d.preprocessing["normalized"] and d.preprocessing["logged"]
    np.testing.assert_allclose(d.dense_rows(slice(0, 500)), ref.X[:500].toarray(), rtol=1e-4, atol=1e-5)
    assert d.labels.max() == len(d.label_names) - 1 and "Excluded" not in d.label_names


def test_real_starmap_hvg_and_gene_order(shared_data):
    adata = read_h5ad(shared_data("starmap_mpfc_3slices.h5ad"))
    d = SpatialDataset.from_anndata(adata, section_key="sample_id", preprocess={"n_top_genes": 40})
    assert d.n_genes == 40 and d.preprocessing["n_genes_used"] == 40
    assert d.preprocessing["hvg_flavor_used"] == "seurat_v3" and d.preprocessing["n_genes_input"] == 166
    np.testing.assert_array_equal(d.gene_names, np.asarray(adata.var_names)[d.gene_index])
    # a trained model's gene list: same order, missing genes zero-filled
    wanted = list(d.gene_names[:5][::-1]) + ["NotAGene"]
    d2 = SpatialDataset.from_anndata(adata, section_key="sample_id", genes=wanted)
    assert list(d2.gene_names) == wanted and d2.gene_index[-1] == -1
    assert d2.X[:, -1].nnz == 0
    full = SpatialDataset.from_anndata(adata, section_key="sample_id")
    col = list(full.gene_names).index(wanted[0])
    np.testing.assert_allclose(d2.dense_rows(slice(None))[:, 0], full.dense_rows(slice(None))[:, col])


def test_sparse_never_densified_when_scaling(monkeypatch):
    adata = _toy(200, 10)
    calls = []
    original = sp.csr_matrix.toarray

    def spy(self, *a, **k):
        calls.append(self.shape)
        return original(self, *a, **k)

    monkeypatch.setattr(sp.csr_matrix, "toarray", spy)
    d = SpatialDataset.from_anndata(adata, preprocess=PreprocessConfig(scale=True, max_value=3.0))
    assert sp.issparse(d.X) and not any(s[0] == 200 for s in calls)
    monkeypatch.undo()
    mean, var = gene_mean_var(d.X)
    np.testing.assert_allclose(var[var > 0], 1.0, rtol=0.25)  # unit variance up to the clip
    assert d.X.data.max() <= 3.0 and d.preprocessing["scaled_zero_centered"] is False
    with pytest.raises(SpatialDataError, match="densify"):
        SpatialDataset.from_anndata(adata, preprocess=PreprocessConfig(scale=True, scale_zero_center=True))


def test_dense_input_scaling_is_z_score():
    d = SpatialDataset.from_anndata(_toy(300, 6, sparse=False), preprocess=PreprocessConfig(scale=True))
    assert isinstance(d.X, np.ndarray) and d.preprocessing["scaled_zero_centered"] is True
    np.testing.assert_allclose(d.X.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(d.X.std(0), 1.0, rtol=1e-3)
    X, centred = scale_genes(np.ones((4, 2), np.float32), False, 10.0)
    assert centred is False and np.isfinite(X).all()


def test_normalise_sparse_equals_dense_and_empty_cells():
    X = _toy().X
    a = normalize_total_log1p(X).toarray()
    b = normalize_total_log1p(X.toarray())
    np.testing.assert_allclose(a, b, rtol=1e-6)
    assert (a[0] == 0).all()


def test_bad_expression_is_refused():
    adata = _toy()
    adata.X = adata.X.toarray()
    adata.X[3, 2] = np.nan
    with pytest.raises(SpatialDataError, match="NaN"):
        SpatialDataset.from_anndata(adata)
    adata = _toy()
    adata.X = adata.X.toarray() - 5.0
    with pytest.raises(SpatialDataError, match="negative"):
        SpatialDataset.from_anndata(adata, preprocess={"normalize_total": True})
    d = SpatialDataset.from_anndata(adata)  # negative, not counts: used as given
    assert not d.preprocessing["normalized"]
    bad = _toy()
    bad.obsm["spatial"][0, 0] = np.inf
    with pytest.raises(SpatialDataError, match="infinite"):
        SpatialDataset.from_anndata(bad)
    with pytest.raises(SpatialDataError, match="section"):
        SpatialDataset.from_anndata(_toy()).section_code("zzz")


def test_normalised_sparse_expression_shares_the_input_pattern_only_when_safe():
    """The normalised matrix reuses the input's index arrays (the atlas's 2.4 GB) when the input is
    canonical and stores no zeros, never its values; the input is unchanged; otherwise everything is
    copied. Values are those of the copy-everything path."""
    from napari_spatialssl.data.dataset import normalize_total_log1p

    rng = np.random.default_rng(0)
    X = sp.random(400, 30, density=0.3, format="csr", dtype=np.float32, random_state=1)
    X.data = np.round(X.data * 9) + 1
    before = X.copy()
    out = normalize_total_log1p(X)
    dense = X.toarray()
    expect = np.log1p(dense / dense.sum(1, keepdims=True) * 1e4)
    np.testing.assert_allclose(out.toarray(), np.nan_to_num(expect), rtol=1e-5)
    assert np.shares_memory(out.indices, X.indices) and not np.shares_memory(out.data, X.data)
    assert (X != before).nnz == 0  # the input's values untouched
    zeros = X.copy()
    zeros.data[rng.integers(0, zeros.nnz, 5)] = 0.0  # explicit zeros: eliminate_zeros would move indices
    assert not np.shares_memory(normalize_total_log1p(zeros).indices, zeros.indices)
    unsorted = sp.csr_matrix((X.data[::-1].copy(), X.indices[::-1].copy(), X.indptr), shape=X.shape)
    unsorted.has_sorted_indices = False
    kept = unsorted.indices.copy()
    got = normalize_total_log1p(unsorted)
    assert not np.shares_memory(got.indices, unsorted.indices)
    got.sort_indices()  # what the dataset does next: the user's matrix keeps its order
    np.testing.assert_array_equal(unsorted.indices, kept)
