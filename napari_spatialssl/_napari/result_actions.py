"""The Session's actions on results (Qt-free): show one result, compare methods, recompute domains,
hide a region, plot the embedding, summarise the figures. Each runs as a side job (see actions.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..data.io import SpatialDataError
from . import displays
from .big_slides import fitted


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
                     fitted(lambda: displays.result_layer(slide, result, what, gene, reference_key=ref)), (),
                     session.events.display.emit)


def _measured(session, results, gene: str) -> np.ndarray:
    for r in results:
        values = r.observed(gene)
        if values is not None:
            return values
    from .genes import gene_expression

    return gene_expression(session.require_slide().adata, [gene])[:, 0]


def compare(session, gene: str, methods: list[str] | None = None):
    slide = session.require_slide()
    results = [session.result(m) for m in (methods or [m for m in session.methods if m in session.results])]
    results = [r for r in results if r.has("reconstruction")]
    if not results:
        raise SpatialDataError("no reconstruction to compare yet: train a method first.")
    session.side_job(f"comparing {gene}", fitted(lambda: displays.compare_layers(slide, results, gene,
                                                                                  _measured(session, results, gene))),
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
                      geometry.section_names, ref_key), done, channel="cluster")


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
        report, display, chosen = _region_job(result.trained, cells, session.config(method).device, gene, slide,
                                              polygon)
        return report, fitted(lambda: display)(), chosen

    def done(value):
        report, display, chosen = value
        session.region_report = (report, polygon)
        session.events.region.emit(report)
        session.events.display.emit(display)
        s = report.summary()
        session.say(f"{method}: {s['cells']:,} cells hidden and predicted; showing {chosen}. MSE model "
                    f"{s['model']['mse']:.3g} vs neighbour mean {s['neighbour mean']['mse']:.3g} and interpolation "
                    f"{s['interpolation']['mse']:.3g}.")

    session.side_job(f"hiding the region from {method}", job, (), done, channel="region")


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

    session.side_job(f"showing {gene} in the region", fitted(job), (), session.events.display.emit)


@dataclass
class EmbeddingPoints:
    method: str
    xy: np.ndarray
    rgba: np.ndarray
    cells: np.ndarray
    title: str
    axes: tuple[str, str]
    figure: object = None  # figures.Figure


PLOT_CELLS = 30_000  # cells drawn in the dock's scatter (a seeded sample above that)


def plot_embedding(session, method: str, how: str = "pca"):
    from .overlays import embedding_2d

    slide = session.require_slide()
    result = session.result(method)
    ref = _reference_key(session, result)

    def job():
        rows = slide.shown
        if len(rows) > PLOT_CELLS:
            rows = np.sort(np.random.default_rng(0).choice(rows, PLOT_CELLS, replace=False))
        xy = embedding_2d(result.embedding()[rows], how, seed=session.config(method).seed)
        if result.has("domains"):
            rgba, _ = displays.categorical_colors(result.categories("domains").to_numpy()[rows],
                                                  displays.domain_colors(result, ref))
        else:
            rgba = np.tile(np.array([[0.6, 0.8, 0.9, 1.0]], np.float32), (len(rows), 1))
        from .figures import draw, embedding_figure

        names = ("PC 1", "PC 2") if how == "pca" else ("UMAP 1", "UMAP 2")
        title = f"{method} embedding ({how.upper()}), coloured by domain"
        return EmbeddingPoints(method, xy, rgba, rows, title, names, draw(embedding_figure, xy, rgba, title, names))
    session.side_job(f"{how.upper()} of the {method} embedding", job, (), session.events.plot.emit, channel="plot")


@dataclass
class Summary:
    method: str
    rows: list  # (what, value, {baseline: value}, higher_is_better, flag text)
    confusion: object | None  # pandas DataFrame: predicted x reference counts
    confusion_title: str = ""
    figure: object = None  # figures.Figure of the confusion matrix


def summarize(session, method: str):
    from .layers import is_unknown_label

    result = session.result(method)
    ref = _reference_key(session, result)

    def job():
        rows = []
        for what, value, base, higher in result.headline():
            best = [k for k, v in base.items() if v is not None and ((v > value) if higher else (v < value))]
            flag = f"worse than {', '.join(best)}" if best else ("beats every baseline" if base else "")
            rows.append((what, value, base, higher, flag))
        confusion = None
        title = ""
        if result.has("domains") and ref:
            import pandas as pd

            truth = result.adata.obs[ref].astype(str)
            keep = ~truth.map(is_unknown_label).to_numpy()
            pred = result.categories("domains").astype(str).to_numpy()[keep]
            confusion = pd.crosstab(pred, truth.to_numpy()[keep])
            pairs = displays.matched_names(pred, truth.to_numpy()[keep])
            order = sorted(confusion.index, key=lambda d: list(confusion.columns).index(pairs[d])
                           if d in pairs else len(confusion.columns))
            confusion = confusion.loc[order, sorted(confusion.columns, key=displays.natural_key)]
            title = f"{method} domains vs '{ref}'"
        figure = None
        if confusion is not None and len(confusion):
            from .figures import confusion_figure, draw

            figure = draw(confusion_figure, confusion, title)
        return Summary(method, rows, confusion, title, figure)
    session.side_job(f"summarising {method}", job, (), session.events.summary.emit, channel="summary")


