"""The reader, sample data and writer contributions inside a real napari viewer (run under Xvfb).

Screenshots need an OpenGL canvas on an X display (``make test`` / scripts/run_tests.sh start Xvfb);
without a display these tests are skipped, since Qt would abort the process.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
    pytest.skip("no display: run under Xvfb (make test / xvfb-run -a pytest)", allow_module_level=True)

napari = pytest.importorskip("napari")

from napari_spatialssl._napari import genes as G  # noqa: E402
from napari_spatialssl._napari import layers as L  # noqa: E402
from napari_spatialssl._napari.sample_data import sample_path  # noqa: E402

pytestmark = pytest.mark.viewer

SAMPLES = {"osmfish": ("osmfish_cortex", 6471, 1), "starmap": ("starmap_mpfc", 3190, 3)}


def _hex_to_rgb(h: str) -> np.ndarray:
    h = h.lstrip("#")
    return np.array([int(h[i:i + 2], 16) for i in (0, 2, 4)])


def _category_colours_in(shot: np.ndarray, colours: dict[str, str], tol: int = 6) -> set[str]:
    """Categories whose exact colour appears (within ``tol``) in some pixels of the screenshot."""
    rgb = shot[..., :3].reshape(-1, 3).astype(np.int32)
    rgb = rgb[rgb.max(axis=1) > 16]  # non-background pixels
    found = set()
    for cat, hexcol in colours.items():
        if (np.abs(rgb - _hex_to_rgb(hexcol)).max(axis=1) <= tol).sum() >= 5:
            found.add(cat)
    return found


@pytest.mark.parametrize("sample", sorted(SAMPLES))
def test_open_sample_file_renders_tissue(make_napari_viewer, sample):
    key, n_cells, n_sections = SAMPLES[sample]
    viewer = make_napari_viewer(show=True)  # shown: the OpenGL canvas only draws when visible
    layers = viewer.open(str(sample_path(sample)), plugin="napari-spatialssl")
    assert len(layers) == 1
    layer = layers[0]
    assert layer._type_string == "points" and len(layer.data) == n_cells
    assert layer.metadata["adata"].n_obs == n_cells
    assert len(layer.metadata["section_names"]) == n_sections
    feats = layer.features
    assert isinstance(feats["cell_type"].dtype, pd.CategoricalDtype)
    assert len(feats) == n_cells and "cell_index" in feats

    # colours: every point has its category's colour
    cmap = L.category_colors(layer.metadata["adata"], "cell_type")
    expected = np.array([_hex_to_rgb(cmap[str(c)]) for c in feats["cell_type"]]) / 255
    np.testing.assert_allclose(layer.face_color[:, :3], expected, atol=1e-6)
    assert len(np.unique(layer.face_color, axis=0)) >= 10

    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)
    tissue = (shot[..., :3].max(axis=-1) > 16).mean()
    assert tissue > 0.01, f"screenshot is (nearly) blank: {tissue:.2%} non-background pixels"
    found = _category_colours_in(shot, cmap)
    assert len(found) >= 8, f"only {len(found)} category colours visible: {sorted(found)}"


def test_sample_data_contributions(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-spatialssl", "starmap_mpfc")
    viewer.open_sample("napari-spatialssl", "osmfish_cortex")
    assert [len(layer.data) for layer in viewer.layers] == [3190, 6471]


def test_bad_file_is_a_clear_error_and_keeps_layers(make_napari_viewer, tmp_path):
    from napari.errors import ReaderPluginError

    from napari_spatialssl.data.io import SpatialDataError

    viewer = make_napari_viewer()
    viewer.open_sample("napari-spatialssl", "osmfish_cortex")
    bad = tmp_path / "broken.h5ad"
    bad.write_text("not hdf5")
    for plugin in ("napari-spatialssl", None):  # chosen explicitly, and found by its *.h5ad pattern
        with pytest.raises((ReaderPluginError, SpatialDataError)) as info:
            viewer.open(str(bad), plugin=plugin)
        err = info.value
        assert "not an HDF5 file" in f"{err} {err.__cause__}"
    assert len(viewer.layers) == 1 and len(viewer.layers[0].data) == 6471


def test_colour_by_gene_feature_and_gene_image(make_napari_viewer):
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(sample_path("starmap")), plugin="napari-spatialssl")
    adata = layer.metadata["adata"]
    gene = str(adata.var_names[np.argmax(np.asarray((adata.X > 0).sum(axis=0)).ravel())])
    col = G.color_by_gene(layer, gene)
    values = layer.features[col].to_numpy()
    np.testing.assert_allclose(values, G.gene_expression(adata, [gene])[:, 0], rtol=1e-5)
    lo, hi = layer.face_contrast_limits
    assert lo < hi <= values.max() + 1e-6
    assert len(np.unique(layer.face_color, axis=0)) > 20  # a colormap, not one colour

    G.color_by_feature(layer, "layer")  # the manual cortical layer annotation
    assert len(np.unique(layer.face_color, axis=0)) == adata.obs["layer"].nunique()

    genes = [str(g) for g in adata.var_names[:2]]
    for data, kwargs, kind in G.gene_image_layers(layer, genes, bin_size=200.0):
        img = viewer.add_image(data, **{k: v for k, v in kwargs.items() if k != "metadata"})
        assert img.data.shape[0] > 5 and img.data.max() > 0
        # the image covers the points (same layout, same units): the first and last bin centres lie
        # within half a bin (100) of the points' extremes
        lo_pts, hi_pts = layer.data.min(0), layer.data.max(0)
        ext = img.extent.world  # pixel centres
        assert np.all(np.abs(ext[0] - 100.0 - lo_pts) <= 1e-2), (ext, lo_pts)
        assert np.all(ext[1] + 100.0 >= hi_pts) and np.all(ext[1] - 100.0 <= hi_pts), (ext, hi_pts)


def test_writer_contribution(make_napari_viewer, tmp_path):
    import anndata as ad

    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(sample_path("starmap")), plugin="napari-spatialssl")
    features = layer.features.copy()
    features["my_result"] = pd.Categorical(np.where(np.arange(len(layer.data)) % 3, "x", "y"))
    layer.features = features
    layer.selected_data = set(range(100))
    layer.remove_selected()
    out = tmp_path / "annotated.h5ad"
    written = viewer.layers.save(str(out), selected=False, plugin="napari-spatialssl")
    assert written == [str(out)]
    b = ad.read_h5ad(out)
    assert b.n_obs == 3090 and "my_result" in b.obs and b.n_vars == 166
    np.testing.assert_array_equal(b.obsm["spatial"], layer.metadata["adata"].obsm["spatial"][100:])
    csv = tmp_path / "annotated.csv"
    layer.save(str(csv), plugin="napari-spatialssl")
    assert pd.read_csv(csv).shape[0] == 3090
