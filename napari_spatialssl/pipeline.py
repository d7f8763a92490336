"""The headless pipeline shared by the CLI, the Python API and the napari widget.

AnnData -> SpatialDataset -> method.prepare -> Trainer (pretraining) -> method.evaluate ->
results written back to a copy of the AnnData (and, given an output folder, to files).

`Pipeline.run` is a generator of TrainEvents so that a caller can show progress and call
`Pipeline.stop()` from another thread; `fit` is the one-call convenience.
"""

from __future__ import annotations

import csv
import io
import json
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import scipy.sparse as sp

from . import checkpoints
from .config import TrainConfig, apply_overrides, config_from_dict, config_to_dict, validate_config
from .data.dataset import SpatialDataset, rows_as_csr
from .data.io import SpatialDataError, atomic_write_h5ad, atomic_write_text
from .models.base import MethodResults, SSLMethod, data_config_of, get_method_class
from .graphs.squidpy_graph import write_run_graph
from .preflight import check_view
from .runs import RunFolder, RunFolderError, verify_run
from .budget import release_freed_memory
from .training import (TrainEvent, Trainer, TrainResult, load_checkpoint, package_versions, save_model,
                       seed_everything)

UNS_KEY = "spatialssl"


def make_config(method: str, overrides: list[str] | dict | None = None, **fields):
    """The method's config with defaults, then keyword fields, then ``name=value`` overrides."""
    cls = get_method_class(method).config_class
    cfg = cls()
    apply_overrides(cfg, {k: v for k, v in fields.items() if v is not None}, parse_text=False)
    return validate_config(apply_overrides(cfg, overrides))


def dataset_from_config(adata, config, *, genes=None, name: str = "AnnData") -> SpatialDataset:
    dc = data_config_of(config)
    ec = getattr(config, "eval", None)
    domain_key = getattr(ec, "domain_key", None)
    if domain_key and domain_key not in adata.obs.columns and genes is not None:
        domain_key = None  # predicting on a new slide without reference domains
    data = SpatialDataset.from_anndata(
        adata,
        spatial_key=dc.spatial_key,
        coord_columns=dc.coord_columns,
        section_key=dc.section_key,
        label_key=dc.label_key,
        ignore_labels=dc.ignore_labels,
        preprocess=dc.preprocess,
        genes=genes,
        name=name,
        domain_key=domain_key,
    )
    if dc.graph == "auto":
        data.spatial_graph = user_graph(adata, data)
    return data


def user_graph(adata, data: SpatialDataset):
    """The spatial graph a user built with squidpy (``obsp['spatial_connectivities']``), to train on
    instead of building one; None when there is none, or when it is a graph a previous run of ours wrote."""
    from .graphs.squidpy_graph import has_squidpy_graph, is_spatialssl_graph, read_squidpy_graph

    if not has_squidpy_graph(adata) or is_spatialssl_graph(adata):
        return None
    return read_squidpy_graph(adata, data.coords, data.section)


@dataclass
class PipelineOutput:
    adata: Any
    metrics: dict
    method: SSLMethod
    train_result: TrainResult | None
    files: dict = field(default_factory=dict)


class Pipeline:
    """One method on one slide. ``run`` yields TrainEvents (event.message holds the stage).

    Several devices: ``devices=N`` makes this process rank 0 of N training processes on this
    machine (N - 1 helpers are started and given the slide; one GPU each on CUDA, gloo on CPU);
    ``dist`` (a distributed.DistContext) joins a group that a launcher started (torchrun, srun,
    ``fit --devices``). Every rank pretrains its share; rank 0 alone evaluates, writes the run
    folder and returns the output (the others return None); ``stop`` reaches every rank."""

    def __init__(self, method: str, config=None, *, dist=None, devices: int = 1):
        self.method_cls = get_method_class(method)
        self.config = config if config is not None else self.method_cls.config_class()
        if not isinstance(self.config, self.method_cls.config_class):
            raise SpatialDataError(f"{method}: config is a {type(self.config).__name__}; pass a "
                                   f"{self.method_cls.config_class.__name__} (pipeline.make_config({method!r}, ...)).")
        validate_config(self.config)  # before any data is read
        self.method: SSLMethod = self.method_cls(self.config)
        self.output: PipelineOutput | None = None
        self._trainers: list[Trainer] = []
        self._stopped = False
        self._downstream_events: queue.Queue | None = None  # set while `evaluate` runs
        self._n_downstream = 0
        self.dist = dist if dist is not None and dist.active else None
        self.devices = max(1, int(devices or 1))

    def stop(self) -> None:
        """Stop whatever is training now; later stages still run on the model trained so far."""
        self._stopped = True
        for t in self._trainers:
            t.stop()

    def make_trainer(self, train_config: TrainConfig, checkpoint_path=None, stage: str | None = None,
                     state_dir=None, resume: bool = False, dist=None) -> Trainer:
        """A Trainer that `stop` reaches. Trainers made while the method evaluates (fine-tuning a
        head, say) report their events through `run`, named `stage` (default "downstream training N");
        they train on rank 0 alone (`dist` is for the pretraining)."""
        if self._downstream_events is None:
            trainer = Trainer(train_config, checkpoint_path=checkpoint_path, state_dir=state_dir, resume=resume,
                              dist=dist)
        else:
            self._n_downstream += 1
            trainer = Trainer(train_config, checkpoint_path=checkpoint_path,
                              stage=stage or f"downstream training {self._n_downstream}",
                              listener=self._downstream_events.put)
        if self._stopped:
            trainer.stop()
        self._trainers.append(trainer)
        return trainer

    def run(self, adata, out_dir: str | Path | RunFolder | None = None, *, overwrite: bool = False,
            name: str = "AnnData", resume: bool = False, source: dict | None = None) -> Iterator[TrainEvent]:
        """Train and evaluate on `adata`; with `out_dir`, write the run folder (complete or absent:
        see runs.py). `out_dir` may be a RunFolder already opened by the caller (the CLI opens it
        before reading the slide). ``resume=True`` continues the interrupted run in `out_dir`
        from its last training checkpoint. `source` describes where `adata` was read from
        (recorded for --resume)."""
        if self.devices > 1 and self.dist is None:
            yield from self._run_local_group(adata, out_dir, overwrite=overwrite, name=name, resume=resume,
                                             source=source)
            return
        if self.dist is not None and not self.dist.is_main:
            out_dir = None  # rank 0 alone writes the run folder
        run = out_dir if isinstance(out_dir, RunFolder) else (
            RunFolder(out_dir, overwrite=overwrite, resume=resume) if out_dir is not None else None)
        if run is not None and run._fd is None:
            run.open()
        try:
            yield from self._run(adata, run, name, resume, source)
        finally:
            if run is not None:
                run.close()

    def _run_local_group(self, adata, out_dir, **kw) -> Iterator[TrainEvent]:
        """`run` as rank 0 of `devices` local processes (distributed.LocalGroup)."""
        from .distributed import LocalGroup

        args = (self.method_cls.name, config_to_dict(self.config), adata, kw.get("name", "AnnData"))
        with LocalGroup(self.devices, _helper_pipeline, args) as ctx:
            self.dist = ctx
            try:
                yield from self.run(adata, out_dir, **kw)
            finally:
                self.dist = None

    def _run(self, adata, run: RunFolder | None, name: str, resume: bool, source: dict | None):
        data = dataset_from_config(adata, self.config, name=name)
        check_data(self.method_cls.name, data, self.config, name=name)
        view = check_view(self.method_cls.name, self.config, data)
        view.raise_errors()
        if run is not None:
            if resume:
                info = run.read_run_info()
                if info.get("method") != self.method_cls.name or \
                        info.get("config") != checkpoints.to_jsonable(config_to_dict(self.config)):
                    raise RunFolderError(f"--resume {run.out}: the interrupted run was a {info.get('method')} run "
                                         "with other settings; resume it with the settings it was started with.")
                if info.get("n_cells") != data.n_cells or info.get("n_genes") != data.n_genes:
                    raise RunFolderError(f"--resume {run.out}: the slide differs from the interrupted run's "
                                         f"({data.n_cells} cells x {data.n_genes} genes, it had {info.get('n_cells')} "
                                         f"x {info.get('n_genes')}); pass the same slide.")
            else:
                run.write_run_info({"method": self.method_cls.name,
                                    "config": checkpoints.to_jsonable(config_to_dict(self.config)),
                                    "source": source or {"name": name}, "n_cells": data.n_cells,
                                    "n_genes": data.n_genes, "versions": package_versions()})
            run.keep_on_failure = True  # a failed or interrupted run can be continued with --resume
        for warning in view.warnings:
            yield TrainEvent("warning", 0, self.config.epochs, message=warning, stage="preflight")
        yield TrainEvent("stage", 0, self.config.epochs, message=f"preparing {self.method_cls.name}")
        self.method.data = data
        seed_everything(self.config.seed)  # model initialisation in prepare is reproducible too
        self.method.prepare(data)
        state_dir = run.checkpoint_dir if run is not None else None
        if self.dist is not None:  # rank 0's folder and resume choice (other ranks never open --out)
            state_dir, resume = self.dist.broadcast_object((state_dir, resume))
        trainer = self.make_trainer(self.config, state_dir=state_dir, resume=resume, dist=self.dist)
        check_training_memory(self.method, trainer.device, self.config)
        yield from trainer.run(self.method)
        train_result = trainer.result
        if self.dist is not None and not self.dist.is_main:
            self.output = None  # rank 0 evaluates and writes
            return
        yield TrainEvent("stage", train_result.epochs_run, self.config.epochs, message="evaluating",
                         stage="evaluation")
        results = yield from self._evaluate(data, trainer.device)
        release_freed_memory()  # the evaluation thread's temporaries, before the domain search's k-NN graph
        add_domains(results, self.method_cls.name, data, self.config)
        metrics = {
            "method": self.method_cls.name,
            "seed": self.config.seed,
            "device": str(trainer.device),
            "train_seconds": train_result.train_seconds,
            "epochs": train_result.epochs_run,
            # pretraining throughput: slide cells x epochs run / pretraining seconds
            "seconds_per_epoch": train_result.train_seconds / max(train_result.epochs_run, 1),
            "cells_per_second": data.n_cells * train_result.epochs_run / max(train_result.train_seconds, 1e-9),
            "stopped_by_user": train_result.stopped_by_user,
            "training_processes": self.dist.world_size if self.dist is not None else 1,
            "stopped_early": train_result.stopped_early,
            "resumed": bool(resume),
            "data": data.summary(),
            "view": view.facts,
            "warnings": list(view.warnings),
            **results.metrics,
        }
        result_adata = write_results(adata, self.method_cls.name, data, results, self.config, metrics)
        if data.spatial_graph is None:  # squidpy's keys (obsp / uns['spatial_neighbors']); a user's graph stays
            write_run_graph(result_adata, self.method, data)
        files = {}
        if run is not None:
            yield TrainEvent("stage", train_result.epochs_run, self.config.epochs, message="writing the run folder",
                             stage="writing")
            save_run(run.staging, result_adata, metrics, self.config, self.method, train_result.history)
            out = run.commit("fit", method=self.method_cls.name)
            files = run_files(out)
        self.output = PipelineOutput(result_adata, metrics, self.method, train_result, files)
        yield TrainEvent("stage", train_result.epochs_run, self.config.epochs, message="done")

    def _evaluate(self, data: SpatialDataset, device) -> Iterator[TrainEvent]:
        """``method.evaluate`` in a helper thread, so that the events of the trainings it starts
        (fine-tuning) reach the caller as they happen; returns its MethodResults."""
        events: queue.Queue = queue.Queue()
        box: dict[str, Any] = {}

        def work():
            try:
                box["results"] = self.method.evaluate(data, device, self.make_trainer)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                box["error"] = exc
            finally:
                events.put(None)

        self._downstream_events, self._n_downstream = events, 0
        thread = threading.Thread(target=work, name="spatialssl-evaluate", daemon=True)
        thread.start()
        try:
            while (event := events.get()) is not None:
                yield event
        finally:
            if thread.is_alive():  # the caller abandoned the run: stop the downstream training
                self.stop()
                thread.join()
            self._downstream_events = None
        if "error" in box:
            raise box["error"]
        return box["results"]

    def fit(self, adata, out_dir=None, *, overwrite: bool = False, progress: bool = False,
            callback: Callable[[TrainEvent], None] | None = None, resume: bool = False,
            name: str = "AnnData", source: dict | None = None) -> PipelineOutput | None:
        bar = None
        for event in self.run(adata, out_dir, overwrite=overwrite, resume=resume, name=name, source=source):
            if callback is not None:
                callback(event)
            if progress:
                bar = _progress(bar, event)
        if bar is not None:
            bar.close()
        assert self.output is not None or (self.dist is not None and not self.dist.is_main)
        return self.output


def _helper_pipeline(ctx, method: str, config: dict, adata, name: str) -> None:
    """A helper rank of Pipeline(..., devices=N): pretrain its share, nothing else."""
    cfg = validate_config(config_from_dict(get_method_class(method).config_class, config))
    for _ in Pipeline(method, cfg, dist=ctx).run(adata, None, name=name):
        pass


def _progress(bar, event: TrainEvent):
    from tqdm.auto import tqdm

    if event.kind == "warning":
        tqdm.write(f"napari-spatialssl: warning: {event.message}", file=sys.stderr)
    elif event.kind == "start":
        if bar is not None:
            bar.close()
        bar = tqdm(total=event.n_epochs, desc=event.stage, unit="epoch")
    elif event.kind == "epoch" and bar is not None:
        bar.update(1)
        bar.set_postfix({k: f"{v:.4g}" for k, v in event.losses.items()})
    elif event.kind == "end" and bar is not None:
        bar.close()
        bar = None
    return bar


def fit(adata, method: str, out_dir=None, *, overwrite: bool = False, progress: bool = False,
        config=None, overrides: list[str] | dict | None = None, resume: bool = False, **fields) -> PipelineOutput:
    """Train `method` on `adata` and evaluate it. Python API equivalent of ``napari-spatialssl fit``.

    ``resume=True`` continues an interrupted run into `out_dir` (same slide, same settings)."""
    cfg = config if config is not None else make_config(method, overrides, **fields)
    return Pipeline(method, cfg).fit(adata, out_dir, overwrite=overwrite, progress=progress, resume=resume)


MIN_CELLS = 10
MIN_SECTION_CELLS = 3


def add_domains(results: MethodResults, method: str, data: SpatialDataset, config) -> None:
    """``obs['<method>_domain']`` from ``obsm['X_<method>']`` when the method gave no domains of its
    own (gnn-mask), by the same evaluation.domains.cluster_domains every method uses, with
    ``config.eval`` (K, domain method) and the seed; scored against the reference domains."""
    from .evaluation.domains import cluster_domains, domain_categorical, score_domains

    key, emb_key = f"{method}_domain", f"X_{method}"
    if key in results.obs or emb_key not in results.obsm:
        return
    ec = getattr(config, "eval", None)
    labels, info = cluster_domains(results.obsm[emb_key], getattr(ec, "n_domains", None), seed=config.seed,
                                   method=getattr(ec, "domain_method", "auto"))
    results.obs[key] = domain_categorical(labels)
    results.metrics["domains"] = {"n_domains": info["n_domains"], "clustering": info,
                                  **score_domains(labels, data.domains, data.section, data.section_names,
                                                  data.domain_key)}


def check_data(method: str, data: SpatialDataset, config, name: str = "AnnData") -> None:
    """Preconditions every method shares, checked before any training (one clear line each)."""
    if data.n_cells < MIN_CELLS:
        raise SpatialDataError(f"{name}: has {data.n_cells} cell(s); {method} needs at least {MIN_CELLS}.")
    counts = np.bincount(data.section, minlength=data.n_sections)
    small = [data.section_names[i] for i in np.flatnonzero(counts < MIN_SECTION_CELLS)]
    if small:
        key = data.section_key
        if len(small) > data.n_sections // 2:
            raise SpatialDataError(
                f"{name}: section key {key!r}: {len(small)} of its {data.n_sections} sections hold fewer than "
                f"{MIN_SECTION_CELLS} cells, so it does not name sections; choose the column that does "
                "(--section-key NAME) or use one section (--section-key none).")
        raise SpatialDataError(f"{name}: section key {key!r}: section(s) {small[:5]} hold fewer than {MIN_SECTION_CELLS} "
                               "cells; drop them (adata = adata[~adata.obs[key].isin([...])]) before training.")
    cls = get_method_class(method)
    if hasattr(cls, "check_data"):
        cls.check_data(data, config)


def check_training_memory(method: SSLMethod, device, config) -> None:
    """Refuse, before training, a run whose estimated training memory exceeds the budget."""
    from .budget import check_budget

    estimate = method.training_memory() if hasattr(method, "training_memory") else None
    if estimate is not None:
        check_budget(estimate, device, config.max_memory_gb, method=method.name)


def run_files(folder: Path) -> dict:
    """{role: path} of the files in a complete run folder."""
    roles = {"result": "result.h5ad", "metrics": "metrics.json", "config": "config.json", "model": "model.safetensors",
             "model_meta": checkpoints.META_FILE, "loss": "loss.csv", "manifest": "manifest.json"}
    return {k: str(folder / v) for k, v in roles.items() if (folder / v).exists()}


def _place_genes(values, data: SpatialDataset, n_vars: int):
    """(n_cells, n_model_genes) -> (n_cells, n_vars) with the model's genes in their input columns."""
    cols = data.gene_index if data.gene_index is not None else np.arange(values.shape[1])
    if values.shape[1] == n_vars and np.array_equal(cols, np.arange(n_vars)):
        return values
    keep = cols >= 0
    M = sp.csr_matrix(values)[:, np.flatnonzero(keep)]
    P = sp.csr_matrix((np.ones(keep.sum(), np.float32), (np.arange(keep.sum()), cols[keep])),
                      shape=(int(keep.sum()), n_vars))
    return sp.csr_matrix(M @ P, dtype=np.float32)


def _reconstruction_rows(method: str, results: MethodResults, config, n_cells: int, n_genes: int,
                         metrics: dict):
    """None = keep every row of ``layers['<method>_reconstruction']``; else the rows (cells) to keep,
    per ``config.eval.reconstruction`` (see EvalConfig), recorded in ``metrics`` whether the method
    produced the layer or skipped it because nothing would be kept."""
    ev = getattr(config, "eval", None)
    policy = ev.reconstruction_policy(n_cells, n_genes) if ev is not None else "all"
    if policy == "all":
        return None
    masked = results.obs.get(f"{method}_masked")
    if policy == "masked":
        rows = np.flatnonzero(np.asarray(masked, bool)) if masked is not None else np.zeros(0, np.int64)
        why = "evaluation-masked cells" if masked is not None else "none: the method masks no cells"
    else:
        rows, why = np.zeros(0, np.int64), "none (eval.reconstruction=none)"
    metrics["reconstruction_layer"] = {"cells_kept": int(len(rows)), "of_cells": int(n_cells), "which": why,
                                       "how_to_keep_all": "set eval.reconstruction=all"}
    return rows


def _sparse_rows(values, rows: np.ndarray):
    """A sparse (n_cells, n_genes) matrix holding only `rows` of `values` (the other rows empty)."""
    n, g = values.shape
    if sp.issparse(values):  # already sparse (a method that computed only these rows): drop the rest
        keep = np.zeros(n, np.float32)
        keep[rows] = 1.0
        values = sp.csr_matrix(values, dtype=np.float32)
        if not np.diff(values.indptr)[keep == 0].any():  # nothing outside `rows`: no copy needed
            return values
        out = sp.csr_matrix(sp.diags(keep) @ values, dtype=np.float32)
        out.eliminate_zeros()
        return out
    rows = np.unique(rows)  # sorted, as the CSR layout needs
    return rows_as_csr(values[rows], rows, n)


def _result_anndata(adata):
    """A new AnnData over the same expression arrays (X, layers, obsm entries are shared, not copied:
    several GB on an atlas) with its own obs / var / uns and its own key containers, so that adding
    results never changes the input. Results are only ever added under new keys."""
    import copy

    import anndata as ad

    if adata.is_view:
        return adata.copy()
    return ad.AnnData(X=adata.X, obs=adata.obs.copy(), var=adata.var.copy(), uns=copy.deepcopy(dict(adata.uns)),
                      obsm=dict(adata.obsm), varm=dict(adata.varm), obsp=dict(adata.obsp),
                      varp=dict(adata.varp), layers=dict(adata.layers))


def write_results(adata, method: str, data: SpatialDataset, results: MethodResults, config,
                  metrics: dict):
    """A copy of `adata` with the method's results under the documented keys."""
    import pandas as pd

    out = _result_anndata(adata)
    for key, value in results.obsm.items():
        out.obsm[key] = np.asarray(value, dtype=np.float32)
    kept_rows = _reconstruction_rows(method, results, config, data.n_cells, data.n_genes, metrics)
    for key, value in results.layers.items():
        rows = kept_rows if key == f"{method}_reconstruction" else None
        if rows is None:
            out.layers[key] = _place_genes(value, data, out.n_vars)
        elif len(rows):  # otherwise the layer is left out ("none", or nothing masked)
            kept = np.zeros(out.n_obs, bool)
            kept[rows] = True
            out.layers[key] = _place_genes(_sparse_rows(value, rows), data, out.n_vars)
            out.obs[f"{method}_reconstructed"] = kept
    for key, value in results.obs.items():
        if isinstance(value, pd.Categorical) or (isinstance(value, pd.Series) and value.dtype == "category"):
            out.obs[key] = pd.Categorical(value)
        else:
            out.obs[key] = np.asarray(value)
    uns = dict(out.uns.get(UNS_KEY, {}))
    uns[method] = {
        "config": json.dumps(config_to_dict(config)),
        "metrics": json.dumps(_jsonable(metrics)),
        "versions": json.dumps(package_versions()),
        "genes": np.asarray(data.gene_names, dtype=str),
    }
    out.uns[UNS_KEY] = uns
    return out


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    return obj


def save_run(folder: Path, result_adata, metrics: dict, config, method: SSLMethod, history: list[dict]) -> dict:
    """result.h5ad, metrics.json, config.json, model.safetensors + model.json, loss.csv into `folder`
    (the staging folder of a RunFolder), each written atomically. No Trainer needed."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "result": atomic_write_h5ad(result_adata, folder / "result.h5ad", overwrite=True),
        "metrics": atomic_write_text(folder / "metrics.json", json.dumps(_jsonable(metrics), indent=2)),
        "config": atomic_write_text(folder / "config.json", json.dumps(
            {"method": method.name, "config": config_to_dict(config)}, indent=2)),
        "model": save_model(folder, method, config, history),
        "loss": atomic_write_text(folder / "loss.csv", _history_csv(history)),
    }
    return {k: str(v) for k, v in files.items()}


def save_trained(out: str | Path, output: "PipelineOutput", *, overwrite: bool = False) -> dict:
    """Write a trained result (e.g. from the widget) as a complete run folder `out`."""
    with RunFolder(out, overwrite=overwrite, what="folder") as run:
        history = output.train_result.history if output.train_result is not None else []
        save_run(run.staging, output.adata, output.metrics, output.method.config, output.method, history)
        folder = run.commit("fit", method=output.method.name)
    return run_files(folder)


def _history_csv(history: list[dict]) -> str:
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys or ["epoch"])
    w.writeheader()
    for row in history:
        w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in keys})
    return buf.getvalue()


def load_model(model_dir: str | Path, *, notes: list[str] | None = None):
    """(method instance with weights loaded, its config) from a folder written by `fit`.

    The folder must be complete (its manifest matches the model files); a model.pt of an older
    version is read safely (nothing in it is executed) and a note suggests converting it. Nothing
    read from disk is executed: weights come from safetensors, the rest from JSON."""
    path = Path(model_dir)
    if path.is_dir() and not _is_legacy_folder(path):
        verify_run(path, files=(checkpoints.WEIGHTS_FILE, checkpoints.META_FILE))
    payload = load_checkpoint(path)
    if payload.get("legacy") and notes is not None:
        notes.append(f"{path}: a model of napari-spatialssl < 0.2 (model.pt), read safely; convert it once with "
                     f"'napari-spatialssl convert-model {path} NEW_FOLDER'.")
    return method_from_payload(payload, str(path))


def _is_legacy_folder(path: Path) -> bool:
    return (path / checkpoints.LEGACY_FILE).exists() and not (path / checkpoints.WEIGHTS_FILE).exists() \
        and not (path / "manifest.json").exists()


def method_from_payload(payload: dict, source: str):
    try:
        cls = get_method_class(str(payload["method"]))
    except ValueError as exc:
        raise checkpoints.ModelFileError(f"{source}: {exc}") from exc
    cfg = validate_config(config_from_dict(cls.config_class, payload["config"]))
    method = cls(cfg)
    method.load_extra_state(payload.get("extra", {}))
    model = method.build_model()
    checkpoints.check_weights_match(model, payload["state_dict"], source)
    model.load_state_dict(payload["state_dict"])
    model.eval()
    method.model = model
    return method, cfg


def convert_model(src: str | Path, dst: str | Path, *, overwrite: bool = False) -> Path:
    """Rewrite a model folder (or model.pt) of napari-spatialssl < 0.2 as a current run folder, read
    safely; the other files of the folder (result.h5ad, metrics.json, ...) are copied as they are."""
    import shutil

    src = Path(src)
    payload = checkpoints.read_model(src)
    method, cfg = method_from_payload(payload, str(src))
    folder = src if src.is_dir() else src.parent
    with RunFolder(dst, overwrite=overwrite, what="NEW_FOLDER") as run:
        for name in ("result.h5ad", "metrics.json", "config.json", "loss.csv"):
            if (folder / name).is_file():
                shutil.copy2(folder / name, run.staging / name)
        save_model(run.staging, method, cfg, payload.get("history", []), extra=payload.get("extra", {}))
        return run.commit("fit", method=method.name, extra={"converted_from": str(src.resolve())})


MAX_MISSING_GENE_FRACTION = 0.2


def predict(adata, model_dir: str | Path, out_dir: str | Path | RunFolder | None = None, *,
            overwrite: bool = False, device: str = "auto", max_missing_fraction: float = MAX_MISSING_GENE_FRACTION,
            name: str = "AnnData", notes: list[str] | None = None) -> PipelineOutput:
    """Apply a trained model to a new slide, matching genes by name (missing genes zero-filled
    up to `max_missing_fraction` of the model's genes, else refused). With `out_dir`, result.h5ad
    and metrics.json are written as a complete run folder (checked before predicting)."""
    from .training import resolve_device

    run = out_dir if isinstance(out_dir, RunFolder) else (
        RunFolder(out_dir, overwrite=overwrite) if out_dir is not None else None)
    if run is not None and run._fd is None:
        run.open()
    try:
        if not 0.0 <= max_missing_fraction <= 1.0:
            raise SpatialDataError(f"max_missing_fraction={max_missing_fraction}: must be in [0, 1].")
        dev = resolve_device(device)
        method, cfg = load_model(model_dir, notes=notes)
        genes = [str(g) for g in method.extra_state().get("genes", [])]
        var = set(np.asarray(adata.var_names).astype(str))
        missing = [g for g in genes if g not in var]
        if genes and len(missing) > max_missing_fraction * len(genes):
            raise SpatialDataError(
                f"{name}: {len(missing)} of the model's {len(genes)} genes are missing from this slide "
                f"(e.g. {missing[:5]}); at most {max_missing_fraction:.0%} may be zero-filled. "
                "Use a slide measured with the same gene panel."
            )
        # A new slide may lack the training slide's label/section columns.
        dc = data_config_of(cfg)
        if dc.label_key and dc.label_key not in adata.obs.columns:
            dc.label_key = None
        if dc.section_key not in (None, "auto") and dc.section_key not in adata.obs.columns:
            dc.section_key = "auto"
        data = dataset_from_config(adata, cfg, genes=genes or None, name=name)
        t0 = time.perf_counter()
        method.data = data
        results = method.predict(data, dev)
        add_domains(results, method.name, data, cfg)
        metrics = {"method": method.name, "device": str(dev), "predict_seconds": time.perf_counter() - t0,
                   "missing_genes": missing, "n_missing_genes": len(missing), **results.metrics}
        result_adata = write_results(adata, method.name, data, results, cfg, metrics)
        if data.spatial_graph is None:
            write_run_graph(result_adata, method, data)
        files = {}
        if run is not None:
            atomic_write_h5ad(result_adata, run.staging / "result.h5ad", overwrite=True)
            atomic_write_text(run.staging / "metrics.json", json.dumps(_jsonable(metrics), indent=2))
            files = run_files(run.commit("predict", method=method.name,
                                         extra={"model": str(Path(model_dir).resolve())}))
        return PipelineOutput(result_adata, metrics, method, None, files)
    finally:
        if run is not None:
            run.close()
