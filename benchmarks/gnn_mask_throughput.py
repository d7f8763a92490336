"""gnn-mask training throughput on this CPU, and where a step's time goes, against today's code
measured in the same run.

Ego-net mode (``--egonet``, default): a synthetic slide with the atlas's shape (sections of ~73k
cells, 550 genes, radius 20 um), batches of ``--batch`` centre cells, ``--steps`` training steps per
variant, each step split into
  sampling (k-hop ego-nets + GCN edge weights), gathering (the subgraph's expression rows, dense),
  compute (forward, loss, backward, optimiser step: the convolutions and the decoder);
variants:
  baseline   the step before issue 16, written out here (random centres, random_cells over the
             union, the mask token copied into every masked row, PyG message passing, every node
             decoded, scipy's row gather);
  random     the step now (random centres; masks keyed by cell, only the scored cells decoded);
  spatial    egonet_order=spatial (centres of one tile per step: the ego-nets overlap).
Rates are centre cells per second over the timed steps (the first step of each variant is a warm-up).

Whole-section mode (``--whole``): the same split for whole-section steps (one section per step),
baseline vs now, and with ``--atlas`` one full epoch of the 4.3M-cell synthetic atlas through the
Trainer, end to end (slide, dataset, graph, epoch), with its peak RSS.

    python benchmarks/gnn_mask_throughput.py --cells 300000 --steps 6
    python benchmarks/gnn_mask_throughput.py --whole --cells 300000 --steps 3
    python benchmarks/gnn_mask_throughput.py --whole --atlas
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def make_method(adata, overrides: dict):
    from napari_spatialssl.models.base import get_method_class
    from napari_spatialssl.pipeline import dataset_from_config, make_config
    from napari_spatialssl.training import seed_everything

    cfg = make_config("gnn-mask", {"radius": 20.0, "data.section_key": "section", "device": "cpu", **overrides})
    data = dataset_from_config(adata, cfg, name="synthetic")
    seed_everything(0)
    m = get_method_class("gnn-mask")(cfg)
    m.prepare(data)
    return m


class Timer:
    def __init__(self):
        self.t = {"sampling": 0.0, "gathering": 0.0, "compute": 0.0}

    def add(self, key, t0):
        now = time.perf_counter()
        self.t[key] += now - t0
        return now


def old_forward(model, x, edge_index, edge_weight, mask):
    """GnnMaskModel.forward as it was before issue 16: the mask token written into every masked row,
    PyG's GCNConv message passing (scatter), every node decoded."""
    h = model.hide(model.input_norm(x), mask)
    enc = model.encoder
    for i, (conv, norm, skip) in enumerate(zip(enc.convs, enc.norms, enc.skips)):
        out = conv(h, edge_index, edge_weight) if enc.conv_kind == "gcn" else conv(h, edge_index)
        if enc.roots is not None:
            out = out + enc.roots[i](h)
        out = F.elu(norm(out))
        if skip is not None:
            out = out + skip(h)
        h = F.dropout(out, enc.dropout, enc.training)
    return h, model.decoder(h)


def baseline_steps(m, cells, n_steps, rng, opt):
    """Today's ego-net / whole step (before issue 16), written out: the sampler's random batches
    (or whole sections), random_cells over the subgraph's nodes, all nodes decoded."""
    from napari_spatialssl.masking import draw_cell_mask

    tm, units, nodes = Timer(), 0, 0
    it = m.view.subgraphs(cells, shuffle=True, rng=rng)
    for i in range(n_steps + 1):
        t0 = time.perf_counter()
        sub = next(it)
        mask = draw_cell_mask(m.config.mask, len(sub.nodes), rng)
        t0 = tm.add("sampling", t0) if i else time.perf_counter()
        x = torch.from_numpy(m.data.dense_rows(sub.nodes))
        t0 = tm.add("gathering", t0) if i else time.perf_counter()
        opt.zero_grad(set_to_none=True)
        score = m.scored(sub, mask)
        _, rec = old_forward(m.model, x, sub.edge_index, sub.edge_weight, torch.from_numpy(mask))
        sel = torch.from_numpy(np.flatnonzero(score))
        F.mse_loss(rec[sel], x[sel]).backward()
        opt.step()
        if i:
            tm.add("compute", t0)
            units += len(sub.cells)
            nodes += len(sub.nodes)
    return tm.t, units, nodes


def new_steps(m, cells, n_steps, rng, opt):
    """The step now (GnnMask._step_loss), with the same phase split."""
    from napari_spatialssl.models.gnn_mask import _Step

    tm, units, nodes = Timer(), 0, 0
    parts = m.view.step_parts(cells, rng=rng, sections_per_step=1)
    for i in range(n_steps + 1):
        t0 = time.perf_counter()
        kind, what = next(parts)
        step = _Step(m, kind, what, int(rng.integers(2**63)))
        sub = m.view.egonet_sub(what) if kind == "egonet" else m.view.whole(what)
        mask = step.mask(sub.nodes)
        t0 = tm.add("sampling", t0) if i else time.perf_counter()
        x = m._x(sub.nodes)
        t0 = tm.add("gathering", t0) if i else time.perf_counter()
        opt.zero_grad(set_to_none=True)
        score = m.scored(sub, mask)
        sel = torch.from_numpy(np.flatnonzero(score))
        _, rec = m.model(x, sub.edge_index, sub.edge_weight, torch.from_numpy(mask), decode_rows=sel)
        (F.mse_loss(rec, x[sel], reduction="sum") / max(len(sel), 1) / x.shape[1]).backward()
        opt.step()
        if i:
            tm.add("compute", t0)
            units += len(sub.cells)
            nodes += len(sub.nodes)
    return tm.t, units, nodes


def report(name, t, units, nodes):
    total = sum(t.values())
    line = {"variant": name, "cells_per_second": units / total, "seconds": total, "cells": units,
            "nodes_per_centre": nodes / max(units, 1),
            "share": {k: v / total for k, v in t.items()}, "phase_seconds": t}
    print(f"  {name:9s} {units / total:9,.0f} cells/s  ({nodes / max(units, 1):.2f} nodes per cell; "
          + ", ".join(f"{k} {v / total:.0%}" for k, v in t.items()) + ")", flush=True)
    return line


def compare(adata, mode: str, batch: int, n_steps: int) -> dict:
    over = {"graph_mode": mode, "batch_size": batch, "val_fraction": 0.0}
    out = {}
    variants = [("baseline", {}), ("random", {})] + ([("spatial", {"egonet_order": "spatial"})]
                                                     if mode == "egonet" else [])
    for name, extra in variants:
        m = make_method(adata, {**over, **extra})
        m.model.train()
        opt = torch.optim.AdamW(m.model.parameters(), lr=1e-3, foreach=name != "baseline")
        cells = np.flatnonzero(m.target_ok) if mode == "egonet" else np.arange(m.data.n_cells)
        rng = np.random.default_rng(1)
        fn = baseline_steps if name == "baseline" else new_steps
        out[name] = report(name, *fn(m, cells, n_steps, rng, opt))
        del m, opt
    base = out["baseline"]["cells_per_second"]
    for name in out:
        out[name]["vs_baseline"] = out[name]["cells_per_second"] / base
    return out


def available_gb() -> float:
    """The machine's available memory (MemAvailable), GB."""
    with open("/proc/meminfo") as fh:
        info = {line.split(":")[0]: float(line.split()[1]) for line in fh}
    return info.get("MemAvailable", 1e12) / 1e6


def memory_guard(min_available_gb: float = 1.5) -> None:
    """Exit at once if the machine's available memory falls below `min_available_gb` (a shared
    machine: never let this benchmark get another process OOM-killed)."""
    import threading

    def watch():
        while True:
            if available_gb() < min_available_gb:
                print(f"memory guard: less than {min_available_gb} GB available, stopping", flush=True)
                os._exit(3)
            time.sleep(0.2)  # at 1 s an allocation burst got past it to the kernel's OOM killer

    threading.Thread(target=watch, daemon=True).start()


def atlas_epoch(n_cells: int) -> dict:
    """One whole-section epoch of the synthetic atlas through the Trainer, end to end."""
    from napari_spatialssl.data.synthetic import synthetic_slide
    from napari_spatialssl.training import Trainer

    memory_guard()
    t0 = time.perf_counter()
    adata = synthetic_slide(n_cells, 550, 59, 30, n_domains=12, seed=0)
    t_slide = time.perf_counter() - t0
    print(f"  slide {t_slide:.0f} s, RSS peak {rss_gb():.1f} GB", flush=True)
    t0 = time.perf_counter()
    m = make_method(adata, {"graph_mode": "whole", "epochs": 1, "val_fraction": 0.0, "patience": 0,
                            "checkpoint_every": 0, "checkpoint_minutes": 1e9})
    t_prep = time.perf_counter() - t0
    del adata  # the dataset holds the preprocessed expression the training reads
    print(f"  dataset + graph + model {t_prep:.0f} s, RSS peak {rss_gb():.1f} GB", flush=True)
    t0 = time.perf_counter()
    res = Trainer(m.config).fit(m)
    t_epoch = time.perf_counter() - t0
    print(f"  epoch {t_epoch:.0f} s ({res.history[-1]['steps']} steps), RSS peak {rss_gb():.1f} GB", flush=True)
    return {"n_cells": n_cells, "slide_s": t_slide, "prepare_s": t_prep, "epoch_s": t_epoch,
            "loss": res.history[-1]["loss"], "peak_rss_gb": rss_gb(), "steps": res.history[-1]["steps"]}


def main(argv=None) -> int:
    from napari_spatialssl.data.synthetic import synthetic_slide

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=300_000)
    p.add_argument("--genes", type=int, default=550)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--whole", action="store_true", help="whole-section steps instead of ego-nets")
    p.add_argument("--atlas", action="store_true", help="with --whole: one epoch of the 4.3M-cell atlas, end to end")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    record = {"threads": args.threads, "load_average_start": os.getloadavg(), "genes": args.genes}
    if args.atlas:
        record["atlas_whole_epoch"] = atlas_epoch(4_300_000)
    else:
        n_sections = max(1, round(args.cells / 73_000))
        adata = synthetic_slide(args.cells, args.genes, n_sections, 30, n_domains=12, seed=0)
        mode = "whole" if args.whole else "egonet"
        print(f"{mode}: {args.cells:,} cells, {n_sections} sections, {args.genes} genes, batch {args.batch}, "
              f"{args.steps} timed steps per variant, {args.threads} threads", flush=True)
        record.update(mode=mode, cells=args.cells, batch=args.batch, variants=compare(adata, mode, args.batch,
                                                                                    args.steps))
    record["load_average_end"] = os.getloadavg()
    record["peak_rss_gb"] = rss_gb()
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
