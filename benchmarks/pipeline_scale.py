"""End-to-end pipeline on a large synthetic slide: stage times and peak memory, and the memory of
writing results back into the AnnData against the straightforward way (measured in the same run).

    python benchmarks/pipeline_scale.py --n-cells 1000000 --n-sections 12 [--methods gnn-mask patch-mae]

Each method runs in its own process (so its peak resident memory is its own): dataset building
(normalise + log1p, sparse), the method's view (graph / lattice), one pretraining epoch, evaluation
(embeddings, reconstruction metrics) and writing the result AnnData. Then, in one more process,
`write_results` is compared with the straightforward version on the same slide and a simulated
(n_cells x n_genes) reconstruction: `adata.copy()` plus the whole dense layer (the baseline) against
the shared expression arrays plus the masked cells' rows (`eval.reconstruction=auto` above 5e8
values): what each result holds in memory beyond the input (once the method's working arrays
are freed), the size of its .h5ad, its time and peak traced allocations (tracemalloc).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHOD_SETTINGS = {
    # one pretraining epoch; no labels, so no fine-tuning (its cost is per labelled training cell)
    "gnn-mask": {"graph_mode": "egonet", "radius": 20.0, "epochs": 1, "patience": 0,
                 "data.label_key": None},
    "patch-mae": {"epochs": 1, "patience": 0, "data.label_key": None},
    "spotscape": {"epochs": 1, "patience": 0, "data.label_key": None},
}


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def _slide(n_cells: int, n_sections: int, seed: int = 0):
    from napari_spatialssl.data.synthetic import synthetic_slide

    return synthetic_slide(n_cells, 550, n_sections, 30, n_domains=12, seed=seed)


def run_method(method: str, n_cells: int, n_sections: int, n_domains: int | None, queue) -> None:
    from napari_spatialssl.pipeline import Pipeline, make_config

    t0 = time.perf_counter()
    adata = _slide(n_cells, n_sections)
    t_slide = time.perf_counter() - t0
    rss_slide = _rss_gb()
    cfg = make_config(method, {**METHOD_SETTINGS[method], "data.section_key": "section",
                               **({"eval.n_domains": n_domains} if n_domains else {})})
    pipe = Pipeline(method, cfg)
    marks: list[tuple[str, float]] = []
    t0 = time.perf_counter()
    for event in pipe.run(adata, name="synthetic"):
        if event.kind in ("stage", "start", "end"):
            marks.append((f"{event.kind}:{event.stage}:{event.message}", time.perf_counter() - t0))
            print(f"  [{method}] {marks[-1][0]} at {marks[-1][1]:.1f} s, RSS peak {_rss_gb():.2f} GB", flush=True)
    total = time.perf_counter() - t0
    out = pipe.output
    stages = {}
    prev_name, prev_t = "prepare (dataset + view)", 0.0
    for name, t in marks:
        if name.startswith("start:pretraining"):
            stages[prev_name] = t - prev_t
            prev_name, prev_t = "pretraining epoch", t
        elif name.startswith("stage:evaluation"):
            stages[prev_name] = t - prev_t
            prev_name, prev_t = "evaluate + write results", t
    stages[prev_name] = total - prev_t
    queue.put({"method": method, "n_cells": n_cells, "n_sections": n_sections, "make_slide_s": t_slide,
               "rss_after_slide_gb": rss_slide, "stages_s": stages, "total_s": total, "peak_rss_gb": _rss_gb(),
               "layers": sorted(out.adata.layers.keys()), "obsm": sorted(out.adata.obsm.keys()),
               "reconstruction_layer": out.metrics.get("reconstruction_layer"),
               "train_seconds": out.metrics.get("train_seconds")})


def compare_write(n_cells: int, n_sections: int, queue) -> None:
    import anndata as ad  # noqa: F401 - import cost outside the traced region
    import scipy.sparse as sp

    from napari_spatialssl.data.dataset import SpatialDataset
    from napari_spatialssl.models.base import MethodResults
    from napari_spatialssl.models.gnn_mask import GnnMaskConfig
    from napari_spatialssl.pipeline import _place_genes, write_results

    adata = _slide(n_cells, n_sections)
    rng = np.random.default_rng(0)
    n, g = adata.shape
    recon = rng.random((n, g), dtype=np.float32)
    masked = rng.random(n) < 0.2
    emb = rng.random((n, 64), dtype=np.float32)
    data = SpatialDataset(coords=np.asarray(adata.obsm["spatial"], np.float32), X=sp.csr_matrix((n, g), dtype=np.float32),
                          gene_names=np.asarray(adata.var_names), section=np.zeros(n, np.int32),
                          section_names=["all"])
    results = MethodResults(obsm={"X_gnn-mask": emb}, layers={"gnn-mask_reconstruction": recon},
                            obs={"gnn-mask_masked": masked}, metrics={})
    cfg = GnnMaskConfig()
    x_gb = (adata.X.data.nbytes + adata.X.indices.nbytes + adata.X.indptr.nbytes) / 1e9

    def traced(fn):
        tracemalloc.start()
        t0 = time.perf_counter()
        res = fn()
        secs = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1] / 1e9
        tracemalloc.stop()
        return res, secs, peak

    def baseline():  # the straightforward way: a full copy, the whole dense layer
        out = adata.copy()
        out.obsm["X_gnn-mask"] = emb
        out.layers["gnn-mask_reconstruction"] = _place_genes(recon, data, g)
        out.obs["gnn-mask_masked"] = masked
        return out

    def held_gb(out) -> float:
        """GB of arrays the result holds beyond the input AnnData's own (what stays in memory once
        the method's working arrays are freed)."""
        own = {id(adata.X), *(id(v) for v in adata.layers.values()), *(id(v) for v in adata.obsm.values())}
        arrays = [out.X, *out.layers.values(), *out.obsm.values()]
        total = 0
        for a in arrays:
            if id(a) in own:
                continue
            total += sum(x.nbytes for x in (a.data, a.indices, a.indptr)) if sp.issparse(a) else np.asarray(a).nbytes
        return total / 1e9

    def file_gb(out) -> float:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "result.h5ad"
            out.write_h5ad(path)
            return path.stat().st_size / 1e9

    base, base_s, base_peak = traced(baseline)
    base_held, base_file = held_gb(base), file_gb(base)
    del base
    ours, ours_s, ours_peak = traced(lambda: write_results(adata, "gnn-mask", data, results, cfg, {}))
    rec = ours.layers["gnn-mask_reconstruction"]
    queue.put({"n_cells": n, "n_genes": g, "X_csr_gb": x_gb, "dense_layer_gb": recon.nbytes / 1e9,
               "baseline_copy_dense": {"seconds": base_s, "traced_peak_gb": base_peak, "held_gb": base_held,
                                       "h5ad_gb": base_file},
               "ours_shared_masked_rows": {"seconds": ours_s, "traced_peak_gb": ours_peak, "held_gb": held_gb(ours),
                                           "h5ad_gb": file_gb(ours),
                                           # below 5e8 values `auto` keeps every row (no '<m>_reconstructed')
                                           "layer_rows_kept": int(ours.obs["gnn-mask_reconstructed"].sum())
                                           if "gnn-mask_reconstructed" in ours.obs else n,
                                           "layer_nnz": int(rec.nnz) if sp.issparse(rec) else int(rec.size),
                                           "x_shared": ours.X is adata.X},
               "held_ratio_baseline_over_ours": base_held / max(held_gb(ours), 1e-9)})


def _in_process(target, *args):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    while True:  # a crashed child never puts: do not wait for it forever
        try:
            result = queue.get(timeout=5)
            break
        except Exception:
            if not proc.is_alive():
                raise RuntimeError(f"{target.__name__}{args} failed (exit code {proc.exitcode}); its traceback "
                                   "is above") from None
    proc.join()
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-cells", type=int, default=1_000_000)
    p.add_argument("--n-sections", type=int, default=12)
    p.add_argument("--methods", nargs="*", default=["gnn-mask", "patch-mae"], choices=sorted(METHOD_SETTINGS))
    p.add_argument("--n-domains", type=int, default=None,
                   help="K for the domain clustering (k-means); default: none given, so methods that cluster "
                        "run their graph clustering with a resolution search")
    p.add_argument("--out", type=Path, default=None, help="append the JSON record to this file")
    args = p.parse_args(argv)
    record = {"n_cells": args.n_cells, "n_sections": args.n_sections, "n_domains": args.n_domains, "methods": {}}
    for method in args.methods:
        res = _in_process(run_method, method, args.n_cells, args.n_sections, args.n_domains)
        record["methods"][method] = res
        print(f"{method}: total {res['total_s']:.1f} s, peak RSS {res['peak_rss_gb']:.2f} GB "
              f"(slide alone {res['rss_after_slide_gb']:.2f} GB); stages "
              + ", ".join(f"{k} {v:.1f} s" for k, v in res["stages_s"].items())
              + f"; layers {res['layers']}", flush=True)
    res = _in_process(compare_write, args.n_cells, args.n_sections)
    record["write_results"] = res
    b, o = res["baseline_copy_dense"], res["ours_shared_masked_rows"]
    print(f"write_results on {res['n_cells']:,} x {res['n_genes']} (X {res['X_csr_gb']:.2f} GB CSR, dense "
          f"reconstruction {res['dense_layer_gb']:.2f} GB): baseline (copy + dense layer) holds {b['held_gb']:.2f} GB "
          f"beyond the input, h5ad {b['h5ad_gb']:.2f} GB, {b['seconds']:.1f} s, traced peak {b['traced_peak_gb']:.2f} GB; "
          f"ours (shared X, masked rows kept: {o['layer_rows_kept']:,}) holds {o['held_gb']:.2f} GB, h5ad "
          f"{o['h5ad_gb']:.2f} GB, {o['seconds']:.1f} s, traced peak {o['traced_peak_gb']:.2f} GB; "
          f"held ratio {res['held_ratio_baseline_over_ours']:.1f}x", flush=True)
    print(json.dumps(record))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as fh:
            fh.write(json.dumps(record) + "\n")
    return record


if __name__ == "__main__":
    main()
