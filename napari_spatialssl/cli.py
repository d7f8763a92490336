"""The `napari-spatialssl` command line: fit, predict, export, convert-model, demo.

Every subcommand runs the same core pipeline as the Python API and the napari widget.
Every error is printed as one line naming the file or setting and the cause (exit code 2);
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

METHOD_IDS = ("gnn-mask", "spotscape", "patch-mae")


def _csv(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (and exit code 2) instead of usage + error."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="napari-spatialssl",
        description="Self-supervised learning on spatial transcriptomics slides (.h5ad).",
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    f = sub.add_parser("fit", help="pretrain a method on a slide, evaluate it, write results")
    f.add_argument("data", nargs="?", help="input slide (.h5ad, or a SpatialData .zarr store); with --resume, "
                                           "default the interrupted run's slide")
    f.add_argument("--table", help="SpatialData store: the table to use (when the store holds several)")
    f.add_argument("--coordinate-system", help="SpatialData store: the coordinate system of the cell centroids")
    f.add_argument("--write-to-store", metavar="TABLE", help="SpatialData store: also write the results into "
                                                             "the store as table TABLE (atomically)")
    f.add_argument("--method", choices=METHOD_IDS)
    f.add_argument("--out", help="output folder (result.h5ad, metrics.json, config.json, model.safetensors, "
                                 "model.json, loss.csv, manifest.json), written completely or not at all")
    f.add_argument("--resume", metavar="DIR", help="continue the interrupted run into folder DIR (its --out) from "
                                                   "its last training checkpoint, with the settings it was started with")
    f.add_argument("--section-key", help="obs column of section ids ('auto' detects; 'none' = one section)")
    f.add_argument("--label-key", help="obs column of cell-type labels (for fine-tuning / probes)")
    f.add_argument("--ignore-labels", help="comma-separated label values meaning 'unknown'")
    f.add_argument("--domain-key", help="obs column of reference spatial domains (ARI / NMI)")
    f.add_argument("--n-domains", type=int, help="number of spatial domains K (default: chosen automatically)")
    f.add_argument("--train-sections", help="comma-separated sections used for fine-tuning")
    f.add_argument("--test-sections", help="comma-separated held-out sections for evaluation")
    f.add_argument("--coords", help="two obs columns x,y to use instead of obsm['spatial']")
    f.add_argument("--spatial-key", help="obsm key of the coordinates (default 'spatial')")
    f.add_argument("--epochs", type=int)
    f.add_argument("--seed", type=int)
    f.add_argument("--lr", type=float)
    f.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"))
    f.add_argument("--devices", type=int, metavar="N", help="train on N processes of this machine (one GPU each "
                   "on CUDA, gloo on CPU); for several machines use torchrun or srun (README)")
    f.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                   help="any config field, e.g. --set hidden_dim=128 --set mask.ratio=0.3 (repeatable)")
    f.add_argument("--overwrite", action="store_true", help="replace an existing result in --out")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.add_argument("--debug", action="store_true", help="show the traceback of an error")

    r = sub.add_parser("predict", help="apply a trained model to a (new) slide")
    r.add_argument("data", help="input slide (.h5ad, or a SpatialData .zarr store)")
    r.add_argument("--table", help="SpatialData store: the table to use (when the store holds several)")
    r.add_argument("--coordinate-system", help="SpatialData store: the coordinate system of the cell centroids")
    r.add_argument("--write-to-store", metavar="TABLE", help="SpatialData store: also write the results into "
                                                             "the store as table TABLE (atomically)")
    r.add_argument("--model", required=True, help="folder written by 'fit' (or its model.pt)")
    r.add_argument("--out", required=True, help="output folder (result.h5ad, metrics.json)")
    r.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    r.add_argument("--max-missing-genes", type=float, default=0.2,
                   help="largest fraction of the model's genes that may be missing and zero-filled (default 0.2)")
    r.add_argument("--overwrite", action="store_true")
    r.add_argument("--debug", action="store_true", help="show the traceback of an error")

    e = sub.add_parser("export", help="export an annotated slide to .h5ad or .csv")
    e.add_argument("data", help="input slide (.h5ad), e.g. a result.h5ad")
    e.add_argument("output", help="output file (.h5ad or .csv)")
    e.add_argument("--overwrite", action="store_true")
    e.add_argument("--debug", action="store_true", help="show the traceback of an error")

    c = sub.add_parser("convert-model", help="rewrite a model folder of napari-spatialssl < 0.2 (model.pt) in "
                                             "the safe format (model.safetensors + model.json), read safely")
    c.add_argument("old", help="folder (or model.pt) written by an older version")
    c.add_argument("new", help="new folder")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--debug", action="store_true", help="show the traceback of an error")

    d = sub.add_parser("demo", help="open napari with a sample slide and the plugin (headless: write a PNG)")
    d.add_argument("--sample", default="osmfish", help="sample slide: osmfish or starmap")
    d.add_argument("--out", default="demo_output", help="folder for the headless PNG and summary")
    d.add_argument("--headless", action="store_true", help="never open a window, even with a display")
    d.add_argument("--color-by", default=None, help="obs column to colour points by (default: cell type)")
    d.add_argument("--method", default="gnn-mask", choices=METHOD_IDS, help="method the demo trains (default gnn-mask)")
    d.add_argument("--epochs", type=int, help="pretraining epochs of the demo run (default: the method's own)")
    d.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


# flags that change settings: refused with --resume, which continues with the run's own settings
SETTING_FLAGS = ("method", "table", "coordinate_system", "section_key", "label_key", "ignore_labels", "domain_key", "n_domains", "train_sections",
                 "test_sections", "coords", "spatial_key", "epochs", "seed", "lr", "device")


def _fit_config(args):
    from .pipeline import make_config

    cfg = make_config(args.method)
    dc, ec = cfg.data, cfg.eval
    if args.section_key is not None:
        dc.section_key = None if args.section_key.lower() == "none" else args.section_key
    if args.label_key:
        dc.label_key = args.label_key
    if args.ignore_labels:
        dc.ignore_labels = _csv(args.ignore_labels)
    if args.coords:
        dc.coord_columns = _csv(args.coords)
    if args.spatial_key:
        dc.spatial_key = args.spatial_key
    if args.domain_key:
        ec.domain_key = args.domain_key
    if args.n_domains is not None:
        ec.n_domains = args.n_domains
    if args.train_sections:
        ec.train_sections = _csv(args.train_sections)
    if args.test_sections:
        ec.test_sections = _csv(args.test_sections)
    for name in ("epochs", "seed", "lr", "device"):
        value = getattr(args, name)
        if value is not None:
            setattr(cfg, name, value)
    from .config import apply_overrides, validate_config

    return validate_config(apply_overrides(cfg, args.overrides))


def _warn(lines, what: str = "note") -> None:
    for line in lines:
        print(f"napari-spatialssl: {what}: {line}", file=sys.stderr)


def _check_store_target(data_path, args) -> None:
    """--write-to-store TABLE: refused before any work when it cannot be written."""
    if not getattr(args, "write_to_store", None):
        return
    from .data.stores import is_spatialdata_store

    p = Path(data_path)
    if not (p.is_dir() and is_spatialdata_store(p)):
        raise UsageError(f"--write-to-store: {p} is not a SpatialData store; write-back needs a .zarr store.")
    if (p / "tables" / args.write_to_store).exists() and not args.overwrite:
        raise UsageError(f"--write-to-store {args.write_to_store}: {p} already has a table of that name; pass "
                         "--overwrite to replace it or choose another name.")


def _read(path, args, source: dict | None = None):
    from .data.stores import read_slide

    source = source or {}
    return read_slide(path, table=getattr(args, "table", None) or source.get("table"),
                      coordinate_system=getattr(args, "coordinate_system", None) or source.get("coordinate_system"))


def cmd_fit(args) -> int:
    from . import distributed

    if (args.devices or 1) > 1 and not distributed.launched():
        return distributed.launch_cli(args.argv, args.devices)
    if args.devices is not None and args.devices < 1:
        raise UsageError(f"--devices {args.devices}: give the number of training processes, 1 or more.")
    ctx = distributed.context_from_env() if distributed.launched() else None
    try:
        if ctx is not None and not ctx.is_main:
            return _fit_other_rank(ctx)
        return _fit(args, ctx)
    except BaseException:
        if ctx is not None and ctx.is_main and not getattr(ctx, "settings_sent", False):
            ctx.broadcast_object(None)  # the other ranks stop instead of waiting for the settings
        raise
    finally:
        distributed.shutdown(ctx)


def _fit_other_rank(ctx) -> int:
    """A rank other than 0: rank 0's settings and slide, pretraining only (rank 0 writes --out)."""
    from .config import config_from_dict, validate_config
    from .data.stores import read_slide
    from .models.base import get_method_class
    from .pipeline import Pipeline

    shared = ctx.broadcast_object(None)
    if shared is None:  # rank 0 failed before training and reports why
        return 2
    method, config, data_path, table, coordinate_system, resume = shared
    cfg = validate_config(config_from_dict(get_method_class(method).config_class, config))
    adata = read_slide(data_path, table=table, coordinate_system=coordinate_system)
    Pipeline(method, cfg, dist=ctx).fit(adata, None, resume=resume, name=str(data_path))
    return 0


def _fit(args, ctx=None) -> int:
    from .pipeline import Pipeline
    from .runs import RunFolder, file_fingerprint, same_file

    if args.resume:
        given = [f"--{n.replace('_', '-')}" for n in SETTING_FLAGS if getattr(args, n) is not None]
        given += ["--set"] * bool(args.overrides) + ["--out"] * bool(args.out and args.out != args.resume)
        if given:
            raise UsageError(f"--resume continues the run with the settings it was started with; drop {given[0]}.")
        run = RunFolder(args.resume, resume=True).open()
        try:
            info = run.read_run_info()
            from .config import config_from_dict, validate_config
            from .models.base import get_method_class

            method = info["method"]
            cfg = validate_config(config_from_dict(get_method_class(method).config_class, info["config"]))
            source = info.get("source") or {}
            data_path = args.data or source.get("path")
            if not data_path:
                raise UsageError(f"--resume {args.resume}: the interrupted run was not started from a file; "
                                 "pass the slide too (napari-spatialssl fit SLIDE --resume DIR).")
            if Path(data_path).is_file() and "sha256_head_tail" in source and not same_file(source, data_path):
                raise UsageError(f"--resume {args.resume}: {data_path} is not the slide the run was started with "
                                 f"({source.get('path')}); pass that slide.")
        except BaseException:
            run.close()
            raise
        out_label = args.resume
        args.table, args.coordinate_system = source.get("table"), source.get("coordinate_system")
    else:
        missing = [n for n in ("data", "method", "out") if getattr(args, n) is None]
        if missing:
            raise UsageError(f"fit needs {', '.join('--' + m if m != 'data' else 'a slide' for m in missing)} "
                             "(or --resume DIR).")
        cfg = _fit_config(args)  # every setting validated before the slide is read
        method, data_path, source = args.method, args.data, {}
        _check_store_target(data_path, args)
        run = RunFolder(args.out, overwrite=args.overwrite).open()  # --out checked and locked before any work
        out_label = args.out
    _warn(run.notes)
    if ctx is not None:  # the other ranks read the same slide with the same settings
        from .config import config_to_dict

        ctx.broadcast_object((method, config_to_dict(cfg), str(data_path), args.table, args.coordinate_system,
                              bool(args.resume)))
        ctx.settings_sent = True
    try:
        adata = _read(data_path, args, source)
        pipeline = Pipeline(method, cfg, dist=ctx)
        out = pipeline.fit(adata, run, progress=not args.quiet, resume=bool(args.resume), name=str(data_path),
                           source={**file_fingerprint(data_path), "table": args.table,
                                   "coordinate_system": args.coordinate_system})
    finally:
        run.close()
    if getattr(args, "write_to_store", None):
        from .data.stores import write_results_to_store

        table = write_results_to_store(data_path, out.adata, table_name=args.write_to_store, overwrite=args.overwrite)
        print(f"results written into {table}")
    if args.quiet:  # with the progress bar they were printed as they came
        _warn(out.metrics.get("warnings", []), "warning")
    summary = {k: out.metrics[k] for k in ("method", "seed", "device", "train_seconds", "epochs")}
    # headline figures when the method reports them (see metrics.json for everything)
    rec, ct = out.metrics.get("reconstruction") or {}, out.metrics.get("cell_type") or {}
    if "masked_mse" in rec:
        summary["masked_mse"] = rec["masked_mse"]
        summary["masked_mse_baselines"] = rec.get("baselines", {})
    if "macro_f1" in ct:
        summary["macro_f1"] = ct["macro_f1"]
        summary["macro_f1_baselines"] = {k: v.get("macro_f1") for k, v in ct.get("baselines", {}).items()}
    print(json.dumps(summary))
    print(f"results written to {Path(out_label).resolve()}")
    return 0


def cmd_predict(args) -> int:
    from .pipeline import predict
    from .runs import RunFolder

    _check_store_target(args.data, args)
    run = RunFolder(args.out, overwrite=args.overwrite).open()  # checked and locked before predicting
    _warn(run.notes)
    notes: list[str] = []
    try:
        adata = _read(args.data, args)
        out = predict(adata, args.model, run, device=args.device, max_missing_fraction=args.max_missing_genes,
                      name=args.data, notes=notes)
    finally:
        run.close()
    _warn(notes)
    if out.metrics.get("n_missing_genes"):
        print(f"{out.metrics['n_missing_genes']} model gene(s) missing from {args.data}, zero-filled: "
              f"{out.metrics['missing_genes'][:10]}", file=sys.stderr)
    print(f"results written to {Path(args.out).resolve()}")
    if args.write_to_store:
        from .data.stores import write_results_to_store

        table = write_results_to_store(args.data, out.adata, table_name=args.write_to_store, overwrite=args.overwrite)
        print(f"results written into {table}")
    return 0


def cmd_convert(args) -> int:
    from .pipeline import convert_model

    path = convert_model(args.old, args.new, overwrite=args.overwrite)
    print(f"written {path}")
    return 0


def cmd_export(args) -> int:
    from .data.export import export_file

    path = export_file(args.data, args.output, overwrite=args.overwrite)
    print(f"written {path}")
    return 0


def cmd_demo(args) -> int:
    from ._napari.demo import run_demo

    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f"--epochs {args.epochs}: must be at least 1.")
    return run_demo(sample=args.sample, out_dir=args.out, headless=args.headless, color_by=args.color_by,
                    method=args.method, epochs=args.epochs)


COMMANDS = {"fit": cmd_fit, "predict": cmd_predict, "export": cmd_export, "convert-model": cmd_convert,
            "demo": cmd_demo}


class UsageError(Exception):
    """A combination of command-line arguments that cannot work; the message says what to change."""


def describe_error(exc: BaseException) -> str:
    """One line naming the file or setting and the cause, for any error."""
    from .data.io import SpatialDataError, describe_os_error

    if isinstance(exc, (SpatialDataError, UsageError)):
        text = str(exc)
    elif isinstance(exc, (FileExistsError, FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        text = str(exc) if exc.filename is None else f"{exc.filename}: {describe_os_error(exc)}"
    elif isinstance(exc, OSError):
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        text = f"{where}{describe_os_error(exc)}"
    elif isinstance(exc, MemoryError):
        text = ("out of memory; use a smaller setting (see the memory estimate with --debug) or a machine with more "
                "memory")
    elif isinstance(exc, FloatingPointError):
        text = str(exc)
    elif isinstance(exc, RuntimeError) and ("No space left" in str(exc) or "enforce fail" in str(exc)):
        text = describe_os_error(exc)
    else:
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        text = f"{type(exc).__name__}: {first} (unexpected; run again with --debug and report the traceback)"
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what `fit --devices N` starts N times
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BaseException as exc:  # noqa: BLE001 - every error is one line (or a traceback with --debug)
        if isinstance(exc, SystemExit):
            raise
        if getattr(args, "debug", False):
            raise
        print(f"napari-spatialssl {args.command}: error: {describe_error(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
