"""Training progress in words, from the Trainer's events (Qt-free).

Every stage is named with its own epoch count: pretraining, then each training a method runs while
evaluating (gnn-mask fine-tunes cell-type heads), then evaluation. The remaining time of a stage is
estimated from its own epochs so far; a run's stages are listed up front when the method says
how many it will train (:func:`planned_stages`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Progress:
    """What the Train panel shows: a line of text, the stage's fraction done, loss points."""

    text: str
    fraction: float | None = None  # of the current stage, 0..1 (None: indeterminate)
    stage: str = ""
    step_loss: float | None = None
    epoch_loss: float | None = None
    val_loss: float | None = None
    done: bool = False


@dataclass
class ProgressTracker:
    """Turns TrainEvents into :class:`Progress`, keeping per-stage timing for the time estimate."""

    stage_started: dict = field(default_factory=dict)
    stages_seen: list = field(default_factory=list)

    def update(self, event) -> Progress | None:
        kind, stage = event.kind, getattr(event, "stage", "pretraining")
        if kind == "warning":
            return Progress(f"warning: {event.message}", None, stage)
        if kind == "stage":
            return Progress(_stage_text(event.message), None, stage)
        if kind == "start":
            self.stage_started[stage] = (time.perf_counter(), event.epoch)
            if stage not in self.stages_seen:
                self.stages_seen.append(stage)
            return Progress(f"{stage}: {event.message}", 0.0, stage)
        n = max(int(event.n_epochs), 1)
        if kind == "step":
            frac = (event.epoch - 1 + (event.step / event.n_steps if event.n_steps else 0.5)) / n
            loss = event.losses.get("loss")
            text = (f"{stage}: epoch {event.epoch} of {n}, step {event.step}"
                    + (f" of {event.n_steps}" if event.n_steps else "")
                    + (f", loss {loss:.4g}" if loss is not None else "") + self._eta(stage, frac))
            return Progress(text, min(frac, 1.0), stage, step_loss=loss if stage == "pretraining" else None)
        if kind == "epoch":
            frac = event.epoch / n
            loss = event.losses.get("loss")
            val = f", validation {event.val_loss:.4g}" if event.val_loss is not None else ""
            text = (f"{stage}: epoch {event.epoch} of {n}"
                    + (f", loss {loss:.4g}" if loss is not None else "") + val + self._eta(stage, frac))
            pre = stage == "pretraining"
            return Progress(text, min(frac, 1.0), stage, epoch_loss=loss if pre else None,
                            val_loss=event.val_loss if pre else None)
        if kind == "end":
            return Progress(f"{stage}: {event.message} after {event.epoch} of {event.n_epochs} epoch(s) "
                            f"({event.elapsed:.1f} s)", 1.0, stage)
        return None

    def _eta(self, stage: str, frac: float) -> str:
        start = self.stage_started.get(stage)
        if start is None or frac <= 0.02:
            return ""
        spent = time.perf_counter() - start[0]
        left = spent * (1.0 - frac) / frac
        return f", about {_duration(left)} left"


def _stage_text(message: str) -> str:
    return {"evaluating": "evaluating the trained model (embeddings, domains, metrics)…",
            "writing the run folder": "writing the run folder…"}.get(message, message)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{max(seconds, 1):.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def planned_stages(config) -> list[str]:
    """The trainings a run of this config will do, in words with their epoch counts (the Train panel
    shows them before Train is pressed)."""
    out = [f"pretraining: {config.epochs} epoch(s)"]
    ft = getattr(config, "finetune", None)
    label_key = getattr(getattr(config, "data", None), "label_key", None)
    if ft is not None and label_key:
        runs = 2 + (1 if ft.refit else 0)  # pretrained and random-init heads, then the refit
        out.append(f"cell-type fine-tuning on '{label_key}': up to {ft.epochs} epoch(s) x {runs} trainings "
                   f"(pretrained encoder, random-init baseline{', refit on all labels' if ft.refit else ''})")
    return out


def finished_text(output) -> str:
    """The status line after a run: every stage with the epochs it ran."""
    tr = output.train_result
    if tr is None:
        secs = output.metrics.get("predict_seconds", 0.0)
        return f"{output.method.name}: saved model applied in {secs:.1f} s on {output.metrics.get('device', '?')}."
    how = "stopped by you" if tr.stopped_by_user else ("stopped early" if tr.stopped_early else "done")
    text = (f"{output.method.name}: pretraining {how} after {tr.epochs_run} epoch(s) in {tr.train_seconds:.1f} s on "
            f"{output.metrics.get('device', '?')}")
    ct = output.metrics.get("cell_type") or {}
    if "finetune" in ct and isinstance(ct["finetune"], dict) and "epochs_run" in ct["finetune"]:
        text += f"; fine-tuning ran {ct['finetune']['epochs_run']} epoch(s)"
    return text + "."
