"""Data-parallel training on this machine: 1 process against 2 gloo processes, same run.

For each method (gnn-mask in ego-net and whole-section mode, spotscape, patch-mae) the same
script (tests/dist_worker.py) trains on the same synthetic slide with the same seed, once as one
process using every core and once as 2 ranks with one core each (the same cores in total), and
prints one JSON line per method:

  {"method": ..., "world_size": 2, "equal_to_single": true, "speedup": t_1 / t_2,
   "seconds_1": ..., "seconds_2": ..., "max_loss_rel_diff": ..., "max_weight_diff": ...}

t = the Trainer's wall time for the epochs (slide reading and `prepare` excluded, identical in
both). equal_to_single uses the tolerances of tests/test_distributed.py: every logged loss value
to 1e-5 relative; weights to 1e-5 (spotscape: its batch-statistics embeddings to 1e-4 of their
largest value, see that test for why its weights are compared that way).

  python benchmarks/distributed.py --quick     # CI size (the test's slide; speedup meaningless there)
  python benchmarks/distributed.py             # 60k cells x 200 genes, larger steps
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WORKER = REPO / "tests" / "dist_worker.py"
METHODS = ["gnn-mask", "gnn-mask-whole", "spotscape", "patch-mae"]


def _env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run(world: int, out: Path, methods: list[str], size: str) -> dict:
    from napari_spatialssl.distributed import free_port, rank_env

    cores = os.cpu_count() or 1
    args = [sys.executable, str(WORKER), str(out), ",".join(methods), "--size", size]
    if world == 1:
        procs = [subprocess.Popen(args, env=_env({"SPATIALSSL_THREADS": str(cores)}))]
    else:
        port = free_port()
        procs = [subprocess.Popen(args, env=_env(rank_env(r, world, port, _env({})))) for r in range(world)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"{world}-process run failed: exit codes {codes}")
    return json.loads((out / "rank0.json").read_text())


def compare(name: str, a: dict, b: dict, dir_a: Path, dir_b: Path) -> tuple[bool, float, float]:
    import torch

    rel = 0.0
    ok = a["steps"] == b["steps"]
    for ha, hb in zip(a["history"], b["history"]):
        for key, va in ha.items():
            if key in ("elapsed", "epoch_seconds", "epoch", "steps") or va is None:
                continue
            r = abs(hb[key] - va) / max(abs(va), 1e-9)
            rel = max(rel, r)
            ok &= r <= 1e-5 or abs(hb[key] - va) <= 1e-9
    wa, wb = torch.load(dir_a / f"{name}.pt"), torch.load(dir_b / f"{name}.pt")
    wdiff = max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa if wa[k].numel())
    if name == "spotscape":
        za, zb = np.array(a["embedding"]), np.array(b["embedding"])
        ok &= np.abs(za - zb).max() <= 1e-4 * np.abs(za).max() and np.abs(za - zb).mean() <= 1e-5
    else:
        ok &= wdiff <= 1e-5
    return bool(ok), rel, wdiff


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI size: the equality test's small slide")
    p.add_argument("--methods", default=",".join(METHODS))
    args = p.parse_args(argv)
    size = "quick" if args.quick else "bench"
    methods = args.methods.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        d1, d2 = Path(tmp) / "one", Path(tmp) / "two"
        one = run(1, d1, methods, size)
        two = run(2, d2, methods, size)
        for name in methods:
            equal, rel, wdiff = compare(name, one[name], two[name], d1, d2)
            print(json.dumps({"method": name, "world_size": 2, "equal_to_single": equal,
                              "speedup": one[name]["seconds"] / max(two[name]["seconds"], 1e-9),
                              "seconds_1": one[name]["seconds"], "seconds_2": two[name]["seconds"],
                              "steps": one[name]["steps"], "max_loss_rel_diff": rel, "max_weight_diff": wdiff,
                              "threads": {"1 process": os.cpu_count() or 1, "2 processes": "1 each"},
                              "size": size}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
