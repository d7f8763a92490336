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
    # resumable training state (fit --resume): every this many epochs, and whenever this many
    # minutes have passed since the last save; 0 = off for that rule
    checkpoint_every: int = 10
    checkpoint_minutes: float = 5.0
    # training memory budget in GB (None = 90 % of the memory available when training starts:
    # the GPU's free memory on CUDA, else the machine's); a run estimated above it is refused
    # before training, with a setting that fits
    max_memory_gb: float | None = None

    FIELD_DOCS = {
        "epochs": "Passes over the training batches (pretraining).",
        "lr": "Learning rate of the AdamW optimiser.",
        "weight_decay": "AdamW weight decay (shrinks the weights a little at every step).",
        "seed": "Seed of every random draw (masks, batches, initial weights): the same seed gives the same result.",
        "device": "Where to train: auto (a GPU when there is one), cpu, cuda or mps.",
        "amp": "Mixed precision on a CUDA GPU (faster, less memory).",
        "patience": "Stop early after this many epochs without a better validation loss (0 = never).",
        "min_delta": "The smallest validation-loss improvement that counts for early stopping.",
        "grad_clip": "Clip the gradient norm at this value (empty = no clipping).",
        "log_every": "Steps between progress reports.",
        "checkpoint_every": "Save resumable training state every this many epochs (0 = only by time).",
        "checkpoint_minutes": "Also save resumable training state when this many minutes have passed.",
        "max_memory_gb": "Training memory budget in GB (empty = 90% of what is free when training starts).",
    }


@dataclass
class DataConfig:
    """How a slide becomes a SpatialDataset (the same keys as the CLI flags)."""

    spatial_key: str = "spatial"
    coord_columns: list[str] | None = None
    section_key: str | None = "auto"
    label_key: str | None = None
    ignore_labels: list[str] = field(default_factory=list)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    # graph methods: "auto" trains on a spatial graph the user built with squidpy
    # (obsp['spatial_connectivities']) when the slide has one; "build" always builds the method's own
    graph: str = "auto"

    FIELD_DOCS = {
        "spatial_key": "obsm key of the cells' (x, y) coordinates.",
        "coord_columns": "Two obs columns holding x and y, instead of obsm.",
        "section_key": "obs column naming each cell's section (auto = detect; empty = one section).",
        "label_key": "obs column of cell types (for fine-tuning, probes and scores).",
        "ignore_labels": "Label values that mean 'unlabelled', beside NaN, empty, Excluded, Ambiguous, unknown.",
        "graph": "auto: train on a spatial graph the slide already has (squidpy's obsp['spatial_connectivities']); "
                 "build: always build the method's own.",
    }

    def validate(self) -> None:
        if self.graph not in ("auto", "build"):
            raise SpatialDataError(f"data.graph={self.graph!r}: choose 'auto' (use a squidpy graph when present) "
                                   "or 'build'.")


@dataclass
class EvalConfig:
    """Downstream evaluation settings shared by the methods (each uses what applies to it).

    train_sections / test_sections: section names for cell-type fine-tuning (held-out test
    sections are never seen in fine-tuning); empty = the method's default split.
    domain_key: obs column with reference spatial domains (for ARI / NMI); n_domains: K (None =
    chosen automatically); domain_method: how domains are clustered from the embeddings
    (evaluation.domains.cluster_domains: "auto" = k-means when K is given, else a Leiden resolution
    search; "kmeans", "leiden", or "gmm" = the mclust protocol), the same for every method.
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
    domain_method: str = "auto"  # auto (k-means with K, else Leiden search) | kmeans | leiden | gmm
    reconstruction: str = "auto"
    reconstruction_max_values: int = 500_000_000

    FIELD_DOCS = {
        "train_sections": "Sections used for cell-type fine-tuning (empty = all but the last).",
        "test_sections": "Held-out sections the fine-tuned model is scored on (never seen in fine-tuning).",
        "domain_key": "obs column of reference spatial domains, to score the domains against (ARI / NMI).",
        "n_domains": "Number of spatial domains K (empty = chosen automatically by a Leiden resolution search).",
        "domain_method": "How domains are clustered from the embeddings: auto (k-means with K, else Leiden), "
                         "kmeans, leiden, or gmm (the mclust protocol of published methods).",
        "reconstruction": "Which cells keep their reconstructed expression: all, masked (sparse), none, or auto "
                          "(all unless the slide is very large).",
        "reconstruction_max_values": "auto keeps every cell's reconstruction up to this many cell x gene values.",
    }

    def validate(self) -> None:
        from .evaluation.domains import DOMAIN_METHODS

        if self.domain_method not in DOMAIN_METHODS:
            raise SpatialDataError(f"eval.domain_method={self.domain_method!r}: choose one of "
                                   f"{', '.join(DOMAIN_METHODS)}.")
        if self.domain_method == "kmeans" and self.n_domains is None:
            raise SpatialDataError("eval.domain_method='kmeans' needs K: set eval.n_domains (CLI --n-domains K).")
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
    """Build dataclass `cls` from a dict, recursing into nested dataclass fields; unknown keys refused.

    Settings renamed since a config was saved (a class's ``RENAMED_FIELDS``: old name -> dotted new
    name) are moved to their new place first, so older model folders still load."""
    if not isinstance(data, dict):
        raise SpatialDataError(f"{cls.__name__}: expected a table of settings, got {type(data).__name__}.")
    data = dict(data)
    for old, new in getattr(cls, "RENAMED_FIELDS", {}).items():
        if old in data:
            value = data.pop(old)
            head, _, leaf = new.rpartition(".")
            if head:
                data[head] = {**data.get(head, {}), leaf: value}
            else:
                data[leaf] = value
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


def _coerce(text: str, current: Any, tp, optional: bool = True) -> Any:
    """Parse a --set value by the field's current value / annotation ('none' is None only where
    the setting may be None; a text setting keeps the word)."""
    low = text.strip().lower()
    if low in ("none", "null") and (optional or tp is not str):
        return None
    if tp is str:
        return text.strip()
    if isinstance(current, bool) or tp is bool:
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true/false, got {text!r}")
    if isinstance(current, int) or tp is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"expected a whole number, got {text!r}") from None
    if isinstance(current, float) or tp is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
    if isinstance(current, (list, tuple)) or typing.get_origin(tp) in (list, tuple):
        body = text.strip()
        if body[:1] + body[-1:] in ("[]", "()"):  # "[512,64]" as well as "512,64"
            body = body[1:-1]
        items = [t.strip().strip("'\"") for t in body.split(",") if t.strip()]
        elem = (typing.get_args(tp) or (str,))[0]  # list[int] / list[float] get numbers
        try:
            return [elem(t) for t in items] if elem in (int, float) else items
        except ValueError:
            raise ValueError(f"expected a list of {'whole numbers' if elem is int else 'numbers'}, "
                             f"got {text!r}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(cfg, overrides: list[str] | dict | None, *, parse_text: bool = True):
    """Apply ``name=value`` strings (or a dict) to a config in place; returns it.

    Text values are parsed as the CLI's ``--set`` does (``"16,8"`` -> [16, 8]) unless
    `parse_text` is False (Python keyword arguments: a value is taken as it is, then validated)."""
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
        renamed = getattr(type(target), "RENAMED_FIELDS", {}).get(leaf)
        if leaf not in fields and renamed:  # a setting that moved (e.g. domain_method -> eval.domain_method)
            apply_overrides(target, {renamed: value}, parse_text=parse_text)
            continue
        if leaf not in fields:
            raise SpatialDataError(
                f"--set {name}: unknown setting {leaf!r} for {type(target).__name__}; known: {sorted(fields)}."
            )
        raw_tp = typing.get_type_hints(type(target)).get(leaf)
        tp = _strip_optional(raw_tp)
        optional = type(None) in typing.get_args(raw_tp)
        current = getattr(target, leaf)
        try:
            parsed = _coerce(value, current, tp, optional) if isinstance(value, str) and parse_text else value
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


# -- validation: every setting is checked when a config is made, before any data is read ---------

@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric setting (for lists: of each element)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # True: lo itself is not allowed
    hi_open: bool = False

    def check(self, value) -> str | None:
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            return f"must be {'>' if self.lo_open else '>='} {self.lo:g}"
        if self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi)):
            return f"must be {'<' if self.hi_open else '<='} {self.hi:g}"
        return None


_POSITIVE = Range(0, lo_open=True)
_NON_NEGATIVE = Range(0)
_AT_LEAST_1 = Range(1)
_FRACTION = Range(0, 1)

# The allowed range of every numeric setting, by field name (the same name means the same kind of
# quantity in every config). A numeric field missing here is a bug caught by the tests.
FIELD_RANGES: dict[str, Range] = {
    # Trainer
    "epochs": _AT_LEAST_1, "lr": _POSITIVE, "weight_decay": _NON_NEGATIVE, "seed": _NON_NEGATIVE,
    "patience": _NON_NEGATIVE, "min_delta": _NON_NEGATIVE, "grad_clip": _POSITIVE, "log_every": _AT_LEAST_1,
    "checkpoint_every": _NON_NEGATIVE, "checkpoint_minutes": _NON_NEGATIVE, "max_memory_gb": _POSITIVE,
    # data / preprocessing / evaluation
    "target_sum": _POSITIVE, "n_top_genes": _AT_LEAST_1, "max_value": _POSITIVE, "n_domains": Range(2),
    "reconstruction_max_values": _NON_NEGATIVE,
    # masks
    "ratio": _FRACTION, "niche_hops": _NON_NEGATIVE, "region_size": _AT_LEAST_1, "n_regions": _AT_LEAST_1,
    # graphs and views
    "radius": _POSITIVE, "radius_factor": _POSITIVE, "k_neighbors": _AT_LEAST_1, "target_degree": _AT_LEAST_1,
    "num_hops": _AT_LEAST_1, "sections_per_step": _AT_LEAST_1, "batch_size": _AT_LEAST_1,
    "bin_size": _POSITIVE, "bin_factor": _POSITIVE, "patch_size": Range(2), "token_bins": _AT_LEAST_1,
    "n_channels": _AT_LEAST_1, "min_occupancy": _FRACTION, "patches_per_epoch": _AT_LEAST_1,
    "embed_stride": _AT_LEAST_1,
    # networks
    "hidden_dims": _AT_LEAST_1, "heads": _AT_LEAST_1, "dropout": Range(0, 1, hi_open=True),
    "decoder_hidden": _AT_LEAST_1, "dim": _AT_LEAST_1, "depth": _AT_LEAST_1, "decoder_dim": _AT_LEAST_1,
    "decoder_depth": _NON_NEGATIVE, "decoder_heads": _AT_LEAST_1, "readout_init_std": _NON_NEGATIVE,
    # losses, augmentations
    "edge_drop": Range(0, 1, hi_open=True), "feature_mask": Range(0, 1, hi_open=True), "lambda_recon": _NON_NEGATIVE,
    "lambda_telescope": _NON_NEGATIVE, "lambda_scale": _NON_NEGATIVE, "lambda_proto": _NON_NEGATIVE,
    "recon_spots": _AT_LEAST_1, "scale_top_k": _AT_LEAST_1, "scale_block_size": _AT_LEAST_1,
    "scale_anchor_spots": _AT_LEAST_1, "proto_start_epoch": _NON_NEGATIVE, "proto_granularity": _POSITIVE,
    "proto_k": Range(2), "proto_tau": _POSITIVE, "kmeans_iters": _AT_LEAST_1, "loss_l1": _NON_NEGATIVE,
    "region_mix": _FRACTION, "label_smoothing": Range(0, 1, hi_open=True),
    # held-out parts, fine-tuning, probes, benchmarks
    "val_fraction": Range(0, 1, hi_open=True), "max_val_cells": _AT_LEAST_1, "holdout_fraction": Range(0, 1, hi_open=True),
    "holdout_seed": _NON_NEGATIVE, "probe_epochs": _NON_NEGATIVE, "probe_lr": _POSITIVE,
    "probe_train_fraction": Range(0, 1, lo_open=True, hi_open=True), "probe_k": _AT_LEAST_1,
    "probe_hidden": _AT_LEAST_1, "eval_masked_genes": Range(0, 1, hi_open=True),
    "eval_mask_sizes": _AT_LEAST_1, "eval_mask_regions": _AT_LEAST_1, "eval_mask_repeats": _AT_LEAST_1,
    "eval_batch_size": _AT_LEAST_1,
    # memory
    "dense_cache_gb": _NON_NEGATIVE, "dense_cache_mb": _NON_NEGATIVE,
}


def _type_error(path: str, value, want: str) -> SpatialDataError:
    return SpatialDataError(f"setting {path}={value!r}: expected {want}, got {type(value).__name__}.")


def _check_scalar(path: str, value, tp):
    """`value` checked (and int -> float widened) against annotation `tp`; returns the value to keep."""
    import math

    if tp is bool:
        if not isinstance(value, bool):
            raise _type_error(path, value, "true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (isinstance(value, float) and not (math.isfinite(value) and value.is_integer())):
            raise _type_error(path, value, "a whole number")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(path, value, "a number")
        if not math.isfinite(value):
            raise SpatialDataError(f"setting {path}={value!r}: must be a finite number.")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _type_error(path, value, "text")
        return value
    return value


def validate_config(cfg, prefix: str = ""):
    """Check the types and ranges of every setting of `cfg` (nested configs included), then the
    config's own cross-field rules (its ``validate()``). Raises SpatialDataError naming the
    setting; returns `cfg` (ints given for floats are stored as floats)."""
    import numbers

    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        path = prefix + f.name
        value = getattr(cfg, f.name)
        tp = hints.get(f.name)
        optional = type(None) in typing.get_args(tp)
        base = _strip_optional(tp)
        if dataclasses.is_dataclass(base):
            if not dataclasses.is_dataclass(value):
                raise _type_error(path, value, f"a {base.__name__}")
            validate_config(value, path + ".")
            continue
        if value is None:
            if not optional:
                raise SpatialDataError(f"setting {path}=None: a value is required.")
            continue
        origin = typing.get_origin(base)
        if origin in (list, tuple):
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
                raise _type_error(path, value, "a list")
            elem = (typing.get_args(base) or (object,))[0]
            value = [_check_scalar(f"{path}[{i}]", v, elem) for i, v in enumerate(value)]
            setattr(cfg, f.name, value)
            rule = FIELD_RANGES.get(f.name)
            for i, v in enumerate(value):
                why = rule.check(v) if rule is not None and isinstance(v, numbers.Number) else None
                if why:
                    raise SpatialDataError(f"setting {path}[{i}]={v!r}: {why}.")
            continue
        value = _check_scalar(path, value, base)
        setattr(cfg, f.name, value)
        if isinstance(value, numbers.Number) and not isinstance(value, bool):
            rule = FIELD_RANGES.get(f.name)
            why = rule.check(value) if rule is not None else None
            if why:
                raise SpatialDataError(f"setting {path}={value!r}: {why}.")
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


# -- settings in words (the widget's forms) --------------------------------------------------------

DATA_KEYS = ("data.spatial_key", "data.coord_columns", "data.section_key", "data.label_key", "data.ignore_labels",
             "eval.domain_key")  # set from the slide (the Data panel), not in the method's forms


def field_doc(cls, name: str) -> str:
    """The documentation of setting `name` of config class `cls` (its ``FIELD_DOCS``, or a parent's)."""
    for klass in getattr(cls, "__mro__", (cls,)):
        doc = getattr(klass, "FIELD_DOCS", {}).get(name)
        if doc:
            return doc
    return ""


def describe_settings(cfg, prefix: str = "") -> list[tuple[str, object, object, str]]:
    """(dotted name, value, annotated type, documentation) of every scalar or list setting of `cfg`."""
    hints = typing.get_type_hints(type(cfg))
    out = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        name = prefix + f.name
        if dataclasses.is_dataclass(value):
            out += describe_settings(value, name + ".")
        else:
            out.append((name, value, hints.get(f.name), field_doc(type(cfg), f.name)))
    return out


def panel_settings(cfg, panel: str) -> tuple[list, list]:
    """(basic, advanced) settings of a method's config for one panel: the config's ``PANELS[panel]`` in
    order, and (for the 'view' panel) every other setting no panel shows."""
    every = {d[0]: d for d in describe_settings(cfg)}
    panels = getattr(type(cfg), "PANELS", {})
    basic = [every[n] for n in panels.get(panel, ()) if n in every]
    if panel != "view":
        return basic, []
    shown = {n for names in panels.values() for n in names} | set(DATA_KEYS)
    advanced = [d for n, d in every.items() if n not in shown]
    return basic, advanced
