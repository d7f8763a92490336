"""Export (core, no Qt): .h5ad / .csv, atomic, never overwrites unless told; the napari writer's AnnData."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import anndata as ad

from napari_spatialssl._napari import layers as L
from napari_spatialssl._napari.writer import layer_to_adata, write_points
from napari_spatialssl.cli import main as cli_main
from napari_spatialssl.data import export as E
from napari_spatialssl.data.io import SpatialDataError


@pytest.fixture
def slide(tmp_path):
    rng = np.random.default_rng(0)
    n = 40
    a = ad.AnnData(sp.csr_matrix(rng.poisson(1.0, (n, 4)).astype(np.float32)),
                   obs=pd.DataFrame({"cell_type": pd.Categorical(rng.choice(["A", "B"], n)),
                                     "section": np.repeat(["s1", "s2"], n // 2)},
                                    index=[f"cell{i}" for i in range(n)]),
                   var=pd.DataFrame(index=["g0", "g1", "g2", "g3"]))
    a.obsm["spatial"] = rng.uniform(0, 100, (n, 2))
    path = tmp_path / "slide.h5ad"
    a.write_h5ad(path)
    return a, path


def test_export_h5ad_roundtrip(slide, tmp_path):
    a, src = slide
    dst = E.export_file(src, tmp_path / "out" / "copy.h5ad")
    b = ad.read_h5ad(dst)
    assert b.shape == a.shape
    np.testing.assert_array_equal(b.X.toarray(), a.X.toarray())
    np.testing.assert_array_equal(b.obsm["spatial"], a.obsm["spatial"])
    assert list(b.obs["cell_type"]) == list(a.obs["cell_type"])


def test_export_csv_table(slide, tmp_path):
    a, src = slide
    dst = E.export_file(src, tmp_path / "cells.csv")
    t = pd.read_csv(dst)
    assert list(t.columns[:3]) == ["cell", "x", "y"] and {"cell_type", "section"} <= set(t.columns)
    assert len(t) == a.n_obs and t["cell"].tolist() == list(a.obs_names)
    np.testing.assert_allclose(t[["x", "y"]].to_numpy(), a.obsm["spatial"])
    t2 = E.adata_to_table(a, include_expression=True)
    np.testing.assert_array_equal(t2["gene:g2"].to_numpy(), a.X.toarray()[:, 2])


def test_refuses_overwrite_unless_told(slide, tmp_path):
    _, src = slide
    dst = tmp_path / "cells.csv"
    dst.write_text("keep me")
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        E.export_file(src, dst)
    assert dst.read_text() == "keep me"
    E.export_file(src, dst, overwrite=True)
    assert pd.read_csv(dst).shape[0] == 40
    with pytest.raises(SpatialDataError, match="is the input file"):
        E.export_file(src, src, overwrite=True)


def test_bad_export_paths(slide, tmp_path):
    _, src = slide
    with pytest.raises(SpatialDataError, match=r"use .h5ad .* or .csv"):
        E.export_file(src, tmp_path / "cells.xlsx")
    (tmp_path / "dir.csv").mkdir()
    with pytest.raises(SpatialDataError, match="is a folder"):
        E.export_file(src, tmp_path / "dir.csv")
    with pytest.raises(SpatialDataError, match="file not found"):
        E.export_file(tmp_path / "absent.h5ad", tmp_path / "x.csv")


def test_export_is_atomic(slide, tmp_path, monkeypatch):
    a, _ = slide
    dst = tmp_path / "cells.csv"

    def broken(self, path, *args, **kwargs):
        with open(path, "w") as fh:
            fh.write("cell,x\npartial")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", broken)
    with pytest.raises(SpatialDataError, match="cells.csv: could not be written .disk full"):
        E.adata_to_csv(a, dst)
    assert not dst.exists() and list(tmp_path.iterdir()) == [tmp_path / "slide.h5ad"]  # no temp file left


def test_cli_export(slide, tmp_path, capsys):
    _, src = slide
    dst = tmp_path / "cli.csv"
    assert cli_main(["export", str(src), str(dst)]) == 0
    assert dst.exists()
    assert cli_main(["export", str(src), str(dst)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["export", str(src), str(dst), "--overwrite"]) == 0


def test_writer_maps_features_back_to_cells(slide, tmp_path):
    a, _ = slide
    data, kw, _ = L.adata_to_points(a)
    feats = kw["features"].copy()
    feats["gnn-mask_domain"] = pd.Categorical(np.where(np.arange(40) % 2, "d1", "d2"))
    # the user deleted the first five points and added one by hand
    keep = np.arange(5, 40)
    data2 = np.vstack([data[keep], [[1.0, 1.0]]])
    extra = pd.DataFrame([L.feature_defaults(feats)])
    feats2 = pd.concat([feats.iloc[keep], extra], ignore_index=True)
    out = layer_to_adata(data2, feats2, kw["metadata"])
    assert out.n_obs == 35 and list(out.obs_names) == [f"cell{i}" for i in keep]
    np.testing.assert_array_equal(out.X.toarray(), a.X.toarray()[keep])
    np.testing.assert_array_equal(out.obsm["spatial"], a.obsm["spatial"][keep])  # original, not tiled
    assert list(out.obs["gnn-mask_domain"]) == list(feats["gnn-mask_domain"].iloc[keep])
    assert "cell_index" not in out.obs.columns
    assert a.n_obs == 40 and "gnn-mask_domain" not in a.obs.columns  # the source AnnData is untouched

    path = tmp_path / "layer.h5ad"
    assert write_points(str(path), data2, {"features": feats2, "metadata": kw["metadata"]}) == [str(path)]
    assert ad.read_h5ad(path).n_obs == 35
    # napari's Save dialog confirmed the replacement: the writer replaces the file (atomically)
    assert write_points(str(path), data2[:10], {"features": feats2.iloc[:10], "metadata": kw["metadata"]}) == [str(path)]
    assert ad.read_h5ad(path).n_obs == 10 and sorted(p.name for p in tmp_path.iterdir()) == ["layer.h5ad", "slide.h5ad"]  # no temp file left
    csv = tmp_path / "layer.csv"
    write_points(str(csv), data2, {"features": feats2, "metadata": kw["metadata"]})
    assert "gnn-mask_domain" in pd.read_csv(csv).columns


def test_writer_for_plain_points_layer(tmp_path):
    data = np.array([[3.0, 10.0], [7.0, 0.5]])  # (row, col)
    out = layer_to_adata(data, pd.DataFrame({"label": ["a", "b"]}), {})
    np.testing.assert_array_equal(out.obsm["spatial"], [[10.0, 3.0], [0.5, 7.0]])  # back to (x, y)
    assert list(out.obs["label"]) == ["a", "b"] and out.n_vars == 0
