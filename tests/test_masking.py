"""Mask strategies: seeded, boolean, the right amount, on real slides."""

from __future__ import annotations

import numpy as np
import pytest

from napari_spatialssl.data.io import SpatialDataError, label_codes, read_h5ad, section_codes
from napari_spatialssl.graphs.neighbors import radius_graph
from napari_spatialssl.masking import (
    MaskConfig,
    cell_types,
    draw_cell_mask,
    draw_gene_mask,
    draw_patch_mask,
    gene_channels,
    niches,
    random_cells,
    regions,
)


def _merfish(shared_data):
    adata = read_h5ad(shared_data("merfish_hypothalamus_2sections.h5ad"))
    section, _ = section_codes(adata, "section")
    labels, names = label_codes(adata, "Cell_class", ignore=["Ambiguous"])
    graph = radius_graph(np.asarray(adata.obsm["spatial"], dtype=np.float64), 25.0, section)
    return graph, labels, names, section


def test_random_cells_default_twenty_percent_and_seeded():
    m = draw_cell_mask(MaskConfig(), 10_000, np.random.default_rng(0))
    assert m.dtype == bool and m.shape == (10_000,) and m.sum() == 2000
    np.testing.assert_array_equal(m, draw_cell_mask(MaskConfig(), 10_000, np.random.default_rng(0)))
    assert (m != draw_cell_mask(MaskConfig(), 10_000, np.random.default_rng(1))).any()
    assert random_cells(3, 0.01, np.random.default_rng(0)).sum() == 1  # at least one cell


def test_cell_type_masks_on_real_labels(shared_data):
    _, labels, names, _ = _merfish(shared_data)
    chosen = ["Astrocyte", "Microglia"]
    m = draw_cell_mask(MaskConfig(strategy="cell_types", cell_types=chosen), len(labels),
                       np.random.default_rng(0), labels=labels, label_names=names)
    codes = [names.index(c) for c in chosen]
    np.testing.assert_array_equal(m, np.isin(labels, codes))
    assert 0 < m.sum() < len(m) and not m[labels < 0].any()  # unlabelled ("Ambiguous") never masked
    with pytest.raises(SpatialDataError, match="not among"):
        cell_types(labels, names, ["Dragon"])
    with pytest.raises(SpatialDataError, match="label key"):
        draw_cell_mask(MaskConfig(strategy="cell_types", cell_types=chosen), len(labels), np.random.default_rng(0))


@pytest.mark.parametrize("hops", [1, 2])
def test_niches_on_real_graph(shared_data, hops):
    graph, _, _, section = _merfish(shared_data)
    A = graph.to_scipy()
    cfg = MaskConfig(strategy="niches", ratio=0.2, niche_hops=hops)
    m = draw_cell_mask(cfg, graph.n_nodes, np.random.default_rng(3), adjacency=A)
    assert m.dtype == bool
    assert 0.2 <= m.mean() <= 0.23  # about the asked fraction, overshoot at most ~one niche per round
    np.testing.assert_array_equal(m, niches(A, 0.2, hops, np.random.default_rng(3)))
    # niches are spatially clustered: a masked cell's neighbours are masked far more often than 20%
    rows = np.repeat(np.arange(graph.n_nodes), graph.degrees())
    assert m[graph.indices[m[rows]]].mean() > 0.5
    rnd = random_cells(graph.n_nodes, 0.2, np.random.default_rng(3))
    assert m[graph.indices[m[rows]]].mean() > 2 * rnd[graph.indices[rnd[rows]]].mean()
    with pytest.raises(SpatialDataError, match="neighbour graph"):
        draw_cell_mask(cfg, graph.n_nodes, np.random.default_rng(0))


def test_regions_in_patches():
    rng = np.random.default_rng(0)
    m = regions((16, 12), 4, 1, rng)
    assert m.shape == (16, 12) and m.sum() == 16
    r, c = np.nonzero(m)
    assert r.max() - r.min() == 3 and c.max() - c.min() == 3  # one 4 x 4 square
    b = draw_patch_mask(MaskConfig(strategy="regions", region_size=3, n_regions=2), 50, (8, 8),
                        np.random.default_rng(1))
    assert b.shape == (50, 8, 8) and b.dtype == bool
    assert ((b.sum((1, 2)) >= 9) & (b.sum((1, 2)) <= 18)).all()
    np.testing.assert_array_equal(b, draw_patch_mask(MaskConfig(strategy="regions", region_size=3, n_regions=2),
                                                     50, (8, 8), np.random.default_rng(1)))
    with pytest.raises(SpatialDataError, match="larger than the patch"):
        regions((4, 4), 5, 1, rng)


def test_gene_channel_masks():
    rng = np.random.default_rng(0)
    m = gene_channels(2000, 50, 0.3, rng)
    assert m.shape == (2000, 50) and m.dtype == bool and abs(m.mean() - 0.3) < 0.01
    e = gene_channels(100, 50, 0.3, rng, exact=True)
    assert (e.sum(1) == 15).all()
    g = draw_gene_mask(MaskConfig(strategy="gene_channels", ratio=0.1), 10, 20, np.random.default_rng(5))
    np.testing.assert_array_equal(g, draw_gene_mask(MaskConfig(strategy="gene_channels", ratio=0.1), 10, 20,
                                                    np.random.default_rng(5)))


def test_config_validation():
    with pytest.raises(SpatialDataError, match="unknown"):
        MaskConfig(strategy="everything").validate()
    with pytest.raises(SpatialDataError, match="between 0 and 1"):
        MaskConfig(ratio=1.5).validate()
    with pytest.raises(SpatialDataError, match="region_size"):
        MaskConfig(strategy="regions", region_size=0).validate()
    with pytest.raises(SpatialDataError, match="per-cell"):
        draw_cell_mask(MaskConfig(strategy="regions"), 10, np.random.default_rng(0))


def test_patch_and_gene_masks_on_real_merfish_views(shared_data):
    from napari_spatialssl.data.dataset import SpatialDataset
    from napari_spatialssl.graphs.lattice import build_lattices, random_origins, sample_patches

    adata = read_h5ad(shared_data("merfish_hypothalamus_2sections.h5ad"))
    data = SpatialDataset.from_anndata(adata, section_key="section")
    lat = build_lattices(data, 20.0)[0]
    rng = np.random.default_rng(0)
    batch = sample_patches(lat, random_origins(lat, 64, 16, 16, 0.5, rng), 16, 16, 32, rng)
    cfg = MaskConfig(strategy="regions", region_size=6, n_regions=2)
    m = draw_patch_mask(cfg, len(batch), (16, 16), rng)
    assert m.shape == batch.occupancy.shape
    hidden = np.where(m[..., None], 0.0, batch.values)  # what a model would see
    assert (hidden[m] == 0).all() and np.array_equal(hidden[~m], batch.values[~m])
    assert (m & batch.occupancy).sum() > 0  # squares fall on tissue
    g = draw_gene_mask(MaskConfig(strategy="gene_channels", ratio=0.25), data.n_cells, data.n_genes, rng)
    assert g.shape == (data.n_cells, data.n_genes) and abs(g.mean() - 0.25) < 0.01
    r = draw_cell_mask(MaskConfig(), data.n_cells, rng)
    assert r.sum() == round(0.2 * data.n_cells)
    for s in range(data.n_sections):  # a uniform 20% in each section, roughly
        assert abs(r[data.section == s].mean() - 0.2) < 0.03
