"""Embedding panel: a 2-D plot of a result's embedding with axes; selecting cells in the plot rings
them on the tissue, and cells selected on the tissue are ringed in the plot."""

from __future__ import annotations

from qtpy.QtWidgets import QVBoxLayout, QWidget

from ..plots import EmbeddingPlot
from .common import button, combo, label, row


class EmbeddingPanel(QWidget):
    def __init__(self, session, parent=None):
        super().__init__(parent)
        self.session = session
        lay = QVBoxLayout(self)
        self.method = combo(tooltip="The method whose embedding is plotted.")
        self.how = combo(("pca", "umap"), "pca is instant; umap takes a while the first time (off the main thread).")
        lay.addWidget(row(self.method, self.how, button("Plot", self._plot)))
        self.plot = EmbeddingPlot(session.select_cells)
        lay.addWidget(self.plot)
        self.text = label("Drag a rectangle in the plot to select cells; select cells of a result layer on the "
                          "tissue (select tool) to see them here.")
        lay.addWidget(self.text)
        ev = session.events
        ev.results.connect(self._results)
        ev.plot.connect(self._points)
        ev.selection.connect(self.plot.highlight)

    def _results(self, method: str) -> None:
        names = [m for m in self.session.methods if m in self.session.results]
        self.method.blockSignals(True)
        self.method.clear()
        self.method.addItems(names)
        self.method.setCurrentText(method)
        self.method.blockSignals(False)
        self._plot()

    def _plot(self) -> None:
        if self.method.currentText():
            self.session.guarded(self.session.plot_embedding, self.method.currentText(), self.how.currentText())

    def _points(self, points) -> None:
        self.plot.plot(points.xy, points.rgba, points.cells, points.title, points.axes)
        self.text.setText(f"{len(points.cells):,} cells plotted. Drag a rectangle to select cells.")
