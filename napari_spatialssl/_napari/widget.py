"""The napari dock widget: it only assembles the Session, the viewer bridge and the panels.

Seven tabs follow a biologist's loop: Data (the slide and its columns), View (the method and how it
sees the slide, previewed on the tissue), Masking (what the pretext task hides), Train (settings,
Train / Stop, progress and the live loss, models), Results (one result at a time on top of the
tissue, legend or colour bar, headline figures, confusion matrix, the 2-D embedding plot), Region
(hide a drawn region and see what the model puts there) and Export. A status line at the bottom
says what happened, or what went wrong and how to fix it.
"""

from __future__ import annotations

from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QScrollArea, QTabWidget, QVBoxLayout, QWidget

from .layer_updates import ViewerBridge
from .panels.common import DOCK_WIDTH, label
from .panels.data import DataPanel
from .panels.embedding import EmbeddingPanel
from .panels.export import ExportPanel
from .panels.mask import MaskPanel
from .panels.regions import RegionPanel
from .panels.results import ResultsPanel
from .panels.train import TrainPanel
from .panels.view import ViewPanel
from .session import Session
from .widget_settings import load_settings, save_settings
from .workers import Runner

LEVEL_STYLE = {"info": "", "warning": "color: #e0a030;", "error": "color: #e05050;"}


def _scrolled(*panels) -> QScrollArea:
    inner = QWidget()
    lay = QVBoxLayout(inner)
    lay.setContentsMargins(2, 2, 2, 2)
    for panel in panels:
        lay.addWidget(panel)
    area = QScrollArea()
    area.setWidgetResizable(True)
    area.setHorizontalScrollBarPolicy(area.horizontalScrollBarPolicy().ScrollBarAlwaysOff)
    area.setWidget(inner)
    return area


class SpatialSSLWidget(QWidget):
    """Self-supervised learning on spatial transcriptomics, from the tissue to exported results."""

    def __init__(self, viewer, parent=None):
        super().__init__(parent)
        self.viewer = viewer
        self.session = Session(Runner())
        self.session.guarded(self.session.restore_settings, load_settings())
        self.panels = {"data": DataPanel(self.session), "view": ViewPanel(self.session),
                       "mask": MaskPanel(self.session), "train": TrainPanel(self.session),
                       "results": ResultsPanel(self.session), "embedding": EmbeddingPanel(self.session),
                       "region": RegionPanel(self.session), "export": ExportPanel(self.session)}
        self.tabs = QTabWidget()
        for title, names in (("Data", ["data"]), ("View", ["view"]), ("Masking", ["mask"]), ("Train", ["train"]),
                             ("Results", ["results", "embedding"]), ("Region", ["region"]), ("Export", ["export"])):
            self.tabs.addTab(_scrolled(*[self.panels[n] for n in names]), title)
        self.busy = label("")
        self.status = label("Open a slide (.h5ad) or pick a slide layer to start.")
        outer = QVBoxLayout(self)
        outer.addWidget(self.tabs)
        outer.addWidget(self.busy)
        outer.addWidget(self.status)
        self.setMinimumWidth(DOCK_WIDTH)
        self._save_timer = QTimer(self)
        self._save_timer.setSingleShot(True)
        self._save_timer.setInterval(500)
        self._save_timer.timeout.connect(self.save_settings)
        ev = self.session.events
        ev.message.connect(self._message)
        ev.busy.connect(lambda what: self.busy.setText(f"{what[:1].upper()}{what[1:]}…" if what else ""))
        ev.settings.connect(lambda *_: self._save_timer.start())
        ev.method.connect(lambda *_: self._save_timer.start())
        self.bridge = ViewerBridge(viewer, self.session)  # last: it offers the viewer's slides at once
        session, bridge = self.session, self.bridge
        self.destroyed.connect(lambda *_: _teardown(session, bridge))  # the viewer closed under the widget
        self.session.warm_up()

    def _message(self, text: str, level: str) -> None:
        self.status.setStyleSheet(LEVEL_STYLE.get(level, ""))
        self.status.setText(text)
        if level in ("warning", "error"):
            try:
                from napari.utils import notifications

                (notifications.show_warning if level == "warning" else notifications.show_error)(text)
            except Exception:  # noqa: BLE001 - a notification is a courtesy; the status line has the text
                pass

    def save_settings(self) -> None:
        save_settings(self.session.settings_dict())

    def closeEvent(self, event):  # noqa: N802 - Qt naming
        self.save_settings()
        _teardown(self.session, self.bridge)
        super().closeEvent(event)


def _teardown(session, bridge) -> None:
    """The widget is gone: stop training, and no event of the Session reaches its deleted panels."""
    session.stop()
    try:
        bridge.disconnect()
    except (RuntimeError, TypeError, ValueError):  # already disconnected
        pass
    session.events.disconnect()
