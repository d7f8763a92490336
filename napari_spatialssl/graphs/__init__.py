"""Views of a slide: neighbour graphs, k-hop ego-nets, lattices and patches (all per section)."""

from .egonet import EgoNetBatch, EgoNetSampler
from .lattice import (
    Lattice,
    PatchBatch,
    build_lattice,
    build_lattices,
    centered_origins,
    extract_patches,
    random_origins,
    rasterize,
    sample_patches,
    scatter_to_bins,
    select_channels,
    suggest_bin_size,
    tiled_origins,
)
from .neighbors import CellGraph, estimate_radius_edges, knn_graph, radius_graph, snn_graph

__all__ = [
    "CellGraph", "radius_graph", "knn_graph", "snn_graph", "estimate_radius_edges",
    "EgoNetSampler", "EgoNetBatch",
    "Lattice", "PatchBatch", "rasterize", "build_lattice", "build_lattices", "suggest_bin_size",
    "random_origins", "tiled_origins", "centered_origins", "select_channels", "extract_patches",
    "sample_patches", "scatter_to_bins",
]
