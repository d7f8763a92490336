"""scanpy-style verbs (napari_spatialssl.tl): in place / copy, key_added, settings by name, the squidpy graph,
and squidpy's nhood_enrichment on the result."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import napari_spatialssl as ssl
from napari_spatialssl.data.io import SpatialDataError

FAST_SPOTSCAPE = dict(epochs=2, n_domains=3, hidden_dims=[16, 8], recon_spots=64)
PATCH_FAST = {"patch_size": 8, "n_channels": 12, "patches_per_epoch": 64, "batch_size": 32, "dim": 32,
              "decoder_dim": 32, "depth": 1, "eval_mask_sizes": [2, 4], "eval_mask_repeats": 2, "probe_hidden": 16}


@pytest.fixture(scope="module")
def cells(osmfish_path):
    """400 neighbouring osmFISH cells (raw counts, micrometres)."""
    a = ad.read_h5ad(osmfish_path)
    xy = a.obsm["spatial"]
    keep = np.sort(np.argsort(((xy - np.median(xy, axis=0)) ** 2).sum(1))[:400])
    return a[keep].copy()


@pytest.fixture(scope="module")
def in_place(cells):
    a = cells.copy()
    assert ssl.tl.spotscape(a, **FAST_SPOTSCAPE) is None
    return a


def test_in_place_writes_the_usual_keys(cells, in_place):
    a = in_place
    assert a.obsm["X_spotscape"].shape == (a.n_obs, 8)
    dom = a.obs["spotscape_domain"]
    assert isinstance(dom.dtype, pd.CategoricalDtype) and dom.nunique() == 3
    assert a.layers["spotscape_reconstruction"].shape == a.shape
    entry = a.uns["spatialssl"]["spotscape"]
    cfg = json.loads(entry["config"])
    assert cfg["epochs"] == 2 and cfg["eval"]["n_domains"] == 3 and cfg["hidden_dims"] == [16, 8]
    assert json.loads(entry["metrics"])["epochs"] == 2
    # the run's graph (spotscape's SNN graph) under squidpy's keys
    C = a.obsp["spatial_connectivities"]
    assert sp.issparse(C) and C.shape == (a.n_obs, a.n_obs) and (C != C.T).nnz == 0 and C.diagonal().sum() == 0
    params = a.uns["spatial_neighbors"]["params"]
    assert params["n_neighbors"] == 50 and params["radius"] > 0 and params["coord_type"] == "generic"
    # nothing else of the input changed
    np.testing.assert_array_equal(a.obsm["spatial"], cells.obsm["spatial"])
    assert list(cells.obs.columns) == [c for c in a.obs.columns if not c.startswith("spotscape_")]


def test_copy_with_key_added_leaves_the_input_alone(cells):
    before = cells.copy()
    res = ssl.tl.spotscape(cells, key_added="run1", copy=True, **FAST_SPOTSCAPE)
    assert isinstance(res, ad.AnnData) and res is not cells
    assert "X_run1" in res.obsm and "X_spotscape" not in res.obsm
    assert "run1_domain" in res.obs and not any(c.startswith("spotscape_") for c in res.obs.columns)
    assert "run1_reconstruction" in res.layers and set(res.uns["spatialssl"]) == {"run1"}
    assert "run1_connectivities" in res.obsp and res.uns["run1_neighbors"]["connectivities_key"] == "run1_connectivities"
    assert "spatial_connectivities" not in res.obsp
    # the input is as it was, and shares no arrays with the result
    assert set(cells.obsm) == set(before.obsm) and list(cells.obs.columns) == list(before.obs.columns)
    assert not cells.obsp and "spatialssl" not in cells.uns
    assert not np.shares_memory(res.obsm["spatial"], cells.obsm["spatial"])


def test_an_existing_squidpy_graph_is_kept(cells):
    a = cells.copy()
    mine = sp.csr_matrix(sp.eye(a.n_obs, k=1, dtype=np.float32) + sp.eye(a.n_obs, k=-1, dtype=np.float32))
    a.obsp["spatial_connectivities"] = mine
    a.uns["spatial_neighbors"] = {"connectivities_key": "spatial_connectivities", "distances_key": "spatial_distances",
                                  "params": {"coord_type": "generic", "n_neighbors": 2, "transform": None}}
    ssl.tl.gnn_mask(a, epochs=2, radius=400, hidden_dims=[16, 8], section_key=None)
    assert (a.obsp["spatial_connectivities"] != mine).nnz == 0 and a.uns["spatial_neighbors"]["params"]["n_neighbors"] == 2
    res = ssl.tl.spotscape(a, copy=True, **FAST_SPOTSCAPE)  # a copy keeps it too
    assert (res.obsp["spatial_connectivities"] != mine).nnz == 0 and "spatialssl" not in res.uns["spatial_neighbors"]
    assert "X_gnn-mask" in a.obsm and "gnn-mask_masked" in a.obs
    cfg = json.loads(a.uns["spatialssl"]["gnn-mask"]["config"])
    assert cfg["radius"] == 400 and cfg["data"]["section_key"] is None  # short names reach the config sections


def test_patch_mae_writes_squidpy_default_graph(cells):
    res = ssl.tl.patch_mae(cells, copy=True, epochs=2, n_domains=3, **PATCH_FAST)
    assert res.obs["patch-mae_domain"].nunique() == 3 and res.obsm["X_patch-mae"].shape[0] == cells.n_obs
    C = res.obsp["spatial_connectivities"]
    assert res.uns["spatial_neighbors"]["params"]["n_neighbors"] == 6
    assert C.getnnz(axis=1).min() >= 6  # each cell has its 6 nearest, symmetrised


def test_settings_are_checked(cells):
    with pytest.raises(SpatialDataError, match="unknown setting 'no_such_thing'"):
        ssl.tl.spotscape(cells, no_such_thing=1)
    with pytest.raises(SpatialDataError, match="is a view"):
        ssl.tl.spotscape(cells[:50], epochs=1)
    with pytest.raises(SpatialDataError, match="key_added"):
        ssl.tl.spotscape(cells, key_added="", epochs=1)


def test_squidpy_nhood_enrichment_on_our_result(in_place):
    sq = pytest.importorskip("squidpy", reason="needs squidpy (test extra; it brings spatialdata)")
    a = in_place.copy()
    sq.gr.nhood_enrichment(a, cluster_key="spotscape_domain", n_perms=20, seed=0, show_progress_bar=False)
    out = a.uns["spotscape_domain_nhood_enrichment"]
    k = a.obs["spotscape_domain"].cat.categories.size
    assert out["zscore"].shape == (k, k) and out["count"].shape == (k, k)
    assert np.isfinite(out["zscore"]).all()
    # domains are spatially coherent on the SNN graph: same-domain neighbours over-represented
    assert np.diag(out["zscore"]).mean() > 0
