"""Embedding panel: a 2-D plot of a result's embedding with axes; selecting cells in the plot rings
them on the tissue, and cells selected on the tissue are ringed in the plot."""

from __future__ import annotations

from qtpy.QtWidgets import QVBoxLayout, QWidget

from ..figures import embedding_figure
from ..plots import EmbeddingView
from .common import button, combo, label, row


class EmbeddingPanel(QWidget):
    def __init__(self, session, parent=None):
        super().__init__(parent)
        self.session = session
        lay = QVBoxLayout(self)
        self.method = combo(tooltip="The method whose embedding is plotted.")
        self.how = combo(("pca", "umap"), "pca is instant; umap takes a while the first time (off the main thread).")
        lay.addWidget(row(self.method, self.how, button("Plot", self._plot)))
        self.plot = EmbeddingView(session.select_cells)
        self.points = None
        lay.addWidget(self.plot)
        self.text = label("Drag a rectangle in the plot to select cells; select cells of a result layer on the "
                          "tissue (select tool) to see them here.")
        lay.addWidget(self.text)
        ev = session.events
        ev.results.connect(self._results)
        ev.plot.connect(self._points)
        ev.selection.connect(self._selected)
        ev.figure.connect(lambda name, fig: self.plot.show_figure(fig) if name == "embedding" else None)

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
        self.points = points
        self.plot.set_points(points)
        self.text.setText(f"{len(points.cells):,} cells plotted. Drag a rectangle to select cells.")

    def _selected(self, cells) -> None:
        """Ring the selected cells in the plot (redrawn off the main thread)."""
        p = self.points
        if p is None:
            return
        import numpy as np

        hit = np.flatnonzero(np.isin(p.cells, cells))
        self.session.draw("embedding", embedding_figure, p.xy, p.rgba, p.title, p.axes, hit)
        self.text.setText(f"{len(cells):,} cells selected; ringed on the tissue and here.")
