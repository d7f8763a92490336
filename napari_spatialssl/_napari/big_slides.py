"""Slides of millions of cells on screen, every cell drawn, no random subsample (Qt-free).

napari draws a Points layer of 2 million cells at ~1.7 s per frame here (benchmarks/napari_scale.py),
so above ``OVERVIEW_ABOVE_POINTS`` points a layer is shown as two layers:

- an **overview image**: a multiscale RGBA image of the colouring of every point
  (:func:`..graphs.display_pyramid.colour_pyramid`: each pixel the mean colour of its cells), which
  costs a constant per frame whatever the number of cells;
- the **points in view**: a Points layer that holds only the cells inside the camera's rectangle
  when there are at most ``IN_VIEW_MAX_POINTS`` of them (zoomed in), else none. Its
  ``metadata[VIEWPORT]`` is a :class:`ViewportSource` over every point; the viewer bridge refreshes
  the layer from it after the camera stops moving.

The slide layer of such a slide (the reader's) and every result, comparison or preview layer above the
threshold go the same way (:func:`fit_display`, run off the main thread with the display it changes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..graphs.display_pyramid import PointWindow, colour_pyramid
from .layers import DEFAULT_MAX_POINTS

OVERVIEW_ABOVE_POINTS = DEFAULT_MAX_POINTS
"""Layers with more points than this are drawn as an overview image plus the points in view."""
IN_VIEW_MAX_POINTS = 40_000
"""The points in view are drawn when at most this many cells are inside the view (napari sets ~40k
points in ~30 ms here); zoomed out further, the overview image alone shows them."""
VIEWPORT = "spatialssl_viewport"  # layer.metadata key of a ViewportSource
OVERVIEW = "spatialssl_overview"  # metadata key of a points layer data's DisplayPyramid (reader layers)
EMPTY_STYLE = {"face_color": "#e0e0e0", "border_color": "#e0e0e0", "border_width": 0.0}  # no point in view yet


@dataclass
class ViewportSource:
    """Every point of a layer drawn as 'overview + points in view': positions (display (row, col),
    without the layer's translate), colours, border and per-point features."""

    positions: np.ndarray
    face: np.ndarray
    border: np.ndarray
    border_width: np.ndarray
    features: pd.DataFrame | None
    max_points: int = IN_VIEW_MAX_POINTS
    window: PointWindow = field(init=False, repr=False)

    def __post_init__(self):
        self.positions = np.asarray(self.positions, np.float32)
        self.window = PointWindow(self.positions)

    @property
    def n_points(self) -> int:
        return int(len(self.positions))

    def in_view(self, rows: tuple[float, float], cols: tuple[float, float]) -> np.ndarray:
        """Indices of the points inside the rectangle (world units, the layer's translate removed);
        none when more than ``max_points`` are inside (the overview image shows them)."""
        idx = self.window.query(rows, cols, max_points=self.max_points)
        return np.zeros(0, np.int64) if idx is None else idx

    def layer_values(self, idx: np.ndarray) -> dict:
        """What the Points layer holds for points `idx`: data, colours, border, features."""
        idx = np.asarray(idx, np.int64)
        out = {"data": self.positions[idx].astype(np.float64), "face_color": self.face[idx],
               "border_color": self.border[idx], "border_width": self.border_width[idx]}
        if self.features is not None:
            out["features"] = self.features.iloc[idx].reset_index(drop=True)
        return out


def _per_point(value, n: int, width: int | None = None) -> np.ndarray:
    a = np.asarray(value, np.float32)
    if width is None:
        return np.ascontiguousarray(np.broadcast_to(a, (n,))) if a.ndim == 0 else a
    return np.ascontiguousarray(np.broadcast_to(a, (n, width))) if a.ndim == 1 else a


def source_of_spec(spec) -> ViewportSource:
    """The ViewportSource of a points LayerSpec (explicit RGBA colours, as displays.points_spec makes)."""
    n = len(spec.data)
    face = _per_point(spec.style["face_color"], n, 4)
    border = _per_point(spec.style.get("border_color", face), n, 4)
    width = _per_point(spec.style.get("border_width", 0.0), n)
    return ViewportSource(np.asarray(spec.data), face, border, width, spec.features)


def overview_spec(spec, source: ViewportSource):
    """The overview image LayerSpec of a points LayerSpec (same role, drawn under its points)."""
    from .displays import LayerSpec

    pyramid = colour_pyramid(source.positions, source.face, point_size=float(spec.style.get("size", 1.0)))
    style = pyramid.layer_kwargs(f"{spec.name} (overview of {source.n_points:,} cells)")
    name = style.pop("name")
    shift = np.asarray(spec.style.get("translate", (0.0, 0.0)), np.float64)[-2:]  # panels: the layer's offset
    style["translate"] = tuple(np.asarray(style["translate"], np.float64) + shift)
    meta = {**spec.metadata, "spatialssl_overview_of": spec.key}
    return LayerSpec(f"{spec.key}:overview", "image", name, pyramid.levels, style, None, meta, spec.role)


def fit_display(display, limit: int | None = None):
    """`display` with each points layer of more than `limit` points (default OVERVIEW_ABOVE_POINTS)
    replaced by its overview image and its points in view (empty until the viewer asks for the view);
    the others unchanged. Run it off the main thread: the overview of 4.3M cells takes ~10 s."""
    from .displays import LayerSpec

    limit = OVERVIEW_ABOVE_POINTS if limit is None else int(limit)
    specs = []
    for spec in display.specs:
        if spec.kind != "points" or len(spec.data) <= limit:
            specs.append(spec)
            continue
        source = source_of_spec(spec)
        specs.append(overview_spec(spec, source))
        empty = source.layer_values(np.zeros(0, np.int64))
        specs.append(LayerSpec(spec.key, "points", f"{spec.name} (cells in view)", empty["data"],
                               {**spec.style, **EMPTY_STYLE}, empty.get("features"),
                               {**spec.metadata, VIEWPORT: source}, spec.role))
    display.specs = specs
    return display


def fitted(fn):
    """`fn`, whose Display is then fitted to the screen in the same job, off the main thread (see
    :func:`fit_display`)."""
    def job(*args):
        return fit_display(fn(*args))
    return job


def slide_colours(adata, features: pd.DataFrame, key: str | None) -> np.ndarray:
    """(n, 4) RGBA of every cell as the reader colours the slide layer by `key` (None: light grey)."""
    from .displays import categorical_colors, continuous_colors
    from .layers import category_colors

    n = len(features)
    if not key:
        return np.tile(np.array([[0.878, 0.878, 0.878, 1.0]], np.float32), (n, 1))
    col = features[key]
    if isinstance(col.dtype, pd.CategoricalDtype) or col.dtype == object or pd.api.types.is_bool_dtype(col):
        named = category_colors(adata, key) if adata is not None and key in adata.obs.columns else None
        return categorical_colors(col.to_numpy(), named)[0]
    return continuous_colors(pd.to_numeric(col, errors="coerce").to_numpy(np.float64), "viridis")[0]


def slide_overview(data: np.ndarray, features: pd.DataFrame, kwargs: dict, adata, key: str | None) -> None:
    """Turn the reader's points layer data of a huge slide (every cell in `data`) into 'overview + points
    in view', in place: kwargs gain the ViewportSource and the overview pyramid; returns nothing (the
    caller empties the layer's data)."""
    rgba = slide_colours(adata, features, key)
    source = ViewportSource(data, rgba, rgba, np.zeros(len(data), np.float32), features)
    meta = kwargs["metadata"]
    meta[VIEWPORT] = source
    meta[OVERVIEW] = colour_pyramid(source.positions, rgba, point_size=float(kwargs["size"]))
    for k in ("face_color_cycle", "border_color_cycle", "face_colormap", "border_colormap", "face_contrast_limits",
              "border_contrast_limits"):
        kwargs.pop(k, None)
    kwargs.update(EMPTY_STYLE, features=source.layer_values(np.zeros(0, np.int64))["features"])
    kwargs.pop("feature_defaults", None)


def overview_layer_data(layer_data):
    """The overview image LayerData of a huge slide's points layer data (None for other slides)."""
    _, kwargs, _ = layer_data
    pyramid = kwargs["metadata"].get(OVERVIEW)
    if pyramid is None:
        return None
    n = kwargs["metadata"]["n_cells_total"]
    img = pyramid.layer_kwargs(f"{kwargs['name']} (overview of all {n:,} cells)")
    img["metadata"] = {"spatialssl_overview_of": kwargs["name"]}
    return pyramid.levels, img, "image"


def with_overviews(layers: list) -> list:
    """Reader output for napari: each huge slide's overview image just under its points layer."""
    out = []
    for layer_data in layers:
        image = overview_layer_data(layer_data)
        if image is not None:
            out.append(image)
        out.append(layer_data)
    return out
