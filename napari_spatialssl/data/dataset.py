"""`SpatialDataset`: one validated slide (one or several sections) ready for the views and methods.

Expression stays sparse when the input is sparse: every preprocessing step here works on CSR
rows without densifying the whole matrix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import scipy.sparse as sp

from .io import (
    SpatialDataError,
    get_coordinates,
    label_codes,
    resolve_section_key,
    section_codes,
)


@dataclass
class PreprocessConfig:
    """How raw expression becomes model input. Recorded beside every model."""

    normalize_total: bool | None = None  # None = auto: only when X looks like counts
    target_sum: float = 1e4
    log1p: bool | None = None  # None = follow normalize_total
    n_top_genes: int | None = None  # highly variable genes; None = keep all
    hvg_flavor: str = "seurat_v3"  # seurat_v3 needs counts; falls back to 'seurat' otherwise
    scale: bool = False  # per-gene scaling to unit variance, clipped at max_value
    scale_zero_center: bool | None = None  # None = centre dense data only (sparse X stays sparse)
    max_value: float = 10.0
    layer: str | None = None  # read expression from adata.layers[layer] instead of X

    FIELD_DOCS = {
        "normalize_total": "Scale every cell to the same total count before the log (empty = only when the "
                           "expression looks like raw counts).",
        "target_sum": "The total every cell is scaled to when normalising (counts per cell).",
        "log1p": "Take log(1 + x) of the expression (empty = when normalising).",
        "n_top_genes": "Keep only this many highly variable genes (empty = every gene).",
        "hvg_flavor": "How highly variable genes are chosen (scanpy's flavours: seurat_v3 on counts, seurat, "
                      "cell_ranger).",
        "scale": "Scale each gene to unit variance (clipped at max_value).",
        "scale_zero_center": "Also centre each gene when scaling (empty = only for dense expression).",
        "max_value": "Clip scaled values at +/- this.",
        "layer": "Read the expression from this AnnData layer instead of X.",
    }


def looks_like_counts(X, n_probe: int = 2000) -> bool:
    """True when the first rows hold non-negative integers (raw counts)."""
    rows = X[:n_probe]
    data = rows.data if sp.issparse(rows) else np.asarray(rows).ravel()
    if data.size == 0:
        return False
    data = np.asarray(data, dtype=np.float64)
    return bool((data >= 0).all() and np.allclose(data, np.round(data)))


ROW_BLOCK = 262_144  # rows per block of the per-row scaling (a per-value temporary is GBs on an atlas)


def same_pattern(X: sp.csr_matrix, data: np.ndarray) -> sp.csr_matrix:
    """A CSR matrix with X's sparsity pattern and the values `data` (float32). X's index arrays are
    shared, not copied (2.4 GB for the 4.3M-cell atlas), when X is canonical (sorted indices, no
    duplicates) and stores no zeros: then scipy's in-place methods (sort_indices, sum_duplicates,
    eliminate_zeros) leave them as they are on either matrix. Otherwise they are copied."""
    share = bool(X.has_canonical_format) and np.count_nonzero(X.data) == X.nnz
    indices, indptr = (X.indices, X.indptr) if share else (X.indices.copy(), X.indptr.copy())
    return sp.csr_matrix((np.asarray(data, np.float32), indices, indptr), shape=X.shape, copy=False)


def normalize_total_log1p(X, target_sum: float = 1e4, log1p: bool = True):
    """Scale each cell to `target_sum` total then log1p; sparse in, sparse out (new values, the
    input's index arrays shared where :func:`same_pattern` allows). Returns float32."""
    if sp.issparse(X):
        X = sp.csr_matrix(X)  # no copy of a CSR input
        data = np.array(X.data, dtype=np.float32, copy=True)
        counts = np.diff(X.indptr)
        totals = np.asarray(sp.csr_matrix((data, X.indices, X.indptr), shape=X.shape).sum(axis=1)).ravel()
        scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0).astype(np.float32)
        for start in range(0, X.shape[0], ROW_BLOCK):  # row blocks: no per-value scale array of the whole slide
            stop = min(start + ROW_BLOCK, X.shape[0])
            lo, hi = int(X.indptr[start]), int(X.indptr[stop])
            data[lo:hi] *= np.repeat(scale[start:stop], counts[start:stop])
        if log1p:
            np.log1p(data, out=data)
        return same_pattern(X, data)
    X = np.array(X, dtype=np.float32, copy=True)
    totals = X.sum(axis=1, keepdims=True)
    X *= np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    if log1p:
        np.log1p(X, out=X)
    return X


def rows_as_csr(row_values: np.ndarray, rows: np.ndarray, n_rows: int) -> sp.csr_matrix:
    """An (n_rows, n_cols) CSR matrix whose sorted, unique `rows` hold the dense `row_values`
    (len(rows), n_cols) and whose other rows are empty, laid out directly (no COO triplets)."""
    row_values = np.asarray(row_values, dtype=np.float32)
    g = row_values.shape[1]
    indptr = np.zeros(n_rows + 1, np.int64)
    indptr[np.asarray(rows) + 1] = g
    np.cumsum(indptr, out=indptr)
    indices = np.tile(np.arange(g, dtype=np.int32), len(rows))
    return sp.csr_matrix((row_values.ravel(), indices, indptr), shape=(n_rows, g))


def gene_mean_var(X) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and variance without densifying a sparse matrix."""
    if sp.issparse(X):
        mean = np.asarray(X.mean(axis=0)).ravel()
        sq = X.multiply(X) if not sp.isspmatrix_csr(X) else X.power(2)
        var = np.asarray(sq.mean(axis=0)).ravel() - mean**2
    else:
        mean = X.mean(axis=0)
        var = X.var(axis=0)
    return mean.astype(np.float64), np.maximum(var, 0).astype(np.float64)


def select_hvg(adata_like, X_counts, n_top: int, flavor: str, batch: np.ndarray | None) -> np.ndarray:
    """Indices of the `n_top` highly variable genes (scanpy's definitions), sorted."""
    import anndata as ad
    import scanpy as sc

    tmp = ad.AnnData(X=X_counts)
    tmp.var_names = np.asarray(adata_like.var_names).astype(str)
    if batch is not None and len(np.unique(batch)) > 1:
        tmp.obs["_batch"] = batch.astype(str)
        batch_key = "_batch"
    else:
        batch_key = None
    if flavor == "seurat_v3" and not looks_like_counts(X_counts):
        flavor = "seurat"
    if flavor != "seurat_v3":
        tmp.X = normalize_total_log1p(X_counts)
    sc.pp.highly_variable_genes(tmp, n_top_genes=n_top, flavor=flavor, batch_key=batch_key, subset=False)
    hv = tmp.var["highly_variable"].to_numpy()
    return np.flatnonzero(hv)


@dataclass
class SpatialDataset:
    """A validated slide: coordinates, model-ready expression, sections and optional labels.

    Attributes
    ----------
    coords : (n_cells, 2) float64, x then y, in the data's units (micrometres or pixels).
    X : (n_cells, n_genes) float32, CSR sparse or dense, after preprocessing.
    gene_names : gene names of the columns of X.
    section : (n_cells,) int32 section code; section_names[code] is its name.
    labels : (n_cells,) int64 class code, -1 for unknown; None when no label key was given.
    """

    coords: np.ndarray
    X: object
    gene_names: np.ndarray
    section: np.ndarray
    section_names: list[str]
    labels: np.ndarray | None = None
    label_names: list[str] | None = None
    section_key: str | None = None
    label_key: str | None = None
    gene_index: np.ndarray | None = None  # columns of the input kept (after HVG)
    preprocessing: dict = field(default_factory=dict)
    obs_names: np.ndarray | None = None
    # Reference spatial domains (EvalConfig.domain_key) for ARI / NMI; -1 = unknown.
    domains: np.ndarray | None = None
    domain_names: list[str] | None = None
    domain_key: str | None = None
    # A spatial graph given with the slide (a user's squidpy graph), used by graph methods instead of
    # building their own; a graphs.neighbors.CellGraph or None.
    spatial_graph: object | None = None

    @property
    def n_cells(self) -> int:
        return int(self.coords.shape[0])

    @property
    def n_genes(self) -> int:
        return int(self.X.shape[1])

    @property
    def n_sections(self) -> int:
        return len(self.section_names)

    def section_indices(self, section: int | str) -> np.ndarray:
        """Cell indices of one section (by code or name)."""
        code = self.section_names.index(section) if isinstance(section, str) else int(section)
        return np.flatnonzero(self.section == code)

    def section_code(self, name: str) -> int:
        if name not in self.section_names:
            raise SpatialDataError(f"section {name!r} not found; sections are {self.section_names}.")
        return self.section_names.index(name)

    def dense_rows(self, idx: np.ndarray | slice) -> np.ndarray:
        """Expression of some cells as a dense float32 array (densifies only those rows)."""
        rows = self.X[idx]
        return rows.toarray().astype(np.float32) if sp.issparse(rows) else np.asarray(rows, dtype=np.float32)

    def summary(self) -> dict:
        out = {
            "n_cells": self.n_cells,
            "n_genes": self.n_genes,
            "sections": {n: int((self.section == i).sum()) for i, n in enumerate(self.section_names)},
            "sparse": bool(sp.issparse(self.X)),
        }
        if self.labels is not None:
            out["label_key"] = self.label_key
            out["n_classes"] = len(self.label_names or [])
            out["n_unlabelled"] = int((self.labels < 0).sum())
        return out

    @classmethod
    def from_anndata(
        cls,
        adata,
        *,
        spatial_key: str = "spatial",
        coord_columns: Sequence[str] | None = None,
        section_key: str | None = "auto",
        label_key: str | None = None,
        ignore_labels: Sequence[str] = (),
        preprocess: PreprocessConfig | dict | None = None,
        genes: Sequence[str] | None = None,
        name: str = "AnnData",
        domain_key: str | None = None,
    ) -> "SpatialDataset":
        """Validate an AnnData and preprocess its expression.

        ``genes``: use exactly these genes in this order (as a trained model expects); genes missing
        from the slide are zero-filled (the caller decides how many may be missing).
        """
        pp = PreprocessConfig(**preprocess) if isinstance(preprocess, dict) else (preprocess or PreprocessConfig())
        coords = get_coordinates(adata, spatial_key=spatial_key, coord_columns=coord_columns, name=name)
        skey = resolve_section_key(adata, section_key, name=name)
        section, section_names = section_codes(adata, skey, name=name)
        labels = label_names = None
        if label_key:
            labels, label_names = label_codes(adata, label_key, ignore_labels, name=name)
        domains = domain_names = None
        if domain_key:
            domains, domain_names = label_codes(adata, domain_key, ignore_labels, name=name, what="domain key")

        X = adata.layers[pp.layer] if pp.layer else adata.X
        if X is None:
            raise SpatialDataError(f"{name}: has no expression matrix (X is empty).")
        if X.shape[0] != coords.shape[0]:
            raise SpatialDataError(
                f"{name}: expression has {X.shape[0]} rows but there are {coords.shape[0]} coordinates."
            )
        if X.shape[1] == 0:
            raise SpatialDataError(f"{name}: has no genes (n_vars = 0).")
        X = sp.csr_matrix(X) if sp.issparse(X) else np.asarray(X)
        var_names = np.asarray(adata.var_names).astype(str)
        counts = looks_like_counts(X)
        do_norm = counts if pp.normalize_total is None else pp.normalize_total
        do_log = do_norm if pp.log1p is None else pp.log1p

        _check_expression(X, do_norm, name, log1p=bool(do_log))
        gene_index = np.arange(X.shape[1])
        hvg_used = None
        if genes is not None:
            gene_index = _match_genes(var_names, genes)
        elif pp.n_top_genes is not None and pp.n_top_genes < X.shape[1]:
            hvg_used = pp.hvg_flavor if (pp.hvg_flavor != "seurat_v3" or counts) else "seurat"
            gene_index = select_hvg(adata, X, pp.n_top_genes, pp.hvg_flavor,
                                    section if len(section_names) > 1 else None)

        # Normalise on all genes (library size is a property of the cell), then subset.
        Xn = normalize_total_log1p(X, pp.target_sum, do_log) if do_norm else (
            _log1p_copy(X) if do_log else (same_pattern(X, X.data.astype(np.float32)) if sp.issparse(X)
                                           else np.array(X, np.float32, copy=True))  # values: our own copy
        )
        Xn = _take_columns(Xn, gene_index)
        scaled_centered = None
        if pp.scale:
            Xn, scaled_centered = scale_genes(Xn, pp.scale_zero_center, pp.max_value, name=name)
        if sp.issparse(Xn):
            Xn = sp.csr_matrix(Xn, dtype=np.float32)
            Xn.sort_indices()
        names = np.asarray(genes, dtype=str) if genes is not None else var_names[gene_index]
        record = asdict(pp)
        record.update({
            "normalized": bool(do_norm),
            "logged": bool(do_log),
            "input_looked_like_counts": counts,
            "n_genes_input": int(X.shape[1]),
            "n_genes_used": int(len(gene_index)),
            "hvg_flavor_used": hvg_used,
            "scaled_zero_centered": scaled_centered,
            "sparse": bool(sp.issparse(Xn)),
        })
        return cls(
            coords=coords,
            X=Xn,
            gene_names=names,
            section=section,
            section_names=section_names,
            labels=labels,
            label_names=label_names,
            section_key=skey,
            label_key=label_key,
            gene_index=gene_index,
            preprocessing=record,
            obs_names=np.asarray(adata.obs_names).astype(str),
            domains=domains,
            domain_names=domain_names,
            domain_key=domain_key,
        )


def _check_expression(X, normalize: bool, name: str, log1p: bool = False) -> None:
    """Expression must be finite; normalising to a total needs non-negative values; log1p needs
    values above -1."""
    data = X.data if sp.issparse(X) else X
    if not np.issubdtype(np.asarray(data).dtype, np.number):
        raise SpatialDataError(f"{name}: expression has dtype {np.asarray(data).dtype}; store numbers.")
    finite = np.isfinite(data)
    if not finite.all():
        raise SpatialDataError(
            f"{name}: expression holds {int((~finite).sum())} NaN or infinite value(s); fill or drop them first."
        )
    if normalize and data.size and np.min(data) < 0:
        raise SpatialDataError(
            f"{name}: expression has negative values, so it cannot be normalised to a total count; "
            "pass preprocess normalize_total=False (it already looks transformed)."
        )
    if log1p and data.size and np.min(data) <= -1:
        raise SpatialDataError(
            f"{name}: expression has values down to {float(np.min(data)):.3g}, and log1p is undefined at or "
            "below -1 (it looks already transformed, e.g. scaled); turn log1p off "
            "(--set data.preprocess.log1p=false) or pass the raw counts."
        )


def scale_genes(X, zero_center: bool | None, max_value: float, name: str = "AnnData"):
    """Per-gene scaling to unit variance, clipped at +-max_value. Returns (X, centred?).

    Dense X is z-scored (centred) unless ``zero_center=False``. Sparse X is only divided by each
    gene's standard deviation (``zero_center=None`` or False), which keeps it sparse: centring
    would densify the whole matrix, which this module never does; ``zero_center=True`` on a
    sparse matrix is refused.
    """
    mean, var = gene_mean_var(X)
    std = np.sqrt(var + 1e-8).astype(np.float32)
    if sp.issparse(X):
        if zero_center:
            raise SpatialDataError(
                f"{name}: centring a sparse expression matrix would densify it ({X.shape[0]} x {X.shape[1]}); "
                "use scale_zero_center=None/False (unit variance without centring), or pass dense X."
            )
        X = sp.csr_matrix(X, dtype=np.float32, copy=True)
        X.data /= std[X.indices]
        np.clip(X.data, -max_value, max_value, out=X.data)
        return X, False
    centre = zero_center is None or zero_center
    X = np.asarray(X, dtype=np.float32)
    out = (X - mean.astype(np.float32)) if centre else X.copy()
    out /= std
    np.clip(out, -max_value, max_value, out=out)
    return out, bool(centre)


def _log1p_copy(X):
    if sp.issparse(X):
        X = sp.csr_matrix(X)
        return same_pattern(X, np.log1p(np.asarray(X.data, np.float32)))
    return np.log1p(np.asarray(X, dtype=np.float32))


def _take_columns(X, cols: np.ndarray):
    """Columns `cols` of X; index -1 means a missing gene, zero-filled."""
    cols = np.asarray(cols)
    if len(cols) == X.shape[1] and np.array_equal(cols, np.arange(X.shape[1])):
        return X  # every gene in order: no copy (a fancy column index copies the whole matrix)
    if (cols >= 0).all():
        return X[:, cols]
    safe = np.where(cols >= 0, cols, 0)
    sub = X[:, safe]
    if sp.issparse(sub):
        keep = sp.diags((cols >= 0).astype(np.float32))
        return sp.csr_matrix(sub @ keep)
    sub = np.array(sub, copy=True)
    sub[:, cols < 0] = 0
    return sub


def _match_genes(var_names: np.ndarray, genes: Sequence[str]) -> np.ndarray:
    """For each wanted gene, its column in var_names or -1 when absent."""
    pos = {g: i for i, g in enumerate(var_names)}
    return np.array([pos.get(str(g), -1) for g in genes], dtype=np.int64)
