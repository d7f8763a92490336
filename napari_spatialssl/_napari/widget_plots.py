"""Small Qt views used by the dock widget: the live loss curve and a categorical legend."""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtGui import QColor, QPixmap
from qtpy.QtWidgets import QHBoxLayout, QLabel, QListWidget, QListWidgetItem, QVBoxLayout, QWidget


class LossCurve(QWidget):
    """Training loss per step (thin line) and per epoch (dots), redrawn at most once per event."""

    def __init__(self, parent=None):
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(3.2, 1.8), dpi=90, tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.axes = self.figure.add_subplot(111)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)
        self.setMinimumHeight(150)
        self.clear()

    def clear(self) -> None:
        self.steps: list[float] = []  # global step counter
        self.step_losses: list[float] = []
        self.epoch_x: list[float] = []
        self.epoch_losses: list[float] = []
        self.val_x: list[float] = []
        self.val_losses: list[float] = []
        self._redraw()

    def add_step(self, loss: float) -> None:
        self.steps.append(len(self.steps) + 1)
        self.step_losses.append(float(loss))

    def add_epoch(self, loss: float, val_loss: float | None = None) -> None:
        x = float(len(self.steps)) if self.steps else float(len(self.epoch_x) + 1)
        self.epoch_x.append(x)
        self.epoch_losses.append(float(loss))
        if val_loss is not None and np.isfinite(val_loss):
            self.val_x.append(x)
            self.val_losses.append(float(val_loss))

    def _redraw(self) -> None:
        """Update the three lines in place (no re-plot): cheap enough to run while training."""
        ax = self.axes
        if not hasattr(self, "_lines"):
            ax.set_xlabel("step", fontsize=8)
            ax.set_ylabel("loss", fontsize=8)
            ax.tick_params(labelsize=7)
            self._lines = (
                ax.plot([], [], lw=0.8, color="#7aa6c2", label="step")[0],
                ax.plot([], [], "o-", ms=3, color="#1f77b4", label="epoch mean")[0],
                ax.plot([], [], "s--", ms=3, color="#d62728", label="validation")[0],
            )
            ax.legend(fontsize=7, loc="upper right")
        step, epoch, val = self._lines
        step.set_data(self.steps, self.step_losses)
        epoch.set_data(self.epoch_x, self.epoch_losses)
        val.set_data(self.val_x, self.val_losses)
        if self.steps or self.epoch_x:
            ax.relim()
            ax.autoscale_view()
        self.canvas.draw_idle()

    def refresh(self) -> None:
        self._redraw()


class Legend(QWidget):
    """A titled list of colour swatches, one per category."""

    def __init__(self, parent=None):
        super().__init__(parent)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.title = QLabel("")
        self.list = QListWidget()
        self.list.setMaximumHeight(160)
        layout.addWidget(self.title)
        layout.addWidget(self.list)

    def set_items(self, title: str, colors: dict[str, np.ndarray], counts: dict[str, int] | None = None) -> None:
        self.title.setText(title)
        self.list.clear()
        for name, rgba in colors.items():
            pix = QPixmap(12, 12)
            r, g, b, _ = (np.clip(np.asarray(rgba, dtype=float), 0, 1) * 255).astype(int)
            pix.fill(QColor(int(r), int(g), int(b)))
            text = f"{name}  ({counts[name]})" if counts and name in counts else name
            item = QListWidgetItem(text)
            item.setIcon(pix_icon(pix))
            self.list.addItem(item)

    def names(self) -> list[str]:
        return [self.list.item(i).text() for i in range(self.list.count())]


def pix_icon(pix: QPixmap):
    from qtpy.QtGui import QIcon

    return QIcon(pix)


def hbox(*widgets, stretch_last: bool = False) -> QWidget:
    """Widgets side by side in one row."""
    w = QWidget()
    lay = QHBoxLayout(w)
    lay.setContentsMargins(0, 0, 0, 0)
    for item in widgets:
        lay.addWidget(item)
    if stretch_last:
        lay.addStretch(1)
    lay.setAlignment(Qt.AlignmentFlag.AlignLeft)
    return w
