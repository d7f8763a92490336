"""The napari dock widget: configure on the tissue, train in the background, overlay, export."""

from __future__ import annotations

from qtpy.QtWidgets import QLabel, QVBoxLayout, QWidget


class SpatialSSLWidget(QWidget):
    """Self-supervised learning dock widget (being built: sections Data, View, Masking, Train,
    Results, Export)."""

    def __init__(self, viewer, parent=None):
        super().__init__(parent)
        self.viewer = viewer
        layout = QVBoxLayout(self)
        self.status = QLabel("Open a slide (.h5ad) or pick a Points layer to start.")
        self.status.setWordWrap(True)
        layout.addWidget(self.status)
