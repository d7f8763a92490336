"""Results panel: what each method learned, one view at a time on top of the tissue, with its legend or
colour bar, the headline figures beside their baselines, and a confusion matrix against the reference."""

from __future__ import annotations

from qtpy.QtWidgets import QSpinBox, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget

from ...evaluation.domains import DOMAIN_METHODS
from ..figures import colorbar_figure
from ..plots import FigureView, Legend
from .common import button, combo, fill, label, row


class ResultsPanel(QWidget):
    def __init__(self, session, parent=None):
        super().__init__(parent)
        self.session = session
        self._last_legend: list = []
        lay = QVBoxLayout(self)
        self.method = combo(tooltip="The method whose results are shown.")
        self.method.currentTextChanged.connect(self._method_chosen)
        lay.addWidget(row(label("Results of"), self.method))
        show = lambda what: lambda: session.guarded(session.show, self.method.currentText(), what)  # noqa: E731
        lay.addWidget(row(button("Domains", show("domains"), "Spatial domains, coloured like the reference classes "
                                 "they match when there are reference labels."),
                          button("Cell types", show("cell types"), "Predicted cell types (gnn-mask)."),
                          button("Embedding", show("embedding"), "The embedding's first three principal "
                                 "components as RGB: similar colours, similar cells."),
                          button("Error", show("error"), "Reconstruction error per cell.")))
        self.gene = combo(editable=True, tooltip="A gene the model reconstructs.")
        lay.addWidget(row(label("Gene"), self.gene))
        lay.addWidget(row(button("Reconstruction", self._reconstruction, "The model's reconstruction of the gene "
                                 "(masked cells ringed in white for gnn-mask)."),
                          button("Measured vs reconstructed", self._compare, "The measured gene beside every "
                                 "method's reconstruction of it, side by side on one colour scale.")))
        self.k = QSpinBox()
        self.k.setRange(0, 200)
        self.k.setSpecialValueText("auto")
        self.k.setToolTip("Number of domains K (automatic = a Leiden resolution search, as in the CLI).")
        self.k.setMinimumWidth(110)
        self.how = combo(DOMAIN_METHODS, "How domains are clustered from the embedding (the CLI's --set "
                                         "eval.domain_method).")
        lay.addWidget(row(label("K"), self.k, self.how, button("Recompute domains", self._recompute)))
        self.text = label()
        lay.addWidget(self.text)
        self.legend = Legend()
        self.legend.setVisible(False)
        lay.addWidget(self.legend)
        self.colorbar = FigureView(50)
        lay.addWidget(self.colorbar)
        lay.addWidget(label("Headline figures (baselines measured in the same run):"))
        self.table = QTableWidget(0, 3)
        self.table.setHorizontalHeaderLabels(["figure", "value", "baselines"])
        self.table.setMinimumHeight(120)
        self.table.horizontalHeader().setStretchLastSection(True)
        lay.addWidget(self.table)
        self.confusion = FigureView(150)
        lay.addWidget(self.confusion)
        ev = session.events
        ev.results.connect(self._results)
        ev.display.connect(self._display)
        ev.summary.connect(self._summary)
        ev.figure.connect(lambda name, fig: self.colorbar.show_figure(fig) if name == "colorbar" else None)

    def _results(self, method: str) -> None:
        names = [m for m in self.session.methods if m in self.session.results]
        fill(self.method, names, method)
        self._method_chosen(self.method.currentText())

    def _method_chosen(self, method: str) -> None:
        if method not in self.session.results:
            return
        result = self.session.results[method]
        fill(self.gene, result.model_genes(), self.gene.currentText())
        self.session.guarded(self.session.summarize, method)

    def _reconstruction(self) -> None:
        self.session.guarded(self.session.show, self.method.currentText(), "reconstruction",
                             self.gene.currentText().strip())

    def _compare(self) -> None:
        self.session.guarded(self.session.compare, self.gene.currentText().strip())

    def _recompute(self) -> None:
        k = int(self.k.value()) or None
        self.session.guarded(self.session.recompute_domains, self.method.currentText(), k, self.how.currentText())

    def _display(self, display) -> None:
        if not display.top or display.top.startswith(("preview:", "region:")):
            return
        self.text.setText(display.text)
        if display.legend is not None:
            self._last_legend = display.legend[1]
            self.legend.set_items(*display.legend)
        else:
            self.legend.setVisible(False)
        if display.colorbar is not None:
            self.session.draw("colorbar", colorbar_figure, *display.colorbar)
        else:
            self.colorbar.setVisible(False)

    def _summary(self, summary) -> None:
        if summary.method != self.method.currentText():
            return
        self.table.setRowCount(len(summary.rows))
        for i, (what, value, base, higher, flag) in enumerate(summary.rows):
            basetext = "\n".join(f"{k.replace('_', ' ')} {v:.3g}" for k, v in base.items() if v is not None)
            items = [QTableWidgetItem(what), QTableWidgetItem(f"{value:.3g}"),
                     QTableWidgetItem(f"{basetext}{chr(10) + flag if flag else ''}")]
            if flag.startswith("worse"):
                for it in items:
                    it.setForeground(_warn_brush())
                items[0].setToolTip(f"{what} is {flag}: " + ("higher" if higher else "lower") + " is better.")
            for j, it in enumerate(items):
                self.table.setItem(i, j, it)
        self.table.setWordWrap(True)
        self.table.resizeColumnsToContents()
        self.table.resizeRowsToContents()
        if summary.figure is not None:
            self.confusion.show_figure(summary.figure)
        else:
            self.confusion.setVisible(False)


def _warn_brush():
    from qtpy.QtGui import QBrush, QColor

    return QBrush(QColor("#e0a030"))
