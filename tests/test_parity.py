"""The CLI, ``napari_spatialssl.fit`` and the plugin's Session give the same domains and metrics: one
pipeline, one domain-clustering rule, one config per method (osmFISH sample, fixed seed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_spatialssl import fit
from napari_spatialssl._napari.session import Session, Slide
from napari_spatialssl._napari.workers import InlineRunner
from napari_spatialssl.cli import main
from napari_spatialssl.data.io import read_h5ad
from napari_spatialssl.pipeline import _jsonable

SETTINGS = {
    "gnn-mask": {"epochs": 2, "seed": 3, "hidden_dims": [16, 8], "decoder_hidden": 16},
    "spotscape": {"epochs": 2, "seed": 3, "hidden_dims": [32, 8], "k_neighbors": 10, "eval_masked_genes": 0.2},
    "patch-mae": {"epochs": 1, "seed": 3, "patch_size": 8, "n_channels": 8, "patches_per_epoch": 16, "batch_size": 8,
                  "dim": 16, "decoder_dim": 16, "depth": 1, "eval_mask_sizes": [2], "eval_mask_repeats": 1},
}
KEYS = {"data.section_key": None, "data.label_key": None, "eval.domain_key": "region", "device": "cpu"}
VOLATILE = ("seconds", "elapsed", "versions", "cells_per_second", "device")


def stable(metrics):
    """The metrics without timings (which differ from run to run)."""
    if isinstance(metrics, dict):
        return {k: stable(v) for k, v in metrics.items() if not any(w in k for w in VOLATILE)}
    if isinstance(metrics, list):
        return [stable(v) for v in metrics]
    return metrics


def _cli_value(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


@pytest.mark.parametrize("method", list(SETTINGS))
@pytest.mark.parametrize("k", [5, None])  # K given, and the automatic rule
def test_cli_python_and_session_agree(method, k, osmfish_path, tmp_path):
    settings = {**SETTINGS[method], **KEYS, "eval.n_domains": k}
    # CLI
    argv = ["fit", str(osmfish_path), "--method", method, "--out", str(tmp_path / "cli"), "--quiet"]
    for name, value in settings.items():
        argv += ["--set", f"{name}={_cli_value(value)}"]
    assert main(argv) == 0
    cli = read_h5ad(tmp_path / "cli" / "result.h5ad")
    cli_metrics = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    # Python
    adata = read_h5ad(osmfish_path)
    api = fit(adata, method, overrides=settings)
    # Session (as the widget drives it)
    session = Session(InlineRunner())
    session.open_slide(Slide.from_adata(read_h5ad(osmfish_path), "osmfish"))
    session.set_method(method)
    session.set_keys(section_key=None, label_key=None, domain_key="region")
    for name, value in settings.items():
        if not name.startswith(("data.", "eval.domain_key")):
            session.set_setting(name, value)
    session.train()
    gui = session.result(method)

    key = f"{method}_domain"
    labels = [np.asarray(a.obs[key].astype(str)) for a in (cli, api.adata, gui.adata)]
    np.testing.assert_array_equal(labels[0], labels[1])
    np.testing.assert_array_equal(labels[0], labels[2])
    assert list(cli.obs[key].cat.categories) == [str(i) for i in range(len(cli.obs[key].cat.categories))]
    m_cli, m_api, m_gui = (stable(m) for m in (cli_metrics, api.metrics, gui.metrics))
    m_api, m_gui = (json.loads(json.dumps(_jsonable(m))) for m in (m_api, m_gui))  # as metrics.json holds them
    assert m_cli["domains"] == m_api["domains"] == m_gui["domains"]
    assert m_cli == m_api == m_gui
    np.testing.assert_array_equal(cli.obsm[f"X_{method}"], gui.adata.obsm[f"X_{method}"])
