"""gnn-mask label efficiency on the MERFISH hypothalamus split (issue 18).

The split of benchmarks/gnn_mask.py: pretrain gnn-mask on both sections without labels; fine-tune
`Cell_class` on a stratified fraction (1 %, 5 %, 10 %, 100 %) of the labelled cells of
Animal1_Bregma_+0.26; test on every labelled cell of the held-out Animal1_Bregma_+0.21 ("Ambiguous"
= unknown). Stratified: each class keeps round(fraction x its count) cells, at least one, so every
class the training section has is seen. The same subset feeds every classifier of a (fraction,
seed): gnn-mask fine-tuned from the pretrained encoder, the same procedure from a random-init
encoder, logistic regression on the cell's own expression (the method's baseline) and an MLP on own
expression (128 hidden, alpha 1; gnn_mask_celltype_ceiling.py). Scores on the held-out section:
accuracy, balanced accuracy, macro F1 over all classes, and macro F1 over the classes with >= 10
test cells (the rare classes, 1-9 test cells, swing macro F1 by up to 0.067 per cell).

``--tune`` chooses fine-tuning settings without the test section: 15 % of the labelled
training-section cells (seeded apart from the fractions) are an outer validation split hidden from
everything; the fractions are drawn from the remaining cells and every classifier is scored on the
outer cells. ``--variants`` names fine-tuning settings (VARIANTS below).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/label_efficiency.py --seeds 0 1 2 3 4 \\
        --out benchmarks/results/label_efficiency.jsonl
    .venv/bin/python benchmarks/label_efficiency.py --quick        # 1 seed, CI size: one JSON line
    .venv/bin/python benchmarks/label_efficiency.py --summary-only --out ...

Each (seed, fraction) row is appended to the JSON-lines file (resumable: rows already there are
skipped); the table (means over seeds) is printed at the end.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gnn_mask import DATA, TEST, TRAIN, benchmark_overrides  # noqa: E402

FRACTIONS = (0.01, 0.05, 0.10, 1.0)
MIN_TEST_CELLS = 10

# Fine-tuning settings compared by --tune (overrides of the present defaults; pretraining shared).
VARIANTS = {
    "default": {},
    "linear": {"finetune.mode": "linear"},  # frozen pretrained encoder, head only
    "lpft": {"finetune.probe_epochs": "50"},  # head first, then everything
    "lr3e-4": {"finetune.lr": "3e-4"},
    "drop0.7": {"finetune.dropout": "0.7"},
    "noskip": {"head_skip": "false"},
    "wd1e-2": {"finetune.weight_decay": "1e-2"},
    "balanced": {"finetune.class_weights": "balanced"},
    "pat80": {"finetune.patience": "80", "finetune.epochs": "400"},
    "linear+noskip": {"finetune.mode": "linear", "head_skip": "false"},
}


def stratified_subset(cells: np.ndarray, labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """round(fraction x count) cells of every class (at least one), drawn without replacement."""
    if fraction >= 1.0:
        return np.sort(cells)
    out = []
    for c in np.unique(labels[cells]):
        pool = cells[labels[cells] == c]
        n = max(1, int(round(fraction * len(pool))))
        out.append(rng.choice(pool, size=min(n, len(pool)), replace=False))
    return np.sort(np.concatenate(out))


def scores(y: np.ndarray, pred: np.ndarray, common: np.ndarray) -> dict:
    from sklearn.metrics import f1_score

    from napari_spatialssl.evaluation.classification import classification_scores

    s = classification_scores(y, pred)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s["macro_f1_common"] = float(f1_score(y, pred, labels=common, average="macro", zero_division=0))
    return {k: s[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "macro_f1_common")}


def mlp_expression(X_train, y_train, X_test, seed: int) -> np.ndarray:
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(X_train)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf = MLPClassifier((128,), alpha=1.0, max_iter=300, random_state=seed).fit(sc.transform(X_train), y_train)
    return clf.predict(sc.transform(X_test))


def load(quick: bool, synthetic: bool):
    """(adata, train section, test section, data overrides): the MERFISH file, or a tiny synthetic
    slide (2 sections, `cell_type` labels) for the CI-size check."""
    if synthetic or not DATA.exists():
        from napari_spatialssl.data.synthetic import synthetic_slide

        a = synthetic_slide(800, 30, 2, 5, seed=0)
        names = list(a.obs["section"].cat.categories)
        return a, names[0], names[1], {"data.section_key": "section", "data.label_key": "cell_type"}, "synthetic"
    from napari_spatialssl.data.io import read_h5ad

    return read_h5ad(DATA), TRAIN, TEST, None, DATA.name


def prepare_split(adata, seed: int, pretrain_extra: list[str], train_name: str, test_name: str,
                  data_overrides: dict | None, quick_overrides: dict | None):
    """The benchmark's config and dataset; (cfg, data, truth, k, labelled training-section cells,
    labelled test-section cells, the outer split of the former: 15 %, seeded [seed, 23])."""
    from napari_spatialssl.pipeline import dataset_from_config, make_config

    overrides = benchmark_overrides("whole", 30.0, seed, pretrain_extra)
    overrides.update({"eval.train_sections": train_name, "eval.test_sections": test_name})
    if data_overrides is not None:
        overrides = {k: v for k, v in overrides.items() if k != "data.ignore_labels"} | data_overrides
    if quick_overrides:
        overrides.update(quick_overrides)
    cfg = make_config("gnn-mask", overrides=overrides)
    data = dataset_from_config(adata, cfg)
    truth = data.labels.copy()
    train_cells = np.flatnonzero(data.section == data.section_code(train_name))
    test_cells = np.flatnonzero(data.section == data.section_code(test_name))
    labelled = train_cells[truth[train_cells] >= 0]
    rng_o = np.random.default_rng([seed, 23])
    outer = np.sort(rng_o.choice(labelled, size=int(round(0.15 * len(labelled))), replace=False))
    return cfg, data, truth, len(data.label_names), labelled, test_cells[truth[test_cells] >= 0], outer


def pretrain(cfg, data, truth: np.ndarray, seed: int):
    """gnn-mask pretrained with no labels at all (both sections), as in benchmarks/gnn_mask.py;
    (method, train result, seconds). The labels are restored on return."""
    from napari_spatialssl.models.gnn_mask import GnnMask
    from napari_spatialssl.training import Trainer, seed_everything

    data.labels = np.full_like(truth, -1)
    seed_everything(seed)
    method = GnnMask(cfg)
    method.data = data
    method.prepare(data)
    t0 = time.perf_counter()
    pre = Trainer(cfg).fit(method)
    data.labels = truth
    return method, pre, time.perf_counter() - t0


def run_seed(adata, seed: int, fractions, *, pretrain_extra: list[str], variants: list[str], tune: bool,
             train_name: str, test_name: str, data_overrides: dict | None, quick: bool, done: set,
             random_init: bool = True) -> list[dict]:
    if all((seed, f, v, tune, " ".join(pretrain_extra)) in done for f in fractions for v in variants):
        return []
    import torch

    from napari_spatialssl.config import apply_overrides
    from napari_spatialssl.evaluation.classification import logistic_regression_baseline
    from napari_spatialssl.models.gnn_mask import make_encoder
    from napari_spatialssl.training import Trainer, seed_everything

    quick_o = {"epochs": "5", "finetune.epochs": "15", "finetune.patience": "5"} if quick else None
    cfg, data, truth, k, pool, test_labelled, outer = prepare_split(adata, seed, pretrain_extra, train_name,
                                                                    test_name, data_overrides, quick_o)
    train_cells = np.flatnonzero(data.section == data.section_code(train_name))
    if tune:  # the outer split: hidden from every classifier, scored instead of the test section
        evaluate_on, pool = outer, np.setdiff1d(pool, outer)
    else:
        evaluate_on = test_labelled
    y_eval = truth[evaluate_on]
    common = np.flatnonzero(np.bincount(y_eval, minlength=k) >= MIN_TEST_CELLS)
    method, pre, pre_s = pretrain(cfg, data, truth, seed)
    dev = torch.device("cpu")
    cfg0 = copy.deepcopy(cfg)
    X_all = data.dense_rows(np.arange(data.n_cells))
    rows = []
    for frac in fractions:
        rng = np.random.default_rng([seed, 7, int(round(frac * 1000))])
        subset = stratified_subset(pool, truth, frac, rng)
        base = {"seed": seed, "fraction": frac, "n_labelled": int(len(subset)), "tune": tune,
                "evaluated_on": "outer split of the training section" if tune else "held-out section",
                "n_eval_cells": int(len(evaluate_on)), "n_common_classes": int(len(common)),
                "pretrain": pretrain_extra, "pretrain_epochs": pre.epochs_run, "pretrain_seconds": pre_s,
                "classes_in_subset": int(len(np.unique(truth[subset])))}
        baselines = None
        for name in variants:
            key = (seed, frac, name, tune, " ".join(pretrain_extra))
            if key in done:
                continue
            row = dict(base, variant=name, overrides=VARIANTS[name])
            if baselines is None:
                t1 = time.perf_counter()
                lr = logistic_regression_baseline(X_all[subset], truth[subset], X_all[evaluate_on],
                                                  class_weights=cfg.finetune.class_weights, seed=seed)
                mlp = mlp_expression(X_all[subset], truth[subset], X_all[evaluate_on], seed)
                baselines = {"logreg": scores(y_eval, lr, common), "mlp": scores(y_eval, mlp, common),
                             "baseline_seconds": time.perf_counter() - t1}
            row.update(baselines)
            method.config = apply_overrides(copy.deepcopy(cfg0), VARIANTS[name])
            method.config.validate()
            labels = np.full_like(truth, -1)
            labels[subset] = truth[subset]
            data.labels = labels
            ft_train, ft_val = method._finetune_split(subset)
            torch.manual_seed(seed + 1000)
            random_encoder = make_encoder(len(method.genes), method.config)
            encoders = [("pretrained", method.model.encoder)] + ([("random_init", random_encoder)] if random_init else [])
            for tag, enc in encoders:
                seed_everything(seed)
                t1 = time.perf_counter()
                model, info, _ = method._finetune(enc, ft_train, ft_val, train_cells, k, dev, Trainer, tag)
                pred = method._classify(evaluate_on, model, dev).argmax(1)
                row[tag] = scores(y_eval, pred, common)
                row[tag]["finetune"] = {"epochs": info["epochs"], "refit_epochs": info.get("refit_epochs"),
                                        "seconds": time.perf_counter() - t1}
            data.labels = truth
            rows.append(row)
            print(json.dumps({"seed": seed, "fraction": frac, "variant": name, "n": len(subset),
                              **{t: round(row[t]["macro_f1"], 3) for t in CLASSIFIERS if t in row}}), flush=True)
    return rows


PROBE_FEATURES = ("expression", "expression+pretrained", "expression+random_init", "expression+neighbour_mean",
                  "pretrained")
PROBE_C = (0.03, 0.1, 0.3, 1.0)


def run_probe_seed(adata, seed: int, fractions, *, pretrain_extra: list[str], train_name: str, test_name: str,
                   data_overrides: dict | None, quick: bool, done: set) -> list[dict]:
    """Frozen-encoder probes: one pretraining per seed, then logistic regression (L-BFGS, L2 with
    C in PROBE_C, the baseline's class weights) on each feature set of PROBE_FEATURES, scored both on
    the outer split of the training section (tune=True: where C and the feature set are chosen) and
    on the held-out section (tune=False: where they are reported). 'expression+random_init' (the
    same architecture, untrained) and 'expression+neighbour_mean' (the mean expression of the
    cell's graph neighbours) are the controls: a gain over them is what pretraining adds."""
    if all((seed, f, "probe", t, " ".join(pretrain_extra)) in done for f in fractions for t in (True, False)):
        return []
    import torch

    from napari_spatialssl.evaluation.classification import logistic_regression_baseline

    cfg, data, truth, k, labelled, test_labelled, outer = prepare_split(
        adata, seed, pretrain_extra, train_name, test_name, data_overrides, {"epochs": "5"} if quick else None)
    splits = {True: (np.setdiff1d(labelled, outer), outer), False: (labelled, test_labelled)}
    method, pre, pre_s = pretrain(cfg, data, truth, seed)
    dev = torch.device("cpu")
    every = np.arange(data.n_cells)
    nothing_hidden = np.zeros(data.n_cells, bool)
    with torch.no_grad():
        emb_pre = method._reconstruct(every, nothing_hidden, dev, outputs=False)[0]
        torch.manual_seed(seed + 1000)
        emb_rand = method._reconstruct(every, nothing_hidden, dev, model=method.build_model(), outputs=False)[0]
    X_all = data.dense_rows(every)
    feats = {"expression": X_all, "expression+pretrained": np.hstack([X_all, emb_pre]),
             "expression+random_init": np.hstack([X_all, emb_rand]),
             "expression+neighbour_mean": np.hstack([X_all, method._neighbor_mean(every, nothing_hidden)]),
             "pretrained": emb_pre}
    rows = []
    for tune, (pool, evaluate_on) in splits.items():
        y_eval = truth[evaluate_on]
        common = np.flatnonzero(np.bincount(y_eval, minlength=k) >= MIN_TEST_CELLS)
        for frac in fractions:
            if (seed, frac, "probe", tune, " ".join(pretrain_extra)) in done:
                continue
            # a trailing 0 leaves a SeedSequence unchanged: the held-out subsets are run_seed's own
            rng = np.random.default_rng([seed, 7, int(round(frac * 1000)), int(tune)])
            subset = stratified_subset(pool, truth, frac, rng)
            t1 = time.perf_counter()
            row = {"seed": seed, "fraction": frac, "n_labelled": int(len(subset)), "tune": tune, "variant": "probe",
                   "evaluated_on": "outer split of the training section" if tune else "held-out section",
                   "n_eval_cells": int(len(evaluate_on)), "n_common_classes": int(len(common)),
                   "pretrain": pretrain_extra, "pretrain_epochs": pre.epochs_run, "pretrain_seconds": pre_s,
                   "classes_in_subset": int(len(np.unique(truth[subset]))), "probes": {}}
            for name, F in feats.items():
                for C in PROBE_C:
                    pred = logistic_regression_baseline(F[subset], truth[subset], F[evaluate_on],
                                                        class_weights=cfg.finetune.class_weights, seed=seed, C=C)
                    row["probes"][f"{name}@{C:g}"] = scores(y_eval, pred, common)
            row["mlp"] = scores(y_eval, mlp_expression(X_all[subset], truth[subset], X_all[evaluate_on], seed), common)
            row["probe_seconds"] = time.perf_counter() - t1
            rows.append(row)
            print(json.dumps({"seed": seed, "fraction": frac, "tune": tune, "n": len(subset),
                              **{f: round(max(row["probes"][f"{f}@{C:g}"]["macro_f1"] for C in PROBE_C), 3)
                                 for f in feats}}), flush=True)
    return rows


def summarise_probes(rows: list[dict], metric: str = "macro_f1") -> str:
    """One table per pretraining setting (``--set``): per feature set, C chosen on the outer split
    (mean over seeds, per label fraction) and the held-out section's score at that C; the feature
    set is chosen the same way. Then the outer-split scores alone (where settings are compared)."""
    rows = [r for r in rows if r.get("variant") == "probe"]
    settings = sorted({" ".join(r["pretrain"]) for r in rows})
    if len(settings) > 1:
        return "\n".join(summarise_probes([r for r in rows if " ".join(r["pretrain"]) == s], metric)
                         for s in settings) + "\n" + outer_probe_table(rows, metric)
    if not rows:
        return ""
    fracs = sorted({r["fraction"] for r in rows})
    seeds = lambda tune, f: [r for r in rows if r["tune"] == tune and r["fraction"] == f]
    pre = " ".join(rows[0]["pretrain"]) or "defaults"
    out = ["", f"#### frozen-encoder probes, pretraining {pre}, {metric}: C chosen on the outer split; held-out section "
           "(mean ± s.d.)", "",
           "| labels | seeds | " + " | ".join(f"{f} (C)" for f in PROBE_FEATURES) + " | MLP on expression | "
           "chosen on the outer split | its held-out score - expression |",
           "|---|---|" + "---|" * (len(PROBE_FEATURES) + 3)]
    for f in fracs:
        tune_rows, test_rows = seeds(True, f), seeds(False, f)
        if not tune_rows or not test_rows:
            continue
        cells, outer_best, held = [], {}, {}
        for name in PROBE_FEATURES:
            outer = {C: np.mean([r["probes"][f"{name}@{C:g}"][metric] for r in tune_rows]) for C in PROBE_C}
            C = max(outer, key=outer.get)
            v = np.array([r["probes"][f"{name}@{C:g}"][metric] for r in test_rows])
            outer_best[name], held[name] = outer[C], v
            cells.append(f"{v.mean():.3f} ± {v.std():.3f} ({C:g})")
        pick = max(outer_best, key=outer_best.get)
        mlp = np.array([r["mlp"][metric] for r in test_rows])
        out.append(f"| {f:g} | {len(test_rows)} | " + " | ".join(cells) + f" | {mlp.mean():.3f} ± {mlp.std():.3f} | "
                   f"{pick} | {held[pick].mean() - held['expression'].mean():+.3f} |")
    return "\n".join(out)


def outer_probe_table(rows: list[dict], metric: str = "macro_f1") -> str:
    """Outer-split (tuning) score of 'expression+pretrained' at its best C, per pretraining setting
    and label fraction, beside 'expression' and 'expression+random_init' at theirs: where
    pretraining settings are compared (the held-out section plays no part)."""
    rows = [r for r in rows if r.get("variant") == "probe" and r["tune"]]
    fracs = sorted({r["fraction"] for r in rows})
    out = ["", f"#### outer split of the training section, {metric} at the best C (mean over seeds)", "",
           "| pretraining | seeds | " + " | ".join(f"{f:g}: +pretrained / expression / +random" for f in fracs) + " |",
           "|---|---|" + "---|" * len(fracs)]
    for s in sorted({" ".join(r["pretrain"]) for r in rows}):
        rs = [r for r in rows if " ".join(r["pretrain"]) == s]
        best = lambda name, f: max(np.mean([r["probes"][f"{name}@{C:g}"][metric] for r in rs if r["fraction"] == f])
                                   for C in PROBE_C)
        out.append(f"| {s or 'defaults'} | {len({r['seed'] for r in rs})} | " + " | ".join(
            f"{best('expression+pretrained', f):.3f} / {best('expression', f):.3f} / {best('expression+random_init', f):.3f}"
            for f in fracs) + " |")
    return "\n".join(out)


CLASSIFIERS = ("pretrained", "random_init", "logreg", "mlp")
METRICS = ("macro_f1", "macro_f1_common", "balanced_accuracy", "accuracy")


def summarise(rows: list[dict]) -> str:
    groups: dict = {}
    for r in rows:
        if r.get("variant") == "probe":
            continue
        groups.setdefault((r["tune"], " ".join(r["pretrain"]), r["variant"], r["fraction"]), []).append(r)
    out = []
    for metric in METRICS:
        out += ["", f"#### {metric} (mean ± s.d. over seeds)", "",
                "| evaluated on | variant | labels | cells | seeds | gnn-mask pretrained | random init | "
                "logistic regression | MLP on expression | pretrained - random | pretrained - best of logreg/MLP |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for (tune, pre, var, frac), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] != "default",
                                                                                   kv[0][2], kv[0][3])):
            v = {c: np.array([r[c][metric] if c in r else np.nan for r in rs]) for c in CLASSIFIERS}
            best_base = np.maximum(v["logreg"].mean(), v["mlp"].mean())
            cell = lambda x: f"{x.mean():.3f} ± {x.std():.3f}"
            out.append(f"| {'outer split' if tune else 'held-out section'}{' (' + pre + ')' if pre else ''} | {var} "
                       f"| {frac:g} | {int(np.mean([r['n_labelled'] for r in rs]))} | {len(rs)} | "
                       + " | ".join(cell(v[c]) for c in CLASSIFIERS)
                       + f" | {v['pretrained'].mean() - v['random_init'].mean():+.3f}"
                       f" | {v['pretrained'].mean() - best_base:+.3f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--fractions", default=",".join(str(f) for f in FRACTIONS))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "label_efficiency.jsonl"))
    p.add_argument("--set", dest="extra", action="append", default=[], help="pretraining overrides name=value")
    p.add_argument("--variants", default="default")
    p.add_argument("--tune", action="store_true", help="score on an outer split of the training section")
    p.add_argument("--quick", action="store_true", help="1 seed, 2 fractions, short training; prints one JSON line")
    p.add_argument("--synthetic", action="store_true", help="a tiny synthetic slide instead of the MERFISH file")
    p.add_argument("--no-random-init", action="store_true", help="skip the random-init fine-tuning (tuning runs)")
    p.add_argument("--probes", action="store_true",
                   help="frozen-encoder probes (logistic regression on expression + embeddings), tuned and held out")
    p.add_argument("--summary-only", action="store_true")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    if args.quick:
        t0 = time.perf_counter()
        adata, tr, te, dov, name = load(True, args.synthetic)
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            rows = run_seed(adata, args.seeds[0], (0.05, 1.0), pretrain_extra=args.extra, variants=["default"],
                            tune=False, train_name=tr, test_name=te, data_overrides=dov, quick=True, done=set())
        line = {"quick": True, "data": name, "seed": args.seeds[0], "seconds": round(time.perf_counter() - t0, 1),
                **{f"macro_f1_{c}@{r['fraction']:g}": round(r[c]["macro_f1"], 4) for r in rows for c in CLASSIFIERS}}
        print(json.dumps(line))
        return 0
    out = Path(args.out)
    rows = [json.loads(ln) for ln in out.read_text().splitlines() if ln.strip()] if out.exists() else []
    if not args.summary_only:
        adata, tr, te, dov, name = load(False, args.synthetic)
        fracs = [float(f) for f in args.fractions.split(",")]
        for seed in args.seeds:
            done = {(r["seed"], r["fraction"], r["variant"], r["tune"], " ".join(r["pretrain"])) for r in rows}
            if args.probes:
                new = run_probe_seed(adata, seed, fracs, pretrain_extra=args.extra, train_name=tr, test_name=te,
                                     data_overrides=dov, quick=False, done=done)
            else:
                new = run_seed(adata, seed, fracs, pretrain_extra=args.extra, variants=args.variants.split(","),
                               tune=args.tune, train_name=tr, test_name=te, data_overrides=dov, quick=False, done=done,
                               random_init=not args.no_random_init)
            out.parent.mkdir(parents=True, exist_ok=True)
            with out.open("a") as fh:
                for r in new:
                    fh.write(json.dumps(r) + "\n")
            rows += new
    print(summarise(rows))
    print(summarise_probes(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
