"""The Session's actions (Qt-free): each checks what it can at once, then starts its work as a job.

Heavy work (graphs, previews, training, colours, clustering, region inspection, writing files)
always runs in a job; the functions named ``_*_job`` below are the job bodies, pure functions of
their arguments, run off the main thread. Their results come back to the Session on the main
thread and leave as events.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from ..data.io import SpatialDataError
from . import displays, previews, result_actions
from .big_slides import fitted
from .progress import ProgressTracker, finished_text


def _method(session, name: str | None = None):
    from ..models.base import get_method_class

    return get_method_class(name or session.method)(session.config(name))


# -- the slide ------------------------------------------------------------------------------------

def _read_job(path):
    from .reader import read_slides

    return read_slides(str(path))


def open_file(session, path):
    """Read a slide off the main thread; each layer it gives is added (and the first worked on)."""
    def done(layers):
        for layer_data in layers[:1]:
            session.events.layer_data.emit(layer_data)
    session.side_job(f"reading {Path(path).name}", _read_job, (path,), done, channel="read")


def show_gene(session, gene: str):
    """The measured (log-normalised) expression of a gene over the tissue."""
    slide = session.require_slide()

    def job():
        from .genes import gene_expression

        if gene not in set(map(str, slide.adata.var_names)):
            raise SpatialDataError(f"gene {gene!r} is not in this slide; pick one from the list.")
        values = gene_expression(slide.adata, [gene], slide.shown)[:, 0]
        rgba, lim = displays.continuous_colors(values, "magma")
        spec = displays.points_spec("measured", f"{gene} measured (log-normalised)", slide.positions[slide.shown],
                                    rgba, slide.point_size, slide.shown, extra={f"{gene} (log-norm)": values})
        return displays.Display([spec], top=spec.key, colorbar=("magma", *lim, f"{gene} (log-normalised)"),
                                text=f"{gene}: measured expression, log-normalised.")
    session.side_job(f"colouring by {gene}", fitted(job), (), session.events.display.emit)


# -- the view and its previews -------------------------------------------------------------------

def check_view(session):
    """The preflight report of the current method's view on the slide (off the main thread)."""
    if session.slide is None:
        return
    from ..preflight import check_view as preflight

    method, cfg = session.method, copy.deepcopy(session.config())
    session.side_job(f"checking the {method} view", lambda g: preflight(method, cfg, g),
                     (session.geometry(cfg),), session.events.view.emit, channel="view")


def _graph(session, cfg, method):
    geometry = session.geometry(cfg)
    return session.cached("graph", cfg, lambda: method.preview_graph(geometry))


def _dataset(session, cfg):
    from ..pipeline import dataset_from_config

    slide = session.require_slide()
    return session.cached("dataset", cfg.data, lambda: dataset_from_config(slide.adata, cfg, name=slide.name))


def _lattices(session, cfg, method):
    from ..graphs.lattice import build_lattice

    data = _dataset(session, cfg)
    bin_size = method.bin_size_for(data)

    def build():
        return {s: build_lattice(data.coords, data.X, bin_size, cells=data.section_indices(s), section=s)
                for s in range(data.n_sections)}
    return data, bin_size, session.cached("lattices", cfg, build)


def preview_view(session, cell: int | None = None):
    slide = session.require_slide()
    cfg = copy.deepcopy(session.config())
    method = _method(session)
    if method.view_kind == "graph":
        def job():
            from ..preflight import check_view as preflight

            geometry = session.geometry(cfg)
            report = preflight(session.method, cfg, geometry)
            report.raise_errors()
            return previews.graph_preview(slide, _graph(session, cfg, method), report, cell, method.view_hops())
    else:
        def job():
            data, bin_size, lattices = _lattices(session, cfg, method)
            return previews.patch_preview(slide, data, lattices, bin_size, method.patch_shape(),
                                          min(cfg.n_channels, data.n_genes), cfg.seed, cfg.mask, cfg.token_bins,
                                          data.gene_names, cell)
    session.side_job(f"drawing the {session.method} view", fitted(job), (), session.events.display.emit)


def preview_mask(session):
    slide = session.require_slide()
    cfg = copy.deepcopy(session.config())
    method = _method(session)
    if method.mask_kind == "regions":
        return preview_view(session)

    def job():
        if method.mask_kind == "genes":
            data = _dataset(session, cfg)
            return previews.view_mask_preview(slide, _graph(session, cfg, method), cfg.edge_drop, cfg.feature_mask,
                                              cfg.seed, data.gene_names)
        from ..masking import draw_cell_mask

        geometry = session.geometry(cfg)
        adjacency = _graph(session, cfg, method).to_scipy() if cfg.mask.strategy == "niches" else None
        mask = draw_cell_mask(cfg.mask, geometry.n_cells, np.random.default_rng(cfg.seed), labels=geometry.labels,
                              label_names=geometry.label_names, adjacency=adjacency)
        return previews.cell_mask_preview(slide, mask, cfg.mask.strategy)
    session.side_job("drawing the mask", fitted(job), (), session.events.display.emit)


# -- training, models --------------------------------------------------------------------------------

def _train_job(pipeline, adata, name):
    yield from pipeline.run(adata, name=name)
    return pipeline.output


def _main_job(session, kind: str, text: str, fn, args, on_done, on_yield=None):
    if session.job.kind != "idle":
        raise SpatialDataError(f"wait for the current {session.job.kind} to finish (or Stop it) first.")
    session.set_job(kind, text)
    session.say(text)

    def done(value):
        session.guarded(on_done, value)

    session.runner.start(fn, *args, on_yield=on_yield, on_return=done, on_error=session.fail,
                         on_finish=lambda: session.set_job("idle"))


def warm_up() -> None:
    """Load what jobs need in the background (a side job at start), so no first use stalls the viewer."""
    import importlib

    for name in ("napari_spatialssl.pipeline", "napari_spatialssl.models.gnn_mask", "napari_spatialssl.models.spotscape",
                 "napari_spatialssl.models.patch_mae", "napari_spatialssl.evaluation.domains",
                 "napari_spatialssl.evaluation.clustering", "napari_spatialssl.evaluation.mclust",
                 "napari_spatialssl.evaluation.regions", "napari_spatialssl.preflight", "sklearn.cluster",
                 "sklearn.neighbors", "sklearn.linear_model", "igraph", "leidenalg", "scanpy", "torch_geometric.nn"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    try:  # napari's unit registry (pint) is built lazily, ~0.3 s, on the first layer added: build it here
        import pint

        pint.get_application_registry()("pixel")
    except Exception:  # noqa: BLE001  (a warm-up never fails a session)
        pass
    from .figures import warm_up as start_figure_helper

    start_figure_helper()


def max_devices() -> int:
    """One training process per CUDA GPU, else one per CPU core (gloo ranks sharing the cores)."""
    from ..distributed import local_device_counts

    counts = local_device_counts()
    return max(1, counts["cuda"] or counts["cpu_cores"])


def checked_devices(n) -> int:
    from ..distributed import local_device_counts

    top = max_devices()
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= int(n) <= top:
        what = "GPUs" if local_device_counts()["cuda"] else "CPU cores"
        raise SpatialDataError(f"devices: {n!r} training processes asked for; this machine offers 1 to {top} "
                               f"({top} {what}).")
    return int(n)


def train(session):
    from ..pipeline import Pipeline

    slide = session.require_slide()
    method = session.method
    pipeline = Pipeline(method, copy.deepcopy(session.config()),  # validated here, before any work
                        devices=session.devices)
    session._pipeline = pipeline
    tracker = ProgressTracker()

    def on_event(event):
        p = tracker.update(event)
        if p is not None:
            session.events.progress.emit(p)
        if event.kind == "warning":
            session.say(event.message, "warning")

    def done(output):
        result = session.adopt_output(output)
        session.say(finished_text(output) + " Results are on the tissue (Results).")
        result_actions.show(session, method, "domains" if result.has("domains") else "embedding")

    where = f" on {session.devices} processes" if session.devices > 1 else ""
    _main_job(session, "training", f"Training {method} on {slide.adata.n_obs:,} cells{where}…", _train_job,
              (pipeline, slide.adata, slide.name), done, on_event)


def save_model(session, folder, method: str, overwrite: bool = False):
    from ..pipeline import PipelineOutput, save_trained

    result = session.result(method)
    if result.trained is None or result.source != "trained":
        raise SpatialDataError(f"no {method} model trained in this session to save: train it first (Train).")
    output = PipelineOutput(result.adata, result.metrics, result.trained, result.train_result)
    _main_job(session, "saving", f"Saving the {method} model to {folder}…", save_trained, (folder, output),
              lambda files: session.say(f"Saved the {method} model and its results to {folder} "
                                        f"({', '.join(sorted(files))})."), None)


def _predict_job(adata, folder, device, name):
    from ..pipeline import predict

    notes: list[str] = []
    output = predict(adata, folder, device=device, name=name, notes=notes)
    return output, notes


def load_model(session, folder):
    slide = session.require_slide()

    def done(value):
        output, notes = value
        for note in notes:
            session.say(note, "warning")
        loaded = output.method.config
        current = session.configs[output.method.name]
        for key in ("section_key", "label_key", "ignore_labels"):
            setattr(loaded.data, key, getattr(current.data, key))
        loaded.eval.domain_key = current.eval.domain_key
        session.configs[output.method.name] = loaded
        session.set_method(output.method.name)
        session.events.settings.emit(output.method.name)
        session.adopt_output(output)
        session.say(finished_text(output))
        result_actions.show(session, output.method.name, "domains")

    _main_job(session, "predicting", f"Applying the model in {folder} to '{slide.name}'…", _predict_job,
              (slide.adata, str(folder), session.config().device, slide.name), done)


# -- export -------------------------------------------------------------------------------------------

def export(session, path, include_expression: bool, overwrite: bool):
    from ..data.export import EXPORT_SUFFIXES, check_export_path, write_adata

    slide = session.require_slide()
    path = Path(path)
    if path.suffix.lower() not in EXPORT_SUFFIXES:
        path = path.with_name(path.name + ".h5ad")  # a name typed without its suffix
    check_export_path(path, overwrite=overwrite)  # before any work
    _main_job(session, "exporting", f"Writing '{slide.name}' with every result to {path}…",
              lambda: write_adata(slide.adata, path, overwrite=overwrite, include_expression=include_expression), (),
              lambda out: session.say(f"Exported '{slide.name}' (every result) to {out}."))
    return path


def write_to_store(session, table: str, overwrite: bool):
    from ..data.stores import write_results_to_store

    slide = session.require_slide()
    store = (slide.adata.uns.get("spatialssl_store") or {}).get("path")
    if not store:
        raise SpatialDataError(f"'{slide.name}' was not read from a SpatialData store; export it to .h5ad instead.")
    _main_job(session, "exporting", f"Writing the results into {store} as table '{table}'…", write_results_to_store,
              (store, slide.adata, table, overwrite), lambda p: session.say(f"Results written into {p}."))
