"""The widget's Qt-free helpers: preview geometry, overlay values, the settings file."""

from __future__ import annotations

import json

import numpy as np
import scipy.sparse as sp

from napari_spatialssl._napari import overlays, previews
from napari_spatialssl._napari.widget_settings import ENV_VAR, load_settings, save_settings, settings_path
from napari_spatialssl.graphs.neighbors import radius_graph


def _slide(n=400, seed=0):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 100, size=(n, 2))
    section = (np.arange(n) >= n // 2).astype(np.int64)
    return xy, section


def test_section_transform_recovers_a_tiled_flipped_layout():
    xy, section = _slide()
    offsets = np.array([[0.0, 0.0], [130.0, 7.0]])  # (dx, dy) per section, as a tiled reader layout
    rowcol = (xy + offsets[section])[:, ::-1] * 2.0  # flipped to (row, col) and scaled
    tr = previews.fit_section_transform(xy, section, rowcol)
    np.testing.assert_allclose(tr.apply(xy, section), rowcol, atol=1e-9)
    assert np.allclose(tr.scale, 2.0) and tr.length(5.0) == 10.0
    boxes = previews.rectangles(np.array([[10.0, 20.0]]), (4.0, 6.0), 1, tr)
    np.testing.assert_allclose(boxes[0, 0], ((np.array([10.0, 20.0]) + offsets[1])[::-1]) * 2.0)
    np.testing.assert_allclose(boxes[0, 2], ((np.array([14.0, 26.0]) + offsets[1])[::-1]) * 2.0)


def test_edges_of_and_sample_edges_match_the_graph():
    xy, section = _slide()
    g = radius_graph(xy, 12.0, section)
    cells = np.array([3, 50, 399])
    src, dst = previews.edges_of(g, cells)
    A = g.to_scipy().tocoo()
    expected = {(int(r), int(c)) for r, c in zip(A.row, A.col) if r in set(cells.tolist())}
    assert set(zip(src.tolist(), dst.tolist())) == expected
    s, d = previews.sample_edges(g, 50, np.random.default_rng(0))
    assert len(s) == min(50, g.n_edges // 2) and (s < d).all()
    assert len(set(zip(s.tolist(), d.tolist()))) == len(s)
    assert g.to_scipy()[s, d].min() == 1  # every sampled pair is an edge
    pos = xy[:, ::-1]
    vec = previews.edge_vectors(pos, s, d)
    np.testing.assert_allclose(vec[:, 0] + vec[:, 1], pos[d])
    ego = previews.egonet_members(g, 3, 1)
    assert set(ego.tolist()) == {3} | set(previews.neighbours_of(g, 3).tolist())
    assert previews.nearest_point(pos, pos[77] + 1e-6) == 77


def test_overlay_values():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(300, 8))
    rgb = overlays.pca_rgb(emb)
    assert rgb.shape == (300, 4) and rgb.min() >= 0 and rgb.max() <= 1 and (rgb[:, 3] == 1).all()
    from napari_spatialssl._napari.displays import UNKNOWN_RGBA, categorical_colors, matched_names, natural_key

    cols, legend = categorical_colors(np.array(["b", "a", None, "b", "Excluded", "10", "2"], dtype=object))
    names = [name for name, _, _ in legend]
    assert names == ["2", "10", "a", "b", "Excluded"]  # natural order
    table = {name: rgba for name, rgba, _ in legend}
    assert np.allclose(cols[0], table["b"]) and np.allclose(cols[2], UNKNOWN_RGBA) and np.allclose(cols[4], UNKNOWN_RGBA)
    many, lg = categorical_colors(np.arange(25).astype(str))
    assert len({tuple(np.round(r, 4)) for _, r, _ in lg}) == 25 and all(not np.allclose(r, UNKNOWN_RGBA) for _, r, _ in lg)
    named, lg = categorical_colors(np.array(["x", "y"]), {"x": "#ff0000"})
    assert np.allclose(named[0], [1, 0, 0, 1])  # uns['<key>_colors'] honoured
    assert matched_names(["0", "0", "1", "1"], ["L2", "L2", "L1", "L1"]) == {"0": "L2", "1": "L1"}
    assert sorted(["L10", "L2", "L1"], key=natural_key) == ["L1", "L2", "L10"]

    obs = sp.random(300, 5, density=0.3, format="csr", random_state=0, dtype=np.float32)
    rec = rng.normal(size=(300, 7)).astype(np.float32)
    cols_used = np.array([6, 0, 2, 3, 5])
    err = overlays.per_cell_error(sp.csr_matrix(rec), obs, cols_used)
    np.testing.assert_allclose(err, ((rec[:, cols_used] - obs.toarray()) ** 2).mean(1), rtol=1e-5)

    tissue = rng.uniform(0, 50, size=(300, 2))
    plot = overlays.place_beside(overlays.embedding_2d(emb), tissue)
    assert plot[:, 1].min() > tissue[:, 1].max()  # right of the tissue, no overlap
    assert plot[:, 0].min() >= tissue[:, 0].min() - 1e-9 and plot[:, 0].max() <= tissue[:, 0].max() + 1e-9
    flat = overlays.scalar_metrics({"a": 1, "b": {"c": 2.5, "d": "x", "e": float("nan")}, "f": True})
    assert flat == {"a": 1.0, "b.c": 2.5}


def test_settings_file_overridable_and_robust(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "s.json"
    monkeypatch.setenv(ENV_VAR, str(path))
    assert settings_path() == path
    assert load_settings() == {}
    save_settings({"method": "gnn-mask", "train": {"epochs": 3}})
    assert json.loads(path.read_text())["train"]["epochs"] == 3
    assert load_settings()["method"] == "gnn-mask"
    path.write_text("[1, 2")
    assert load_settings() == {}
    monkeypatch.delenv(ENV_VAR)
    assert "napari-spatialssl" in str(settings_path())
