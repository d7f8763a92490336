"""The atlas-scale paths of issue 16 that are not about several devices: the display pyramid and the
point window (every cell drawn, none subsampled), gnn-mask's spatial ego-net steps, and the
approximate k-NN graph of the domain search."""

from __future__ import annotations

import numpy as np
import pytest

from napari_spatialssl.graphs.display_pyramid import (
    PointWindow,
    as_rgba8,
    category_rgba,
    colour_pyramid,
    view_rectangle,
)


def test_pyramid_base_pixels_hold_the_mean_colour_of_their_cells_and_levels_halve():
    rc = np.array([[0.2, 0.2], [0.7, 0.4], [0.5, 2.5], [3.9, 3.9], [3.95, 3.6]])
    colors = np.array([[255, 0, 0, 255], [0, 0, 255, 255], [0, 255, 0, 255], [10, 20, 30, 255], [30, 20, 10, 255]],
                      np.uint8)
    p = colour_pyramid(rc, colors, pixel_size=1.0, smallest=1)
    base = p.levels[0]
    assert base.shape == (4, 4, 4) and p.n_cells == 5 and p.origin == (0.2, 0.2)
    assert base[0, 0].tolist() == [128, 0, 128, 255]  # red and blue share a pixel: their mean
    assert base[0, 2].tolist() == [0, 255, 0, 255]
    assert base[3, 3].tolist() == [20, 20, 20, 255] and base[1, 1, 3] == 0  # empty pixel: transparent
    assert [lv.shape[:2] for lv in p.levels] == [(4, 4), (2, 2), (1, 1)]
    # coarser: coverage-weighted colour, mean coverage
    assert p.levels[1][0, 0].tolist() == [128, 0, 128, 64]
    assert p.levels[1][0, 1].tolist() == [0, 255, 0, 64]
    kw = p.layer_kwargs()
    assert kw["multiscale"] and kw["rgb"] and kw["scale"] == (1.0, 1.0)
    # napari puts pixel i's centre at translate + i * scale: a cell lands in its own pixel
    centre = np.array(kw["translate"]) + np.array([3, 3]) * 1.0
    assert np.all(np.abs(centre - rc[4]) <= 0.5 + 1e-9)


def test_pyramid_uses_every_cell_and_skips_transparent_ones():
    rng = np.random.default_rng(0)
    rc = rng.uniform(0, 1000, size=(200_000, 2))
    codes = rng.integers(-1, 5, size=len(rc))
    colors = category_rgba(codes, [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1]])
    p = colour_pyramid(rc, colors, point_size=4.0, smallest=64)
    assert p.n_cells == int((codes >= 0).sum()) and p.pixel_size == 4.0
    assert max(p.levels[-1].shape[:2]) <= 64 and len(p.levels) == 3
    assert all(b.shape[0] == -(-a.shape[0] // 2) for a, b in zip(p.levels, p.levels[1:]))
    # 2.7 drawn cells per base pixel on average: nearly every pixel covered (Poisson: 93 %)
    assert p.levels[0][..., 3].astype(bool).sum() > 0.9 * 250 * 250


def test_colour_conversion():
    assert as_rgba8(np.array([[1.0, 0.5, 0.0]])).tolist() == [[255, 128, 0, 255]]
    assert category_rgba(np.array([1, -1]), np.array([[0, 0, 0], [1, 1, 1]])).tolist() == \
        [[255, 255, 255, 255], [0, 0, 0, 0]]


def test_point_window_returns_exactly_the_cells_in_view():
    rng = np.random.default_rng(1)
    rc = rng.uniform(0, 100, size=(50_000, 2)).astype(np.float32)
    win = PointWindow(rc)
    rows, cols = (10.0, 30.5), (40.0, 47.0)
    idx = win.query(rows, cols)
    inside = np.flatnonzero((rc[:, 0] >= rows[0]) & (rc[:, 0] <= rows[1]) & (rc[:, 1] >= cols[0]) & (rc[:, 1] <= cols[1]))
    np.testing.assert_array_equal(idx, inside)
    assert win.query(rows, cols, max_points=len(inside) - 1) is None
    assert len(win.query((-50, -10), (0, 10))) == 0 and len(win.query((0, 100), (0, 100))) == len(rc)
    assert win.count_upper_bound(rows, cols) >= len(inside)
    r, c = view_rectangle((50.0, 20.0), zoom=4.0, canvas_size=(400, 800))
    assert r == (0.0, 100.0) and c == (-80.0, 120.0)


def _gnn(slide, **over):
    from napari_spatialssl.models.base import get_method_class
    from napari_spatialssl.pipeline import dataset_from_config, make_config

    cfg = make_config("gnn-mask", {"radius": 40.0, "graph_mode": "egonet", "batch_size": 300, "hidden_dims": [16],
                                   "decoder_hidden": 16, "device": "cpu", "data.section_key": "section", **over})
    m = get_method_class("gnn-mask")(cfg)
    m.prepare(dataset_from_config(slide, cfg))
    return m


@pytest.fixture(scope="module")
def slide():
    from napari_spatialssl.data.synthetic import synthetic_slide

    return synthetic_slide(n_cells=6000, n_genes=20, n_sections=2, n_cell_types=4, n_domains=3, seed=2)


def test_spatial_egonet_steps_cover_every_scorable_cell_once_with_fewer_nodes(slide):
    sp_m = _gnn(slide, egonet_order="spatial")
    rnd_m = _gnn(slide)
    rng = np.random.default_rng(0)
    batches = list(sp_m.train_batches(1, rng))
    assert len(batches) == len(sp_m.train_batches(1, np.random.default_rng(0)))
    centres = np.concatenate([b.what for b in batches])
    np.testing.assert_array_equal(np.sort(centres), np.flatnonzero(sp_m.target_ok))
    assert all(len(np.unique(sp_m.data.section[b.what])) == 1 for b in batches)  # a tile never spans sections
    nodes = lambda m, bs: sum(len(m.view.egonet_sub(b.what).nodes) for b in bs)  # noqa: E731
    rnd = list(rnd_m.train_batches(1, np.random.default_rng(0)))
    assert nodes(sp_m, batches) < 0.6 * nodes(rnd_m, rnd)
    # another epoch, another tiling
    again = list(sp_m.train_batches(2, rng))
    assert not all(np.array_equal(a.what, b.what) for a, b in zip(batches, again))


def test_approximate_knn_path_drops_each_row_itself(monkeypatch):
    """The approximate branch of knn_indices and graph_cluster_search, with pynndescent's index
    replaced by an exact one (pynndescent itself compiles for ~2-3 minutes per process here: its
    agreement with the exact graph is measured in benchmarks/clustering_scale.py instead)."""
    import pynndescent
    from sklearn.metrics import adjusted_rand_score
    from sklearn.neighbors import NearestNeighbors

    from napari_spatialssl.evaluation import clustering as C

    calls = []

    class ExactStandIn:
        def __init__(self, X, n_neighbors, **kw):
            calls.append(kw)
            nb = NearestNeighbors(n_neighbors=n_neighbors).fit(X).kneighbors(X, return_distance=False)
            nb[::7] = np.roll(nb[::7], 1, axis=1)  # self not first on some rows
            nb[1::7, 0] = (nb[1::7, 0] + 1) % len(X)  # and absent on others
            self.neighbor_graph = (nb, None)

    monkeypatch.setattr(pynndescent, "NNDescent", ExactStandIn)
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 6, size=(6, 16))
    X = (centres[rng.integers(0, 6, 3000)] + rng.normal(size=(3000, 16))).astype(np.float32)
    approx = C.knn_indices(X, 10, method="approximate")
    exact = C.knn_indices(X, 10, method="exact")
    assert approx.shape == exact.shape == (3000, 10) and calls and calls[0]["random_state"] == 0
    assert not (approx == np.arange(3000)[:, None]).any()
    la, ia = C.graph_cluster_search(X, 6, knn="approximate")
    le, ie = C.graph_cluster_search(X, 6)  # 3,000 rows: exact under "auto"
    assert ia["knn"] == "approximate" and ie["knn"] == "exact"
    assert adjusted_rand_score(la, le) > 0.95
    monkeypatch.setattr(C, "EXACT_KNN_MAX_CELLS", 1000)
    _, auto = C.graph_cluster_search(X, 6)
    assert auto["knn"] == "approximate" and "n_graph_cells" not in auto  # every row in the graph
