"""Small building blocks the panels share (not a panel)."""

from __future__ import annotations

from qtpy.QtWidgets import QComboBox, QHBoxLayout, QLabel, QPushButton, QSizePolicy, QWidget

DOCK_WIDTH = 430  # the dock's width in pixels; no text may widen it


def label(text: str = "", tooltip: str = "") -> QLabel:
    """A label that wraps instead of widening the dock."""
    w = QLabel(text)
    w.setWordWrap(True)
    w.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
    if tooltip:
        w.setToolTip(tooltip)
    return w


def combo(items=(), tooltip: str = "", editable: bool = False) -> QComboBox:
    """A combo box whose long items never widen the dock."""
    w = QComboBox()
    w.addItems([str(i) for i in items])
    w.setEditable(editable)
    w.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    w.setMinimumContentsLength(8)
    w.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
    if tooltip:
        w.setToolTip(tooltip)
    return w


def button(text: str, slot, tooltip: str = "") -> QPushButton:
    w = QPushButton(text)
    w.clicked.connect(lambda *_: slot())
    if tooltip:
        w.setToolTip(tooltip)
    return w


def row(*widgets) -> QWidget:
    w = QWidget()
    lay = QHBoxLayout(w)
    lay.setContentsMargins(0, 0, 0, 0)
    for item in widgets:
        lay.addWidget(item)
    return w


def fill(combo_box: QComboBox, items, current=None) -> None:
    """Replace a combo's items without emitting changes; keep `current` when it is still there."""
    combo_box.blockSignals(True)
    combo_box.clear()
    combo_box.addItems([str(i) for i in items])
    if current is not None and str(current) in [str(i) for i in items]:
        combo_box.setCurrentText(str(current))
    combo_box.blockSignals(False)
