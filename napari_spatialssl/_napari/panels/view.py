"""View panel: the method, how it views the slide (basic settings, the rest under Advanced), previews."""

from __future__ import annotations

from qtpy.QtWidgets import QCheckBox, QScrollArea, QStackedWidget, QVBoxLayout, QWidget

from ...config import panel_settings
from ..forms import SettingsForm
from .common import button, combo, label, row

DESCRIPTIONS = {
    "gnn-mask": "SpatialSSL: a graph network over each section's radius graph learns to reconstruct every gene of "
                "the cells it hides (20% at a time).",
    "spotscape": "Spotscape: a graph network over each slice's nearest-neighbour graph; two augmented views "
                 "must agree (reconstruction + similarity telescope).",
    "patch-mae": "Patches as images: the slide is binned on a lattice, cut into patches with a few gene "
                 "channels each; a vision transformer fills in hidden parts.",
}


class MethodForms(QWidget):
    """The basic and advanced settings of one method."""

    def __init__(self, session, method: str, panel: str = "view", parent=None):
        super().__init__(parent)
        self.session, self.method = session, method
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        basic, advanced = panel_settings(session.config(method), panel)
        self.basic = SettingsForm(basic, self._edit)
        lay.addWidget(self.basic)
        self.advanced = None
        if advanced:
            self.toggle = QCheckBox(f"Advanced settings ({len(advanced)})")
            self.toggle.setToolTip("Every other setting of the method, with its documentation as a tooltip.")
            self.advanced = SettingsForm(advanced, self._edit)
            scroll = QScrollArea()
            scroll.setWidgetResizable(True)
            scroll.setWidget(self.advanced)
            scroll.setMinimumHeight(220)
            scroll.setVisible(False)
            self.toggle.toggled.connect(scroll.setVisible)
            lay.addWidget(self.toggle)
            lay.addWidget(scroll)

    def _edit(self, name, value) -> None:
        self.session.guarded(self.session.set_setting, name, value, self.method)
        self.refresh()

    def refresh(self) -> None:
        cfg = self.session.config(self.method)
        self.basic.show_values(cfg)
        if self.advanced is not None:
            self.advanced.show_values(cfg)


class ViewPanel(QWidget):
    def __init__(self, session, parent=None):
        super().__init__(parent)
        self.session = session
        lay = QVBoxLayout(self)
        self.method = combo(session.methods, "The self-supervised method to train.")
        self.method.setCurrentText(session.method)
        self.method.currentTextChanged.connect(lambda m: session.guarded(session.set_method, m))
        lay.addWidget(row(label("Method"), self.method))
        self.about = label(DESCRIPTIONS.get(session.method, ""))
        lay.addWidget(self.about)
        self.stack = QStackedWidget()
        self.forms = {m: MethodForms(session, m) for m in session.methods}
        for m in session.methods:
            self.stack.addWidget(self.forms[m])
        lay.addWidget(self.stack)
        lay.addWidget(row(button("Preview the view on the tissue", lambda: session.guarded(session.preview_view),
                                 "Draw the graph's edges (click a cell for its ego-net) or the patch grid.")))
        self.report = label("", "What the method will see: computed from the slide and these settings.")
        lay.addWidget(self.report)
        self.preview_text = label()
        lay.addWidget(self.preview_text)
        lay.addStretch(1)
        ev = session.events
        ev.method.connect(self._method)
        ev.settings.connect(self._settings)
        ev.view.connect(self._report)
        ev.display.connect(self._display)
        self._method(session.method)

    def _method(self, method: str) -> None:
        self.method.blockSignals(True)
        self.method.setCurrentText(method)
        self.method.blockSignals(False)
        self.stack.setCurrentWidget(self.forms[method])
        self.about.setText(DESCRIPTIONS.get(method, ""))
        self.forms[method].refresh()

    def _settings(self, method: str) -> None:
        for m in ([method] if method else self.session.methods):
            if m in self.forms:
                self.forms[m].refresh()
        if method in ("", self.session.method):
            self.session.guarded(self.session.check_view)

    def _report(self, report) -> None:
        if report.method != self.session.method:
            return
        problems = report.errors + report.warnings
        self.report.setText(report.summary() + ("\n" + "\n".join(problems) if problems else ""))
        self.report.setStyleSheet("color: #e0a030;" if problems else "")

    def _display(self, display) -> None:
        if display.top and display.top.startswith("preview:") and not display.top.startswith("preview:mask"):
            self.preview_text.setText(display.text)
