"""`napari-spatialssl fit` and `predict` end to end on a small real slide (STARmap sample data)."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest

from napari_spatialssl.cli import main
from napari_spatialssl.data.io import read_h5ad

SECTION_KEY = "sample_id"
FIT_ARGS = ["--method", "gnn-mask", "--section-key", SECTION_KEY, "--label-key", "cell_type",
            "--test-sections", "20180424_BZ14_control", "--epochs", "3", "--seed", "3", "--device", "cpu",
            "--set", "finetune.epochs=3", "--set", "hidden_dims=32,16", "--set", "decoder_hidden=32",
            "--set", "radius=300", "--quiet"]


@pytest.fixture(scope="module")
def fitted(starmap_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("fit")
    assert main(["fit", str(starmap_path), "--out", str(out), *FIT_ARGS]) == 0
    return out


def test_fit_writes_every_output(fitted, starmap_path):
    for name in ("result.h5ad", "metrics.json", "config.json", "model.safetensors", "model.json", "loss.csv",
                 "manifest.json"):
        assert (fitted / name).exists(), name
    m = json.loads((fitted / "metrics.json").read_text())
    assert m["method"] == "gnn-mask" and m["seed"] == 3 and m["device"] == "cpu" and m["epochs"] == 3
    assert m["train_seconds"] > 0 and m["seconds_per_epoch"] > 0 and m["cells_per_second"] > 0
    assert set(m["reconstruction"]["baselines"]) == {"train_mean", "neighbor_mean"}
    assert m["cell_type"]["test_sections"] == ["20180424_BZ14_control"]
    assert set(m["cell_type"]["baselines"]) == {"random_init", "expression_logreg"}
    cfg = json.loads((fitted / "config.json").read_text())
    assert cfg["method"] == "gnn-mask" and cfg["config"]["radius"] == 300 and cfg["config"]["hidden_dims"] == [32, 16]
    loss = (fitted / "loss.csv").read_text().splitlines()
    assert loss[0].startswith("epoch,loss") and len(loss) == 4
    res = read_h5ad(fitted / "result.h5ad")
    src = read_h5ad(starmap_path)
    assert res.shape == src.shape and list(res.obs_names) == list(src.obs_names)
    assert res.obsm["X_gnn-mask"].shape == (src.n_obs, 16)
    assert res.layers["gnn-mask_reconstruction"].shape == src.shape
    assert res.obs["gnn-mask_cell_type"].dtype == "category" and "gnn-mask_masked" in res.obs
    assert "gnn-mask" in res.uns["spatialssl"]


def test_fit_refuses_to_overwrite(fitted, starmap_path, capsys):
    assert main(["fit", str(starmap_path), "--out", str(fitted), *FIT_ARGS]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_predict_on_the_training_slide_reproduces_fit(fitted, starmap_path, tmp_path):
    assert main(["predict", str(starmap_path), "--model", str(fitted), "--out", str(tmp_path), "--device", "cpu"]) == 0
    a = read_h5ad(tmp_path / "result.h5ad")
    b = read_h5ad(fitted / "result.h5ad")
    np.testing.assert_allclose(a.obsm["X_gnn-mask"], b.obsm["X_gnn-mask"], atol=1e-5)
    assert (a.obs["gnn-mask_cell_type"].astype(str) == b.obs["gnn-mask_cell_type"].astype(str)).all()
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["n_missing_genes"] == 0 and "cell_type" in m


def _new_panel(starmap_path, tmp_path, n_missing: int):
    """One section of the slide with `n_missing` model genes removed and an extra unknown gene."""
    src = read_h5ad(starmap_path)
    sub = src[src.obs[SECTION_KEY] == "20180417_BZ5_control"].copy()
    keep = sub.var_names[n_missing:]
    sub = sub[:, keep].copy()
    extra = ad.AnnData(X=np.ones((sub.n_obs, 1), np.float32), obs=sub.obs[[]])
    extra.var_names = ["NotInModel1"]
    new = ad.concat([sub, extra], axis=1, merge="first")
    new.obsm["spatial"] = sub.obsm["spatial"]
    new.obs = sub.obs.drop(columns=["cell_type"])  # a new slide need not carry labels
    path = tmp_path / f"new_{n_missing}.h5ad"
    new.write_h5ad(path)
    return path, list(src.var_names[:n_missing])


def test_predict_zero_fills_a_few_missing_genes(fitted, starmap_path, tmp_path, capsys):
    path, missing = _new_panel(starmap_path, tmp_path, 10)
    out = tmp_path / "pred"
    assert main(["predict", str(path), "--model", str(fitted), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "10 model gene(s) missing" in err and missing[0] in err
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_missing_genes"] == 10 and m["missing_genes"] == missing
    res = read_h5ad(out / "result.h5ad")
    assert res.layers["gnn-mask_reconstruction"].shape == res.shape
    rec = res.layers["gnn-mask_reconstruction"]
    rec = rec.toarray() if hasattr(rec, "toarray") else rec
    assert np.all(rec[:, list(res.var_names).index("NotInModel1")] == 0)  # not a model gene
    assert res.obs["gnn-mask_cell_type"].notna().all() and np.isfinite(res.obsm["X_gnn-mask"]).all()


def test_predict_refuses_too_many_missing_genes(fitted, starmap_path, tmp_path, capsys):
    path, _ = _new_panel(starmap_path, tmp_path, 60)  # 60 of 166 genes: over the 20 % limit
    code = main(["predict", str(path), "--model", str(fitted), "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert code == 2 and "60 of the model's 166 genes are missing" in err and "at most 20%" in err
    assert not (tmp_path / "p" / "result.h5ad").exists()
    # a looser limit, stated by the user, is honoured
    assert main(["predict", str(path), "--model", str(fitted), "--out", str(tmp_path / "q"),
                 "--max-missing-genes", "0.5"]) == 0


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["fit", str(tmp_path / "absent.h5ad"), "--method", "gnn-mask", "--out", str(tmp_path)]) == 2
    assert "file not found" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "absent.h5ad"), "--model", str(tmp_path), "--out", str(tmp_path)]) == 2


def test_fit_rejects_unknown_setting(starmap_path, tmp_path, capsys):
    code = main(["fit", str(starmap_path), "--method", "gnn-mask", "--out", str(tmp_path), "--set", "nope=1"])
    assert code == 2 and "unknown setting 'nope'" in capsys.readouterr().err
