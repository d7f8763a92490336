"""The napari dock widget: configure on the tissue, train in the background, overlay, export.

Six sections (tabs), top to bottom of a biologist's loop:

1. **Data**: the slide (a Points layer made by the reader, or an ``.h5ad`` opened here); section key,
   label key, reference-domain key; a gene to show on the tissue.
2. **View**: the method and its settings (generated from the method's config dataclass: radius,
   hops, neighbours, patch and bin size, gene channels...); previews on the tissue: a sample of the
   graph's edges, the edges and k-hop ego-net of the cell the user clicks, the patch grid and one
   patch's chosen gene channels; the graph summary (mean degree, isolated cells).
3. **Masking**: strategy and ratio, cell types picked from the label column, niche hops, regions;
   a preview of the masked cells on the tissue.
4. **Train**: epochs, learning rate, seed, device; training runs the core ``Pipeline`` in a napari
   thread worker (progress bar, live loss curve, Stop at the next step keeping the model); save and
   load models.
5. **Results**: layers the user toggles: reconstructed expression of a gene (masked cells ringed),
   per-cell reconstruction error, embedding as RGB colours, a 2-D embedding plot linked to the
   tissue by selection, spatial domains (K or automatic) and predicted cell types with a legend,
   metrics against the labels.
6. **Export**: the annotated layer to ``.h5ad`` / ``.csv`` (the plugin's writer) and a PNG of the view.

All algorithmic work happens in the Qt-free core (pipeline, graphs, masking, lattice, clustering);
this module only wires widgets to it. Wrong choices are explained in the status line and a napari
notification, never as a traceback. ``NAPARI_SPATIALSSL_SYNC_WORKERS=1`` runs workers in the
calling thread (for tests); settings persist in a JSON file (see :mod:`.widget_settings`).
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from functools import wraps
from pathlib import Path

import napari
import napari.viewer
import numpy as np
import pandas as pd
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QLabel,
    QListWidget,
    QAbstractItemView,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from ..data.io import SpatialDataError
from . import overlays, previews
from .widget_config import ConfigForm, mask_field_name
from .widget_plots import Legend, LossCurve, hbox
from .widget_settings import load_settings, save_settings

log = logging.getLogger(__name__)

SYNC_ENV = "NAPARI_SPATIALSSL_SYNC_WORKERS"
NONE = "(none)"
AUTO = "auto"
PREVIEW_EDGE_SAMPLE = 4000  # edges drawn in the "sample of edges" preview
PROGRESS_MAX = 1_000_000  # fine enough to move on every step of a long run
LOSS_REDRAW_SECONDS = 1.0  # the loss curve is redrawn at most this often while training

# names of the preview / result layers (one of each kind, replaced on update)
EDGES_LAYER = "view: edges"
EGONET_LAYER = "view: ego-net"
PATCH_GRID_LAYER = "view: patch grid"
PATCH_LAYER = "view: one patch"
MASK_LAYER = "mask preview"
SELECTION_LAYER = "linked selection"


def sync_workers() -> bool:
    return os.environ.get(SYNC_ENV, "").lower() in ("1", "true", "yes")


def explained(fn):
    """Run a slot; any error becomes a message in the widget (and a notification), never a traceback."""

    @wraps(fn)
    def wrapper(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every error is shown to the user
            self.report_error(exc)
            return None

    return wrapper


def _notify(message: str, level: str = "info") -> None:
    try:
        from napari.utils import notifications

        {"info": notifications.show_info, "warning": notifications.show_warning,
         "error": notifications.show_error}[level](message)
    except Exception:  # noqa: BLE001 - notifications are a courtesy; the status line has the message
        log.info(message)


def _available_methods() -> list[str]:
    from ..models.base import METHODS, get_method_class

    try:
        get_method_class("gnn-mask")  # imports every built-in method module that exists
    except ValueError:
        pass
    order = ["gnn-mask", "spotscape", "patch-mae"]
    return [m for m in order if m in METHODS] + sorted(m for m in METHODS if m not in order)


class SpatialSSLWidget(QWidget):
    """Self-supervised learning on spatial transcriptomics, from the tissue to exported results."""

    def __init__(self, viewer: napari.viewer.Viewer, parent=None):
        super().__init__(parent)
        self.viewer = viewer
        self.settings = load_settings()
        self._forms: dict[str, ConfigForm] = {}
        self._masks: dict[str, dict] = {}
        self._graph_cache: dict = {}
        self._dataset_cache: dict = {}
        self._lattice_cache: dict = {}
        self._pipeline = None
        self._worker = None
        self._bg_worker = None  # a preview or domain computation running off the main thread
        self._last_redraw = 0.0
        self.results: dict = {}  # method -> PipelineOutput (or predict output)
        self._result_layers: dict[str, list] = {}
        self._syncing = False
        self._clicked_cell: int | None = None
        self._preview_kind: str | None = None

        outer = QVBoxLayout(self)
        self.tabs = QTabWidget()
        outer.addWidget(self.tabs)
        self.status = QLabel("Open a slide (.h5ad) or pick a Points layer to start.")
        self.status.setWordWrap(True)
        outer.addWidget(self.status)

        self._build_data_tab()
        self._build_view_tab()
        self._build_mask_tab()
        self._build_train_tab()
        self._build_results_tab()
        self._build_export_tab()

        self.viewer.layers.events.inserted.connect(self._refresh_layer_choices)
        self.viewer.layers.events.removed.connect(self._refresh_layer_choices)
        self.viewer.layers.selection.events.active.connect(self._on_active_layer)
        self.viewer.mouse_drag_callbacks.append(self._on_click)
        self._save_timer = QTimer(self)
        self._save_timer.setSingleShot(True)
        self._save_timer.setInterval(500)
        self._save_timer.timeout.connect(self.save_settings)
        self._restore_settings()
        self._refresh_layer_choices()

    # ------------------------------------------------------------------ messages
    def say(self, message: str, level: str = "info") -> None:
        """Show a message in the status line (and as a napari notification for warnings/errors)."""
        colour = {"info": "", "warning": "color: #e0a030;", "error": "color: #e05050;"}[level]
        self.status.setStyleSheet(colour)
        self.status.setText(message)
        if level != "info":
            _notify(message, level)

    def report_error(self, exc: BaseException) -> None:
        if isinstance(exc, (SpatialDataError, FileExistsError, FileNotFoundError, ValueError, KeyError)):
            text = str(exc).strip("'\"")
        else:  # unexpected: keep the traceback in the log, show one clear line
            log.error("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
            text = f"{type(exc).__name__}: {exc}"
        self.say(text, "error")

    # ------------------------------------------------------------------ 1 Data
    def _build_data_tab(self) -> None:
        tab = QWidget()
        form = QFormLayout(tab)
        self.layer_combo = QComboBox()
        self.layer_combo.currentIndexChanged.connect(self._on_layer_changed)
        self.open_button = QPushButton("Open .h5ad…")
        self.open_button.clicked.connect(self._open_dialog)
        form.addRow("Slide layer", self.layer_combo)
        form.addRow("", self.open_button)
        self.section_combo = QComboBox()
        self.label_combo = QComboBox()
        self.domain_key_combo = QComboBox()
        for combo in (self.section_combo, self.label_combo, self.domain_key_combo):
            combo.currentIndexChanged.connect(self._on_keys_changed)
        form.addRow("Section key", self.section_combo)
        form.addRow("Label key (cell types)", self.label_combo)
        form.addRow("Reference domains key", self.domain_key_combo)
        self.gene_combo = QComboBox()
        self.gene_combo.setEditable(True)
        self.show_gene_button = QPushButton("Show gene on tissue")
        self.show_gene_button.clicked.connect(self.show_gene)
        form.addRow("Gene", self.gene_combo)
        form.addRow("", self.show_gene_button)
        self.data_summary = QLabel("")
        self.data_summary.setWordWrap(True)
        form.addRow(self.data_summary)
        self.tabs.addTab(tab, "1 Data")

    def _points_layers(self):
        from napari.layers import Points

        return [lay for lay in self.viewer.layers
                if isinstance(lay, Points) and lay.metadata.get("adata") is not None
                and not lay.metadata.get("spatialssl_result")]

    def _refresh_layer_choices(self, event=None) -> None:
        current = self.layer_combo.currentText()
        names = [lay.name for lay in self._points_layers()]
        self.layer_combo.blockSignals(True)
        self.layer_combo.clear()
        self.layer_combo.addItems(names)
        if current in names:
            self.layer_combo.setCurrentText(current)
        self.layer_combo.blockSignals(False)
        self._refresh_export_choices()
        if names and current not in names:
            self._on_layer_changed()
        elif not names:
            self.data_summary.setText("No slide yet: open an .h5ad file or load a sample (File > Open Sample).")

    @property
    def data_layer(self):
        name = self.layer_combo.currentText()
        for lay in self._points_layers():
            if lay.name == name:
                return lay
        return None

    @property
    def adata(self):
        layer = self.data_layer
        return None if layer is None else layer.metadata.get("adata")

    def require_data(self):
        """The slide's layer, or a clear error saying how to get one."""
        layer = self.data_layer
        if layer is None:
            raise SpatialDataError(
                "no slide layer: open an .h5ad file (Data section, 'Open .h5ad…') or load a sample slide "
                "(File > Open Sample > napari-spatialssl) first."
            )
        return layer

    @explained
    def _open_dialog(self, *_):
        path, _ = QFileDialog.getOpenFileName(self, "Open a slide", "", "AnnData (*.h5ad)")
        if path:
            self.open_h5ad(path)

    @explained
    def open_h5ad(self, path: str | os.PathLike):
        """Read an .h5ad slide with the plugin's reader and add it as a Points layer."""
        from .reader import read_slide

        data, kwargs, _ = read_slide(path)
        layer = self.viewer.add_points(data, **kwargs)
        self.layer_combo.setCurrentText(layer.name)
        self.say(f"Opened {Path(path).name}: {layer.metadata['adata'].n_obs:,} cells.")
        return layer

    @explained
    def _on_layer_changed(self, *_):
        self._graph_cache.clear()
        self._dataset_cache.clear()
        self._lattice_cache.clear()
        adata = self.adata
        if adata is None:
            return
        cols = [str(c) for c in adata.obs.columns]
        saved = self.settings.get("data", {})
        layer_section = self.data_layer.metadata.get("section_key")
        self._fill_combo(self.section_combo, [AUTO, NONE] + cols,
                         saved.get("section_key") if saved.get("section_key") in cols else
                         (layer_section or AUTO))
        few = [c for c in cols if 1 <= adata.obs[c].nunique() <= 1000 and c != layer_section]
        guess = saved.get("label_key") if saved.get("label_key") in few else (
            "cell_type" if "cell_type" in few else NONE)
        self._fill_combo(self.label_combo, [NONE] + few, guess)
        dguess = saved.get("domain_key") if saved.get("domain_key") in few else NONE
        self._fill_combo(self.domain_key_combo, [NONE] + few, dguess)
        genes = [str(g) for g in adata.var_names]
        self.gene_combo.blockSignals(True)
        self.gene_combo.clear()
        self.gene_combo.addItems(genes)
        self.gene_combo.blockSignals(False)
        self.result_gene_combo.clear()
        self.result_gene_combo.addItems(genes)
        self._on_keys_changed()

    @staticmethod
    def _fill_combo(combo: QComboBox, items: list[str], current: str | None) -> None:
        combo.blockSignals(True)
        combo.clear()
        combo.addItems(items)
        if current in items:
            combo.setCurrentText(current)
        combo.blockSignals(False)

    def _key(self, combo: QComboBox, allow_auto: bool = False) -> str | None:
        text = combo.currentText()
        if text in ("", NONE):
            return None
        return text if (text != AUTO or allow_auto) else None

    @property
    def section_key(self) -> str | None:
        text = self.section_combo.currentText()
        return None if text == NONE else (AUTO if text in ("", AUTO) else text)

    @property
    def label_key(self) -> str | None:
        return self._key(self.label_combo)

    @property
    def domain_key(self) -> str | None:
        return self._key(self.domain_key_combo)

    @explained
    def _on_keys_changed(self, *_):
        self._graph_cache.clear()
        self._dataset_cache.clear()
        self._lattice_cache.clear()
        adata = self.adata
        if adata is None:
            return
        from ..data.io import label_codes, resolve_section_key, section_codes

        skey = resolve_section_key(adata, self.section_key)
        _, sec_names = section_codes(adata, skey)
        lines = [f"{adata.n_obs:,} cells x {adata.n_vars:,} genes; {len(sec_names)} section(s)"
                 + (f" by '{skey}'" if skey else "") + "."]
        keep = {it.text() for it in self.mask_types.selectedItems()} or set(
            (self.settings.get("masks", {}).get(self.method) or {}).get("cell_types", []))
        self.mask_types.clear()
        level = "info"
        if self.label_key:
            codes, names = label_codes(adata, self.label_key)
            counts = np.bincount(codes[codes >= 0], minlength=len(names))
            lines.append(f"Labels '{self.label_key}': {len(names)} classes, {int((codes < 0).sum()):,} unlabelled.")
            self.mask_types.addItems([f"{n}" for n in names])
            for i in range(self.mask_types.count()):
                self.mask_types.item(i).setSelected(self.mask_types.item(i).text() in keep)
            if len(names) < 2:
                lines.append(self._one_class_message(self.label_key, names))
                level = "warning"
            self._label_counts = dict(zip(names, counts.tolist()))
        self.data_summary.setText("\n".join(lines))
        if level == "warning":
            self.say(lines[-1], "warning")
        self._schedule_save()

    @staticmethod
    def _one_class_message(key: str, names: list[str]) -> str:
        only = f" ('{names[0]}')" if names else ""
        return (f"Label key '{key}' has {len(names)} class{only}: cell-type prediction and label metrics need at "
                "least two classes. Pick another label column, or (none).")

    @explained
    def show_gene(self, *_):
        """Colour the slide layer by the chosen gene's log-normalised expression (layers.color_by_gene)."""
        from .layers import color_by_gene

        layer = self.require_data()
        gene = self.gene_combo.currentText().strip()
        if gene not in set(map(str, layer.metadata["adata"].var_names)):
            raise SpatialDataError(f"gene {gene!r} is not in this slide; pick one from the list.")
        color_by_gene(layer, gene)
        self.say(f"'{layer.name}' coloured by {gene} (log-normalised expression).")

    # ------------------------------------------------------------------ config
    def _build_view_tab(self) -> None:
        tab = QWidget()
        lay = QVBoxLayout(tab)
        self.method_combo = QComboBox()
        self.method_combo.addItems(_available_methods())
        self.method_combo.currentIndexChanged.connect(self._on_method_changed)
        lay.addWidget(hbox(QLabel("Method"), self.method_combo))
        self.form_area = QScrollArea()
        self.form_area.setWidgetResizable(True)
        self.form_area.setMinimumHeight(180)
        lay.addWidget(self.form_area)
        self.preview_button = QPushButton("Preview view on tissue")
        self.preview_button.clicked.connect(self.preview_view)
        self.clear_preview_button = QPushButton("Clear previews")
        self.clear_preview_button.clicked.connect(self.clear_previews)
        lay.addWidget(hbox(self.preview_button, self.clear_preview_button))
        self.click_hint = QLabel("After a preview, click a cell on the tissue to see its edges, ego-net or patch.")
        self.click_hint.setWordWrap(True)
        lay.addWidget(self.click_hint)
        self.view_summary = QLabel("")
        self.view_summary.setWordWrap(True)
        lay.addWidget(self.view_summary)
        lay.addStretch(1)
        self.tabs.addTab(tab, "2 View")

    @property
    def method(self) -> str:
        return self.method_combo.currentText()

    def form(self, method: str | None = None) -> ConfigForm:
        """The settings form of a method (built on first use from its config class)."""
        from ..pipeline import make_config

        method = method or self.method
        if method not in self._forms:
            cfg = make_config(method)
            form = ConfigForm(cfg)
            form.set_values(self.settings.get("params", {}).get(method, {}))
            for editor in form.editors.values():
                for signal in ("valueChanged", "textChanged", "toggled"):
                    if hasattr(editor, signal):
                        getattr(editor, signal).connect(self._on_params_changed)
            self._forms[method] = form
        return self._forms[method]

    def _on_method_changed(self, *_):
        if not self.method:
            return
        form = self.form()
        old = self.form_area.takeWidget()
        if old is not None:
            old.setParent(None)
        self.form_area.setWidget(form)
        form.show()
        self._switch_mask(self.method)
        self._update_mask_enabled()
        self._on_params_changed()

    def _switch_mask(self, method: str) -> None:
        """Each method keeps its own mask settings (defaults: the method's config)."""
        import dataclasses

        from ..pipeline import make_config

        previous = getattr(self, "_mask_method", None)
        if previous is not None and previous != method:
            self._masks[previous] = self.mask_settings()
        self._mask_method = method
        values = self._masks.get(method) or self.settings.get("masks", {}).get(method)
        if values is None:
            mfield = mask_field_name(make_config(method))
            values = dataclasses.asdict(getattr(make_config(method), mfield)) if mfield else {}
        self.set_mask_settings(values)

    def set_mask_settings(self, m: dict) -> None:
        """Put mask settings (MaskConfig field names) into the Masking section; bad values are skipped."""
        try:
            if self.mask_strategy.findText(str(m.get("strategy", ""))) >= 0:
                self.mask_strategy.setCurrentText(m["strategy"])
            self.mask_ratio.setValue(float(m.get("ratio", self.mask_ratio.value())))
            self.niche_hops.setValue(int(m.get("niche_hops", self.niche_hops.value())))
            self.region_size.setValue(int(m.get("region_size", self.region_size.value())))
            self.n_regions.setValue(int(m.get("n_regions", self.n_regions.value())))
        except (TypeError, ValueError):  # a hand-edited settings file: keep what is there
            pass
        chosen = set(map(str, m.get("cell_types", []) or []))
        for i in range(self.mask_types.count()):
            item = self.mask_types.item(i)
            item.setSelected(item.text() in chosen)

    def _on_params_changed(self, *_):
        self._graph_cache.clear()
        self._lattice_cache.clear()
        self._schedule_save()

    def config(self, method: str | None = None):
        """The method's config from every section of the widget (validated by the core)."""
        from ..config import apply_overrides
        from ..pipeline import make_config

        method = method or self.method
        cfg = make_config(method)
        apply_overrides(cfg, self.form(method).overrides())
        cfg.epochs = int(self.epochs_spin.value())
        cfg.lr = self._lr()
        cfg.seed = int(self.seed_spin.value())
        cfg.device = self.device_combo.currentText()
        if hasattr(cfg, "data"):
            cfg.data.section_key = self.section_key
            cfg.data.label_key = self.label_key
        if hasattr(cfg, "eval"):
            cfg.eval.domain_key = self.domain_key
            cfg.eval.n_domains = int(self.k_spin.value()) or None
        mfield = mask_field_name(cfg)
        if mfield is not None:
            mask = getattr(cfg, mfield)
            for name, value in self.mask_settings().items():
                setattr(mask, name, value)
        if hasattr(cfg, "validate"):
            cfg.validate()
        return cfg

    def _lr(self) -> float:
        text = self.lr_edit.text().strip()
        try:
            value = float(text)
        except ValueError:
            raise SpatialDataError(f"learning rate {text!r} is not a number; e.g. 0.001.") from None
        if not value > 0:
            raise SpatialDataError(f"learning rate must be positive, got {value}.")
        return value

    def _param(self, cfg, *names, default=None):
        for name in names:
            if hasattr(cfg, name) and getattr(cfg, name) is not None:
                return getattr(cfg, name)
        return default

    # ------------------------------------------------------------------ datasets and views (core)
    def dataset(self, cfg=None):
        """The SpatialDataset of the slide under the current data settings (cached)."""
        from ..pipeline import dataset_from_config

        cfg = cfg or self.config()
        adata = self.adata
        if adata is None:
            self.require_data()
        key = (id(adata), self.method, repr(getattr(cfg, "data", None)))
        if key not in self._dataset_cache:
            for old in [k for k in self._dataset_cache if k[0] != "geometry"]:
                del self._dataset_cache[old]
            self._dataset_cache[key] = dataset_from_config(adata, cfg, name=self.data_layer.name)
        return self._dataset_cache[key]

    def geometry(self, cfg=None):
        """A SpatialDataset with the slide's coordinates, sections and labels but no expression
        (a zero-column matrix): enough for graph and mask previews, and cheap at atlas scale."""
        import scipy.sparse as sp

        from ..data.dataset import SpatialDataset
        from ..data.io import get_coordinates, label_codes, resolve_section_key, section_codes
        from ..models.base import data_config_of

        cfg = cfg or self.config()
        adata = self.adata
        if adata is None:
            self.require_data()
        dc = data_config_of(cfg)
        key = ("geometry", id(adata), dc.spatial_key, repr(dc.coord_columns), dc.section_key, dc.label_key,
               repr(dc.ignore_labels))
        if key not in self._dataset_cache:
            name = self.data_layer.name
            coords = get_coordinates(adata, spatial_key=dc.spatial_key, coord_columns=dc.coord_columns, name=name)
            skey = resolve_section_key(adata, dc.section_key, name=name)
            section, names = section_codes(adata, skey)
            labels = label_names = None
            if dc.label_key:
                labels, label_names = label_codes(adata, dc.label_key, dc.ignore_labels)
            self._dataset_cache[key] = SpatialDataset(
                coords=coords, X=sp.csr_matrix((len(coords), 0), dtype=np.float32), gene_names=np.zeros(0, str),
                section=section, section_names=names, labels=labels, label_names=label_names, section_key=skey,
                label_key=dc.label_key, obs_names=np.asarray(adata.obs_names).astype(str))
        return self._dataset_cache[key]

    def cell_positions(self) -> np.ndarray:
        """(n_cells, 2) display (row, col) position of every cell of the slide, in the layer's layout."""
        from .layers import display_coordinates

        layer = self.require_data()
        return display_coordinates(layer.metadata["adata"], layer.metadata)

    def view_kind(self, cfg) -> str:
        """'graph' (radius / nearest-neighbour graph) or 'patches' (lattice), from the config's fields."""
        if hasattr(cfg, "patch_size"):
            return "patches"
        return "graph"

    def graph(self, cfg=None):
        """The method's neighbour graph over the slide, cached (see :func:`build_view_graph`)."""
        cfg = cfg or self.config()
        key, data = self._graph_key(cfg)
        if key not in self._graph_cache:
            self._store_graph(key, build_view_graph(self.method, cfg, data, self._param(cfg, "radius")))
        return self._graph_cache[key]

    def _graph_key(self, cfg):
        data = self.geometry(cfg)
        return (id(data), self.method, repr(cfg)), data

    def _store_graph(self, key, graph) -> None:
        self._graph_cache.clear()
        self._graph_cache[key] = graph

    def _graph_ready(self, cfg, then, *args) -> bool:
        """True when the graph for `cfg` is cached. Otherwise build it in a background worker (it takes
        seconds on atlas-size slides) and call ``then(*args)`` on the main thread when it is ready."""
        key, data = self._graph_key(cfg)
        if key in self._graph_cache or sync_workers():
            return True
        self._in_background(f"building the {self.method} graph on {data.n_cells:,} cells",
                            build_view_graph, (self.method, cfg, data, self._param(cfg, "radius")),
                            lambda graph: (self._store_graph(key, graph), then(*args)))
        return False

    def _in_background(self, what: str, fn, args, on_done) -> None:
        """Run ``fn(*args)`` in a napari thread worker, then ``on_done(result)`` on the main thread (errors
        become messages). Inline when workers are synchronous (tests)."""
        if sync_workers():
            on_done(fn(*args))
            return
        if self._bg_worker is not None:
            raise SpatialDataError(f"still {self._bg_what}; wait a moment and try again.")
        from napari.qt.threading import create_worker

        worker = create_worker(fn, *args, _start_thread=False)

        def done(result):
            try:
                on_done(result)
            except Exception as exc:  # noqa: BLE001 - shown, never raised into Qt
                self.report_error(exc)

        def finished():
            self._bg_worker = None

        worker.returned.connect(done)
        worker.errored.connect(self.report_error)
        worker.finished.connect(finished)
        self._bg_worker, self._bg_what = worker, what
        self.say(f"{what[0].upper()}{what[1:]}…")
        worker.start()

    def bin_size(self, cfg) -> float:
        """The lattice bin side (coordinate units): the configured one, else the core's suggestion."""
        from ..graphs.lattice import suggest_bin_size

        value = self._param(cfg, "bin_size")
        if value:
            return float(value)
        data = self.geometry(cfg)
        return suggest_bin_size(data.coords, data.section, factor=float(self._param(cfg, "bin_factor", default=1.0)))

    def num_hops(self, cfg) -> int:
        hops = self._param(cfg, "num_hops", "k_hop", "k_hops", "hops")
        if hops is None:
            hops = len(getattr(cfg, "hidden_dims", [0, 0])) or 2
        return int(hops)

    def check_graph(self, graph) -> None:
        """Refuse a graph that isolates every cell, explaining how to choose the radius."""
        s = graph.summary()
        if s["n_cells"] and s["isolated_cells"] == s["n_cells"]:
            from .layers import median_nn_distance

            data = self.geometry()
            nn = median_nn_distance(data.coords[data.section == 0])
            what = f"radius {s['radius']:g}" if "radius" in s else "this graph"
            raise SpatialDataError(
                f"{what} isolates every cell (no cell has a neighbour): the median distance between "
                f"neighbouring cells is {nn:.3g} in this slide's units. Use a radius of about {2.5 * nn:.3g} "
                f"or more (View section)."
            )

    def check_patches(self, cfg) -> None:
        """Refuse patches larger than every section, explaining the sizes in bins."""
        data = self.geometry(cfg)
        patch = self._param(cfg, "patch_size")
        if patch is None:
            return
        bin_size = self.bin_size(cfg)
        h, w = (patch, patch) if np.isscalar(patch) else tuple(patch)[:2]
        sizes = []
        for s in range(data.n_sections):
            xy = data.coords[data.section == s]
            if len(xy):
                ext = (xy.max(0) - xy.min(0)) / float(bin_size) + 1
                sizes.append((int(ext[1]), int(ext[0])))  # rows (y), cols (x)
        if sizes and all(r < h or c < w for r, c in sizes):
            biggest = max(sizes, key=lambda t: t[0] * t[1])
            raise SpatialDataError(
                f"patch of {h} x {w} bins is larger than every section (the largest is {biggest[0]} x "
                f"{biggest[1]} bins of {float(bin_size):g} units). Lower patch_size or bin_size (View section)."
            )

    # ------------------------------------------------------------------ 2 View previews
    @explained
    def preview_view(self, *_):
        """Draw the method's view on the tissue: a sample of graph edges, or the patch grid."""
        layer = self.require_data()
        cfg = self.config()
        if self.view_kind(cfg) == "patches":
            self.check_patches(cfg)
            self._preview_patches(cfg, cell=self._clicked_cell)
            return
        if not self._graph_ready(cfg, self.preview_view):
            return
        graph = self.graph(cfg)
        s = graph.summary()
        self.view_summary.setText(self._graph_text(s))
        self.check_graph(graph)
        pos = self.cell_positions()
        src, dst = previews.sample_edges(graph, PREVIEW_EDGE_SAMPLE, np.random.default_rng(0))
        vectors = previews.edge_vectors(pos, src, dst)
        self._set_vectors(EDGES_LAYER, vectors, color="#f0f0f0", width=max(layer.size.mean() * 0.08, 1e-6))
        self._preview_kind = "graph"
        n_und = graph.n_edges // 2
        self.say(f"Showing {len(src):,} of {n_und:,} edges. Click a cell to see its edges and "
                 f"{self.num_hops(cfg)}-hop ego-net.")

    @staticmethod
    def _graph_text(s: dict) -> str:
        params = ", ".join(f"{k}={v:g}" for k, v in s.items() if k in ("radius", "k", "max_distance"))
        return (f"{s['kind']} graph ({params}): {s['n_cells']:,} cells, {s['n_edges'] // 2:,} edges, "
                f"mean degree {s['mean_degree']:.2f}, isolated cells {s['isolated_cells']:,} "
                f"({100 * s['isolated_fraction']:.1f}%).")

    @explained
    def preview_cell(self, cell: int):
        """Show the edges around `cell` and its k-hop ego-net (graph views) or its patch (patch views)."""
        self.require_data()
        cfg = self.config()
        self._clicked_cell = int(cell)
        if self.view_kind(cfg) == "patches":
            self._preview_patches(cfg, cell=int(cell))
            return
        if not self._graph_ready(cfg, self.preview_cell, cell):
            return
        graph = self.graph(cfg)
        self.check_graph(graph)
        hops = self.num_hops(cfg)
        members = previews.egonet_members(graph, int(cell), hops)
        src, dst = previews.edges_of(graph, members)
        pos = self.cell_positions()
        size = float(self.data_layer.size.mean())
        self._set_vectors(EDGES_LAYER, previews.edge_vectors(pos, src, dst), color="#ffd84d", width=size * 0.12)
        colors = np.tile(np.array([[0.2, 0.9, 1.0, 1.0]], np.float32), (len(members), 1))
        colors[members == cell] = (1.0, 0.2, 0.6, 1.0)
        self._set_points(EGONET_LAYER, pos[members], face_color=colors, size=size * 1.6,
                         features=pd.DataFrame({"cell_index": members, "centre": members == cell}))
        deg = int(graph.indptr[cell + 1] - graph.indptr[cell])
        self.view_summary.setText(
            self._graph_text(graph.summary()) +
            f"\nCell {cell}: {deg} neighbours; its {hops}-hop ego-net has {len(members):,} cells.")
        self.say(f"Cell {cell}: {deg} direct neighbours, {len(members):,} cells within {hops} hops.")

    def _lattice(self, cfg, section: int):
        from ..graphs.lattice import build_lattice

        data = self.dataset(cfg)
        bin_size = self.bin_size(cfg)
        key = (id(data), bin_size, section)
        if key not in self._lattice_cache:
            self._lattice_cache[key] = build_lattice(data.coords, data.X, bin_size,
                                                     cells=data.section_indices(section), section=section)
        return self._lattice_cache[key]

    def _preview_patches(self, cfg, cell: int | None = None) -> None:
        from ..graphs.lattice import centered_origins, extract_patches, select_channels, tiled_origins

        data = self.dataset(cfg)
        patch = self._param(cfg, "patch_size")
        h, w = (int(patch), int(patch)) if np.isscalar(patch) else tuple(int(v) for v in patch)[:2]
        m = int(self._param(cfg, "n_channels", "gene_channels", "channels", default=3))
        section = int(data.section[cell]) if cell is not None else 0
        lat = self._lattice(cfg, section)
        pos = self.cell_positions()
        tr = previews.fit_section_transform(data.coords, data.section, pos, data.n_sections)
        b = lat.bin_size
        # the tiled patch grid of every section
        boxes = []
        for s in range(data.n_sections):
            ls = self._lattice(cfg, s)
            org = tiled_origins(ls, h, w)
            xy = np.stack([ls.origin[0] + org[:, 1] * b, ls.origin[1] + org[:, 0] * b], 1)
            boxes.append(previews.rectangles(xy, (w * b, h * b), s, tr))
        self._set_shapes(PATCH_GRID_LAYER, np.concatenate(boxes), edge_color="#f0f0f0", face_color="transparent",
                         edge_width=tr.length(b * 0.15))
        # one patch: the one centred on the clicked cell, else the most occupied tile of section 0
        if cell is not None:
            origin = centered_origins(lat, np.array([cell]), h, w)
        else:
            org = tiled_origins(lat, h, w)
            occ = [lat.occupancy[r:r + h, c:c + w].mean() for r, c in org[:64]]
            origin = org[[int(np.argmax(occ))]]
        rng = np.random.default_rng(int(self.seed_spin.value()))
        genes = select_channels(lat, origin, h, w, m, rng)
        batch = extract_patches(lat, origin, h, w, genes)
        names = [str(data.gene_names[g]) for g in batch.genes[0]]
        x0 = lat.origin[0] + origin[0, 1] * b
        y0 = lat.origin[1] + origin[0, 0] * b
        corner = tr.apply([[x0 + b / 2, y0 + b / 2]], section)[0]
        scale = tr.length(b, section)
        cmaps = ("magenta", "green", "cyan")
        for c in range(min(3, len(names))):
            img = batch.values[0, :, :, c]
            self._set_image(f"patch channel {c + 1}", f"{PATCH_LAYER} channel {c + 1}: {names[c]}", img,
                            colormap=cmaps[c], blending="additive", translate=tuple(corner), scale=(scale, scale),
                            contrast_limits=(0.0, float(max(img.max(), 1e-6))))
        self._add_region_mask_preview(cfg, h, w, corner, scale)
        self._preview_kind = "patches"
        text = (f"Patches of {h} x {w} bins (bin {b:g} units); section {data.section_names[section]}: "
                f"{lat.shape[0]} x {lat.shape[1]} bins, {lat.occupancy.mean():.0%} occupied. "
                f"Shown patch at bin (row {origin[0, 0]}, col {origin[0, 1]}), {len(names)} channels by "
                f"variance-weighted sampling: {', '.join(names)} (first 3 drawn as magenta/green/cyan).")
        self.view_summary.setText(text)
        self.say("Patch grid shown; click a cell to see the patch centred on it.")

    def _add_region_mask_preview(self, cfg, h, w, corner, scale) -> None:
        """Draw the pretext mask over the previewed patch: masked regions, or masked tokens."""
        from ..masking import random_cells, regions

        name = PATCH_LAYER + " masked"
        ms = self.mask_settings()
        rng = np.random.default_rng(int(self.seed_spin.value()))
        if ms.get("strategy") == "regions":
            mask = regions((h, w), int(ms["region_size"]), int(ms["n_regions"]), rng)
            what = f"{ms['n_regions']} region(s) of {ms['region_size']} x {ms['region_size']} bins"
        elif ms.get("strategy") == "random_cells":
            t = int(self._param(cfg, "token_bins", default=1))
            tokens = random_cells((h // t) * (w // t), float(ms["ratio"]), rng).reshape(h // t, w // t)
            mask = np.kron(tokens, np.ones((t, t), dtype=bool))
            what = f"{tokens.sum()} of {tokens.size} tokens ({t} x {t} bins each)"
        else:
            if self._find(name) is not None:
                self._find(name).visible = False
            return
        r, c = np.nonzero(mask)
        tl = corner[None, :] + (np.stack([r, c], 1) - 0.5) * scale
        rects = np.stack([tl, tl + [0, scale], tl + [scale, scale], tl + [scale, 0]], 1)
        self._set_shapes(name, rects, edge_color="transparent", face_color=[1.0, 0.2, 0.2, 0.45], edge_width=0)
        self.mask_summary.setText(f"Masked in the previewed patch (red): {what}. A new mask is drawn for every "
                                  "patch and step.")

    def _on_click(self, viewer, event):
        """Clicking near a cell of the slide layer previews that cell (after a preview was drawn)."""
        if self._preview_kind is None or event.type != "mouse_press":
            return
        shown = self._find(EDGES_LAYER if self._preview_kind == "graph" else PATCH_GRID_LAYER)
        if shown is None or not shown.visible:
            return
        layer = self.data_layer
        if layer is None or not layer.visible:
            return
        try:
            where = np.asarray(layer.world_to_data(event.position))
            rows = layer.features["cell_index"].to_numpy() if "cell_index" in layer.features else \
                np.arange(len(layer.data))
            i = previews.nearest_point(layer.data, where)
            if rows[i] >= 0:
                self.preview_cell(int(rows[i]))
        except Exception as exc:  # noqa: BLE001
            self.report_error(exc)

    @explained
    def clear_previews(self, *_):
        self._remove_layers(lambda lay: lay.name in (EDGES_LAYER, EGONET_LAYER, PATCH_GRID_LAYER, MASK_LAYER)
                            or lay.name.startswith(PATCH_LAYER))
        self._preview_kind = None
        self._clicked_cell = None
        self.say("Previews cleared.")

    # ------------------------------------------------------------------ 3 Masking
    def _build_mask_tab(self) -> None:
        from ..masking import STRATEGIES

        tab = QWidget()
        form = QFormLayout(tab)
        self.mask_strategy = QComboBox()
        self.mask_strategy.addItems(list(STRATEGIES))
        self.mask_ratio = QDoubleSpinBox()
        self.mask_ratio.setRange(0.01, 0.99)
        self.mask_ratio.setSingleStep(0.05)
        self.mask_ratio.setValue(0.2)
        self.mask_types = QListWidget()
        self.mask_types.setSelectionMode(QAbstractItemView.SelectionMode.MultiSelection)
        self.mask_types.setMaximumHeight(130)
        self.niche_hops = QSpinBox()
        self.niche_hops.setRange(0, 20)
        self.niche_hops.setValue(1)
        self.region_size = QSpinBox()
        self.region_size.setRange(1, 1024)
        self.region_size.setValue(4)
        self.n_regions = QSpinBox()
        self.n_regions.setRange(1, 1024)
        self.n_regions.setValue(1)
        form.addRow("Strategy", self.mask_strategy)
        form.addRow("Ratio", self.mask_ratio)
        form.addRow("Cell types to mask", self.mask_types)
        form.addRow("Niche hops", self.niche_hops)
        form.addRow("Region size (bins)", self.region_size)
        form.addRow("Regions per patch", self.n_regions)
        self.mask_preview_button = QPushButton("Preview masked cells")
        self.mask_preview_button.clicked.connect(self.preview_mask)
        form.addRow(self.mask_preview_button)
        self.mask_summary = QLabel("")
        self.mask_summary.setWordWrap(True)
        form.addRow(self.mask_summary)
        for w in (self.mask_strategy, self.mask_ratio, self.niche_hops, self.region_size, self.n_regions):
            sig = w.currentIndexChanged if isinstance(w, QComboBox) else w.valueChanged
            sig.connect(self._schedule_save)
        self.mask_strategy.currentIndexChanged.connect(self._update_mask_enabled)
        self.mask_tab = tab
        self.tabs.addTab(tab, "3 Masking")

    def mask_settings(self) -> dict:
        return {
            "strategy": self.mask_strategy.currentText(),
            "ratio": float(self.mask_ratio.value()),
            "cell_types": [it.text() for it in self.mask_types.selectedItems()],
            "niche_hops": int(self.niche_hops.value()),
            "region_size": int(self.region_size.value()),
            "n_regions": int(self.n_regions.value()),
        }

    def _update_mask_enabled(self, *_):
        if not hasattr(self, "mask_strategy") or not self.method:
            return
        from ..pipeline import make_config

        has_mask = mask_field_name(make_config(self.method)) is not None
        for w in (self.mask_strategy, self.mask_ratio, self.mask_types, self.niche_hops, self.region_size,
                  self.n_regions, self.mask_preview_button):
            w.setEnabled(has_mask)
        strategy = self.mask_strategy.currentText()
        self.mask_types.setEnabled(has_mask and strategy == "cell_types")
        self.niche_hops.setEnabled(has_mask and strategy == "niches")
        self.region_size.setEnabled(has_mask and strategy == "regions")
        self.n_regions.setEnabled(has_mask and strategy == "regions")
        if not has_mask:
            self.mask_summary.setText(f"{self.method} sets its masking in its own settings (View section).")

    @explained
    def preview_mask(self, *_):
        """Draw the cells the configured mask hides, with the training seed, before training."""
        from ..masking import MaskConfig, draw_cell_mask, gene_channels

        self.require_data()
        cfg = self.config()
        ms = MaskConfig(**self.mask_settings())
        data = self.dataset(cfg) if ms.strategy == "gene_channels" else self.geometry(cfg)
        rng = np.random.default_rng(int(self.seed_spin.value()))
        pos = self.cell_positions()
        size = float(self.data_layer.size.mean())
        if self.view_kind(cfg) == "patches":
            self.check_patches(cfg)
            self._preview_patches(cfg, cell=self._clicked_cell)
            self.say(self.mask_summary.text())
            return
        if ms.strategy == "gene_channels":
            frac = gene_channels(data.n_cells, data.n_genes, ms.ratio, rng).mean(1)
            self._set_points(MASK_LAYER, pos, face_color=self._values_to_rgba(frac, "magma"), size=size,
                             features=pd.DataFrame({"masked_gene_fraction": frac}))
            text = (f"'gene_channels' hides each gene of each cell with probability {ms.ratio:.0%}: every cell is "
                    f"partly masked (mean {frac.mean():.1%} of its {data.n_genes} genes); colour = fraction.")
            self.mask_summary.setText(text)
            self.say(text)
            return
        if ms.strategy == "cell_types" and not data.labels is not None:
            raise SpatialDataError("strategy 'cell_types' needs a label key: choose one in the Data section.")
        if ms.strategy == "cell_types" and not ms.cell_types:
            raise SpatialDataError("strategy 'cell_types': select at least one cell type in the list to mask.")
        adjacency = None
        if ms.strategy == "niches":
            if self.view_kind(cfg) != "graph":
                raise SpatialDataError("strategy 'niches' needs a neighbour graph; this method uses patches.")
            if not self._graph_ready(cfg, self.preview_mask):
                return
            graph = self.graph(cfg)
            self.check_graph(graph)
            adjacency = graph.to_scipy()
        mask = draw_cell_mask(ms, data.n_cells, rng, labels=data.labels, label_names=data.label_names,
                              adjacency=adjacency)
        idx = np.flatnonzero(mask)
        self._set_points(MASK_LAYER, pos[idx], face_color=[1.0, 0.25, 0.25, 0.9], size=size * 1.3,
                         features=pd.DataFrame({"cell_index": idx}))
        text = f"'{ms.strategy}' masks {len(idx):,} of {data.n_cells:,} cells ({mask.mean():.1%}), shown in red."
        if ms.strategy in ("random_cells", "niches"):
            text += " Training draws a new mask every step; this is the first draw with the training seed."
        self.mask_summary.setText(text)
        self.say(text)

    # ------------------------------------------------------------------ 4 Train
    def _build_train_tab(self) -> None:
        import torch

        tab = QWidget()
        lay = QVBoxLayout(tab)
        form = QFormLayout()
        self.epochs_spin = QSpinBox()
        self.epochs_spin.setRange(1, 100_000)
        self.epochs_spin.setValue(50)
        from qtpy.QtWidgets import QLineEdit

        self.lr_edit = QLineEdit("0.001")
        self.seed_spin = QSpinBox()
        self.seed_spin.setRange(0, 2**31 - 1)
        self.device_combo = QComboBox()
        devices = ["auto", "cpu"]
        if torch.cuda.is_available():
            devices.append("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            devices.append("mps")
        self.device_combo.addItems(devices)
        self.k_spin = QSpinBox()
        self.k_spin.setRange(0, 200)
        self.k_spin.setSpecialValueText("automatic")
        form.addRow("Epochs", self.epochs_spin)
        form.addRow("Learning rate", self.lr_edit)
        form.addRow("Seed", self.seed_spin)
        form.addRow("Device", self.device_combo)
        form.addRow("Spatial domains K", self.k_spin)
        lay.addLayout(form)
        self.train_button = QPushButton("Train")
        self.train_button.clicked.connect(self.train)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.stop_button.clicked.connect(self.stop)
        lay.addWidget(hbox(self.train_button, self.stop_button))
        self.progress = QProgressBar()
        self.progress.setRange(0, PROGRESS_MAX)
        self.progress_label = QLabel("")
        lay.addWidget(self.progress)
        lay.addWidget(self.progress_label)
        self.loss_curve = LossCurve()
        lay.addWidget(self.loss_curve)
        self.save_model_button = QPushButton("Save model…")
        self.save_model_button.setEnabled(False)
        self.save_model_button.clicked.connect(self._save_model_dialog)
        self.load_model_button = QPushButton("Load model and predict…")
        self.load_model_button.clicked.connect(self._load_model_dialog)
        lay.addWidget(hbox(self.save_model_button, self.load_model_button))
        lay.addStretch(1)
        for w in (self.epochs_spin, self.seed_spin, self.k_spin):
            w.valueChanged.connect(self._schedule_save)
        self.lr_edit.textChanged.connect(self._schedule_save)
        self.device_combo.currentIndexChanged.connect(self._schedule_save)
        self.tabs.addTab(tab, "4 Train")

    @property
    def training(self) -> bool:
        return self._worker is not None

    def preflight(self, cfg) -> None:
        """Explain wrong choices before any training starts."""
        from ..data.io import label_codes

        adata = self.adata
        if self.label_key:
            _, names = label_codes(adata, self.label_key)
            if len(names) < 2:
                raise SpatialDataError(self._one_class_message(self.label_key, names))
        if self.view_kind(cfg) == "patches":
            self.check_patches(cfg)
        elif self._param(cfg, "radius") is not None:
            # A sampled estimate first (cheap at any scale); the exact graph only when it finds no edge.
            from ..graphs.neighbors import estimate_radius_edges

            geo = self.geometry(cfg)
            if estimate_radius_edges(geo.coords, float(self._param(cfg, "radius")), geo.section) == 0:
                self.check_graph(self.graph(cfg))

    @explained
    def train(self, *_):
        """Train the chosen method on the slide in a background worker (events drive the progress UI)."""
        from ..pipeline import Pipeline

        if self.training:
            raise SpatialDataError("a training run is already going; Stop it or wait for it to finish.")
        layer = self.require_data()
        cfg = self.config()
        self.preflight(cfg)
        self.save_settings()
        adata = layer.metadata["adata"]
        self._pipeline = Pipeline(self.method, cfg)
        self._train_method = self.method
        self.loss_curve.clear()
        self.progress.setValue(0)
        self.train_button.setEnabled(False)
        self.stop_button.setEnabled(True)
        self.say(f"Training {self.method} on {adata.n_obs:,} cells ({cfg.epochs} epochs)…")
        self._start_worker(_pipeline_events, (self._pipeline, adata, layer.name, cfg_domains(cfg), cfg.seed),
                           self._on_event, self._on_trained)

    def _start_worker(self, gen_func, args, on_yield, on_return) -> None:
        """Run a generator function in a napari thread worker (or inline when SYNC_ENV is set)."""
        if sync_workers():
            self._worker = "sync"
            try:
                gen = gen_func(*args)
                while True:
                    try:
                        on_yield(next(gen))
                    except StopIteration as stop:
                        on_return(stop.value)
                        break
            except Exception as exc:  # noqa: BLE001
                self._on_worker_error(exc)
            finally:
                self._on_worker_finished()
            return
        from napari.qt.threading import create_worker

        worker = create_worker(gen_func, *args, _start_thread=False)
        worker.yielded.connect(on_yield)
        worker.returned.connect(on_return)
        worker.errored.connect(self._on_worker_error)
        worker.finished.connect(self._on_worker_finished)
        self._worker = worker
        worker.start()

    def _on_event(self, event) -> None:
        kind = event.kind
        if kind == "stage":
            self.progress_label.setText(event.message)
            return
        n_epochs = max(event.n_epochs, 1)
        if getattr(event, "stage", "pretraining") != "pretraining":
            self._on_downstream_event(event, n_epochs)
            return
        if kind == "step":
            frac = (event.epoch - 1 + (event.step / event.n_steps if event.n_steps else 0.5)) / n_epochs
            self.progress.setValue(int(PROGRESS_MAX * min(frac, 1.0)))
            if "loss" in event.losses:
                self.loss_curve.add_step(event.losses["loss"])
            loss = event.losses.get("loss")
            self.progress_label.setText(
                f"epoch {event.epoch}/{event.n_epochs}, step {event.step}"
                + (f"/{event.n_steps}" if event.n_steps else "") + (f", loss {loss:.4g}" if loss is not None else ""))
        elif kind == "epoch":
            self.progress.setValue(int(PROGRESS_MAX * event.epoch / n_epochs))
            if "loss" in event.losses:
                self.loss_curve.add_epoch(event.losses["loss"], event.val_loss)
            val = f", validation {event.val_loss:.4g}" if event.val_loss is not None else ""
            self.progress_label.setText(
                f"epoch {event.epoch}/{event.n_epochs}, loss {event.losses.get('loss', float('nan')):.4g}{val}"
                f" ({event.elapsed:.1f} s)")
        elif kind in ("start", "end"):
            self.progress_label.setText(event.message)
        now = time.perf_counter()
        if kind in ("epoch", "end") or now - self._last_redraw > LOSS_REDRAW_SECONDS:
            self.loss_curve.refresh()
            self._last_redraw = now

    def _on_downstream_event(self, event, n_epochs: int) -> None:
        """A training the method runs while evaluating (fine-tuning): the bar shows its progress, the
        label names it; the loss curve stays the pretraining curve."""
        what = event.stage
        if event.kind == "start":
            self.progress.setValue(0)
            self.progress_label.setText(f"{what}: {event.message}")
        elif event.kind in ("step", "epoch"):
            frac = event.epoch / n_epochs
            if event.kind == "step" and event.n_steps:
                frac = (event.epoch - 1 + event.step / event.n_steps) / n_epochs
            self.progress.setValue(int(PROGRESS_MAX * min(frac, 1.0)))
            loss = event.losses.get("loss")
            self.progress_label.setText(f"{what}: epoch {event.epoch}/{event.n_epochs}"
                                        + (f", loss {loss:.4g}" if loss is not None else ""))
        elif event.kind == "end":
            self.progress_label.setText(f"{what}: {event.message}")

    @explained
    def stop(self, *_):
        """Stop training at the next step; the model keeps what it learned and results are still made."""
        if self._pipeline is not None and self.training:
            self._pipeline.stop()
            self.stop_button.setEnabled(False)
            self.say("Stopping at the next step; the model keeps what it has learned so far…")

    def _on_worker_error(self, exc) -> None:
        self.report_error(exc)

    def _on_worker_finished(self) -> None:
        self._worker = None
        self.train_button.setEnabled(True)
        self.stop_button.setEnabled(False)
        self.load_model_button.setEnabled(True)
        self.loss_curve.refresh()

    @explained
    def _on_trained(self, output) -> None:
        if output is None:
            return
        method = output.method.name
        self.results[method] = output
        self.progress.setValue(PROGRESS_MAX)
        tr = output.train_result
        self.save_model_button.setEnabled(tr is not None)
        self._adopt_result(method, output)
        if tr is None:
            self.say(f"{method}: saved model applied to the slide in {output.metrics.get('predict_seconds', 0):.1f} s "
                     "on {}. Results added as layers (Results section).".format(output.metrics.get("device", "?")))
            return
        how = "stopped by you" if tr.stopped_by_user else "done"
        epochs, secs = tr.epochs_run, tr.train_seconds
        last = tr.history[-1] if tr.history else {}
        self.progress_label.setText(f"{how}: {epochs} epoch(s), last loss {last.get('loss', float('nan')):.4g}"
                                    + (f", validation {last['val_loss']:.4g}" if last.get("val_loss") is not None
                                       else ""))
        self.say(f"{method}: training {how} after {epochs} epoch(s) in {secs:.1f} s on "
                 f"{output.metrics.get('device', '?')}. Results added as layers (Results section).")

    # ------------------------------------------------------------------ save / load models
    @explained
    def _save_model_dialog(self, *_):
        path = QFileDialog.getExistingDirectory(self, "Folder for the model (weights + config + results)")
        if path:
            self.save_model(path)

    @explained
    def save_model(self, folder: str | os.PathLike, method: str | None = None):
        """Write the trained model (weights + config) and its results to `folder` (the CLI's layout)."""
        from ..pipeline import save_trained

        method = method or getattr(self, "_train_method", None) or self.method
        output = self.results.get(method)
        if output is None or output.train_result is None:
            raise SpatialDataError(f"no trained {method} model to save yet: train it first (Train section).")
        files = save_trained(folder, output)
        self.say(f"Saved {method} model and results to {folder} ({', '.join(sorted(files))}).")
        return files

    @explained
    def _load_model_dialog(self, *_):
        path = QFileDialog.getExistingDirectory(self, "Folder of a saved model (model.safetensors + model.json)")
        if path:
            self.load_model(path)

    @explained
    def load_model(self, folder: str | os.PathLike):
        """Load a saved model, restore its settings in the widget and apply it to the slide (worker)."""
        from ..pipeline import load_model

        if self.training:
            raise SpatialDataError("wait for the current run to finish before loading a model.")
        layer = self.require_data()
        method, cfg = load_model(folder)
        if method.name in [self.method_combo.itemText(i) for i in range(self.method_combo.count())]:
            self.method_combo.setCurrentText(method.name)
        self._restore_from_config(method.name, cfg)
        self.train_button.setEnabled(False)
        self.load_model_button.setEnabled(False)
        self._train_method = method.name
        self.say(f"Applying the saved {method.name} model to '{layer.name}'…")
        self._start_worker(_predict_events, (layer.metadata["adata"], str(folder), self.device_combo.currentText(),
                                             layer.name, cfg_domains(cfg), cfg.seed), self._on_event, self._on_trained)

    def _restore_from_config(self, method: str, cfg) -> None:
        from .widget_config import scalar_fields

        self.form(method).set_values({name: value for name, value, _ in scalar_fields(cfg)})
        self.epochs_spin.setValue(int(cfg.epochs))
        self.lr_edit.setText(f"{cfg.lr:g}")
        self.seed_spin.setValue(int(cfg.seed))

    # ------------------------------------------------------------------ 5 Results
    def _build_results_tab(self) -> None:
        tab = QWidget()
        lay = QVBoxLayout(tab)
        self.result_combo = QComboBox()
        self.result_combo.setMinimumContentsLength(10)
        lay.addWidget(hbox(QLabel("Results of"), self.result_combo))
        self.result_gene_combo = QComboBox()
        self.result_gene_combo.setEditable(True)
        self.recon_button = QPushButton("Show reconstruction")
        self.recon_button.clicked.connect(lambda *_: self.show_reconstruction())
        lay.addWidget(hbox(QLabel("Gene"), self.result_gene_combo, self.recon_button))
        self.error_button = QPushButton("Per-cell error")
        self.error_button.clicked.connect(lambda *_: self.show_error())
        self.rgb_button = QPushButton("Embedding RGB")
        self.rgb_button.clicked.connect(lambda *_: self.show_embedding_rgb())
        lay.addWidget(hbox(self.error_button, self.rgb_button))
        self.embed_how = QComboBox()
        self.embed_how.addItems(["pca", "umap"])
        self.embed_button = QPushButton("2-D embedding plot (linked)")
        self.embed_button.clicked.connect(lambda *_: self.show_embedding_2d())
        lay.addWidget(hbox(self.embed_how, self.embed_button))
        self.result_k_spin = QSpinBox()
        self.result_k_spin.setRange(0, 200)
        self.result_k_spin.setSpecialValueText("automatic")
        self.domains_button = QPushButton("Recompute domains")
        self.domains_button.clicked.connect(lambda *_: self.recompute_domains())
        lay.addWidget(hbox(QLabel("K"), self.result_k_spin, self.domains_button))
        self.celltype_button = QPushButton("Show domains / cell types")
        self.celltype_button.clicked.connect(lambda *_: self.show_categories())
        lay.addWidget(self.celltype_button)
        self.legend = Legend()
        lay.addWidget(self.legend)
        self.metrics_text = QPlainTextEdit()
        self.metrics_text.setReadOnly(True)
        self.metrics_text.setMaximumHeight(170)
        lay.addWidget(QLabel("Metrics"))
        lay.addWidget(self.metrics_text)
        lay.addStretch(1)
        self.tabs.addTab(tab, "5 Results")

    @property
    def result_method(self) -> str:
        return self.result_combo.currentText() or (next(iter(self.results)) if self.results else "")

    def result(self, method: str | None = None):
        method = method or self.result_method
        if method not in self.results:
            raise SpatialDataError("no results yet: train a method (Train section) or load a saved model.")
        return self.results[method]

    def _adopt_result(self, method: str, output) -> None:
        """Make the result AnnData the slide's AnnData (so every export holds every result) and add layers."""
        self._sync_slide_features(output)
        if self.result_combo.findText(method) < 0:
            self.result_combo.addItem(method)
        self.result_combo.setCurrentText(method)
        gene = self.result_gene_combo.currentText() or self.gene_combo.currentText()
        for lay in self.viewer.layers:  # previews and older results step back; the user toggles them
            if lay.metadata.get("spatialssl_preview") or lay.metadata.get("spatialssl_result") or \
                    lay.name in (MASK_LAYER, EGONET_LAYER):
                lay.visible = False
        self.show_categories(method)
        self.show_embedding_rgb(method)
        self.show_error(method)
        if gene:
            self.show_reconstruction(method, gene, visible=False)
        self.show_embedding_2d(method)
        self.viewer.reset_view()
        self.show_metrics(method)
        self._refresh_export_choices()

    def _sync_slide_features(self, output) -> None:
        """The slide layer carries the result AnnData and its obs as features (what the writer exports)."""
        from .layers import obs_to_features

        layer = self.data_layer
        if layer is None or layer.metadata.get("adata") is None or \
                layer.metadata["adata"].n_obs != output.adata.n_obs:
            return
        layer.metadata["adata"] = output.adata
        feats = obs_to_features(output.adata.obs, self._layer_rows(layer))
        old = layer.features
        for col in old.columns:  # keep per-layer extras (e.g. gene colours) the obs do not have
            if col not in feats.columns:
                feats[col] = old[col].to_numpy()
        layer.features = feats

    @staticmethod
    def _layer_rows(layer) -> np.ndarray:
        if "cell_index" in layer.features.columns:
            rows = layer.features["cell_index"].to_numpy(dtype=np.int64)
            return rows[rows >= 0]
        return np.arange(len(layer.data))

    def _result_rows(self, output) -> np.ndarray:
        """Cells drawn in result layers: the slide layer's cells (a display subsample for huge slides)."""
        layer = self.data_layer
        rows = self._layer_rows(layer) if layer is not None else np.arange(output.adata.n_obs)
        return rows[rows < output.adata.n_obs]

    def _result_layer(self, method: str, what: str, values: dict | None = None, **kwargs):
        """Add or update the Points layer '<method>: <what>' over the slide's cells."""
        from .layers import obs_to_features

        output = self.result(method)
        rows = self._result_rows(output)
        positions = kwargs.pop("positions", None)
        if positions is None:
            positions = self.cell_positions()[rows]
        feats = obs_to_features(output.adata.obs, rows)
        for name, vals in (values or {}).items():
            feats[name] = np.asarray(vals)[rows] if len(vals) == output.adata.n_obs else np.asarray(vals)
        size = float(self.data_layer.size.mean()) if self.data_layer is not None else 1.0
        meta = {"adata": output.adata, "spatialssl_result": method, "section_key": None}
        layer = self._set_points(f"{method}: {what}", positions, features=feats, size=kwargs.pop("size", size),
                                 metadata=meta, **kwargs)
        self._result_layers.setdefault(method, [])
        if layer not in self._result_layers[method]:
            self._result_layers[method].append(layer)
            events = layer.selected_data.events
            signal = getattr(events, "items_changed", None)  # psygnal Selection (napari >= 0.6)
            if signal is None:
                signal = events.changed  # napari's own evented Selection
            signal.connect(lambda *args, lay=layer: self._on_selection(lay))
        return layer

    @explained
    def show_reconstruction(self, method: str | None = None, gene: str | None = None, visible: bool = True):
        """Reconstructed expression of a gene (model space), masked cells ringed in white."""
        method = method or self.result_method
        output = self.result(method)
        gene = gene or self.result_gene_combo.currentText()
        if self.result_gene_combo.currentText() != gene:
            self.result_gene_combo.setCurrentText(gene)
        key = f"{method}_reconstruction"
        if key not in output.adata.layers:
            raise SpatialDataError(f"{method} gave no reconstruction (layers['{key}'] missing).")
        var = pd.Index(output.adata.var_names.astype(str))
        if gene not in var:
            raise SpatialDataError(f"gene {gene!r} is not in this slide; pick one from the list.")
        j = int(var.get_loc(gene))
        data = output.method.data
        model_genes = list(map(str, data.gene_names)) if data is not None else []
        if model_genes and gene not in model_genes:
            raise SpatialDataError(
                f"gene {gene!r} is not among the {len(model_genes)} genes the model reconstructs (e.g. "
                f"{', '.join(model_genes[:5])}); pick one of those.")
        recon = overlays.column(output.adata.layers[key], j)
        kept = self._reconstructed(method)
        if kept is not None:  # only some cells kept their reconstruction (eval.reconstruction): NaN = none
            recon[~kept] = np.nan
        values = {f"{gene} reconstructed": recon}
        if data is not None and data.n_cells == output.adata.n_obs:
            observed = overlays.column(data.X, model_genes.index(gene))
            values[f"{gene} observed (model input)"] = observed
            values[f"{gene} abs error"] = np.abs(recon - observed)
        masked = self._masked(method)
        from .layers import robust_limits

        layer = self._result_layer(method, f"reconstruction {gene}", values, face_color="transparent",
                                   visible=visible)
        col = f"{gene} reconstructed"
        layer.face_colormap = "magma"
        layer.face_contrast_limits = robust_limits(layer.features[col].to_numpy())
        layer.face_color = col
        if masked is not None:
            m = masked[self._result_rows(output)]
            layer.border_width = np.where(m, 0.25, 0.0)
            layer.border_color = "white"
        layer.metadata["spatialssl_legend"] = None
        n_masked = int(masked.sum()) if masked is not None else 0
        self.say(f"{method}: reconstructed {gene}; {n_masked:,} masked cells ringed in white (their values "
                 "come from their neighbourhood only)." + self._kept_note(kept))
        return layer

    def _reconstructed(self, method: str):
        """Boolean per cell when only some cells kept their reconstruction (large slides), else None."""
        col = f"{method}_reconstructed"
        obs = self.result(method).adata.obs
        return obs[col].to_numpy().astype(bool) if col in obs.columns else None

    @staticmethod
    def _kept_note(kept) -> str:
        if kept is None:
            return ""
        return (f" Only the {int(kept.sum()):,} masked cells kept a reconstruction on this large slide (the "
                "others are left blank); set eval.reconstruction=all to keep every cell's.")

    def _masked(self, method: str):
        col = f"{method}_masked"
        obs = self.result(method).adata.obs
        return obs[col].to_numpy().astype(bool) if col in obs.columns else None

    @explained
    def show_error(self, method: str | None = None):
        """Per-cell mean squared reconstruction error over the model's genes (model space)."""
        from .layers import robust_limits

        method = method or self.result_method
        output = self.result(method)
        key = f"{method}_reconstruction"
        data = output.method.data
        if key not in output.adata.layers or data is None or data.n_cells != output.adata.n_obs:
            return None
        cols = data.gene_index if data.gene_index is not None else None
        err = overlays.per_cell_error(output.adata.layers[key], data.X, cols)
        kept = self._reconstructed(method)
        if kept is not None:
            err[~kept] = np.nan
        layer = self._result_layer(method, "per-cell error", {"reconstruction MSE": err}, face_color="transparent",
                                   visible=False)
        layer.face_colormap = "viridis"
        layer.face_contrast_limits = robust_limits(err)
        layer.face_color = "reconstruction MSE"
        masked = self._masked(method)
        if masked is not None:
            others = err[~masked]
            others = others[np.isfinite(others)]
            self.say(f"{method}: per-cell error: masked cells {np.nanmean(err[masked]):.4g}, others "
                     f"{others.mean() if others.size else float('nan'):.4g} (mean squared error)."
                     + self._kept_note(kept))
        return layer

    @explained
    def show_embedding_rgb(self, method: str | None = None):
        method = method or self.result_method
        emb = self._embedding(method)
        rgb = overlays.pca_rgb(emb)
        rows = self._result_rows(self.result(method))
        return self._result_layer(method, "embedding RGB", face_color=rgb[rows], visible=False)

    def _embedding(self, method: str) -> np.ndarray:
        key = f"X_{method}"
        output = self.result(method)
        if key not in output.adata.obsm:
            raise SpatialDataError(f"{method} gave no embedding (obsm['{key}'] missing).")
        return np.asarray(output.adata.obsm[key])

    @explained
    def show_embedding_2d(self, method: str | None = None, how: str | None = None):
        """The embedding as a 2-D scatter beside the tissue; selecting cells in one highlights them in the other."""
        method = method or self.result_method
        how = how or self.embed_how.currentText()
        output = self.result(method)
        rows = self._result_rows(output)
        xy = overlays.embedding_2d(self._embedding(method)[rows], how, seed=int(self.seed_spin.value()))
        tissue = self.cell_positions()[rows]
        pos = overlays.place_beside(xy, tissue)
        colors = None
        dom = f"{method}_domain"
        if dom in output.adata.obs.columns:
            colors, _ = overlays.category_colors(output.adata.obs[dom].to_numpy()[rows])
        layer = self._result_layer(method, f"embedding 2-D ({how})", positions=pos,
                                   face_color=colors if colors is not None else "#9ecae1")
        layer.metadata["spatialssl_embedding_2d"] = True
        self.say(f"{method}: {how.upper()} of the embedding beside the tissue. Select cells in either "
                 "(select tool) to highlight them in the other.")
        return layer

    @explained
    def show_categories(self, method: str | None = None):
        """Spatial domains and predicted cell types as categorical colours, with a legend."""
        method = method or self.result_method
        obs = self.result(method).adata.obs
        rows = self._result_rows(self.result(method))
        made = None
        for what, col in (("cell types", f"{method}_cell_type"), ("domains", f"{method}_domain")):
            if col not in obs.columns:
                continue
            values = obs[col].to_numpy()[rows]
            colors, legend = overlays.category_colors(values)
            layer = self._result_layer(method, what, face_color=colors, visible=what == "domains")
            counts = pd.Series(values).astype(str).value_counts().to_dict()
            layer.metadata["spatialssl_legend"] = (f"{method} {what}", legend, counts)
            made = layer
        if made is None:
            raise SpatialDataError(f"{method} gave no domains or cell types.")
        title, legend, counts = made.metadata["spatialssl_legend"]
        self.legend.set_items(title, legend, counts)
        return made

    @explained
    def recompute_domains(self, method: str | None = None, k: int | None = None):
        """Spatial domains from the embedding: k-means with K clusters, or a BIC-chosen mixture (K automatic),
        computed in a background worker (minutes on millions of cells), then drawn."""
        method = method or self.result_method
        self.result(method)
        emb = self._embedding(method)
        k = int(self.result_k_spin.value()) if k is None else int(k)
        if k == 1 or k > len(emb):
            raise SpatialDataError(f"K = {k}: choose between 2 and {len(emb)} domains, or 0 for automatic.")
        what = f"k-means with K = {k}" if k else "a Gaussian mixture with K chosen by BIC"
        self._in_background(f"clustering {len(emb):,} cells of {method} ({what})", cluster_domains,
                            (emb, k, int(self.seed_spin.value())), lambda res: self._set_domains(method, *res))

    def _set_domains(self, method: str, labels: np.ndarray, k: int, how: str) -> None:
        output = self.result(method)
        output.adata.obs[f"{method}_domain"] = pd.Categorical(labels.astype(int).astype(str))
        self._sync_slide_features(output)
        self.show_categories(method)
        plot = [lay for lay in self._result_layers.get(method, []) if lay.metadata.get("spatialssl_embedding_2d")]
        if plot:
            colors, _ = overlays.category_colors(output.adata.obs[f"{method}_domain"].to_numpy()[
                plot[0].features["cell_index"].to_numpy()])
            plot[0].face_color = colors
        self.show_metrics(method)
        self.say(f"{method}: {k} spatial domains ({how}).")

    @explained
    def show_metrics(self, method: str | None = None):
        """The method's own metrics plus domain scores against the reference labels, when there are labels."""
        from ..data.io import label_codes
        from ..evaluation.clustering import domain_scores

        method = method or self.result_method
        output = self.result(method)
        lines = [f"{k}: {v:.4g}" for k, v in overlays.scalar_metrics(output.metrics).items()
                 if not k.startswith("data.")]
        dom = f"{method}_domain"
        for key in dict.fromkeys([self.domain_key, self.label_key]):
            if key and dom in output.adata.obs.columns and key in output.adata.obs.columns:
                truth, _ = label_codes(output.adata, key)
                pred = pd.Categorical(output.adata.obs[dom]).codes
                scores = domain_scores(pred, truth)
                lines.append(f"domains vs '{key}' (all cells, recomputed): ARI {scores['ari']:.3f}, "
                             f"NMI {scores['nmi']:.3f}, matched accuracy {scores['accuracy']:.3f} "
                             f"on {scores['n_cells']:,} labelled cells")
        if not lines:
            lines = ["(no metrics: choose a label or reference-domain key in the Data section to score results)"]
        self.metrics_text.setPlainText("\n".join(lines))
        return lines

    def _on_active_layer(self, event=None) -> None:
        layer = self.viewer.layers.selection.active
        legend = getattr(layer, "metadata", {}).get("spatialssl_legend") if layer is not None else None
        if legend:
            self.legend.set_items(*legend)

    # ------------------------------------------------------------------ linked selection
    def _on_selection(self, source) -> None:
        """Mirror a selection made in one result layer (tissue or 2-D plot) in the linked-selection layer."""
        if self._syncing:
            return
        self._syncing = True
        try:
            idx = np.fromiter(source.selected_data, dtype=np.int64)
            cells = source.features["cell_index"].to_numpy()[idx] if len(idx) else np.zeros(0, np.int64)
            self.highlight_cells(source.metadata.get("spatialssl_result"), cells)
        except Exception as exc:  # noqa: BLE001
            self.report_error(exc)
        finally:
            self._syncing = False

    def highlight_cells(self, method: str | None, cells: np.ndarray):
        """Ring `cells` on the tissue and in the 2-D embedding plot; select them in every linked layer."""
        cells = np.asarray(cells, dtype=np.int64)
        positions = []
        for layer in self._result_layers.get(method, []):
            if layer not in self.viewer.layers:
                continue
            hit = np.flatnonzero(np.isin(layer.features["cell_index"].to_numpy(), cells))
            if set(hit.tolist()) != set(layer.selected_data):
                layer.selected_data = set(hit.tolist())
            if layer.metadata.get("spatialssl_embedding_2d") or not positions:
                positions.append(np.asarray(layer.data)[hit])
        pts = np.concatenate(positions) if positions else np.zeros((0, 2))
        size = float(self.data_layer.size.mean()) * 2.2 if self.data_layer is not None else 1.0
        layer = self._set_points(SELECTION_LAYER, pts, face_color=[1.0, 1.0, 0.0, 0.25], border_color="#ffff00",
                                 border_width=0.25, size=size, visible=True, features=pd.DataFrame(
                                     {"cell_index": np.tile(cells, max(len(positions), 1))[:len(pts)]}))
        if len(cells):
            self.say(f"{len(cells):,} cells selected; ringed in yellow on the tissue and in the 2-D plot.")
        return layer

    # ------------------------------------------------------------------ 6 Export
    def _build_export_tab(self) -> None:
        tab = QWidget()
        form = QFormLayout(tab)
        self.export_combo = QComboBox()
        form.addRow("Layer", self.export_combo)
        self.export_expr = QCheckBox("CSV: include expression")
        form.addRow(self.export_expr)
        self.export_button = QPushButton("Export layer to .h5ad / .csv…")
        self.export_button.clicked.connect(self._export_dialog)
        form.addRow(self.export_button)
        self.png_button = QPushButton("Save PNG of the view…")
        self.png_button.clicked.connect(self._png_dialog)
        form.addRow(self.png_button)
        self.export_summary = QLabel("The slide layer holds every result after training (obs columns, "
                                     "embeddings in obsm, reconstructions in layers).")
        self.export_summary.setWordWrap(True)
        form.addRow(self.export_summary)
        self.tabs.addTab(tab, "6 Export")

    def _refresh_export_choices(self, *_):
        from napari.layers import Points

        if not hasattr(self, "export_combo"):
            return
        current = self.export_combo.currentText()
        names = [lay.name for lay in self.viewer.layers
                 if isinstance(lay, Points) and lay.metadata.get("adata") is not None]
        self.export_combo.clear()
        self.export_combo.addItems(names)
        if current in names:
            self.export_combo.setCurrentText(current)
        elif self.data_layer is not None:
            self.export_combo.setCurrentText(self.data_layer.name)

    @explained
    def _export_dialog(self, *_):
        path, _ = QFileDialog.getSaveFileName(self, "Export cells", "", "AnnData (*.h5ad);;Table (*.csv)")
        if path:
            self.export(path)

    @explained
    def export(self, path: str | os.PathLike, layer_name: str | None = None, overwrite: bool = False):
        """Write a layer (default: the slide layer, which holds every result) with the plugin's writer."""
        from .writer import write_layer

        name = layer_name or self.export_combo.currentText() or (self.data_layer.name if self.data_layer else "")
        if name not in self.viewer.layers:
            raise SpatialDataError("no layer to export: open a slide and train a method first.")
        layer = self.viewer.layers[name]
        out = write_layer(layer, str(path), overwrite=overwrite,
                          include_expression=self.export_expr.isChecked())
        self.say(f"Exported '{name}' to {out}.")
        return out

    @explained
    def _png_dialog(self, *_):
        path, _ = QFileDialog.getSaveFileName(self, "Save the view", "", "PNG image (*.png)")
        if path:
            self.save_png(path)

    @explained
    def save_png(self, path: str | os.PathLike, canvas_only: bool = True):
        """A PNG screenshot of the current view (the canvas; or the whole window)."""
        path = Path(path)
        if path.suffix.lower() != ".png":
            raise SpatialDataError(f"{path}: a screenshot is saved as .png; use a name ending in .png.")
        self.viewer.screenshot(str(path), canvas_only=canvas_only, flash=False)
        self.say(f"Saved the view to {path}.")
        return path

    # ------------------------------------------------------------------ layers helpers
    def _find(self, name: str):
        return self.viewer.layers[name] if name in self.viewer.layers else None

    def _remove_layers(self, predicate) -> None:
        for lay in [lay for lay in self.viewer.layers if predicate(lay)]:
            self.viewer.layers.remove(lay)

    # Layers are updated in place: removing a layer makes napari run a full garbage collection
    # (about a second with torch loaded), which would stall every click on the tissue.
    def _set_points(self, name: str, data, **kwargs):
        """Add the Points layer `name`, or update its points, features and style in place."""
        from napari.layers import Points

        layer = self._find(name)
        data = np.asarray(data, dtype=np.float64).reshape(-1, 2)
        kwargs.setdefault("border_width", 0)
        meta = kwargs.pop("metadata", {})
        if not isinstance(layer, Points):
            if layer is not None:
                self.viewer.layers.remove(layer)
            return self.viewer.add_points(data, name=name, metadata=meta, **kwargs)
        features = kwargs.pop("features", None)
        syncing, self._syncing = self._syncing, True  # a redraw is not a user's selection
        try:
            layer.selected_data = set()
        finally:
            self._syncing = syncing
        if len(layer.data) != len(data) or not np.array_equal(layer.data, data):
            layer.data = data
        if features is not None:
            layer.features = features
        for key in ("size", "border_color", "border_width", "face_color", "visible"):
            if key in kwargs:
                setattr(layer, key, kwargs.pop(key))
        for key, value in kwargs.items():
            setattr(layer, key, value)
        layer.metadata.update(meta)
        return layer

    def _set_vectors(self, name: str, vectors, color, width):
        layer = self._find(name)
        if layer is not None:
            layer.data = vectors
            layer.edge_color = color
            layer.edge_width = float(width)
            layer.visible = True
            return layer
        return self.viewer.add_vectors(vectors, name=name, edge_color=color, edge_width=float(width),
                                       vector_style="line", metadata={"spatialssl_preview": True})

    def _set_shapes(self, name: str, rects, **kwargs):
        layer = self._find(name)
        if layer is None:
            return self.viewer.add_shapes(list(rects), shape_type="rectangle", name=name,
                                          metadata={"spatialssl_preview": True}, **kwargs)
        layer.data = []
        if len(rects):
            layer.add_rectangles(list(rects), **{k: v for k, v in kwargs.items()
                                                 if k in ("edge_color", "face_color", "edge_width")})
        layer.visible = True
        return layer

    def _set_image(self, key: str, name: str, image, **kwargs):
        """Add or update the Image layer tagged `key` in its metadata (renamed to `name`)."""
        for layer in self.viewer.layers:
            if layer.metadata.get("spatialssl_image") == key:
                layer.data = image
                layer.name = name
                for attr, value in kwargs.items():
                    setattr(layer, attr, value)
                layer.visible = True
                return layer
        return self.viewer.add_image(image, name=name, metadata={"spatialssl_preview": True,
                                                                 "spatialssl_image": key}, **kwargs)

    @staticmethod
    def _values_to_rgba(values: np.ndarray, cmap: str) -> np.ndarray:
        from matplotlib import colormaps

        from .layers import robust_limits

        lo, hi = robust_limits(values)
        return colormaps[cmap](np.clip((values - lo) / (hi - lo), 0, 1)).astype(np.float32)

    # ------------------------------------------------------------------ settings
    def _schedule_save(self, *_):
        if hasattr(self, "_save_timer"):
            self._save_timer.start()

    def current_settings(self) -> dict:
        params = dict(self.settings.get("params", {}))
        for method, form in self._forms.items():
            params[method] = form.overrides()
        masks = dict(self.settings.get("masks", {}))
        masks.update(self._masks)
        if self.method:
            masks[self.method] = self.mask_settings()
        return {
            "method": self.method,
            "params": params,
            "masks": masks,
            "train": {"epochs": self.epochs_spin.value(), "lr": self.lr_edit.text(), "seed": self.seed_spin.value(),
                      "device": self.device_combo.currentText(), "k": self.k_spin.value()},
            "data": {"section_key": self.section_combo.currentText(), "label_key": self.label_combo.currentText(),
                     "domain_key": self.domain_key_combo.currentText()},
        }

    def save_settings(self) -> None:
        self.settings = self.current_settings()
        save_settings(self.settings)

    def _restore_settings(self) -> None:
        s = self.settings
        if s.get("method") and self.method_combo.findText(s["method"]) >= 0:
            self.method_combo.setCurrentText(s["method"])
        self._on_method_changed()
        t = s.get("train", {})
        try:
            self.epochs_spin.setValue(int(t.get("epochs", self.epochs_spin.value())))
            self.lr_edit.setText(str(t.get("lr", self.lr_edit.text())))
            self.seed_spin.setValue(int(t.get("seed", 0)))
            if self.device_combo.findText(str(t.get("device", "auto"))) >= 0:
                self.device_combo.setCurrentText(str(t.get("device", "auto")))
            self.k_spin.setValue(int(t.get("k", 0)))
        except (TypeError, ValueError):  # a hand-edited settings file: keep the defaults
            pass
        self._update_mask_enabled()

    def closeEvent(self, event):  # noqa: N802 - Qt naming
        self.save_settings()
        if self._pipeline is not None and self.training:
            self._pipeline.stop()
        super().closeEvent(event)


# ---------------------------------------------------------------------- worker bodies (no Qt)
def build_view_graph(method_name: str, cfg, data, radius=None):
    """The neighbour graph a method trains on, for the View previews: the method's own ``build_graph``
    when it has one (e.g. spotscape's SNN graph), else the core's radius graph."""
    from ..graphs.neighbors import radius_graph
    from ..models.base import get_method_class

    method = get_method_class(method_name)(cfg)
    if hasattr(method, "build_graph"):
        return method.build_graph(data)
    if radius is not None:
        return radius_graph(data.coords, float(radius), data.section)
    raise SpatialDataError(f"{method_name}: its settings define no graph to preview.")


def cluster_domains(emb: np.ndarray, k: int, seed: int = 0) -> tuple[np.ndarray, int, str]:
    """(labels, K, how): k-means with `k` clusters, or a Gaussian mixture with K chosen by BIC when k = 0."""
    from ..evaluation.clustering import gmm_bic, kmeans

    if k:
        return kmeans(emb, k, seed=seed), int(k), f"k-means, K = {k}"
    labels, k = gmm_bic(emb, seed=seed)
    return labels, int(k), f"Gaussian mixture, K = {k} chosen by BIC"


def _pipeline_events(pipeline, adata, name, n_domains=None, seed=0):
    """Generator run by the worker: the pipeline's events, then its output as the return value.

    Methods that give no spatial domains get them here from their embedding (the core's
    clustering), so every result can be shown as domains."""
    yield from pipeline.run(adata, name=name)
    output = pipeline.output
    if output is not None:
        from ..training import TrainEvent

        yield TrainEvent("stage", 0, 0, message="spatial domains")
        add_domains(output, n_domains, seed)
    return output


def add_domains(output, n_domains: int | None, seed: int = 0) -> None:
    """obs['<method>_domain'] from obsm['X_<method>'] when the method did not set it: k-means with
    `n_domains` clusters, or a Gaussian mixture with K chosen by BIC when None."""
    from ..evaluation.clustering import gmm_bic, kmeans

    method = output.method.name
    key, emb_key = f"{method}_domain", f"X_{method}"
    obs = output.adata.obs
    if key in obs.columns or emb_key not in output.adata.obsm:
        return
    emb = np.asarray(output.adata.obsm[emb_key])
    if n_domains:
        labels, k = kmeans(emb, int(n_domains), seed=seed), int(n_domains)
    else:
        labels, k = gmm_bic(emb, seed=seed)
    obs[key] = pd.Categorical(np.asarray(labels).astype(int).astype(str))
    output.metrics["domains_added_by_widget"] = {"k": int(k), "how": "kmeans" if n_domains else "gmm_bic"}


def _predict_events(adata, folder, device, name, n_domains=None, seed=0):
    from ..pipeline import predict

    from ..training import TrainEvent

    yield TrainEvent("stage", 0, 0, message="applying the saved model")
    output = predict(adata, folder, device=device, name=name)
    add_domains(output, n_domains, seed)
    return output


def cfg_domains(cfg) -> int | None:
    ev = getattr(cfg, "eval", None)
    return getattr(ev, "n_domains", None) if ev is not None else None
