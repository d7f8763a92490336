"""Data-parallel training: 2 gloo processes on the CPU train exactly as one process does.

The 2-rank run and the single-process reference run the same script (tests/dist_worker.py) on
the same small synthetic slide, seed and global batches, for every method (gnn-mask in ego-net
and in whole-section mode, spotscape with its prototype k-means, patch-mae).

Tolerances (float32 training; the ranks sum their shares in another order than one process):
- every logged loss value: relative 1e-5;
- gnn-mask and patch-mae weights: absolute 1e-5 (measured: 3e-8 and 6e-7).
- spotscape: batch norm follows every GCN and decoder layer, and subtracts the per-feature mean
  again, so the directions of the weights that only shift that mean (the biases before each norm,
  and first-layer weights of genes expressed almost alike everywhere) have a true gradient of zero.
  Both runs move them by Adam steps of rounding noise (Adam scales any gradient to ~lr per step);
  they cannot be compared entry by entry. The trained spotscape models are compared by what they
  compute instead: the embeddings of every spot (eval mode, running statistics included) agree to
  1e-4 (measured ~1e-6), and every weight is within lr x steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_spatialssl import distributed as D

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "dist_worker.py"
METHODS = ["gnn-mask", "gnn-mask-whole", "spotscape", "patch-mae", "gnn-mask-stop"]
SPOTSCAPE_LR, SPOTSCAPE_STEPS = 3e-4, 3  # its default lr; 3 epochs of one full-graph step


def _env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                            "SLURM_STEP_NUM_TASKS", D.LAUNCHED_ENV)}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The single-process reference and the 2-rank run, started together (3 processes)."""
    root = tmp_path_factory.mktemp("dist")
    port = D.free_port()
    methods = ",".join(METHODS)
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(root / "single"), methods],
                              env=_env({"SPATIALSSL_THREADS": "1"}), stderr=subprocess.PIPE, text=True)]
    for rank in range(2):
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(root / "two"), methods],
                                      env=_env(D.rank_env(rank, 2, port, _env())), stderr=subprocess.PIPE, text=True))
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(errs)[-4000:]
    read = lambda d, r: json.loads((root / d / f"rank{r}.json").read_text())  # noqa: E731
    return root, read("single", 0), read("two", 0), read("two", 1)


@pytest.mark.parametrize("name", ["gnn-mask", "gnn-mask-whole", "spotscape", "patch-mae"])
def test_two_gloo_processes_equal_one_process(runs, name):
    root, single, two, two_rank1 = runs
    a, b = single[name], two[name]
    assert a["steps"] == b["steps"] == two_rank1[name]["steps"] > 0
    for ha, hb in zip(a["history"], b["history"], strict=True):
        for key in ha:
            if key in ("elapsed", "epoch_seconds", "val_loss") or ha[key] is None:
                continue
            assert hb[key] == pytest.approx(ha[key], rel=1e-5, abs=1e-9), (name, ha["epoch"], key)
    if a["history"][-1]["val_loss"] is not None:
        assert b["history"][-1]["val_loss"] == pytest.approx(a["history"][-1]["val_loss"], rel=1e-5)
    wa, wb = torch.load(root / "single" / f"{name}.pt"), torch.load(root / "two" / f"{name}.pt")
    assert wa.keys() == wb.keys()
    for key in wa:
        diff = float((wa[key].double() - wb[key].double()).abs().max()) if wa[key].numel() else 0.0
        if name != "spotscape":
            assert diff <= 1e-5, (name, key, diff)
        elif not key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert diff <= SPOTSCAPE_LR * SPOTSCAPE_STEPS * 1.01, (name, key, diff)
    if name == "spotscape":
        za, zb = np.array(a["embedding"]), np.array(b["embedding"])
        assert np.abs(za - zb).max() <= 1e-4 * np.abs(za).max() and np.abs(za - zb).mean() <= 1e-5


def test_stop_on_rank_0_reaches_every_rank(runs):
    _, single, two, two_rank1 = runs
    a, b = two["gnn-mask-stop"], two_rank1["gnn-mask-stop"]
    assert a["stopped"] and b["stopped"]
    # asked after step 2 on rank 0; every rank finishes step 3 (the step that carries the flag), then
    # stops (one process alone stops before step 3); an epoch has 6 steps
    assert a["steps"] == b["steps"] == 3 and single["gnn-mask-stop"]["steps"] == 2


def test_cli_fit_with_two_devices_writes_one_run_folder(tmp_path):
    from napari_spatialssl.data.synthetic import synthetic_slide

    slide = tmp_path / "slide.h5ad"
    synthetic_slide(n_cells=800, n_genes=30, n_sections=2, n_cell_types=5, n_domains=3, seed=1).write_h5ad(slide)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "napari_spatialssl.cli", "fit", str(slide), "--method", "gnn-mask", "--out", str(out),
           "--devices", "2", "--device", "cpu", "--epochs", "2", "--quiet", "--n-domains", "3",
           "--set", "hidden_dims=16", "--set", "decoder_hidden=16", "--set", "radius=40", "--set",
           "graph_mode=egonet", "--set", "batch_size=128"]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["training_processes"] == 2 and metrics["epochs"] == 2
    assert (out / "manifest.json").is_file() and (out / "result.h5ad").is_file()
    assert not any(p.name.startswith(".") and p.is_dir() for p in tmp_path.iterdir() if p != out)


def test_pipeline_with_two_local_devices_is_rank_0_and_writes_the_run(tmp_path):
    """Pipeline(..., devices=2) (the Python API and the widget): this process is rank 0, one helper
    process trains the other share; the events, the output and the run folder are rank 0's."""
    from napari_spatialssl.data.synthetic import synthetic_slide
    from napari_spatialssl.pipeline import Pipeline, make_config

    adata = synthetic_slide(n_cells=800, n_genes=30, n_sections=2, n_cell_types=5, n_domains=3, seed=1)
    cfg = make_config("patch-mae", {"epochs": 2, "patch_size": 8, "n_channels": 12, "patches_per_epoch": 64,
                                    "batch_size": 32, "dim": 16, "decoder_dim": 16, "depth": 1, "device": "cpu",
                                    "eval.n_domains": 3, "data.section_key": "section"})
    events = []
    out = Pipeline("patch-mae", cfg, devices=2).fit(adata, tmp_path / "run", callback=events.append)
    assert out.metrics["training_processes"] == 2 and (tmp_path / "run" / "manifest.json").is_file()
    start = next(e for e in events if e.kind == "start" and e.stage == "pretraining")
    assert "2 processes" in start.message
    assert D.local_device_counts()["cpu_cores"] >= 1


def test_cli_devices_error_is_one_line(tmp_path):
    from napari_spatialssl.cli import main

    assert main(["fit", str(tmp_path / "x.h5ad"), "--method", "gnn-mask", "--out", str(tmp_path / "o"),
                 "--devices", "0"]) == 2


def test_rank_helpers():
    assert [D.split_range(10, r, 3) for r in range(3)] == [slice(0, 4), slice(4, 7), slice(7, 10)]
    assert D.split_range(1, 1, 2) == slice(1, 1)
    groups = D.balanced_groups([5, 1, 4, 2, 3], 2)
    assert sorted(sum(groups, [])) == [0, 1, 2, 3, 4]
    loads = [sum([5, 1, 4, 2, 3][i] for i in g) for g in groups]
    assert max(loads) - min(loads) <= 1
    u = D.keyed_uniform(7, np.arange(100_000))
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    assert np.array_equal(D.keyed_uniform(7, np.array([5, 99])), u[[5, 99]])  # the same number wherever drawn
    assert not np.array_equal(D.keyed_uniform(8, np.arange(10)), u[:10])


def test_launcher_environments(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID",
              "SLURM_LOCALID", "SLURM_STEP_NUM_NODES", D.LAUNCHED_ENV):
        monkeypatch.delenv(k, raising=False)
    assert D.env_ranks() is None and not D.launched() and D.context_from_env() is None
    monkeypatch.setenv("SLURM_PROCID", "0")  # a batch script's own shell: not a rank of a group
    assert D.env_ranks() is None
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_STEP_NUM_NODES", "2")
    assert D.env_ranks() == (5, 8, 1, 4)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert D.env_ranks() == (3, 4, 1, 2)  # torchrun's variables win
