"""Small Qt views of the dock: the live loss curve, a legend, a colour bar, the 2-D embedding plot
(with axes, selection linked to the tissue) and a confusion matrix."""

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
    """A titled list of colour swatches, one per category, in the order given (natural order)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.title = QLabel("")
        self.title.setWordWrap(True)
        self.list = QListWidget()
        self.list.setMaximumHeight(150)
        layout.addWidget(self.title)
        layout.addWidget(self.list)

    def set_items(self, title: str, items: list) -> None:
        """`items`: [(label, rgba, count)]."""
        self.title.setText(title)
        self.list.clear()
        for name, rgba, count in items:
            pix = QPixmap(12, 12)
            r, g, b = (np.clip(np.asarray(rgba, dtype=float)[:3], 0, 1) * 255).astype(int)
            pix.fill(QColor(int(r), int(g), int(b)))
            item = QListWidgetItem(f"{name}  ({count:,})")
            item.setIcon(pix_icon(pix))
            self.list.addItem(item)
        self.setVisible(bool(items))

    def names(self) -> list[str]:
        return [self.list.item(i).text().rsplit("  (", 1)[0] for i in range(self.list.count())]


class _Figure(QWidget):
    def __init__(self, size=(3.2, 1.0), parent=None):
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=size, dpi=90, tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)


class ColorBar(_Figure):
    """The colour scale of the shown continuous values."""

    def __init__(self, parent=None):
        super().__init__((3.2, 0.55), parent)
        self.setFixedHeight(62)
        self.setVisible(False)

    def show_scale(self, cmap: str, lo: float, hi: float, label: str) -> None:
        from matplotlib import colormaps
        from matplotlib.colorbar import ColorbarBase
        from matplotlib.colors import Normalize

        self.figure.clear()
        ax = self.figure.add_axes([0.05, 0.55, 0.9, 0.3])
        ColorbarBase(ax, cmap=colormaps[cmap], norm=Normalize(lo, hi), orientation="horizontal")
        ax.tick_params(labelsize=7)
        ax.set_title(label, fontsize=7)
        self.canvas.draw_idle()
        self.setVisible(True)


class EmbeddingPlot(_Figure):
    """The embedding in two dimensions, with axes; drag a rectangle to select cells (linked to the tissue)."""

    def __init__(self, on_select, parent=None):
        super().__init__((3.2, 2.6), parent)
        self.setMinimumHeight(230)
        self.on_select = on_select
        self.cells = np.zeros(0, np.int64)
        self.xy = np.zeros((0, 2))
        self._selector = None
        self._highlight = None

    def plot(self, xy: np.ndarray, rgba: np.ndarray, cells: np.ndarray, title: str, axes: tuple[str, str]) -> None:
        from matplotlib.widgets import RectangleSelector

        self.xy, self.cells = np.asarray(xy), np.asarray(cells)
        self.figure.clear()
        ax = self.figure.add_subplot(111)
        ax.scatter(self.xy[:, 0], self.xy[:, 1], c=np.asarray(rgba)[:, :4], s=2, linewidths=0, rasterized=True)
        ax.set_xlabel(axes[0], fontsize=8)
        ax.set_ylabel(axes[1], fontsize=8)
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=7)
        self._highlight = ax.scatter([], [], s=14, facecolors="none", edgecolors="#ffd000", linewidths=0.8)
        self._selector = RectangleSelector(ax, self._selected, useblit=False, interactive=False)
        self.axes = ax
        self.canvas.draw_idle()

    def _selected(self, press, release) -> None:
        x0, x1 = sorted((press.xdata, release.xdata))
        y0, y1 = sorted((press.ydata, release.ydata))
        inside = (self.xy[:, 0] >= x0) & (self.xy[:, 0] <= x1) & (self.xy[:, 1] >= y0) & (self.xy[:, 1] <= y1)
        self.on_select(self.cells[inside])

    def highlight(self, cells: np.ndarray) -> None:
        if self._highlight is None:
            return
        hit = np.isin(self.cells, np.asarray(cells))
        self._highlight.set_offsets(self.xy[hit] if hit.any() else np.zeros((0, 2)))
        self.canvas.draw_idle()


class ConfusionPlot(_Figure):
    """Predicted domains (or cell types) against the reference, each row as shares of the row."""

    def __init__(self, parent=None):
        super().__init__((3.2, 2.4), parent)
        self.setMinimumHeight(200)
        self.setVisible(False)

    def show_table(self, table, title: str) -> None:
        values = table.to_numpy(dtype=float)
        shares = values / np.maximum(values.sum(1, keepdims=True), 1)
        self.figure.clear()
        ax = self.figure.add_subplot(111)
        ax.imshow(shares, cmap="Blues", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(table.columns)), [str(c)[:10] for c in table.columns], rotation=90, fontsize=6)
        ax.set_yticks(range(len(table.index)), [str(c)[:10] for c in table.index], fontsize=6)
        ax.set_xlabel("reference", fontsize=7)
        ax.set_ylabel("predicted", fontsize=7)
        ax.set_title(title, fontsize=8)
        self.canvas.draw_idle()
        self.setVisible(True)


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
