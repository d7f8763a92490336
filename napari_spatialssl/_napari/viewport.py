"""The points in view of layers of millions of cells (see big_slides.py), kept up to date as the camera moves.

Each layer whose ``metadata[VIEWPORT]`` holds a :class:`~.big_slides.ViewportSource` is refilled with
the cells inside the view ``DELAY_MS`` after the camera stops moving (or emptied when more than
``IN_VIEW_MAX_POINTS`` are inside: the overview image under it shows them). The refresh runs on the
main thread because napari layers may only be changed there; it is a bucket-grid query and at most
IN_VIEW_MAX_POINTS points (tens of ms, measured in tests/test_big_slides.py and
benchmarks/napari_scale.py).
"""

from __future__ import annotations

import time

import numpy as np

from ..graphs.display_pyramid import view_rectangle
from .big_slides import VIEWPORT


def camera(viewer):
    """The 2-D camera (``viewer.scene.camera`` since napari 0.9, ``viewer.camera`` before)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


class ViewportPoints:
    DELAY_MS = 120

    def __init__(self, viewer):
        self.viewer = viewer
        self._timer = None
        self.last_refresh_ms = 0.0  # how long the last refresh held the main thread
        self.camera = camera(viewer)
        self.camera.events.center.connect(self.schedule)
        self.camera.events.zoom.connect(self.schedule)

    def disconnect(self) -> None:
        for sig in (self.camera.events.center, self.camera.events.zoom):
            sig.disconnect(self.schedule)
        if self._timer is not None:
            self._timer.stop()

    def schedule(self, *_) -> None:
        """Refresh once the camera has been still for DELAY_MS (panning never waits on it)."""
        if not self.layers():
            return
        from qtpy.QtCore import QTimer

        if self._timer is None:
            self._timer = QTimer()
            self._timer.setSingleShot(True)
            self._timer.timeout.connect(self.refresh)
        self._timer.start(self.DELAY_MS)

    def layers(self) -> list:
        return [lay for lay in self.viewer.layers if lay.metadata.get(VIEWPORT) is not None]

    def view(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """((row_min, row_max), (col_min, col_max)) of the world the canvas shows."""
        size = tuple(int(v) for v in self.viewer.canvas.size)
        return view_rectangle(tuple(self.camera.center[-2:]), float(self.camera.zoom), size)

    def overview_of(self, layer):
        """The overview image drawn under the points layer `layer` (the reader's slide layer by its name,
        the plugin's layers by their key)."""
        names = {layer.name, layer.metadata.get("spatialssl_key")} - {None}
        return next((lay for lay in self.viewer.layers if lay.metadata.get("spatialssl_overview_of") in names), None)

    def refresh(self, *_) -> None:
        """Each visible layer of millions of cells holds the cells in view (at most IN_VIEW_MAX_POINTS),
        with its overview image hidden while they are drawn (the points, not the image's square
        pixels, when zoomed in), or no points over its overview image."""
        t0 = time.perf_counter()
        rows, cols = self.view()
        for layer in self.layers():
            overview = self.overview_of(layer)
            if not layer.visible:
                continue
            source = layer.metadata[VIEWPORT]
            t = np.asarray(layer.translate, np.float64)[-2:]
            idx = source.in_view((rows[0] - t[0], rows[1] - t[0]), (cols[0] - t[1], cols[1] - t[1]))
            shown = layer.metadata.get("spatialssl_in_view")
            if shown is None or shown[0] is not source or not np.array_equal(shown[1], idx):
                self._fill(layer, source.layer_values(idx))
                layer.metadata["spatialssl_in_view"] = (source, idx)
            if overview is not None and overview.visible != (len(idx) == 0):
                overview.visible = len(idx) == 0
        self.last_refresh_ms = (time.perf_counter() - t0) * 1000.0

    @staticmethod
    def _fill(layer, values: dict) -> None:
        selected = getattr(layer, "selected_data", None)
        if selected:
            layer.selected_data = set()
        layer.data = values["data"]
        if "features" in values:
            layer.features = values["features"]
        if len(values["data"]):  # (napari takes no colour array for no points)
            layer.face_color = values["face_color"]
            layer.border_color = values["border_color"]
            layer.border_width = values["border_width"]
