"""The GPU path, run: every method trained with CUDA and mixed precision on a sample slide and on
the synthetic whole-brain atlas (4.3M cells x 550 genes, 59 sections), against the CPU on the same
work in the same run. Called by benchmarks/gpu_check.sh (see there for the time budget).

One JSON line per (method, slide, view):

  {"method", "slide", "view", "n_cells", "units": "cells"|"patches", "device", "amp",
   "per_second": units per second on the device, "peak_gpu_gb": torch.cuda.max_memory_allocated,
   "cpu_per_second": the same steps' rate on the CPU (threads: all cores), "device_vs_cpu",
   "steps", "cpu_steps", "seconds", "error" (only when that part failed; the others still run)}

Rates are measured between the first and the last step event of the run (the first step, with
CUDA start-up and kernel selection, and the end-of-epoch work are left out); a "cell" is a centre
cell of an ego-net step, a cell of a whole-section step, or a spot of spotscape's full-graph step;
a "patch" is one 16 x 16-bin patch of patch-mae.

    python benchmarks/gpu_check.py                 # needs CUDA
    python benchmarks/gpu_check.py --dry-run       # CPU only, tiny sizes: the code path, for the suite
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

SAMPLES = ROOT / "napari_spatialssl" / "sample_data"
if not SAMPLES.is_dir():
    SAMPLES = ROOT / "sample_data"

# (method, view label, settings, slide kind). Atlas settings follow benchmarks/pipeline_scale.py
# (radius 20 um gives ~4 neighbours on the synthetic atlas); val_fraction 0: no validation pass.
RUNS = [
    ("gnn-mask", "whole sections", {"graph_mode": "whole", "val_fraction": 0.0}, "osmfish"),
    ("gnn-mask", "ego-nets, 4096 centres", {"graph_mode": "egonet", "batch_size": 4096, "val_fraction": 0.0},
     "osmfish"),
    ("spotscape", "full graph, 2 views", {"data.section_key": "sample_id"}, "starmap"),
    ("patch-mae", "16 x 16 patches", {"batch_size": 64}, "osmfish"),
    ("gnn-mask", "whole sections", {"graph_mode": "whole", "radius": 20.0, "val_fraction": 0.0}, "atlas"),
    ("gnn-mask", "ego-nets, 4096 centres", {"graph_mode": "egonet", "batch_size": 4096, "radius": 20.0,
                                            "val_fraction": 0.0}, "atlas"),
    # CPU figure of this one on the atlas's first 6 sections (430k spots; a step is linear in the
    # spots): a 4.3M-spot CPU step takes minutes (~119 s at 1M on 2 threads, benchmarks/README.md)
    ("spotscape", "full graph, 2 views", {"data.section_key": "section", "data.preprocess.n_top_genes": None,
                                          "eval.n_domains": 12, "cpu_sections": 6}, "atlas"),
    ("patch-mae", "16 x 16 patches", {"batch_size": 64, "data.section_key": "section"}, "atlas"),
]


# --dry-run: the same runs with small models, so the CPU check of the code path stays short
DRY_SETTINGS = {"gnn-mask": {"hidden_dims": [32, 16], "decoder_hidden": 32, "batch_size": 1024},
                "spotscape": {"hidden_dims": [32, 8], "recon_spots": 256},
                "patch-mae": {"batch_size": 8, "dim": 16, "decoder_dim": 16, "depth": 1, "n_channels": 16}}


class _Counted:
    """Counts the units (cells or patches) of each training step the Trainer takes."""

    def __init__(self, method):
        self.method, self.units = method, []
        self._loss = method.training_loss
        method.training_loss = self

    def __call__(self, batch, device):
        self.units.append(_units(self.method, batch))
        return self._loss(batch, device)


def _units(method, batch) -> int:
    if method.name == "patch-mae":
        return len(batch.patches)
    if method.name == "spotscape":
        return method.data.n_cells
    kind, what = getattr(batch, "kind", None), getattr(batch, "what", None)
    if kind == "egonet":
        return len(what)
    if kind == "whole":
        return int(sum(len(c) for c in batch.section_cells()))
    sub = batch[0]
    return len(sub.cells)


def measure(method_id: str, data_adata, settings: dict, device: str, max_steps: int, epochs: int = 1) -> dict:
    """Train `max_steps` steps (at most `epochs` epochs) and return the rate between step events."""
    from napari_spatialssl.models.base import get_method_class
    from napari_spatialssl.pipeline import dataset_from_config, make_config
    from napari_spatialssl.training import Trainer, seed_everything

    settings = {k: v for k, v in settings.items() if k != "cpu_sections"}
    cfg = make_config(method_id, {**settings, "device": device, "amp": True, "epochs": epochs, "patience": 0,
                                  "checkpoint_every": 0, "checkpoint_minutes": 1e9, "seed": 0})
    t0 = time.perf_counter()
    data = dataset_from_config(data_adata, cfg, name="slide")
    seed_everything(cfg.seed)
    method = get_method_class(method_id)(cfg)
    method.prepare(data)
    prepare_s = time.perf_counter() - t0
    counted = _Counted(method)
    trainer = Trainer(cfg)
    marks: list[float] = []

    def listen(event):
        if event.kind == "step":
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            marks.append(time.perf_counter())
            if len(marks) >= max_steps:
                trainer.stop()

    trainer.listener = listen
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t1 = time.perf_counter()
    trainer.fit(method)
    seconds = time.perf_counter() - t1
    steps = len(marks)
    if steps >= 2:
        rate = sum(counted.units[1:steps]) / max(marks[-1] - marks[0], 1e-9)
    else:  # one step only: its own time, start-up included
        rate = sum(counted.units[:steps]) / max(seconds, 1e-9)
    out = {"per_second": rate, "steps": steps, "seconds": seconds, "prepare_seconds": prepare_s,
           "units_per_step": int(np.mean(counted.units[:steps])) if steps else 0}
    if device.startswith("cuda"):
        out["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return out


def load_slide(kind: str, dry_run: bool, atlas_cells: int):
    import anndata as ad

    if kind == "osmfish":
        return ad.read_h5ad(SAMPLES / "osmfish_cortex.h5ad"), "osmFISH cortex (sample)"
    if kind == "starmap":
        return ad.read_h5ad(SAMPLES / "starmap_mpfc_3slices.h5ad"), "STARmap mPFC, 3 slices (sample)"
    from napari_spatialssl.data.synthetic import synthetic_slide

    if dry_run:
        return synthetic_slide(8_000, 40, 3, 8, n_domains=6, seed=0), "synthetic atlas (dry run: 8k cells)"
    n_sections = 59 if atlas_cells >= 1_000_000 else max(4, atlas_cells // 70_000)
    return (synthetic_slide(atlas_cells, 550, n_sections, 30, n_domains=12, seed=0),
            f"synthetic atlas ({atlas_cells:,} cells, 550 genes, {n_sections} sections)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU only, tiny sizes: check the code path")
    p.add_argument("--atlas-cells", type=int, default=4_300_000)
    p.add_argument("--steps", type=int, default=30, help="device steps per measurement (at most one epoch)")
    p.add_argument("--cpu-steps", type=int, default=3, help="CPU steps per measurement (the same steps)")
    p.add_argument("--only", default=None, help="comma-separated methods to run")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device; run with --dry-run for the CPU check"}))
        return 2
    device = "cpu" if args.dry_run else "cuda"
    steps, cpu_steps = (2, 2) if args.dry_run else (args.steps, args.cpu_steps)
    torch.set_num_threads(os.cpu_count() or 1)
    only = set(args.only.split(",")) if args.only else None
    slides: dict = {}
    failures = 0
    for method_id, view, settings, kind in RUNS:
        if only and method_id not in only:
            continue
        if kind not in slides:
            t0 = time.perf_counter()
            slides = {kind: load_slide(kind, args.dry_run, args.atlas_cells)}  # one slide in memory at a time
            print(f"# {slides[kind][1]} ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        adata, label = slides[kind]
        line = {"method": method_id, "slide": label, "view": view, "n_cells": int(adata.n_obs),
                "units": "patches" if method_id == "patch-mae" else "cells", "device": device,
                "amp": device == "cuda", "dry_run": bool(args.dry_run)}
        # spotscape: one step per epoch (the whole graph), so `steps` epochs
        epochs = (lambda n: n) if method_id == "spotscape" else (lambda n: 1)
        if args.dry_run:
            settings = {**settings, **DRY_SETTINGS[method_id]}
        try:
            dev = measure(method_id, adata, settings, device, steps, epochs(steps))
            line.update(dev)
            cpu_adata = adata
            if device != "cpu" and settings.get("cpu_sections") and kind == "atlas":
                sec = adata.obs["section"].cat.codes.to_numpy()
                cpu_adata = adata[sec < settings["cpu_sections"]].copy()
            cpu = dev if device == "cpu" else measure(method_id, cpu_adata, settings, "cpu", cpu_steps,
                                                      epochs(cpu_steps))
            line["cpu_per_second"] = cpu["per_second"]
            line["cpu_steps"] = cpu["steps"]
            line["cpu_n_cells"] = int(cpu_adata.n_obs)
            del cpu_adata
            line["device_vs_cpu"] = dev["per_second"] / max(cpu["per_second"], 1e-9)
        except Exception as exc:  # noqa: BLE001 - report and go on with the other methods
            failures += 1
            line["error"] = f"{type(exc).__name__}: {exc}"[:500]
            traceback.print_exc(file=sys.stderr)
        print(json.dumps(line), flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
