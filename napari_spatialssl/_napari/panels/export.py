"""Export panel: the slide with every result to .h5ad / .csv, back into its SpatialData store, a PNG."""

from __future__ import annotations

from qtpy.QtWidgets import QCheckBox, QFileDialog, QLineEdit, QVBoxLayout, QWidget

from .common import button, label, row


class ExportPanel(QWidget):
    def __init__(self, session, parent=None):
        super().__init__(parent)
        self.session = session
        lay = QVBoxLayout(self)
        lay.addWidget(label("The slide holds every result after training: embeddings (obsm), domains and cell "
                            "types (obs), reconstructions (layers), metrics and settings (uns['spatialssl'])."))
        self.expression = QCheckBox("CSV: include the expression")
        lay.addWidget(self.expression)
        lay.addWidget(button("Export the slide to .h5ad / .csv…", self._export,
                             "A name without a suffix gets .h5ad; a file you confirm replacing is replaced."))
        self.store_row = QWidget()
        self.table = QLineEdit("spatialssl")
        self.table.setToolTip("Name of the table the results are written to, inside the store.")
        self.replace = QCheckBox("replace")
        srow = QVBoxLayout(self.store_row)
        srow.setContentsMargins(0, 0, 0, 0)
        srow.addWidget(label("Read from a SpatialData store: write the results back into it as a table."))
        srow.addWidget(row(self.table, self.replace, button("Write into the store", self._store)))
        lay.addWidget(self.store_row)
        lay.addWidget(button("Save a PNG of the view…", self._png))
        lay.addStretch(1)
        session.events.slide.connect(self._slide)
        self._slide(session.slide)

    def _slide(self, slide) -> None:
        from_store = slide is not None and bool((slide.adata.uns.get("spatialssl_store") or {}).get("path"))
        self.store_row.setVisible(from_store)

    def _export(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export the slide", "", "AnnData (*.h5ad);;Table (*.csv)")
        if path:  # the dialog asked before replacing a file
            self.session.guarded(self.session.export, path, include_expression=self.expression.isChecked(),
                                 overwrite=True)

    def _store(self) -> None:
        self.session.guarded(self.session.write_to_store, self.table.text().strip(), self.replace.isChecked())

    def _png(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save the view", "", "PNG image (*.png)")
        if path:
            self.session.guarded(self.session.save_png, path)
