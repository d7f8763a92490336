"""The gnn-mask pipeline end to end on the 4.3M-cell synthetic atlas, on this machine.

Reads (or draws) the synthetic whole-brain atlas (4,300,000 cells, 550 genes, 59 sections), then
``Pipeline("gnn-mask").fit`` with whole-section training for one epoch, domains without K (the
Leiden resolution search on the approximate k-NN graph of every cell) and the run folder written
(result.h5ad, model, metrics). Prints each stage's time, the process's current and peak RSS, and one
JSON line. A guard stops the run if the machine's available memory falls under 1 GB (a shared box);
either way the run ends by printing where the main thread was at the highest RSS sampled (every
0.5 s), so that an out-of-memory stop says which step holds the memory.

    python benchmarks/atlas_pipeline.py --atlas /tmp/atlas_4p3m.h5ad --out /tmp/atlas_run [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def current_rss_gb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


class RssSampler:
    """Samples this process's RSS and the main thread's stack every `every` s; `report()` prints
    the stacks of the highest samples. Exits the process (code 3, after the report) when the
    machine's available memory falls under `min_available_gb`."""

    def __init__(self, every: float = 0.5, min_available_gb: float = 1.0):
        import threading

        self.main = threading.get_ident()
        self.samples: list[tuple[float, float, list[str]]] = []
        self.every, self.min_available_gb = every, min_available_gb
        self.t0 = time.perf_counter()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self):
        import traceback

        from gnn_mask_throughput import available_gb

        while True:
            frame = sys._current_frames().get(self.main)
            stack = [f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}:{f.name}"
                     for f in traceback.extract_stack(frame)[-10:]] if frame is not None else []
            self.samples.append((time.perf_counter() - self.t0, current_rss_gb(), stack))
            self.samples = sorted(self.samples, key=lambda s: -s[1])[:200]
            if available_gb() < self.min_available_gb:
                print(f"memory guard: less than {self.min_available_gb} GB available, stopping", flush=True)
                self.report()
                os._exit(3)
            time.sleep(self.every)

    def report(self, top: int = 6) -> None:
        seen = set()
        for at, rss, stack in list(self.samples):
            key = tuple(stack[-4:])
            if key in seen:
                continue
            seen.add(key)
            print(f"  RSS {rss:.2f} GB at {at:.0f} s: {' > '.join(stack[-7:])}", flush=True)
            if len(seen) >= top:
                break


def main(argv=None) -> int:
    import torch

    from gnn_mask_throughput import rss_gb

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--atlas", default=None, help=".h5ad of the synthetic atlas (drawn when absent)")
    p.add_argument("--out", default="/tmp/atlas_run")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--epochs", type=int, default=1)
    args = p.parse_args(argv)
    sampler = RssSampler(min_available_gb=1.0)
    torch.set_num_threads(args.threads)
    import anndata as ad

    from napari_spatialssl.pipeline import Pipeline, make_config

    t0 = time.perf_counter()
    if args.atlas and Path(args.atlas).exists():
        adata = ad.read_h5ad(args.atlas)
    else:
        from napari_spatialssl.data.synthetic import synthetic_slide

        adata = synthetic_slide(4_300_000, 550, 59, 30, n_domains=12, seed=0)
    rec = {"n_cells": int(adata.n_obs), "n_genes": int(adata.n_vars), "threads": args.threads,
           "read_s": round(time.perf_counter() - t0, 1), "rss_after_read_gb": rss_gb(),
           "load_average_start": os.getloadavg()}
    print(f"slide {rec['read_s']} s, RSS {rec['rss_after_read_gb']:.1f} GB", flush=True)
    cfg = make_config("gnn-mask", {"graph_mode": "whole", "radius": 20.0, "epochs": args.epochs, "patience": 0,
                                   "data.section_key": "section", "device": "cpu"})
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    marks = []
    t0 = time.perf_counter()
    pipe = Pipeline("gnn-mask", cfg)
    for event in pipe.run(adata, out, name="synthetic atlas"):
        if event.kind in ("stage", "start", "end", "epoch"):
            marks.append({"at_s": round(time.perf_counter() - t0, 1), "what": f"{event.kind}: {event.message}",
                          "rss_gb": round(current_rss_gb(), 2), "peak_rss_gb": round(rss_gb(), 2)})
            print(f"  {marks[-1]}", flush=True)
    m = pipe.output.metrics
    rec.update(total_s=round(time.perf_counter() - t0, 1), peak_rss_gb=round(rss_gb(), 2), marks=marks,
               train_seconds=m.get("train_seconds"), seconds_per_epoch=m.get("seconds_per_epoch"),
               domains={k: m.get("domains", {}).get("clustering", {}).get(k)
                        for k in ("method", "knn", "resolution", "n_graph_cells", "leiden_iterations", "tried")},
               n_domains=m.get("domains", {}).get("n_domains"),
               result_h5ad_gb=round((out / "result.h5ad").stat().st_size / 1e9, 2),
               load_average_end=os.getloadavg())
    print("highest RSS samples:")
    sampler.report()
    print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
