"""benchmarks/label_efficiency.py --quick runs end to end (tiny synthetic slide) and prints one JSON line."""

import importlib.util
import json
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "label_efficiency.py"


def _module():
    spec = importlib.util.spec_from_file_location("label_efficiency", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
