"""The `napari-spatialssl` command line: fit, predict, export, demo.

Every subcommand runs the same core pipeline as the Python API and the napari widget.
Errors in the input are printed as one clear line (exit code 2), not a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

METHOD_IDS = ("gnn-mask", "spotscape", "patch-mae")


def _csv(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="napari-spatialssl",
        description="Self-supervised learning on spatial transcriptomics slides (.h5ad).",
    )
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fit", help="pretrain a method on a slide, evaluate it, write results")
    f.add_argument("data", help="input slide (.h5ad)")
    f.add_argument("--method", required=True, choices=METHOD_IDS)
    f.add_argument("--out", required=True, help="output folder (result.h5ad, metrics.json, config.json, model.pt, loss.csv)")
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
    f.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                   help="any config field, e.g. --set hidden_dim=128 --set mask.ratio=0.3 (repeatable)")
    f.add_argument("--overwrite", action="store_true", help="replace an existing result in --out")
    f.add_argument("--quiet", action="store_true", help="no progress bar")

    r = sub.add_parser("predict", help="apply a trained model to a (new) slide")
    r.add_argument("data", help="input slide (.h5ad)")
    r.add_argument("--model", required=True, help="folder written by 'fit' (or its model.pt)")
    r.add_argument("--out", required=True, help="output folder (result.h5ad, metrics.json)")
    r.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    r.add_argument("--max-missing-genes", type=float, default=0.2,
                   help="largest fraction of the model's genes that may be missing and zero-filled (default 0.2)")
    r.add_argument("--overwrite", action="store_true")

    e = sub.add_parser("export", help="export an annotated slide to .h5ad or .csv")
    e.add_argument("data", help="input slide (.h5ad), e.g. a result.h5ad")
    e.add_argument("output", help="output file (.h5ad or .csv)")
    e.add_argument("--overwrite", action="store_true")

    d = sub.add_parser("demo", help="open napari with a sample slide and the plugin (headless: write a PNG)")
    d.add_argument("--sample", default="osmfish", help="sample slide: osmfish or starmap")
    d.add_argument("--out", default="demo_output", help="folder for the headless PNG and summary")
    d.add_argument("--headless", action="store_true", help="never open a window, even with a display")
    d.add_argument("--color-by", default=None, help="obs column to colour points by (default: cell type)")
    return p


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
    from .config import apply_overrides

    return apply_overrides(cfg, args.overrides)


def cmd_fit(args) -> int:
    from .data.io import read_h5ad
    from .pipeline import Pipeline

    cfg = _fit_config(args)
    adata = read_h5ad(args.data)
    out = Pipeline(args.method, cfg).fit(adata, args.out, overwrite=args.overwrite, progress=not args.quiet)
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
    print(f"results written to {Path(args.out).resolve()}")
    return 0


def cmd_predict(args) -> int:
    from .data.io import read_h5ad
    from .pipeline import predict

    adata = read_h5ad(args.data)
    out = predict(adata, args.model, args.out, overwrite=args.overwrite, device=args.device,
                  max_missing_fraction=args.max_missing_genes, name=args.data)
    if out.metrics.get("n_missing_genes"):
        print(f"{out.metrics['n_missing_genes']} model gene(s) missing from {args.data}, zero-filled: "
              f"{out.metrics['missing_genes'][:10]}", file=sys.stderr)
    print(f"results written to {Path(args.out).resolve()}")
    return 0


def cmd_export(args) -> int:
    from .data.export import export_file

    path = export_file(args.data, args.output, overwrite=args.overwrite)
    print(f"written {path}")
    return 0


def cmd_demo(args) -> int:
    from ._napari.demo import run_demo

    return run_demo(sample=args.sample, out_dir=args.out, headless=args.headless, color_by=args.color_by)


COMMANDS = {"fit": cmd_fit, "predict": cmd_predict, "export": cmd_export, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .data.io import SpatialDataError

    try:
        return COMMANDS[args.command](args)
    except (SpatialDataError, FileExistsError, FileNotFoundError) as exc:
        print(f"napari-spatialssl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
