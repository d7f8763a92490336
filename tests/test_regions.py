"""Masked-region inspection for every method, and the one domain-clustering rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_spatialssl.data.synthetic import synthetic_slide
from napari_spatialssl.evaluation.domains import cluster_domains, domain_categorical
from napari_spatialssl.evaluation.regions import cells_in_polygon, columnwise_r, inspect_region
from napari_spatialssl.pipeline import fit

FAST = {
    "gnn-mask": {"epochs": 2, "hidden_dims": [16, 8], "decoder_hidden": 16},
    "spotscape": {"epochs": 2, "hidden_dims": [32, 8], "data.preprocess.n_top_genes": None},
    "patch-mae": {"epochs": 1, "patch_size": 8, "n_channels": 8, "patches_per_epoch": 16, "batch_size": 8, "dim": 16,
                  "decoder_dim": 16, "depth": 1, "eval_mask_sizes": [2], "eval_mask_repeats": 1},
}


@pytest.fixture(scope="module")
def slide():
    return synthetic_slide(n_cells=800, n_genes=24, n_sections=1, n_cell_types=4, n_domains=3, seed=3)


@pytest.fixture(scope="module", params=list(FAST))
def trained(request, slide):
    return fit(slide, request.param, overrides={**FAST[request.param], "eval.n_domains": 3})


def test_inspect_region_hides_the_region_and_scores_it(trained, slide):
    method = trained.method
    xy = slide.obsm["spatial"]
    lo, hi = np.percentile(xy, 35, axis=0), np.percentile(xy, 60, axis=0)
    square = np.array([[lo[0], lo[1]], [hi[0], lo[1]], [hi[0], hi[1]], [lo[0], hi[1]]])
    cells = cells_in_polygon(xy, square)
    assert 20 < len(cells) < 400
    report = inspect_region(method, cells, torch.device("cpu"))
    m, g = len(cells), method.data.n_genes
    assert report.predicted.shape == report.observed.shape == (m, g)
    assert set(report.baselines) == {"neighbour mean", "interpolation"}
    assert np.isfinite(report.predicted).all() and np.isfinite(report.baselines["interpolation"]).all()
    summary = report.summary()
    assert summary["cells"] == m and {"model", "neighbour mean", "interpolation"} <= set(summary)
    assert list(report.per_gene.columns[:3]) == ["gene", "model mse", "model r"] and len(report.per_gene) == g
    one = report.gene(report.genes[0])
    assert set(one) == {"measured", "model", "neighbour mean", "interpolation"} and len(one["model"]) == m
    # hiding matters: the prediction with the region hidden is not the cells' own measurement
    assert not np.allclose(report.predicted, report.observed)


def test_polygon_selection_is_exact():
    pts = np.array([[0.5, 0.5], [2.0, 2.0], [0.1, 0.9], [1.5, 0.2]])
    tri = np.array([[0, 0], [1, 0], [0, 1]])
    assert cells_in_polygon(pts, tri).tolist() == [0]
    with pytest.raises(ValueError, match="three corners"):
        cells_in_polygon(pts, tri[:2])


def test_columnwise_r():
    a = np.array([[1.0, 1.0], [2.0, 1.0], [3.0, 1.0]])
    r = columnwise_r(a, a * 2)
    assert r[0] == pytest.approx(1.0) and np.isnan(r[1])


def test_one_rule_for_automatic_domains():
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(c, 0.3, size=(200, 4)) for c in (0, 3, 6)]).astype(np.float32)
    auto, info = cluster_domains(X, seed=1)
    assert info["method"] == "leiden" and info["n_domains"] == 3
    k, kinfo = cluster_domains(X, 3, seed=1)
    assert kinfo["method"] == "kmeans" and kinfo["n_domains"] == 3
    g, ginfo = cluster_domains(X, 3, seed=1, method="gmm")
    assert ginfo["method"] == "gmm" and len(np.unique(g)) == 3
    sizes = np.bincount(k)
    assert (np.diff(sizes) <= 0).all()  # numbered by decreasing size
    cat = domain_categorical(np.array([1, 0, 2, 10]))
    assert list(cat.categories)[:3] == ["0", "1", "2"] and list(cat.categories)[-1] == "10"
    with pytest.raises(ValueError, match="needs K"):
        cluster_domains(X, method="kmeans")
