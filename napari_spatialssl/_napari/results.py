"""A method's results as the plugin holds them (Qt-free): from a run just trained, or adopted from a
slide that already carries them (a reopened widget, a result.h5ad opened from disk).

A :class:`Result` wraps the result AnnData (the documented keys: ``obsm['X_<m>']``,
``obs['<m>_domain' | '<m>_cell_type' | '<m>_masked']``, ``layers['<m>_reconstruction']``,
``uns['spatialssl'][<m>]``) and, for a run of this session, the trained method itself (its model
and the dataset it saw), which saving a model and inspecting hidden regions need.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..data.io import SpatialDataError

UNS_KEY = "spatialssl"
RESULTS_META = "spatialssl_results"  # slide layer metadata: {method: Result}, so results outlive a widget


@dataclass
class Result:
    method: str
    adata: Any
    metrics: dict = field(default_factory=dict)
    config: Any = None
    trained: Any = None  # the SSLMethod instance (model + dataset) when trained or loaded in this session
    train_result: Any = None
    source: str = "trained"  # "trained" | "predicted" | "adopted"

    # -- the documented keys ---------------------------------------------------------------
    def has(self, what: str) -> bool:
        a, m = self.adata, self.method
        return {"embedding": f"X_{m}" in a.obsm, "domains": f"{m}_domain" in a.obs.columns,
                "cell types": f"{m}_cell_type" in a.obs.columns,
                "reconstruction": f"{m}_reconstruction" in a.layers,
                "masked": f"{m}_masked" in a.obs.columns}[what]

    def embedding(self) -> np.ndarray:
        key = f"X_{self.method}"
        if key not in self.adata.obsm:
            raise SpatialDataError(f"{self.method} gave no embedding (obsm['{key}'] missing).")
        return np.asarray(self.adata.obsm[key])

    def categories(self, what: str) -> pd.Series:
        col = f"{self.method}_{'domain' if what == 'domains' else 'cell_type'}"
        if col not in self.adata.obs.columns:
            raise SpatialDataError(f"{self.method} gave no {what} (obs['{col}'] missing).")
        return self.adata.obs[col]

    def masked(self) -> np.ndarray | None:
        col = f"{self.method}_masked"
        return self.adata.obs[col].to_numpy().astype(bool) if col in self.adata.obs.columns else None

    def kept_reconstruction(self) -> np.ndarray | None:
        """Cells that kept a reconstruction when only some did (large slides), else None."""
        col = f"{self.method}_reconstructed"
        return self.adata.obs[col].to_numpy().astype(bool) if col in self.adata.obs.columns else None

    def model_genes(self) -> list[str]:
        data = getattr(self.trained, "data", None)
        if data is not None:
            return [str(g) for g in data.gene_names]
        genes = self.adata.uns.get(UNS_KEY, {}).get(self.method, {}).get("genes")
        return [str(g) for g in genes] if genes is not None else [str(g) for g in self.adata.var_names]

    def reconstruction(self, gene: str) -> np.ndarray:
        """Reconstructed expression of `gene` per cell (model space; NaN where none was kept)."""
        from .overlays import column

        key = f"{self.method}_reconstruction"
        if key not in self.adata.layers:
            raise SpatialDataError(f"{self.method} gave no reconstruction (layers['{key}'] missing).")
        var = pd.Index(self.adata.var_names.astype(str))
        if gene not in var:
            raise SpatialDataError(f"gene {gene!r} is not in this slide; pick one from the list.")
        if gene not in self.model_genes():
            raise SpatialDataError(f"gene {gene!r} is not among the {len(self.model_genes())} genes {self.method} "
                                   f"reconstructs (e.g. {', '.join(self.model_genes()[:5])}).")
        values = column(self.adata.layers[key], int(var.get_loc(gene)))
        kept = self.kept_reconstruction()
        if kept is not None:
            values[~kept] = np.nan
        return values

    def observed(self, gene: str) -> np.ndarray | None:
        """The model's input for `gene` per cell (the space the reconstruction is in), when the
        dataset is in memory; None for adopted results (the caller shows log-normalised expression)."""
        from .overlays import column

        data = getattr(self.trained, "data", None)
        if data is None or data.n_cells != self.adata.n_obs:
            return None
        genes = [str(g) for g in data.gene_names]
        return column(data.X, genes.index(gene)) if gene in genes else None

    def eval_masked_genes(self) -> list[str]:
        """Genes hidden from the input for the reported masked-gene figure (spotscape), if recorded."""
        rec = self.metrics.get("reconstruction") or {}
        return [str(g) for g in rec.get("masked_genes", [])]

    def headline(self) -> list[tuple[str, float, dict, bool]]:
        """(what, value, {baseline: value}, higher_is_better) of the figures a person looks at first."""
        m, out = self.metrics, []
        rec = m.get("reconstruction") or {}
        if "masked_mse" in rec:
            what = {"gnn-mask": "masked-cell MSE", "spotscape": "masked-gene MSE",
                    "patch-mae": "masked-region MSE"}.get(self.method, "masked MSE")
            base = dict(rec.get("baselines") or {})
            if "gene_mean_mse" in rec:
                base["gene mean"] = rec["gene_mean_mse"]
            out.append((what, rec["masked_mse"], base, False))
        ct = m.get("cell_type") or {}
        if "macro_f1" in ct:
            out.append(("cell-type macro F1 (held out)", ct["macro_f1"],
                        {k: v.get("macro_f1") for k, v in (ct.get("baselines") or {}).items()
                         if isinstance(v, dict)}, True))
        dom = m.get("domains") or {}
        if "ari" in dom:
            out.append((f"domain ARI vs '{dom.get('reference_key')}'", dom["ari"], {}, True))
        return [r for r in out if r[1] is not None]


def result_from_output(output) -> Result:
    return Result(output.method.name, output.adata, output.metrics, output.method.config, output.method,
                  output.train_result, "trained" if output.train_result is not None else "predicted")


def results_in_adata(adata) -> dict[str, Result]:
    """Results recorded in a slide's ``uns['spatialssl']`` (metrics and config as the pipeline wrote them)."""
    out = {}
    for method, entry in (adata.uns.get(UNS_KEY) or {}).items():
        if not isinstance(entry, dict) or (f"X_{method}" not in adata.obsm and f"{method}_domain" not in adata.obs):
            continue
        try:
            metrics = json.loads(entry.get("metrics", "{}"))
        except (TypeError, ValueError):
            metrics = {}
        out[str(method)] = Result(str(method), adata, metrics, None, None, None, "adopted")
    return out


def adopt(layer_metadata: dict) -> dict[str, Result]:
    """The results a slide layer carries: those of an earlier session (in its metadata), else those
    recorded in its AnnData."""
    held = layer_metadata.get(RESULTS_META)
    if isinstance(held, dict) and held:
        adata = layer_metadata.get("adata")
        return {m: r for m, r in held.items() if isinstance(r, Result) and (adata is None or r.adata is adata
                                                                           or r.adata.n_obs == adata.n_obs)}
    adata = layer_metadata.get("adata")
    return results_in_adata(adata) if adata is not None else {}
