"""Spotscape's fixed per-epoch cost, found and removed: epoch times before and after, same run.

The cost is intra-op thread synchronisation. A step on a small slide is hundreds of tiny tensor
ops, most of them in the prototype k-means (several slices, from proto_start_epoch on: 3
granularities x up to 20 Lloyd steps); with every intra-op thread, each op waits for the slowest
thread, and on a shared 2-core machine that thread is often descheduled: an epoch spends seconds
there whatever the slide's size. Now a small slide's training (spots x genes <= 2^25,
spotscape.SMALL_STEP_WORK) runs on one thread, and so does any small k-means (points x clusters x
dims <= 2^24, losses.KMEANS_SINGLE_THREAD_WORK). The baseline is the same code with both
thresholds at 0 (every op on every thread, the earlier behaviour). Baseline and new runs
alternate, so that the machine's load hits both alike.

    python benchmarks/spotscape_epoch_cost.py [--epochs 6] [--repeats 2]

Prints per slide the median epoch time of the epochs with prototypes (and without, a control),
and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

SHARED = Path(os.environ.get("SPATIALSSL_SHARED_DATA", ROOT.parent / "shared" / "data"))
SLIDES = [
    ("STARmap mPFC, 3 slices (3,190 cells)", ROOT / "sample_data" / "starmap_mpfc_3slices.h5ad",
     {"data.section_key": "sample_id"}),
    ("DLPFC 151673 + 151674 (2 slices)", SHARED / "dlpfc_151673-151676.h5ad", {"data.section_key": "sample_id",
                                                                             "eval.n_domains": 7, "_slices": 2}),
    ("DLPFC 151673 alone (1 slice: no prototypes, control)", SHARED / "dlpfc_151673.h5ad", {"eval.n_domains": 7}),
]


def epoch_times(adata, settings: dict, epochs: int, threshold: int) -> tuple[list[float], list[float], float]:
    import napari_spatialssl.models.spotscape as S
    from napari_spatialssl.models import losses
    from napari_spatialssl.models.base import get_method_class
    from napari_spatialssl.pipeline import dataset_from_config, make_config
    from napari_spatialssl.training import Trainer, seed_everything

    losses.KMEANS_SINGLE_THREAD_WORK = threshold  # 0 = the baseline: every op on every thread
    S.SMALL_STEP_WORK = 2**25 if threshold else 0
    cfg = make_config("spotscape", {**settings, "epochs": epochs, "device": "cpu", "proto_start_epoch": 2,
                                    "checkpoint_every": 0, "checkpoint_minutes": 1e9})
    data = dataset_from_config(adata, cfg)
    seed_everything(0)
    m = get_method_class("spotscape")(cfg)
    m.prepare(data)
    km = [0.0]
    inner = losses.torch_kmeans

    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            km[0] += time.perf_counter() - t

    S.torch_kmeans = timed
    try:
        hist = Trainer(cfg).fit(m).history
    finally:
        S.torch_kmeans = inner
    secs = [h["epoch_seconds"] for h in hist]
    with_proto = [s for h, s in zip(hist, secs) if "proto" in h]
    without = [s for h, s in zip(hist, secs) if "proto" not in h][1:]  # the first epoch builds device tensors
    return with_proto, without, km[0] / max(len(with_proto), 1)


def main(argv=None) -> int:
    import anndata as ad

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    record = {"threads": args.threads, "load_average_start": os.getloadavg(), "slides": {}}
    for label, path, settings in SLIDES:
        if not path.exists():
            print(f"{label}: {path} absent, skipped")
            continue
        adata = ad.read_h5ad(path)
        n_slices = settings.pop("_slices", None) if "_slices" in settings else None
        if n_slices:
            keep = adata.obs["sample_id"].astype(str).isin(sorted(adata.obs["sample_id"].astype(str).unique())[:n_slices])
            adata = adata[keep.to_numpy()].copy()
        runs = {"baseline (all threads)": [], "new (small steps on 1 thread)": []}
        for _ in range(args.repeats):
            for name, thr in (("baseline (all threads)", 0), ("new (small steps on 1 thread)", 2**24)):
                runs[name].append(epoch_times(adata, settings, args.epochs, thr))
        out = {}
        for name, rs in runs.items():
            wp = [s for r in rs for s in r[0]]
            wo = [s for r in rs for s in r[1]]
            out[name] = {"epoch_s_with_prototypes": float(np.median(wp)) if wp else None,
                         "epoch_s_without": float(np.median(wo)) if wo else None,
                         "kmeans_s_per_epoch": float(np.median([r[2] for r in rs]))}
        b, n = out["baseline (all threads)"], out["new (small steps on 1 thread)"]
        if b["epoch_s_with_prototypes"] and n["epoch_s_with_prototypes"]:
            out["ratio_with_prototypes"] = b["epoch_s_with_prototypes"] / n["epoch_s_with_prototypes"]
        record["slides"][label] = {"n_cells": int(adata.n_obs), **out}
        print(f"{label} ({adata.n_obs} cells): " + "; ".join(
            f"{k}: epoch {v['epoch_s_with_prototypes']} s with prototypes, {v['epoch_s_without']} s without, "
            f"k-means {v['kmeans_s_per_epoch']:.3f} s/epoch" for k, v in out.items() if isinstance(v, dict)),
            flush=True)
    record["load_average_end"] = os.getloadavg()
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
