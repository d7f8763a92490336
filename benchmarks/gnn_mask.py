"""gnn-mask benchmark on the shared MERFISH hypothalamus slide (Moffitt et al. 2018, animal 1).

Protocol (issue 4): pretrain on both sections without labels; fine-tune `Cell_class` on
Animal1_Bregma_+0.26; test on the held-out Animal1_Bregma_+0.21 ("Ambiguous" = unknown);
defaults otherwise; seeds 0, 1, 2; data modes whole / egonet; radius 20 and 30 um.
Baselines come from the same run and split: the same architecture from random initialisation
(fine-tuned the same way) and logistic regression on own expression (cell types); the training
mean and the mean of each cell's visible spatial neighbours (masked-cell reconstruction).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gnn_mask.py [--modes whole,egonet] [--radii 20,30]
        [--seeds 0,1,2] [--out benchmarks/results/gnn_mask.jsonl] [--set name=value ...]

Each finished run is appended to the JSON-lines file (so a long benchmark can be resumed:
runs already in the file are skipped); the summary table (per seed and mean, with ratios to
the baselines) is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SPATIALSSL_SHARED_DATA", REPO.parent / "shared" / "data")) / \
    "merfish_hypothalamus_2sections.h5ad"
TRAIN, TEST = "Animal1_Bregma_+0.26", "Animal1_Bregma_+0.21"


def run_one(adata, mode: str, radius: float, seed: int, extra: list[str]) -> dict:
    from napari_spatialssl.pipeline import fit

    overrides = {
        "data.section_key": "section", "data.label_key": "Cell_class", "data.ignore_labels": "Ambiguous",
        "eval.train_sections": TRAIN, "eval.test_sections": TEST,
        "graph_mode": mode, "radius": str(radius), "seed": str(seed),
    }
    overrides.update(dict(o.split("=", 1) for o in extra))
    t0 = time.perf_counter()
    out = fit(adata, "gnn-mask", overrides=overrides)
    m = out.metrics
    r, c = m["reconstruction"], m["cell_type"]
    return {
        "mode": mode, "radius": radius, "seed": seed, "overrides": extra,
        "device": m["device"], "threads": int(os.environ.get("OMP_NUM_THREADS", "0") or 0),
        "epochs": m["epochs"], "train_seconds": m["train_seconds"], "seconds_per_epoch": m["seconds_per_epoch"],
        "cells_per_second": m["cells_per_second"], "wall_seconds": time.perf_counter() - t0,
        "mean_degree": m["graph"]["mean_degree"],
        "masked_mse": r["masked_mse"], "masked_r2": r["masked_r2"],
        "mse_train_mean": r["baselines"]["train_mean"], "mse_neighbor_mean": r["baselines"]["neighbor_mean"],
        "f1": c["macro_f1"], "acc": c["accuracy"], "bacc": c["balanced_accuracy"],
        "val_f1": c["validation"]["macro_f1"],
        "f1_random_init": c["baselines"]["random_init"]["macro_f1"],
        "acc_random_init": c["baselines"]["random_init"]["accuracy"],
        "bacc_random_init": c["baselines"]["random_init"]["balanced_accuracy"],
        "f1_logreg": c["baselines"]["expression_logreg"]["macro_f1"],
        "acc_logreg": c["baselines"]["expression_logreg"]["accuracy"],
        "bacc_logreg": c["baselines"]["expression_logreg"]["balanced_accuracy"],
        "finetune_epochs": c["finetune"]["epochs"], "n_test_cells": c["n_test_cells"],
    }


COLUMNS = [
    ("seed", "{}"), ("epochs", "{}"), ("seconds_per_epoch", "{:.2f}"), ("cells_per_second", "{:.0f}"),
    ("masked_mse", "{:.4f}"), ("mse_train_mean", "{:.4f}"), ("mse_neighbor_mean", "{:.4f}"), ("masked_r2", "{:.3f}"),
    ("f1", "{:.3f}"), ("f1_random_init", "{:.3f}"), ("f1_logreg", "{:.3f}"),
    ("acc", "{:.3f}"), ("acc_random_init", "{:.3f}"), ("acc_logreg", "{:.3f}"),
    ("bacc", "{:.3f}"), ("bacc_random_init", "{:.3f}"), ("bacc_logreg", "{:.3f}"),
]


def summarise(rows: list[dict]) -> str:
    import numpy as np

    lines = []
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["mode"], r["radius"]), []).append(r)
    head = "| " + " | ".join(c for c, _ in COLUMNS) + " |"
    for (mode, radius), rs in sorted(groups.items()):
        lines += ["", f"### mode={mode}, radius={radius:g} um (mean degree {rs[0]['mean_degree']:.2f})", "", head,
                  "|" + "---|" * len(COLUMNS)]
        for r in sorted(rs, key=lambda r: r["seed"]):
            lines.append("| " + " | ".join(f.format(r[c]) for c, f in COLUMNS) + " |")
        mean = {c: float(np.mean([r[c] for r in rs])) for c, _ in COLUMNS}
        lines.append("| **mean** | " + " | ".join(f.format(mean[c]) if c not in ("epochs",) else f"{mean[c]:.0f}"
                                                  for c, f in COLUMNS[1:]) + " |")
        lines.append("")
        lines.append(
            f"mean of {len(rs)} seeds: masked MSE / train-mean MSE = {mean['masked_mse'] / mean['mse_train_mean']:.3f}, "
            f"/ neighbour-mean MSE = {mean['masked_mse'] / mean['mse_neighbor_mean']:.3f}; macro F1 "
            f"{mean['f1']:.3f} vs random init {mean['f1_random_init']:.3f} "
            f"({mean['f1'] - mean['f1_random_init']:+.3f}) vs logistic regression {mean['f1_logreg']:.3f} "
            f"({mean['f1'] - mean['f1_logreg']:+.3f})")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="whole,egonet")
    p.add_argument("--radii", default="20,30")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gnn_mask.jsonl"))
    p.add_argument("--set", dest="extra", action="append", default=[])
    p.add_argument("--summary-only", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    if not args.summary_only:
        if not DATA.exists():
            print(f"{DATA} absent: the benchmark needs the shared MERFISH file", file=sys.stderr)
            return 1
        import torch

        from napari_spatialssl.data.io import read_h5ad

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
        adata = read_h5ad(DATA)
        for mode in args.modes.split(","):
            for radius in [float(r) for r in args.radii.split(",")]:
                for seed in [int(s) for s in args.seeds.split(",")]:
                    key = (mode, radius, seed, args.extra)
                    if any((d["mode"], d["radius"], d["seed"], d["overrides"]) == key for d in done):
                        continue
                    row = run_one(adata, mode, radius, seed, args.extra)
                    done.append(row)
                    with out.open("a") as fh:
                        fh.write(json.dumps(row) + "\n")
                    print(json.dumps({k: row[k] for k in ("mode", "radius", "seed", "epochs", "masked_mse",
                                                          "mse_train_mean", "mse_neighbor_mean", "f1",
                                                          "f1_random_init", "f1_logreg")}), flush=True)
    rows = [d for d in done if d["overrides"] == args.extra]
    print(summarise(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
