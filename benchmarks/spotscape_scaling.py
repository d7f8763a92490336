"""Spotscape scaling: time and peak memory of ONE training step at N = 4k ... 1M spots, against
the dense N x N similarity telescope, measured in the same run.

Synthetic slides of the atlas's shape (550 genes, 4 sections, MERFISH-like density; see
napari_spatialssl.data.synthetic). Each N runs in its own subprocess so that peak memory is clean.
Per N we report:

- ``step_s`` / ``step_peak_gb``: one full Spotscape training step with the default config (two
  views, GCN 256 -> 64, reconstruction, exact telescope, scale matching over 4 sections), forward
  + backward + optimiser (median of 2 steps after a first one); peak = the process's resident
  memory above what it held before the first step (sampled every 5 ms; the first step also moves
  the data to the device tensors), and ``process_peak_gb`` the process's whole peak (data, graph,
  model);
- ``telescope_s`` / ``telescope_peak_gb``: the exact Gram-matrix telescope alone (forward + backward
  on N x 64 embeddings);
- ``dense_telescope_s`` / ``dense_peak_gb``: the same loss from the materialised N x N matrix,
  run only while its estimated need (4 N x N float32 matrices) fits under --dense-budget-gb; above
  that the need is printed instead ("does not fit").

Usage: python benchmarks/spotscape_scaling.py [--sizes 4000 16000 64000 256000 1000000]
       [--threads 1] [--dense-budget-gb 6] [--out benchmarks/results/spotscape_scaling.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rss_gb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def _mem_available_gb() -> float:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1e6
    return float("nan")


class PeakSampler:
    """Peak resident memory of this process above a baseline, sampled in a thread."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval

    def __enter__(self):
        self.base = _rss_gb()
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_gb())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_gb())

    @property
    def delta(self) -> float:
        return self.peak - self.base


def one_size(n: int, threads: int, dense_budget_gb: float, seed: int = 0) -> dict:
    import resource

    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from napari_spatialssl.data.dataset import PreprocessConfig, SpatialDataset
    from napari_spatialssl.data.synthetic import synthetic_atlas
    from napari_spatialssl.models.losses import similarity_telescope_loss, similarity_telescope_loss_dense
    from napari_spatialssl.models.spotscape import Spotscape, SpotscapeConfig

    out: dict = {"n_spots": n, "threads": threads}
    t0 = time.perf_counter()
    atlas = synthetic_atlas(n, 550, n_sections=4, seed=seed)
    adata = atlas.to_anndata()
    del atlas
    data = SpatialDataset.from_anndata(adata, section_key="section",
                                       preprocess=PreprocessConfig(n_top_genes=None))
    del adata
    out["data_s"] = time.perf_counter() - t0
    out["nnz_per_spot"] = float(data.X.nnz / data.n_cells)
    cfg = SpotscapeConfig(epochs=1, device="cpu", seed=seed)
    method = Spotscape(cfg)
    t0 = time.perf_counter()
    method.prepare(data)
    out["graph_s"] = time.perf_counter() - t0
    out["mean_degree"] = method.graph_info["mean_degree"]
    dev = torch.device("cpu")
    model = method.model.to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    method.on_epoch_start(1, dev)

    def step(i):
        opt.zero_grad(set_to_none=True)
        losses = method.training_loss({"epoch": 1, "seed": i}, dev)
        losses["loss"].backward()
        opt.step()
        return {k: float(v) for k, v in losses.items()}

    with PeakSampler() as ps:  # first step: also builds the device tensors (counted in its peak)
        t0 = time.perf_counter()
        step(0)
        out["first_step_s"] = time.perf_counter() - t0
    times, peaks = [], [ps.delta]
    for i in range(1, 3):
        with PeakSampler() as ps:
            t0 = time.perf_counter()
            losses = step(i)
            times.append(time.perf_counter() - t0)
        peaks.append(ps.delta)
    out["step_s"] = float(np.median(times))
    out["step_peak_gb"] = float(max(peaks))
    out["losses"] = losses
    del method, model, opt, data

    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, 64, generator=g, requires_grad=True)
    z2 = torch.randn(n, 64, generator=g, requires_grad=True)
    with PeakSampler() as ps:
        t0 = time.perf_counter()
        similarity_telescope_loss(z1, z2).backward()
        out["telescope_s"] = time.perf_counter() - t0
    out["telescope_peak_gb"] = ps.delta
    need = 4 * n * n * 4 / 1e9
    out["dense_need_gb"] = need
    if need <= dense_budget_gb:
        z1.grad = z2.grad = None
        with PeakSampler() as ps:
            t0 = time.perf_counter()
            similarity_telescope_loss_dense(z1, z2).backward()
            out["dense_telescope_s"] = time.perf_counter() - t0
        out["dense_peak_gb"] = ps.delta
    else:
        out["dense_telescope_s"] = None
        out["dense_peak_gb"] = None
        out["dense_note"] = f"does not fit: needs ~{need:,.0f} GB (4 N x N float32)"
    out["process_peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[4000, 16000, 64000, 256000, 1000000])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dense-budget-gb", type=float, default=6.0)
    p.add_argument("--min-free-gb", type=float, default=4.0,
                   help="skip a size when less than (its estimated need + this) is available")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "spotscape_scaling.json"))
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(one_size(args.child, args.threads, args.dense_budget_gb)))
        return 0
    rows = []
    for n in args.sizes:
        est = 9e-6 * n + 0.5  # GB, from the 256k run (~2.3 GB process peak) with headroom
        free = _mem_available_gb()
        if free < est + args.min_free_gb:
            rows.append({"n_spots": n, "skipped": f"only {free:.1f} GB available, need ~{est:.1f} GB"})
            print(json.dumps(rows[-1]), flush=True)
            continue
        cmd = [sys.executable, __file__, "--child", str(n), "--threads", str(args.threads),
               "--dense-budget-gb", str(args.dense_budget_gb)]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if res.returncode != 0:
            rows.append({"n_spots": n, "failed": res.stderr.strip().splitlines()[-1:] or ["?"],
                         "returncode": res.returncode})
        else:
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        rows[-1]["wall_s"] = time.perf_counter() - t0
        print(json.dumps(rows[-1]), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2))
    print("\n| N spots | step (s) | step peak (GB) | process peak (GB) | exact telescope (s / GB) "
          "| dense telescope (s / GB) | dense / exact time |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "step_s" not in r:
            print(f"| {r['n_spots']:,} | {r.get('skipped') or r.get('failed')} | | | | | |")
            continue
        dense = (f"{r['dense_telescope_s']:.3f} / {r['dense_peak_gb']:.2f}" if r["dense_telescope_s"] is not None
                 else r["dense_note"])
        ratio = (f"{r['dense_telescope_s'] / max(r['telescope_s'], 1e-9):.0f}x"
                 if r["dense_telescope_s"] is not None else "-")
        print(f"| {r['n_spots']:,} | {r['step_s']:.2f} | {r['step_peak_gb']:.2f} | {r['process_peak_gb']:.2f} "
              f"| {r['telescope_s']:.4f} / {r['telescope_peak_gb']:.3f} | {dense} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
