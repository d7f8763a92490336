"""Region panel: draw a region on the tissue, hide it from a trained model, and see what the model puts
there against what was measured and against two baselines, per gene."""

from __future__ import annotations

from qtpy.QtWidgets import QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget

from .common import button, combo, fill, label, row

TOP_GENES = 12


class RegionPanel(QWidget):
    def __init__(self, session, parent=None):
        super().__init__(parent)
        self.session = session
        lay = QVBoxLayout(self)
        lay.addWidget(label("Draw a rectangle or polygon over the tissue, then hide it from a model: every cell "
                            "inside is hidden at once and predicted from its surroundings."))
        self.method = combo(tooltip="A method trained (or loaded) in this session.")
        lay.addWidget(row(button("Draw a region", session.request_region_layer,
                                 "Adds the 'region to hide' layer in rectangle mode (polygon: its toolbar)."),
                          self.method, button("Hide it and predict", self._inspect)))
        self.drawn = label("No region drawn yet.")
        lay.addWidget(self.drawn)
        self.gene = combo(editable=True, tooltip="The gene shown in the panels beside the tissue.")
        lay.addWidget(row(label("Gene"), self.gene, button("Show", self._gene)))
        self.text = label()
        lay.addWidget(self.text)
        self.table = QTableWidget(0, 4)
        self.table.setHorizontalHeaderLabels(["gene", "model MSE / r", "neighbour mean", "interpolation"])
        self.table.setMinimumHeight(160)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.cellClicked.connect(lambda r, c: self._pick(r))
        lay.addWidget(self.table)
        lay.addStretch(1)
        ev = session.events
        ev.results.connect(self._results)
        ev.region_drawn.connect(self._drawn)
        ev.region.connect(self._report)
        ev.display.connect(lambda d: self.text.setText(d.text) if d.top and d.top.startswith("region:") else None)

    def _results(self, *_):
        names = [m for m, r in self.session.results.items() if r.trained is not None]
        fill(self.method, names, self.method.currentText() or (names[-1] if names else None))

    def _drawn(self, polygon) -> None:
        self.drawn.setText(f"Region drawn ({len(polygon)} corners). Press 'Hide it and predict'.")

    def _inspect(self) -> None:
        gene = self.gene.currentText().strip() or None
        self.session.guarded(self.session.inspect_region, self.method.currentText(), None, gene)

    def _gene(self) -> None:
        self.session.guarded(self.session.show_region_gene, self.gene.currentText().strip())

    def _pick(self, r: int) -> None:
        item = self.table.item(r, 0)
        if item is not None:
            self.gene.setCurrentText(item.text())
            self._gene()

    def _report(self, report) -> None:
        fill(self.gene, report.genes, self.gene.currentText())
        table = report.per_gene.head(TOP_GENES)
        self.table.setRowCount(len(table))
        for i, (_, r) in enumerate(table.iterrows()):
            cells = [r["gene"], f"{r['model mse']:.3g} / {r['model r']:.2f}",
                     f"{r['neighbour mean mse']:.3g} / {r['neighbour mean r']:.2f}",
                     f"{r['interpolation mse']:.3g} / {r['interpolation r']:.2f}"]
            for j, text in enumerate(cells):
                self.table.setItem(i, j, QTableWidgetItem(str(text)))
        self.table.resizeColumnsToContents()
