"""benchmarks/peers.py end to end on a tiny synthetic case with our PCA baseline (no peer environment
needed): run, rerun with --again, score both protocols, and report only the latest run per seed."""

import json
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from conftest import load_benchmark


def _module():
    return load_benchmark("peers")


def _tiny_slide(path: Path) -> None:
    rng = np.random.default_rng(0)
    n, g = 240, 40
    xy = rng.uniform(0, 100, (n, 2))
    band = np.digitize(xy[:, 0], [33, 66])  # three vertical domains
    mean = np.ones((3, g))
    for d in range(3):
        mean[d, d * 10:(d + 1) * 10] = 12.0
    X = rng.poisson(mean[band]).astype(np.float32)
    labels = np.array(["A", "B", "C"], dtype=object)[band]
    labels[:5] = np.nan  # unlabelled spots are left out of the scores
    a = ad.AnnData(X=X, obs=pd.DataFrame({"region": labels}, index=[f"c{i}" for i in range(n)]),
                   var=pd.DataFrame(index=[f"g{i}" for i in range(g)]))
    a.obsm["spatial"] = xy
    a.write_h5ad(path)


def _harness(tmp_path, monkeypatch):
    data, env = tmp_path / "data", tmp_path / "env"
    data.mkdir()
    _tiny_slide(data / "tiny.h5ad")
    monkeypatch.setenv("SPATIALSSL_SHARED_DATA", str(data))
    monkeypatch.setenv("PEERS_ENV", str(env))  # the worker subprocess reads the same case files
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mod = _module()
    monkeypatch.setattr(mod, "RESULTS", tmp_path / "results")
    mod.CASES["tiny"] = {"file": "tiny.h5ad", "label": "region", "k": 3}
    return mod, env


def test_rerun_supersedes_and_report_shows_latest(tmp_path, monkeypatch, capsys):
    mod, env = _harness(tmp_path, monkeypatch)

    case = mod.prepare_case("tiny")
    prepared = ad.read_h5ad(case)
    assert prepared.uns["k"] == 3 and prepared.obs["truth"].isna().sum() == 5

    for again in (False, False, True):  # the second call skips (an ok record exists), the third reruns
        assert mod.main(["run", "--methods", "pca", "--cases", "tiny", "--seeds", "0"]
                        + (["--again"] if again else [])) == 0
    runs = [json.loads(ln) for ln in (tmp_path / "results" / "runs.jsonl").read_text().splitlines()]
    assert [r["status"] for r in runs] == ["ok", "ok"], runs
    assert runs[0]["embedding"] != runs[1]["embedding"]  # the rerun did not overwrite the first file
    assert all((env / r["embedding"]).exists() for r in runs)

    assert mod.main(["score", "--r-check-max-cells", "0"]) == 0
    scores = [json.loads(ln) for ln in (tmp_path / "results" / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 2  # both runs scored, neither skipped as a duplicate
    for s in scores:
        assert s["kmeans"]["ari"] > 0.5 and s["gmm"]["ari"] > 0.5, s  # three clear domains
    latest = mod.latest_scores(scores, runs)
    assert [s["embedding"] for s in latest] == [runs[1]["embedding"]]

    capsys.readouterr()
    assert mod.main(["report"]) == 0
    table = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| pca")]
    assert len(table) == 1 and table[0].split(" | ")[1] == "0", table  # one row, seed 0 once


@pytest.mark.skipif(shutil.which("Rscript") is None, reason="R (Rscript, mclust) is not installed")
def test_fill_r_adds_the_r_mclust_check_to_rows_scored_without_it(tmp_path, monkeypatch):
    mod, _ = _harness(tmp_path, monkeypatch)
    assert mod.main(["run", "--methods", "pca", "--cases", "tiny", "--seeds", "0"]) == 0
    assert mod.main(["score", "--r-check-max-cells", "0"]) == 0  # as on a machine without R
    path = tmp_path / "results" / "scores.jsonl"
    assert "r_mclust" not in json.loads(path.read_text())
    assert mod.main(["score", "--fill-r"]) == 0
    rows = [json.loads(ln) for ln in path.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["r_mclust"]["ari"] > 0.5, rows
    assert 0.0 <= rows[0]["r_mclust"]["ari_vs_python_gmm"] <= 1.0


def test_graphst_gets_an_rpy2_that_loads_with_the_r_installed(monkeypatch):
    mod = _module()
    spec = mod.PEERS["graphst"]
    monkeypatch.setattr(mod, "r_version", lambda: None)  # no R: rpy2 cannot build, GraphST alone
    assert mod._package_sets(spec) == [["graphst-modern"]]
    monkeypatch.setattr(mod, "r_version", lambda: (4, 2))  # rpy2 3.6 does not load with R 4.2
    assert mod._package_sets(spec)[0] == ["graphst-modern", "rpy2>=3.5,<3.6"]
    monkeypatch.setattr(mod, "r_version", lambda: (4, 5))
    assert mod._package_sets(spec)[0] == ["graphst-modern[r-clustering]"]
    assert mod._package_sets(mod.PEERS["stagate"]) == mod.PEERS["stagate"]["packages"]


def test_setup_rebuilds_only_when_a_preferred_set_can_work_now(monkeypatch):
    """An environment built without R (GraphST without rpy2) is rebuilt once R is there, not before;
    a preferred set that failed to install is not retried (BANKSY's banksy-py 0.0.7)."""
    mod = _module()
    graphst, banksy = mod.PEERS["graphst"], mod.PEERS["banksy"]
    without_r = {"installed": ["graphst-modern"],
                 "attempts": [{"packages": ["graphst-modern"], "ok": True}]}
    monkeypatch.setattr(mod, "r_version", lambda: None)
    assert not mod._better_set_possible(without_r, graphst)
    monkeypatch.setattr(mod, "r_version", lambda: (4, 2))
    assert mod._better_set_possible(without_r, graphst)  # rpy2 3.5 beside graphst-modern can work now
    with_rpy2 = {"installed": ["graphst-modern", "rpy2>=3.5,<3.6"],
                 "attempts": [{"packages": ["graphst-modern", "rpy2>=3.5,<3.6"], "ok": True}]}
    assert not mod._better_set_possible(with_rpy2, graphst)
    monkeypatch.setattr(mod, "r_version", lambda: (4, 5))
    assert mod._better_set_possible(with_rpy2, graphst)  # the [r-clustering] extra is first with R 4.5
    pybanksy = {"installed": ["pybanksy", "scikit-misc"],
                "attempts": [{"packages": ["banksy-py==0.0.7"], "ok": False, "error": "conflict"},
                             {"packages": ["pybanksy", "scikit-misc"], "ok": True}]}
    assert not mod._better_set_possible(pybanksy, banksy)
