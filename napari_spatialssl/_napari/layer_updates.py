"""Every layer the plugin shows is written here, and the viewer's state goes back to the Session here.

:class:`ViewerBridge` connects one napari viewer to one Session:

- Session -> viewer: a :class:`~.displays.Display` (computed off the main thread) becomes layers,
  each found by its key (``metadata['spatialssl_key']``) and updated in place, never piled up (and
  never removed: removing a layer makes napari collect garbage for about a second); the layer asked
  for goes on top, visible, and the other layers of the roles it replaces are hidden; new slides
  (opened files) are added; results are recorded on the slide layer, so a new widget adopts them;
  a cell selection is ringed.
- viewer -> Session: which slide layers exist, the slide behind a layer, clicks on a cell while a
  view preview is shown, the region drawn in the "region to hide" Shapes layer, cells selected
  on a result layer.
"""

from __future__ import annotations

import logging

import numpy as np

from .big_slides import VIEWPORT
from .displays import Display, LayerSpec
from .results import RESULTS_META

log = logging.getLogger(__name__)

KEY = "spatialssl_key"
REGION_LAYER = "region to hide (draw a rectangle or polygon)"
SOURCE_LAYER = "spatialssl_source_layer"  # on our twin of a napari-spatialdata layer: that layer's name


def slide_layers(viewer) -> list:
    """Points layers that carry a slide (ours or napari-spatialdata's), not the plugin's own layers."""
    from napari.layers import Points

    from ..data.stores import is_spatialdata_layer_metadata

    return [lay for lay in viewer.layers if isinstance(lay, Points) and not lay.metadata.get("spatialssl_role")
            and (lay.metadata.get("adata") is not None and "n_cells_total" in lay.metadata
                 or is_spatialdata_layer_metadata(lay.metadata))]


class ViewerBridge:
    def __init__(self, viewer, session):
        self.viewer, self.session = viewer, session
        self.preview_active = False
        self._selecting = False
        from .workers import sync_workers

        # Adding a layer costs napari ~0.5-0.7 s on the main thread here (layer controls, shaders, first
        # draw under software GL): a display that adds several layers adds one per turn of the event
        # loop, so that the viewer repaints and takes input between them. Inline (test) mode writes
        # everything at once.
        self.stage_new_layers = not sync_workers()
        self._queue: list[tuple[Display, list[LayerSpec]]] = []
        self._staging = False
        self._adding_twin = False  # while our twin of a napari-spatialdata layer is being added
        from .viewport import ViewportPoints

        self.viewport = ViewportPoints(viewer)
        session.slide_provider = self.slide_from_layer
        ev = session.events
        ev.display.connect(self.write)
        ev.results.connect(self._record_results)
        ev.selection.connect(self._ring_selection)
        ev.layer_data.connect(self.add_slide_layer)
        ev.slide.connect(self._slide_opened)
        ev.screenshot.connect(self.save_png)
        ev.draw_region.connect(self.add_region_layer)
        viewer.layers.events.inserted.connect(self._layers_changed)
        viewer.layers.events.removed.connect(self._layers_changed)
        viewer.mouse_drag_callbacks.append(self._on_click)
        self._layers_changed()

    def disconnect(self) -> None:
        """Detach from the viewer (the widget was closed); the layers and their results stay."""
        ev = self.session.events
        for sig, slot in ((ev.display, self.write), (ev.results, self._record_results),
                          (ev.selection, self._ring_selection), (ev.layer_data, self.add_slide_layer),
                          (ev.screenshot, self.save_png), (ev.draw_region, self.add_region_layer),
                          (ev.slide, self._slide_opened)):
            sig.disconnect(slot)
        for sig in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            sig.disconnect(self._layers_changed)
        if self._on_click in self.viewer.mouse_drag_callbacks:
            self.viewer.mouse_drag_callbacks.remove(self._on_click)
        self.viewport.disconnect()

    # -- slides ----------------------------------------------------------------------------
    def _slide_opened(self, *_):
        self._layers_changed()  # a twin layer added while the slide was chosen is offered now

    def _layers_changed(self, *_):
        if self._adding_twin:  # inside slide_from_layer: the Session has no slide yet
            return
        self.session.set_slide_choices([lay.name for lay in slide_layers(self.viewer)])

    def slide_from_layer(self, name: str):
        from .layers import display_coordinates
        from .session import Slide

        layer = self._layer_named(name)
        meta = layer.metadata
        if meta.get("adata") is None or "n_cells_total" not in meta:  # a napari-spatialdata layer: make ours
            twin = next((lay for lay in self.viewer.layers if lay.metadata.get(SOURCE_LAYER) == name), None)
            if twin is None:  # once per napari-spatialdata layer; picked again, it is reused
                from .reader import points_from_spatialdata_layer

                data, kwargs, _ = points_from_spatialdata_layer(meta, f"{name} (spatialssl)")
                kwargs["metadata"][SOURCE_LAYER] = name
                self._adding_twin = True  # the slide list is offered again once the slide is open
                try:
                    twin = self.viewer.add_points(data, **kwargs)
                finally:
                    self._adding_twin = False
            layer, meta = twin, twin.metadata
        source = meta.get(VIEWPORT)  # a huge slide: the layer holds the cells in view, the source every cell
        feats = source.features if source is not None else layer.features
        rows = feats["cell_index"].to_numpy(np.int64) if "cell_index" in feats else np.arange(len(layer.data))
        size = float(np.mean(layer.size)) if np.size(layer.size) else float(meta.get("point_size", 1.0))
        slide = Slide(layer.name, meta["adata"], display_coordinates(meta["adata"], meta), rows[rows >= 0], size,
                      meta.get("section_key"))
        return slide, meta

    def _layer_named(self, name: str):
        if name not in self.viewer.layers:
            from ..data.io import SpatialDataError

            raise SpatialDataError(f"no layer named {name!r} any more; pick a slide layer from the list.")
        return self.viewer.layers[name]

    def add_slide_layer(self, layer_data) -> None:
        from napari.layers import Layer

        from .big_slides import overview_layer_data

        overview = overview_layer_data(layer_data)
        if overview is not None:  # a huge slide: its overview image of every cell, under its points in view
            self.viewer.add_layer(Layer.create(*overview))
        data, kwargs, kind = layer_data
        layer = self.viewer.add_layer(Layer.create(data, kwargs, kind))
        self.session.choose_slide(layer.name)
        self.viewport.refresh()

    def _slide_layer(self):
        slide = self.session.slide
        if slide is None or slide.name not in self.viewer.layers:
            return None
        return self.viewer.layers[slide.name]

    def _record_results(self, method: str) -> None:
        """The slide layer carries the AnnData with every result, and the Session's results."""
        layer = self._slide_layer()
        if layer is not None:
            layer.metadata["adata"] = self.session.slide.adata
            layer.metadata[RESULTS_META] = self.session.results

    # -- writing layers ----------------------------------------------------------------------
    def _find(self, key: str):
        for layer in self.viewer.layers:
            if layer.metadata.get(KEY) == key:
                return layer
        return None

    def write(self, display: Display) -> None:
        self._queue.append((display, list(display.specs)))
        if not self._staging:
            self._write_queued(direct=True)

    def _is_new(self, spec: LayerSpec) -> bool:
        layer = self._find(spec.key)
        return layer is None or type(layer).__name__.lower() != spec.kind

    def _write_queued(self, direct: bool = False) -> None:
        self._staging = True
        try:
            added = False
            while self._queue:
                display, todo = self._queue[0]
                while todo:
                    new = self._is_new(todo[0])
                    if new and added and self.stage_new_layers:
                        from qtpy.QtCore import QTimer

                        QTimer.singleShot(0, self._write_queued)  # the rest on the next turn
                        return
                    self._write_spec(todo.pop(0))
                    added = added or new
                self._queue.pop(0)
                self._finish(display)
        except Exception:  # noqa: BLE001
            self._queue.clear()
            self._staging = False
            if direct:  # the caller (the Session's event) reports it in the status line
                raise
            log.exception("writing layers failed")  # on a later turn: never take the viewer down
        self._staging = False

    def _finish(self, display: Display) -> None:
        keys = {spec.key for spec in display.specs}
        for layer in self.viewer.layers:  # the views this one replaces step back
            role = layer.metadata.get("spatialssl_role")
            if role in display.hide_roles and layer.metadata.get(KEY) not in keys:
                layer.visible = False
        region = self.viewer.layers[REGION_LAYER] if REGION_LAYER in self.viewer.layers else None
        self.preview_active = any(spec.role == "preview" for spec in display.specs)
        slide = self._slide_layer()
        if slide is not None:  # previews fade the tissue so that edges and masks stand out; panels cover it
            overview = self.viewport.overview_of(slide)
            for layer in [slide] + ([overview] if overview is not None else []):
                layer.opacity = 0.35 if display.slide == "dim" else 1.0
                layer.visible = display.slide != "hide"
        order = [s.key for s in display.specs if s.key != display.top] + ([display.top] if display.top else [])
        on_top = [self._find(key) for key in order] + [region, self._find("selection")]
        on_top = [layer for layer in on_top if layer is not None and layer in self.viewer.layers]
        if list(self.viewer.layers)[-len(on_top):] != on_top:  # reordering redraws: only when needed
            for layer in on_top:  # the layer asked for ends on top, its titles and drawings above it
                self.viewer.layers.move(self.viewer.layers.index(layer), len(self.viewer.layers))
        if any(spec.role in ("compare", "region") for spec in display.specs):
            self.viewer.reset_view()
        self.viewport.refresh()  # layers of millions of points: the cells in view of the new ones

    def _write_spec(self, spec: LayerSpec):
        layer = self._find(spec.key)
        meta = {**spec.metadata, KEY: spec.key}
        if layer is not None and type(layer).__name__.lower() != spec.kind:
            layer.visible = False
            layer.metadata[KEY] = None
            layer = None
        style = dict(spec.style)
        if layer is None:
            adder = {"points": self.viewer.add_points, "vectors": self.viewer.add_vectors,
                     "shapes": self.viewer.add_shapes, "image": self.viewer.add_image}[spec.kind]
            kwargs = {"name": spec.name, "metadata": meta, **style}
            if spec.features is not None:
                kwargs["features"] = spec.features
            layer = adder(spec.data, **kwargs)
            if spec.role in ("result", "compare") and spec.kind == "points":
                self.watch_selection(layer)
            return layer
        if spec.kind == "points":
            self._update_points(layer, spec, style)
        elif spec.kind == "shapes":
            layer.data = []
            if len(spec.data):
                layer.add(list(spec.data), shape_type=style.pop("shape_type", "rectangle"),
                          edge_color=style.get("edge_color"), face_color=style.get("face_color"),
                          edge_width=style.get("edge_width", 1))
        else:
            layer.data = spec.data
            for attr in ("edge_color", "edge_width", "colormap", "blending", "translate", "scale", "contrast_limits"):
                if attr in style:
                    setattr(layer, attr, style[attr])
        layer.name = spec.name
        if VIEWPORT not in meta:  # no longer millions of points: drawn as they are
            layer.metadata.pop(VIEWPORT, None)
            layer.metadata.pop("spatialssl_in_view", None)
        layer.metadata.update(meta)
        layer.visible = True
        return layer

    def _update_points(self, layer, spec: LayerSpec, style: dict) -> None:
        data = np.asarray(spec.data, np.float64)
        self._selecting = True
        try:
            layer.selected_data = set()
        finally:
            self._selecting = False
        if len(layer.data) != len(data) or not np.array_equal(layer.data, data):
            layer.data = data
        if spec.features is not None:
            layer.features = spec.features
        text = style.pop("text", None)
        for attr in ("border_width_is_relative", "size", "translate", "opacity", "face_color", "border_color",
                     "border_width"):
            if attr in style:
                setattr(layer, attr, style[attr])
        if text is not None:
            layer.text = text

    # -- viewer -> Session -------------------------------------------------------------------
    def _on_click(self, viewer, event):
        """A click near a cell, while a view preview is shown, previews that cell."""
        if not self.preview_active or event.type != "mouse_press" or self.session.slide is None:
            return
        layer = self._slide_layer()
        if layer is None:
            return
        from .previews import nearest_point

        where = np.asarray(layer.world_to_data(event.position))[-2:]
        slide = self.session.slide
        cell = int(slide.shown[nearest_point(slide.positions[slide.shown], where)])
        self.session.guarded(self.session.preview_view, cell)

    def add_region_layer(self):
        """The Shapes layer in which a person draws the region to hide (rectangle mode)."""
        if REGION_LAYER in self.viewer.layers:
            layer = self.viewer.layers[REGION_LAYER]
        else:
            size = self.session.slide.point_size if self.session.slide is not None else 1.0
            layer = self.viewer.add_shapes(name=REGION_LAYER, edge_color="#ffff00", face_color=[1, 1, 0, 0.15],
                                           edge_width=size * 0.4, metadata={"spatialssl_role": "draw"})
            layer.events.data.connect(lambda *_: self._region_drawn(layer))
        layer.visible = True
        self.viewer.layers.selection.active = layer
        layer.mode = "add_rectangle"
        return layer

    def _region_drawn(self, layer) -> None:
        if len(layer.data):
            self.session.set_region(np.asarray(layer.data[-1])[:, -2:])

    def _on_selected(self, layer) -> None:
        if self._selecting:
            return
        idx = np.fromiter(layer.selected_data, dtype=np.int64)
        if "cell_index" in layer.features:
            self.session.select_cells(layer.features["cell_index"].to_numpy()[idx])

    def _ring_selection(self, cells) -> None:
        slide = self.session.slide
        if slide is None:
            return
        cells = np.asarray(cells, np.int64)
        from .displays import points_spec

        rgba = np.tile(np.array([[1.0, 1.0, 0.0, 0.25]], np.float32), (len(cells), 1))
        ring = np.tile(np.array([[1.0, 1.0, 0.0, 1.0]], np.float32), (len(cells), 1))
        spec = points_spec("selection", f"selected cells ({len(cells):,})", slide.positions[cells], rgba,
                           slide.point_size * 2.0, cells, role="selection", border=ring, border_width=0.25)
        layer = self._write_spec(spec)
        self.viewer.layers.move(self.viewer.layers.index(layer), len(self.viewer.layers))

    def watch_selection(self, layer) -> None:
        """Cells a person selects on a result layer (select tool) become the Session's selection."""
        events = layer.selected_data.events
        signal = getattr(events, "items_changed", None)  # psygnal's Selection (a signal with no slot is falsy)
        if signal is None:
            signal = events.changed
        signal.connect(lambda *_: self._on_selected(layer))

    def save_png(self, path) -> None:
        self.viewer.screenshot(str(path), canvas_only=True, flash=False)
        self.session.say(f"Saved the view to {path}.")
