"""Shared config machinery: one dataclass per method, saved as JSON beside every model.

Every method config inherits :class:`TrainConfig` (the Trainer's settings) and adds its own
fields; nested dataclasses (preprocessing, masking) are allowed. ``apply_overrides`` implements
the CLI's ``--set name=value`` (dotted names reach nested fields).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any

from .data.dataset import PreprocessConfig
from .data.io import SpatialDataError


@dataclass
class TrainConfig:
    """What the Trainer needs. Units: epochs are passes over the method's training batches."""

    epochs: int = 100
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | mps
    amp: bool = True  # mixed precision, only ever used on CUDA
    patience: int = 0  # early stopping on validation loss; 0 = off
    min_delta: float = 0.0
    grad_clip: float | None = 1.0
    log_every: int = 1  # steps between progress events


@dataclass
class DataConfig:
    """How a slide becomes a SpatialDataset (the same keys as the CLI flags)."""

    spatial_key: str = "spatial"
    coord_columns: list[str] | None = None
    section_key: str | None = "auto"
    label_key: str | None = None
    ignore_labels: list[str] = field(default_factory=list)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)


@dataclass
class EvalConfig:
    """Downstream evaluation settings shared by the methods (each uses what applies to it).

    train_sections / test_sections: section names for cell-type fine-tuning (held-out test
    sections are never seen in fine-tuning); empty = the method's default split.
    domain_key: obs column with reference spatial domains (for ARI / NMI); n_domains: K for
    k-means (None = chosen automatically).
    reconstruction: which cells keep their reconstructed expression in
    ``layers['<method>_reconstruction']``: "all", "masked" (the evaluation-masked cells only,
    stored as sparse rows; ``obs['<method>_reconstructed']`` marks them), "none", or "auto" = all
    while cells x model genes <= reconstruction_max_values (5e8, 2 GB of float32), else masked.
    A dense layer of the whole 4.3M x 550 atlas would be 9.5 GB.
    """

    train_sections: list[str] = field(default_factory=list)
    test_sections: list[str] = field(default_factory=list)
    domain_key: str | None = None
    n_domains: int | None = None
    reconstruction: str = "auto"
    reconstruction_max_values: int = 500_000_000

    def validate(self) -> None:
        if self.reconstruction is None:  # `--set eval.reconstruction=none` parses to None
            self.reconstruction = "none"
        if self.reconstruction not in RECONSTRUCTION_CHOICES:
            raise SpatialDataError(f"eval.reconstruction={self.reconstruction!r}: choose one of "
                                   f"{', '.join(RECONSTRUCTION_CHOICES)}.")

    def reconstruction_policy(self, n_cells: int, n_genes: int) -> str:
        """"all", "masked" or "none" for a slide of n_cells x n_genes (resolves "auto"), so that a
        method can skip computing reconstructions nobody keeps."""
        policy = "none" if self.reconstruction is None else self.reconstruction
        if policy == "auto":
            return "all" if n_cells * n_genes <= self.reconstruction_max_values else "masked"
        return policy


RECONSTRUCTION_CHOICES = ("auto", "all", "masked", "none")


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(cls, data: dict):
    """Build dataclass `cls` from a dict, recursing into nested dataclass fields; unknown keys refused."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise SpatialDataError(f"{cls.__name__}: unknown setting(s) {sorted(unknown)}; known: {sorted(names)}.")
    kwargs = {}
    for key, value in data.items():
        sub = _dataclass_type(hints.get(key))
        kwargs[key] = config_from_dict(sub, value) if sub is not None and isinstance(value, dict) else value
    return cls(**kwargs)


def _dataclass_type(tp):
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _coerce(text: str, current: Any, tp) -> Any:
    """Parse a --set value by the field's current value / annotation."""
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if isinstance(current, bool) or tp is bool:
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true/false, got {text!r}")
    if isinstance(current, int) or tp is int:
        return int(text)
    if isinstance(current, float) or tp is float:
        return float(text)
    if isinstance(current, (list, tuple)) or typing.get_origin(tp) in (list, tuple):
        body = text.strip()
        if body[:1] + body[-1:] in ("[]", "()"):  # "[512,64]" as well as "512,64"
            body = body[1:-1]
        items = [t.strip().strip("'\"") for t in body.split(",") if t.strip()]
        elem = (typing.get_args(tp) or (str,))[0]  # list[int] / list[float] get numbers
        return [elem(t) for t in items] if elem in (int, float) else items
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(cfg, overrides: list[str] | dict | None):
    """Apply ``name=value`` strings (or a dict) to a config in place; returns it."""
    if not overrides:
        return cfg
    items = overrides.items() if isinstance(overrides, dict) else [_split(o) for o in overrides]
    for name, value in items:
        target = cfg
        parts = name.split(".")
        for p in parts[:-1]:
            if not hasattr(target, p):
                raise SpatialDataError(f"--set {name}: {type(target).__name__} has no field {p!r}.")
            target = getattr(target, p)
        leaf = parts[-1]
        fields = {f.name: f for f in dataclasses.fields(target)}
        if leaf not in fields:
            raise SpatialDataError(
                f"--set {name}: unknown setting {leaf!r} for {type(target).__name__}; known: {sorted(fields)}."
            )
        tp = typing.get_type_hints(type(target)).get(leaf)
        tp = _strip_optional(tp)
        current = getattr(target, leaf)
        try:
            parsed = _coerce(value, current, tp) if isinstance(value, str) else value
        except ValueError as exc:
            raise SpatialDataError(f"--set {name}={value}: {exc}.") from exc
        setattr(target, leaf, parsed)
    return cfg


def _strip_optional(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        return args[0]
    return tp


def _split(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise SpatialDataError(f"--set {text!r}: expected name=value.")
    name, value = text.split("=", 1)
    return name.strip(), value
