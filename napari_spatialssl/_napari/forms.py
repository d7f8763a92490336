"""A form over settings of a method's config: one row per setting, named in words, with the setting's
documentation as its tooltip. Edits go to the Session (which validates them); the form shows
what the Session's config holds, so an invalid value never stays on screen.
"""

from __future__ import annotations

import typing

from qtpy.QtWidgets import QCheckBox, QComboBox, QFormLayout, QLabel, QLineEdit, QSpinBox, QWidget

from ..config import _strip_optional
from ..evaluation.domains import DOMAIN_METHODS
from ..masking import STRATEGIES

CHOICES = {
    "device": ("auto", "cpu", "cuda", "mps"), "graph_mode": ("whole", "egonet"), "encoder": ("gcn", "gat"),
    "norm": ("layer", "batch", "none"), "decoder": ("mlp", "linear"), "mask_token": ("learned", "zeros"),
    "domain_method": DOMAIN_METHODS, "strategy": STRATEGIES, "class_weights": ("sqrt", "balanced", "none"),
    "mode": ("full", "linear"), "early_stop_metric": ("macro_f1", "loss"),
    "reconstruction": ("auto", "all", "masked", "none"), "embedding_postprocess": ("l2", "none", "standardize", "pca"),
    "residual_readout": ("local", "patch_mean", "attend", "none"), "domain_clustering": ("joint", "per_section"),
    "hvg_flavor": ("seurat_v3", "seurat", "cell_ranger"), "graph": ("auto", "build"),
}

# Words for the settings people meet first; the others show their own name.
LABELS = {
    "epochs": "Epochs (pretraining)", "lr": "Learning rate", "seed": "Seed", "device": "Device",
    "eval.n_domains": "Spatial domains K", "eval.domain_method": "Domain clustering",
    "finetune.epochs": "Fine-tuning epochs (max)", "radius": "Graph radius (slide units)",
    "graph_mode": "Graph", "num_hops": "Ego-net hops", "batch_size": "Batch size", "encoder": "Encoder",
    "hidden_dims": "Layer widths", "k_neighbors": "Neighbours (at most)", "bin_size": "Bin size (slide units)",
    "patch_size": "Patch side (bins)", "n_channels": "Gene channels per patch", "dim": "Encoder width",
    "depth": "Encoder layers", "mask.strategy": "Mask", "mask.ratio": "Share hidden", "mask.cell_types": "Cell types",
    "mask.niche_hops": "Niche hops", "mask.region_size": "Square side (bins)", "mask.n_regions": "Squares per patch",
    "region_mix": "Share of patches with squares", "edge_drop": "Edges dropped per view",
    "feature_mask": "Genes hidden per view",
}
EMPTY = {"eval.n_domains": "automatic", "radius": "from the slide's spacing", "bin_size": "from the slide's spacing",
         "num_hops": "= layers (exact)"}


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _parse(text: str, tp, optional: bool):
    text = text.strip()
    if text == "" and optional:
        return None
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        elem = (typing.get_args(tp) or (str,))[0]
        items = [t.strip() for t in text.strip("[]()").split(",") if t.strip()]
        return [elem(t) if elem in (int, float) else t for t in items]
    if tp is int:
        return int(text)
    if tp is float:
        return float(text)
    return text


class SettingsForm(QWidget):
    """Rows for `settings` ((dotted name, value, type, doc)); `on_edit(name, value)` is called with each edit."""

    def __init__(self, settings, on_edit, parent=None):
        super().__init__(parent)
        self.on_edit = on_edit
        self.layout_ = QFormLayout(self)
        self.layout_.setContentsMargins(0, 0, 0, 0)
        self.editors: dict[str, QWidget] = {}
        self.types: dict[str, tuple] = {}
        for name, value, tp, doc in settings:
            optional = type(None) in typing.get_args(tp)
            base = _strip_optional(tp)
            editor = self._editor(name, value, base, optional)
            editor.setToolTip(doc)
            label = QLabel(LABELS.get(name, name))
            label.setToolTip(doc)
            label.setWordWrap(True)
            self.layout_.addRow(label, editor)
            self.editors[name] = editor
            self.types[name] = (base, optional)

    def _editor(self, name: str, value, tp, optional: bool) -> QWidget:
        leaf = name.split(".")[-1]
        if tp is bool:
            w = QCheckBox()
            w.setChecked(bool(value))
            w.toggled.connect(lambda on, n=name: self.on_edit(n, bool(on)))
            return w
        if leaf in CHOICES and tp is str:
            w = QComboBox()
            w.addItems(list(CHOICES[leaf]))
            w.setCurrentText(str(value))
            w.currentTextChanged.connect(lambda t, n=name: self.on_edit(n, t))
            return w
        if tp is int and not optional and name in ("epochs", "finetune.epochs", "seed"):
            w = QSpinBox()
            w.setRange(0 if name == "seed" else 1, 2**31 - 1)
            w.setValue(int(value))
            w.setKeyboardTracking(False)
            w.valueChanged.connect(lambda v, n=name: self.on_edit(n, int(v)))
            return w
        w = QLineEdit(_text(value))
        if optional:
            w.setPlaceholderText(EMPTY.get(name, "empty = automatic"))
        w.editingFinished.connect(lambda n=name, e=w: self._edited(n, e))
        return w

    def _edited(self, name: str, editor: QLineEdit) -> None:
        base, optional = self.types[name]
        try:
            value = _parse(editor.text(), base, optional)
        except ValueError:
            value = editor.text()  # the Session refuses it with a message naming the setting
        self.on_edit(name, value)

    def show_values(self, cfg) -> None:
        """Show what `cfg` holds (after an edit was accepted or refused)."""
        from ..config import describe_settings

        values = {d[0]: d[1] for d in describe_settings(cfg)}
        for name, editor in self.editors.items():
            value = values.get(name)
            editor.blockSignals(True)
            try:
                if isinstance(editor, QCheckBox):
                    editor.setChecked(bool(value))
                elif isinstance(editor, QComboBox):
                    editor.setCurrentText(str(value))
                elif isinstance(editor, QSpinBox):
                    editor.setValue(int(value))
                else:
                    editor.setText(_text(value))
            finally:
                editor.blockSignals(False)
