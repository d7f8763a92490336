"""Bad inputs, hostile files and faults: each gives one clear line naming the input, exit code 2, and
leaves nothing under a final name; no model file can run code; a run folder is complete or absent,
also after kill -9 at any moment; --resume gives the uninterrupted result."""

from __future__ import annotations

import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from napari_spatialssl.cli import main
from napari_spatialssl.data.io import SpatialDataError
from napari_spatialssl.data.synthetic import synthetic_slide
from napari_spatialssl.runs import staging_path, verify_run

GNN_FAST = ["--method", "gnn-mask", "--epochs", "2", "--device", "cpu", "--quiet", "--set", "hidden_dims=16,8",
            "--set", "decoder_hidden=16", "--set", "finetune.epochs=2"]


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory):
    """A small synthetic slide (micrometres, 2 sections, cell types, domains) written once."""
    path = tmp_path_factory.mktemp("slide") / "slide.h5ad"
    synthetic_slide(n_cells=600, n_genes=30, n_sections=2, n_cell_types=4, n_domains=3, seed=1).write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def trained(slide_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(["fit", str(slide_path), "--out", str(out), *GNN_FAST]) == 0
    return out


def one_line_error(capsys, *names: str) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and "note:" not in ln]
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("napari-spatialssl ") and ": error: " in line, line
    assert "Traceback" not in err
    for name in names:
        assert name in line, (name, line)
    return line


def nothing_final(out: Path) -> None:
    """Nothing under the final name (the folder is absent or holds no result)."""
    assert not (out / "result.h5ad").exists() and not (out / "manifest.json").exists()


def never_read(monkeypatch):
    """Make reading any slide fail loudly: an error about --out must come before the data is read."""
    import napari_spatialssl.data.io as io

    def boom(*a, **k):
        raise AssertionError("the slide was read before the destination was checked")
    monkeypatch.setattr(io, "read_h5ad", boom)


# -- hostile model files ----------------------------------------------------------------------------

class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant_pickle(folder: Path, marker: Path) -> None:
    """A model.pt in the old layout whose unpickling would run a shell command."""
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"format": "napari-spatialssl/1", "method": "gnn-mask", "config": {}, "state_dict": {},
               "extra": _Exploit(marker)}
    with open(folder / "model.pt", "wb") as fh:
        pickle.dump(payload, fh)


def test_a_crafted_pickle_runs_nothing_in_predict_or_convert(slide_path, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil"
    _plant_pickle(evil, marker)
    for argv in (["predict", str(slide_path), "--model", str(evil), "--out", str(tmp_path / "p")],
                 ["predict", str(slide_path), "--model", str(evil / "model.pt"), "--out", str(tmp_path / "p")],
                 ["convert-model", str(evil), str(tmp_path / "c")]):
        assert main(argv) == 2
        line = one_line_error(capsys, "model.pt", "refused")
        assert "nothing from it was executed" in line
        assert not marker.exists()
    nothing_final(tmp_path / "p")
    assert not (tmp_path / "c").exists()


def test_a_pickle_renamed_to_safetensors_is_refused(trained, slide_path, tmp_path, capsys):
    import shutil

    marker = tmp_path / "PWNED"
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    with open(copy / "model.safetensors", "wb") as fh:
        pickle.dump(_Exploit(marker), fh)
    assert main(["predict", str(slide_path), "--model", str(copy), "--out", str(tmp_path / "p")]) == 2
    one_line_error(capsys, "model.safetensors")
    assert not marker.exists()
    # even with a matching manifest entry, the file is not safetensors: refused, nothing run
    manifest = json.loads((copy / "manifest.json").read_text())
    from napari_spatialssl.checkpoints import sha256_file
    manifest["files"]["model.safetensors"] = {"bytes": (copy / "model.safetensors").stat().st_size,
                                              "sha256": sha256_file(copy / "model.safetensors")}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["predict", str(slide_path), "--model", str(copy), "--out", str(tmp_path / "p")]) == 2
    one_line_error(capsys, "model.safetensors")
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["empty", "truncated", "no_manifest", "other_weights", "edited_config",
                                    "bad_json"])
def test_damaged_or_mixed_model_folders_are_one_line(trained, slide_path, tmp_path, capsys, damage):
    import shutil

    from napari_spatialssl.checkpoints import sha256_file

    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    weights = copy / "model.safetensors"

    def reseal():  # make the manifest agree again, so that the deeper check is the one exercised
        manifest = json.loads((copy / "manifest.json").read_text())
        for name in manifest["files"]:
            manifest["files"][name] = {"bytes": (copy / name).stat().st_size, "sha256": sha256_file(copy / name)}
        (copy / "manifest.json").write_text(json.dumps(manifest))

    expect = {"empty": "model.safetensors", "truncated": "model.safetensors", "no_manifest": "incomplete",
              "other_weights": "come from another run", "edited_config": "do not match the saved config",
              "bad_json": "model.json"}[damage]
    if damage == "empty":
        weights.write_bytes(b"")
    elif damage == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "no_manifest":
        (copy / "manifest.json").unlink()
    elif damage == "other_weights":  # the weights of another run (another width) beside this model.json
        other = tmp_path / "other"
        assert main(["fit", str(slide_path), "--out", str(other), *GNN_FAST, "--set", "hidden_dims=12,8"]) == 0
        capsys.readouterr()
        shutil.copy(other / "model.safetensors", weights)
        reseal()
    elif damage == "edited_config":  # model.json's config edited (and its weights hash kept)
        meta = json.loads((copy / "model.json").read_text())
        meta["config"]["hidden_dims"] = [20, 8]
        (copy / "model.json").write_text(json.dumps(meta))
        reseal()
    elif damage == "bad_json":
        (copy / "model.json").write_text("{not json")
        reseal()
    if damage in ("empty", "truncated"):
        reseal()
    out = tmp_path / "pred"
    assert main(["predict", str(slide_path), "--model", str(copy), "--out", str(out)]) == 2
    line = one_line_error(capsys)
    assert expect in line and str(copy) in line
    assert not out.exists()


def test_legacy_model_pt_loads_safely_and_converts(slide_path, trained, tmp_path, capsys):
    """A folder of the previous format (torch pickle of tensors and plain data) is read with the
    restricted unpickler; convert-model rewrites it; both predict the same."""
    import torch

    from napari_spatialssl.checkpoints import read_model

    payload = read_model(trained)
    legacy = {"format": "napari-spatialssl/1", "method": payload["method"], "config": payload["config"],
              "state_dict": payload["state_dict"], "versions": payload["versions"], "history": payload["history"],
              "extra": {**payload["extra"], "bin_size": np.float64(12.5)}}  # numpy scalars occur in old files
    old = tmp_path / "old"
    old.mkdir()
    torch.save(legacy, old / "model.pt")
    for name in ("result.h5ad", "metrics.json", "config.json", "loss.csv"):
        (old / name).write_bytes((trained / name).read_bytes())
    assert main(["predict", str(slide_path), "--model", str(old), "--out", str(tmp_path / "p1")]) == 0
    assert "convert-model" in capsys.readouterr().err
    assert main(["convert-model", str(old), str(tmp_path / "new")]) == 0
    verify_run(tmp_path / "new")
    assert main(["predict", str(slide_path), "--model", str(tmp_path / "new"), "--out", str(tmp_path / "p2")]) == 0
    import anndata as ad

    a, b = ad.read_h5ad(tmp_path / "p1" / "result.h5ad"), ad.read_h5ad(tmp_path / "p2" / "result.h5ad")
    np.testing.assert_array_equal(a.obsm["X_gnn-mask"], b.obsm["X_gnn-mask"])


# -- settings, refused before any data is read -------------------------------------------------------

@pytest.mark.parametrize("args, names", [
    (["--epochs", "0"], ["epochs=0", ">= 1"]),
    (["--epochs", "-3"], ["epochs=-3"]),
    (["--lr", "-1"], ["lr=-1", "> 0"]),
    (["--lr", "nan"], ["lr=nan", "finite"]),
    (["--lr", "inf"], ["lr=inf", "finite"]),
    (["--seed", "-1"], ["seed=-1"]),
    (["--set", "graph_mode=egonet", "--set", "num_hops=0"], ["num_hops=0", ">= 1"]),
    (["--set", "mask.ratio=1.5"], ["mask.ratio=1.5"]),
    (["--set", "dropout=1"], ["dropout=1", "< 1"]),
    (["--set", "hidden_dims=[0,8]"], ["hidden_dims[0]=0"]),
    (["--set", "finetune.val_fraction=-0.2"], ["finetune.val_fraction"]),
    (["--set", "radius=-5"], ["radius=-5"]),
    (["--set", "batch_size=abc"], ["batch_size=abc"]),
    (["--set", "epochs=2.5"], ["epochs=2.5", "whole number"]),
    (["--set", "amp=maybe"], ["amp=maybe"]),
    (["--set", "nope=1"], ["nope"]),
    (["--set", "radius"], ["radius", "name=value"]),
    (["--epochs", "abc"], ["--epochs", "abc"]),
    (["--n-domains", "1"], ["n_domains=1"]),
    (["--method", "spotscape", "--set", "lambda_telescope=-1"], ["lambda_telescope=-1"]),
    (["--method", "patch-mae", "--set", "patch_size=1"], ["patch_size=1"]),
    (["--method", "patch-mae", "--set", "token_bins=3"], ["token_bins", "divide"]),
])
def test_bad_settings_are_one_line_before_the_slide_is_read(args, names, slide_path, tmp_path, capsys, monkeypatch):
    never_read(monkeypatch)
    argv = ["fit", str(slide_path), "--out", str(tmp_path / "o")]
    argv += args if "--method" in args else ["--method", "gnn-mask", *args]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own refusals (a value that is not a number)
        code = exc.code
    assert code == 2
    one_line_error(capsys, *names)
    assert not (tmp_path / "o").exists() and not staging_path(tmp_path / "o").exists()


def test_python_api_checks_types_and_ranges(slide_path):
    import anndata as ad

    from napari_spatialssl import fit
    from napari_spatialssl.models.gnn_mask import GnnMaskConfig
    from napari_spatialssl.pipeline import Pipeline, make_config

    adata = ad.read_h5ad(slide_path)
    with pytest.raises(SpatialDataError, match="epochs='5': expected a whole number, got str"):
        fit(adata, "gnn-mask", epochs="5")
    with pytest.raises(SpatialDataError, match="lr=-0.1"):
        make_config("spotscape", lr=-0.1)
    with pytest.raises(SpatialDataError, match="hidden_dims=.*expected a list"):
        Pipeline("gnn-mask", GnnMaskConfig(hidden_dims=64))
    with pytest.raises(SpatialDataError, match="pass a GnnMaskConfig"):
        Pipeline("gnn-mask", make_config("spotscape"))
    cfg = make_config("gnn-mask", epochs=3.0, lr=1)  # exact numbers of the wrong kind are accepted
    assert cfg.epochs == 3 and isinstance(cfg.epochs, int) and isinstance(cfg.lr, float)


# -- data preconditions, the file named ---------------------------------------------------------------

def _write(adata, path: Path) -> Path:
    adata.write_h5ad(path)
    return path


@pytest.mark.parametrize("case", ["negative_log1p", "nan_expression", "nan_coords", "one_cell_sections",
                                  "one_class", "too_few_cells", "missing_label_key", "bad_test_section"])
def test_bad_data_names_the_file(case, slide_path, tmp_path, capsys):
    import anndata as ad

    a = ad.read_h5ad(slide_path)
    extra: list[str] = []
    expect = {"negative_log1p": "log1p", "nan_expression": "NaN", "nan_coords": "NaN or infinite coordinates",
              "one_cell_sections": "does not name sections", "one_class": "at least two",
              "too_few_cells": "at least 10", "missing_label_key": "not an obs column",
              "bad_test_section": "not found"}[case]
    if case == "negative_log1p":
        X = a.X.toarray().astype(np.float32)
        X = (X - X.mean(0)) / (X.std(0) + 1e-6)  # scaled data: values far below -1
        a.X = X
    elif case == "nan_expression":
        X = a.X.toarray().astype(np.float32)
        X[3, 2] = np.nan
        a.X = X
    elif case == "nan_coords":
        a.obsm["spatial"] = a.obsm["spatial"].astype(float)
        a.obsm["spatial"][5, 0] = np.nan
    elif case == "one_cell_sections":
        a.obs["cell_id"] = np.asarray(a.obs_names)
        extra = ["--section-key", "cell_id"]
    elif case == "one_class":
        a.obs["cell_type"] = "neuron"
        extra = ["--label-key", "cell_type"]
    elif case == "too_few_cells":
        a = a[:5].copy()
    elif case == "missing_label_key":
        extra = ["--label-key", "celltype_typo"]
    elif case == "bad_test_section":
        extra = ["--label-key", "cell_type", "--test-sections", "no_such_section"]
    path = _write(a, tmp_path / f"{case}.h5ad")
    out = tmp_path / "o"
    assert main(["fit", str(path), "--out", str(out), *GNN_FAST, *extra]) == 2
    line = one_line_error(capsys, expect)
    if case not in ("one_cell_sections", "one_class", "bad_test_section"):
        assert f"{case}.h5ad" in line, line  # the file is named, not "AnnData"
    assert not out.exists() and not staging_path(out).exists()


# -- the destination, checked before any work -------------------------------------------------------

def test_out_problems_are_found_before_the_slide_is_read(slide_path, tmp_path, capsys, monkeypatch):
    never_read(monkeypatch)
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "holds_folder" / "result.h5ad").mkdir(parents=True)
    (tmp_path / "my_data").mkdir()
    (tmp_path / "my_data" / "notes.txt").write_text("precious")
    cases = [(tmp_path / "a_file", "is a file"), (tmp_path / "a_file" / "sub", "is a file"),
             (tmp_path / "holds_folder", "holds a folder 'result.h5ad'"),
             (tmp_path / "my_data", "not a napari-spatialssl run"), (Path("/proc/no/such"), "cannot create")]
    for out, why in cases:
        for cmd in (["fit", str(slide_path), "--out", str(out), *GNN_FAST],
                    ["predict", str(slide_path), "--model", str(tmp_path), "--out", str(out)]):
            assert main(cmd) == 2
            one_line_error(capsys, why)
    assert (tmp_path / "my_data" / "notes.txt").read_text() == "precious"  # nothing lost
    assert (tmp_path / "a_file").read_text() == "x"


def test_an_existing_run_needs_overwrite_and_is_replaced_whole(trained, slide_path, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(trained, out)
    assert main(["fit", str(slide_path), "--out", str(out), *GNN_FAST]) == 2
    one_line_error(capsys, "already holds a complete run", "--overwrite")
    before = verify_run(out)
    assert main(["fit", str(slide_path), "--out", str(out), *GNN_FAST, "--seed", "7", "--overwrite"]) == 0
    after = verify_run(out)
    assert after["files"]["model.safetensors"]["sha256"] != before["files"]["model.safetensors"]["sha256"]
    assert json.loads((out / "metrics.json").read_text())["seed"] == 7  # no file of the old run left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging, no .old, no temp file


def test_export_targets_are_checked_before_reading(slide_path, tmp_path, capsys, monkeypatch):
    (tmp_path / "exists.csv").write_text("x")
    (tmp_path / "dir.h5ad").mkdir()
    never_read(monkeypatch)
    monkeypatch.setattr("napari_spatialssl.data.export.read_h5ad", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("read before the target was checked")))
    for target, why in [(tmp_path / "exists.csv", "already exists"), (tmp_path / "dir.h5ad", "is a folder"),
                        (tmp_path / "cells.txt", "cannot export")]:
        assert main(["export", str(slide_path), str(target)]) == 2
        one_line_error(capsys, why)


def test_a_full_disk_is_one_line_and_leaves_no_final_folder(slide_path, tmp_path, capsys, monkeypatch):
    import anndata as ad

    def full(self, path, *a, **k):
        with open(path, "wb") as fh:
            fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ad.AnnData, "write_h5ad", full)
    out = tmp_path / "o"
    assert main(["fit", str(slide_path), "--out", str(out), *GNN_FAST]) == 2
    one_line_error(capsys, "result.h5ad", "no space left on device")
    assert not out.exists()
    leftovers = [p for p in staging_path(out).rglob("*") if p.name.startswith(".result")]
    assert leftovers == []  # the half-written temp file is gone
    # the next run clears the kept staging folder and succeeds
    monkeypatch.undo()
    assert main(["fit", str(slide_path), "--out", str(out), *GNN_FAST]) == 0
    assert "leftovers of an interrupted run" in capsys.readouterr().err
    verify_run(out)
    assert not staging_path(out).exists()


def test_training_memory_is_budgeted_before_training(slide_path, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["fit", str(slide_path), "--out", str(out), *GNN_FAST, "--set", "radius=2000",
                 "--set", "max_memory_gb=0.01"]) == 2
    line = one_line_error(capsys, "training would need about", "GB", "--set radius=")
    assert "edge messages" in line
    assert not out.exists()
    for method, extra in (("spotscape", ["--set", "max_memory_gb=0.001"]),
                          ("patch-mae", ["--set", "max_memory_gb=0.001", "--set", "patch_size=8"])):
        assert main(["fit", str(slide_path), "--out", str(out), "--method", method, "--epochs", "1",
                     "--quiet", *extra]) == 2
        one_line_error(capsys, "training would need about", "--set")


def test_estimates_track_the_view(slide_path):
    """The estimate grows with the graph (radius), the batch (ego-nets) and the patch batch."""
    import anndata as ad

    from napari_spatialssl.pipeline import dataset_from_config, make_config
    from napari_spatialssl.models.base import get_method_class

    adata = ad.read_h5ad(slide_path)

    def estimate(method, **over):
        cfg = make_config(method, over)
        m = get_method_class(method)(cfg)
        data = dataset_from_config(adata, cfg)
        m.data = data
        m.prepare(data)
        return m.training_memory().bytes

    assert estimate("gnn-mask", radius=200.0) > 2 * estimate("gnn-mask", radius=40.0)
    assert estimate("gnn-mask", graph_mode="egonet", batch_size=256) > \
        estimate("gnn-mask", graph_mode="egonet", batch_size=32)
    small = {"patch_size": 8, "n_channels": 8}
    assert estimate("patch-mae", batch_size=64, **small) > 1.5 * estimate("patch-mae", batch_size=16, **small)


def test_patch_mae_without_a_residual_base_writes_its_reconstruction(slide_path, tmp_path):
    """residual_readout='none' is a valid option: the reconstruction layer is written (it crashed)."""
    import anndata as ad

    from napari_spatialssl import fit

    out = fit(ad.read_h5ad(slide_path), "patch-mae", overrides={
        "epochs": 1, "patch_size": 8, "n_channels": 8, "patches_per_epoch": 16, "batch_size": 8, "dim": 16,
        "decoder_dim": 16, "depth": 1, "eval_mask_sizes": [2], "eval_mask_repeats": 1, "residual_readout": "none",
        "eval.n_domains": 3})
    rec = out.adata.layers["patch-mae_reconstruction"]
    assert rec.shape == out.adata.shape and np.isfinite(np.asarray(rec.sum())).all()


# -- concurrent runs, kills at any moment, resume ------------------------------------------------------

def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "napari_spatialssl.cli", *args]


def test_two_runs_into_one_out_the_second_is_refused(slide_path, tmp_path):
    out = tmp_path / "o"
    slow = subprocess.Popen(_cli("fit", str(slide_path), "--out", str(out), *GNN_FAST[:2], "--epochs", "200",
                                 "--device", "cpu", "--quiet", "--set", "hidden_dims=16,8"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not (staging_path(out) / "run.json").exists():
            assert time.time() < deadline and slow.poll() is None, slow.stderr.read() if slow.poll() else "slow"
            time.sleep(0.1)
        second = subprocess.run(_cli("fit", str(slide_path), "--out", str(out), *GNN_FAST, "--overwrite"),
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "another run is writing it now" in lines[0] and str(out) in lines[0]
    finally:
        slow.kill()
        slow.wait()
    # the killed run left only its staging folder; the next run removes it
    assert not out.exists()
    assert main(["fit", str(slide_path), "--out", str(out), *GNN_FAST]) == 0
    verify_run(out)


def test_kill_9_at_random_moments_leaves_complete_or_absent_run_folders(slide_path, tmp_path):
    """fit (with --overwrite, so that replacing a complete run is covered too) killed with SIGKILL
    at random moments: after each kill, --out is absent or a complete run whose manifest matches."""
    args = ["fit", str(slide_path), *GNN_FAST, "--overwrite"]
    out = tmp_path / "o"
    t0 = time.time()
    ref = subprocess.Popen(_cli(*args, "--out", str(out)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not staging_path(out).exists() and ref.poll() is None:
        time.sleep(0.02)
    t_open = time.time() - t0  # imports done, the folder locked: the interesting part starts here
    assert ref.wait(timeout=300) == 0
    duration = time.time() - t0
    rng = np.random.default_rng(0)
    outcomes = {"absent": 0, "complete": 0}
    for i in range(6):
        target = out if i % 2 else tmp_path / f"fresh{i}"  # alternate: replacing a run / a new folder
        proc = subprocess.Popen(_cli(*args, "--out", str(target)), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(t_open + float(rng.uniform(0.0, 1.1)) * (duration - t_open))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if target.exists():
            verify_run(target)  # raises when incomplete or mixed
            outcomes["complete"] += 1
        else:
            outcomes["absent"] += 1
    assert sum(outcomes.values()) == 6
    assert out.exists()  # the run being replaced was never lost: the old one or the new one is there
    verify_run(out)


def test_resume_after_kill_9_gives_the_uninterrupted_result(slide_path, tmp_path):
    import anndata as ad

    args = ["fit", str(slide_path), "--method", "gnn-mask", "--epochs", "8", "--device", "cpu", "--quiet",
            "--set", "hidden_dims=16,8", "--set", "decoder_hidden=16", "--set", "checkpoint_every=1",
            "--label-key", "cell_type", "--set", "finetune.epochs=3", "--seed", "2"]
    straight = tmp_path / "straight"
    subprocess.run(_cli(*args, "--out", str(straight)), check=True, capture_output=True, timeout=300)
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(*args, "--out", str(out)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = staging_path(out) / "checkpoint" / "training_state.json"
    deadline = time.time() + 120
    while True:
        assert time.time() < deadline and proc.poll() is None, "the run ended before it could be killed"
        try:
            if json.loads(state.read_text())["epoch"] >= 3:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    done = subprocess.run(_cli("fit", "--resume", str(out), "--quiet"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    verify_run(out)
    a, b = ad.read_h5ad(straight / "result.h5ad"), ad.read_h5ad(out / "result.h5ad")
    np.testing.assert_array_equal(a.obsm["X_gnn-mask"], b.obsm["X_gnn-mask"])
    assert (a.obs["gnn-mask_cell_type"].astype(str) == b.obs["gnn-mask_cell_type"].astype(str)).all()
    ma, mb = (json.loads((p / "metrics.json").read_text()) for p in (straight, out))
    assert ma["reconstruction"]["masked_mse"] == mb["reconstruction"]["masked_mse"]
    assert ma["cell_type"]["macro_f1"] == mb["cell_type"]["macro_f1"] and mb["resumed"] is True
    la = [r.split(",")[1] for r in (straight / "loss.csv").read_text().splitlines()[1:]]
    lb = [r.split(",")[1] for r in (out / "loss.csv").read_text().splitlines()[1:]]
    assert la == lb  # every epoch's loss identical


def test_resume_needs_an_interrupted_run_and_its_own_settings(slide_path, trained, tmp_path, capsys):
    assert main(["fit", "--resume", str(tmp_path / "nothing")]) == 2
    one_line_error(capsys, "no interrupted run")
    assert main(["fit", "--resume", str(trained), "--epochs", "5"]) == 2
    one_line_error(capsys, "drop --epochs")
    assert main(["fit", str(slide_path), "--out", str(tmp_path / "x")]) == 2
    one_line_error(capsys, "--method")
