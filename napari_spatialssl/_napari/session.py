"""The plugin's one Session: the slide, every setting, the caches, the job and the results (Qt-free).

Panels render the Session and call its actions; they never reach into each other. The Session
announces every change as a psygnal event (``session.events``), starts every background job
through its runner (``workers.Runner``: napari thread workers, or inline in tests), and hands what
a person should see to ``layer_updates`` as :class:`~.displays.Display` objects computed off the
main thread. It imports neither Qt nor napari, so it is driven in tests without a display.

Settings: one config dataclass per method (``session.configs``) is the only copy of every setting;
the slide's keys (section, labels, reference domains, unknown labels) live in each config's
``data`` / ``eval``; persistence is ``config_to_dict``. Caches (geometry, view reports) are keyed
by the slide and the config they were built from, so a changed setting simply misses the cache.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Callable

import numpy as np
from psygnal import Signal, SignalGroup

from ..config import apply_overrides, config_from_dict, config_to_dict, validate_config
from ..data.io import SpatialDataError
from . import actions, result_actions
from .results import Result, adopt, result_from_output
from .workers import Runner

METHOD_ORDER = ("gnn-mask", "spotscape", "patch-mae")


@dataclass
class Slide:
    """The slide being worked on: its AnnData and where each cell is drawn."""

    name: str
    adata: object
    positions: np.ndarray  # (n_cells, 2) display (row, col) of every cell
    shown: np.ndarray  # rows the displays colour: every cell (huge slides: overview image + cells in view)
    point_size: float
    layer_section_key: str | None = None

    @classmethod
    def from_adata(cls, adata, name: str = "slide", **points_kwargs) -> "Slide":
        """A Slide laid out as the reader lays it out (for scripts and tests without napari)."""
        from .layers import adata_to_points, display_coordinates

        from .big_slides import VIEWPORT

        data, kwargs, _ = adata_to_points(adata, name=name, **points_kwargs)
        meta = kwargs["metadata"]
        feats = meta[VIEWPORT].features if VIEWPORT in meta else kwargs["features"]  # huge: every cell
        rows = feats["cell_index"].to_numpy(np.int64)
        return cls(name, adata, display_coordinates(adata, meta), rows, float(kwargs["size"]), meta.get("section_key"))


@dataclass
class JobState:
    kind: str = "idle"  # idle | training | predicting | saving | exporting
    text: str = ""


class SessionEvents(SignalGroup):
    slide = Signal(object)  # Slide | None
    slide_choices = Signal(list)  # names of the slides the user can pick
    settings = Signal(str)  # a method's settings changed ("" = every method: the slide's keys)
    method = Signal(str)  # the method the panels show
    job = Signal(object)  # JobState of the main job
    busy = Signal(str)  # a side job started ("" when none runs)
    progress = Signal(object)  # progress.Progress
    view = Signal(object)  # preflight.ViewReport of the current method on the slide
    display = Signal(object)  # displays.Display to write
    results = Signal(str)  # a method's results were added or changed
    region = Signal(object)  # evaluation.regions.RegionReport
    selection = Signal(object)  # (n,) int cell indices selected (tissue or embedding plot)
    region_drawn = Signal(object)  # (k, 2) polygon of the region to hide, display coordinates
    plot = Signal(object)  # actions.EmbeddingPoints: the 2-D embedding plot of a result
    summary = Signal(object)  # actions.Summary: a result's headline figures and confusion matrix
    figure = Signal(str, object)  # (name, figures.Figure) drawn off the main thread
    layer_data = Signal(object)  # a slide read from a file, as napari layer data, to add
    screenshot = Signal(object)  # a path: save a PNG of the view
    draw_region = Signal()  # a person wants to draw the region to hide
    message = Signal(str, str)  # text, level: info | warning | error


class Session:
    """State, events and actions of the plugin (see the module docstring)."""

    def __init__(self, runner: Runner | None = None, methods: list[str] | None = None):
        from ..models.base import METHODS, get_method_class

        get_method_class("gnn-mask")  # registers the built-in methods
        self.events = SessionEvents()
        self.runner = runner if runner is not None else Runner()
        self.methods = methods or [m for m in METHOD_ORDER if m in METHODS] + \
            sorted(m for m in METHODS if m not in METHOD_ORDER)
        self.configs = {m: get_method_class(m).config_class() for m in self.methods}
        self.method = self.methods[0]
        self.slide: Slide | None = None
        self.slide_provider: Callable[[str], tuple[Slide, dict]] | None = None
        self.results: dict[str, Result] = {}
        self.job = JobState()
        self._pipeline = None
        self._side_busy: dict[str, str] = {}
        self._side_pending: dict[str, tuple] = {}
        self._cache: dict = {}
        self.shown: tuple[str, str, str | None] | None = None  # (method, what, gene) last shown
        self.region_report = None
        self.region_polygon: np.ndarray | None = None
        self.selected_cells = np.zeros(0, np.int64)
        self.devices = 1  # training processes (the CLI's fit --devices): one per GPU, or gloo ranks on CPU

    # -- messages --------------------------------------------------------------------------
    def say(self, text: str, level: str = "info") -> None:
        self.events.message.emit(text, level)

    def fail(self, exc: BaseException) -> None:
        """An error from an action or a job: one line for a person, never a traceback (the traceback
        of an unexpected error goes to the log)."""
        import logging
        import traceback

        from ..cli import describe_error

        while type(exc).__name__ == "EmitLoopError" and exc.__cause__ is not None:  # psygnal wraps callbacks' errors
            exc = exc.__cause__
        if not isinstance(exc, (SpatialDataError, OSError)):
            logging.getLogger(__name__).error("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        self.say(describe_error(exc), "error")

    def guarded(self, fn, *args, **kwargs):
        """Run an action; an error becomes a message (the viewer never sees an exception)."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every error is shown to the user
            self.fail(exc)
            return None

    # -- the slide -------------------------------------------------------------------------
    def set_slide_choices(self, names: list[str]) -> None:
        self.events.slide_choices.emit(list(names))

    def choose_slide(self, name: str) -> None:
        """Work on the slide layer `name` (resolved by the bridge that knows the viewer)."""
        if self.slide_provider is None:
            raise SpatialDataError("no viewer to take slides from; open an .h5ad file instead.")
        slide, layer_metadata = self.slide_provider(name)
        self.open_slide(slide, adopted=adopt(layer_metadata))

    def open_slide(self, slide: Slide, adopted: dict[str, Result] | None = None) -> None:
        """Start working on `slide`; results it already carries (an earlier widget's, or recorded in
        its AnnData) are adopted, so a reopened widget shows them."""
        if self.job.kind != "idle":
            raise SpatialDataError(f"wait for the current {self.job.kind} to finish before changing the slide.")
        self.slide = slide
        self.results = dict(adopted or {})
        self.region_report = None
        self._default_keys(slide)
        self.events.slide.emit(slide)
        self.events.settings.emit("")
        for method in self.results:
            self.events.results.emit(method)
        n = slide.adata.n_obs
        note = f"; {len(self.results)} earlier result(s) adopted: {', '.join(self.results)}" if self.results else ""
        self.say(f"Slide '{slide.name}': {n:,} cells x {slide.adata.n_vars:,} genes{note}.")
        self.check_view()

    def open_file(self, path) -> None:
        """Read a slide file (.h5ad or SpatialData store) off the main thread; it is added as a layer."""
        actions.open_file(self, path)

    def require_slide(self) -> Slide:
        if self.slide is None:
            raise SpatialDataError("no slide yet: open an .h5ad file (Data, 'Open…') or load a sample "
                                   "(File > Open Sample > napari-spatialssl).")
        return self.slide

    def _default_keys(self, slide: Slide) -> None:
        """The section key the layer was laid out with, and a cell-type-like label column."""
        from .layers import detect_label_key

        obs = slide.adata.obs
        label = detect_label_key(obs)
        for cfg in self.configs.values():
            dc = cfg.data
            dc.section_key = slide.layer_section_key if slide.layer_section_key else (
                dc.section_key if dc.section_key in (None, "auto") or dc.section_key in obs.columns else "auto")
            if dc.label_key not in obs.columns:
                dc.label_key = label if label != slide.layer_section_key else None
            if cfg.eval.domain_key not in obs.columns:
                cfg.eval.domain_key = None

    # -- settings --------------------------------------------------------------------------
    def config(self, method: str | None = None):
        return self.configs[method or self.method]

    def set_method(self, method: str) -> None:
        if method not in self.configs:
            raise SpatialDataError(f"unknown method {method!r}; available: {', '.join(self.methods)}.")
        if method != self.method:
            self.method = method
            self.events.method.emit(method)
            self.check_view()

    def set_setting(self, name: str, value, method: str | None = None) -> bool:
        """Set one setting (dotted name, e.g. 'mask.ratio') of a method's config, validated; the
        config is only changed when the new value is valid. Returns whether it was."""
        method = method or self.method
        trial = copy.deepcopy(self.configs[method])
        apply_overrides(trial, {name: value}, parse_text=False)
        validate_config(trial)
        self.configs[method] = trial
        self.events.settings.emit(method)
        return True

    def max_devices(self) -> int:
        """How many training processes this machine offers (one per GPU, else per CPU core)."""
        return actions.max_devices()

    def set_devices(self, n) -> None:
        """Train on `n` local processes (data-parallel, torch.distributed): this one is rank 0."""
        self.devices = actions.checked_devices(n)
        self.events.settings.emit(self.method)

    def set_keys(self, **keys) -> None:
        """The slide's keys, for every method: section_key, label_key, domain_key (None = none),
        ignore_labels (values meaning 'unlabelled', beside the standard ones)."""
        trials = {m: copy.deepcopy(c) for m, c in self.configs.items()}
        for cfg in trials.values():
            for key, value in keys.items():
                target = cfg.eval if key == "domain_key" else cfg.data
                setattr(target, key, list(value) if key == "ignore_labels" else value)
            validate_config(cfg)
        self.configs = trials
        self.events.settings.emit("")
        self.check_view()

    def label_summary(self) -> str:
        """'31 classes, 1,632 unlabelled (Excluded)' for the current label key."""
        from ..data.io import label_codes

        slide = self.require_slide()
        dc = self.config().data
        if not dc.label_key:
            return "no label column: cell-type fine-tuning and label scores are off"
        codes, names = label_codes(slide.adata, dc.label_key, dc.ignore_labels)
        values = slide.adata.obs[dc.label_key].astype(str)[codes < 0]
        which = ", ".join(sorted(set(values))[:4])
        return (f"'{dc.label_key}': {len(names)} classes, {int((codes < 0).sum()):,} unlabelled"
                + (f" ({which})" if which else ""))

    def settings_dict(self) -> dict:
        return {"method": self.method, "configs": {m: config_to_dict(c) for m, c in self.configs.items()}}

    def restore_settings(self, saved: dict) -> None:
        """Settings saved by :meth:`settings_dict`; a method whose saved settings no longer validate keeps
        its defaults (a settings file is never an error)."""
        from ..models.base import get_method_class

        for m, values in (saved.get("configs") or {}).items():
            if m not in self.configs:
                continue
            try:
                cfg = validate_config(config_from_dict(get_method_class(m).config_class, values))
            except (SpatialDataError, TypeError, ValueError):
                continue
            for key in ("section_key", "label_key", "ignore_labels", "spatial_key", "coord_columns"):
                setattr(cfg.data, key, getattr(self.configs[m].data, key))  # the slide decides its keys
            cfg.eval.domain_key = self.configs[m].eval.domain_key
            self.configs[m] = cfg
        if saved.get("method") in self.configs:
            self.method = saved["method"]
        self.events.settings.emit("")
        self.events.method.emit(self.method)

    # -- caches ----------------------------------------------------------------------------
    def cached(self, what: str, config, build: Callable):
        """`build()` once per (slide, what, config): any changed setting is a different key."""
        slide = self.require_slide()
        key = (id(slide.adata), what, json.dumps(config_to_dict(config), sort_keys=True, default=str))
        if key not in self._cache:
            if len(self._cache) > 8:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = build()
        return self._cache[key]

    def geometry(self, config=None):
        from ..preflight import geometry_dataset

        slide = self.require_slide()
        cfg = config or self.config()
        return self.cached("geometry", cfg.data, lambda: geometry_dataset(slide.adata, cfg, slide.name))

    # -- actions (bodies in actions.py) -----------------------------------------------------
    def check_view(self):
        return actions.check_view(self)

    def preview_view(self, cell: int | None = None):
        return actions.preview_view(self, cell)

    def preview_mask(self):
        return actions.preview_mask(self)

    def train(self):
        return actions.train(self)

    def stop(self):
        if self._pipeline is not None and self.job.kind == "training":
            self._pipeline.stop()
            self.say("Stopping at the next step; the model keeps what it learned, results are still made…")

    def save_model(self, folder, method: str | None = None, overwrite: bool = False):
        return actions.save_model(self, folder, method or self.method, overwrite)

    def load_model(self, folder):
        return actions.load_model(self, folder)

    def show(self, method: str, what: str, gene: str | None = None):
        return result_actions.show(self, method, what, gene)

    def compare(self, gene: str, methods: list[str] | None = None):
        return result_actions.compare(self, gene, methods)

    def recompute_domains(self, method: str, n_domains: int | None, domain_method: str = "auto"):
        return result_actions.recompute_domains(self, method, n_domains, domain_method)

    def inspect_region(self, method: str, polygon: np.ndarray | None = None, gene: str | None = None):
        if polygon is None:
            polygon = self.region_polygon
        if polygon is None:
            raise SpatialDataError("draw the region to hide first ('Draw a region'), then press 'Hide it and predict'.")
        return result_actions.inspect_region(self, method, polygon, gene)

    def show_region_gene(self, gene: str):
        return result_actions.show_region_gene(self, gene)

    def plot_embedding(self, method: str, how: str = "pca"):
        return result_actions.plot_embedding(self, method, how)

    def summarize(self, method: str):
        return result_actions.summarize(self, method)

    def request_region_layer(self) -> None:
        """Ask for the layer in which a person draws the region to hide."""
        self.require_slide()
        self.events.draw_region.emit()

    def set_region(self, polygon) -> None:
        """The region (display coordinates) a person drew, to hide from a model."""
        self.region_polygon = np.asarray(polygon, np.float64)
        self.events.region_drawn.emit(self.region_polygon)

    def show_gene(self, gene: str):
        return actions.show_gene(self, gene)

    def save_png(self, path) -> None:
        from pathlib import Path

        path = Path(path)
        if path.suffix.lower() != ".png":
            path = path.with_name(path.name + ".png")
        self.events.screenshot.emit(path)
        return path

    def select_cells(self, cells) -> None:
        self.selected_cells = np.unique(np.asarray(cells, np.int64))
        self.events.selection.emit(self.selected_cells)

    def export(self, path, *, include_expression: bool = False, overwrite: bool = True):
        return actions.export(self, path, include_expression, overwrite)

    def write_to_store(self, table: str, overwrite: bool = False):
        return actions.write_to_store(self, table, overwrite)

    # -- jobs ------------------------------------------------------------------------------
    def set_job(self, kind: str, text: str = "") -> None:
        self.job = JobState(kind, text)
        self.events.job.emit(self.job)

    def side_job(self, what: str, fn, args: tuple, on_done: Callable, channel: str = "display") -> None:
        """A light job (a preview, colours, clustering, a region, a figure): off the main thread. Jobs of
        one `channel` replace each other: while one runs, only the newest request waits (the ones in
        between are dropped) and starts when it ends; jobs of other channels are not affected."""
        if channel in self._side_busy:
            self._side_pending[channel] = (what, fn, args, on_done)
            return
        self._side_busy[channel] = what
        self.events.busy.emit(what)

        def done(value):
            if channel not in self._side_pending:  # a newer request supersedes this result
                self.guarded(on_done, value)

        def finish():
            self._side_busy.pop(channel, None)
            pending = self._side_pending.pop(channel, None)
            if pending is not None:
                self.side_job(pending[0], pending[1], pending[2], pending[3], channel)
            else:
                self.events.busy.emit(next(iter(self._side_busy.values()), ""))

        self.runner.start(fn, *args, on_return=done, on_error=self.fail, on_finish=finish)

    def draw(self, name: str, fn, *args) -> None:
        """Draw a figure (a figures.* function) off the main thread (in the figure helper process); it
        arrives as ``events.figure``."""
        from .figures import draw

        self.side_job(f"drawing the {name}", draw, (fn, *args), lambda fig: self.events.figure.emit(name, fig),
                      channel=f"figure:{name}")

    def warm_up(self) -> None:
        """Load what jobs need (the methods, torch_geometric, scikit-learn, the figure helper process) in
        the background, once, so that the first training or figure does not stall the viewer."""
        self.side_job("loading the methods", actions.warm_up, (), lambda *_: None, channel="warm-up")

    @property
    def busy(self) -> bool:
        """Whether any job (main or side) is running."""
        return self.job.kind != "idle" or bool(self._side_busy)

    def add_result(self, result: Result) -> None:
        """A new result: the slide now carries it (so exports hold every result) and it is shown."""
        self.results[result.method] = result
        if self.slide is not None and result.adata.n_obs == self.slide.adata.n_obs:
            self.slide.adata = result.adata
            for other in self.results.values():  # every result reads the newest AnnData (it holds them all)
                if other.adata.n_obs == result.adata.n_obs:
                    other.adata = result.adata
        self.events.results.emit(result.method)

    def result(self, method: str) -> Result:
        if method not in self.results:
            raise SpatialDataError(f"no {method} results yet: train it (Train) or load a saved model.")
        return self.results[method]

    def adopt_output(self, output) -> Result:
        result = result_from_output(output)
        self.add_result(result)
        return result
