"""`patch-mae`: slides as croppable multi-channel images, pretrained with a masked autoencoder
(after Zhu, Qi et al., "Spatial Transcriptomics as Images for Large-Scale Pretraining",
arXiv 2603.13432, 2026; re-implemented from the paper's description).

View. Each section is rasterised to a lattice of square bins (``bin_size`` in the coordinates'
units; default one median nearest-neighbour distance, i.e. about one spot or cell per bin; several
cells in a bin are averaged, see graphs/lattice.py). Training samples are h x w patches of the
lattice (default 14 x 14, the paper's crop) with at least ``min_occupancy`` of their bins occupied,
each with m gene channels (default 200, the paper's; all genes when the panel is smaller) chosen by
variance-weighted sampling without replacement (weight = the gene's variance over the patch's
occupied bins). These three defaults (with 2 x 2-bin tokens) were chosen on the DLPFC tuning
slices' embedding probes (benchmarks/patch_mae.md, "Embeddings against PCA").

Model (models/vit.py). A token is a ``token_bins`` x ``token_bins`` group of bins (default 2); its
embedding projects every channel value onto a learned embedding of that channel's gene and sums,
so patches with different gene subsets share one model; fixed 2-D sin-cos positions. The encoder
sees only visible, occupied tokens; a light decoder fills in the masked ones and predicts the
patch's m channel values through a per-gene readout, added to a context base computed from the
visible bins only (``residual_readout``: 'local' = Gaussian-weighted mean of the visible occupied
bins around each bin with a learned bandwidth, 'attend', 'patch_mean', or 'none'); the readout
starts at zero (``readout_init_std=0``), so the untrained model predicts exactly its base.
Pretext: ``mask.ratio`` (default 0.75) of each patch's occupied tokens masked at random
(``mask.strategy='random_cells'``) or square regions (``'regions'``: ``mask.n_regions`` squares of
``mask.region_size`` tokens); by default (``region_mix=0.5``) half of the training patches hide 1 to
``mask.n_regions`` squares of side 1 to ``mask.region_size`` instead of random tokens. Loss:
squared error plus ``loss_l1`` (default 0.15) x absolute error, averaged over the masked,
occupied bins only, in the preprocessed expression space (normalised + log1p for counts) minus
each gene's mean (and divided by its s.d. with ``scale_genes``). Log-expression per spot is
zero-inflated and skewed, so its conditional median lies well below its mean; a small L1 term
moves the prediction from the mean part-way towards the median, which lowers the absolute error
at first order for a second-order cost in squared error (chosen on validation tiles, see
benchmarks/patch_mae.md).

Held-out patches. Before training, each section is cut into non-overlapping h x w tiles and a
``holdout_fraction`` of the tiles with at least ``min_occupancy`` occupied bins is held out (seeded
by ``holdout_seed``, the same for every training seed). No training patch overlaps a held-out tile
(windows touching one are never drawn). The held-out tiles give the validation loss and the
masked-region reconstruction benchmark.

Results (keys of models/base.py):

- ``obsm['X_patch-mae']``: encoder output at the cell's bin with nothing masked (with
  ``embed_readout='encoder+input'``, beside the bin's own input features), averaged over the
  patches that tile the section with a stride of ``embed_stride`` bins (default h / 2, so
  every bin is covered by up to four patches and never only at an edge), channels = the model's
  fixed ``channel_genes`` (the m genes of highest variance over all training bins);
- ``layers['patch-mae_reconstruction']``: per-cell *imputation* from the bin: over the same tiles,
  the occupied tokens of each patch are split into k = round(1 / (1 - mask.ratio)) random groups
  and the decoder predicts every model gene of each group's bins from the other groups' bins
  only (so a bin is never reconstructed from its own value); predictions are averaged over the
  tiles and groups covering the bin and mapped back to the preprocessed space; every cell gets its
  bin's value (cells sharing a bin share it). Shape (n_cells, n_model_genes).
- ``obs['patch-mae_domain']``: k-means (K = ``eval.n_domains``) on the embeddings of all
  sections jointly (``domain_clustering='joint'``) or per section; Leiden / GMM-BIC when K is
  not given.

Metrics: ``reconstruction`` (masked-region MSE / MAE on held-out tiles for square masks of
``eval_mask_sizes`` bins, against zeros, the patch's unmasked mean, nearest-unmasked-bin and
inverse-distance interpolation on the same masks; plus ``context_base``, the model's own residual
base without the decoder, to show what the decoder adds), ``domains`` (ari, nmi, accuracy, per_section),
``probes`` (k-NN and MLP on a stated fraction of labelled cells; accuracy, macro F1, ARI).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from ..config import DataConfig, EvalConfig, TrainConfig
from ..data.dataset import SpatialDataset
from ..data.io import SpatialDataError
from ..evaluation.clustering import domain_scores
from ..evaluation.probes import run_probes
from ..graphs.lattice import (
    Lattice,
    PatchBatch,
    build_lattices,
    extract_patches,
    select_channels,
    suggest_bin_size,
    tiled_origins,
)
from ..masking import MaskConfig, regions
from .base import MethodResults, SSLMethod, register
from .vit import EMBED_READOUTS, RESIDUAL_MODES, PatchMaskedAutoencoder, random_token_mask

NAME = "patch-mae"
MASK_STRATEGIES = ("random_cells", "regions")
BASELINES = ("zeros", "patch_mean", "nearest", "idw")


def _default_mask() -> MaskConfig:
    return MaskConfig(strategy="random_cells", ratio=0.75, region_size=4, n_regions=4)


@dataclass
class PatchMAEConfig(TrainConfig):
    """patch-mae settings. Units: bins (lattice cells) unless stated; bin_size in coordinate units.

    bin_size: bin side (None = ``bin_factor`` x the median nearest-neighbour distance);
    patch_size: h = w bins per patch; token_bins: bins per token side (divides patch_size);
    n_channels: m genes per patch (all genes when fewer); min_occupancy: fraction of a training
    patch's bins that must hold a cell; patches_per_epoch, batch_size: training patches;
    scale_genes: divide each gene by its s.d. (else only centred); dim/depth/heads: encoder,
    decoder_*: decoder; residual_readout: 'local' (default: a learned-bandwidth Gaussian mean of the
    visible bins around each bin plus the decoder's deviation), 'patch_mean' or 'none'
    (models/vit.py); readout_init_std: s.d. of the readout's gene table at the start (0 = the
    model starts exactly at its base; a random start stays as per-value noise on rarely drawn
    genes); decoder_deviation: add the readout to the base ('attend' may drop it); mask: pretext
    mask (random_cells = random tokens at mask.ratio, or regions); region_mix: fraction of training
    patches that hide random squares (1 to mask.n_regions of side 1 to mask.region_size tokens)
    instead; loss_l1: weight of the absolute-error term added to the squared error (0 = plain MSE);
    loss_per_patch: average the loss per patch first; holdout_fraction / holdout_seed: held-out tiles; eval_mask_sizes, eval_mask_regions,
    eval_mask_repeats: masked-region benchmark; embed_stride: tiling stride for per-cell outputs
    (None = patch_size // 2); embed_readout: what a cell's embedding is ('encoder': the encoder's
    output at its bin; 'encoder+input': that and the bin's own learned input features, 2 x dim);
    eval_batch_size: patches per forward pass at inference;
    probe_train_fraction / probe_k / probe_hidden: probes; domain_clustering: 'joint' | 'per_section';
    reconstruction_layer: write the per-cell imputation layer (n_cells x n_genes floats) when
    eval.reconstruction keeps every row (all, or auto below 5e8 values; patch-mae masks no cells);
    dense_cache_mb: memory for dense copies of the lattices' bins (faster patch cutting; lattices
    that do not fit are read from their sparse form).
    """

    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mask: MaskConfig = field(default_factory=_default_mask)
    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 0.05
    bin_size: float | None = None
    bin_factor: float = 1.0
    patch_size: int = 14
    token_bins: int = 2
    n_channels: int = 200
    min_occupancy: float = 0.3
    patches_per_epoch: int = 1024
    batch_size: int = 64
    scale_genes: bool = False
    dim: int = 64
    depth: int = 2
    heads: int = 4
    decoder_dim: int = 64
    decoder_depth: int = 1
    decoder_heads: int = 4
    residual_readout: str = "local"
    region_mix: float = 0.5
    loss_per_patch: bool = False
    loss_l1: float = 0.15
    readout_init_std: float = 0.0
    decoder_deviation: bool = True
    holdout_fraction: float = 0.15
    holdout_seed: int = 0
    eval_mask_sizes: list[int] = field(default_factory=lambda: [2, 4, 8])
    eval_mask_regions: int = 2
    eval_mask_repeats: int = 8
    embed_stride: int | None = None
    embed_readout: str = "encoder"
    eval_batch_size: int = 32
    probe_train_fraction: float = 0.2
    probe_k: int = 15
    probe_hidden: int = 64
    domain_clustering: str = "joint"
    reconstruction_layer: bool = True
    dense_cache_mb: float = 1024.0

    FIELD_DOCS = {
        "bin_size": "Side of one lattice bin, in slide units (empty = bin_factor x the median distance between "
                    "neighbouring cells: about one cell per bin).",
        "bin_factor": "When bin_size is empty: bins this many typical cell spacings wide.",
        "patch_size": "Patch side, in bins.",
        "token_bins": "Bins per token side (a token is token_bins x token_bins bins; divides patch_size).",
        "n_channels": "Genes per patch, drawn by variance-weighted sampling.",
        "min_occupancy": "Share of a training patch's bins that must hold a cell.",
        "patches_per_epoch": "Training patches per epoch.",
        "batch_size": "Patches per training step.",
        "scale_genes": "Divide each gene by its s.d. (else only centred).",
        "dim": "Width of the encoder (and of the embedding).",
        "depth": "Transformer layers of the encoder.",
        "heads": "Attention heads of the encoder.",
        "decoder_dim": "Width of the decoder.",
        "decoder_depth": "Transformer layers of the decoder.",
        "decoder_heads": "Attention heads of the decoder.",
        "residual_readout": "What a masked bin starts from: local (a learned Gaussian mean of the visible bins "
                            "around it), patch_mean, attend, or none.",
        "region_mix": "Share of training patches that hide squares instead of random tokens.",
        "loss_per_patch": "Average the loss per patch first.",
        "loss_l1": "Weight of the absolute-error term beside the squared error.",
        "readout_init_std": "s.d. of the gene readout's initial weights (0 = start at the residual base).",
        "decoder_deviation": "Add the decoder's correction to the base.",
        "holdout_fraction": "Share of each section's tiles held out from training (scored after).",
        "holdout_seed": "Seed of the held-out tiles.",
        "eval_mask_sizes": "Square sizes (bins) of the masked-region benchmark.",
        "eval_mask_regions": "Squares per held-out tile in the benchmark.",
        "eval_mask_repeats": "Draws per square size in the benchmark.",
        "embed_stride": "Tiling stride for the per-cell embeddings (empty = half a patch).",
        "embed_readout": "Per-cell embedding: encoder (the encoder's output at the cell's bin) or encoder+input "
                         "(beside it, the bin's own learned input features; twice as wide).",
        "eval_batch_size": "Patches per forward pass when embedding.",
        "probe_train_fraction": "Share of labelled cells the k-NN / MLP probes train on.",
        "probe_k": "Neighbours of the k-NN probe.",
        "probe_hidden": "Hidden width of the MLP probe.",
        "domain_clustering": "joint: domains over all sections together; per_section: each section alone.",
        "reconstruction_layer": "Write every cell's imputed expression (a cells x genes layer).",
        "dense_cache_mb": "Memory (MB) for dense copies of the lattices (faster patch cutting).",
    }
    PANELS = {"view": ("bin_size", "patch_size", "n_channels", "dim", "depth"),
              "train": ("epochs", "lr", "seed", "device", "eval.n_domains", "eval.domain_method"),
              "mask": ("mask.strategy", "mask.ratio", "mask.region_size", "mask.n_regions", "region_mix")}

    def validate(self) -> None:
        if self.patch_size < 2:
            raise SpatialDataError(f"patch_size must be at least 2 bins, got {self.patch_size}.")
        if self.token_bins < 1 or self.patch_size % self.token_bins:
            raise SpatialDataError(f"token_bins ({self.token_bins}) must divide patch_size ({self.patch_size}).")
        if self.mask.strategy not in MASK_STRATEGIES:
            raise SpatialDataError(
                f"patch-mae masks tokens with mask.strategy in {MASK_STRATEGIES}, got {self.mask.strategy!r}."
            )
        if not 0.0 < self.mask.ratio < 1.0:
            raise SpatialDataError(f"mask.ratio must be between 0 and 1 (exclusive), got {self.mask.ratio}.")
        if not self.decoder_deviation and self.residual_readout != "attend":
            raise SpatialDataError("decoder_deviation=false needs residual_readout='attend' (otherwise nothing the "
                                   "encoder computes reaches the prediction).")
        if not self.readout_init_std >= 0.0:
            raise SpatialDataError(f"readout_init_std must be >= 0, got {self.readout_init_std}.")
        if not self.loss_l1 >= 0.0:
            raise SpatialDataError(f"loss_l1 must be >= 0, got {self.loss_l1}.")
        if not 0.0 <= self.region_mix <= 1.0:
            raise SpatialDataError(f"region_mix must be in [0, 1], got {self.region_mix}.")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise SpatialDataError(f"holdout_fraction must be in [0, 1), got {self.holdout_fraction}.")
        if not 0.0 <= self.min_occupancy <= 1.0:
            raise SpatialDataError(f"min_occupancy must be in [0, 1], got {self.min_occupancy}.")
        if self.embed_readout not in EMBED_READOUTS:
            raise SpatialDataError(f"embed_readout must be one of {EMBED_READOUTS}, got {self.embed_readout!r}.")
        if self.residual_readout not in RESIDUAL_MODES:
            raise SpatialDataError(f"residual_readout must be one of {RESIDUAL_MODES}, got {self.residual_readout!r}.")
        if self.domain_clustering not in ("joint", "per_section"):
            raise SpatialDataError(f"domain_clustering must be 'joint' or 'per_section', got {self.domain_clustering!r}.")
        if self.dim % 4 or self.decoder_dim % 4 or self.dim % self.heads or self.decoder_dim % self.decoder_heads:
            raise SpatialDataError("dim / decoder_dim must be divisible by 4 and by their number of heads.")
        bad = [s for s in self.eval_mask_sizes if not 1 <= int(s) <= self.patch_size]
        if bad:
            raise SpatialDataError(f"eval_mask_sizes {bad} must lie between 1 and patch_size ({self.patch_size}).")
        if self.n_channels < 1 or self.batch_size < 1 or self.patches_per_epoch < 1:
            raise SpatialDataError("n_channels, batch_size and patches_per_epoch must be positive.")


class PatchMAEModel(nn.Module):
    """The masked autoencoder plus the per-gene centring / scaling it was trained with (buffers,
    so a checkpoint alone restores them)."""

    def __init__(self, n_genes: int, config: PatchMAEConfig):
        super().__init__()
        c = config
        self.mae = PatchMaskedAutoencoder(n_genes, (c.patch_size, c.patch_size), c.token_bins, c.dim, c.depth,
                                          c.heads, c.decoder_dim, c.decoder_depth, c.decoder_heads,
                                          residual=c.residual_readout, deviation=c.decoder_deviation,
                                          readout_init_std=c.readout_init_std)
        self.register_buffer("gene_mean", torch.zeros(n_genes))
        self.register_buffer("gene_scale", torch.ones(n_genes))

    def standardise(self, values: torch.Tensor, occupancy: torch.Tensor, genes: torch.Tensor) -> torch.Tensor:
        """Preprocessed values (B, h, w, m) -> model space; empty bins stay 0."""
        mu = self.gene_mean[genes][:, None, None, :]
        sc = self.gene_scale[genes][:, None, None, :]
        return torch.where(occupancy[..., None], (values - mu) / sc, torch.zeros_like(values))

    def unstandardise(self, pred: torch.Tensor, genes: torch.Tensor) -> torch.Tensor:
        """Model-space predictions (B, ..., m) -> preprocessed space."""
        shape = (genes.shape[0],) + (1,) * (pred.dim() - 2) + (genes.shape[1],)
        return pred * self.gene_scale[genes].reshape(shape) + self.gene_mean[genes].reshape(shape)


@dataclass
class _Batch:
    patches: PatchBatch
    mask_noise: np.ndarray | None  # (P, T) uniform numbers (random_cells strategy)
    token_mask: np.ndarray | None  # (P, T) bool (regions strategy, or the square masks of region_mix)
    use_regions: np.ndarray | None = None  # (P,) bool: patch uses token_mask, not mask_noise (region_mix)


class _EpochBatches:
    """Lazy training batches of one epoch (a length for progress bars, patches cut on demand)."""

    def __init__(self, method: "PatchMAE", plan: list[tuple[np.ndarray, np.ndarray]], rng: np.random.Generator):
        self.method, self.plan, self.rng = method, plan, rng

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self):
        for sections, origins in self.plan:
            yield self.method._make_batch(sections, origins, self.rng)


def _window_sum(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    """Sum of `mask` over every h x w window inside it, indexed by the window's top-left bin."""
    H, W = mask.shape
    if H < h or W < w:
        return np.zeros((0, 0), dtype=np.int64)
    sat = np.zeros((H + 1, W + 1), dtype=np.int64)
    sat[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    return sat[h:, w:] - sat[:-h, w:] - sat[h:, :-w] + sat[:-h, :-w]


def _bin_offsets(h: int, w: int) -> np.ndarray:
    rr, cc = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([rr.ravel(), cc.ravel()], axis=1).astype(np.float32)


@register
class PatchMAE(SSLMethod):
    """Masked autoencoder on lattice patches with variance-weighted gene channels."""

    name = NAME
    config_class = PatchMAEConfig
    view_kind = "patches"
    mask_kind = "regions"  # tokens (bins) of each patch, at random or as squares

    def __init__(self, config: PatchMAEConfig | None = None):
        super().__init__(config)
        self.genes: list[str] = []
        self.n_genes: int = 0
        self.bin_size: float | None = None
        self.channel_genes: np.ndarray | None = None
        self.lattices: list[Lattice] = []
        self.train_origins: list[np.ndarray] = []
        self.holdout: list[np.ndarray] = []  # (n_i, 2) held-out tile origins per lattice
        self._val: list[_Batch] | None = None
        self._dense: dict[int, np.ndarray] = {}

    # -- setup -------------------------------------------------------------------------------
    @property
    def h(self) -> int:
        return int(self.config.patch_size)

    def bin_size_for(self, data: SpatialDataset) -> float:
        cfg = self.config
        return float(cfg.bin_size) if cfg.bin_size else suggest_bin_size(data.coords, data.section,
                                                                          factor=cfg.bin_factor)

    def patch_shape(self) -> tuple[int, int]:
        return self.h, self.h

    def build_model(self) -> nn.Module:
        if self.n_genes < 1:
            raise SpatialDataError("patch-mae: the model's gene count is unknown; prepare a dataset or load extra state.")
        return PatchMAEModel(self.n_genes, self.config)

    def prepare(self, data: SpatialDataset) -> None:
        cfg = self.config
        cfg.validate()
        self.data = data
        self.genes = [str(g) for g in data.gene_names]
        self.n_genes = data.n_genes
        self.bin_size = self.bin_size_for(data)
        self.lattices = build_lattices(data, self.bin_size)
        self._dense = {}
        mean, var = self._bin_gene_stats(self.lattices)
        m = min(cfg.n_channels, self.n_genes)
        self.channel_genes = np.sort(np.argsort(-var, kind="stable")[:m]).astype(np.int64)
        self.model = self.build_model()
        self.model.gene_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        scale = np.sqrt(var) if cfg.scale_genes else np.ones_like(var)
        floor = max(float(np.median(np.sqrt(var[var > 0]))) * 0.1, 1e-3) if np.any(var > 0) else 1.0
        self.model.gene_scale.copy_(torch.as_tensor(np.maximum(scale, floor if cfg.scale_genes else 0), dtype=torch.float32))
        self._split_holdout()
        self._val = None

    @staticmethod
    def _bin_gene_stats(lattices: list[Lattice]) -> tuple[np.ndarray, np.ndarray]:
        """Per-gene mean and variance over all occupied bins of the lattices (sparse)."""
        X = sp.vstack([lat.bin_expr for lat in lattices]).tocsr()
        n = X.shape[0]
        mean = np.asarray(X.sum(axis=0)).ravel() / n
        sq = np.asarray(X.multiply(X).sum(axis=0)).ravel() / n
        return mean.astype(np.float64), np.maximum(sq - mean**2, 0.0)

    def _split_holdout(self) -> None:
        """Hold out a fraction of each section's non-overlapping tiles; list the training windows."""
        cfg, h = self.config, self.h
        rng = np.random.default_rng(cfg.holdout_seed)
        self.train_origins, self.holdout = [], []
        for lat in self.lattices:
            occ_windows = _window_sum(lat.occupancy, h, h)
            if occ_windows.size == 0:
                raise SpatialDataError(
                    f"section {self.data.section_names[lat.section]!r} is only {lat.shape[0]} x {lat.shape[1]} bins, "
                    f"smaller than one {h} x {h} patch; use a smaller patch_size or a smaller bin_size."
                )
            tiles = tiled_origins(lat, h, h)
            tile_occ = occ_windows[tiles[:, 0], tiles[:, 1]] / float(h * h)
            tiles = tiles[tile_occ >= cfg.min_occupancy]
            n_hold = int(round(cfg.holdout_fraction * len(tiles)))
            if cfg.holdout_fraction > 0 and len(tiles) >= 2:
                n_hold = min(max(n_hold, 1), len(tiles) - 1)
            else:
                n_hold = 0
            held = tiles[np.sort(rng.choice(len(tiles), size=n_hold, replace=False))] if n_hold else tiles[:0]
            blocked = np.zeros(lat.shape, dtype=bool)
            for r, c in held:  # a handful of tiles per section
                blocked[r:r + h, c:c + h] = True
            ok = (occ_windows >= cfg.min_occupancy * h * h - 1e-9) & (_window_sum(blocked, h, h) == 0)
            origins = np.argwhere(ok).astype(np.int64)
            self.train_origins.append(origins)
            self.holdout.append(held.astype(np.int64))
        if sum(len(o) for o in self.train_origins) == 0:
            raise SpatialDataError(
                f"no {h} x {h} training patch has {cfg.min_occupancy:.0%} of its bins occupied outside the held-out "
                "tiles; lower min_occupancy or holdout_fraction, or use a smaller patch_size."
            )

    # -- batches -----------------------------------------------------------------------------
    def _extract(self, lat: Lattice, origins: np.ndarray, genes: np.ndarray) -> PatchBatch:
        """Patches of one lattice: from a dense copy of its bins when it fits ``dense_cache_mb``
        (a gather, several times faster than reading the CSR entries), else ``extract_patches``."""
        h = self.h
        dense = self._dense.get(lat.section)
        if dense is None:
            size_mb = (lat.n_occupied + 1) * lat.n_genes * 4 / 2**20
            if size_mb + self._dense_mb() > self.config.dense_cache_mb:
                return extract_patches(lat, origins, h, h, genes)
            dense = np.zeros((lat.n_occupied + 1, lat.n_genes), dtype=np.float32)  # last row: empty bin
            dense[:-1] = lat.bin_expr.toarray()
            self._dense[lat.section] = dense
        origins = np.asarray(origins, dtype=np.int64).reshape(-1, 2)
        P = len(origins)
        genes = np.asarray(genes, dtype=np.int64)
        genes = np.broadcast_to(genes, (P, genes.shape[-1])) if genes.ndim == 1 else genes
        H, W = lat.shape
        r = origins[:, 0, None, None] + np.arange(h)[None, :, None]
        c = origins[:, 1, None, None] + np.arange(h)[None, None, :]
        inside = (r >= 0) & (r < H) & (c >= 0) & (c < W)
        rows = np.where(inside, lat.bin_rows[np.clip(r, 0, H - 1), np.clip(c, 0, W - 1)], -1).reshape(P, h * h)
        occ = rows >= 0
        rows = np.where(occ, rows, lat.n_occupied)
        values = dense[rows[:, :, None], genes[:, None, :]]
        return PatchBatch(values.reshape(P, h, h, -1), np.ascontiguousarray(genes), occ.reshape(P, h, h), origins,
                          np.full(P, lat.section, dtype=np.int64))

    def _dense_mb(self) -> float:
        return sum(d.nbytes for d in self._dense.values()) / 2**20

    def _make_batch(self, sections: np.ndarray, origins: np.ndarray, rng: np.random.Generator,
                    channels: str = "sampled") -> _Batch:
        """Cut patches (vectorised per section) with sampled or fixed channels, plus mask draws."""
        cfg, h = self.config, self.h
        m = min(cfg.n_channels, self.n_genes)
        parts = []
        for s in np.unique(sections):
            lat = self.lattices[int(s)]
            o = origins[sections == s]
            genes = select_channels(lat, o, h, h, m, rng) if channels == "sampled" else self.channel_genes
            parts.append(self._extract(lat, o, genes))
        pb = parts[0] if len(parts) == 1 else PatchBatch(
            *(np.concatenate([getattr(p, f) for p in parts]) for f in ("values", "genes", "occupancy", "origins", "section"))
        )
        T = (h // cfg.token_bins) ** 2
        if cfg.mask.strategy == "regions":
            g = h // cfg.token_bins
            size = min(cfg.mask.region_size, g)
            tm = regions((g, g), size, cfg.mask.n_regions, rng, batch=len(pb)).reshape(len(pb), T)
            return _Batch(pb, None, tm)
        noise = rng.random((len(pb), T)).astype(np.float32)
        if cfg.region_mix > 0:
            return _Batch(pb, noise, *self._mixed_regions(len(pb), rng))
        return _Batch(pb, noise, None)

    def _mixed_regions(self, P: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Square masks for ``region_mix``: each patch, with probability region_mix, hides 1 to
        mask.n_regions squares of side 1 to mask.region_size tokens (uniform, drawn per patch);
        vectorised over patches, one pass per distinct (side, count)."""
        cfg = self.config
        g = self.h // cfg.token_bins
        use = rng.random(P) < cfg.region_mix
        sides = rng.integers(1, min(cfg.mask.region_size, g) + 1, size=P)
        counts = rng.integers(1, max(cfg.mask.n_regions, 1) + 1, size=P)
        tm = np.zeros((P, g * g), dtype=bool)
        for side in np.unique(sides):
            for count in np.unique(counts):
                idx = np.flatnonzero((sides == side) & (counts == count))
                if len(idx):
                    tm[idx] = regions((g, g), int(side), int(count), rng, batch=len(idx)).reshape(len(idx), -1)
        return tm, use

    def training_memory(self):
        """Peak memory of one training step (budget.MemoryEstimate): the batch's patch values (input,
        standardised copy, targets, predictions and their gradients), the bin embeddings, the
        encoder on the visible tokens and the decoder on all tokens (about ten width-sized tensors
        per layer) with their attention matrices, and the lattices' dense cache."""
        from ..budget import MemoryEstimate, adam_bytes

        c = self.config
        b, h, p = float(c.batch_size), float(self.h), float(c.token_bins)
        m = float(min(c.n_channels, self.n_genes))
        t = (h / p) ** 2
        t_vis = max(1.0, t * (1.0 - c.mask.ratio)) + 1
        parts = {
            "patch values": b * h * h * m * 4.0 * 6,
            "bin embeddings": b * h * h * c.dim * 4.0 * 3,
            "encoder": c.depth * (b * t_vis * c.dim * 4.0 * 10 + b * c.heads * t_vis ** 2 * 4.0 * 3),
            "decoder": max(c.decoder_depth, 1) * (b * (t + 1) * c.decoder_dim * 4.0 * 10
                                                  + b * c.decoder_heads * (t + 1) ** 2 * 4.0 * 3),
            "local context weights": b * (h * h) ** 2 * 4.0 * 2 if c.residual_readout == "local" else 0.0,
            "dense lattice cache": min(c.dense_cache_mb * 2.0**20,
                                       sum((lat.n_occupied + 1) * lat.n_genes * 4.0 for lat in self.lattices)),
            "parameters and optimiser": adam_bytes(sum(q.numel() for q in self.model.parameters())),
        }
        total = sum(parts.values())

        def fit(fraction: float) -> str:
            return (f"use --set batch_size={max(1, int(c.batch_size * fraction * 0.8))} (now {c.batch_size}) "
                    f"or fewer channels (--set n_channels={max(8, int(m * max(fraction, 0.05)))})")

        return MemoryEstimate(total, parts, fit)

    def train_batches(self, epoch: int, rng: np.random.Generator):
        cfg = self.config
        sizes = np.array([len(o) for o in self.train_origins], dtype=np.float64)
        # patches per section in proportion to its number of admissible windows
        sec = rng.choice(len(sizes), size=cfg.patches_per_epoch, p=sizes / sizes.sum())
        pick = np.empty((cfg.patches_per_epoch, 2), dtype=np.int64)
        for s in np.flatnonzero(sizes):
            idx = np.flatnonzero(sec == s)
            pick[idx] = self.train_origins[s][rng.integers(0, len(self.train_origins[s]), size=len(idx))]
        plan = [(sec[i:i + cfg.batch_size], pick[i:i + cfg.batch_size])
                for i in range(0, cfg.patches_per_epoch, cfg.batch_size)]
        return _EpochBatches(self, plan, rng)

    def _tensors(self, batch: _Batch, device: torch.device):
        pb = batch.patches
        genes = torch.as_tensor(pb.genes, device=device)
        occ = torch.as_tensor(pb.occupancy, device=device)
        raw = torch.as_tensor(pb.values, device=device)
        x = self.model.standardise(raw, occ, genes)
        tok_occ = self.model.mae.token_occupancy(occ)
        if batch.use_regions is not None:
            sq = torch.as_tensor(batch.token_mask, device=device) & tok_occ
            rnd = random_token_mask(tok_occ, self.config.mask.ratio, torch.as_tensor(batch.mask_noise, device=device))
            masked = torch.where(torch.as_tensor(batch.use_regions, device=device)[:, None], sq, rnd)
        elif batch.token_mask is not None:
            masked = torch.as_tensor(batch.token_mask, device=device) & tok_occ
        else:
            masked = random_token_mask(tok_occ, self.config.mask.ratio,
                                       torch.as_tensor(batch.mask_noise, device=device))
        return raw, x, occ, genes, masked

    def _masked_loss(self, batch: _Batch, device: torch.device, rows: slice | None = None) -> torch.Tensor:
        """The masked loss of the batch; with `rows` (several devices) this rank's share of it: the
        error of the patches `rows` only, divided by the whole batch's count (of masked bins x
        channels, or of patches with loss_per_patch), so that the ranks' shares sum to the loss."""
        raw, x, occ, genes, masked = self._tensors(batch, device)
        p = self.config.token_bins
        bin_masked = self.model.mae.from_tokens(masked[:, :, None].expand(-1, -1, p * p)) & occ
        if rows is not None:
            n_patches = int((bin_masked.sum((1, 2)) > 0).sum())
            n_values = int(bin_masked.sum()) * x.shape[-1]
            x, occ, genes, masked, bin_masked = x[rows], occ[rows], genes[rows], masked[rows], bin_masked[rows]
        pred = self.model.mae(x, occ, genes, masked)
        if not bool(bin_masked.any()):
            return pred.sum() * 0.0
        d = pred.float() - x.float()
        err = d * d
        if self.config.loss_l1 > 0:
            # squared + lambda * absolute error: the minimiser moves from the conditional mean towards
            # the conditional median (first-order MAE gain for a second-order MSE cost near the mean)
            err = err + self.config.loss_l1 * d.abs()
        if not self.config.loss_per_patch:
            return err[bin_masked].mean() if rows is None else err[bin_masked].sum() / n_values
        # every patch weighs the same, however few bins it hides (a 2 x 2 square as much as 75 %)
        w = bin_masked.float()
        n = w.sum((1, 2))
        per_patch = (err.mean(-1) * w).sum((1, 2)) / n.clamp(min=1)
        return per_patch[n > 0].mean() if rows is None else per_patch[n > 0].sum() / n_patches

    def set_shard(self, ctx) -> None:
        """Train as one rank of several (distributed.DistContext; None = alone): every rank cuts the
        same batch of patches (the same random draws); each runs the model on its share of them."""
        self._shard = ctx if ctx is not None and ctx.active else None

    def training_loss(self, batch: _Batch, device: torch.device) -> dict[str, torch.Tensor]:
        ctx = getattr(self, "_shard", None)
        rows = None if ctx is None else ctx.split(len(batch.patches))
        return {"loss": self._masked_loss(batch, device, rows)}

    def _holdout_batch_list(self, rng: np.random.Generator, channels: str = "sampled") -> list[_Batch]:
        sections = np.concatenate([np.full(len(o), i, dtype=np.int64) for i, o in enumerate(self.holdout)])
        origins = np.concatenate(self.holdout) if self.holdout else np.zeros((0, 2), np.int64)
        bs = self.config.eval_batch_size
        return [self._make_batch(sections[i:i + bs], origins[i:i + bs], rng, channels)
                for i in range(0, len(origins), bs)]

    def validation_loss(self, device: torch.device) -> float | None:
        """Masked MSE (model space) on the held-out tiles, with fixed channels and masks."""
        if not self.holdout or sum(len(o) for o in self.holdout) == 0:
            return None
        if self._val is None:
            self._val = self._holdout_batch_list(np.random.default_rng(self.config.holdout_seed + 1))
        losses = [float(self._masked_loss(b, device)) for b in self._val]
        sizes = [len(b.patches) for b in self._val]
        return float(np.average(losses, weights=sizes))

    # -- per-cell outputs --------------------------------------------------------------------
    def _tiles(self) -> list[np.ndarray]:
        stride = self.config.embed_stride or max(self.h // 2, 1)
        return [tiled_origins(lat, self.h, self.h, stride) for lat in self.lattices]

    @torch.no_grad()
    def embed_cells(self, device: torch.device) -> np.ndarray:
        """(n_cells, d) embedding at each cell's bin (``embed_readout``; d = dim, or 2 dim with the
        input features), averaged over overlapping tiles."""
        model = self.model.to(device).eval()
        mae, h, bs = model.mae, self.h, self.config.eval_batch_size
        p, readout = self.config.token_bins, self.config.embed_readout
        d = mae.dim * (2 if readout == "encoder+input" else 1)
        out = np.zeros((self.data.n_cells, d), dtype=np.float32)
        for lat, tiles in zip(self.lattices, self._tiles()):
            H, W = lat.shape
            acc = torch.zeros(H * W, d, device=device)
            cnt = torch.zeros(H * W, device=device)
            for i in range(0, len(tiles), bs):
                o = tiles[i:i + bs]
                pb = self._extract(lat, o, self.channel_genes)
                genes = torch.as_tensor(pb.genes, device=device)
                occ = torch.as_tensor(pb.occupancy, device=device)
                x = model.standardise(torch.as_tensor(pb.values, device=device), occ, genes)
                tok = mae.token_embeddings(x, occ, genes, readout)  # (B, T, d)
                per_bin = mae.from_tokens(tok[:, :, None, :].expand(-1, -1, p * p, -1)).float()  # (B, h, w, d)
                flat, keep = self._bin_index(o, lat, occ)
                acc.index_add_(0, flat, per_bin[keep])
                cnt.index_add_(0, flat, torch.ones(len(flat), device=device))
            grid = (acc / cnt.clamp(min=1)[:, None]).cpu().numpy()
            out[lat.cells] = grid[lat.bin_of_cell]
        return out

    @staticmethod
    def _bin_index(origins: np.ndarray, lat: Lattice, occ: torch.Tensor):
        """Flat lattice index of every occupied bin of a batch of patches, and the (B, h, w) mask."""
        B, h, w = occ.shape
        W = lat.shape[1]
        r = torch.as_tensor(origins[:, 0], device=occ.device)[:, None, None] + torch.arange(h, device=occ.device)[None, :, None]
        c = torch.as_tensor(origins[:, 1], device=occ.device)[:, None, None] + torch.arange(w, device=occ.device)[None, None, :]
        keep = occ  # occupied bins are inside the lattice by construction
        return (r * W + c)[keep], keep

    @torch.no_grad()
    def reconstruct_cells(self, device: torch.device, seed: int = 0) -> np.ndarray:
        """(n_cells, n_genes) imputation of every model gene at each cell's bin, never from the
        bin's own value (see the module docstring), in the preprocessed expression space."""
        model = self.model.to(device).eval()
        mae, h, bs = model.mae, self.h, max(self.config.eval_batch_size // 4, 1)
        p = self.config.token_bins
        k = max(2, int(round(1.0 / (1.0 - self.config.mask.ratio))))
        rng = np.random.default_rng(seed)
        all_genes = torch.arange(self.n_genes, device=device)
        out = np.zeros((self.data.n_cells, self.n_genes), dtype=np.float32)
        for lat, tiles in zip(self.lattices, self._tiles()):
            H, W = lat.shape
            acc = torch.zeros(H * W, self.n_genes, device=device)
            cnt = torch.zeros(H * W, device=device)
            for i in range(0, len(tiles), bs):
                o = tiles[i:i + bs]
                pb = self._extract(lat, o, self.channel_genes)
                genes = torch.as_tensor(pb.genes, device=device)
                occ = torch.as_tensor(pb.occupancy, device=device)
                x = model.standardise(torch.as_tensor(pb.values, device=device), occ, genes)
                B = len(o)
                out_genes = all_genes.expand(B, -1)
                x_all = None  # the context of every output gene, not only the input channels
                if mae.residual != "none":
                    full = self._extract(lat, o, np.arange(self.n_genes))
                    x_all = model.standardise(torch.as_tensor(full.values, device=device), occ, out_genes)
                tok_occ = mae.token_occupancy(occ)
                group = torch.as_tensor(rng.integers(0, k, size=tok_occ.shape), device=device)
                for g in range(k):
                    visible = tok_occ & (group == g)
                    masked = tok_occ & ~visible
                    states, order, pad = mae.encode(x, occ, genes, visible)
                    context = (x_all, occ, visible) if x_all is not None else None
                    pred = mae.decode(states, order, pad, tok_occ, out_genes, context=context)
                    pred = model.unstandardise(pred.float(), out_genes)
                    bin_masked = mae.from_tokens(masked[:, :, None].expand(-1, -1, p * p)) & occ
                    flat, keep = self._bin_index(o, lat, bin_masked)
                    acc.index_add_(0, flat, pred[keep])
                    cnt.index_add_(0, flat, torch.ones(len(flat), device=device))
            grid = (acc / cnt.clamp(min=1)[:, None]).cpu().numpy()
            out[lat.cells] = grid[lat.bin_of_cell]
        return out

    @torch.no_grad()
    def reconstruct_hidden(self, hidden: np.ndarray, device: torch.device) -> np.ndarray:
        """(len(hidden), n_genes) model genes predicted for the `hidden` cells with every bin that holds one
        of them masked (the pretext task, on a region the user chose), in the preprocessed space.

        Every tile of the embedding tiling that touches a hidden bin is encoded from its other occupied
        tokens; a hidden bin's prediction is the mean over those tiles, and a cell gets its bin's."""
        model = self.model.to(device).eval()
        mae, h, bs, p = model.mae, self.h, max(self.config.eval_batch_size // 4, 1), self.config.token_bins
        hidden = np.asarray(hidden, np.int64)
        where = np.full(self.data.n_cells, -1, np.int64)
        where[hidden] = np.arange(len(hidden))
        out = np.zeros((len(hidden), self.n_genes), np.float32)
        all_genes = torch.arange(self.n_genes, device=device)
        for lat, tiles in zip(self.lattices, self._tiles()):
            mine = where[lat.cells] >= 0
            if not mine.any():
                continue
            H, W = lat.shape
            grid_hidden = np.zeros(H * W, bool)
            grid_hidden[lat.bin_of_cell[mine]] = True
            grid_hidden = grid_hidden.reshape(H, W)
            integral = np.pad(grid_hidden.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
            r, c = tiles[:, 0], tiles[:, 1]
            touched = integral[r + h, c + h] - integral[r, c + h] - integral[r + h, c] + integral[r, c]
            use = tiles[touched > 0]
            acc = torch.zeros(H * W, self.n_genes, device=device)
            cnt = torch.zeros(H * W, device=device)
            rows, cols = np.arange(h)[None, :, None], np.arange(h)[None, None, :]
            for i in range(0, len(use), bs):
                o = use[i:i + bs]
                pb = self._extract(lat, o, self.channel_genes)
                genes = torch.as_tensor(pb.genes, device=device)
                occ = torch.as_tensor(pb.occupancy, device=device)
                x = model.standardise(torch.as_tensor(pb.values, device=device), occ, genes)
                out_genes = all_genes.expand(len(o), -1)
                x_all = None
                if mae.residual != "none":
                    full = self._extract(lat, o, np.arange(self.n_genes))
                    x_all = model.standardise(torch.as_tensor(full.values, device=device), occ, out_genes)
                hid = torch.as_tensor(grid_hidden[o[:, 0, None, None] + rows, o[:, 1, None, None] + cols],
                                      device=device) & occ
                tok_occ = mae.token_occupancy(occ)
                visible = tok_occ & ~mae.to_tokens(hid).any(dim=2)
                states, order, pad = mae.encode(x, occ, genes, visible)
                context = (x_all, occ, visible) if x_all is not None else None
                pred = model.unstandardise(mae.decode(states, order, pad, tok_occ, out_genes, context=context).float(),
                                           out_genes)
                flat, keep = self._bin_index(o, lat, hid)
                acc.index_add_(0, flat, pred[keep])
                cnt.index_add_(0, flat, torch.ones(len(flat), device=device))
            grid = (acc / cnt.clamp(min=1)[:, None]).cpu().numpy()
            out[where[lat.cells[mine]]] = grid[lat.bin_of_cell[mine]]
        return out

    # -- masked-region benchmark -------------------------------------------------------------
    @torch.no_grad()
    def masked_region_benchmark(self, device: torch.device) -> dict:
        """Square masks of each size in the held-out tiles: the model against the baselines.

        For every held-out tile (channels drawn by the training rule with a fixed seed), each size
        s and each of ``eval_mask_repeats`` draws, ``eval_mask_regions`` random s x s squares
        (they may overlap) are hidden; errors are measured on the masked, occupied bins, in the
        preprocessed expression space, for the model and for the baselines on the same masks:
        zeros, the patch's mean over its unmasked occupied bins, the nearest unmasked occupied bin
        (Euclidean in bins, ties by bin order) and inverse-distance-squared weighting of all
        unmasked occupied bins of the patch."""
        cfg, h = self.config, self.h
        if sum(len(o) for o in self.holdout) == 0:
            return {"held_out": "none (holdout_fraction = 0 or sections too small)"}
        model = self.model.to(device).eval()
        mae, p = model.mae, cfg.token_bins
        rng = np.random.default_rng(cfg.holdout_seed + 2)
        batches = self._holdout_batch_list(np.random.default_rng(cfg.holdout_seed + 1))
        xy = torch.as_tensor(_bin_offsets(h, h), device=device)
        dist = torch.cdist(xy, xy)  # (hw, hw) in bins
        names = ("model",) + BASELINES + ("context_base",)
        by_size: dict = {}
        for s in cfg.eval_mask_sizes:
            se = {k: 0.0 for k in names}
            ae = {k: 0.0 for k in names}
            n = 0
            for _ in range(cfg.eval_mask_repeats):
                for b in batches:
                    pb = b.patches
                    B = len(pb)
                    mask = torch.as_tensor(regions((h, h), int(s), cfg.eval_mask_regions, rng, batch=B), device=device)
                    genes = torch.as_tensor(pb.genes, device=device)
                    occ = torch.as_tensor(pb.occupancy, device=device)
                    raw = torch.as_tensor(pb.values, device=device)
                    target = mask & occ
                    if not bool(target.any()):
                        continue
                    tok_masked = mae.to_tokens(mask).any(dim=2)
                    x = model.standardise(raw, occ, genes)
                    pred = model.unstandardise(mae(x, occ, genes, tok_masked).float(), genes)
                    preds = {"model": pred, **self._baselines(raw, occ, mask, dist)}
                    # the model's own residual base alone (no decoder): what the decoder adds beyond it
                    base = mae.context_base(x, occ, mae.token_occupancy(occ) & ~tok_masked)
                    preds["context_base"] = (model.unstandardise(base.float(), genes) if base is not None
                                             else torch.zeros_like(raw))
                    truth = raw[target]
                    for k in names:
                        d = preds[k][target] - truth
                        se[k] += float((d * d).sum())
                        ae[k] += float(d.abs().sum())
                    n += int(truth.numel())
            by_size[str(s)] = {k: {"mse": se[k] / max(n, 1), "mae": ae[k] / max(n, 1)} for k in names}
            by_size[str(s)]["n_values"] = n
        sizes = [str(s) for s in cfg.eval_mask_sizes]
        mean_of = lambda k, metric: float(np.mean([by_size[z][k][metric] for z in sizes]))  # noqa: E731
        beats = {metric: all(by_size[z]["model"][metric] < by_size[z][b][metric] for z in sizes for b in BASELINES)
                 for metric in ("mse", "mae")}
        beats_base = all(by_size[z]["model"]["mse"] < by_size[z]["context_base"]["mse"] for z in sizes)
        return {
            "masked_mse": mean_of("model", "mse"),
            "masked_mae": mean_of("model", "mae"),
            "baselines": {b: mean_of(b, "mse") for b in BASELINES},
            "baselines_mae": {b: mean_of(b, "mae") for b in BASELINES},
            "by_mask_size": by_size,
            "beats_all_baselines_mse": beats["mse"],
            "beats_all_baselines_mae": beats["mae"],
            "context_base_mse": mean_of("context_base", "mse"),
            "beats_own_context_base_mse": beats_base if cfg.residual_readout != "none" else None,
            "residual_readout": cfg.residual_readout,
            "bandwidth_bins": float(torch.exp(mae.log_bandwidth)) if cfg.residual_readout in ("local", "attend") else None,
            "held_out": (f"{sum(len(o) for o in self.holdout)} non-overlapping {h}x{h} tiles "
                         f"({cfg.holdout_fraction:.0%} of each section's tiles, seed {cfg.holdout_seed}); "
                         "no training patch overlaps them"),
            "mask": f"{cfg.eval_mask_regions} random s x s squares per tile, {cfg.eval_mask_repeats} draws per size",
            "space": "preprocessed expression (the model's input space), masked occupied bins, patch channels",
        }

    @staticmethod
    def _baselines(raw: torch.Tensor, occ: torch.Tensor, mask: torch.Tensor, dist: torch.Tensor) -> dict:
        """Baseline predictions (B, h, w, m) from each patch's unmasked occupied bins (vectorised)."""
        B, h, w, m = raw.shape
        vis = (occ & ~mask).reshape(B, h * w)
        v = raw.reshape(B, h * w, m)
        visf = vis.float()
        n_vis = visf.sum(1).clamp(min=1)
        mean = (v * visf[..., None]).sum(1) / n_vis[:, None]  # (B, m)
        big = torch.finfo(torch.float32).max
        d = torch.where(vis[:, None, :], dist[None], torch.full_like(dist[None], big).expand(B, -1, -1))
        nearest = d.argmin(dim=2)  # (B, hw)
        near = torch.gather(v, 1, nearest[..., None].expand(-1, -1, m))
        wgt = torch.where(vis[:, None, :], 1.0 / dist[None].clamp(min=1e-6) ** 2, torch.zeros_like(d))
        idw = torch.bmm(wgt, v) / wgt.sum(2, keepdim=True).clamp(min=1e-12)
        has = vis.any(1)[:, None, None]
        return {
            "zeros": torch.zeros_like(raw),
            "patch_mean": mean[:, None, None, :].expand(B, h, w, m),
            "nearest": torch.where(has, near, torch.zeros_like(near)).reshape(B, h, w, m),
            "idw": torch.where(has, idw, torch.zeros_like(idw)).reshape(B, h, w, m),
        }

    # -- downstream --------------------------------------------------------------------------
    def _domains(self, emb: np.ndarray, data: SpatialDataset) -> tuple[np.ndarray, object, dict]:
        """(labels, the obs categorical, info): evaluation.domains.cluster_domains on all sections
        jointly, or on each section alone (``domain_clustering='per_section'``: labels are then
        named '<section>:<domain>', as the same number means nothing across sections)."""
        import pandas as pd

        from ..evaluation.domains import cluster_domains, domain_categorical

        cfg = self.config
        K, how = cfg.eval.n_domains, cfg.eval.domain_method
        if cfg.domain_clustering == "joint" or data.n_sections == 1:
            labels, meta = cluster_domains(emb, K, seed=cfg.seed, method=how)
            return labels, domain_categorical(labels), {"scope": "joint", "n_domains": meta["n_domains"],
                                                        "clustering": meta}
        labels = np.zeros(data.n_cells, dtype=np.int64)
        names = np.empty(data.n_cells, dtype=object)
        per: dict = {}
        for s, sname in enumerate(data.section_names):
            idx = data.section_indices(s)
            if len(idx) == 0:
                continue
            lab, per[sname] = cluster_domains(emb[idx], K, seed=cfg.seed, method=how)
            labels[idx] = lab
            names[idx] = np.char.add(f"{sname}:", lab.astype(str))
        return labels, pd.Categorical(names), {"scope": "per_section", "n_domains": int(len(np.unique(names))),
                                               "clustering": per}

    def _reference(self, data: SpatialDataset):
        if getattr(data, "domains", None) is not None:
            return data.domains, data.domain_key
        if data.labels is not None:
            return data.labels, data.label_key
        return None, None

    def _domain_metrics(self, labels: np.ndarray, data: SpatialDataset, info: dict) -> dict:
        truth, key = self._reference(data)
        out = dict(info)
        if truth is None:
            out["note"] = "no reference labels (set eval.domain_key or data.label_key) - no ARI / NMI"
            return out
        out.update(domain_scores(labels, truth))
        out["reference_key"] = key
        per = {}
        for s, sname in enumerate(data.section_names):
            idx = data.section_indices(s)
            if np.any(truth[idx] >= 0):
                per[sname] = domain_scores(labels[idx], truth[idx])
        out["per_section"] = per
        out["mean_section_ari"] = float(np.mean([v["ari"] for v in per.values()])) if per else None
        return out

    def _outputs(self, data: SpatialDataset, device: torch.device) -> tuple[MethodResults, dict]:
        t0 = time.perf_counter()
        emb = self.embed_cells(device)
        timings = {"embed_seconds": time.perf_counter() - t0}
        labels, categorical, info = self._domains(emb, data)
        res = MethodResults(obsm={f"X_{NAME}": emb}, obs={f"{NAME}_domain": categorical})
        # the imputation layer is (n_cells x n_genes) dense: only built when eval.reconstruction
        # keeps it (patch-mae masks no cells, so 'masked' / 'auto' on an atlas keep nothing)
        keep = self.config.eval.reconstruction_policy(data.n_cells, self.n_genes) == "all"
        if self.config.reconstruction_layer and keep:
            t0 = time.perf_counter()
            res.layers[f"{NAME}_reconstruction"] = self.reconstruct_cells(device, seed=self.config.seed)
            timings["reconstruct_seconds"] = time.perf_counter() - t0
        res.metrics["domains"] = self._domain_metrics(labels, data, info)
        return res, timings

    def _summary(self) -> dict:
        cfg = self.config
        return {
            "bin_size": self.bin_size,
            "lattice_shapes": {self.data.section_names[l.section]: list(l.shape) for l in self.lattices},
            "occupied_bins": int(sum(l.n_occupied for l in self.lattices)),
            "patch_size": cfg.patch_size,
            "n_channels": int(min(cfg.n_channels, self.n_genes)),
            "n_model_genes": self.n_genes,
            "n_parameters": int(sum(p.numel() for p in self.model.parameters())),
        }

    def evaluate(self, data: SpatialDataset, device: torch.device,
                 make_trainer: Callable[[TrainConfig], Any]) -> MethodResults:
        cfg = self.config
        res, timings = self._outputs(data, device)
        t0 = time.perf_counter()
        res.metrics["reconstruction"] = self.masked_region_benchmark(device)
        timings["reconstruction_benchmark_seconds"] = time.perf_counter() - t0
        labels = data.labels if data.labels is not None else getattr(data, "domains", None)
        if labels is not None and np.sum(labels >= 0) >= 2:
            res.metrics["probes"] = run_probes(
                res.obsm[f"X_{NAME}"], labels, train_fraction=cfg.probe_train_fraction, seed=cfg.seed,
                k=cfg.probe_k, hidden=cfg.probe_hidden, section=data.section, section_names=data.section_names,
                train_sections=cfg.eval.train_sections or None, test_sections=cfg.eval.test_sections or None)
            res.metrics["probes"]["label_key"] = data.label_key if data.labels is not None else data.domain_key
        else:
            res.metrics["probes"] = {"note": "no labels (set data.label_key or eval.domain_key) - probes skipped"}
        res.metrics["patch_mae"] = {**self._summary(), **timings}
        return res

    def predict(self, data: SpatialDataset, device: torch.device) -> MethodResults:
        if self.model is None:
            raise SpatialDataError("patch-mae: no trained model; load one with pipeline.load_model first.")
        if data.n_genes != self.n_genes:
            raise SpatialDataError(
                f"patch-mae: the slide has {data.n_genes} model genes but the model expects {self.n_genes}; "
                "build the dataset with the model's gene list."
            )
        self.data = data
        self.lattices = build_lattices(data, self.bin_size)
        self._dense = {}
        small = [data.section_names[l.section] for l in self.lattices if min(l.shape) < self.h]
        if small:
            raise SpatialDataError(f"sections {small} are smaller than one {self.h} x {self.h} patch at bin size "
                                   f"{self.bin_size}; they cannot be embedded by this model.")
        res, timings = self._outputs(data, device)
        res.metrics["patch_mae"] = {"bin_size": self.bin_size, **timings}
        return res

    # -- checkpoint state --------------------------------------------------------------------
    def extra_state(self) -> dict:
        return {
            "genes": list(self.genes),
            "n_genes": int(self.n_genes),
            "bin_size": self.bin_size,
            "channel_genes": [int(g) for g in (self.channel_genes if self.channel_genes is not None else [])],
            "holdout_tiles": {self.data.section_names[l.section]: o.tolist()
                              for l, o in zip(self.lattices, self.holdout)} if self.data is not None else {},
        }

    def load_extra_state(self, state: dict) -> None:
        self.genes = [str(g) for g in state.get("genes", [])]
        self.n_genes = int(state.get("n_genes", len(self.genes)))
        self.bin_size = state.get("bin_size")
        self.channel_genes = np.asarray(state.get("channel_genes", []), dtype=np.int64)
