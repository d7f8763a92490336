"""A form generated from a method's config dataclass (one row per scalar setting).

The widget never hard-codes a method's settings: it lists the scalar fields of the method's
config class (nested dataclasses flattened with dotted names, as the CLI's ``--set`` names them)
and applies the edited values with the core's ``apply_overrides``, which coerces and validates.
"""

from __future__ import annotations

import dataclasses
import typing

from qtpy.QtWidgets import QCheckBox, QFormLayout, QLineEdit, QSpinBox, QWidget

from ..config import TrainConfig, _strip_optional
from ..masking import MaskConfig

# The Trainer's own settings are edited in the Train section; data/eval in the Data section.
TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
SKIP_ROOTS = {"data", "eval"}

# Settings that define the view of the slide come first, in this order.
VIEW_PARAM_NAMES = (
    "radius", "num_hops", "k_hop", "k_hops", "hops", "k", "n_neighbors", "k_neighbors", "knn",
    "patch_size", "bin_size", "n_channels", "gene_channels", "channels",
)


def mask_field_name(cfg) -> str | None:
    """Name of the config's MaskConfig field (the Masking section edits it), if any."""
    for f in dataclasses.fields(cfg):
        if isinstance(getattr(cfg, f.name), MaskConfig):
            return f.name
    return None


def scalar_fields(cfg, prefix: str = "", skip: set[str] | None = None) -> list[tuple[str, object, object]]:
    """(dotted name, current value, annotated type) of every scalar setting, view settings first."""
    skip = skip if skip is not None else (TRAIN_FIELDS | SKIP_ROOTS | {mask_field_name(cfg) or ""})
    hints = typing.get_type_hints(type(cfg))
    out = []
    for f in dataclasses.fields(cfg):
        if not prefix and f.name in skip:
            continue
        value = getattr(cfg, f.name)
        name = prefix + f.name
        if dataclasses.is_dataclass(value):
            out += scalar_fields(value, name + ".", skip=set())
            continue
        tp = _strip_optional(hints.get(f.name))
        if isinstance(value, (bool, int, float, str, list, tuple)) or value is None:
            out.append((name, value, tp))
    order = {n: i for i, n in enumerate(VIEW_PARAM_NAMES)}
    return sorted(out, key=lambda t: (order.get(t[0].split(".")[-1], len(order)), out.index(t)))


def is_view_param(name: str) -> bool:
    return name.split(".")[-1] in VIEW_PARAM_NAMES


class ConfigForm(QWidget):
    """Edits the scalar settings of one config instance; `overrides()` gives {dotted name: value}."""

    def __init__(self, cfg, parent=None):
        super().__init__(parent)
        self.layout_ = QFormLayout(self)
        self.layout_.setContentsMargins(0, 0, 0, 0)
        self.editors: dict[str, QWidget] = {}
        self.types: dict[str, object] = {}
        for name, value, tp in scalar_fields(cfg):
            editor = self._editor(value, tp)
            self.editors[name] = editor
            self.types[name] = tp
            self.layout_.addRow(name, editor)

    @staticmethod
    def _editor(value, tp) -> QWidget:
        if isinstance(value, bool) or tp is bool:
            w = QCheckBox()
            w.setChecked(bool(value))
            return w
        if isinstance(value, int) and tp is int:
            w = QSpinBox()
            w.setRange(-(2**31) + 1, 2**31 - 1)
            w.setValue(int(value))
            return w
        w = QLineEdit()
        w.setText(_as_text(value))
        return w

    def overrides(self) -> dict:
        """Current values; text is left for the core's coercion ('' means None)."""
        out = {}
        for name, w in self.editors.items():
            if isinstance(w, QCheckBox):
                out[name] = w.isChecked()
            elif isinstance(w, QSpinBox):
                out[name] = int(w.value())
            else:
                text = w.text().strip()
                out[name] = "none" if text == "" else _typed_list(text, self.types[name])
        return out

    def set_values(self, values: dict) -> None:
        """Restore saved values (unknown names ignored)."""
        for name, value in values.items():
            w = self.editors.get(name)
            if w is None:
                continue
            if isinstance(w, QCheckBox):
                w.setChecked(bool(value) if not isinstance(value, str) else value.lower() in ("1", "true", "yes"))
            elif isinstance(w, QSpinBox):
                try:
                    w.setValue(int(value))
                except (TypeError, ValueError):
                    pass
            else:
                w.setText(_as_text(value) if not isinstance(value, str) or value != "none" else "")

    def set_value(self, name: str, value) -> None:
        self.set_values({name: value})

    def find(self, leaf: str) -> str | None:
        """Dotted name of the first setting whose last part is `leaf`."""
        for name in self.editors:
            if name.split(".")[-1] == leaf:
                return name
        return None


def _typed_list(text: str, tp):
    """'2,4,8' -> [2, 4, 8] for a list[int] setting (the core's text coercion keeps list items as text);
    anything else, or a value that does not parse, is left as text for the core to coerce or refuse."""
    if typing.get_origin(tp) not in (list, tuple):
        return text
    args = typing.get_args(tp)
    item = args[0] if args else str
    if item not in (int, float):
        return text
    try:
        return [item(t.strip()) for t in text.split(",") if t.strip()]
    except ValueError:
        return text


def _as_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)
