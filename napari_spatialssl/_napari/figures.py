"""The dock's figures drawn off the main thread (matplotlib's Agg canvas, no Qt), as RGBA images.

Drawing a matplotlib figure takes a few hundred milliseconds; done in a job, the main thread only
puts the finished image on screen. Figures are drawn one at a time (a lock: matplotlib's font and
text caches are shared). :class:`Figure` keeps where the axes are in the image and their limits,
so the embedding plot can turn a rectangle a person drags into data coordinates.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

_LOCK = threading.Lock()
DPI = 90


@dataclass
class Figure:
    """A drawn figure: the image, the axes' box in the image (x0, y0, x1, y1 pixels from the top left)
    and their data limits, so that pixels map back to data."""

    image: np.ndarray  # (h, w, 4) uint8
    box: tuple[float, float, float, float] | None = None
    xlim: tuple[float, float] | None = None
    ylim: tuple[float, float] | None = None

    def to_data(self, px: float, py: float) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        fx, fy = (px - x0) / max(x1 - x0, 1e-9), (py - y0) / max(y1 - y0, 1e-9)
        return (self.xlim[0] + fx * (self.xlim[1] - self.xlim[0]), self.ylim[1] - fy * (self.ylim[1] - self.ylim[0]))


def _canvas(width_in: float, height_in: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(width_in, height_in), dpi=DPI, facecolor="#262930")
    return fig, FigureCanvasAgg(fig)


def _style(ax) -> None:
    ax.set_facecolor("#1e1e22")
    ax.tick_params(labelsize=7, colors="#d0d0d0")
    for spine in ax.spines.values():
        spine.set_color("#808080")
    ax.xaxis.label.set_color("#d0d0d0")
    ax.yaxis.label.set_color("#d0d0d0")
    ax.title.set_color("#e0e0e0")


def _finish(fig, canvas, ax=None) -> Figure:
    canvas.draw()
    image = np.asarray(canvas.buffer_rgba()).copy()
    if ax is None:
        return Figure(image)
    h = image.shape[0]
    b = ax.get_window_extent()
    return Figure(image, (b.x0, h - b.y1, b.x1, h - b.y0), tuple(ax.get_xlim()), tuple(ax.get_ylim()))


def loss_figure(steps: list[float], epochs: list[tuple[float, float, float | None]], width: float = 4.2) -> Figure:
    """Loss per step (thin line) and per epoch (dots), validation loss (squares); x = step."""
    with _LOCK:
        fig, canvas = _canvas(width, 1.9)
        ax = fig.add_axes([0.15, 0.22, 0.8, 0.7])
        _style(ax)
        if steps:
            ax.plot(np.arange(1, len(steps) + 1), steps, lw=0.8, color="#7aa6c2", label="step")
        if epochs:
            e = np.asarray([(x, y) for x, y, _ in epochs], float)
            ax.plot(e[:, 0], e[:, 1], "o-", ms=3, color="#4c9be8", label="epoch mean")
            val = [(x, v) for x, _, v in epochs if v is not None and np.isfinite(v)]
            if val:
                v = np.asarray(val, float)
                ax.plot(v[:, 0], v[:, 1], "s--", ms=3, color="#e06060", label="validation")
            ax.legend(fontsize=7, loc="upper right", facecolor="#262930", labelcolor="#d0d0d0")
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("loss", fontsize=8)
        return _finish(fig, canvas)


def colorbar_figure(cmap: str, lo: float, hi: float, label: str, width: float = 4.2) -> Figure:
    from matplotlib import colormaps
    from matplotlib.colorbar import ColorbarBase
    from matplotlib.colors import Normalize

    with _LOCK:
        fig, canvas = _canvas(width, 0.62)
        ax = fig.add_axes([0.05, 0.45, 0.9, 0.25])
        ColorbarBase(ax, cmap=colormaps[cmap], norm=Normalize(lo, hi), orientation="horizontal")
        _style(ax)
        ax.set_title(label, fontsize=7)
        return _finish(fig, canvas)


def embedding_figure(xy: np.ndarray, rgba: np.ndarray, title: str, axes: tuple[str, str],
                     highlight: np.ndarray | None = None, width: float = 4.2) -> Figure:
    with _LOCK:
        fig, canvas = _canvas(width, 3.3)
        ax = fig.add_axes([0.14, 0.12, 0.82, 0.8])
        _style(ax)
        ax.scatter(xy[:, 0], xy[:, 1], c=np.asarray(rgba)[:, :4], s=2, linewidths=0, rasterized=True)
        if highlight is not None and len(highlight):
            ax.scatter(xy[highlight, 0], xy[highlight, 1], s=16, facecolors="none", edgecolors="#ffd000",
                       linewidths=0.8)
        ax.set_xlabel(axes[0], fontsize=8)
        ax.set_ylabel(axes[1], fontsize=8)
        ax.set_title(title, fontsize=8)
        return _finish(fig, canvas, ax)


def confusion_figure(table, title: str, width: float = 4.2) -> Figure:
    """Predicted (rows) against reference (columns), each row as shares of the row."""
    values = table.to_numpy(dtype=float)
    shares = values / np.maximum(values.sum(1, keepdims=True), 1)
    with _LOCK:
        fig, canvas = _canvas(width, 3.0)
        ax = fig.add_axes([0.2, 0.3, 0.75, 0.62])
        _style(ax)
        ax.imshow(shares, cmap="Blues", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(table.columns)), [str(c)[:12] for c in table.columns], rotation=90, fontsize=6)
        ax.set_yticks(range(len(table.index)), [str(c)[:12] for c in table.index], fontsize=6)
        ax.set_xlabel("reference", fontsize=7)
        ax.set_ylabel("predicted", fontsize=7)
        ax.set_title(title, fontsize=8)
        return _finish(fig, canvas)


# -- drawing in a helper process -------------------------------------------------------------------
# Agg keeps the interpreter lock while it draws (hundreds of milliseconds for a scatter plot), which
# would stall the main thread even from a worker thread; a helper process (``python -m
# napari_spatialssl._napari.figures``) draws instead, and the worker thread only waits for its image
# (waiting releases the lock). Messages are a JSON header and numpy arrays (``np.load`` with
# ``allow_pickle=False``): nothing received is executed.

_HELPER = None
_HELPER_LOCK = threading.Lock()


def _pack(value):
    """(JSON-able description, [arrays]) of an argument: arrays, tables, numbers, text, lists."""
    import pandas as pd

    if isinstance(value, np.ndarray):
        return {"array": 0}, [value]
    if isinstance(value, pd.DataFrame):
        return {"table": 0, "index": [str(v) for v in value.index], "columns": [str(v) for v in value.columns]}, \
            [value.to_numpy(dtype=float)]
    if isinstance(value, (list, tuple)) and any(isinstance(v, (np.ndarray, pd.DataFrame)) for v in value):
        parts = [_pack(v) for v in value]
        return {"list": [p[0] for p in parts]}, [a for p in parts for a in p[1]]
    if isinstance(value, (np.floating, np.integer)):
        return {"value": value.item()}, []
    return {"value": value}, []


def _unpack(desc, arrays: list):
    import pandas as pd

    if "array" in desc:
        return arrays.pop(0)
    if "table" in desc:
        return pd.DataFrame(arrays.pop(0), index=desc["index"], columns=desc["columns"])
    if "list" in desc:
        return [_unpack(d, arrays) for d in desc["list"]]
    value = desc["value"]
    return tuple(value) if isinstance(value, list) and len(value) in (2, 4) and all(
        isinstance(v, (int, float)) for v in value) else value


def _send(stream, header: dict, arrays: list) -> None:
    import io
    import json
    import struct

    blobs = []
    for a in arrays:
        buf = io.BytesIO()
        np.save(buf, np.asarray(a), allow_pickle=False)
        blobs.append(buf.getvalue())
    head = json.dumps({**header, "sizes": [len(b) for b in blobs]}).encode()
    stream.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))
    stream.flush()


def _receive(stream) -> tuple[dict, list]:
    import io
    import json
    import struct

    raw = stream.read(8)
    if len(raw) < 8:
        raise EOFError("the figure helper process ended")
    header = json.loads(stream.read(struct.unpack("<Q", raw)[0]))
    arrays = [np.load(io.BytesIO(stream.read(n)), allow_pickle=False) for n in header.pop("sizes")]
    return header, arrays


def _helper():
    global _HELPER
    import subprocess
    import sys

    if _HELPER is None or _HELPER.poll() is not None:
        _HELPER = subprocess.Popen([sys.executable, "-m", "napari_spatialssl._napari.figures"],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        import atexit

        atexit.register(_HELPER.kill)
    return _HELPER


def draw(fn, *args, in_process: bool | None = None) -> Figure:
    """`fn(*args)` (a figure function of this module), drawn in the helper process unless jobs run
    inline (tests) or `in_process`."""
    global _HELPER
    from .workers import sync_workers

    if in_process or (in_process is None and sync_workers()):
        return fn(*args)
    descs, arrays = [], []
    for a in args:
        d, arr = _pack(a)
        descs.append(d)
        arrays += arr
    with _HELPER_LOCK:
        try:
            helper = _helper()
            _send(helper.stdin, {"name": fn.__name__, "args": descs}, arrays)
            header, out = _receive(helper.stdout)
        except (OSError, EOFError, ValueError):
            _HELPER = None
            return fn(*args)  # the helper died: draw here (slower, but drawn)
    if "error" in header:
        raise RuntimeError(f"drawing {fn.__name__} failed: {header['error']}")
    return Figure(out[0], *(tuple(header[k]) if header.get(k) is not None else None for k in ("box", "xlim", "ylim")))


def warm_up() -> None:
    """Start the helper process and load matplotlib in it (called once, off the main thread)."""
    from .workers import sync_workers

    if not sync_workers():
        draw(colorbar_figure, "magma", 0.0, 1.0, "")


def _serve() -> None:
    import sys

    from napari_spatialssl._napari import figures  # the functions under their package name

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        try:
            header, arrays = _receive(stdin)
        except EOFError:
            return
        try:
            fn = getattr(figures, header["name"])
            if not header["name"].endswith("_figure"):
                raise ValueError(f"not a figure function: {header['name']}")
            fig = fn(*[_unpack(d, arrays) for d in header["args"]])
            _send(stdout, {"box": fig.box, "xlim": fig.xlim, "ylim": fig.ylim}, [fig.image])
        except Exception as exc:  # noqa: BLE001 - sent back to the caller
            _send(stdout, {"error": f"{type(exc).__name__}: {exc}"}, [])


if __name__ == "__main__":
    _serve()
