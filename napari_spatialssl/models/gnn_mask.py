"""`gnn-mask`: masked-expression pretraining of a graph neural network on the spatial radius graph,
then cell-type fine-tuning (after SpatialSSL, NeurIPS 2023 AI4Science; re-implemented from the
paper's description).

Pretext task: a fraction of cells (by default 20 %, drawn anew every step; any per-cell strategy
of :func:`napari_spatialssl.masking.draw_cell_mask`) has its input expression replaced by zeros or
a learned mask token; a GCN or GAT encoder over the radius graph (built once, per section) and an
MLP decoder reconstruct *all* genes of the masked cells; the loss is the mean squared error on
masked cells only.

Two data modes on the same model:

- ``graph_mode='whole'``: full-graph steps, one or several whole sections per step;
- ``graph_mode='egonet'``: mini-batches of centre cells with their k-hop ego-nets
  (k = number of GNN layers, so a centre's output equals its whole-graph output), the loss on
  masked centre cells; memory is bounded by the batch, not the slide.

GCN layers use the symmetric normalisation of the *whole* graph (degrees precomputed once), so
ego-net outputs match whole-graph outputs exactly; GAT attention is local to a node's
neighbourhood, which an ego-net holds completely for every node whose output reaches the centre.

Held-out cells. Before training, a fixed evaluation mask (the configured strategy, seeded) and a
validation set (``val_fraction`` of the other cells) are drawn. Neither ever contributes to the
training loss (for the random strategies; with ``cell_types`` the evaluation cells are the masked
types themselves and this is recorded as ``eval_cells_held_out: false``). The validation loss is
the reconstruction MSE of the validation cells, all masked at once; it drives early stopping.

Results (see models/base.py for the key convention):

- ``obsm['X_gnn-mask']``: encoder output of every cell with nothing masked;
- ``layers['gnn-mask_reconstruction']``: the decoder output of every cell in the forward pass in
  which the evaluation-masked cells are masked: for masked cells a true reconstruction from their
  neighbours, for the others the model's output with their own expression visible;
- ``obs['gnn-mask_masked']``: the evaluation mask;
- ``obs['gnn-mask_cell_type']``: the fine-tuned classifier's prediction for every cell (train and
  test sections), when a label key is given.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from ..config import DataConfig, EvalConfig, TrainConfig
from ..data.dataset import PreprocessConfig, SpatialDataset, rows_as_csr
from ..data.io import SpatialDataError
from ..evaluation.classification import (
    class_weight_vector,
    classification_scores,
    logistic_regression_baseline,
)
from ..graphs.egonet import EgoNetSampler
from ..graphs.neighbors import CellGraph, radius_graph
from ..masking import MaskConfig, draw_cell_mask
from .base import MethodResults, SSLMethod, register

NAME = "gnn-mask"


def _default_data() -> DataConfig:
    # log1p on top of the automatic choice: counts get normalise-total + log1p as usual, and
    # already-normalised (non-integer) expression such as MERFISH volume-normalised values gets
    # log1p alone, which tames its heavy right tail for the MSE objective.
    return DataConfig(preprocess=PreprocessConfig(log1p=True))


@dataclass
class FinetuneConfig:
    """Cell-type fine-tuning (pretrained encoder + a linear classification head).

    mode: 'full' (encoder and head trained) or 'linear' (encoder frozen: a linear probe);
    class_weights: 'balanced' | 'sqrt' | 'none' (weighted cross-entropy against imbalance);
    val_fraction: share of the labelled training-section cells held out for early stopping;
    epochs / lr / weight_decay / patience: as in TrainConfig, for this stage;
    refit: after early stopping, retrain from the same start on all labelled training-section
    cells for the chosen number of epochs; dropout: the encoder's feature dropout while
    fine-tuning. The defaults (with ``head_skip=True`` in GnnMaskConfig) were chosen on a
    validation split of the training section; see benchmarks/gnn_mask.md.
    """

    mode: str = "full"
    epochs: int = 200
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 40
    class_weights: str = "sqrt"
    val_fraction: float = 0.15
    batch_size: int = 256  # cells per step of the linear probe (on precomputed embeddings)
    # early stopping on the validation cells: 'macro_f1' (stops on 1 - macro F1) or 'loss' (weighted CE)
    early_stop_metric: str = "macro_f1"
    # refit: after early stopping has chosen the number of epochs on the validation split, train a
    # fresh copy (same starting encoder) on *all* labelled training-section cells for that many
    # epochs; the validation scores reported are those of the early-stopped model
    refit: bool = True
    label_smoothing: float = 0.0
    dropout: float | None = 0.5  # encoder feature dropout while fine-tuning; None = the pretraining value
    # 'full' mode: train the head alone (encoder frozen, minibatches, probe_lr) for this many
    # epochs before full fine-tuning (LP-FT, Kumar et al. 2022); 0 = off
    probe_epochs: int = 0
    probe_lr: float = 5e-3

    FIELD_DOCS = {
        "mode": "full: train the encoder and the classifier head; linear: freeze the encoder (a linear probe).",
        "epochs": "Most epochs of each fine-tuning training (early stopping usually ends it sooner).",
        "lr": "Learning rate of fine-tuning.",
        "weight_decay": "AdamW weight decay of fine-tuning.",
        "patience": "Fine-tuning stops after this many epochs without a better validation score.",
        "class_weights": "Weights against class imbalance: balanced, sqrt or none.",
        "val_fraction": "Share of the labelled training cells held out to choose when to stop.",
        "batch_size": "Cells per step of the linear probe.",
        "early_stop_metric": "What early stopping watches: macro_f1 or loss.",
        "refit": "After early stopping, retrain on every labelled training cell for the chosen epochs.",
        "label_smoothing": "Label smoothing of the cross-entropy (0 = none).",
        "dropout": "Encoder dropout while fine-tuning (empty = the pretraining value).",
        "probe_epochs": "Train the head alone for this many epochs before full fine-tuning (0 = off).",
        "probe_lr": "Learning rate of that head-only phase.",
    }


@dataclass
class GnnMaskConfig(TrainConfig):
    """Settings of gnn-mask. Distances (radius) are in the coordinates' units (micrometres,
    pixels, ...: whatever the slide uses).

    radius: the graph's radius; None = ``radius_factor`` x the median distance from a cell to its
    ``target_degree``-th nearest cell of the same section (graphs.spacing.neighbour_distance, the
    rule spotscape uses), so the graph has about that many neighbours per cell in any unit. The
    default 1.0 x the 5th-neighbour distance reproduces the radius every gnn-mask benchmark used on
    the micrometre MERFISH slide (29.7 um against the earlier fixed 30 um, mean degree ~5).
    """

    epochs: int = 100
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 15
    data: DataConfig = field(default_factory=_default_data)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    # graph
    radius: float | None = None
    radius_factor: float = 1.0
    target_degree: int = 5
    graph_mode: str = "whole"  # whole | egonet
    sections_per_step: int = 1  # whole mode: sections per full-graph step
    batch_size: int = 512  # egonet mode: centre cells per step
    num_hops: int | None = None  # egonet mode: None = number of GNN layers (exact)
    # egonet mode: which centre cells share a step. "random": any cells (each step's ego-nets barely
    # overlap: ~15-20 nodes computed per centre at 2 hops); "spatial": cells of one square tile of
    # ~batch_size cells (tiles at a random offset every epoch, steps in random order), so the
    # ego-nets overlap and a step computes ~1.2 nodes per centre (benchmarks/gnn_mask_throughput.py);
    # a centre's output is exact either way, but the cells of a step are neighbours, not a sample
    egonet_order: str = "random"
    # encoder
    encoder: str = "gcn"  # gcn | gat
    hidden_dims: list[int] = field(default_factory=lambda: [128, 64])
    heads: int = 4  # gat only; each hidden dim must be divisible by it
    dropout: float = 0.2
    norm: str = "layer"  # layer | batch | none
    residual: bool = True
    # root skip: every GCN layer adds a linear map of the node's own input before the norm
    # (h' = GCNConv(h) + W_root h, as in GraphConv), so a cell's own expression is not diluted by
    # the ~1/(degree+1) self weight of the symmetric normalisation
    root_skip: bool = False
    # decoder + mask token
    decoder: str = "mlp"  # mlp | linear
    decoder_hidden: int = 128
    mask_token: str = "learned"  # learned | zeros
    standardize_input: bool = True  # encoder input = (x - mean) / s.d. of the training cells' genes
    head_skip: bool = True  # True: the classifier head reads [embedding, the cell's own standardised input]
    # held-out cells
    val_fraction: float = 0.1
    max_val_cells: int = 20000
    # memory: expression is cached densely when it fits under this size (GB); else densified per step
    dense_cache_gb: float = 1.0

    FIELD_DOCS = {
        "radius": "Cells closer than this (in the slide's own units) are neighbours in the graph; empty = "
                  "radius_factor x the distance at which cells have target_degree neighbours.",
        "radius_factor": "When the radius is empty: the multiple of the typical neighbour distance it is set to.",
        "target_degree": "When the radius is empty: the neighbour rank whose median distance sets it.",
        "graph_mode": "whole: train on whole sections; egonet: on k-hop ego-nets of batches of cells (memory "
                      "does not grow with the slide).",
        "sections_per_step": "Whole mode: sections per training step.",
        "batch_size": "Ego-net mode: centre cells per training step.",
        "num_hops": "Ego-net mode: hops around each centre cell (empty = the number of layers: exact).",
        "encoder": "Graph layers: gcn (graph convolution) or gat (graph attention).",
        "hidden_dims": "Widths of the encoder's layers; the last is the embedding's size.",
        "heads": "GAT only: attention heads per layer.",
        "dropout": "Feature dropout in the encoder while pretraining.",
        "norm": "Normalisation after each layer: layer, batch or none.",
        "residual": "Add each layer's input to its output (a linear projection where widths differ).",
        "root_skip": "Each layer also adds a linear map of the cell's own input (keeps its own expression).",
        "decoder": "Decoder from embedding to genes: mlp or linear.",
        "decoder_hidden": "Width of the MLP decoder's hidden layer.",
        "mask_token": "What replaces a masked cell's input: a learned token or zeros.",
        "standardize_input": "Standardise each gene with the training cells' mean and s.d. before the encoder.",
        "head_skip": "The cell-type head also reads the cell's own standardised expression.",
        "val_fraction": "Share of cells held out to watch the validation loss.",
        "max_val_cells": "At most this many validation cells.",
        "dense_cache_gb": "Keep the expression as a dense array when it fits in this many GB (faster).",
    }
    PANELS = {"view": ("radius", "graph_mode", "num_hops", "batch_size", "encoder", "hidden_dims"),
              "train": ("epochs", "lr", "seed", "device", "eval.n_domains", "eval.domain_method", "finetune.epochs"),
              "mask": ("mask.strategy", "mask.ratio", "mask.cell_types", "mask.niche_hops")}

    def validate(self) -> None:
        self.mask.validate()
        if self.graph_mode not in ("whole", "egonet"):
            raise SpatialDataError(f"graph_mode must be 'whole' or 'egonet', got {self.graph_mode!r}.")
        if self.egonet_order not in ("random", "spatial"):
            raise SpatialDataError(f"egonet_order must be 'random' or 'spatial', got {self.egonet_order!r}.")
        if self.encoder not in ("gcn", "gat"):
            raise SpatialDataError(f"encoder must be 'gcn' or 'gat', got {self.encoder!r}.")
        if not self.hidden_dims:
            raise SpatialDataError("hidden_dims needs at least one layer size, e.g. --set hidden_dims=256,128.")
        self.hidden_dims = [int(h) for h in self.hidden_dims]
        if self.encoder == "gat" and any(h % self.heads for h in self.hidden_dims):
            raise SpatialDataError(
                f"GAT: every hidden dim {self.hidden_dims} must be divisible by heads={self.heads}.")
        if self.norm not in ("layer", "batch", "none"):
            raise SpatialDataError(f"norm must be layer, batch or none, got {self.norm!r}.")
        if self.decoder not in ("mlp", "linear"):
            raise SpatialDataError(f"decoder must be 'mlp' or 'linear', got {self.decoder!r}.")
        if self.mask_token not in ("learned", "zeros"):
            raise SpatialDataError(f"mask_token must be 'learned' or 'zeros', got {self.mask_token!r}.")
        if self.finetune.early_stop_metric not in ("macro_f1", "loss"):
            raise SpatialDataError("finetune.early_stop_metric must be 'macro_f1' or 'loss'.")
        if self.finetune.mode not in ("full", "linear"):
            raise SpatialDataError(f"finetune.mode must be 'full' or 'linear', got {self.finetune.mode!r}.")
        if not 0.0 <= self.val_fraction < 0.5:
            raise SpatialDataError(f"val_fraction must be in [0, 0.5), got {self.val_fraction}.")
        if self.radius is not None and self.radius <= 0:
            raise SpatialDataError(f"radius must be positive (coordinates' units), got {self.radius}.")

    def graph_radius(self, coords: np.ndarray, section: np.ndarray) -> tuple[float, str]:
        """(radius used, how it was chosen) for a slide: the set radius, or the spacing rule."""
        if self.radius is not None:
            return float(self.radius), "set"
        from ..graphs.spacing import neighbour_distance

        ref = neighbour_distance(coords, section, k=self.target_degree)
        return self.radius_factor * ref, (f"{self.radius_factor:g} x the median distance to the "
                                          f"{self.target_degree}th nearest cell ({ref:.3g})")


# ----------------------------------------------------------------------------------------------
# the networks


class GraphEncoder(nn.Module):
    """A stack of GCN or GAT layers: conv -> norm -> ELU -> dropout, plus an optional residual
    (a linear projection where the width changes)."""

    def __init__(self, in_dim: int, hidden_dims: list[int], conv: str = "gcn", heads: int = 4,
                 dropout: float = 0.2, norm: str = "layer", residual: bool = True, root_skip: bool = False):
        super().__init__()
        from torch_geometric.nn import GATConv, GCNConv

        self.conv_kind = conv
        self.dropout = dropout
        self.residual = residual
        self.convs, self.norms, self.skips = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        # root (self) weights: out = conv(h) + root(h), before the norm (None: plain conv)
        self.roots = nn.ModuleList() if root_skip else None
        dims = [in_dim] + list(hidden_dims)
        for a, b in zip(dims[:-1], dims[1:]):
            if conv == "gcn":
                # normalisation supplied as edge weights from whole-graph degrees (see _gcn_weights)
                self.convs.append(GCNConv(a, b, normalize=False, add_self_loops=False))
            else:
                self.convs.append(GATConv(a, b // heads, heads=heads, concat=True, dropout=dropout,
                                          add_self_loops=True))
            self.norms.append(nn.LayerNorm(b) if norm == "layer" else nn.BatchNorm1d(b) if norm == "batch"
                              else nn.Identity())
            self.skips.append((nn.Identity() if a == b else nn.Linear(a, b, bias=False)) if residual else None)
            if self.roots is not None:
                self.roots.append(nn.Linear(a, b, bias=False))

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor | None = None):
        h = x
        # GCN with its weights given: propagate as one CSR product per layer (the weighted adjacency
        # built once per forward), several times faster on the CPU than message passing by scatter
        # (benchmarks/gnn_mask_throughput.py); the same parameters and the same sums.
        adj = _gcn_adjacency(edge_index, edge_weight, x.shape[0]) \
            if self.conv_kind == "gcn" and edge_weight is not None else None
        for i, (conv, norm, skip) in enumerate(zip(self.convs, self.norms, self.skips)):
            rowwise = h.map if isinstance(h, _Hidden) else (lambda layer, h=h: layer(h))
            skip_out = None
            if adj is not None:
                if isinstance(skip, nn.Linear) and skip.bias is None and hasattr(conv.lin, "weight"):
                    # the convolution's and the residual's projections of h as one matrix product
                    w = torch.cat([conv.lin.weight, skip.weight])
                    lin_out, skip_out = rowwise(lambda v: F.linear(v, w)).split(
                        [conv.lin.weight.shape[0], skip.weight.shape[0]], dim=1)
                else:
                    lin_out = rowwise(conv.lin)
                out = _CsrMatmul.apply(adj[0], adj[1], lin_out)
                if conv.bias is not None:
                    out = out + conv.bias
            else:
                dense = h.dense() if isinstance(h, _Hidden) else h
                out = conv(dense, edge_index, edge_weight) if self.conv_kind == "gcn" else conv(dense, edge_index)
            if self.roots is not None:
                out = out + rowwise(self.roots[i])
            out = F.elu(norm(out))
            if skip is not None:
                out = out + (skip_out if skip_out is not None else rowwise(skip))
            h = F.dropout(out, self.dropout, self.training)
        return h


class _CsrMatmul(torch.autograd.Function):
    """A @ dense for a sparse CSR A, with A^T given for the backward (no transpose per step); the
    product runs in A's dtype outside autocast, the gradient comes back in the input's dtype."""

    @staticmethod
    def forward(ctx, a, a_t, dense):
        ctx.a_t, ctx.dtype = a_t, dense.dtype
        with torch.autocast(dense.device.type, enabled=False):
            return torch.sparse.mm(a, dense.to(a.dtype))

    @staticmethod
    def backward(ctx, grad):
        with torch.autocast(grad.device.type, enabled=False):
            return None, None, torch.sparse.mm(ctx.a_t, grad.contiguous().to(ctx.a_t.dtype)).to(ctx.dtype)


def _gcn_adjacency(edge_index: torch.Tensor, edge_weight: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, A^T) as CSR tensors with A[target, source] = weight (PyG's order: row 0 source, row 1 target)."""
    src, dst = edge_index[0], edge_index[1]
    w = edge_weight.float()

    def csr(rows, cols):
        key = rows * n + cols
        if key.device.type == "cpu":  # numpy's sort: ~50x faster than torch's here on a loaded CPU
            order = torch.from_numpy(np.argsort(key.numpy(), kind="stable"))
        else:
            order = torch.argsort(key)
        crow = torch.zeros(n + 1, dtype=torch.int64, device=rows.device)
        crow[1:] = torch.cumsum(torch.bincount(rows, minlength=n), 0)
        return torch.sparse_csr_tensor(crow, cols[order], w[order], size=(n, n), check_invariants=False)

    return csr(dst, src), csr(src, dst)


def make_encoder(n_genes: int, cfg: GnnMaskConfig) -> GraphEncoder:
    return GraphEncoder(n_genes, cfg.hidden_dims, cfg.encoder, cfg.heads, cfg.dropout, cfg.norm, cfg.residual,
                        cfg.root_skip)


class GnnMaskModel(nn.Module):
    """Encoder + expression decoder + mask token; after fine-tuning also `cell_type` (a copy of
    the encoder, possibly fine-tuned, and a linear head)."""

    def __init__(self, n_genes: int, cfg: GnnMaskConfig, n_classes: int = 0):
        super().__init__()
        self.encoder = make_encoder(n_genes, cfg)
        d = cfg.hidden_dims[-1]
        if cfg.decoder == "mlp":
            self.decoder = nn.Sequential(nn.Linear(d, cfg.decoder_hidden), nn.ELU(),
                                         nn.Linear(cfg.decoder_hidden, n_genes))
        else:
            self.decoder = nn.Linear(d, n_genes)
        self.mask_token = nn.Parameter(torch.zeros(n_genes), requires_grad=cfg.mask_token == "learned")
        self.input_norm = InputNorm(n_genes)
        self.cell_type = CellTypeModel(copy.deepcopy(self.input_norm), copy.deepcopy(self.encoder), d, n_classes,
                                       cfg.head_skip) if n_classes else None

    def hide(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Masked rows replaced by the mask token (zeros unless learned), after standardising."""
        return torch.where(mask[:, None], self.mask_token.to(x.dtype)[None, :], x)

    def forward(self, x, edge_index, edge_weight=None, mask=None, decode_rows=None):
        """(embeddings, reconstruction) of every node; `mask` (bool, nodes) hides those inputs.
        The reconstruction is in the units of `x` (preprocessed expression); with `decode_rows`
        (local indices) only those nodes are decoded (training decodes the scored cells alone)."""
        h = self.input_norm(x)
        if mask is not None:
            # the encoder's first layer maps the token row once, not n copies of it, so no
            # (nodes x genes) gradient is computed for the input (the same values as hide(h, mask))
            h = _Hidden(h, mask, self.mask_token)
        z = self.encoder(h, edge_index, edge_weight)
        return z, self.decoder(z if decode_rows is None else z[decode_rows])


@dataclass
class _Hidden:
    """An encoder input whose `mask` rows are the `token` (GnnMaskModel.hide, kept factored)."""

    values: torch.Tensor
    mask: torch.Tensor
    token: torch.Tensor

    @property
    def shape(self):
        return self.values.shape

    def dense(self) -> torch.Tensor:
        return torch.where(self.mask[:, None], self.token.to(self.values.dtype)[None, :], self.values)

    def map(self, layer) -> torch.Tensor:
        """layer(self.dense()) for a row-wise layer, computing the token's row once."""
        return torch.where(self.mask[:, None], layer(self.token.to(self.values.dtype)[None, :]), layer(self.values))


class InputNorm(nn.Module):
    """Fixed per-gene standardisation (buffers set from the training cells; identity by default)."""

    def __init__(self, n_genes: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_genes))
        self.register_buffer("scale", torch.ones(n_genes))

    def set(self, mean: np.ndarray, std: np.ndarray) -> None:
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.scale.copy_(torch.as_tensor(1.0 / np.maximum(std, 1e-3), dtype=torch.float32))

    def forward(self, x):
        return (x - self.mean) * self.scale


class CellTypeModel(nn.Module):
    """Encoder + linear head; with `skip` the head also reads the cell's own standardised input."""

    def __init__(self, input_norm: InputNorm, encoder: GraphEncoder, dim: int, n_classes: int, skip: bool = True):
        super().__init__()
        self.input_norm = input_norm
        self.encoder = encoder
        self.skip = skip
        n_genes = input_norm.mean.shape[0]
        self.head = nn.Linear(dim + (n_genes if skip else 0), n_classes)

    def features(self, x, edge_index, edge_weight=None):
        h = self.input_norm(x)
        z = self.encoder(h, edge_index, edge_weight)
        return torch.cat([z, h], dim=1) if self.skip else z

    def forward(self, x, edge_index, edge_weight=None):
        return self.head(self.features(x, edge_index, edge_weight))


# ----------------------------------------------------------------------------------------------
# graph views


@dataclass
class _Sub:
    """A subgraph ready for the model: global node ids, local edges (+ GCN weights), and where
    the cells of interest sit in it."""

    nodes: np.ndarray
    edge_index: torch.Tensor
    edge_weight: torch.Tensor | None
    pos: np.ndarray  # local positions of the cells of interest
    cells: np.ndarray  # their global ids


class GraphView:
    """The radius graph of a slide, built once, and the subgraphs the model runs on."""

    def __init__(self, data: SpatialDataset, cfg: GnnMaskConfig):
        self.cfg = cfg
        if data.spatial_graph is not None:  # the user's own (squidpy) graph
            self.graph: CellGraph = data.spatial_graph
            self.radius, self.radius_rule = float("nan"), "the slide's squidpy graph (obsp['spatial_connectivities'])"
        else:
            self.radius, self.radius_rule = cfg.graph_radius(data.coords, data.section)
            self.graph = radius_graph(data.coords, self.radius, data.section)
        self.degree = self.graph.degrees().astype(np.float64)
        self.section = data.section
        self._coords = data.coords
        self.n_sections = data.n_sections
        self.num_hops = int(cfg.num_hops) if cfg.num_hops is not None else len(cfg.hidden_dims)
        self.sampler = EgoNetSampler(self.graph, self.num_hops) if cfg.graph_mode == "egonet" else None
        self._section_cache: dict[int, tuple] = {}

    def _weights(self, nodes: np.ndarray, edge_index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Local edges plus self loops; for GCN the weights 1/sqrt((d_i+1)(d_j+1)) of the whole graph."""
        n = len(nodes)
        loops = np.arange(n, dtype=np.int64)
        ei = np.concatenate([edge_index, np.stack([loops, loops])], axis=1) if self.cfg.encoder == "gcn" \
            else edge_index
        if self.cfg.encoder != "gcn":
            return torch.from_numpy(np.ascontiguousarray(ei)), None
        d = self.degree[nodes] + 1.0
        w = 1.0 / np.sqrt(d[ei[0]] * d[ei[1]])
        return torch.from_numpy(np.ascontiguousarray(ei)), torch.from_numpy(w.astype(np.float32))

    def section_sub(self, s: int) -> tuple[np.ndarray, torch.Tensor, torch.Tensor | None]:
        if s not in self._section_cache:
            nodes = np.flatnonzero(self.section == s)
            ei, _ = self.graph.subgraph(nodes)
            self._section_cache[s] = (nodes, *self._weights(nodes, ei))
        return self._section_cache[s]

    def whole(self, sections: list[int], cells: np.ndarray | None = None) -> _Sub:
        """Several whole sections as one (block-diagonal) graph; `cells` = cells of interest."""
        parts = [self.section_sub(s) for s in sections]
        if len(parts) == 1:
            nodes, ei, ew = parts[0]
        else:
            offsets = np.cumsum([0] + [len(p[0]) for p in parts[:-1]])
            nodes = np.concatenate([p[0] for p in parts])
            ei = torch.cat([p[1] + int(o) for p, o in zip(parts, offsets)], dim=1)
            ew = None if parts[0][2] is None else torch.cat([p[2] for p in parts])
        if cells is None:
            pos = np.arange(len(nodes))
            cells = nodes
        else:
            order = np.argsort(nodes)
            pos = order[np.searchsorted(nodes, cells, sorter=order)]
        return _Sub(nodes, ei, ew, pos, cells)

    def subgraphs(self, cells: np.ndarray, *, shuffle: bool = False, rng=None,
                  sections_per_step: int = 1) -> Iterator[_Sub]:
        """Subgraphs covering `cells`: whole sections (whole mode) or ego-net batches (egonet mode)."""
        cells = np.asarray(cells, dtype=np.int64)
        if self.sampler is not None:
            for b in self.sampler.batches(cells, self.cfg.batch_size, shuffle=shuffle, rng=rng):
                ei, ew = self._weights(b.nodes, b.edge_index)
                yield _Sub(b.nodes, ei, ew, b.center_pos, b.centers)
            return
        secs = np.unique(self.section[cells])
        if shuffle:
            secs = (rng or np.random.default_rng()).permutation(secs)
        cell_sec = self.section[cells]
        for i in range(0, len(secs), max(1, sections_per_step)):
            group = [int(s) for s in secs[i:i + sections_per_step]]
            yield self.whole(group, cells[np.isin(cell_sec, group)])

    def step_parts(self, cells: np.ndarray, *, rng, sections_per_step: int = 1) -> Iterator[tuple[str, Any]]:
        """The training steps of an epoch before any subgraph is built: ("egonet", centre cells) or
        ("whole", section codes), in the order `subgraphs(..., shuffle=True)` would take them (the
        same random draws), so that each rank can build only its own part of a step."""
        cells = np.asarray(cells, dtype=np.int64)
        if self.sampler is not None:
            bs = self.cfg.batch_size
            if len(cells) > bs:
                self.sampler.prepare_batches()
            if self.cfg.egonet_order == "spatial":
                for step in self.tile_steps(cells, rng):
                    yield "egonet", step
                return
            cells = rng.permutation(cells)
            for start in range(0, len(cells), bs):
                yield "egonet", cells[start:start + bs]
            return
        secs = rng.permutation(np.unique(self.section[cells]))
        for i in range(0, len(secs), max(1, sections_per_step)):
            yield "whole", [int(s) for s in secs[i:i + sections_per_step]]

    def tile_steps(self, cells: np.ndarray, rng) -> list[np.ndarray]:
        """egonet_order=spatial: the centre cells of each step, one square tile of about batch_size
        of `cells` per step (per section, at a random offset), tiles of more than 1.5 x batch_size cut
        into strips along x; steps in random order. Loops over tiles (~cells / batch_size), not cells."""
        if not len(cells):
            return []
        bs = self.cfg.batch_size
        ordered, key = self._tile_order(cells, rng)
        bounds = np.flatnonzero(np.diff(key)) + 1
        steps: list[np.ndarray] = []
        for tile in np.split(ordered, bounds):
            steps.extend(np.array_split(tile, int(np.ceil(len(tile) / bs))) if len(tile) > 1.5 * bs else [tile])
        return [steps[i] for i in rng.permutation(len(steps))]

    def _tile_order(self, cells: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
        """(`cells` ordered tile by tile, then by x within a tile; their tile keys) for square tiles of
        about batch_size cells, per section, at a random offset."""
        xy = self._coords[cells]
        sec = self.section[cells]
        n_sec = int(sec.max()) + 1 if len(sec) else 1
        lo = np.full((n_sec, 2), np.inf)
        hi = np.full((n_sec, 2), -np.inf)
        np.minimum.at(lo, sec, xy)
        np.maximum.at(hi, sec, xy)
        counts = np.bincount(sec, minlength=n_sec).astype(np.float64)
        area = np.prod(np.maximum(hi - lo, 1e-9), axis=1) * (np.pi / 4)  # sections are roughly elliptic
        side = np.sqrt(self.cfg.batch_size * area / np.maximum(counts, 1))  # a tile holds ~batch_size cells
        rel = (xy - lo[sec]) / side[sec, None] + rng.random(2)  # the same random offset for every section
        tile = np.floor(rel).astype(np.int64)
        width = int(tile[:, 0].max()) + 1 if len(tile) else 1
        key = (sec.astype(np.int64) * (int(tile[:, 1].max()) + 1 if len(tile) else 1) + tile[:, 1]) * width + tile[:, 0]
        order = np.lexsort((xy[:, 0], key))
        return cells[order], key[order]

    def egonet_sub(self, centres: np.ndarray) -> _Sub:
        """The union of the ego-nets of `centres` as a subgraph (egonet mode)."""
        b = self.sampler.sample(centres)
        ei, ew = self._weights(b.nodes, b.edge_index)
        return _Sub(b.nodes, ei, ew, b.center_pos, b.centers)

    def n_subgraphs(self, n_cells: int, n_sections_hit: int, sections_per_step: int = 1) -> int:
        if self.sampler is not None:
            return int(np.ceil(n_cells / self.cfg.batch_size))
        return int(np.ceil(n_sections_hit / max(1, sections_per_step)))


class _Step:
    """One pretraining step before its subgraph is built: kind "egonet" (what = centre cells) or
    "whole" (what = section codes), and the seed of its mask.

    The mask is a function of (seed, cell id), so a cell is hidden alike in whichever subgraph or
    rank holds it: random_cells hides, in whole mode, exactly round(ratio x cells) of the step's
    sections' cells (those with the smallest keyed numbers), in egonet mode each cell with
    probability ratio (the step's union of ego-nets is not known to any one rank); cell_types hides
    those types. Unpacks as (subgraph, mask) of the whole step, as one process sees it."""

    def __init__(self, method: "GnnMask", kind: str, what, seed: int):
        self.method, self.kind, self.what, self.seed = method, kind, what, int(seed)
        self._threshold: float | None = None
        self._full = None

    def mask(self, nodes: np.ndarray) -> np.ndarray:
        m = self.method
        cfg = m.config.mask
        if cfg.strategy == "cell_types":
            return draw_cell_mask(cfg, len(nodes), None, labels=m.data.labels[nodes], label_names=m.data.label_names)
        from ..distributed import keyed_uniform

        if self._threshold is None:
            self._threshold = float(cfg.ratio)
            if self.kind == "whole":
                keys = keyed_uniform(self.seed, np.concatenate(self.section_cells()))
                k = max(1, int(round(cfg.ratio * len(keys)))) if len(keys) else 0
                self._threshold = float(np.partition(keys, k - 1)[k - 1]) if k else -1.0
        u = keyed_uniform(self.seed, nodes)
        return u <= self._threshold if self.kind == "whole" else u < self._threshold

    def section_cells(self) -> list[np.ndarray]:
        return [self.method.view.section_sub(s)[0] for s in self.what]

    def full(self) -> tuple["_Sub", np.ndarray]:
        if self._full is None:
            view = self.method.view
            sub = view.egonet_sub(self.what) if self.kind == "egonet" else view.whole(self.what)
            self._full = (sub, self.mask(sub.nodes))
        return self._full

    def __iter__(self):
        return iter(self.full())

    def __getitem__(self, i):
        return self.full()[i]

    def __len__(self) -> int:
        return 2


class _Batches:
    """A lazily generated, sized sequence of training batches (so the Trainer can show n_steps)."""

    def __init__(self, make: Callable[[], Iterator], n: int):
        self.make, self.n = make, n

    def __len__(self):
        return self.n

    def __iter__(self):
        return iter(self.make())


# ----------------------------------------------------------------------------------------------
# the method


class _FinetuneStopped(Exception):
    """Fine-tuning was stopped by the user before its first epoch."""


@register
class GnnMask(SSLMethod):
    name = NAME
    config_class = GnnMaskConfig

    def __init__(self, config: GnnMaskConfig | None = None):
        super().__init__(config)
        self.genes: list[str] = []
        self.label_names: list[str] = []
        self.gene_mean: np.ndarray | None = None
        self.view: GraphView | None = None

    # -- data access ------------------------------------------------------------------------
    def _setup_data(self, data: SpatialDataset) -> None:
        self.data = data
        self.config.validate()
        self.view = GraphView(data, self.config)
        nbytes = data.n_cells * data.n_genes * 4
        self._dense = data.dense_rows(slice(None)) if nbytes <= self.config.dense_cache_gb * 1e9 else None

    def _x(self, nodes: np.ndarray) -> torch.Tensor:
        rows = self._dense[nodes] if self._dense is not None else self.data.dense_rows(nodes)
        return torch.from_numpy(np.ascontiguousarray(rows))

    # -- pretraining ------------------------------------------------------------------------
    def prepare(self, data: SpatialDataset) -> None:
        cfg = self.config
        torch.manual_seed(cfg.seed)
        self._setup_data(data)
        self.genes = [str(g) for g in data.gene_names]
        n = data.n_cells
        rng = np.random.default_rng([cfg.seed, 7])  # held-out draws, separate from the training stream
        self.eval_mask = draw_cell_mask(cfg.mask, n, rng, labels=data.labels, label_names=data.label_names,
                                        adjacency=self.view.graph.to_scipy())
        random_strategy = cfg.mask.strategy in ("random_cells", "niches")
        self.eval_held_out = random_strategy
        pool = np.flatnonzero(~self.eval_mask) if random_strategy else np.arange(n)
        n_val = int(round(cfg.val_fraction * n))
        self.val_cells = np.sort(rng.choice(pool, size=min(n_val, len(pool), cfg.max_val_cells),
                                            replace=False)) if n_val else np.zeros(0, np.int64)
        held = np.zeros(n, bool)
        held[self.val_cells] = True
        if random_strategy:
            held |= self.eval_mask
        self.target_ok = ~held
        self.gene_mean, gene_std = self._mean_std(np.flatnonzero(self.target_ok))
        self.model = self.build_model_for(n_classes=0)
        if cfg.standardize_input:
            self.model.input_norm.set(self.gene_mean, gene_std)

    def training_memory(self):
        """Peak memory of one pretraining step (budget.MemoryEstimate): the largest whole-section step
        (sections_per_step sections with the most edges), or the largest of a few sampled ego-net
        batches (egonet mode)."""
        from ..budget import MemoryEstimate, adam_bytes, graph_step_bytes

        cfg, view, data = self.config, self.view, self.data
        if view.sampler is None:
            nodes = np.bincount(data.section, minlength=data.n_sections).astype(np.float64)
            edges = np.bincount(data.section, weights=view.degree, minlength=data.n_sections)
            top = np.argsort(-edges)[:max(1, cfg.sections_per_step)]
            n, e = float(nodes[top].sum()), float(edges[top].sum())
        else:
            rng = np.random.default_rng(cfg.seed)
            cells = rng.choice(data.n_cells, size=min(data.n_cells, 3 * cfg.batch_size), replace=False)
            sizes = [(len(b.nodes), b.edge_index.shape[1])
                     for b in view.sampler.batches(cells, cfg.batch_size, shuffle=False)]
            n, e = (float(v) for v in max(sizes, key=lambda t: t[1]))
        e_all = e + n if cfg.encoder == "gcn" else e
        parts = graph_step_bytes(n, e_all, len(self.genes), list(cfg.hidden_dims), conv=cfg.encoder,
                                 heads=cfg.heads, decoder_dims=(cfg.decoder_hidden, len(self.genes)))
        parts["parameters and optimiser"] = adam_bytes(sum(p.numel() for p in self.model.parameters()))
        if self._dense is not None:
            parts["cached expression"] = float(self._dense.nbytes)
        total = sum(parts.values())

        def fit(fraction: float) -> str:
            # the radius at which cells have few enough neighbours: the edges scale with the mean degree
            from ..graphs.spacing import neighbour_distance

            k = max(1, int(float(view.degree.mean()) * fraction * 0.8))
            r = neighbour_distance(data.coords, data.section, k=k)
            radius = f"--set radius={r:.3g} (now {view.radius:.3g}, coordinate units: about {k} neighbours per cell)"
            if view.sampler is not None:
                return f"use --set batch_size={max(1, int(cfg.batch_size * fraction * 0.8))} (now {cfg.batch_size}) " \
                       f"or {radius}"
            if view.degree.mean() < 200:  # ego-nets help when a cell's neighbourhood is small
                return f"use {radius}, or --set graph_mode=egonet --set batch_size={max(16, int(256 * fraction))}"
            return f"use {radius}"

        return MemoryEstimate(total, parts, fit)

    # -- the view (see SSLMethod) -------------------------------------------------------------
    def graph_radius(self, data: SpatialDataset) -> tuple[float, str]:
        return self.config.graph_radius(data.coords, data.section)

    def preview_graph(self, data: SpatialDataset) -> CellGraph:
        if data.spatial_graph is not None:
            return data.spatial_graph
        return radius_graph(data.coords, self.graph_radius(data)[0], data.section)

    def view_hops(self) -> int:
        cfg = self.config
        return int(cfg.num_hops) if cfg.num_hops is not None else len(cfg.hidden_dims)

    def _mean_std(self, cells: np.ndarray, block: int = 262_144) -> tuple[np.ndarray, np.ndarray]:
        """Per-gene mean and s.d. over `cells`, in row blocks (no copy of the cells' expression:
        at atlas scale that copy and its square were ~7 GB)."""
        X = self.data.X
        keep = np.zeros(X.shape[0], bool)
        keep[np.asarray(cells, np.int64)] = True
        s1 = np.zeros(X.shape[1])
        s2 = np.zeros(X.shape[1])
        for start in range(0, X.shape[0], block):
            rows = np.flatnonzero(keep[start:start + block]) + start
            if not len(rows):
                continue
            sub = X[rows]
            if sp.issparse(sub):
                sub = sp.csr_matrix(sub)
                s1 += np.asarray(sub.sum(axis=0), np.float64).ravel()
                s2 += np.bincount(sub.indices, weights=np.asarray(sub.data, np.float64) ** 2, minlength=X.shape[1])
            else:
                sub = np.asarray(sub, np.float64)
                s1 += sub.sum(0)
                s2 += (sub * sub).sum(0)
        n = max(int(keep.sum()), 1)
        mean = s1 / n
        var = np.maximum(s2 / n - mean ** 2, 0.0)
        return mean.astype(np.float32), np.sqrt(var).astype(np.float32)

    def build_model_for(self, n_classes: int) -> GnnMaskModel:
        return GnnMaskModel(len(self.genes), self.config, n_classes)

    def build_model(self) -> torch.nn.Module:
        return self.build_model_for(len(self.label_names))

    def set_shard(self, ctx) -> None:
        """Train as one rank of several (distributed.DistContext; None = alone): every rank walks the
        same steps; a rank builds the ego-nets of its share of each step's centre cells, or its share
        of the step's sections (whole mode), and returns its share of the loss."""
        if ctx is not None and ctx.active and self.config.mask.strategy == "niches":
            raise SpatialDataError("gnn-mask: mask.strategy=niches is drawn on each step's whole subgraph, which no "
                                   "rank holds with several devices; use random_cells or cell_types, or --devices 1.")
        self._shard = ctx if ctx is not None and ctx.active else None

    def train_batches(self, epoch: int, rng: np.random.Generator):
        cfg = self.config
        # whole mode: every node is in the graph anyway; egonet mode: only scorable centres
        cells = np.arange(self.data.n_cells) if self.view.sampler is None else np.flatnonzero(self.target_ok)
        spp = cfg.sections_per_step
        n = self.view.n_subgraphs(len(cells), self.data.n_sections, spp)
        tiles = None
        if self.view.sampler is not None and cfg.egonet_order == "spatial" and cfg.mask.strategy != "niches":
            tiles = self.view.tile_steps(cells, rng)  # drawn now: the number of steps depends on the tiles
            n = len(tiles)

        if cfg.mask.strategy == "niches":  # niches are drawn on each step's subgraph (one process only)
            def make():
                for sub in self.view.subgraphs(cells, shuffle=True, rng=rng, sections_per_step=spp):
                    yield sub, self._draw_train_mask(sub, rng)

            return _Batches(make, n)

        def steps():
            # Steps carry their mask's seed (see _Step), so that ranks can each build part of a step.
            parts = (("egonet", t) for t in tiles) if tiles is not None else \
                self.view.step_parts(cells, rng=rng, sections_per_step=spp)
            for kind, what in parts:
                yield _Step(self, kind, what, int(rng.integers(2**63)))

        return _Batches(steps, n)

    def scored(self, sub: _Sub, mask: np.ndarray) -> np.ndarray:
        """The subgraph nodes a step's loss scores: its units (whole mode: every node; ego-nets: the
        centres) that are masked and have a reconstruction target."""
        score = np.zeros(len(sub.nodes), bool)
        score[sub.pos] = True
        score &= mask & self.target_ok[sub.nodes]
        return score

    def _step_loss(self, step: "_Step", device) -> torch.Tensor:
        """This rank's share of a step's loss: squared error over the scored (masked, scorable)
        cells it holds, divided by (scored cells of the whole step) x genes."""
        from ..distributed import balanced_groups, split_range

        ctx = getattr(self, "_shard", None)
        rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
        view = self.view
        if step.kind == "egonet":
            centres = step.what
            n_scored = int((step.mask(centres) & self.target_ok[centres]).sum())
            mine = centres[split_range(len(centres), rank, world)]
            sub = view.egonet_sub(mine) if len(mine) and n_scored else None
        else:
            nodes = step.section_cells()
            n_scored = int(sum((step.mask(c) & self.target_ok[c]).sum() for c in nodes))
            share = balanced_groups([len(c) for c in nodes], world)[rank]
            sub = view.whole([step.what[i] for i in share]) if share and n_scored else None
        loss = None
        if sub is not None:
            mask = step.mask(sub.nodes)
            score = self.scored(sub, mask)
            loss = self._masked_loss(sub, mask, score, device, reduction="sum")
        if loss is None:  # nothing scored here: a zero loss that keeps the graph (and every gradient)
            return sum(p.sum() * 0.0 for p in self.model.parameters() if p.requires_grad)
        return loss / float(n_scored * len(self.genes))

    def _draw_train_mask(self, sub: _Sub, rng: np.random.Generator) -> np.ndarray:
        """A new mask on the subgraph's nodes by the configured strategy."""
        cfg = self.config.mask
        labels = self.data.labels[sub.nodes] if self.data.labels is not None else None
        adj = None
        if cfg.strategy == "niches":
            ei = sub.edge_index.numpy()
            adj = sp.csr_matrix((np.ones(ei.shape[1], np.float32), (ei[1], ei[0])),
                                shape=(len(sub.nodes), len(sub.nodes)))
        return draw_cell_mask(cfg, len(sub.nodes), rng, labels=labels, label_names=self.data.label_names,
                              adjacency=adj)

    def _masked_loss(self, sub: _Sub, mask: np.ndarray, score: np.ndarray, device,
                     reduction: str = "mean") -> torch.Tensor | None:
        """MSE (or with reduction='sum' the squared error) over all genes of the nodes in `score`
        (local, bool) with the nodes in `mask` hidden; only those nodes are decoded."""
        sel_np = np.flatnonzero(score)
        if len(sel_np) == 0:
            return None
        x = self._x(sub.nodes).to(device, non_blocking=True)
        ei = sub.edge_index.to(device)
        ew = sub.edge_weight.to(device) if sub.edge_weight is not None else None
        m = torch.from_numpy(mask).to(device)
        sel = torch.from_numpy(sel_np).to(device)
        _, rec = self.model(x, ei, ew, m, decode_rows=sel)
        return F.mse_loss(rec.float(), x[sel].float(), reduction=reduction)

    def training_loss(self, batch, device) -> dict[str, torch.Tensor]:
        if isinstance(batch, _Step):
            return {"loss": self._step_loss(batch, device)}
        sub, mask = batch
        score = self.scored(sub, mask)
        loss = self._masked_loss(sub, mask, score, device)
        if loss is None:  # no scorable masked cell in this batch: a zero loss that keeps the graph
            loss = sum(p.sum() * 0.0 for p in self.model.parameters() if p.requires_grad)
        return {"loss": loss}

    def validation_loss(self, device) -> float | None:
        if len(self.val_cells) == 0:
            return None
        mask_global = np.zeros(self.data.n_cells, bool)
        mask_global[self.val_cells] = True
        _, rec, tgt = self._reconstruct(self.val_cells, mask_global, device)
        return float(((rec - tgt) ** 2).mean())

    # -- inference helpers ------------------------------------------------------------------
    @torch.no_grad()
    def _reconstruct(self, cells: np.ndarray, mask_global: np.ndarray, device, model: GnnMaskModel | None = None,
                     *, outputs: bool = True):
        """(embeddings, reconstruction, input) of `cells` with the cells in `mask_global` hidden;
        `outputs=False`: embeddings only (reconstruction and input None: no (cells x genes) arrays)."""
        model = model or self.model
        model.eval()
        emb = np.zeros((len(cells), self.config.hidden_dims[-1]), np.float32)
        rec = np.zeros((len(cells), len(self.genes)), np.float32) if outputs else None
        tgt = np.zeros_like(rec) if outputs else None
        where = np.empty(self.data.n_cells, np.int64)
        where[cells] = np.arange(len(cells))
        for sub in self.view.subgraphs(cells, sections_per_step=1):
            x = self._x(sub.nodes)
            m = torch.from_numpy(mask_global[sub.nodes]).to(device)
            z, r = model(x.to(device), sub.edge_index.to(device),
                         None if sub.edge_weight is None else sub.edge_weight.to(device), m)
            rows = where[sub.cells]
            pos = torch.from_numpy(sub.pos).to(device)
            emb[rows] = z[pos].float().cpu().numpy()
            if outputs:
                rec[rows] = r[pos].float().cpu().numpy()
                tgt[rows] = x[sub.pos].numpy()
        return emb, rec, tgt

    @torch.no_grad()
    def reconstruct_hidden(self, hidden: np.ndarray, device) -> np.ndarray:
        """(len(hidden), n_genes) every gene of the `hidden` cells reconstructed with all of them masked
        at once (their input replaced by the mask token: the pretext task on a region the user chose),
        in the model's input space."""
        mask = np.zeros(self.data.n_cells, bool)
        mask[np.asarray(hidden, np.int64)] = True
        self.model.to(device)
        _, rec, _ = self._reconstruct(np.asarray(hidden, np.int64), mask, device)
        return rec

    def _embed_and_reconstruct(self, eval_mask: np.ndarray, device):
        """Embeddings of every cell (nothing hidden), the reconstruction layer under
        `eval.reconstruction` (all cells: dense; masked only: sparse rows, never a dense
        (cells x genes) array; none: None) and (reconstruction, input) of the masked cells."""
        n = self.data.n_cells
        all_cells = np.arange(n)
        emb, _, _ = self._reconstruct(all_cells, np.zeros(n, bool), device, outputs=False)
        policy = self.config.eval.reconstruction_policy(n, len(self.genes))
        masked = np.flatnonzero(eval_mask)
        if policy == "all":
            _, rec, tgt = self._reconstruct(all_cells, eval_mask, device)
            return emb, rec, rec[masked], tgt[masked]
        _, rec_m, tgt_m = self._reconstruct(masked, eval_mask, device)
        layer = None
        if policy == "masked" and len(masked):
            layer = rows_as_csr(rec_m, masked, n)
        return emb, layer, rec_m, tgt_m

    @torch.no_grad()
    def _classify(self, cells: np.ndarray, model: CellTypeModel, device) -> np.ndarray:
        """Class logits of `cells` (nothing masked)."""
        model.eval()
        out = None
        where = np.empty(self.data.n_cells, np.int64)
        where[cells] = np.arange(len(cells))
        for sub in self.view.subgraphs(cells):
            logits = model(self._x(sub.nodes).to(device), sub.edge_index.to(device),
                           None if sub.edge_weight is None else sub.edge_weight.to(device))
            part = logits[torch.from_numpy(sub.pos).to(device)].float().cpu().numpy()
            if out is None:
                out = np.zeros((len(cells), part.shape[1]), np.float32)
            out[where[sub.cells]] = part
        return out

    def _neighbor_mean(self, cells: np.ndarray, mask_global: np.ndarray) -> np.ndarray:
        """Mean expression of each cell's visible (unmasked) neighbours; the training mean where
        a cell has none."""
        if len(cells) > 65_536:  # in blocks: A[cells] @ X of a million cells is a few GB of products
            return np.concatenate([self._neighbor_mean(cells[i:i + 65_536], mask_global)
                                   for i in range(0, len(cells), 65_536)])
        A = self.view.graph.to_scipy()[cells]
        A = A @ sp.diags((~mask_global).astype(np.float32))
        A = sp.csr_matrix(A)
        deg = np.asarray(A.sum(axis=1)).ravel()
        X = self.data.X if sp.issparse(self.data.X) else np.asarray(self.data.X)
        sums = A @ X
        sums = sums.toarray() if sp.issparse(sums) else np.asarray(sums)
        out = np.where(deg[:, None] > 0, sums / np.maximum(deg, 1)[:, None], self.gene_mean[None, :])
        return out.astype(np.float32)

    def _reconstruction_metrics(self, mask_global: np.ndarray, rec_masked: np.ndarray,
                                tgt_masked: np.ndarray) -> dict:
        cells = np.flatnonzero(mask_global)
        # sums over row blocks: at atlas scale each (masked cells x genes) temporary is ~2 GB
        n_val = max(tgt_masked.size, 1)
        col_mean = tgt_masked.mean(0, dtype=np.float64)
        sse = sst = base_mean = base_nb = 0.0
        for i in range(0, len(cells), 65_536):
            t = tgt_masked[i:i + 65_536].astype(np.float64)
            sse += float(((rec_masked[i:i + 65_536] - t) ** 2).sum())
            sst += float(((t - col_mean) ** 2).sum())
            base_mean += float(((self.gene_mean[None, :] - t) ** 2).sum())
            base_nb += float(((self._neighbor_mean(cells[i:i + 65_536], mask_global) - t) ** 2).sum())
        return {
            "masked_mse": sse / n_val,
            "masked_r2": 1.0 - sse / sst if sst > 0 else None,
            "n_masked_cells": int(len(cells)),
            "baselines": {
                "train_mean": base_mean / n_val,
                "neighbor_mean": base_nb / n_val,
            },
        }

    # -- downstream -------------------------------------------------------------------------
    def evaluate(self, data: SpatialDataset, device, make_trainer) -> MethodResults:
        cfg = self.config
        emb, layer, rec_m, tgt_m = self._embed_and_reconstruct(self.eval_mask, device)
        metrics = {
            "graph": {**self.view.graph.summary(), "radius_rule": self.view.radius_rule},
            "graph_mode": cfg.graph_mode,
            "reconstruction": {
                **self._reconstruction_metrics(self.eval_mask, rec_m, tgt_m),
                "eval_cells_held_out": bool(self.eval_held_out),
                "n_val_cells": int(len(self.val_cells)),
            },
        }
        results = MethodResults(
            obsm={f"X_{NAME}": emb},
            layers={} if layer is None else {f"{NAME}_reconstruction": layer},
            obs={f"{NAME}_masked": self.eval_mask.copy()},
            metrics=metrics,
        )
        if data.labels is not None:
            try:
                ct, pred = self._cell_types(data, device, make_trainer)
            except _FinetuneStopped:
                # Scores of an untrained head would be misleading: report the skip instead.
                metrics["cell_type"] = {"skipped": "training was stopped by the user before fine-tuning"}
                return results
            metrics["cell_type"] = ct
            import pandas as pd

            results.obs[f"{NAME}_cell_type"] = pd.Categorical.from_codes(pred, categories=self.label_names)
        return results

    @classmethod
    def check_data(cls, data: SpatialDataset, config: GnnMaskConfig) -> None:
        """Before training: fine-tuning (a label key given) needs a valid split and at least two
        label classes among the labelled cells of the training part."""
        if data.labels is None:
            return
        train, _test, _info = cls(config)._split(data)
        present = np.unique(data.labels[train][data.labels[train] >= 0])
        if len(present) < 2:
            names = [data.label_names[i] for i in present]
            raise SpatialDataError(
                f"label key {data.label_key!r}: the fine-tuning cells hold {len(present)} labelled class(es) "
                f"{names}; cell-type fine-tuning needs at least two (check --label-key, --ignore-labels and "
                "--train-sections, or leave --label-key out to pretrain only).")

    def _split(self, data: SpatialDataset) -> tuple[np.ndarray, np.ndarray, dict]:
        """Train / test cells for fine-tuning: by section names, or a default split."""
        ec = self.config.eval
        names = data.section_names
        for s in list(ec.train_sections) + list(ec.test_sections):
            data.section_code(s)  # clear error for an unknown section
        if ec.train_sections or ec.test_sections:
            test = list(ec.test_sections) or [s for s in names if s not in ec.train_sections]
            train = list(ec.train_sections) or [s for s in names if s not in test]
            overlap = set(train) & set(test)
            if overlap:
                raise SpatialDataError(f"sections {sorted(overlap)} are both train and test sections; "
                                       "held-out sections must never be seen in fine-tuning.")
        elif len(names) > 1:
            train, test = names[:-1], names[-1:]
        else:
            train = test = None
        if train is None:
            # one section: the left half (by x) fine-tunes, the right half is held out
            x = data.coords[:, 0]
            cut = np.median(x)
            tr, te = np.flatnonzero(x <= cut), np.flatnonzero(x > cut)
            # Labels of the right half are never used in fine-tuning; its expression is graph context
            # for the cells near the cut (whole mode) as it would be in any in-slide annotation task.
            return tr, te, {"split": "one section: x <= median trains, x > median tests"}
        tr = np.flatnonzero(np.isin(data.section, [data.section_code(s) for s in train]))
        te = np.flatnonzero(np.isin(data.section, [data.section_code(s) for s in test]))
        if not len(te) or not len(tr):
            raise SpatialDataError("fine-tuning needs at least one train and one test section.")
        return tr, te, {"split": "by section", "train_sections": list(train), "test_sections": list(test)}

    def _cell_types(self, data: SpatialDataset, device, make_trainer) -> tuple[dict, np.ndarray]:
        cfg, fc = self.config, self.config.finetune
        self.label_names = list(data.label_names)
        k = len(self.label_names)
        labels = data.labels
        train_cells, test_cells, split = self._split(data)
        lab_train = train_cells[labels[train_cells] >= 0]
        lab_test = test_cells[labels[test_cells] >= 0]
        if len(lab_train) == 0:
            raise SpatialDataError("no labelled cells in the training sections; check --label-key / --train-sections.")
        ft_train, ft_val = self._finetune_split(lab_train)

        def finetune(encoder: GraphEncoder, tag: str) -> tuple[CellTypeModel, dict, np.ndarray]:
            return self._finetune(encoder, ft_train, ft_val, train_cells, k, device, make_trainer, tag)

        all_cells = np.arange(data.n_cells)
        model, info, val_pred = finetune(self.model.encoder, "pretrained")
        logits = self._classify(all_cells, model, device)
        pred = logits.argmax(1)
        out = {**classification_scores(labels[lab_test], pred[lab_test]), **split, "mode": fc.mode,
               "class_weights": fc.class_weights, "n_train_cells": int(len(ft_train)),
               "n_val_cells": int(len(ft_val)), "n_test_cells": int(len(lab_test)), "refit": bool(fc.refit),
               "validation": classification_scores(labels[ft_val], val_pred), "finetune": info}
        # baselines on the same split
        torch_state = torch.random.get_rng_state()
        torch.manual_seed(cfg.seed + 1000)
        random_encoder = make_encoder(len(self.genes), cfg)
        torch.random.set_rng_state(torch_state)
        try:
            rmodel, rinfo, rval_pred = finetune(random_encoder, "random_init")
        except _FinetuneStopped:
            # Stopped before the baseline trained: the pretrained head's results stand on their own.
            random_init = {"skipped": "training was stopped by the user before this baseline was fine-tuned"}
        else:
            rpred = self._classify(all_cells, rmodel, device).argmax(1)
            random_init = {**classification_scores(labels[lab_test], rpred[lab_test]), "finetune": rinfo,
                           "validation": classification_scores(labels[ft_val], rval_pred)}
        lr_train = np.concatenate([ft_train, ft_val])
        lpred = logistic_regression_baseline(self.data.dense_rows(lr_train), labels[lr_train],
                                             self.data.dense_rows(lab_test), class_weights=fc.class_weights,
                                             seed=cfg.seed)
        out["baselines"] = {"random_init": random_init,
                            "expression_logreg": classification_scores(labels[lab_test], lpred)}
        self.model.cell_type = model.to(next(self.model.parameters()).device)
        return out, pred

    def _finetune_split(self, lab_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(fine-tuning train cells, validation cells) of the labelled training-section cells."""
        rng = np.random.default_rng([self.config.seed, 11])
        n_val = int(round(self.config.finetune.val_fraction * len(lab_train)))
        perm = rng.permutation(lab_train)
        return np.sort(perm[n_val:]), np.sort(perm[:n_val])

    def _finetune(self, encoder: GraphEncoder, ft_train: np.ndarray, ft_val: np.ndarray,
                  section_cells: np.ndarray, k: int, device, make_trainer,
                  tag: str) -> tuple[CellTypeModel, dict, np.ndarray]:
        """Fine-tune a copy of `encoder` + a new head: early stopping on `ft_val`; with
        ``finetune.refit`` then a fresh copy trained on ft_train + ft_val for the chosen number of
        epochs. Returns (model, info, the early-stopped model's predictions on ft_val)."""
        cfg, fc = self.config, self.config.finetune
        labels = self.data.labels
        weights = class_weight_vector(labels[ft_train], k, fc.class_weights)
        encoder_name = "pretrained encoder" if tag == "pretrained" else "random-init encoder, baseline"
        stage = f"fine-tuning cell types ({encoder_name})"

        def run(cells, val, epochs, patience):
            ct_model = CellTypeModel(copy.deepcopy(self.model.input_norm), copy.deepcopy(encoder),
                                     cfg.hidden_dims[-1], k, cfg.head_skip)
            if fc.dropout is not None:
                ct_model.encoder.dropout = float(fc.dropout)
            if fc.mode == "full" and fc.probe_epochs > 0:
                probe = replace(fc, mode="linear")
                ptask = _CellTypeTask(self, ct_model, cells, np.zeros(0, np.int64), section_cells, weights, probe,
                                      device)
                pcfg = TrainConfig(epochs=fc.probe_epochs, lr=fc.probe_lr, weight_decay=fc.weight_decay,
                                   seed=cfg.seed, device=str(device), amp=cfg.amp, patience=0)
                if make_trainer(pcfg, stage=f"{stage}: head only").fit(ptask).stopped_by_user:
                    raise _FinetuneStopped
                for p in ct_model.encoder.parameters():
                    p.requires_grad_(True)
            task = _CellTypeTask(self, ct_model, cells, val, section_cells, weights, fc, device)
            tcfg = TrainConfig(epochs=epochs, lr=fc.lr, weight_decay=fc.weight_decay, seed=cfg.seed,
                               device=str(device), amp=cfg.amp, patience=patience, grad_clip=cfg.grad_clip)
            result = make_trainer(tcfg, stage=stage if len(val) else f"{stage}: refit on all labelled cells").fit(task)
            if result.stopped_by_user and result.epochs_run == 0:
                raise _FinetuneStopped
            return ct_model, result

        ct_model, result = run(ft_train, ft_val, fc.epochs, fc.patience)
        info = {"epochs": result.epochs_run, "seconds": result.train_seconds, "best_epoch": result.best_epoch,
                "stage": tag, "stopped_by_user": bool(result.stopped_by_user)}
        val_pred = self._classify(ft_val, ct_model, device).argmax(1) if len(ft_val) else np.zeros(0, np.int64)
        if fc.refit and len(ft_val) and not result.stopped_by_user:
            n_epochs = result.best_epoch or result.epochs_run
            try:
                refit_model, refit = run(np.sort(np.concatenate([ft_train, ft_val])), np.zeros(0, np.int64),
                                         n_epochs, 0)
            except _FinetuneStopped:  # stopped before the refit trained: keep the early-stopped model
                info["refit_skipped"] = "training was stopped by the user before the refit"
            else:
                ct_model = refit_model
                info.update(refit_epochs=refit.epochs_run, refit_seconds=refit.train_seconds)
        return ct_model, info, val_pred

    # -- prediction on a new slide ----------------------------------------------------------
    def extra_state(self) -> dict:
        return {
            "genes": list(self.genes),
            "n_genes": len(self.genes),
            "label_names": list(self.label_names),
            "gene_mean": None if self.gene_mean is None else self.gene_mean.tolist(),
        }

    def load_extra_state(self, state: dict) -> None:
        self.genes = [str(g) for g in state.get("genes", [])]
        self.label_names = [str(c) for c in state.get("label_names", [])]
        gm = state.get("gene_mean")
        self.gene_mean = None if gm is None else np.asarray(gm, np.float32)

    def predict(self, data: SpatialDataset, device) -> MethodResults:
        cfg = self.config
        if self.model is None:
            raise SpatialDataError("gnn-mask: no trained model loaded; load one with pipeline.load_model.")
        if data.n_genes != len(self.genes):
            raise SpatialDataError(f"the slide has {data.n_genes} model genes, the model expects {len(self.genes)}.")
        self._setup_data(data)
        self.model.to(device)
        n = data.n_cells
        rng = np.random.default_rng([cfg.seed, 7])
        eval_mask = draw_cell_mask(cfg.mask, n, rng, labels=data.labels, label_names=data.label_names,
                                   adjacency=self.view.graph.to_scipy()) if cfg.mask.strategy != "cell_types" \
            else np.zeros(n, bool)
        all_cells = np.arange(n)
        emb, layer, rec_m, tgt_m = self._embed_and_reconstruct(eval_mask, device)
        if self.gene_mean is None:
            self.gene_mean = self._mean_std(all_cells)[0]
        metrics = {"graph": {**self.view.graph.summary(), "radius_rule": self.view.radius_rule}}
        if eval_mask.any():
            metrics["reconstruction"] = self._reconstruction_metrics(eval_mask, rec_m, tgt_m)
        results = MethodResults(obsm={f"X_{NAME}": emb},
                                layers={} if layer is None else {f"{NAME}_reconstruction": layer},
                                obs={f"{NAME}_masked": eval_mask}, metrics=metrics)
        if self.model.cell_type is not None and self.label_names:
            import pandas as pd

            pred = self._classify(all_cells, self.model.cell_type, device).argmax(1)
            results.obs[f"{NAME}_cell_type"] = pd.Categorical.from_codes(pred, categories=self.label_names)
            if data.labels is not None:
                # map the slide's label names onto the model's classes; others count as unknown
                lookup = {c: i for i, c in enumerate(self.label_names)}
                remap = np.array([lookup.get(c, -1) for c in data.label_names] + [-1], np.int64)
                truth = remap[data.labels]  # label -1 indexes the trailing -1
                ok = truth >= 0
                metrics["cell_type"] = classification_scores(truth[ok], pred[ok])
        return results


class _CellTypeTask:
    """Fine-tuning as a TrainingTask: weighted cross-entropy on labelled training cells.

    'full': the encoder and head train on subgraphs of the training sections only (whole
    sections or ego-nets of training cells), so held-out sections are never seen.
    'linear': the encoder is frozen; embeddings of the training cells are computed once (on the
    same training-section subgraphs) and the head trains on them.
    """

    def __init__(self, method: GnnMask, model: CellTypeModel, train: np.ndarray, val: np.ndarray,
                 section_cells: np.ndarray, weights: np.ndarray, fc: FinetuneConfig, device):
        self.method, self.model, self.fc = method, model, fc
        self.train, self.val = train, val
        self.labels = method.data.labels
        self.section_cells = section_cells
        self.weight = torch.from_numpy(weights)
        self.linear = fc.mode == "linear"
        if self.linear:
            for p in model.encoder.parameters():
                p.requires_grad_(False)
            model.to(device)
            both = np.concatenate([train, val])
            z = self._embed(both, device)
            self.z_train, self.z_val = z[: len(train)], z[len(train):]

    @torch.no_grad()
    def _embed(self, cells: np.ndarray, device) -> torch.Tensor:
        self.model.eval()
        out = None
        where = np.empty(self.method.data.n_cells, np.int64)
        where[cells] = np.arange(len(cells))
        m = self.method
        for sub in m.view.subgraphs(cells):
            z = self.model.features(m._x(sub.nodes).to(device), sub.edge_index.to(device),
                                    None if sub.edge_weight is None else sub.edge_weight.to(device))
            if out is None:
                out = torch.zeros(len(cells), z.shape[1])
            out[torch.from_numpy(where[sub.cells])] = z[torch.from_numpy(sub.pos).to(device)].float().cpu()
        return out

    def on_epoch_start(self, epoch, device):
        if self.linear:
            self.model.encoder.eval()

    def train_batches(self, epoch, rng):
        if self.linear:
            perm = rng.permutation(len(self.train))
            bs = self.fc.batch_size
            return [perm[i:i + bs] for i in range(0, len(perm), bs)]
        m = self.method
        n = m.view.n_subgraphs(len(self.train), len(np.unique(m.data.section[self.train])), 1)
        return _Batches(lambda: m.view.subgraphs(self.train, shuffle=True, rng=rng), n)

    def _loss(self, logits, y, device):
        return F.cross_entropy(logits.float(), torch.from_numpy(y).to(device), weight=self.weight.to(device),
                               label_smoothing=self.fc.label_smoothing)

    def training_loss(self, batch, device):
        if self.linear:
            logits = self.model.head(self.z_train[torch.from_numpy(batch)].to(device))
            return {"loss": self._loss(logits, self.labels[self.train[batch]], device)}
        m, sub = self.method, batch
        logits = self.model(m._x(sub.nodes).to(device), sub.edge_index.to(device),
                            None if sub.edge_weight is None else sub.edge_weight.to(device))
        pos = torch.from_numpy(sub.pos).to(device)
        return {"loss": self._loss(logits[pos], self.labels[sub.cells], device)}

    def validation_loss(self, device):
        if len(self.val) == 0:
            return None
        if self.linear:
            logits = self.model.head(self.z_val.to(device))
        else:
            logits = torch.from_numpy(self.method._classify(self.val, self.model, device)).to(device)
        y = self.labels[self.val]
        if self.fc.early_stop_metric == "macro_f1":
            # weighted CE keeps falling on common classes while rare ones overfit; the score we
            # report is what should pick the epoch (on training-section cells only)
            pred = logits.argmax(1).cpu().numpy()
            return 1.0 - classification_scores(y, pred)["macro_f1"]
        return float(self._loss(logits, y, device))
