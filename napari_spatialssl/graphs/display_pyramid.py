"""Millions of cells on screen without a random subsample (Qt-free; the plugin draws the results).

- :func:`colour_pyramid`: a multiscale RGBA image of a per-cell colouring built from *every* cell:
  each base pixel holds the mean colour of the cells inside it (transparent where there are none),
  each coarser level the coverage-weighted mean of 2 x 2 pixels below it. Shown at overview as a
  napari multiscale Image layer (``add_image(p.levels, **p.layer_kwargs())``), it costs a
  constant per frame whatever the number of cells.
- :class:`PointWindow`: a bucket grid over the cells' display coordinates that returns, for a
  rectangle of the view, the cells inside it (or None when there are more than the caller wants
  to draw): the real points, when zoomed in far enough.

Coordinates are napari's display (row, col) in world units (the slide's units after the tiled
layout of sections, as the points layer uses them). Vectorised throughout: sorting and
``np.add.reduceat`` over cells, reshapes over pixels; no Python loop per cell or pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_BASE_PIXELS = 48_000_000  # ~190 MB of RGBA at the finest level
SMALLEST_LEVEL = 512  # stop halving below this many pixels on the longer side


@dataclass
class DisplayPyramid:
    """levels: (H_l, W_l, 4) uint8 RGBA, finest first, each half the previous; pixel_size: world
    units per level-0 pixel; origin: world (row, col) of the level-0 image's top-left corner."""

    levels: list
    pixel_size: float
    origin: tuple[float, float]
    n_cells: int

    def layer_kwargs(self, name: str = "cells (overview)") -> dict:
        """kwargs for ``viewer.add_image(pyramid.levels, **kwargs)``: aligned with the points layer
        (napari centres pixel i at translate + i * scale)."""
        px = float(self.pixel_size)
        return {"multiscale": True, "rgb": True, "scale": (px, px), "name": name,
                "translate": (self.origin[0] + px / 2, self.origin[1] + px / 2)}

    @property
    def nbytes(self) -> int:
        return int(sum(level.nbytes for level in self.levels))


def as_rgba8(colors) -> np.ndarray:
    """Per-cell colours as (n, 4) uint8: from (n, 3|4) floats in [0, 1] or uint8."""
    c = np.asarray(colors)
    if c.ndim != 2 or c.shape[1] not in (3, 4):
        raise ValueError(f"colours must be (n, 3) or (n, 4), got shape {c.shape}")
    if c.dtype != np.uint8:
        c = np.clip(np.rint(np.asarray(c, np.float64) * 255.0), 0, 255).astype(np.uint8)
    if c.shape[1] == 3:
        c = np.concatenate([c, np.full((len(c), 1), 255, np.uint8)], axis=1)
    return c


def category_rgba(codes: np.ndarray, palette_rgba) -> np.ndarray:
    """(n, 4) uint8 colours of categorical `codes` (-1 = no category: transparent) from a palette
    of (k, 3|4) colours; one gather."""
    pal = as_rgba8(palette_rgba)
    pal = np.concatenate([pal, np.zeros((1, 4), np.uint8)])  # index -1 -> transparent
    codes = np.asarray(codes, np.int64)
    return pal[np.where(codes < 0, len(pal) - 1, codes)]


def choose_pixel_size(rowcol: np.ndarray, point_size: float | None = None,
                      max_pixels: int = MAX_BASE_PIXELS) -> float:
    """The level-0 pixel: the point size (about one cell) unless the image would exceed `max_pixels`."""
    lo, hi = rowcol.min(0), rowcol.max(0)
    extent = np.maximum(hi - lo, 1e-9)
    floor = float(np.sqrt(extent[0] * extent[1] / max_pixels))
    return max(float(point_size) if point_size else floor, floor)


def colour_pyramid(rowcol: np.ndarray, colors, *, pixel_size: float | None = None, point_size: float | None = None,
                   max_pixels: int = MAX_BASE_PIXELS, smallest: int = SMALLEST_LEVEL) -> DisplayPyramid:
    """The multiscale image of a colouring of every cell (see the module docstring).

    rowcol: (n, 2) display coordinates; colors: (n, 3|4) per-cell colours (floats in [0, 1] or
    uint8; alpha 0 = not drawn). pixel_size: world units per base pixel (default: `point_size`, or
    larger so that the base holds at most `max_pixels`). A base pixel's colour is the mean of its
    cells' colours (alpha: 255 where a drawn cell falls, else 0)."""
    rowcol = np.asarray(rowcol, np.float64)
    rgba = as_rgba8(colors)
    if len(rowcol) != len(rgba):
        raise ValueError(f"{len(rowcol)} coordinates but {len(rgba)} colours")
    drawn = rgba[:, 3] > 0
    rowcol, rgba = rowcol[drawn], rgba[drawn]
    if not len(rowcol):
        return DisplayPyramid([np.zeros((1, 1, 4), np.uint8)], float(pixel_size or 1.0), (0.0, 0.0), 0)
    px = float(pixel_size) if pixel_size else choose_pixel_size(rowcol, point_size, max_pixels)
    origin = rowcol.min(0)
    ij = np.floor((rowcol - origin) / px).astype(np.int64)
    h, w = int(ij[:, 0].max()) + 1, int(ij[:, 1].max()) + 1
    flat = ij[:, 0] * w + ij[:, 1]
    order = np.argsort(flat, kind="stable")
    flat = flat[order]
    starts = np.flatnonzero(np.r_[True, flat[1:] != flat[:-1]])
    counts = np.diff(np.r_[starts, len(flat)])
    sums = np.add.reduceat(rgba[order, :3].astype(np.uint32), starts, axis=0)
    base = np.zeros((h * w, 4), np.uint8)
    base[flat[starts], :3] = (sums + counts[:, None] // 2) // counts[:, None]
    base[flat[starts], 3] = 255
    levels = [base.reshape(h, w, 4)]
    while max(levels[-1].shape[:2]) > smallest:
        levels.append(_halve(levels[-1]))
    return DisplayPyramid(levels, px, (float(origin[0]), float(origin[1])), int(drawn.sum()))


def _halve(img: np.ndarray) -> np.ndarray:
    """2 x 2 coverage-weighted mean (colours weighted by alpha; alpha averaged), odd sizes padded."""
    h, w = img.shape[:2]
    img = np.pad(img, ((0, h % 2), (0, w % 2), (0, 0)))
    blocks = img.reshape(img.shape[0] // 2, 2, img.shape[1] // 2, 2, 4).astype(np.uint32)
    a = blocks[..., 3]
    a_sum = a.sum((1, 3))
    rgb = (blocks[..., :3] * a[..., None]).sum((1, 3))
    out = np.zeros(a_sum.shape + (4,), np.uint8)
    nz = a_sum > 0
    out[..., :3][nz] = (rgb[nz] + a_sum[nz, None] // 2) // a_sum[nz, None]
    out[..., 3] = (a_sum + 2) // 4
    return out


class PointWindow:
    """The cells inside a rectangle of the view, from a bucket grid built once (sort by bucket).

    `bucket`: side of a bucket in world units (default: such that a bucket holds ~64 cells on
    average). :meth:`query` touches only the buckets the rectangle overlaps."""

    def __init__(self, rowcol: np.ndarray, bucket: float | None = None):
        self.rowcol = np.asarray(rowcol, np.float32)
        n = len(self.rowcol)
        lo = self.rowcol.min(0).astype(np.float64) if n else np.zeros(2)
        hi = self.rowcol.max(0).astype(np.float64) if n else np.ones(2)
        extent = np.maximum(hi - lo, 1e-9)
        if bucket is None:
            bucket = float(np.sqrt(extent[0] * extent[1] * 64.0 / max(n, 1)))
        self.bucket, self.lo = float(bucket), lo
        self.shape = (int(extent[0] // self.bucket) + 1, int(extent[1] // self.bucket) + 1)
        b = self._buckets(self.rowcol)
        self.order = np.argsort(b, kind="stable")
        counts = np.bincount(b, minlength=self.shape[0] * self.shape[1])
        self.starts = np.zeros(len(counts) + 1, np.int64)
        np.cumsum(counts, out=self.starts[1:])

    def _buckets(self, rc: np.ndarray) -> np.ndarray:
        ij = np.floor((rc - self.lo) / self.bucket).astype(np.int64)
        ij[:, 0] = np.clip(ij[:, 0], 0, self.shape[0] - 1)
        ij[:, 1] = np.clip(ij[:, 1], 0, self.shape[1] - 1)
        return ij[:, 0] * self.shape[1] + ij[:, 1]

    def count_upper_bound(self, rows: tuple[float, float], cols: tuple[float, float]) -> int:
        """Cells in the buckets the rectangle overlaps (>= the cells inside it); cheap."""
        ids = self._bucket_ids(rows, cols)
        return int((self.starts[ids + 1] - self.starts[ids]).sum()) if len(ids) else 0

    def _bucket_ids(self, rows, cols) -> np.ndarray:
        lo = np.floor((np.array([rows[0], cols[0]]) - self.lo) / self.bucket).astype(np.int64)
        hi = np.floor((np.array([rows[1], cols[1]]) - self.lo) / self.bucket).astype(np.int64)
        lo = np.maximum(lo, 0)
        hi = np.minimum(hi, np.array(self.shape) - 1)
        if (hi < lo).any():
            return np.zeros(0, np.int64)
        r, c = np.meshgrid(np.arange(lo[0], hi[0] + 1), np.arange(lo[1], hi[1] + 1), indexing="ij")
        return (r * self.shape[1] + c).ravel()

    def query(self, rows: tuple[float, float], cols: tuple[float, float], max_points: int | None = None):
        """Indices (into the coordinates given) of the cells with rows[0] <= row <= rows[1] and
        cols[0] <= col <= cols[1], sorted; None when more than `max_points` cells may be inside
        (then show the overview image instead)."""
        ids = self._bucket_ids(rows, cols)
        if not len(ids):
            return np.zeros(0, np.int64)
        s, e = self.starts[ids], self.starts[ids + 1]
        length = e - s
        total = int(length.sum())
        if max_points is not None and total > 4 * max_points:  # far too many even before the exact cut
            return None
        pos = np.repeat(s - np.cumsum(length) + length, length) + np.arange(total)
        cand = self.order[pos]
        rc = self.rowcol[cand]
        inside = (rc[:, 0] >= rows[0]) & (rc[:, 0] <= rows[1]) & (rc[:, 1] >= cols[0]) & (rc[:, 1] <= cols[1])
        out = np.sort(cand[inside])
        if max_points is not None and len(out) > max_points:
            return None
        return out


def view_rectangle(center: tuple[float, float], zoom: float, canvas_size: tuple[int, int]) -> tuple[tuple, tuple]:
    """((row_min, row_max), (col_min, col_max)) in world units seen by a 2-D napari camera
    (``viewer.camera.center[-2:]``, ``viewer.camera.zoom`` = screen pixels per world unit,
    the canvas size in screen pixels (height, width))."""
    half_r = canvas_size[0] / (2.0 * zoom)
    half_c = canvas_size[1] / (2.0 * zoom)
    return (center[0] - half_r, center[0] + half_r), (center[1] - half_c, center[1] + half_c)
