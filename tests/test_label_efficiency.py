"""benchmarks/label_efficiency.py --quick runs end to end (tiny synthetic slide) and prints one JSON line."""

import json

import numpy as np

from conftest import load_benchmark


def _module():
    return load_benchmark("label_efficiency")


def test_stratified_subset_keeps_every_class():
    mod = _module()
    labels = np.array([0] * 500 + [1] * 40 + [2] * 2)
    cells = np.arange(len(labels))
    sub = mod.stratified_subset(cells, labels, 0.01, np.random.default_rng(0))
    assert np.bincount(labels[sub]).tolist() == [5, 1, 1]
    assert len(np.unique(sub)) == len(sub)
    np.testing.assert_array_equal(mod.stratified_subset(cells, labels, 1.0, np.random.default_rng(0)), cells)


def test_quick_run_prints_one_json_line(capsys):
    mod = _module()
    assert mod.main(["--quick", "--synthetic"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["quick"] and rec["data"] == "synthetic"
    for c in ("pretrained", "random_init", "logreg", "mlp"):
        for f in ("0.05", "1"):
            assert 0.0 <= rec[f"macro_f1_{c}@{f}"] <= 1.0


def test_probe_rows_cover_both_splits_and_every_feature_set():
    from napari_spatialssl.data.synthetic import synthetic_slide

    mod = _module()
    a = synthetic_slide(600, 30, 2, 4, seed=0)
    names = list(a.obs["section"].cat.categories)
    rows = mod.run_probe_seed(a, 0, (0.1, 1.0), pretrain_extra=[], train_name=names[0], test_name=names[1],
                              data_overrides={"data.section_key": "section", "data.label_key": "cell_type"},
                              quick=True, done=set())
    assert sorted((r["tune"], r["fraction"]) for r in rows) == [(False, 0.1), (False, 1.0), (True, 0.1), (True, 1.0)]
    outer = next(r for r in rows if r["tune"] and r["fraction"] == 1.0)
    held = next(r for r in rows if not r["tune"] and r["fraction"] == 1.0)
    assert outer["n_eval_cells"] < held["n_labelled"]  # the outer split is cut out of the training section
    assert held["n_labelled"] > outer["n_labelled"]
    for r in rows:
        assert set(r["probes"]) == {f"{f}@{C:g}" for f in mod.PROBE_FEATURES for C in mod.PROBE_C}
        assert all(0.0 <= s["macro_f1"] <= 1.0 for s in r["probes"].values())


def test_probe_summary_reports_the_held_out_score_at_the_c_chosen_on_the_outer_split():
    mod = _module()
    lo, hi = mod.PROBE_C[0], mod.PROBE_C[-1]

    def row(tune, best_c, value):
        probes = {f"{f}@{C:g}": {"macro_f1": (value if C == best_c else 0.1)} for f in mod.PROBE_FEATURES
                  for C in mod.PROBE_C}
        return {"variant": "probe", "tune": tune, "fraction": 0.05, "seed": 0, "pretrain": [], "probes": probes,
                "mlp": {"macro_f1": 0.2}}

    # the outer split prefers the smallest C; the held-out section would prefer the largest
    table = mod.summarise_probes([row(True, lo, 0.9), row(False, hi, 0.8)])
    line = next(ln for ln in table.splitlines() if ln.startswith("| 0.05 "))
    assert f"0.100 ± 0.000 ({lo:g})" in line and "0.800" not in line
