"""Plain-torch ViT building blocks for the patch masked autoencoder (no timm).

Vocabulary. A *patch* is an h x w window of lattice bins with m gene channels (values
(B, h, w, m), the channels' gene ids (B, m), occupancy (B, h, w)). A *token* is a
``token_bins`` x ``token_bins`` group of bins (1 x 1 by default: one token per bin), so a patch
holds T = (h / token_bins) * (w / token_bins) tokens. A token is *occupied* when at least one of
its bins holds a cell.

Gene-aware embedding. Patches carry different gene subsets, so a channel's meaning comes from
its gene id, not its position: a bin's embedding is ``sum_c value_c * E[gene_c] / sqrt(m)``
with a learned gene table E (plus a learned bias), and the readout predicts channel c of a bin
as ``<z, R[gene_c]> + b[gene_c]`` with a second gene table R. One model serves any gene subset.

Asymmetric MAE (He et al. 2022). The encoder sees only visible, occupied tokens (gathered to the
front of the sequence and padded, with a key padding mask) plus a class token that is always
visible (so no sequence is ever fully padded); the light decoder sees every token: the encoded
visible ones, a learned mask token where a token was masked and a learned empty token where a
token holds no cell, each with a fixed 2-D sin-cos position embedding.

Residual readout (``residual``). With 'patch_mean', each channel's prediction is the channel's
mean over the patch's visible occupied bins plus the decoder's output; with 'local' (default),
the base is a Gaussian-weighted mean of the visible occupied bins around each bin, with one
learned bandwidth (in bins); 'none' predicts the value directly. The decoder then learns how a
masked bin deviates from its visible context rather than the context's level itself (the
analogue of MAE's per-patch target normalisation); the base uses visible bins only, so nothing
masked leaks in. The readout's gene table starts at zero by default (``readout_init_std``), so
the untrained model predicts exactly its base.
"""

from __future__ import annotations

import math

import torch
from torch import nn


RESIDUAL_MODES = ("none", "patch_mean", "local", "attend")
EMBED_READOUTS = ("encoder", "encoder+input")


def sincos_2d(rows: int, cols: int, dim: int) -> torch.Tensor:
    """(rows * cols, dim) fixed 2-D sin-cos position embedding, row-major; dim divisible by 4."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a dimension divisible by 4, got {dim}.")
    quarter = dim // 4
    freq = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    r, c = torch.meshgrid(torch.arange(rows, dtype=torch.float32), torch.arange(cols, dtype=torch.float32),
                          indexing="ij")
    r = r.reshape(-1, 1) * freq
    c = c.reshape(-1, 1) * freq
    return torch.cat([torch.sin(r), torch.cos(r), torch.sin(c), torch.cos(c)], dim=1)


def transformer(dim: int, depth: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> nn.Module:
    """A pre-norm Transformer encoder stack (batch first) followed by a LayerNorm."""
    layer = nn.TransformerEncoderLayer(dim, heads, int(dim * mlp_ratio), dropout=dropout, activation="gelu",
                                       batch_first=True, norm_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, depth, enable_nested_tensor=False), nn.LayerNorm(dim)) \
        if depth > 0 else nn.LayerNorm(dim)


def _run(stack: nn.Module, x: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
    if isinstance(stack, nn.Sequential):
        return stack[1](stack[0](x, src_key_padding_mask=pad))
    return stack(x)


class GeneChannelEmbedding(nn.Module):
    """Bin values (..., m) with channel genes (B, m) -> (..., dim): sum_c v_c E[gene_c] / sqrt(m) + b."""

    def __init__(self, n_genes: int, dim: int):
        super().__init__()
        self.gene = nn.Embedding(n_genes, dim)
        nn.init.normal_(self.gene.weight, std=1.0)
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, values: torch.Tensor, genes: torch.Tensor) -> torch.Tensor:
        # values (B, L, m), genes (B, m)
        emb = self.gene(genes)  # (B, m, dim)
        return torch.bmm(values, emb.to(values.dtype)) / math.sqrt(max(genes.shape[1], 1)) + self.bias


class GeneReadout(nn.Module):
    """Decoder states (B, L, dim) -> predicted channel values (B, L, m) for channel genes (B, m)."""

    def __init__(self, n_genes: int, dim: int, init_std: float = 0.0):
        super().__init__()
        self.gene = nn.Embedding(n_genes, dim)
        # small start: a residual model begins near its context base and learns the deviation. With
        # init_std = 0 it starts exactly at the base: a gene's readout row only moves when the gene is
        # drawn as a channel, so a random start stays as noise (std init_std * sqrt(dim) per value,
        # the decoder's states being layer-normed) on genes that are rarely drawn
        if init_std > 0:
            nn.init.normal_(self.gene.weight, std=init_std)
        else:
            nn.init.zeros_(self.gene.weight)
        self.bias = nn.Embedding(n_genes, 1)
        nn.init.zeros_(self.bias.weight)

    def forward(self, z: torch.Tensor, genes: torch.Tensor) -> torch.Tensor:
        out = torch.bmm(z, self.gene(genes).transpose(1, 2).to(z.dtype))
        return out + self.bias(genes).squeeze(-1)[:, None, :].to(out.dtype)


class PatchMaskedAutoencoder(nn.Module):
    """ViT masked autoencoder over lattice patches with gene-aware channels.

    Parameters
    ----------
    n_genes : size of the gene vocabulary (the dataset's model genes).
    patch_size : (h, w) bins per patch; token_bins : bins per token side (divides h and w).
    dim, depth, heads : encoder width, layers, attention heads.
    decoder_dim, decoder_depth, decoder_heads : the (lighter) decoder's.
    """

    def __init__(self, n_genes: int, patch_size: tuple[int, int] = (16, 16), token_bins: int = 1,
                 dim: int = 64, depth: int = 2, heads: int = 4, decoder_dim: int = 64,
                 decoder_depth: int = 1, decoder_heads: int = 4, mlp_ratio: float = 4.0,
                 residual: str = "local", deviation: bool = True, readout_init_std: float = 0.0):
        super().__init__()
        if residual not in RESIDUAL_MODES:
            raise ValueError(f"residual must be one of {RESIDUAL_MODES}, got {residual!r}.")
        self.residual = residual
        # the readout's additive deviation from the base; without a base it is the prediction
        self.deviation = bool(deviation) or residual == "none"
        h, w = int(patch_size[0]), int(patch_size[1])
        p = int(token_bins)
        if p < 1 or h % p or w % p:
            raise ValueError(f"token_bins={p} must divide the patch size {h} x {w}.")
        self.h, self.w, self.p = h, w, p
        self.grid = (h // p, w // p)
        self.n_tokens = self.grid[0] * self.grid[1]
        self.dim, self.decoder_dim = dim, decoder_dim
        self.embed = GeneChannelEmbedding(n_genes, dim)
        self.bin_occupied = nn.Parameter(torch.zeros(dim))  # marks real bins inside a multi-bin token
        self.merge = nn.Linear(p * p * dim, dim) if p > 1 else nn.Identity()
        self.token_norm = nn.LayerNorm(dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos", sincos_2d(*self.grid, dim), persistent=False)
        self.encoder = transformer(dim, depth, heads, mlp_ratio)
        self.enc_to_dec = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.empty_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("dec_pos", sincos_2d(*self.grid, decoder_dim), persistent=False)
        self.decoder = transformer(decoder_dim, decoder_depth, decoder_heads, mlp_ratio)
        self.unmerge = nn.Linear(decoder_dim, p * p * decoder_dim) if p > 1 else nn.Identity()
        self.readout = GeneReadout(n_genes, decoder_dim, readout_init_std) if self.deviation else None
        if residual == "attend":
            # content term of the interpolation weights; q starts at zero, so the model starts as
            # exactly the Gaussian base and learns where to depart from it
            self.attn_dim = max(decoder_dim // 2, 4)
            self.attn_q = nn.Linear(decoder_dim, self.attn_dim)
            self.attn_k = nn.Linear(decoder_dim, self.attn_dim)
            nn.init.zeros_(self.attn_q.weight)
            nn.init.zeros_(self.attn_q.bias)
            # per-bin change of the log bandwidth (e.g. sharper where the visible context is dense)
            self.attn_bw = nn.Linear(decoder_dim, 1)
            nn.init.zeros_(self.attn_bw.weight)
            nn.init.zeros_(self.attn_bw.bias)
        # bandwidth (bins) of the 'local' base, learned on a log scale; starts at a quarter patch
        self.log_bandwidth = nn.Parameter(torch.tensor(math.log(max(min(h, w) / 4.0, 1.0))))
        rr, cc = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
        xy = torch.stack([rr.ravel(), cc.ravel()], dim=1)
        self.register_buffer("bin_dist2", torch.cdist(xy, xy) ** 2, persistent=False)  # (hw, hw) bins^2
        for t in (self.cls, self.mask_token, self.empty_token):
            nn.init.normal_(t, std=0.02)

    # -- bins <-> tokens --------------------------------------------------------------------
    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h, w, ...) -> (B, T, p*p, ...) grouping p x p bins per token (row-major tokens)."""
        B, p = x.shape[0], self.p
        gh, gw = self.grid
        rest = x.shape[3:]
        x = x.reshape(B, gh, p, gw, p, *rest).transpose(2, 3)
        return x.reshape(B, gh * gw, p * p, *rest)

    def from_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, p*p, ...) -> (B, h, w, ...)."""
        B, p = x.shape[0], self.p
        gh, gw = self.grid
        rest = x.shape[3:]
        x = x.reshape(B, gh, gw, p, p, *rest).transpose(2, 3)
        return x.reshape(B, self.h, self.w, *rest)

    def token_occupancy(self, occupancy: torch.Tensor) -> torch.Tensor:
        """(B, h, w) bool -> (B, T) bool: a token is occupied when any of its bins is."""
        return self.to_tokens(occupancy).any(dim=2)

    # -- encoder ----------------------------------------------------------------------------
    def encode(self, values: torch.Tensor, occupancy: torch.Tensor, genes: torch.Tensor,
               visible: torch.Tensor, *, with_input: bool = False):
        """Encode the visible tokens only.

        values (B, h, w, m) float, occupancy (B, h, w) bool, genes (B, m) long, visible (B, T)
        bool (must imply occupied). Returns (states (B, 1 + L, dim) with the class token first,
        token index (B, L) of each encoded slot, padding (B, L) bool True where a slot is empty);
        ``with_input``: also the slots' input features (B, L, dim), the normalised projection of
        their own channels before any position or attention (what the tokens start from).
        """
        B = values.shape[0]
        n_vis = visible.sum(dim=1)
        L = max(int(n_vis.max()), 1) if B else 1
        order = torch.argsort((~visible).to(torch.int8), dim=1, stable=True)[:, :L]  # visible first
        pad = torch.arange(L, device=values.device)[None, :] >= n_vis[:, None]
        tok_vals = self.to_tokens(values)  # (B, T, pp, m)
        tok_occ = self.to_tokens(occupancy)  # (B, T, pp)
        idx = order[:, :, None, None].expand(-1, -1, self.p * self.p, values.shape[-1])
        vals = torch.gather(tok_vals, 1, idx)  # (B, L, pp, m)
        occ = torch.gather(tok_occ, 1, order[:, :, None].expand(-1, -1, self.p * self.p))
        x = self.embed(vals.reshape(B, L * self.p * self.p, -1), genes)
        x = x.reshape(B, L, self.p * self.p, self.dim) + occ[..., None].to(x.dtype) * self.bin_occupied
        x_in = self.token_norm(self.merge(x.reshape(B, L, -1)))
        x = x_in + self.pos[order].to(x_in.dtype)
        x = torch.cat([self.cls.expand(B, -1, -1).to(x.dtype), x], dim=1)
        full_pad = torch.cat([torch.zeros(B, 1, dtype=torch.bool, device=x.device), pad], dim=1)
        x = _run(self.encoder, x, full_pad)
        return (x, order, pad, x_in) if with_input else (x, order, pad)

    # -- decoder ----------------------------------------------------------------------------
    def visible_bins(self, occupancy: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """(B, h, w) bool: occupied bins of the visible tokens."""
        p = self.p
        return self.from_tokens(visible[:, :, None].expand(-1, -1, p * p)) & occupancy

    def context_base(self, values: torch.Tensor, occupancy: torch.Tensor, visible: torch.Tensor) -> torch.Tensor | None:
        """The residual base (B, h, w, m) from the visible occupied bins only (None when 'none').
        For 'attend' this is the Gaussian part alone (the content term set to zero): the smoother
        the model starts from, against which the decoder's contribution is measured."""
        if self.residual == "none":
            return None
        B, h, w, m = values.shape
        vis = self.visible_bins(occupancy, visible).reshape(B, h * w).to(values.dtype)
        v = values.reshape(B, h * w, m)
        if self.residual == "patch_mean":
            mean = (v * vis[..., None]).sum(1) / vis.sum(1, keepdim=True).clamp(min=1)
            return mean[:, None, None, :].expand(B, h, w, m)
        bw2 = torch.exp(2 * self.log_bandwidth).to(values.dtype)
        kern = torch.exp(-self.bin_dist2.to(values.dtype) / (2 * bw2))  # (hw, hw)
        wgt = kern[None] * vis[:, None, :]  # (B, hw, hw): from visible bins only
        base = torch.bmm(wgt, v) / wgt.sum(2, keepdim=True).clamp(min=1e-12)
        return base.reshape(B, h, w, m)

    def attend_base(self, z: torch.Tensor, values: torch.Tensor, occupancy: torch.Tensor,
                    visible: torch.Tensor) -> torch.Tensor:
        """'attend' base (B, h, w, m): weights over the visible occupied bins are
        softmax(-d_ij^2 / (2 bw_i^2) + <q_i, k_j> / sqrt(d_k)) with q, k and the per-bin log
        bandwidth change (log bw_i = log bandwidth + a(z_i)) projected from the decoder's per-bin
        states z (B, hw, dd), so the decoder decides which visible bins resemble the bin to fill
        (e.g. across a layer boundary) and how far to look (e.g. less far where the visible
        context is dense). Keys of masked bins are never used."""
        B, h, w, m = values.shape
        vis = self.visible_bins(occupancy, visible).reshape(B, h * w)
        q, k = self.attn_q(z), self.attn_k(z)
        logits = torch.bmm(q, k.transpose(1, 2)) / math.sqrt(self.attn_dim)
        log_bw = (self.log_bandwidth + self.attn_bw(z).squeeze(-1)).clamp(-3.0, 5.0)  # (B, hw)
        bw2 = torch.exp(2 * log_bw)[:, :, None]
        logits = logits - self.bin_dist2.to(logits.dtype)[None] / (2 * bw2).to(logits.dtype)
        logits = logits.masked_fill(~vis[:, None, :], -1e4)
        wgt = torch.softmax(logits.float(), dim=2) * vis[:, None, :]  # exact zeros off the visible bins
        base = torch.bmm(wgt, values.reshape(B, h * w, m).float()) / wgt.sum(2, keepdim=True).clamp(min=1e-12)
        return base.reshape(B, h, w, m)

    def decode(self, states: torch.Tensor, order: torch.Tensor, pad: torch.Tensor, token_occ: torch.Tensor,
               genes: torch.Tensor,
               context: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Predicted channel values (B, h, w, m) of every bin from the encoded visible tokens.
        `context` = (values (B, h, w, m) the base is computed from, occupancy, visible tokens):
        the prediction is then the readout's deviation plus the residual base of those values
        (:meth:`context_base`, or for 'attend' :meth:`attend_base` of the decoder's states);
        without it, the readout's output alone."""
        B = states.shape[0]
        enc = self.enc_to_dec(states)  # (B, 1 + L, dd)
        dd = self.decoder_dim
        fill = torch.where(token_occ[..., None], self.mask_token.to(enc.dtype), self.empty_token.to(enc.dtype))
        tokens = fill.expand(B, self.n_tokens, dd).clone()
        vis_tok = enc[:, 1:]
        b_idx = torch.arange(B, device=enc.device)[:, None].expand_as(order)
        keep = ~pad
        tokens[b_idx[keep], order[keep]] = vis_tok[keep]
        tokens = tokens + self.dec_pos.to(tokens.dtype)
        x = torch.cat([enc[:, :1], tokens], dim=1)
        x = _run(self.decoder, x, None)[:, 1:]  # (B, T, dd)
        x = self.unmerge(x).reshape(B, self.n_tokens * self.p * self.p, dd)
        base = None
        if context is not None and self.residual == "attend":
            z = self.from_tokens(x.reshape(B, self.n_tokens, self.p * self.p, dd)).reshape(B, self.h * self.w, dd)
            base = self.attend_base(z, *context)
        elif context is not None:
            base = self.context_base(*context)
        if self.readout is None:
            if base is None:
                raise ValueError("decode without a readout needs a context to compute its base from.")
            return base
        pred = self.readout(x, genes)  # (B, T * pp, m)
        pred = self.from_tokens(pred.reshape(B, self.n_tokens, self.p * self.p, -1))
        return pred if base is None else pred + base.to(pred.dtype)

    def forward(self, values: torch.Tensor, occupancy: torch.Tensor, genes: torch.Tensor,
                masked: torch.Tensor) -> torch.Tensor:
        """Reconstruct all bins with the tokens `masked` (B, T) bool hidden from the encoder."""
        token_occ = self.token_occupancy(occupancy)
        visible = token_occ & ~masked
        states, order, pad = self.encode(values, occupancy, genes, visible)
        return self.decode(states, order, pad, token_occ, genes, context=(values, occupancy, visible))

    @torch.no_grad()
    def token_embeddings(self, values: torch.Tensor, occupancy: torch.Tensor, genes: torch.Tensor,
                         readout: str = "encoder") -> torch.Tensor:
        """Every occupied token's embedding with nothing masked (0 for empty tokens): readout
        'encoder' = the encoder output (B, T, dim); 'encoder+input' = the encoder output beside the
        token's input features (B, T, 2 dim): its context and its own channels, both as learned."""
        if readout not in EMBED_READOUTS:
            raise ValueError(f"readout must be one of {EMBED_READOUTS}, got {readout!r}.")
        token_occ = self.token_occupancy(occupancy)
        states, order, pad, x_in = self.encode(values, occupancy, genes, token_occ, with_input=True)
        feats = states[:, 1:] if readout == "encoder" else torch.cat([states[:, 1:], x_in], dim=-1)
        B, L = order.shape
        out = torch.zeros(B, self.n_tokens, feats.shape[-1], dtype=states.dtype, device=states.device)
        b_idx = torch.arange(B, device=states.device)[:, None].expand_as(order)
        keep = ~pad
        out[b_idx[keep], order[keep]] = feats[keep]
        return out


def random_token_mask(token_occ: torch.Tensor, ratio: float, noise: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) bool: `ratio` of each patch's occupied tokens masked at random, at least one left
    visible and (when a patch has two or more occupied tokens) at least one masked. `noise`
    (B, T) uniform numbers make it reproducible (e.g. drawn from a seeded numpy Generator)."""
    B, T = token_occ.shape
    if noise is None:
        noise = torch.rand(B, T, device=token_occ.device)
    noise = torch.where(token_occ, noise, torch.full_like(noise, 2.0))
    rank = torch.argsort(torch.argsort(noise, dim=1), dim=1)
    n_occ = token_occ.sum(dim=1)
    n_vis = torch.clamp(torch.round((1.0 - ratio) * n_occ.float()).long(), min=1)
    n_vis = torch.minimum(n_vis, torch.clamp(n_occ - 1, min=1))
    return token_occ & (rank >= n_vis[:, None])
