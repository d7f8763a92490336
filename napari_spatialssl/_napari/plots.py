"""Small Qt views of the dock: figures drawn off the main thread (see figures.py) shown as images, the
2-D embedding plot with rectangle selection linked to the tissue, and a legend of colour swatches."""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import QPoint, QRect, QSize, Qt
from qtpy.QtGui import QColor, QIcon, QImage, QPixmap
from qtpy.QtWidgets import (QLabel, QListWidget, QListWidgetItem, QRubberBand, QSizePolicy,
                            QVBoxLayout, QWidget)


class FigureView(QLabel):
    """Shows a figures.Figure (an RGBA image) at the label's width; putting an image on screen is cheap."""

    def __init__(self, min_height: int = 60, parent=None):
        super().__init__(parent)
        self.setMinimumHeight(min_height)
        self.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop)
        self.figure = None
        self._scale = 1.0
        self.setVisible(False)

    def show_figure(self, figure) -> None:
        self.figure = figure
        img = np.ascontiguousarray(figure.image)
        h, w = img.shape[:2]
        qimage = QImage(img.data, w, h, 4 * w, QImage.Format.Format_RGBA8888).copy()
        pixmap = QPixmap.fromImage(qimage)
        width = max(self.width(), 200)
        if w > width:
            pixmap = pixmap.scaledToWidth(width, Qt.TransformationMode.SmoothTransformation)
        self._scale = pixmap.width() / w
        self.setPixmap(pixmap)
        self.setMinimumHeight(pixmap.height())
        self.setVisible(True)

    def sizeHint(self) -> QSize:  # noqa: N802 - Qt naming
        return QSize(200, self.minimumHeight())


class EmbeddingView(FigureView):
    """The embedding plot; drag a rectangle to select the cells inside it (`on_select(cells)`)."""

    def __init__(self, on_select, parent=None):
        super().__init__(230, parent)
        self.on_select = on_select
        self.xy = np.zeros((0, 2))
        self.cells = np.zeros(0, np.int64)
        self._band = QRubberBand(QRubberBand.Shape.Rectangle, self)
        self._origin = QPoint()

    def set_points(self, points) -> None:
        self.xy, self.cells = np.asarray(points.xy), np.asarray(points.cells)
        self.show_figure(points.figure)

    def mousePressEvent(self, event):  # noqa: N802
        self._origin = event.position().toPoint()
        self._band.setGeometry(QRect(self._origin, QSize()))
        self._band.show()

    def mouseMoveEvent(self, event):  # noqa: N802
        self._band.setGeometry(QRect(self._origin, event.position().toPoint()).normalized())

    def mouseReleaseEvent(self, event):  # noqa: N802
        self._band.hide()
        rect = QRect(self._origin, event.position().toPoint()).normalized()
        if self.figure is None or self.figure.box is None or rect.width() < 3 or rect.height() < 3:
            return
        s = self._scale
        (x0, y1), (x1, y0) = (self.figure.to_data(rect.left() / s, rect.top() / s),
                              self.figure.to_data(rect.right() / s, rect.bottom() / s))
        inside = (self.xy[:, 0] >= x0) & (self.xy[:, 0] <= x1) & (self.xy[:, 1] >= y0) & (self.xy[:, 1] <= y1)
        self.on_select(self.cells[inside])


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
            item.setIcon(QIcon(pix))
            self.list.addItem(item)
        self.setVisible(bool(items))

    def names(self) -> list[str]:
        return [self.list.item(i).text().rsplit("  (", 1)[0] for i in range(self.list.count())]


