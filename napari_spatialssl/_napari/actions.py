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
from . import displays, previews
from .progress import ProgressTracker, finished_text


def _method(session, name: str | None = None):
    from ..models.base import get_method_class

    return get_method_class(name or session.method)(session.config(name))


# -- the view and its previews -------------------------------------------------------------------

def check_view(session):
    """The preflight report of the current method's view on the slide (off the main thread)."""
    if session.slide is None:
        return
    from ..preflight import check_view as preflight

    method, cfg = session.method, copy.deepcopy(session.config())
    session.side_job(f"checking the {method} view", lambda g: preflight(method, cfg, g),
                     (session.geometry(cfg),), session.events.view.emit)


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
    session.side_job(f"drawing the {session.method} view", job, (), session.events.display.emit)


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
    session.side_job("drawing the mask", job, (), session.events.display.emit)


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


def train(session):
    from ..pipeline import Pipeline

    slide = session.require_slide()
    method = session.method
    pipeline = Pipeline(method, copy.deepcopy(session.config()))  # validated here, before any work
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
        show(session, method, "domains" if result.has("domains") else "embedding")

    _main_job(session, "training", f"Training {method} on {slide.adata.n_obs:,} cells…", _train_job,
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
        show(session, output.method.name, "domains")

    _main_job(session, "predicting", f"Applying the model in {folder} to '{slide.name}'…", _predict_job,
              (slide.adata, str(folder), session.config().device, slide.name), done)


# -- results -------------------------------------------------------------------------------------------

def _reference_key(session, result) -> str | None:
    cfg = session.config(result.method) if result.method in session.configs else session.config()
    for key in (cfg.eval.domain_key, cfg.data.label_key):
        if key and key in result.adata.obs.columns:
            return key
    return None


def show(session, method: str, what: str, gene: str | None = None):
    slide = session.require_slide()
    result = session.result(method)
    ref = _reference_key(session, result) if what != "cell types" else session.config(method).data.label_key
    session.shown = (method, what, gene)
    session.side_job(f"colouring {method} {what}",
                     lambda: displays.result_layer(slide, result, what, gene, reference_key=ref), (),
                     session.events.display.emit)


def _measured(session, results, gene: str) -> np.ndarray:
    for r in results:
        values = r.observed(gene)
        if values is not None:
            return values
    from .layers import gene_expression

    return gene_expression(session.require_slide().adata, [gene])[:, 0]


def compare(session, gene: str, methods: list[str] | None = None):
    slide = session.require_slide()
    results = [session.result(m) for m in (methods or [m for m in session.methods if m in session.results])]
    results = [r for r in results if r.has("reconstruction")]
    if not results:
        raise SpatialDataError("no reconstruction to compare yet: train a method first.")
    session.side_job(f"comparing {gene}", lambda: displays.compare_layers(slide, results, gene,
                                                                          _measured(session, results, gene)),
                     (), session.events.display.emit)


def _cluster_job(result, n_domains, domain_method, seed, reference, section, section_names, reference_key):
    from ..evaluation.domains import cluster_domains, domain_categorical, score_domains

    labels, info = cluster_domains(result.embedding(), n_domains, seed=seed, method=domain_method)
    scores = score_domains(labels, reference, section, section_names, reference_key)
    return domain_categorical(labels), {"n_domains": info["n_domains"], "clustering": info, **scores}


def recompute_domains(session, method: str, n_domains: int | None, domain_method: str = "auto"):
    from ..data.io import label_codes

    result = session.result(method)
    cfg = session.config(method)
    ref_key = _reference_key(session, result)
    reference = label_codes(result.adata, ref_key, cfg.data.ignore_labels)[0] if ref_key else None
    geometry = session.geometry(cfg)

    def done(value):
        categorical, metrics = value
        result.adata.obs[f"{method}_domain"] = categorical
        result.metrics["domains"] = metrics
        session.events.results.emit(method)
        session.say(f"{method}: {metrics['n_domains']} spatial domains ({metrics['clustering']['method']}).")
        show(session, method, "domains")

    session.side_job(f"clustering {method} domains", _cluster_job,
                     (result, n_domains, domain_method, cfg.seed, reference, geometry.section,
                      geometry.section_names, ref_key), done)


def _region_job(trained, cells, device, gene, slide, polygon):
    from ..evaluation.regions import inspect_region as inspect
    from ..training import resolve_device
    from .overlays import column

    report = inspect(trained, cells, resolve_device(device))
    if gene not in report.genes:
        spread = report.observed.var(0)
        gene = report.genes[int(np.argmax(spread))]
    measured = column(trained.data.X, report.genes.index(gene))
    return report, displays.region_layers(slide, report, gene, polygon, measured), gene


def inspect_region(session, method: str, polygon: np.ndarray, gene: str | None = None):
    from ..evaluation.regions import cells_in_polygon

    slide = session.require_slide()
    result = session.result(method)
    if result.trained is None or getattr(result.trained, "data", None) is None:
        raise SpatialDataError(f"{method}: inspecting a region needs its trained model in this session: train it "
                               "(or load its model and predict) first.")
    polygon = np.asarray(polygon, np.float64)

    def job():
        cells = cells_in_polygon(slide.positions, polygon)
        return _region_job(result.trained, cells, session.config(method).device, gene, slide, polygon)

    def done(value):
        report, display, chosen = value
        session.region_report = (report, polygon)
        session.events.region.emit(report)
        session.events.display.emit(display)
        s = report.summary()
        session.say(f"{method}: {s['cells']:,} cells hidden and predicted; showing {chosen}. MSE model "
                    f"{s['model']['mse']:.3g} vs neighbour mean {s['neighbour mean']['mse']:.3g} and interpolation "
                    f"{s['interpolation']['mse']:.3g}.")

    session.side_job(f"hiding the region from {method}", job, (), done)


def show_region_gene(session, gene: str):
    if session.region_report is None:
        raise SpatialDataError("draw a region and inspect it first.")
    report, polygon = session.region_report
    slide = session.require_slide()
    trained = session.result(report.method).trained

    def job():
        from .overlays import column

        if gene not in report.genes:
            raise SpatialDataError(f"gene {gene!r} is not among the model's genes.")
        return displays.region_layers(slide, report, gene, polygon, column(trained.data.X, report.genes.index(gene)))

    session.side_job(f"showing {gene} in the region", job, (), session.events.display.emit)


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
