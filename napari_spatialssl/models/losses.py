"""Spotscape's losses, written so that memory stays linear in the number of spots.

- :func:`similarity_telescope_loss`: mean((S - S^T)^2) for S = cos(z1_i, z2_j) over all spot
  pairs, computed exactly from d x d Gram matrices (never the N x N matrix).
- :func:`similarity_telescope_loss_dense`: the same from the N x N matrix (reference for tests and
  for the scaling benchmark's baseline).
- :func:`similarity_scale_loss`: multi-slice similarity-scale matching, computed in row blocks
  (memory O(block x N)).
- :func:`torch_kmeans` and :func:`prototype_contrast_loss`: prototypical contrast against k-means
  centroids, k-means running on the embeddings' device.
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch
import torch.nn.functional as F


def similarity_telescope_loss(z1: torch.Tensor, z2: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """mean over all (i, j) of (S_ij - S_ji)^2 with S_ij = cos(z1_i, z2_j); O(N d^2) time, O(N d) memory.

    With A, B the row-normalised embeddings (N x d), S = A B^T and
    ||S - S^T||_F^2 = 2 ||S||_F^2 - 2 tr(S S) = 2 <A^T A, B^T B> - 2 tr((B^T A)^2),
    where every product is d x d. Accumulated in float64 (the two terms nearly cancel when the
    views agree), divided by N^2; returned in z1's dtype.
    """
    n = z1.shape[0]
    a = F.normalize(z1.double(), dim=1, eps=eps)
    b = F.normalize(z2.double(), dim=1, eps=eps)
    gram_a = a.T @ a
    gram_b = b.T @ b
    cross = b.T @ a  # (d, d)
    sq = 2.0 * (gram_a * gram_b).sum() - 2.0 * (cross * cross.T).sum()  # tr(M M) = sum(M * M^T)
    # Rounding can leave a tiny negative value when the views agree exactly.
    return (sq.clamp_min(0.0) / float(n) ** 2).to(z1.dtype)


def similarity_telescope_loss_dense(z1: torch.Tensor, z2: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Reference: the same loss from the materialised N x N similarity matrix (O(N^2) memory)."""
    a = F.normalize(z1, dim=1, eps=eps)
    b = F.normalize(z2, dim=1, eps=eps)
    s = a @ b.T
    return ((s - s.T) ** 2).mean()


def _slice_members(section: torch.Tensor, n_slices: int) -> list[torch.Tensor]:
    order = torch.argsort(section, stable=True)
    counts = torch.bincount(section, minlength=n_slices).tolist()
    return list(torch.split(order, counts))


def similarity_scale_loss(z1: torch.Tensor, z2: torch.Tensor, section: torch.Tensor, k: int = 5,
                          block_size: int = 4096, eps: float = 1e-12,
                          anchors: torch.Tensor | None = None, detach_own: bool = False) -> torch.Tensor:
    """Similarity-scale matching between slices, in row blocks (memory O(block_size x N)).

    For every spot i (slice s) and every other slice t: m_it = mean of i's top-k cosine
    similarities (z1_i against z2 of the spots of slice t), m_is = the same within its own slice
    (i itself excluded). Loss = mean over (i, t != s) of (m_is - m_it)^2, so that a spot's closest
    matches in another slice are as similar as its closest matches at home (batch effects make
    inter-slice similarities smaller). Any number of slices; slices with <= k spots are skipped as
    targets. Returns 0 for a single slice. `anchors` (spot indices): score only these spots' rows
    (still against every spot of every slice), an unbiased estimate at anchors x N x d cost.
    `detach_own`: the within-slice level m_is is a target (no gradient), so the loss can only move
    the inter-slice similarities towards it, not shrink a spot's within-slice similarities.
    """
    section = section.to(z1.device).long()
    n_slices = int(section.max().item()) + 1 if section.numel() else 0
    if n_slices < 2:
        return z1.new_zeros(())
    a = F.normalize(z1, dim=1, eps=eps)
    b = F.normalize(z2, dim=1, eps=eps)
    members = _slice_members(section, n_slices)
    usable = [m.numel() > k for m in members]
    if anchors is not None:
        is_anchor = torch.zeros(section.numel(), dtype=torch.bool, device=section.device)
        is_anchor[anchors.to(section.device)] = True
    total = z1.new_zeros((), dtype=torch.float64)
    n_terms = 0
    for s, rows_s in enumerate(members):
        if not usable[s]:
            continue
        b_s = b[rows_s]
        # positions (within rows_s) of the rows scored: all, or the anchors of this slice
        scored = torch.arange(rows_s.numel(), device=z1.device)
        if anchors is not None:
            scored = scored[is_anchor[rows_s]]
        for start in range(0, scored.numel(), block_size):
            pos = scored[start:start + block_size]
            rows = rows_s[pos]
            a_blk = a[rows]
            # Within the own slice: exclude each row's own column (its position in rows_s).
            sim_own = a_blk @ b_s.T
            sim_own = sim_own.index_put((torch.arange(rows.numel(), device=z1.device), pos),
                                        torch.tensor(-math.inf, device=z1.device, dtype=sim_own.dtype))
            own = sim_own.topk(k, dim=1).values.mean(1).double()
            if detach_own:
                own = own.detach()
            del sim_own
            for t, rows_t in enumerate(members):
                if t == s or not usable[t]:
                    continue
                other = (a_blk @ b[rows_t].T).topk(k, dim=1).values.mean(1).double()
                total = total + ((own - other) ** 2).sum()
                n_terms += rows.numel()
    if n_terms == 0:
        return z1.new_zeros(())
    return (total / n_terms).to(z1.dtype)


def similarity_scale_loss_dense(z1: torch.Tensor, z2: torch.Tensor, section: torch.Tensor, k: int = 5,
                                eps: float = 1e-12, detach_own: bool = False) -> torch.Tensor:
    """Reference for tests: the same loss from the full N x N similarity matrix."""
    a = F.normalize(z1, dim=1, eps=eps)
    b = F.normalize(z2, dim=1, eps=eps)
    s = a @ b.T
    n = s.shape[0]
    s = s.masked_fill(torch.eye(n, dtype=torch.bool, device=s.device), -math.inf)
    section = section.to(s.device).long()
    n_slices = int(section.max()) + 1
    counts = torch.bincount(section, minlength=n_slices)
    valid = counts > k
    means = torch.stack([
        s[:, section == t].topk(k, dim=1).values.mean(1) if valid[t] else s.new_zeros(n)
        for t in range(n_slices)
    ])  # (n_slices, n): mean top-k similarity of each spot within each slice
    own = means[section, torch.arange(n, device=s.device)]
    if detach_own:
        own = own.detach()
    use = valid[:, None] & valid[section][None, :]
    use &= torch.arange(n_slices, device=s.device)[:, None] != section[None, :]
    diff = (own[None, :] - means) ** 2
    return diff[use].sum() / use.sum().clamp_min(1)


# k-means work (points x clusters x dims) below which it runs on one CPU thread. Its hundreds of
# tiny ops per call (20 Lloyd steps x 3 granularities per epoch) spent most of their time in
# thread synchronisation on a loaded 2-core machine: seconds per epoch whatever the slide's size
# (benchmarks/spotscape_epoch_cost.py). 0 = never (the earlier behaviour, the benchmark's baseline).
KMEANS_SINGLE_THREAD_WORK = 2**24


@contextlib.contextmanager
def _kmeans_threads(work: float, device: torch.device):
    """One intra-op thread for a small k-means on the CPU (see KMEANS_SINGLE_THREAD_WORK)."""
    prev = torch.get_num_threads()
    if device.type != "cpu" or prev == 1 or work >= KMEANS_SINGLE_THREAD_WORK:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def kmeans_pp_seeds(sample: torch.Tensor, k: int, gen: torch.Generator | None) -> torch.Tensor:
    """k-means++ seeding: (k, d) centres drawn from the rows of `sample`, each with probability
    proportional to its squared distance from the centres drawn before."""
    first = torch.randint(sample.shape[0], (1,), device=sample.device, generator=gen)
    centres = [sample[first]]
    d2 = ((sample - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / d2.numel())
        idx = torch.multinomial(probs, 1, generator=gen)
        centres.append(sample[idx])
        d2 = torch.minimum(d2, ((sample - centres[-1]) ** 2).sum(1))
    return torch.cat(centres, 0)


def torch_kmeans(x: torch.Tensor, k: int, n_iter: int = 20, generator: torch.Generator | None = None,
                 block_size: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on x's device (k-means++ seeding); returns (centroids (k, d), labels (N,)).

    Distances are computed in row blocks (memory O(block_size x k)); empty clusters are re-seeded
    at the points farthest from their centroid. No gradients flow (call on detached embeddings).
    Small problems run on one CPU thread (KMEANS_SINGLE_THREAD_WORK).
    """
    x = x.detach().float()
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means: k={k} must be between 1 and the number of points ({n}).")
    with _kmeans_threads(float(n) * k * x.shape[1], x.device):
        return _torch_kmeans(x, k, n_iter, generator, block_size)


def _torch_kmeans(x: torch.Tensor, k: int, n_iter: int, generator: torch.Generator | None,
                  block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[0]
    dev = x.device
    gen = generator

    def nearest(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.empty(n, dtype=torch.long, device=dev)
        dist = torch.empty(n, dtype=torch.float32, device=dev)
        c_sq = (c * c).sum(1)
        for start in range(0, n, block_size):
            xb = x[start:start + block_size]
            d = (xb * xb).sum(1, keepdim=True) - 2.0 * xb @ c.T + c_sq
            dist[start:start + block_size], labels[start:start + block_size] = d.min(1)
        return dist.clamp_min_(0.0), labels

    # k-means++ seeding on a sample (cheap and as good for seeding at large N).
    sample = x if n <= 20_000 else x[torch.randint(n, (20_000,), device=dev, generator=gen)]
    c = kmeans_pp_seeds(sample, k, gen)
    labels = torch.zeros(n, dtype=torch.long, device=dev)
    for _ in range(n_iter):
        dist, labels = nearest(c)
        sums = torch.zeros_like(c).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).float()
        empty = counts == 0
        c_new = sums / counts.clamp_min(1.0)[:, None]
        if empty.any():
            far = dist.topk(int(empty.sum())).indices
            c_new[empty] = x[far]
        if torch.allclose(c_new, c):
            c = c_new
            break
        c = c_new
    _, labels = nearest(c)
    return c, labels


def prototype_counts(k: int, granularity: Sequence[float]) -> list[int]:
    """Numbers of prototypes: k x each granularity, strictly increasing, at least 2."""
    out: list[int] = []
    for g in granularity:
        m = max(2, int(math.ceil(k * float(g))))
        if out and m <= out[-1]:
            m = out[-1] + 1
        out.append(m)
    return out


def prototype_contrast_loss(z: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor,
                            tau: float = 0.75) -> torch.Tensor:
    """InfoNCE of each spot against the k-means centroids: its own centroid is the positive.

    Cosine similarity / tau, cross-entropy over the centroids; mean over spots.
    """
    logits = F.normalize(z, dim=1) @ F.normalize(centroids.to(z.dtype), dim=1).T / tau
    return F.cross_entropy(logits.float(), labels)
