"""benchmarks/gpu_check.sh: its CPU dry run goes through every method on a sample slide and on a
(tiny) synthetic atlas and prints one complete JSON line each; without CUDA the real run refuses
in one line. The GPU figures themselves come from running it on a GPU machine (benchmarks/README.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def _run(*args, timeout=300):
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=REPO)


def test_gpu_check_dry_run_covers_every_method_and_slide():
    done = _run("--dry-run")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 8
    seen = {(x["method"], "atlas" in x["slide"]) for x in lines}
    assert seen == {(m, a) for m in ("gnn-mask", "spotscape", "patch-mae") for a in (False, True)}
    for x in lines:
        assert "error" not in x, x
        assert x["dry_run"] and x["device"] == "cpu" and x["per_second"] > 0 and x["cpu_per_second"] > 0
        assert x["steps"] >= 1 and x["units"] == ("patches" if x["method"] == "patch-mae" else "cells")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the real check")
def test_gpu_check_without_cuda_refuses_in_one_line():
    done = _run(timeout=120)
    assert done.returncode == 2
    assert "no CUDA" in done.stderr and len(done.stderr.strip().splitlines()) == 1
