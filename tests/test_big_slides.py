"""Slides above the point threshold: every cell drawn (an overview image of all of them, the real points
of the cells in view when zoomed in), never a random subsample. The layer data and display rules run
without Qt; the viewer tests (Xvfb) judge what a person sees: the tissue's colours at overview, exactly the
cells inside the view once zoomed in, a result drawn the same way, the main thread held for a short time."""

from __future__ import annotations

import os

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from napari_spatialssl._napari import big_slides as B
from napari_spatialssl._napari import displays as D
from napari_spatialssl._napari import layers as L
from napari_spatialssl._napari.session import Slide

TYPES = ("astro", "neuron", "oligo", "micro")


def _slide(n: int = 60_000, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 6_000, size=(n, 2))
    kind = (xy[:, 0] // 1_500).astype(int) % 4  # four vertical bands, one cell type each
    a = ad.AnnData(sp.random(n, 6, density=0.4, format="csr", dtype=np.float32, random_state=seed),
                   obs=pd.DataFrame({"cell_type": pd.Categorical(np.array(TYPES)[kind])},
                                    index=[f"c{i}" for i in range(n)]))
    a.var_names = [f"g{i}" for i in range(6)]
    a.obsm["spatial"] = xy
    return a


def test_a_huge_slide_keeps_every_cell_as_an_overview_and_points_in_view():
    a = _slide(30_000)
    data, kw, kind = L.adata_to_points(a, max_points=5_000)
    meta = kw["metadata"]
    assert kind == "points" and len(data) == 0 and meta["overview"] and not meta["subsampled"]
    source = meta[B.VIEWPORT]
    assert source.n_points == a.n_obs
    np.testing.assert_array_equal(source.features["cell_index"], np.arange(a.n_obs))
    assert Slide.from_adata(a, max_points=5_000).shown.tolist() == list(range(a.n_obs))
    # the overview: every cell's colour, the four types' colours in its pixels
    image, points = B.with_overviews([(data, kw, kind)])
    assert image[2] == "image" and points[2] == "points" and image[1]["multiscale"]
    base = image[0][0]
    colours = L.category_colors(a, "cell_type")
    for t in TYPES:
        rgb = np.array([int(colours[t][i:i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(base[..., :3].astype(int) - rgb).max(-1) <= 2).sum() > 100, t
    # the points in view: exactly the cells inside a rectangle, with their colours
    rows, cols = (1_000.0, 1_700.0), (2_000.0, 2_900.0)
    idx = source.in_view(rows, cols)
    rc = L.xy_to_rowcol(a.obsm["spatial"])
    inside = np.flatnonzero((rc[:, 0] >= rows[0]) & (rc[:, 0] <= rows[1]) & (rc[:, 1] >= cols[0]) & (rc[:, 1] <= cols[1]))
    np.testing.assert_array_equal(idx, inside)
    values = source.layer_values(idx)
    assert values["features"]["cell_type"].astype(str).tolist() == a.obs["cell_type"].astype(str).to_numpy()[idx].tolist()
    assert len(source.in_view((-1e9, 1e9), (-1e9, 1e9))) == a.n_obs  # under IN_VIEW_MAX_POINTS: all drawn
    source.max_points = 1_000
    assert len(source.in_view((-1e9, 1e9), (-1e9, 1e9))) == 0  # more than that in view: the image shows them
    # below the threshold nothing changes
    data, kw, _ = L.adata_to_points(a)
    assert len(data) == a.n_obs and not kw["metadata"]["overview"] and B.VIEWPORT not in kw["metadata"]


def test_fit_display_draws_big_layers_as_overview_and_points_in_view():
    a = _slide(12_000)
    slide = Slide.from_adata(a)
    values = np.asarray(a.obsm["spatial"][:, 0])
    rgba, _ = D.continuous_colors(values, "magma")
    big = D.points_spec("measured", "g0 measured", slide.positions, rgba, slide.point_size, slide.shown,
                        extra={"g0": values})
    small = D.points_spec("selection", "selected", slide.positions[:10], rgba[:10], 1.0, np.arange(10), role="selection")
    display = B.fit_display(D.Display([big, small], top="measured"), limit=10_000)
    kinds = [(s.key, s.kind) for s in display.specs]
    assert kinds == [("measured:overview", "image"), ("measured", "points"), ("selection", "points")]
    image, points, kept = display.specs
    assert image.role == "result" and image.style["multiscale"] and "12,000 cells" in image.name
    assert len(points.data) == 0 and points.metadata[B.VIEWPORT].n_points == 12_000
    assert kept is small and display.top == "measured"
    src = points.metadata[B.VIEWPORT]
    idx = src.in_view((0.0, 800.0), (0.0, 800.0))
    got = src.layer_values(idx)
    np.testing.assert_allclose(got["face_color"], rgba[idx])
    np.testing.assert_allclose(got["features"]["g0"], values[idx])
    # a panel layer (translated copies of the tissue) keeps its offset in the overview
    shifted = D.points_spec("compare", "panels", slide.positions, rgba, slide.point_size, slide.shown,
                            translate=(0.0, 500.0))
    over = B.fit_display(D.Display([shifted]), limit=10_000).specs[0]
    plain = B.fit_display(D.Display([big]), limit=10_000).specs[0]
    assert over.style["translate"][1] == pytest.approx(plain.style["translate"][1] + 500.0)


def test_categorical_colours_are_per_label_not_per_cell():
    values = np.array(["L10", "L2", None, "Excluded", "L2"] * 1000, dtype=object)
    rgba, legend = D.categorical_colors(values)
    assert [lab for lab, _, _ in legend] == ["Excluded", "L2", "L10"]
    assert dict((lab, c) for lab, _, c in legend) == {"Excluded": 1000, "L2": 2000, "L10": 1000}
    np.testing.assert_allclose(rgba[2], D.UNKNOWN_RGBA)


# -- in the viewer --------------------------------------------------------------------------------------

viewer_only = pytest.mark.skipif(not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")),
                                 reason="no display: run under Xvfb (make test / xvfb-run -a pytest)")


def _colours_on_screen(shot: np.ndarray, colours: dict, tol: int = 8, min_pixels: int = 30) -> set:
    rgb = shot[..., :3].reshape(-1, 3).astype(np.int32)
    found = set()
    for name, hexcol in colours.items():
        c = np.array([int(hexcol[i:i + 2], 16) for i in (1, 3, 5)])
        if (np.abs(rgb - c).max(axis=1) <= tol).sum() >= min_pixels:
            found.add(name)
    return found


@viewer_only
@pytest.mark.viewer
def test_a_huge_slide_in_napari_overview_then_the_cells_in_view(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    pytest.importorskip("napari")
    from napari.layers import Layer

    from napari_spatialssl._napari.reader import read_slide
    from napari_spatialssl._napari.widget import SpatialSSLWidget
    from napari_spatialssl._napari.workers import SYNC_ENV

    monkeypatch.setenv(SYNC_ENV, "1")
    monkeypatch.setattr(B, "OVERVIEW_ABOVE_POINTS", 20_000)
    a = _slide(60_000)
    path = tmp_path / "huge.h5ad"
    a.write_h5ad(path)
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1400, 900)
    for layer_data in B.with_overviews([read_slide(path, max_points=20_000)]):
        viewer.add_layer(Layer.create(*layer_data))
    widget = SpatialSSLWidget(viewer)
    viewer.window.add_dock_widget(widget, name="ssl", area="right")
    qtbot.wait(300)
    slide_layer = viewer.layers["huge"]
    overview = viewer.layers["huge (overview of all 60,000 cells)"]
    assert list(viewer.layers).index(overview) < list(viewer.layers).index(slide_layer)
    assert widget.session.slide is not None and len(widget.session.slide.shown) == 60_000
    viewer.reset_view()
    qtbot.wait(400)
    assert len(slide_layer.data) == 0  # 60,000 cells in view: the image shows them
    colours = L.category_colors(a, "cell_type")
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert _colours_on_screen(shot, colours) == set(TYPES)
    if os.environ.get("SPATIALSSL_DEBUG_SHOTS"):
        from imageio.v3 import imwrite

        imwrite(f"{os.environ['SPATIALSSL_DEBUG_SHOTS']}/huge_overview.png", shot)

    # zoomed in: the real points of exactly the cells in view, each in its type's colour
    cam = viewer.scene.camera if hasattr(getattr(viewer, "scene", None), "camera") else viewer.camera
    cam.zoom = cam.zoom * 6
    cam.center = (0.0, 2_000.0, 2_500.0)[-len(cam.center):]
    qtbot.waitUntil(lambda: len(slide_layer.data) > 0, timeout=3_000)
    bridge = widget.bridge
    rows, cols = bridge.viewport.view()
    pos = widget.session.slide.positions
    inside = np.flatnonzero((pos[:, 0] >= rows[0]) & (pos[:, 0] <= rows[1]) & (pos[:, 1] >= cols[0]) & (pos[:, 1] <= cols[1]))
    np.testing.assert_array_equal(np.sort(slide_layer.features["cell_index"].to_numpy()), inside)
    assert not overview.visible  # the cells themselves, not the image's square pixels
    assert bridge.viewport.last_refresh_ms < 150, f"the refresh held the main thread {bridge.viewport.last_refresh_ms:.0f} ms"
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert len(_colours_on_screen(shot, colours)) >= 1
    if os.environ.get("SPATIALSSL_DEBUG_SHOTS"):
        from imageio.v3 import imwrite

        imwrite(f"{os.environ['SPATIALSSL_DEBUG_SHOTS']}/huge_zoomed.png", shot)

    # a gene over every cell: an overview image of its values on top, its points in view above it
    widget.session.show_gene("g0")
    qtbot.waitUntil(lambda: any("overview of 60,000 cells" in lay.name for lay in viewer.layers), timeout=10_000)
    qtbot.wait(300)
    gene_image = next(lay for lay in viewer.layers if "overview of 60,000 cells" in lay.name)
    gene_points = next(lay for lay in viewer.layers if lay.metadata.get(B.VIEWPORT) is not None and lay is not slide_layer)
    order = list(viewer.layers)
    assert order.index(slide_layer) < order.index(gene_image) < order.index(gene_points)
    qtbot.waitUntil(lambda: len(gene_points.data) > 0, timeout=3_000)
    assert gene_points.visible and len(gene_points.data) == len(inside) and not gene_image.visible
    if os.environ.get("SPATIALSSL_DEBUG_SHOTS"):
        from imageio.v3 import imwrite

        imwrite(f"{os.environ['SPATIALSSL_DEBUG_SHOTS']}/huge_gene_zoomed.png", viewer.screenshot(flash=False))
    viewer.reset_view()  # zoomed out again: no points, the overview images
    qtbot.waitUntil(lambda: len(gene_points.data) == 0 and gene_image.visible, timeout=3_000)
    if os.environ.get("SPATIALSSL_DEBUG_SHOTS"):
        from imageio.v3 import imwrite

        imwrite(f"{os.environ['SPATIALSSL_DEBUG_SHOTS']}/huge_gene_overview.png", viewer.screenshot(flash=False))



def test_saving_a_huge_slide_layer_writes_every_cell(tmp_path):
    """napari's Save on the slide layer of a huge slide (which holds only the cells in view) writes every
    cell of the slide, not the few on screen."""
    import anndata as ad_

    from napari_spatialssl._napari.writer import write_points

    a = _slide(8_000)
    data, kw, _ = L.adata_to_points(a, max_points=1_000)
    assert len(data) == 0
    out = write_points(str(tmp_path / "all.h5ad"), data, {"features": kw["features"], "metadata": kw["metadata"]})
    back = ad_.read_h5ad(out[0])
    assert back.n_obs == a.n_obs and list(back.obs_names) == list(a.obs_names)
    assert back.obs["cell_type"].astype(str).tolist() == a.obs["cell_type"].astype(str).tolist()
