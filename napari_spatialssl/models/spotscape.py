"""Spotscape (Oh et al., ICML 2025): global-context representation learning for spatial domains.

Re-implemented from the paper's description on the shared Trainer and SNN graph:

- input: per-cell normalise-total + log1p on highly variable genes (5,000 by default, seurat_v3 on
  counts; with several slices the genes are chosen batch-aware, one HVG ranking per slice merged
  by scanpy's ``batch_key``); the spatial nearest-neighbour (SNN) graph of each slice (k nearest,
  then a radius cutoff; never an edge between slices);
- two augmented views per step (edge dropout, gene-channel masking), one GCN encoder shared by
  both (256 -> 64 with batch norm) and an MLP decoder;
- losses: reconstruction of the un-augmented expression from each view + the similarity
  telescope mean((S - S^T)^2) over all spot pairs (computed exactly without the N x N matrix, see
  :mod:`.losses`); with several slices, from ``proto_start_epoch`` on, prototypical contrast
  against k-means centroids at several granularities (k-means runs on the training device), and
  similarity-scale matching when ``lambda_scale`` > 0 (off by default: it lowered ARI on the
  DLPFC tuning pair);
- domains: k-means with K given (the published protocol), else Leiden with a resolution search
  (or a GMM chosen by BIC), on the L2-normalised embeddings by default (``embedding_postprocess``);
  optional smoothing over the SNN graph, reported separately.

One training step = one full-batch pass over every spot of every slice (the telescope and
scale losses are global). Memory is linear in N: ~(2 views x (hidden + genes)) floats per spot.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import DataConfig, EvalConfig, TrainConfig, validate_config
from ..data.dataset import PreprocessConfig, SpatialDataset
from ..data.io import SpatialDataError
from ..graphs.neighbors import CellGraph, snn_graph
from .base import MethodResults, SSLMethod, register
from .losses import (
    prototype_contrast_loss,
    prototype_counts,
    similarity_scale_loss,
    similarity_telescope_loss,
    torch_kmeans,
)

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

EMBEDDING_POSTPROCESS = ("none", "l2", "standardize", "pca")
# Spots x genes up to which a training step runs on one CPU thread (Spotscape.cpu_threads); 0 = never
SMALL_STEP_WORK = 2**25


def postprocess_embedding(emb: np.ndarray, how: str = "none", seed: int = 0, pca_dims: int = 20) -> np.ndarray:
    """The embeddings as clustered: `none` (as they are), `l2` (each row scaled to unit length:
    the geometry the telescope loss shapes, which works on cosine similarities), `standardize`
    (each dimension to zero mean / unit variance) or `pca` (centred, first `pca_dims` principal
    components). None means "none". Returns float32; vectorised (no per-spot loop)."""
    how = "none" if how is None else how
    if how not in EMBEDDING_POSTPROCESS:
        raise SpatialDataError(f"spotscape: embedding post-processing {how!r}; choose one of {EMBEDDING_POSTPROCESS}.")
    x = np.asarray(emb, np.float64)
    if how == "l2":
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        x = x / np.maximum(norm, 1e-12)
    elif how == "standardize":
        sd = x.std(0, keepdims=True)
        x = (x - x.mean(0, keepdims=True)) / np.where(sd > 0, sd, 1.0)
    elif how == "pca":
        x = x - x.mean(0, keepdims=True)
        k = max(1, min(int(pca_dims), x.shape[1], x.shape[0]))
        _, _, vt = np.linalg.svd(x, full_matrices=False)  # d x d work: d is the embedding width
        x = x @ vt[:k].T
    return x.astype(np.float32)


def _spotscape_preprocess() -> PreprocessConfig:
    return PreprocessConfig(n_top_genes=5000, hvg_flavor="seurat_v3")


@dataclass
class SpotscapeConfig(TrainConfig):
    """Spotscape settings. Distances (radius) are in the coordinates' units.

    Graph: ``k_neighbors`` nearest spots of the same slice, cut at ``radius``; ``radius=None``
    means ``radius_factor`` x the median distance to the ``target_degree``-th nearest spot (per
    slice, then the median over slices). On a Visium lattice that keeps exactly the 6 first-ring
    neighbours whatever the unit (DLPFC ``obsm['spatial']`` array units, or full-resolution
    pixels where it is ~150 px as in the paper); on cell-resolution data a median degree of ~6.
    """

    # Chosen on the DLPFC tuning slices 151674 / 151675 only (benchmarks/spotscape_tune.py and
    # benchmarks/spotscape.md); the paper uses 1,000 epochs at 1e-4 (5e-4 with several slices),
    # which was not better on 151675 (L2 ARI 0.490 at 1,000 epochs vs 0.519 here).
    epochs: int = 200
    lr: float = 3e-4
    weight_decay: float = 1e-4
    data: DataConfig = field(default_factory=lambda: DataConfig(preprocess=_spotscape_preprocess()))
    eval: EvalConfig = field(default_factory=EvalConfig)
    # graph
    k_neighbors: int = 50
    radius: float | None = None
    radius_factor: float = 1.1
    target_degree: int = 6
    # model
    hidden_dims: list[int] = field(default_factory=lambda: [256, 64])
    batch_norm: bool = True
    activate_embedding: bool = True  # ReLU after the last GCN layer's batch norm too
    # augmentations (per view)
    edge_drop: float = 0.2
    feature_mask: float = 0.2
    rescale_masked: bool = True  # divide kept channels by (1 - feature_mask), so eval inputs match
    # loss weights
    lambda_recon: float = 0.1
    # Spots whose reconstruction is scored per view and step (a fresh random draw each time: an
    # unbiased estimate of the all-spot MSE; the decoder is ~90% of a step's cost at 5,000 genes).
    # None = every spot.
    recon_spots: int | None = 1024
    lambda_telescope: float = 1.0
    # Several slices only. Similarity-scale matching (earlier default weight 1): off by default,
    # chosen on the 151674 + 151675 pair (L2 ARI at 200 epochs, seeds 0 / 1: weight 0 0.487 / 0.482,
    # 0.1 with scale_detach_own 0.486 / 0.475, 1 with it 0.443 (seed 0), 1 without it 0.369 (seed 0);
    # benchmarks/spotscape.md). Set > 0 to use it.
    lambda_scale: float = 0.0
    # Several slices only: prototypical contrast from proto_start_epoch. On the 151674 + 151675 pair
    # (joint L2 ARI at 200 epochs, seeds 0 / 1): 0.01 0.487 / 0.482, 0 0.478 / 0.478, 0.1 0.444 / 0.407.
    lambda_proto: float = 0.01
    scale_top_k: int = 5
    # True: a spot's within-slice top-k similarity is the target of the scale matching (no
    # gradient through it), so the loss only raises the inter-slice similarities towards it;
    # False (the earlier form): both sides move, so it can also lower within-slice similarities.
    # True was better on the tuning pair at weight 1 and 0.1. Only used when lambda_scale > 0.
    scale_detach_own: bool = True
    scale_block_size: int = 4096
    # Anchor spots per step for the scale matching (random draw; each is compared with every spot
    # of every slice). Exact over all spots costs N^2 d per step; anchors make it anchors x N x d.
    # None = every spot.
    scale_anchor_spots: int | None = 2048
    proto_start_epoch: int | None = None  # None = half of the epochs (paper: 500 of 1000)
    proto_granularity: list[float] = field(default_factory=lambda: [1.0, 1.5, 2.0])
    proto_k: int | None = None  # None = eval.n_domains, else 10
    proto_tau: float = 0.75
    kmeans_iters: int = 20
    # domains (how they are clustered: eval.domain_method, the same for every method)
    RENAMED_FIELDS = {"domain_method": "eval.domain_method"}  # moved to EvalConfig (older model folders)
    # What the domain clustering sees (see postprocess_embedding): "l2" = unit-length rows, the
    # cosine geometry the telescope loss shapes (chosen on 151674 / 151675); "none" = raw.
    embedding_postprocess: str = "l2"
    smooth_domains: bool = True  # also report labels smoothed over the SNN graph (separately)
    eval_masked_genes: float = 0.2  # fraction of genes hidden for the masked-reconstruction figure

    FIELD_DOCS = {
        "k_neighbors": "Each spot's graph neighbours: at most this many nearest spots of its slice.",
        "radius": "...within this distance (slide units); empty = radius_factor x the median distance to the "
                  "target_degree-th nearest spot (about 6 neighbours on Visium in any unit).",
        "radius_factor": "When the radius is empty: the multiple of the typical neighbour distance.",
        "target_degree": "When the radius is empty: the neighbour rank whose median distance sets it.",
        "hidden_dims": "Widths of the GCN encoder's layers; the last is the embedding's size.",
        "batch_norm": "Batch normalisation after each layer.",
        "activate_embedding": "ReLU after the last layer too.",
        "edge_drop": "Share of edges dropped in each augmented view.",
        "feature_mask": "Share of genes hidden from every spot in each augmented view.",
        "rescale_masked": "Divide the kept genes by (1 - feature_mask), as dropout does.",
        "lambda_recon": "Weight of the expression reconstruction loss.",
        "recon_spots": "Spots whose reconstruction is scored per view and step (empty = all).",
        "lambda_telescope": "Weight of the similarity telescope (the two views' similarities must agree).",
        "lambda_scale": "Several slices: weight of similarity-scale matching (0 = off).",
        "lambda_proto": "Several slices: weight of the prototypical contrast.",
        "scale_top_k": "Similarity-scale matching: neighbours per spot it matches.",
        "scale_detach_own": "Similarity-scale matching: a spot's own-slice similarities are the fixed target.",
        "scale_block_size": "Rows per block of the similarity-scale computation (memory).",
        "scale_anchor_spots": "Anchor spots per step of the similarity-scale matching (empty = all).",
        "proto_start_epoch": "Epoch the prototypical contrast starts (empty = half of the epochs).",
        "proto_granularity": "Numbers of prototypes, as multiples of K.",
        "proto_k": "Base number of prototypes (empty = K, else 10).",
        "proto_tau": "Temperature of the prototypical contrast.",
        "kmeans_iters": "k-means iterations for the prototypes.",
        "embedding_postprocess": "What domain clustering sees: l2 (unit-length embeddings), none, standardize, pca.",
        "smooth_domains": "Also report domains smoothed over the graph (a separate column).",
        "eval_masked_genes": "Share of genes hidden for the masked-reconstruction score.",
    }
    PANELS = {"view": ("k_neighbors", "radius", "hidden_dims"),
              "train": ("epochs", "lr", "seed", "device", "eval.n_domains", "eval.domain_method"),
              "mask": ("edge_drop", "feature_mask")}

    def validate(self) -> None:
        """Cross-field rules and choices (types and ranges: config.validate_config)."""
        self.eval.validate()
        if not self.hidden_dims:
            raise SpatialDataError("spotscape: hidden_dims needs at least one layer size, e.g. [256, 64].")
        if self.embedding_postprocess not in EMBEDDING_POSTPROCESS:
            raise SpatialDataError(f"spotscape: embedding_postprocess {self.embedding_postprocess!r}; "
                                   f"choose one of {EMBEDDING_POSTPROCESS}.")


class _SpMM(torch.autograd.Function):
    """sparse @ dense with a precomputed transpose for the backward pass (no CSR transpose per step;
    the normalised adjacency is symmetric, so it is its own transpose)."""

    @staticmethod
    def forward(ctx, a, a_t, dense):
        ctx.a_t = a_t
        return torch.sparse.mm(a, dense)

    @staticmethod
    def backward(ctx, grad):
        return None, None, torch.sparse.mm(ctx.a_t, grad.contiguous())


@dataclass
class SparseInput:
    """Expression as CSR plus its transpose (CSR of X^T), both on the device."""

    csr: torch.Tensor
    csr_t: torch.Tensor

    @property
    def shape(self):
        return self.csr.shape

    def matmul(self, w: torch.Tensor) -> torch.Tensor:
        return _SpMM.apply(self.csr, self.csr_t, w)


class GCNLayer(nn.Module):
    """x' = D^-1/2 (A + I) D^-1/2 x W (Kipf & Welling), propagation as a sparse CSR product."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x, adj: "NormAdj", input_mask: torch.Tensor | None = None):
        w = self.lin.weight.T  # (d_in, d_out)
        if input_mask is not None:  # masking input channels == zeroing rows of W (works for sparse x)
            w = w * input_mask[:, None]
        h = x.matmul(w) if isinstance(x, SparseInput) else x @ w
        return adj.propagate(h) + self.lin.bias


@dataclass
class NormAdj:
    """Symmetric-normalised adjacency with self loops, kept as CSR (A part) + diagonal (self part)."""

    csr: torch.Tensor
    self_weight: torch.Tensor  # (N,) = 1 / (deg + 1)

    def propagate(self, h: torch.Tensor) -> torch.Tensor:
        out = _SpMM.apply(self.csr, self.csr, h) if self.csr._nnz() else torch.zeros_like(h)
        return out + h * self.self_weight[:, None].to(h.dtype)


class SpotscapeModel(nn.Module):
    """GCN encoder (d_in -> hidden_dims...; each layer GCN -> batch norm -> ReLU, the embedding
    layer included when `activate_embedding`) and an MLP decoder (hidden layers Linear -> batch
    norm -> ReLU, then Linear to the genes)."""

    def __init__(self, n_genes: int, hidden_dims: list[int], batch_norm: bool = True,
                 activate_embedding: bool = True):
        super().__init__()
        dims = [n_genes, *[int(d) for d in hidden_dims]]
        self.convs = nn.ModuleList(GCNLayer(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.norms = nn.ModuleList(nn.BatchNorm1d(b) if batch_norm else nn.Identity() for b in dims[1:])
        self.n_act = len(self.convs) if activate_embedding else len(self.convs) - 1
        rev = dims[::-1]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(rev[:-1], rev[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(rev) - 2:
                layers += [nn.BatchNorm1d(b) if batch_norm else nn.Identity(), nn.ReLU()]
        self.decoder = nn.Sequential(*layers)

    def encode(self, x, adj: NormAdj, input_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = x
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            h = conv(h, adj, input_mask if i == 0 else None)
            h = norm(h)
            if i < self.n_act:
                h = F.relu(h)
        return h

    def forward(self, x, adj: NormAdj, input_mask: torch.Tensor | None = None,
                decode_rows: torch.Tensor | None = None):
        """(embeddings of all spots, reconstruction of `decode_rows` (default: all spots))."""
        z = self.encode(x, adj, input_mask)
        return z, self.decoder(z if decode_rows is None else z[decode_rows])


class GraphTensors:
    """The SNN graph on a device, with undirected-edge ids so that dropout removes both directions."""

    def __init__(self, graph: CellGraph, device: torch.device):
        n = graph.n_nodes
        row = np.repeat(np.arange(n, dtype=np.int64), graph.degrees())
        col = graph.indices.astype(np.int64)
        # undirected id of each directed edge: position of (min, max) among the unique pairs
        lo, hi = np.minimum(row, col), np.maximum(row, col)
        key = lo * n + hi
        _, uid = np.unique(key, return_inverse=True)
        self.n = n
        self.n_undirected = int(uid.max()) + 1 if uid.size else 0
        self.row = torch.from_numpy(row).to(device)
        self.col = torch.from_numpy(col).to(device)
        self.uid = torch.from_numpy(uid.astype(np.int64)).to(device)
        self.device = device

    def normalised(self, keep_prob: float = 1.0, generator: torch.Generator | None = None) -> NormAdj:
        """Normalised adjacency; with keep_prob < 1 each undirected edge is kept with that probability."""
        if keep_prob < 1.0 and self.n_undirected:
            keep_u = torch.rand(self.n_undirected, device=self.device, generator=generator) < keep_prob
            keep = keep_u[self.uid]
            row, col = self.row[keep], self.col[keep]
        else:
            row, col = self.row, self.col
        deg = torch.bincount(row, minlength=self.n).float() + 1.0  # + self loop
        dinv = deg.rsqrt()
        val = dinv[row] * dinv[col]
        crow = torch.zeros(self.n + 1, dtype=torch.int64, device=self.device)
        crow[1:] = torch.cumsum(torch.bincount(row, minlength=self.n), 0)
        csr = torch.sparse_csr_tensor(crow, col, val, size=(self.n, self.n), check_invariants=False)
        return NormAdj(csr, 1.0 / deg)


def _to_device_matrix(X, device: torch.device):
    """Expression to a torch tensor: CSR sparse stays sparse (float32), dense stays dense."""
    if sp.issparse(X):
        X = sp.csr_matrix(X, dtype=np.float32)
        return SparseInput(_torch_csr(X, device), _torch_csr(sp.csr_matrix(X.T), device))
    return torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)).to(device)


def _torch_csr(X: sp.csr_matrix, device: torch.device) -> torch.Tensor:
    return torch.sparse_csr_tensor(torch.from_numpy(X.indptr.astype(np.int64)),
                                   torch.from_numpy(X.indices.astype(np.int64)),
                                   torch.from_numpy(np.ascontiguousarray(X.data, dtype=np.float32)),
                                   size=X.shape, check_invariants=False).to(device)


class SparseTarget:
    """Mean squared error of a dense prediction against rows of the expression, densifying only
    the rows asked for (the whole matrix stays sparse on the device)."""

    def __init__(self, x: "SparseInput | torch.Tensor"):
        """`x`: the model input on its device (shares its memory, no copy)."""
        self.shape = tuple(x.shape)
        if isinstance(x, SparseInput):
            self.indptr = x.csr.crow_indices()
            self.indices = x.csr.col_indices()
            self.values = x.csr.values()
            self.dense = None
        else:
            self.dense = x

    def rows(self, rows: torch.Tensor | None) -> torch.Tensor:
        if self.dense is not None:
            return self.dense if rows is None else self.dense[rows]
        if rows is None:
            rows = torch.arange(self.shape[0], device=self.indptr.device)
        start, length = self.indptr[rows], self.indptr[rows + 1] - self.indptr[rows]
        local = torch.repeat_interleave(torch.arange(len(rows), device=rows.device), length)
        offset = torch.arange(int(length.sum()), device=rows.device) - torch.repeat_interleave(
            torch.cumsum(length, 0) - length, length)
        pos = torch.repeat_interleave(start, length) + offset
        out = torch.zeros(len(rows), self.shape[1], device=rows.device, dtype=self.values.dtype)
        out[local, self.indices[pos]] = self.values[pos]
        return out

    def mse(self, pred: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """MSE of `pred` (len(rows) x genes, or all spots when rows is None) against the expression."""
        return F.mse_loss(pred, self.rows(rows))


def default_radius(coords: np.ndarray, section: np.ndarray, factor: float,
                   target_degree: int = 6) -> tuple[float, float]:
    """(radius, reference distance): `factor` x the median distance from a spot to its
    `target_degree`-th nearest spot of the same slice (median per slice, then over slices).

    On a hexagonal Visium lattice the 6th neighbour is at the spot pitch d (the next ring at
    1.73 d), so 1.1 x keeps exactly the first ring (6 neighbours) whatever the unit; on
    cell-resolution data it gives a median degree of about `target_degree`.
    """
    from ..graphs.spacing import neighbour_distance

    ref = neighbour_distance(coords, section, k=target_degree)
    return factor * ref, ref


@register
class Spotscape(SSLMethod):
    """Spotscape: SNN graph, two augmented views, reconstruction + similarity telescope (+ multi-slice)."""

    name = "spotscape"
    config_class = SpotscapeConfig
    view_kind = "graph"
    mask_kind = "genes"  # two augmented views: gene channels masked and edges dropped, for every spot

    def __init__(self, config=None):
        super().__init__(config)
        self.genes: list[str] = []
        self.graph: CellGraph | None = None
        self.graph_info: dict = {}
        self.domain_centroids: np.ndarray | None = None
        self._dev_cache: dict = {}

    # -- setup ------------------------------------------------------------------------------
    def graph_radius(self, data: SpatialDataset) -> tuple[float, str]:
        c = self.config
        if c.radius is not None:
            return float(c.radius), "set"
        radius, med = default_radius(data.coords, data.section, c.radius_factor, c.target_degree)
        return radius, f"{c.radius_factor:g} x the median distance to the {c.target_degree}th nearest spot ({med:.3g})"

    def build_graph(self, data: SpatialDataset) -> CellGraph:
        """The SNN graph of `data` (per slice), radius from the config or derived from spacing."""
        c = self.config
        if data.spatial_graph is not None:  # the user's own (squidpy) graph
            g = data.spatial_graph
            self.graph_info = {**g.summary(), "radius_rule": "the slide's squidpy graph (obsp['spatial_connectivities'])"}
            return g
        radius, rule = self.graph_radius(data)
        g = snn_graph(data.coords, k=c.k_neighbors, radius=radius, section=data.section)
        self.graph_info = {**g.summary(), "radius": radius, "radius_rule": rule}
        return g

    preview_graph = build_graph

    def view_hops(self) -> int:
        return len(self.config.hidden_dims)  # one hop per GCN layer

    def prepare(self, data: SpatialDataset) -> None:
        validate_config(self.config)
        if data.n_cells < 4:
            raise SpatialDataError(f"spotscape: needs at least 4 spots, got {data.n_cells}.")
        self.data = data
        self.genes = [str(g) for g in data.gene_names]
        self.graph = self.build_graph(data)
        self.model = self.build_model()
        self._dev_cache = {}
        self._prototypes: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def training_memory(self):
        """Peak memory of one full-batch training step (budget.MemoryEstimate): the expression on the
        device, and per augmented view the adjacency with edge dropout, about four N x width tensors
        per GCN layer (product, propagation, batch norm, activation; the backward keeps them), the
        telescope's normalised embeddings, the decoder on the scored rows, and the multi-slice terms."""
        from ..budget import MemoryEstimate, adam_bytes

        c, data = self.config, self.data
        n, g, e = float(data.n_cells), float(data.n_genes), float(self.graph.n_edges)
        dims = [float(d) for d in c.hidden_dims]
        X = data.X
        x_bytes = float(X.nnz) * 12.0 * 2 if sp.issparse(X) else n * g * 4.0
        rows = float(min(c.recon_spots or n, n))
        per_view = {
            "adjacency": e * 20.0 * 2,
            "node activations": sum(n * d * 4.0 * 4 for d in dims) + n * dims[-1] * 4.0 * 4,
            "decoder": rows * (sum(dims) + g) * 4.0 * 3,
        }
        parts = {"expression on the device": x_bytes * 2}  # the input and the reconstruction target
        parts.update({k: 2 * v for k, v in per_view.items()})
        if self.n_slices >= 2 and c.lambda_proto > 0:
            k = float(c.proto_k or c.eval.n_domains or 10) * max(c.proto_granularity)
            parts["prototypes"] = n * k * 4.0 * 3 * len(c.proto_granularity)
        if self.n_slices >= 2 and c.lambda_scale > 0:
            anchors = float(min(c.scale_anchor_spots or n, n, c.scale_block_size))
            parts["similarity-scale blocks"] = anchors * n * 4.0 * 3
        parts["parameters and optimiser"] = adam_bytes(sum(p.numel() for p in self.model.parameters()))
        total = sum(parts.values())

        def fit(fraction: float) -> str:
            f = max(fraction, 0.05) * 0.8
            dims_fit = ",".join(str(max(4, int(d * f))) for d in c.hidden_dims)
            genes_fit = max(50, int(g * f))
            return (f"use --set hidden_dims=[{dims_fit}] or fewer genes (--set data.preprocess.n_top_genes="
                    f"{genes_fit}), or train on a GPU with more memory (spotscape trains on the whole graph at once)")

        return MemoryEstimate(total, parts, fit)

    def build_model(self) -> nn.Module:
        n_genes = len(self.genes) if self.genes else (self.data.n_genes if self.data is not None else 0)
        if n_genes < 1:
            raise SpatialDataError("spotscape: the model's gene list is empty; cannot build the model.")
        return SpotscapeModel(n_genes, list(self.config.hidden_dims), self.config.batch_norm,
                              self.config.activate_embedding)

    def _device_tensors(self, device: torch.device, data: SpatialDataset | None = None,
                        graph: CellGraph | None = None) -> dict:
        data = data if data is not None else self.data
        graph = graph if graph is not None else self.graph
        key = (str(device), id(data), id(graph))
        if self._dev_cache.get("key") != key:
            x = _to_device_matrix(data.X, device)
            self._dev_cache = {
                "key": key,
                "x": x,
                "target": SparseTarget(x),
                "graph": GraphTensors(graph, device),
                "section": torch.from_numpy(data.section.astype(np.int64)).to(device),
            }
        return self._dev_cache

    # -- training ---------------------------------------------------------------------------
    @property
    def n_slices(self) -> int:
        if self.data is None:
            return 1
        if getattr(self, "_n_slices_of", None) is not self.data:
            self._n_slices_of, self._n_slices = self.data, int(len(np.unique(self.data.section)))
        return self._n_slices

    def _proto_start(self) -> int:
        c = self.config
        return c.proto_start_epoch if c.proto_start_epoch is not None else max(1, c.epochs // 2)

    def train_batches(self, epoch: int, rng: np.random.Generator):
        # Full batch: the telescope and the scale matching are global over all spots.
        return [{"epoch": epoch, "seed": int(rng.integers(2**62))}]

    def on_epoch_start(self, epoch: int, device: torch.device) -> None:
        self._prototypes_due = (self.n_slices >= 2 and self.config.lambda_proto > 0
                                and epoch >= self._proto_start())

    def cpu_threads(self) -> int | None:
        """CPU intra-op threads for training (the Trainer asks): one for a small slide (spots x genes
        <= SMALL_STEP_WORK), else None (all). A small step is hundreds of tiny ops (the k-means of the
        prototypes most of all), and with every thread each op waits for the slowest: on a shared
        2-core machine that cost seconds per epoch whatever the slide's size
        (benchmarks/spotscape_epoch_cost.py)."""
        if self.data is None:
            return None
        return 1 if float(self.data.n_cells) * self.data.n_genes <= SMALL_STEP_WORK else None

    def set_shard(self, ctx) -> None:
        """Train as one rank of several (distributed.DistContext; None = alone). Each rank owns a
        contiguous block of spots (by slice, then x) and computes the GCN on them plus their k-hop
        halo (k = layers), with the whole graph's degrees after the step's edge dropout (every rank
        draws the same dropout, gene mask and scored rows from the step's seed). Batch norm uses
        the moments of all ranks' own spots, the telescope the all-reduced d x d Grams, the
        prototypes an all-reduced k-means (distributed.py): the step equals the one-process step."""
        self._shard, self._shard_cache = None, {}
        if ctx is None or not ctx.active:
            return
        if self.n_slices >= 2 and self.config.lambda_scale > 0:
            raise SpatialDataError("spotscape: similarity-scale matching (lambda_scale > 0) compares every spot with "
                                   "every other and is not split across devices; set lambda_scale=0 or --devices 1.")
        self._shard = ctx

    def _shard_tensors(self, device: torch.device) -> dict:
        """This rank's spots, their halo and the local graph (built once per device)."""
        ctx = self._shard
        if self._shard_cache.get("device") == str(device):
            return self._shard_cache
        data, graph = self.data, self.graph
        n = data.n_cells
        order = np.lexsort((data.coords[:, 1], data.coords[:, 0], data.section))
        own = np.sort(order[ctx.split(n)])
        reach = np.zeros(n, bool)
        reach[own] = True
        A = graph.to_scipy()
        for _ in range(len(self.model.convs)):  # a spot's embedding depends on its k-hop neighbourhood
            reach |= (A @ reach.astype(np.float32)) > 0
        local = np.flatnonzero(reach)
        pos = np.full(n, -1, np.int64)
        pos[local] = np.arange(len(local))
        full = GraphTensors(graph, device)
        row, col = full.row.cpu().numpy(), full.col.cpu().numpy()
        inside = np.flatnonzero(reach[row] & reach[col])  # global CSR order: local rows stay sorted
        owner = np.full(n, -1, np.int64)
        owner[own] = np.arange(len(own))
        X = data.X[local]
        x = _to_device_matrix(X, device)
        as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
        self._shard_cache = {
            "device": str(device), "n": n, "full": full, "x": x, "target": SparseTarget(x),
            "n_local": len(local), "local": as_t(local), "own_local": as_t(pos[own]),
            "local_of": as_t(pos), "owner_pos": as_t(owner),
            "edge_row": as_t(row[inside]), "edge_col": as_t(col[inside]), "edge_uid": full.uid[as_t(inside)],
            "edge_lrow": as_t(pos[row[inside]]), "edge_lcol": as_t(pos[col[inside]]),
        }
        return self._shard_cache

    def _shard_adjacency(self, s: dict, keep_prob: float, gen: torch.Generator) -> NormAdj:
        """The local part of GraphTensors.normalised (same random draw, the whole graph's degrees)."""
        full = s["full"]
        if keep_prob < 1.0 and full.n_undirected:
            keep_u = torch.rand(full.n_undirected, device=full.device, generator=gen) < keep_prob
            deg_rows = full.row[keep_u[full.uid]]
            keep = keep_u[s["edge_uid"]]
        else:
            deg_rows, keep = full.row, torch.ones_like(s["edge_uid"], dtype=torch.bool)
        deg = torch.bincount(deg_rows, minlength=full.n).float() + 1.0
        dinv = deg.rsqrt()
        val = dinv[s["edge_row"][keep]] * dinv[s["edge_col"][keep]]
        lrow, lcol = s["edge_lrow"][keep], s["edge_lcol"][keep]
        m = s["n_local"]
        crow = torch.zeros(m + 1, dtype=torch.int64, device=full.device)
        crow[1:] = torch.cumsum(torch.bincount(lrow, minlength=m), 0)
        csr = torch.sparse_csr_tensor(crow, lcol, val, size=(m, m), check_invariants=False)
        return NormAdj(csr, 1.0 / deg[s["local"]])

    def _sharded_training_loss(self, batch: Any, device: torch.device) -> dict[str, torch.Tensor]:
        """This rank's share of training_loss (see set_shard); the shares of all ranks sum to it."""
        from .. import distributed as D

        c, ctx = self.config, self._shard
        s = self._shard_tensors(device)
        gen = torch.Generator(device=device)
        gen.manual_seed(batch["seed"])
        n, world = s["n"], ctx.world_size
        n_genes = s["x"].shape[1]
        own = s["own_local"]

        def norm(module, h, rows, count):
            return D.batch_norm(module, h, rows, count, ctx) if isinstance(module, nn.BatchNorm1d) else module(h)

        z, l_rec = [], 0.0
        for _ in range(2):
            adj = self._shard_adjacency(s, 1.0 - c.edge_drop, gen)
            mask = (torch.rand(n_genes, device=device, generator=gen) >= c.feature_mask).float()
            if c.rescale_masked:
                mask = mask / (1.0 - c.feature_mask)
            rows = torch.arange(n, device=device)
            if c.recon_spots is not None and c.recon_spots < n:
                rows = torch.randperm(n, device=device, generator=gen)[:c.recon_spots]
            h = s["x"]
            for i, (conv, bn) in enumerate(zip(self.model.convs, self.model.norms)):
                h = norm(bn, conv(h, adj, mask if i == 0 else None), own, n)
                if i < self.model.n_act:
                    h = F.relu(h)
            z.append(h[own])
            mine = rows[s["owner_pos"][rows] >= 0]
            local_rows = s["local_of"][mine]
            r = h[local_rows]
            for layer in self.model.decoder:
                r = norm(layer, r, None, len(rows))
            sse = F.mse_loss(r.float(), s["target"].rows(local_rows), reduction="sum")
            l_rec = l_rec + 0.5 * sse / float(len(rows) * n_genes)
        l_tel = D.telescope_loss(z[0].float(), z[1].float(), n, ctx) / world
        loss = c.lambda_recon * l_rec + c.lambda_telescope * l_tel
        losses = {"recon": l_rec.detach(), "telescope": l_tel.detach()}
        if getattr(self, "_prototypes_due", False):
            base = c.proto_k or c.eval.n_domains or 10
            counts = [m for m in prototype_counts(base, c.proto_granularity) if m < n]
            z1, z2 = z[0].float(), z[1].detach().float()
            total = z1.new_zeros(())
            for m in counts:
                cent, lab = D.kmeans(z2, m, n, s["owner_pos"], ctx, c.kmeans_iters, generator=gen)
                total = total + prototype_contrast_loss(z1, cent, lab, c.proto_tau) * (len(z1) / n)
            l_pc = total / max(len(counts), 1)
            loss = loss + c.lambda_proto * l_pc
            losses["proto"] = l_pc.detach()
        losses["loss"] = loss
        return losses

    def training_loss(self, batch: Any, device: torch.device) -> dict[str, torch.Tensor]:
        if getattr(self, "_shard", None) is not None:
            return self._sharded_training_loss(batch, device)
        c = self.config
        t = self._device_tensors(device)
        gen = torch.Generator(device=device)
        gen.manual_seed(batch["seed"])
        n_genes = t["x"].shape[1]
        n = t["graph"].n
        z, l_rec = [], 0.0
        for _ in range(2):
            adj = t["graph"].normalised(1.0 - c.edge_drop, gen)
            mask = (torch.rand(n_genes, device=device, generator=gen) >= c.feature_mask).float()
            if c.rescale_masked:  # as dropout does: the expected input equals the unmasked one
                mask = mask / (1.0 - c.feature_mask)
            rows = None
            if c.recon_spots is not None and c.recon_spots < n:
                rows = torch.randperm(n, device=device, generator=gen)[:c.recon_spots]
            zi, ri = self.model(t["x"], adj, mask, rows)
            z.append(zi)
            l_rec = l_rec + 0.5 * t["target"].mse(ri.float(), rows)
        losses: dict[str, torch.Tensor] = {}
        l_tel = similarity_telescope_loss(z[0].float(), z[1].float())
        loss = c.lambda_recon * l_rec + c.lambda_telescope * l_tel
        losses["recon"], losses["telescope"] = l_rec.detach(), l_tel.detach()
        if self.n_slices >= 2 and c.lambda_scale > 0:
            anchors = None
            if c.scale_anchor_spots is not None and c.scale_anchor_spots < n:
                anchors = torch.randperm(n, device=device, generator=gen)[:c.scale_anchor_spots]
            l_ss = similarity_scale_loss(z[0].float(), z[1].float(), t["section"], k=c.scale_top_k,
                                         block_size=c.scale_block_size, anchors=anchors,
                                         detach_own=c.scale_detach_own)
            loss = loss + c.lambda_scale * l_ss
            losses["scale"] = l_ss.detach()
        if getattr(self, "_prototypes_due", False):
            l_pc = self._prototype_loss(z[0].float(), z[1].detach().float(), gen)
            loss = loss + c.lambda_proto * l_pc
            losses["proto"] = l_pc.detach()
        losses["loss"] = loss
        return losses

    def _prototype_loss(self, z1: torch.Tensor, z2: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Contrast view-1 spots against k-means centroids of view 2, at each granularity."""
        c = self.config
        base = c.proto_k or c.eval.n_domains or 10
        total = z1.new_zeros(())
        counts = [m for m in prototype_counts(base, c.proto_granularity) if m < z2.shape[0]]
        for m in counts:
            cent, lab = torch_kmeans(z2, m, c.kmeans_iters, generator=gen)
            total = total + prototype_contrast_loss(z1, cent, lab, c.proto_tau)
        return total / max(len(counts), 1)

    # -- embeddings and results -------------------------------------------------------------
    @torch.no_grad()
    def embed(self, data: SpatialDataset, device: torch.device, graph: CellGraph | None = None,
              input_mask: np.ndarray | None = None, genes: np.ndarray | str | None = "auto",
              block_rows: int = 65536) -> tuple[np.ndarray, np.ndarray | None]:
        """(embeddings (N, d), reconstruction (N, len(genes)) or None) on the un-augmented graph,
        eval mode. `genes`: model-gene columns to decode (decoded in row blocks, so only N x
        len(genes) is ever held); None = no reconstruction; "auto" = all genes when
        `eval.reconstruction` keeps the layer for a slide of this size, else None."""
        graph = graph if graph is not None else (self.graph if data is self.data else self.build_graph(data))
        self.model.to(device).eval()
        x = _to_device_matrix(data.X, device)
        adj = GraphTensors(graph, device).normalised()
        mask = torch.from_numpy(input_mask.astype(np.float32)).to(device) if input_mask is not None else None
        z = self.model.encode(x, adj, mask)
        if isinstance(genes, str):
            keep = self.config.eval.reconstruction_policy(data.n_cells, data.n_genes) == "all"
            genes = np.arange(data.n_genes) if keep else None
        if genes is None:
            return z.float().cpu().numpy(), None
        cols = torch.as_tensor(np.asarray(genes, np.int64), device=device)
        recon = np.empty((z.shape[0], len(cols)), np.float32)
        for i in range(0, z.shape[0], block_rows):
            recon[i:i + block_rows] = self.model.decoder(z[i:i + block_rows])[:, cols].float().cpu().numpy()
        return z.float().cpu().numpy(), recon

    @torch.no_grad()
    def reconstruct_hidden(self, hidden: np.ndarray, device: torch.device) -> np.ndarray:
        """(len(hidden), n_genes) the decoder's expression for the `hidden` cells with their whole input
        zeroed, so that their embeddings come from their graph neighbours alone (what the model puts
        in a region the user hid), in the preprocessed space."""
        hidden = np.asarray(hidden, np.int64)
        keep = np.ones(self.data.n_cells, np.float32)
        keep[hidden] = 0.0
        X = self.data.X
        X = sp.csr_matrix(sp.diags(keep) @ X) if sp.issparse(X) else np.asarray(X) * keep[:, None]
        self.model.to(device).eval()
        z = self.model.encode(_to_device_matrix(X, device), GraphTensors(self.graph, device).normalised(), None)
        return self.model.decoder(z[torch.as_tensor(hidden, device=device)]).float().cpu().numpy()

    def _n_domains(self, data: SpatialDataset) -> int | None:
        return self.config.eval.n_domains

    def cluster_space(self, emb: np.ndarray) -> np.ndarray:
        """The embeddings as the domain clustering sees them (`embedding_postprocess`)."""
        return postprocess_embedding(emb, self.config.embedding_postprocess, seed=self.config.seed)

    def cluster(self, space: np.ndarray) -> tuple[np.ndarray, dict]:
        """Domain labels of the embeddings in the clustering space (:meth:`cluster_space`) and
        how they were found (evaluation.domains.cluster_domains, as for every method)."""
        from ..evaluation.domains import cluster_domains

        c = self.config
        labels, info = cluster_domains(space, c.eval.n_domains, seed=c.seed, method=c.eval.domain_method)
        return labels, {**info, "embedding_postprocess": c.embedding_postprocess}

    def _results(self, data: SpatialDataset, graph: CellGraph, emb: np.ndarray, recon: np.ndarray | None,
                 labels: np.ndarray, info: dict) -> tuple[MethodResults, dict]:
        import pandas as pd

        from ..evaluation.clustering import smooth_labels
        from ..evaluation.domains import domain_categorical

        res = MethodResults()
        res.obsm["X_spotscape"] = emb.astype(np.float32)
        if recon is not None:  # None: eval.reconstruction does not keep it (see embed)
            res.layers["spotscape_reconstruction"] = recon.astype(np.float32)
        res.obs["spotscape_domain"] = domain_categorical(labels)
        domains: dict = {"clustering": info, "n_domains": int(labels.max()) + 1}
        smoothed = None
        if self.config.smooth_domains and graph.n_edges:
            smoothed = smooth_labels(labels, graph.to_scipy())
            res.obs["spotscape_domain_smoothed"] = pd.Categorical.from_codes(
                smoothed, categories=list(res.obs["spotscape_domain"].categories))
        if data.domains is not None:
            domains.update(_domain_metrics(labels, data))
            if smoothed is not None:
                domains["smoothed"] = _domain_metrics(smoothed, data)
            domains["reference_key"] = data.domain_key
        return res, domains

    def evaluate(self, data: SpatialDataset, device: torch.device,
                 make_trainer: Callable[[TrainConfig], Any]) -> MethodResults:
        t0 = time.perf_counter()
        graph = self.graph if data is self.data else self.build_graph(data)
        emb, recon = self.embed(data, device, graph)
        space = self.cluster_space(emb)
        labels, info = self.cluster(space)
        res, domains = self._results(data, graph, emb, recon, labels, info)
        # centroids in the space the clustering saw (predict() assigns new spots in that space)
        self.domain_centroids = np.stack([space[labels == i].mean(0) for i in range(int(labels.max()) + 1)])
        metrics: dict = {"graph": self.graph_info, "domains": domains}
        if data.n_sections > 1:
            from ..evaluation.clustering import batch_mixing_scores

            metrics["integration"] = batch_mixing_scores(emb, data.section, data.domains, seed=self.config.seed)
        if self.config.eval_masked_genes > 0:
            metrics["reconstruction"] = self._masked_reconstruction(data, graph, device)
        metrics["evaluate_seconds"] = time.perf_counter() - t0
        res.metrics = metrics
        return res

    def _masked_reconstruction(self, data: SpatialDataset, graph: CellGraph, device: torch.device) -> dict:
        """Hide a random `eval_masked_genes` fraction of the genes from the input (the same
        channel masking as in training) and score their reconstruction against the per-gene mean."""
        rng = np.random.default_rng(self.config.seed + 7)
        g = data.n_genes
        hidden = rng.random(g) < self.config.eval_masked_genes
        if not hidden.any():
            hidden[rng.integers(g)] = True
        keep = (~hidden).astype(np.float32)
        if self.config.rescale_masked:  # the input scale the model saw in training
            keep /= keep.mean()
        cols = np.flatnonzero(hidden)
        _, pred = self.embed(data, device, graph, input_mask=keep, genes=cols)  # only the hidden genes
        truth = data.X[:, cols]
        truth = truth.toarray() if sp.issparse(truth) else np.asarray(truth)
        mse = float(np.mean((pred - truth) ** 2))
        base = float(np.mean((truth - truth.mean(0, keepdims=True)) ** 2))
        return {"masked_mse": mse, "gene_mean_mse": base, "masked_fraction": float(hidden.mean()),
                "n_masked_genes": int(hidden.sum()), "masked_genes": [str(data.gene_names[j]) for j in cols]}

    def predict(self, data: SpatialDataset, device: torch.device) -> MethodResults:
        graph = self.build_graph(data)
        emb, recon = self.embed(data, device, graph)
        space = self.cluster_space(emb)
        if self.domain_centroids is not None:
            # The training slide's domains: nearest domain centroid, so labels match across slides.
            # nearest centroid in the clustering space; "standardize" / "pca" are re-fitted on the
            # new slide's embeddings (per-slide statistics), "l2" / "none" need no statistics
            c = np.asarray(self.domain_centroids, np.float32)
            if space.shape[1] != c.shape[1]:
                raise SpatialDataError("spotscape: stored domain centroids do not match the clustering space "
                                       f"({c.shape[1]} vs {space.shape[1]} dims); re-run evaluate().")
            d = (space ** 2).sum(1, keepdims=True) - 2 * space @ c.T + (c ** 2).sum(1)
            labels, info = d.argmin(1), {"method": "nearest_training_centroid", "n_clusters": len(c)}
        else:
            labels, info = self.cluster(space)
        res, domains = self._results(data, graph, emb, recon, labels, info)
        res.metrics = {"graph": self.graph_info, "domains": domains}
        return res

    # -- checkpoint state -------------------------------------------------------------------
    def extra_state(self) -> dict:
        state = {"genes": list(self.genes)}
        if self.domain_centroids is not None:
            state["domain_centroids"] = np.asarray(self.domain_centroids, np.float32).tolist()
        return state

    def load_extra_state(self, state: dict) -> None:
        self.genes = [str(g) for g in state.get("genes", [])]
        cent = state.get("domain_centroids")
        self.domain_centroids = np.asarray(cent, np.float32) if cent is not None else None


def _domain_metrics(pred: np.ndarray, data: SpatialDataset) -> dict:
    """ARI / NMI / Hungarian accuracy overall (labelled spots) and per section."""
    from ..evaluation.domains import score_domains

    out = score_domains(pred, data.domains, data.section, data.section_names, data.domain_key)
    out.pop("reference_key", None)  # recorded once beside the smoothed scores
    return out
