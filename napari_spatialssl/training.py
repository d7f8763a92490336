"""The one Trainer every method uses, and its progress events.

A method (or a fine-tuning stage) is a :class:`TrainingTask`: it owns a ``model`` and says how to
batch and how to compute a loss. The Trainer does everything else: device choice, seeding, the
optimiser, mixed precision on CUDA, gradient clipping, early stopping, atomic checkpoints, a
stream of :class:`TrainEvent` that callers consume (the CLI's progress bar, the napari worker),
and a stop flag honoured at the next step.
"""

from __future__ import annotations

import os
import random
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import numpy as np
import torch

from .config import TrainConfig, config_to_dict
from .data.io import SpatialDataError


class TrainingTask(Protocol):
    """What the Trainer trains. `training_loss` returns a dict of scalar tensors with a 'loss' key."""

    model: torch.nn.Module

    def train_batches(self, epoch: int, rng: np.random.Generator) -> Iterable[Any]: ...

    def training_loss(self, batch: Any, device: torch.device) -> dict[str, torch.Tensor]: ...

    def validation_loss(self, device: torch.device) -> float | None: ...

    def on_epoch_start(self, epoch: int, device: torch.device) -> None: ...


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


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save to a temporary file in the same folder, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


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


class Trainer:
    """Trains any TrainingTask. ``run`` yields events; ``fit`` consumes them (optionally with a bar)."""

    def __init__(self, config: TrainConfig, *, checkpoint_path: str | os.PathLike | None = None,
                 checkpoint_extra: Callable[[], dict] | None = None, stage: str = "pretraining",
                 listener: Callable[[TrainEvent], None] | None = None):
        self.config = config
        self.stage = stage
        # Called with every event of every run, whoever consumes the run (used by the pipeline to
        # report trainings that a method starts inside `evaluate`).
        self.listener = listener
        self.device = resolve_device(config.device)
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.checkpoint_extra = checkpoint_extra
        self._stop = threading.Event()
        self.result: TrainResult | None = None

    def stop(self) -> None:
        """Ask training to stop; honoured before the next step. The model keeps what it learned."""
        self._stop.set()

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
        cfg = self.config
        rng = seed_everything(cfg.seed)
        model = task.model.to(self.device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimiser = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        use_scaler = self.device.type == "cuda" and cfg.amp and not torch.cuda.is_bf16_supported()
        scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        history: list[dict] = []
        best_val, best_epoch, best_state, bad_epochs = np.inf, None, None, 0
        stopped_early = False
        t0 = time.perf_counter()
        yield TrainEvent("start", 0, cfg.epochs, message=f"training on {self.device}")
        epoch = 0
        for epoch in range(1, cfg.epochs + 1):
            if self._stop.is_set():
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
                if self._stop.is_set():
                    break
                optimiser.zero_grad(set_to_none=True)
                with self._autocast():
                    losses = task.training_loss(batch, self.device)
                loss = losses["loss"]
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"loss became {loss.item()} at epoch {epoch}, step {step}; lower the learning rate "
                        f"(now {cfg.lr}) or check the input for extreme values."
                    )
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimiser)
                else:
                    loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                if scaler is not None:
                    scaler.step(optimiser)
                    scaler.update()
                else:
                    optimiser.step()
                n_done += 1
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                if step % max(cfg.log_every, 1) == 0:
                    yield TrainEvent("step", epoch, cfg.epochs, step, n_steps,
                                     {k: float(v.detach()) for k, v in losses.items()},
                                     elapsed=time.perf_counter() - t0)
            if n_done == 0:
                epoch -= 1
                break
            means = {k: v / n_done for k, v in sums.items()}
            model.eval()
            with torch.no_grad(), self._autocast():
                val = task.validation_loss(self.device)
            record = {"epoch": epoch, **means, "val_loss": val, "elapsed": time.perf_counter() - t0,
                      "epoch_seconds": time.perf_counter() - t_epoch, "steps": n_done}
            history.append(record)
            yield TrainEvent("epoch", epoch, cfg.epochs, n_done, n_steps, means, val, time.perf_counter() - t0)
            if val is not None and cfg.patience > 0:
                if val < best_val - cfg.min_delta:
                    best_val, best_epoch, bad_epochs = val, epoch, 0
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                else:
                    bad_epochs += 1
                    if bad_epochs >= cfg.patience:
                        stopped_early = True
                        break
            if self._stop.is_set():
                break
        if best_state is not None:
            model.load_state_dict(best_state)
        model.eval()
        seconds = time.perf_counter() - t0
        ckpt = None
        if self.checkpoint_path is not None:
            ckpt = str(self.save_checkpoint(task, history))
        stopped_by_user = self._stop.is_set()
        self._stop.clear()
        self.result = TrainResult(history, len(history), seconds, str(self.device), stopped_by_user,
                                  stopped_early, best_epoch, ckpt)
        msg = "stopped by user" if stopped_by_user else ("stopped early" if stopped_early else "done")
        yield TrainEvent("end", len(history), cfg.epochs, losses=history[-1] if history else {},
                         elapsed=seconds, message=msg)

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
        """Weights + the full config + package versions (+ the task's extra state), atomically."""
        target = Path(path) if path else self.checkpoint_path
        if target is None:
            raise ValueError("no checkpoint path given")
        method_cfg = getattr(task, "config", self.config)
        payload = {
            "format": "napari-spatialssl/1",
            "method": getattr(task, "name", type(task).__name__),
            "config": config_to_dict(method_cfg),
            "state_dict": {k: v.detach().cpu() for k, v in task.model.state_dict().items()},
            "versions": package_versions(),
            "history": history or [],
            "extra": self.checkpoint_extra() if self.checkpoint_extra else
            (task.extra_state() if hasattr(task, "extra_state") else {}),
        }
        return atomic_torch_save(payload, target)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by Trainer.save_checkpoint (CPU tensors)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no checkpoint here; pass the folder written by 'fit' or its model.pt.")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != "napari-spatialssl/1":
        raise ValueError(f"{path}: not a napari-spatialssl checkpoint.")
    return payload
