"""The shared Trainer: device choice, seeding, early stopping, stop flag, checkpoints, events."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from napari_spatialssl.config import TrainConfig
from napari_spatialssl.data.io import SpatialDataError
from napari_spatialssl.training import Trainer, load_checkpoint, resolve_device


class RegressionTask:
    """y = X w + noise; a linear model. `val_curve` optionally dictates validation losses."""

    name = "toy"

    def __init__(self, n=256, d=8, n_batches=4, val_curve=None, seed=0):
        g = np.random.default_rng(seed)
        self.X = torch.from_numpy(g.normal(size=(n, d)).astype(np.float32))
        self.y = self.X @ torch.from_numpy(g.normal(size=(d, 1)).astype(np.float32))
        self.model = torch.nn.Linear(d, 1)
        self.n_batches = n_batches
        self.val_curve = val_curve
        self.epochs_started = 0
        self.steps = 0
        self.step_hook = None

    def train_batches(self, epoch, rng):
        perm = rng.permutation(len(self.X))
        return np.array_split(perm, self.n_batches)

    def training_loss(self, batch, device):
        self.steps += 1
        if self.step_hook is not None:
            self.step_hook(self.steps)
        idx = torch.from_numpy(batch)
        pred = self.model(self.X[idx].to(device))
        return {"loss": torch.nn.functional.mse_loss(pred, self.y[idx].to(device))}

    def validation_loss(self, device):
        if self.val_curve is not None:
            return float(self.val_curve[min(self.epochs_started - 1, len(self.val_curve) - 1)])
        return float(torch.nn.functional.mse_loss(self.model(self.X.to(device)), self.y.to(device)))

    def on_epoch_start(self, epoch, device):
        self.epochs_started += 1

    def extra_state(self):
        return {"note": "toy"}


def test_resolve_device_auto_and_errors():
    dev = resolve_device("auto")
    expected = "cuda" if torch.cuda.is_available() else None
    if expected:
        assert dev.type == "cuda"
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert dev.type in ("cpu", "mps")
        with pytest.raises(SpatialDataError, match="no CUDA"):
            resolve_device("cuda")


def test_training_reduces_loss_and_emits_events():
    task = RegressionTask()
    events = []
    result = Trainer(TrainConfig(epochs=20, lr=0.05, device="cpu")).fit(task, callback=events.append)
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert kinds.count("epoch") == 20 and kinds.count("step") == 20 * 4
    assert result.history[-1]["loss"] < 0.2 * result.history[0]["loss"]
    assert all("epoch_seconds" in h and h["steps"] == 4 for h in result.history)
    step_events = [e for e in events if e.kind == "step"]
    assert step_events[0].n_steps == 4 and "loss" in step_events[0].losses


def test_seeding_is_reproducible():
    def run(seed):
        torch.manual_seed(123)  # same init; the Trainer's seed drives the batch order
        task = RegressionTask()
        Trainer(TrainConfig(epochs=3, lr=0.05, seed=seed, device="cpu")).fit(task)
        return task.model.weight.detach().clone()

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_early_stopping_restores_best_epoch():
    curve = [5.0, 4.0, 3.0, 3.5, 3.6, 3.7, 3.8, 3.9, 4.0, 4.1]
    task = RegressionTask(val_curve=curve)
    snapshots = {}

    trainer = Trainer(TrainConfig(epochs=10, lr=0.05, patience=3, device="cpu"))
    for event in trainer.run(task):
        if event.kind == "epoch":
            snapshots[event.epoch] = task.model.weight.detach().clone()
    r = trainer.result
    assert r.stopped_early and r.best_epoch == 3 and r.epochs_run == 6
    assert torch.equal(task.model.weight, snapshots[3])  # weights of the best epoch restored


def test_stop_from_another_thread_takes_effect_at_next_step():
    task = RegressionTask(n_batches=10)
    trainer = Trainer(TrainConfig(epochs=1000, lr=0.01, device="cpu"))
    reached, release = threading.Event(), threading.Event()

    def hook(step):
        if step == 15:
            reached.set()
            release.wait(5)

    task.step_hook = hook
    worker = threading.Thread(target=trainer.fit, args=(task,))
    worker.start()
    assert reached.wait(10)
    trainer.stop()  # from this (main) thread while step 15 runs in the worker
    release.set()
    worker.join(10)
    assert not worker.is_alive()
    assert task.steps == 15  # no step started after the flag
    assert trainer.result.stopped_by_user and trainer.result.epochs_run == 2


def test_stop_before_run_trains_nothing_then_trainer_is_reusable():
    task = RegressionTask()
    trainer = Trainer(TrainConfig(epochs=3, lr=0.01, device="cpu"))
    trainer.stop()  # e.g. Stop pressed in the widget before a later stage starts
    assert trainer.fit(task).epochs_run == 0 and trainer.result.stopped_by_user and task.steps == 0
    second = trainer.fit(task)  # the flag was cleared when the stopped run ended
    assert second.epochs_run == 3 and not second.stopped_by_user


def test_checkpoint_is_safe_files_with_config_and_versions(tmp_path):
    folder = tmp_path / "ckpt"
    task = RegressionTask()
    cfg = TrainConfig(epochs=2, lr=0.01, seed=5, device="cpu")
    result = Trainer(cfg, checkpoint_path=folder).fit(task)
    assert result.checkpoint == str(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.safetensors"]  # no temp file left
    payload = load_checkpoint(folder)
    assert payload["config"]["seed"] == 5 and payload["config"]["epochs"] == 2
    assert payload["versions"]["torch"] and "numpy" in payload["versions"]
    assert payload["extra"] == {"note": "toy"}
    assert len(payload["history"]) == 2
    fresh = torch.nn.Linear(8, 1)
    fresh.load_state_dict(payload["state_dict"])
    assert torch.equal(fresh.weight, task.model.weight.detach().cpu())


def test_non_finite_loss_is_a_clear_error():
    task = RegressionTask()
    task.y[0] = float("nan")
    with pytest.raises(FloatingPointError, match="learning rate"):
        Trainer(TrainConfig(epochs=1, device="cpu")).fit(task)


def test_load_checkpoint_rejects_other_files(tmp_path):
    from napari_spatialssl.checkpoints import ModelFileError

    with pytest.raises(ModelFileError, match="no model here"):
        load_checkpoint(tmp_path)
    torch.save({"x": 1}, tmp_path / "model.pt")
    with pytest.raises(ModelFileError, match="not a napari-spatialssl checkpoint"):
        load_checkpoint(tmp_path / "model.pt")


class _Crash(Exception):
    pass


class DropoutTask(RegressionTask):
    """Regression through a dropout layer, so the torch RNG stream matters too."""

    def __init__(self):
        super().__init__(n_batches=3)
        self.model = torch.nn.Sequential(torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))


@pytest.mark.parametrize("crash_after", [1, 3, 5])
def test_resume_after_a_crash_equals_the_uninterrupted_run(tmp_path, crash_after):
    """State saved every epoch; a run killed after `crash_after` epochs and resumed ends with exactly
    the weights and loss history of a run that was never interrupted (same batches, same dropout)."""
    cfg = TrainConfig(epochs=6, lr=0.02, seed=3, device="cpu", checkpoint_every=1, patience=0)
    torch.manual_seed(0)
    straight = DropoutTask()
    straight_run = Trainer(cfg, state_dir=tmp_path / "a").fit(straight)

    torch.manual_seed(0)  # the same initial weights (the pipeline seeds before building a model)
    first = DropoutTask()
    trainer = Trainer(cfg, state_dir=tmp_path / "b")

    def crash(event):
        if event.kind == "epoch" and event.epoch == crash_after:
            raise _Crash
    with pytest.raises(_Crash):
        trainer.fit(first, callback=crash)
    torch.manual_seed(0)
    resumed_task = DropoutTask()  # a fresh process: the seeded initial model, RNGs elsewhere
    torch.manual_seed(999)
    np.random.seed(999)
    resumed = Trainer(cfg, state_dir=tmp_path / "b", resume=True).fit(resumed_task)
    assert resumed.epochs_run == 6
    for a, b in zip(straight.model.parameters(), resumed_task.model.parameters()):
        assert torch.equal(a, b)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight_run.history]


def test_resume_restores_early_stopping_state(tmp_path):
    curve = [1.0, 0.5, 0.6, 0.7, 0.8, 0.9]
    cfg = TrainConfig(epochs=6, lr=0.01, seed=0, device="cpu", checkpoint_every=1, patience=3)
    full = Trainer(cfg).fit(RegressionTask(val_curve=curve))
    task = RegressionTask(val_curve=curve)

    def crash(event):
        if event.kind == "epoch" and event.epoch == 3:
            raise _Crash
    with pytest.raises(_Crash):
        Trainer(cfg, state_dir=tmp_path).fit(task, callback=crash)
    again = RegressionTask(val_curve=curve)
    again.epochs_started = 3  # the val curve is indexed by epochs started, as in the crashed process
    resumed = Trainer(cfg, state_dir=tmp_path, resume=True).fit(again)
    assert resumed.stopped_early == full.stopped_early and resumed.best_epoch == full.best_epoch == 2
    assert resumed.epochs_run == full.epochs_run


def test_resume_refuses_other_settings(tmp_path):
    cfg = TrainConfig(epochs=3, lr=0.01, device="cpu", checkpoint_every=1)
    Trainer(cfg, state_dir=tmp_path).fit(RegressionTask())
    other = TrainConfig(epochs=3, lr=0.02, device="cpu", checkpoint_every=1)
    with pytest.raises(SpatialDataError, match="other settings"):
        Trainer(other, state_dir=tmp_path, resume=True).fit(RegressionTask())


def test_a_kill_between_the_tensors_and_the_json_leaves_the_last_state_whole(tmp_path, monkeypatch):
    """The kill -9 window of a save: epoch 3's tensors are on disk, its JSON (the commit point) is not.
    Resuming continues from epoch 2 and still ends exactly as the uninterrupted run."""
    import napari_spatialssl.training as training

    cfg = TrainConfig(epochs=5, lr=0.02, seed=4, device="cpu", checkpoint_every=1, patience=0)
    torch.manual_seed(0)
    straight = DropoutTask()
    straight_run = Trainer(cfg, state_dir=tmp_path / "a").fit(straight)

    real_write = training.atomic_write
    saves = []

    def dies_before_the_third_json(path, *args, **kwargs):
        if str(path).endswith(training.STATE_META):
            saves.append(path)
            if len(saves) == 3:
                raise _Crash
        return real_write(path, *args, **kwargs)
    monkeypatch.setattr(training, "atomic_write", dies_before_the_third_json)
    torch.manual_seed(0)
    with pytest.raises(_Crash):
        Trainer(cfg, state_dir=tmp_path / "b").fit(DropoutTask())
    monkeypatch.setattr(training, "atomic_write", real_write)
    assert len(list((tmp_path / "b").glob("training_state*.safetensors"))) == 2  # epoch 2's and epoch 3's

    torch.manual_seed(0)
    resumed_task = DropoutTask()
    resumed = Trainer(cfg, state_dir=tmp_path / "b", resume=True).fit(resumed_task)
    assert resumed.epochs_run == 5
    for a, b in zip(straight.model.parameters(), resumed_task.model.parameters()):
        assert torch.equal(a, b)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight_run.history]
    assert len(list((tmp_path / "b").glob("training_state*.safetensors"))) == 1  # the superseded ones removed
