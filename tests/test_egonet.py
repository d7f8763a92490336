"""K-hop ego-net sampler: node sets identical to torch_geometric.utils.k_hop_subgraph."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch_geometric.utils import k_hop_subgraph

from napari_spatialssl.data.io import read_h5ad, section_codes
from napari_spatialssl.data.synthetic import synthetic_coords
from napari_spatialssl.graphs.egonet import EgoNetSampler
from napari_spatialssl.graphs.neighbors import knn_graph, radius_graph


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """k_hop_subgraph is made of many tiny ops: with 2 threads on a busy machine each call is ~50x
    slower (measured), so the reference runs single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _assert_same_as_pyg(graph, centers, num_hops, batch_size=256, precompute=None):
    """Every centre's ego-net node set equals k_hop_subgraph's; the batch subgraph is induced."""
    ei = graph.edge_index()
    sampler = EgoNetSampler(graph, num_hops, precompute=precompute)
    A = graph.to_scipy()
    checked = 0
    for batch in sampler.batches(centers, batch_size):
        assert np.all(np.diff(batch.nodes) > 0)
        np.testing.assert_array_equal(batch.nodes[batch.center_pos], batch.centers)
        for b, c in enumerate(batch.centers):
            ref, _, _, _ = k_hop_subgraph(int(c), num_hops, ei, num_nodes=graph.n_nodes)
            np.testing.assert_array_equal(batch.node_set(b), np.sort(ref.numpy()))
            checked += 1
        # edges: exactly the induced subgraph on the union (local ids, PyG direction)
        sub = A[batch.nodes][:, batch.nodes]
        assert batch.edge_index.shape[1] == sub.nnz
        assert sub[batch.edge_index[1], batch.edge_index[0]].all()
    assert checked == len(centers)


@pytest.mark.parametrize("num_hops", [1, 2, 3])
def test_egonets_equal_k_hop_subgraph_on_real_merfish_every_centre(shared_data, num_hops):
    adata = read_h5ad(shared_data("merfish_hypothalamus_2sections.h5ad"))
    section, _ = section_codes(adata, "section")
    coords = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    keep = np.flatnonzero(section == 0)  # one whole section (~5,600 cells), every cell a centre
    graph = radius_graph(coords[keep], 25.0)
    _assert_same_as_pyg(graph, np.arange(graph.n_nodes), num_hops, batch_size=700)


@pytest.mark.parametrize("precompute", [True, False])
@pytest.mark.parametrize("num_hops", [1, 2, 3])
def test_egonets_equal_k_hop_subgraph_on_synthetic(num_hops, precompute):
    """Both paths: precomputed (A + I)^k rows, and k sparse products per batch."""
    coords, section = synthetic_coords(6000, 3, seed=1)
    graph = radius_graph(coords, 20.0, section)
    centers = np.random.default_rng(num_hops).choice(graph.n_nodes, 300, replace=False)
    _assert_same_as_pyg(graph, centers, num_hops, batch_size=128, precompute=precompute)


def test_directed_graph_follows_pyg_flow():
    coords, _ = synthetic_coords(800, 1, seed=2)
    graph = knn_graph(coords, 3, symmetric=False)
    centers = np.arange(0, 800, 7)
    _assert_same_as_pyg(graph, centers, 2, batch_size=50)


def test_batches_cover_cells_once_and_shuffle_is_seeded():
    coords, section = synthetic_coords(3000, 2, seed=3)
    graph = radius_graph(coords, 20.0, section)
    sampler = EgoNetSampler(graph, 2)
    cells = np.flatnonzero(section == 1)
    seen = np.concatenate([b.centers for b in sampler.batches(cells, 100, shuffle=True,
                                                              rng=np.random.default_rng(0))])
    np.testing.assert_array_equal(np.sort(seen), cells)
    again = np.concatenate([b.centers for b in sampler.batches(cells, 100, shuffle=True,
                                                               rng=np.random.default_rng(0))])
    np.testing.assert_array_equal(seen, again)
    # ego-nets of one section never reach another
    for b in sampler.batches(cells, 500):
        assert (section[b.nodes] == 1).all()
    # auto precomputation: not for single samples, at the first multi-batch pass, within budget
    auto = EgoNetSampler(graph, 2)
    first = auto.sample(cells[:50])
    assert auto._reach is None
    list(auto.batches(cells, 100))
    assert auto._reach is not None
    again = auto.sample(cells[:50])
    np.testing.assert_array_equal(first.nodes, again.nodes)
    assert (first.membership != again.membership).nnz == 0
    tight = EgoNetSampler(graph, 2, max_reach_entries=10)
    list(tight.batches(cells, 100))
    assert tight._reach is None
    zero = EgoNetSampler(graph, 0).sample(cells[:5])
    np.testing.assert_array_equal(zero.nodes, np.sort(cells[:5]))
    with pytest.raises(IndexError):
        sampler.sample(np.array([graph.n_nodes]))
    with pytest.raises(ValueError):
        EgoNetSampler(graph, -1)


def test_gnn_output_of_centre_matches_whole_graph():
    """A k-layer message passing on the batch subgraph gives each centre its whole-graph output."""
    coords, _ = synthetic_coords(2000, 1, seed=4)
    graph = radius_graph(coords, 20.0)
    x = torch.randn(graph.n_nodes, 4, generator=torch.Generator().manual_seed(0))

    def propagate(x, ei, hops):
        for _ in range(hops):
            out = x.clone()
            out.index_add_(0, ei[1], x[ei[0]])
            x = torch.tanh(out)
        return x

    full = propagate(x, graph.edge_index(), 2)
    batch = EgoNetSampler(graph, 2).sample(np.arange(0, 2000, 37))
    local = propagate(x[torch.from_numpy(batch.nodes)], torch.from_numpy(batch.edge_index), 2)
    torch.testing.assert_close(local[torch.from_numpy(batch.center_pos)], full[torch.from_numpy(batch.centers)])
