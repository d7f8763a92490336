"""Run folders: the steps of the final move, interrupted at each point (as a kill would), are
recovered by the next run; locks; manifests."""

from __future__ import annotations

import json
import os

import pytest

from napari_spatialssl import runs
from napari_spatialssl.runs import RunFolder, RunFolderError, staging_path, verify_run


def _write_run(folder: RunFolder, tag: str) -> None:
    (folder.staging / "result.h5ad").write_text(f"result {tag}")
    (folder.staging / "metrics.json").write_text(json.dumps({"tag": tag}))


def _killed(folder: RunFolder) -> None:
    """What a SIGKILL leaves: no cleanup ran, the lock died with the process."""
    os.close(folder._fd)
    folder._fd = None


def test_commit_writes_manifest_last_and_moves_into_place(tmp_path):
    out = tmp_path / "run"
    with RunFolder(out) as rf:
        _write_run(rf, "a")
        assert not out.exists() and (staging_path(out) / ".owner").exists()
        rf.commit("fit", method="toy")
    manifest = verify_run(out)
    assert set(manifest["files"]) == {"result.h5ad", "metrics.json"} and manifest["method"] == "toy"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    out = tmp_path / "run"
    first = RunFolder(out).open()
    with pytest.raises(RunFolderError, match=f"another run is writing it now .pid {os.getpid()}"):
        RunFolder(out, overwrite=True).open()
    first.close()
    assert not staging_path(out).exists()


def test_killed_before_commit_leaves_nothing_final_and_is_cleaned(tmp_path):
    out = tmp_path / "run"
    rf = RunFolder(out).open()
    _write_run(rf, "a")
    _killed(rf)
    assert not out.exists()
    again = RunFolder(out).open()
    assert any("leftovers" in n for n in again.notes)
    assert list(again.staging.iterdir()) == [again.staging / ".owner"]
    again.close()


def test_killed_between_the_two_renames_is_completed_by_the_next_run(tmp_path, monkeypatch):
    out = tmp_path / "run"
    with RunFolder(out) as rf:
        _write_run(rf, "old")
        rf.commit("fit")
    monkeypatch.setattr(runs, "_exchange", lambda a, b: False)  # a file system without RENAME_EXCHANGE
    rf = RunFolder(out, overwrite=True).open()
    _write_run(rf, "new")
    real_rename = os.rename
    calls = []

    def rename(a, b):
        calls.append((a, b))
        real_rename(a, b)
        if len(calls) == 1:  # out -> .old done; the kill comes before staging -> out
            raise KeyboardInterrupt
    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        rf.commit("fit")
    # an interrupt (not a kill) in that window puts the previous run back at once
    assert json.loads((out / "metrics.json").read_text())["tag"] == "old"
    monkeypatch.setattr(os, "rename", real_rename)
    _killed(rf)
    # a kill in the same window: simulate it by undoing that restore
    real_rename(out, runs._old_path(out))
    assert not out.exists()  # the window: neither name holds a run
    nxt = RunFolder(out, overwrite=True).open()
    assert any("completed the move" in n for n in nxt.notes)
    nxt.close()
    verify_run(out)
    assert json.loads((out / "metrics.json").read_text())["tag"] == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_exchange_replaces_a_run_atomically(tmp_path):
    out = tmp_path / "run"
    for tag in ("a", "b"):
        with RunFolder(out, overwrite=True) as rf:
            _write_run(rf, tag)
            rf.commit("fit")
    assert json.loads((out / "metrics.json").read_text())["tag"] == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_manifest_detects_truncation_and_missing_files(tmp_path):
    out = tmp_path / "run"
    with RunFolder(out) as rf:
        _write_run(rf, "a")
        rf.commit("fit")
    (out / "result.h5ad").write_text("res")  # shorter
    with pytest.raises(RunFolderError, match="truncated or replaced"):
        verify_run(out)
    (out / "result.h5ad").unlink()
    with pytest.raises(RunFolderError, match="missing"):
        verify_run(out)
    (out / "manifest.json").unlink()
    with pytest.raises(RunFolderError, match="incomplete run"):
        verify_run(out)


def test_dead_temp_files_of_atomic_writes_are_removed(tmp_path):
    from napari_spatialssl.data.io import atomic_write_text

    dead = tmp_path / ".cells.csv.tmp-999999999-abc.csv"
    dead.write_text("partial")
    alive = tmp_path / f".cells.csv.tmp-{os.getpid()}-abc.csv"
    alive.write_text("being written")
    atomic_write_text(tmp_path / "cells.csv", "x,y\n")
    assert not dead.exists() and alive.exists()
