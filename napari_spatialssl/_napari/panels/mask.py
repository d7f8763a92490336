"""Mask panel: what the pretext task hides, for the current method, previewed on the tissue."""

from __future__ import annotations

from qtpy.QtWidgets import QAbstractItemView, QListWidget, QStackedWidget, QVBoxLayout, QWidget

from ...config import panel_settings
from ..forms import SettingsForm
from .common import button, label

KIND_TEXT = {
    "cells": "hides whole cells: their input is replaced by a mask token and every gene of them is reconstructed.",
    "genes": "hides gene channels of every spot and drops edges, in two augmented views per step.",
    "regions": "hides tokens (bins) of each patch, at random or as squares, and reconstructs them.",
}


class MaskForm(QWidget):
    def __init__(self, session, method: str, parent=None):
        super().__init__(parent)
        self.session, self.method = session, method
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        basic, _ = panel_settings(session.config(method), "mask")
        plain = [d for d in basic if d[0] != "mask.cell_types"]
        self.form = SettingsForm(plain, self._edit)
        lay.addWidget(self.form)
        self.types = None
        if any(d[0] == "mask.cell_types" for d in basic):
            self.types = QListWidget()
            self.types.setSelectionMode(QAbstractItemView.SelectionMode.MultiSelection)
            self.types.setMaximumHeight(120)
            self.types.setToolTip("Strategy cell_types: the cell types hidden entirely (pick one or more).")
            self.types.itemSelectionChanged.connect(self._types)
            lay.addWidget(label("Cell types to hide (strategy cell_types):"))
            lay.addWidget(self.types)

    def _edit(self, name, value) -> None:
        self.session.guarded(self.session.set_setting, name, value, self.method)
        self.refresh()

    def _types(self) -> None:
        chosen = [it.text() for it in self.types.selectedItems()]
        self.session.guarded(self.session.set_setting, "mask.cell_types", chosen, self.method)

    def refresh(self) -> None:
        cfg = self.session.config(self.method)
        self.form.show_values(cfg)
        if self.types is None or self.session.slide is None:
            return
        geometry = self.session.guarded(self.session.geometry, cfg)
        names = list(geometry.label_names or []) if geometry is not None else []
        self.types.blockSignals(True)
        self.types.clear()
        self.types.addItems(names)
        for i in range(self.types.count()):
            self.types.item(i).setSelected(self.types.item(i).text() in cfg.mask.cell_types)
        self.types.blockSignals(False)


class MaskPanel(QWidget):
    def __init__(self, session, parent=None):
        super().__init__(parent)
        from ...models.base import get_method_class

        self.session = session
        lay = QVBoxLayout(self)
        self.kind = label()
        lay.addWidget(self.kind)
        self.stack = QStackedWidget()
        self.forms = {m: MaskForm(session, m) for m in session.methods}
        for m in session.methods:
            self.stack.addWidget(self.forms[m])
        lay.addWidget(self.stack)
        lay.addWidget(button("Preview the mask on the tissue", lambda: session.guarded(session.preview_mask),
                             "Draw what the first training step hides, with the training seed."))
        self.text = label()
        lay.addWidget(self.text)
        lay.addStretch(1)
        self._kinds = {m: get_method_class(m).mask_kind for m in session.methods}
        ev = session.events
        ev.method.connect(self._method)
        ev.settings.connect(lambda m: [f.refresh() for k, f in self.forms.items() if m in ("", k)])
        ev.slide.connect(lambda *_: self.forms[session.method].refresh())
        ev.display.connect(self._display)
        self._method(session.method)

    def _method(self, method: str) -> None:
        self.stack.setCurrentWidget(self.forms[method])
        self.kind.setText(f"{method} {KIND_TEXT[self._kinds[method]]}")
        self.forms[method].refresh()

    def _display(self, display) -> None:
        if display.top and "mask" in display.top:
            self.text.setText(display.text)
