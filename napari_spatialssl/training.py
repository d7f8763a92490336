"""The one Trainer every method uses, and its progress events.

A method (or a fine-tuning stage) is a :class:`TrainingTask`: it owns a ``model`` and says how to
batch and how to compute a loss. The Trainer does everything else: device choice, seeding, the
optimiser, mixed precision on CUDA, gradient clipping, early stopping, atomic checkpoints, a
stream of :class:`TrainEvent` that callers consume (the CLI's progress bar, the napari worker),
and a stop flag honoured at the next step.

Several devices (``dist``, a :class:`~napari_spatialssl.distributed.DistContext` with more than one
rank): every rank runs the same loop on the same global batches; a task that supports it
(``set_shard``) computes only its rank's share of each loss, and the Trainer sums gradients, loss
values and the stop flag over the ranks once per step (distributed.sync_step), so every rank takes
the optimiser step a single process would take on the global batch. Rank 0 alone writes
checkpoints and training state; the validation loss is rank 0's, broadcast, so early stopping
agrees everywhere. A stop asked on any rank ends the run on every rank after the current step.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import numpy as np
import torch

from . import checkpoints
from .config import TrainConfig, config_to_dict
from .data.io import SpatialDataError, atomic_write


class TrainingTask(Protocol):
    """What the Trainer trains. `training_loss` returns a dict of scalar tensors with a 'loss' key."""

    model: torch.nn.Module

    def train_batches(self, epoch: int, rng: np.random.Generator) -> Iterable[Any]: ...

    def training_loss(self, batch: Any, device: torch.device) -> dict[str, torch.Tensor]: ...

    def validation_loss(self, device: torch.device) -> float | None: ...

    def on_epoch_start(self, epoch: int, device: torch.device) -> None: ...

    # Optional: ``cpu_threads()`` -> int | None, intra-op CPU threads for this training (None = all),
    # for tasks whose steps are too small to share out (every op would wait for the slowest thread).
    # Optional, for several devices: ``set_shard(ctx)`` (ctx = DistContext, or None for one
    # process); afterwards `train_batches` yields the same global batches on every rank and
    # `training_loss` returns this rank's share of each value (the shares sum to the global loss).


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks cuda > mps > cpu; an explicit device that is absent is a clear error."""
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SpatialDataError("device 'cuda' requested but no CUDA GPU is available; use --device auto or cpu.")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise SpatialDataError("device 'mps' requested but MPS is not available; use --device auto or cpu.")
    return torch.device(name)


def seed_everything(seed: int) -> np.random.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def package_versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("napari-spatialssl", "torch", "torch-geometric", "numpy", "scipy", "anndata", "scanpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


@dataclass
class TrainEvent:
    """One progress report. kind: 'start', 'step', 'epoch', 'end' (a Trainer) or 'stage' (the pipeline).

    ``stage`` says which training the event belongs to: ``"pretraining"`` for the method's
    self-supervised run, another name (e.g. ``"downstream training 1"``) for a training the method
    runs while evaluating (fine-tuning a classifier head, say).
    """

    kind: str
    epoch: int
    n_epochs: int
    step: int = 0
    n_steps: int | None = None
    losses: dict = field(default_factory=dict)
    val_loss: float | None = None
    elapsed: float = 0.0
    message: str = ""
    stage: str = "pretraining"


@dataclass
class TrainResult:
    history: list[dict]
    epochs_run: int
    train_seconds: float
    device: str
    stopped_by_user: bool
    stopped_early: bool
    best_epoch: int | None
    checkpoint: str | None = None


STATE_WEIGHTS = "training_state.safetensors"  # states written before the tensors were named per epoch
STATE_META = "training_state.json"
STATE_FORMAT = "napari-spatialssl-training-state/1"


def _state_weights_name(epoch: int) -> str:
    """Each saved state's tensors get a file of their own: the one the committed JSON names is never
    overwritten, so a kill between writing the tensors and the JSON leaves the last state whole
    (the random token: a state saved twice at one epoch, at the end of training, gets a new file)."""
    import secrets

    return f"training_state-{int(epoch):06d}-{secrets.token_hex(4)}.safetensors"


class Trainer:
    """Trains any TrainingTask. ``run`` yields events; ``fit`` consumes them (optionally with a bar).

    ``state_dir``: where resumable training state is written (model, optimiser, random number
    generators, early-stopping state, history) every ``config.checkpoint_every`` epochs, whenever
    ``config.checkpoint_minutes`` have passed since the last one, and when training ends;
    ``resume=True`` continues from the state found there, so that a run killed mid-training ends
    exactly as an uninterrupted run with the same seed would (same batches, same dropout draws).
    """

    def __init__(self, config: TrainConfig, *, checkpoint_path: str | os.PathLike | None = None,
                 checkpoint_extra: Callable[[], dict] | None = None, stage: str = "pretraining",
                 listener: Callable[[TrainEvent], None] | None = None,
                 state_dir: str | os.PathLike | None = None, resume: bool = False, dist=None):
        self.config = config
        self.stage = stage
        # Called with every event of every run, whoever consumes the run (used by the pipeline to
        # report trainings that a method starts inside `evaluate`).
        self.listener = listener
        # several processes (distributed.DistContext); None or a single rank = this process alone
        self.dist = dist if dist is not None and dist.world_size > 1 else None
        self.device = resolve_device(config.device)
        if self.dist is not None:
            from .distributed import rank_device

            self.device = rank_device(self.device, self.dist)
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.checkpoint_extra = checkpoint_extra
        self.state_dir = Path(state_dir) if state_dir else None
        self.resume = resume
        self._stop = threading.Event()
        self.result: TrainResult | None = None

    def stop(self) -> None:
        """Ask training to stop; honoured before the next step (with several ranks: after the
        current step, on every rank). The model keeps what it learned."""
        self._stop.set()

    @property
    def is_main(self) -> bool:
        """True for the process that writes files and reports (rank 0, or the only process)."""
        return self.dist is None or self.dist.is_main

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def _autocast(self):
        if self.device.type == "cuda" and self.config.amp:
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.autocast(device_type="cuda", dtype=dtype)
        return torch.autocast(device_type="cpu", enabled=False)

    def run(self, task: TrainingTask) -> Iterator[TrainEvent]:
        """Train `task`, yielding progress events; sets ``self.result`` at the end.

        Every event carries this Trainer's ``stage`` and is also passed to ``listener`` if set.
        """
        for event in self._events(task):
            event.stage = self.stage
            if self.listener is not None:
                self.listener(event)
            yield event

    def _events(self, task: TrainingTask) -> Iterator[TrainEvent]:
        """The training loop behind :meth:`run`.

        A stop requested before the run starts is honoured (no epoch runs); the flag is cleared
        when the run ends, so the Trainer can be reused.
        """
        threads = task.cpu_threads() if self.device.type == "cpu" and hasattr(task, "cpu_threads") else None
        prev_threads = torch.get_num_threads()
        if threads:
            torch.set_num_threads(int(threads))
        try:
            yield from self._loop(task)
        finally:
            torch.set_num_threads(prev_threads)

    def _loop(self, task: TrainingTask) -> Iterator[TrainEvent]:
        cfg = self.config
        dist = self.dist
        rng = seed_everything(cfg.seed)
        model = task.model.to(self.device)
        if hasattr(task, "set_shard"):
            task.set_shard(dist)
        elif dist is not None:
            raise SpatialDataError(f"{getattr(task, 'name', type(task).__name__)} cannot train on several devices "
                                   "(it has no set_shard); train it with --devices 1.")
        if dist is not None:
            from . import distributed

            distributed.broadcast_module(model, dist)
        params = [p for p in model.parameters() if p.requires_grad]
        # foreach: each update is a few ops over all parameters instead of ~10 per parameter (on a
        # busy CPU every op costs a thread synchronisation)
        optimiser = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
        use_scaler = self.device.type == "cuda" and cfg.amp and not torch.cuda.is_bf16_supported()
        scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        loop = _LoopState()
        resumed = self._load_state(model, optimiser, scaler, rng, loop) if self.resume else None
        if dist is not None and self.resume and \
                distributed.agree(dist.broadcast_object(loop.epoch) != loop.epoch, dist):
            raise SpatialDataError(f"--resume with {dist.world_size} processes: not every process found the "
                                   f"training state in {self.state_dir}; put the run folder on a file system "
                                   "every machine sees, or resume with --devices 1.")
        t0 = time.perf_counter() - loop.elapsed
        last_save = time.perf_counter()
        start = f"training on {self.device}" + (f" ({dist.world_size} processes, {dist.backend})" if dist else "")
        if resumed is not None:
            start += f", resumed after epoch {loop.epoch} of {cfg.epochs}"
        yield TrainEvent("start", loop.epoch, cfg.epochs, message=start)
        epoch = loop.epoch
        for epoch in range(loop.epoch + 1, cfg.epochs + 1):
            stop = self._stop.is_set() if dist is None else distributed.agree(self._stop.is_set(), dist)
            if loop.finished or stop:
                if stop:
                    self._stop.set()
                epoch -= 1
                break
            t_epoch = time.perf_counter()
            model.train()
            task.on_epoch_start(epoch, self.device)
            batches = task.train_batches(epoch, rng)  # may be a lazy generator
            n_steps = len(batches) if hasattr(batches, "__len__") else None
            sums: dict[str, float] = {}
            n_done = 0
            for step, batch in enumerate(batches, start=1):
                if dist is None and self._stop.is_set():
                    break
                optimiser.zero_grad(set_to_none=True)
                with self._autocast():
                    losses = task.training_loss(batch, self.device)
                loss = losses["loss"]
                if dist is None:
                    values = {k: float(v.detach()) for k, v in losses.items()}
                    _check_finite(values["loss"], epoch, step, cfg.lr)
                (scaler.scale(loss) if scaler is not None else loss).backward()
                stop_after_step = False
                if dist is not None:
                    # one all-reduce: the gradients, every loss value and the stop flag
                    keys = list(losses)
                    summed, stop_after_step = distributed.sync_step(params, [losses[k] for k in keys],
                                                                    self._stop.is_set(), dist)
                    values = dict(zip(keys, summed))
                    _check_finite(values["loss"], epoch, step, cfg.lr)
                if scaler is not None:
                    scaler.unscale_(optimiser)
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                if scaler is not None:
                    scaler.step(optimiser)
                    scaler.update()
                else:
                    optimiser.step()
                n_done += 1
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + v
                if step % max(cfg.log_every, 1) == 0:
                    yield TrainEvent("step", epoch, cfg.epochs, step, n_steps, dict(values),
                                     elapsed=time.perf_counter() - t0)
                if stop_after_step:
                    self._stop.set()
                    break
            if n_done == 0:
                epoch -= 1
                break
            partial = self._stop.is_set()  # stopped inside the epoch: no resumable state from it
            means = {k: v / n_done for k, v in sums.items()}
            model.eval()
            with torch.no_grad(), self._autocast():
                val = task.validation_loss(self.device)
            if dist is not None:  # rank 0's value everywhere: early stopping decides alike on every rank
                val = distributed.broadcast_float(val, dist)
            record = {"epoch": epoch, **means, "val_loss": val, "elapsed": time.perf_counter() - t0,
                      "epoch_seconds": time.perf_counter() - t_epoch, "steps": n_done}
            loop.history.append(record)
            loop.epoch = epoch
            yield TrainEvent("epoch", epoch, cfg.epochs, n_done, n_steps, means, val, time.perf_counter() - t0)
            if val is not None and cfg.patience > 0:
                if val < loop.best_val - cfg.min_delta:
                    loop.best_val, loop.best_epoch, loop.bad_epochs = val, epoch, 0
                    loop.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                else:
                    loop.bad_epochs += 1
                    if loop.bad_epochs >= cfg.patience:
                        loop.stopped_early = True
                        break
            if self._stop.is_set():
                break
            due = (cfg.checkpoint_every > 0 and epoch % cfg.checkpoint_every == 0) or \
                (time.perf_counter() - last_save >= 60.0 * cfg.checkpoint_minutes)
            if self.state_dir is not None and due and not partial and epoch < cfg.epochs and self.is_main:
                loop.elapsed = time.perf_counter() - t0
                self._save_state(model, optimiser, scaler, rng, loop)
                last_save = time.perf_counter()
        if loop.best_state is not None and not loop.finished:
            model.load_state_dict(loop.best_state)
        model.eval()
        stopped_by_user = self._stop.is_set()
        seconds = time.perf_counter() - t0
        if self.state_dir is not None and not stopped_by_user and not loop.finished and self.is_main:
            # the end of training is a resume point too: a run killed while evaluating restarts here
            loop.finished, loop.elapsed = True, seconds
            self._save_state(model, optimiser, scaler, rng, loop)
        ckpt = None
        if self.checkpoint_path is not None and self.is_main:
            ckpt = str(self.save_checkpoint(task, loop.history))
        self._stop.clear()
        history = loop.history
        self.result = TrainResult(history, len(history), seconds, str(self.device), stopped_by_user,
                                  loop.stopped_early, loop.best_epoch, ckpt)
        msg = "stopped by user" if stopped_by_user else ("stopped early" if loop.stopped_early else "done")
        yield TrainEvent("end", len(history), cfg.epochs, losses=history[-1] if history else {},
                         elapsed=seconds, message=msg)

    # -- resumable state -------------------------------------------------------------------
    def _save_state(self, model, optimiser, scaler, rng: np.random.Generator, loop: "_LoopState") -> None:
        """Everything the loop needs to continue exactly: tensors in safetensors, the rest in JSON
        (written last, with the tensors' hash: the JSON file is the commit point)."""
        assert self.state_dir is not None
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        if loop.best_state is not None:
            tensors.update({f"best.{k}": v for k, v in loop.best_state.items()})
        opt = optimiser.state_dict()
        opt_meta = {"param_groups": opt["param_groups"], "state": {}}
        for idx, st in opt["state"].items():
            opt_meta["state"][str(idx)] = {}
            for name, value in st.items():
                if torch.is_tensor(value):
                    tensors[f"optim.{idx}.{name}"] = value
                else:
                    opt_meta["state"][str(idx)][name] = value
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available() and self.device.type == "cuda":
            for i, st in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = st
        np_state = np.random.get_state()
        tensors["rng.numpy_global"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))
        weights = checkpoints.save_tensors(self.state_dir / _state_weights_name(loop.epoch), tensors)
        meta = {
            "format": STATE_FORMAT,
            "config": config_to_dict(self.config),
            "epoch": loop.epoch, "finished": loop.finished, "elapsed": loop.elapsed,
            "history": loop.history, "best_val": None if not np.isfinite(loop.best_val) else loop.best_val,
            "best_epoch": loop.best_epoch, "bad_epochs": loop.bad_epochs, "stopped_early": loop.stopped_early,
            "has_best_state": loop.best_state is not None,
            "optimiser": opt_meta,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": {"generator": rng.bit_generator.state, "python": _python_rng_state(),
                    "numpy_global": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])]},
            "weights_file": weights.name,
            "weights_sha256": checkpoints.sha256_file(weights),
        }
        atomic_write(self.state_dir / STATE_META, lambda p: p.write_text(json.dumps(checkpoints.to_jsonable(meta))),
                     overwrite=True)
        # only now is the previous state no longer the committed one
        for old in self.state_dir.glob("training_state*.safetensors"):
            if old.name != weights.name:
                old.unlink(missing_ok=True)

    def _load_state(self, model, optimiser, scaler, rng: np.random.Generator, loop: "_LoopState") -> dict | None:
        """Restore the state written by `_save_state`; None when there is none yet (start afresh)."""
        if self.state_dir is None or not (self.state_dir / STATE_META).is_file():
            return None
        path = self.state_dir / STATE_META
        try:
            meta = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise checkpoints.ModelFileError(f"{path}: damaged training state ({exc}); start the run again "
                                             "without --resume.") from exc
        if meta.get("format") != STATE_FORMAT:
            raise checkpoints.ModelFileError(f"{path}: not a napari-spatialssl training state.")
        if meta.get("config") != checkpoints.to_jsonable(config_to_dict(self.config)):
            raise SpatialDataError(f"{path}: the interrupted run was started with other settings; resume it "
                                   "with the settings it was started with (the CLI reads them itself).")
        name = meta.get("weights_file", STATE_WEIGHTS)
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
            raise checkpoints.ModelFileError(f"{path}: damaged training state (weights_file {name!r}); start the "
                                             "run again without --resume.")
        weights = self.state_dir / name
        if not weights.is_file() or checkpoints.sha256_file(weights) != meta.get("weights_sha256"):
            raise checkpoints.ModelFileError(f"{weights}: missing or does not match {STATE_META}; start the "
                                             "run again without --resume.")
        tensors = checkpoints.load_tensors(weights, "training state")
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        if meta.get("has_best_state"):
            loop.best_state = {k[5:]: v.to(self.device) for k, v in tensors.items() if k.startswith("best.")}
        opt_meta = meta["optimiser"]
        state = {}
        for idx, extra in opt_meta["state"].items():
            entry = dict(extra)
            prefix = f"optim.{idx}."
            entry.update({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            state[int(idx)] = entry
        optimiser.load_state_dict({"state": state, "param_groups": opt_meta["param_groups"]})
        if scaler is not None and meta.get("scaler"):
            scaler.load_state_dict(meta["scaler"])
        r = meta["rng"]
        rng.bit_generator.state = r["generator"]
        random.setstate(_tuple_state(r["python"]))
        name, pos, has_gauss, cached = r["numpy_global"]
        np.random.set_state((name, tensors["rng.numpy_global"].numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(tensors["rng.torch"])
        cuda = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng.cuda."))]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
        loop.epoch, loop.finished, loop.elapsed = int(meta["epoch"]), bool(meta["finished"]), float(meta["elapsed"])
        loop.history = list(meta["history"])
        loop.best_val = np.inf if meta.get("best_val") is None else float(meta["best_val"])
        loop.best_epoch, loop.bad_epochs = meta.get("best_epoch"), int(meta.get("bad_epochs", 0))
        loop.stopped_early = bool(meta.get("stopped_early"))
        return meta

    def fit(self, task: TrainingTask, callback: Callable[[TrainEvent], None] | None = None,
            progress: bool = False, desc: str = "training") -> TrainResult:
        """Run to the end; `callback` sees every event; `progress` shows a terminal bar."""
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.config.epochs, desc=desc, unit="epoch", leave=True)
        for event in self.run(task):
            if callback is not None:
                callback(event)
            if bar is not None and event.kind == "epoch":
                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in event.losses.items()})
        if bar is not None:
            bar.close()
        assert self.result is not None
        return self.result

    def save_checkpoint(self, task: TrainingTask, history: list[dict] | None = None,
                        path: str | os.PathLike | None = None) -> Path:
        """The trained model (model.safetensors + model.json: config, versions, history, the task's
        extra state) in folder `path` (default ``checkpoint_path``), each file atomically."""
        target = Path(path) if path else self.checkpoint_path
        if target is None:
            raise ValueError("no checkpoint path given")
        extra = self.checkpoint_extra() if self.checkpoint_extra else \
            (task.extra_state() if hasattr(task, "extra_state") else {})
        save_model(target, task, getattr(task, "config", self.config), history, extra=extra)
        return target


def _check_finite(loss: float, epoch: int, step: int, lr: float) -> None:
    if not np.isfinite(loss):
        raise FloatingPointError(
            f"loss became {loss} at epoch {epoch}, step {step}; lower the learning rate "
            f"(now {lr}) or check the input for extreme values."
        )


@dataclass
class _LoopState:
    """What the training loop carries from epoch to epoch (and what a resume restores)."""

    epoch: int = 0
    history: list = field(default_factory=list)
    best_val: float = np.inf
    best_epoch: int | None = None
    best_state: dict | None = None
    bad_epochs: int = 0
    stopped_early: bool = False
    finished: bool = False
    elapsed: float = 0.0


def _python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _tuple_state(state: list) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def save_model(folder: str | os.PathLike, task, config, history: list[dict] | None = None, *,
               extra: dict | None = None) -> Path:
    """Write a trained method (or any task with a ``model``) as safe model files into `folder`:
    no Trainer needed (the widget's Save model, the pipeline's run folder)."""
    extra = extra if extra is not None else (task.extra_state() if hasattr(task, "extra_state") else {})
    checkpoints.write_model(folder, method=getattr(task, "name", type(task).__name__),
                            config=config_to_dict(config), state_dict=task.model.state_dict(),
                            extra=extra, history=history, versions=package_versions())
    return Path(folder)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read model files written by :func:`save_model` (or a legacy model.pt, safely): a dict with
    format, method, config, state_dict (CPU tensors), versions, history, extra, legacy."""
    return checkpoints.read_model(path)
