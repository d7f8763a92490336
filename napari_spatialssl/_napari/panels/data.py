"""Data panel: the slide, its section / label / reference-domain columns, unknown labels, a gene."""

from __future__ import annotations

from qtpy.QtWidgets import QFileDialog, QFormLayout, QLineEdit, QWidget

from .common import button, combo, fill, label, row

AUTO, NONE = "auto", "(none)"


class DataPanel(QWidget):
    def __init__(self, session, parent=None):
        super().__init__(parent)
        self.session = session
        form = QFormLayout(self)
        self.slide = combo(tooltip="The slide to work on: a Points layer opened with this plugin's reader.")
        self.slide.currentTextChanged.connect(self._slide_chosen)
        form.addRow("Slide", self.slide)
        form.addRow("", button("Open .h5ad / SpatialData store…", self._open,
                               "Read a slide file; it is added to the viewer as a layer."))
        self.section = combo(tooltip="obs column naming each cell's section (auto = detect; (none) = one section). "
                                     "Views never cross sections.")
        self.labels = combo(tooltip="obs column of cell types: for fine-tuning, probes and scores.")
        self.domains = combo(tooltip="obs column of reference spatial domains, to score and colour domains by.")
        for box in (self.section, self.labels, self.domains):
            box.currentTextChanged.connect(self._keys_changed)
        form.addRow("Sections", self.section)
        form.addRow("Cell types", self.labels)
        form.addRow("Reference domains", self.domains)
        self.unknown = QLineEdit()
        self.unknown.setPlaceholderText("e.g. Doublet, Low quality")
        self.unknown.setToolTip("Label values that mean 'unlabelled' (comma-separated), beside NaN, empty, "
                                "Excluded, Ambiguous, Unassigned and unknown, which always do. Unlabelled cells "
                                "stay in the graph but out of training and scores.")
        self.unknown.editingFinished.connect(self._keys_changed)
        form.addRow("Also unlabelled", self.unknown)
        self.summary = label()
        form.addRow(self.summary)
        self.gene = combo(editable=True, tooltip="A gene to show on the tissue (log-normalised expression).")
        form.addRow("Gene", row(self.gene, button("Show", self._show_gene)))
        ev = session.events
        ev.slide_choices.connect(self._choices)
        ev.slide.connect(self._slide)
        ev.settings.connect(lambda *_: self._render_keys())

    def _choices(self, names: list[str]) -> None:
        current = self.session.slide.name if self.session.slide is not None else self.slide.currentText()
        fill(self.slide, names, current)
        if names and self.session.slide is None:
            self.session.guarded(self.session.choose_slide, self.slide.currentText())

    def _slide_chosen(self, name: str) -> None:
        if name and (self.session.slide is None or self.session.slide.name != name):
            self.session.guarded(self.session.choose_slide, name)

    def _open(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open a slide", "", "AnnData (*.h5ad);;All files (*)")
        if path:
            self.session.guarded(self.session.open_file, path)

    def _slide(self, slide) -> None:
        if slide is None:
            return
        cols = [str(c) for c in slide.adata.obs.columns]
        few = [c for c in cols if 1 <= slide.adata.obs[c].nunique() <= 1000]
        cfg = self.session.config()
        fill(self.section, [AUTO, NONE] + cols, cfg.data.section_key or NONE)
        fill(self.labels, [NONE] + few, cfg.data.label_key or NONE)
        fill(self.domains, [NONE] + few, cfg.eval.domain_key or NONE)
        fill(self.gene, [str(g) for g in slide.adata.var_names])
        if slide.name != self.slide.currentText():
            fill(self.slide, [self.slide.itemText(i) for i in range(self.slide.count())], slide.name)
        self._render_keys()

    def _keys_changed(self, *_):
        if self.session.slide is None:
            return
        section = self.section.currentText()
        keys = {"section_key": None if section == NONE else section,
                "label_key": None if self.labels.currentText() in ("", NONE) else self.labels.currentText(),
                "domain_key": None if self.domains.currentText() in ("", NONE) else self.domains.currentText(),
                "ignore_labels": [t.strip() for t in self.unknown.text().split(",") if t.strip()]}
        self.session.guarded(self.session.set_keys, **keys)

    def _render_keys(self) -> None:
        session = self.session
        if session.slide is None:
            self.summary.setText("No slide yet: open one, or File > Open Sample > napari-spatialssl.")
            return
        cfg = session.config()
        a = session.slide.adata
        lines = [f"{a.n_obs:,} cells x {a.n_vars:,} genes."]
        text = session.guarded(session.label_summary)
        if text:
            lines.append(text.capitalize() if text.startswith("no ") else f"Cell types {text}.")
        self.summary.setText(" ".join(lines))
        self.unknown.blockSignals(True)
        self.unknown.setText(", ".join(cfg.data.ignore_labels))
        self.unknown.blockSignals(False)

    def _show_gene(self) -> None:
        self.session.guarded(self.session.show_gene, self.gene.currentText().strip())
