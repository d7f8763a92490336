"""Data-parallel training on torch.distributed: process groups, launching ranks, and the exact
cross-rank sums that the methods' sharded losses are made of.

How a run is split (the same code on one machine and on several):

- Every rank reads the slide, builds the same view and draws the same **global** batches from
  the same seed. A method that supports sharding (:meth:`set_shard`) then computes, in
  ``training_loss``, only its rank's part of each global batch (centre cells and their ego-nets,
  whole sections, lattice patches, or the spots a rank owns in spotscape's full graph) and
  returns its *share* of every loss: the shares of all ranks sum to the loss of the global batch.
- The Trainer sums the gradients (and the logged loss values, and a stop flag) over the ranks in
  one all-reduce per step, so every rank takes the same optimiser step as a single process
  would on the global batch: the same weights, up to floating-point summation order.
- Terms that are not sums over cells are built from sums: spotscape's similarity telescope from
  d x d Gram matrices (:func:`telescope_loss`), batch norm from per-feature moments
  (:func:`batch_norm`), k-means from per-centroid sums and counts (:func:`kmeans`). The sums are
  differentiable all-reduces, so gradients are exact too.
- Rank 0 alone writes the run folder and training checkpoints, evaluates and reports; a Stop
  asked of any rank is seen by every rank after the current step.

Backends: gloo on CPU, NCCL on CUDA (one GPU per rank, ``cuda:LOCAL_RANK``).

Launching (see README "Several devices"): ``napari-spatialssl fit ... --devices N`` starts N
processes on this machine (:func:`launch_cli`); ``torchrun`` and ``srun`` start the same command
on one or more machines, which :func:`context_from_env` recognises from their environment
variables; ``Pipeline(..., devices=N)`` (Python API, the napari widget) makes the calling process
rank 0 and starts N - 1 helpers (:class:`LocalGroup`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist

# The autograd all-reduce we use is marked deprecated in favour of a private module; it works.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_reduce is deprecated")

LAUNCHED_ENV = "SPATIALSSL_DIST_LAUNCHED"  # set by our launchers in the ranks they start
DEFAULT_TIMEOUT_MINUTES = 30.0


@dataclass
class DistContext:
    """Where this process stands in a process group. ``world_size == 1`` means no group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str = "gloo"  # or "cpu:gloo,cuda:nccl"
    group: Any = None  # None: the default group
    settings_sent: bool = False  # the CLI: rank 0 has sent its settings to the others

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    # -- sums over ranks ---------------------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of `tensor` over ranks, in place (no gradient); returns it."""
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def all_reduce_grad(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks that gradients flow through (the backward sums the gradients too)."""
        if not self.active:
            return tensor
        from torch.distributed.nn.functional import all_reduce

        return all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
        return tensor

    def broadcast_object(self, obj=None, src: int = 0):
        """`obj` of rank `src` on every rank (pickled; for settings, paths, small results)."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            dist.barrier(group=self.group)

    def split(self, n: int) -> slice:
        """This rank's contiguous part of range(n) (np.array_split's cut: sizes differ by <= 1)."""
        return split_range(n, self.rank, self.world_size)

    def comm_device(self, device: torch.device) -> torch.device:
        """Where a tensor on `device` is reduced: where it is when the group has NCCL (CUDA tensors
        go through NCCL, CPU ones through gloo), else on the CPU."""
        return device if "nccl" in self.backend else torch.device("cpu")


SINGLE = DistContext()


def split_range(n: int, rank: int, world_size: int) -> slice:
    """Rank `rank`'s contiguous part of range(n): sizes differ by at most one, earlier ranks larger."""
    base, extra = divmod(int(n), int(world_size))
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


# -- process groups ---------------------------------------------------------------------------

def _env_int(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _slurm_master_addr() -> str | None:
    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
    if not nodes:
        return None
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, timeout=30)
        first = out.stdout.split()
        return first[0] if first else None
    except (OSError, subprocess.SubprocessError):
        return nodes if all(c not in nodes for c in "[],") else None


def env_ranks() -> tuple[int, int, int, int] | None:
    """(rank, world_size, local_rank, local_world_size) from a launcher's environment, or None.

    torchrun (and our launchers) set RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE;
    ``srun`` sets SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID (only inside a job step, so a
    batch script's own shell is never taken for rank 0 of a group that was not started)."""
    world = _env_int("WORLD_SIZE")
    if world is not None and world > 1 and _env_int("RANK") is not None:
        rank = _env_int("RANK")
        local = _env_int("LOCAL_RANK") or 0
        local_world = _env_int("LOCAL_WORLD_SIZE") or max(1, min(world, (torch.cuda.device_count() or 1)))
        return rank, world, local, local_world
    world = _env_int("SLURM_STEP_NUM_TASKS")
    if world is not None and world > 1 and _env_int("SLURM_PROCID") is not None:
        rank = _env_int("SLURM_PROCID")
        local = _env_int("SLURM_LOCALID") or 0
        nodes = _env_int("SLURM_STEP_NUM_NODES", "SLURM_NNODES") or 1
        return rank, world, local, max(1, -(-world // nodes))
    return None


def init_process_group(rank: int, world_size: int, local_rank: int = 0, local_world_size: int = 1, *,
                       master_addr: str | None = None, master_port: int | None = None,
                       timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> DistContext:
    """Join (or create) the default process group: gloo for CPU tensors, and NCCL for CUDA tensors
    where CUDA is present ("cpu:gloo,cuda:nccl"), so the group serves whichever device the run's
    settings (read later) choose. Rank r uses ``cuda:LOCAL_RANK``; each rank takes its share of the
    machine's CPU cores (cores / ranks on this machine), so that N ranks do not oversubscribe them."""
    if master_addr is not None:
        os.environ["MASTER_ADDR"] = str(master_addr)
    if master_port is not None:
        os.environ["MASTER_PORT"] = str(master_port)
    if "MASTER_ADDR" not in os.environ:
        addr = _slurm_master_addr()
        if addr is None:
            from .data.io import SpatialDataError

            raise SpatialDataError("several processes but no MASTER_ADDR; export MASTER_ADDR=<host of rank 0> "
                                   "and MASTER_PORT=<free port> (torchrun sets them; under srun see the README).")
        os.environ["MASTER_ADDR"] = addr
    os.environ.setdefault("MASTER_PORT", "29533")
    cuda = torch.cuda.is_available() and dist.is_nccl_available()
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(local_rank % max(torch.cuda.device_count(), 1))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local_world_size, 1)))
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size,
                                timeout=timedelta(minutes=timeout_minutes))
    return DistContext(rank, world_size, local_rank, local_world_size, backend)


def context_from_env() -> DistContext | None:
    """The process group a launcher (torchrun, srun, ``--devices``) started this process in,
    joined; None when the process runs alone."""
    ranks = env_ranks()
    if ranks is None:
        return None
    return init_process_group(*ranks)


def shutdown(ctx: DistContext | None) -> None:
    if ctx is not None and ctx.active and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a broken group is being left anyway
            pass


def rank_device(device: torch.device, ctx: DistContext | None) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for CUDA, else the device as given."""
    if ctx is not None and ctx.active and device.type == "cuda" and device.index is None:
        return torch.device("cuda", ctx.local_rank % max(torch.cuda.device_count(), 1))
    return device


def local_device_counts() -> dict:
    """What a "devices" choice can offer on this machine (the widget's spin box): CUDA GPUs
    (one rank each) and CPU cores (gloo ranks share them)."""
    return {"cuda": int(torch.cuda.device_count()) if torch.cuda.is_available() else 0,
            "cpu_cores": int(os.cpu_count() or 1)}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- launching ranks on this machine ----------------------------------------------------------

def launched() -> bool:
    """True inside a rank started by a launcher (ours, torchrun or srun)."""
    return os.environ.get(LAUNCHED_ENV) == "1" or env_ranks() is not None


def rank_env(rank: int, world_size: int, port: int, base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    env.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                LAUNCHED_ENV: "1"})
    return env


def launch_cli(argv: Sequence[str], devices: int, *, poll_seconds: float = 0.2) -> int:
    """Run ``napari-spatialssl <argv>`` as `devices` ranks on this machine and wait for them.

    Rank 0 keeps this terminal (progress bar, summary); the other ranks print only errors. When a
    rank fails the others are stopped and its exit code is returned; Ctrl-C stops every rank."""
    port = free_port()
    procs = []
    for rank in range(devices):
        out = None if rank == 0 else subprocess.DEVNULL
        procs.append(subprocess.Popen([sys.executable, "-m", "napari_spatialssl.cli", *argv],
                                      env=rank_env(rank, devices, port), stdout=out))
    try:
        return _wait_all(procs, poll_seconds)
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        _wait_all(procs, poll_seconds, grace=10.0)
        return 130


def _wait_all(procs, poll_seconds: float, grace: float | None = None) -> int:
    """Wait for every process; the first non-zero exit stops the rest (their collectives would
    otherwise wait for the failed rank until the group's timeout)."""
    t0 = time.monotonic()
    while True:
        codes = [p.poll() for p in procs]
        failed = [c for c in codes if c not in (None, 0)]
        if failed or all(c is not None for c in codes) or (grace is not None and time.monotonic() - t0 > grace):
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
            return int(failed[0]) if failed else max(int(p.returncode or 0) for p in procs)
        time.sleep(poll_seconds)


class LocalGroup:
    """This process as rank 0 of `devices` ranks on this machine, with devices - 1 helper processes
    running ``target(ctx, *args)`` (multiprocessing 'spawn'; `args` are pickled to them).

    Used by ``Pipeline(..., devices=N)`` (Python API, the napari widget): the caller keeps its
    events, its stop button and its results; the helpers only train. ``with LocalGroup(...) as ctx``
    joins the group on entry and leaves it (and reaps the helpers) on exit."""

    def __init__(self, devices: int, target, args: tuple = ()):
        self.devices, self.target, self.args = int(devices), target, args
        self.procs: list = []
        self.ctx: DistContext | None = None

    def __enter__(self) -> DistContext:
        import multiprocessing as mp

        port = free_port()
        spawn = mp.get_context("spawn")
        for rank in range(1, self.devices):
            p = spawn.Process(target=_helper_main, args=(rank, self.devices, port, self.target, self.args),
                              daemon=True)
            p.start()
            self.procs.append(p)
        self.ctx = init_process_group(0, self.devices, 0, self.devices, master_addr="127.0.0.1", master_port=port)
        return self.ctx

    def __exit__(self, exc_type, exc, tb) -> None:
        shutdown(self.ctx)
        for p in self.procs:
            p.join(timeout=60 if exc_type is None else 5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
        bad = [p.exitcode for p in self.procs if p.exitcode not in (0, None)]
        if bad and exc_type is None:
            raise RuntimeError(f"a helper training process failed (exit code {bad[0]}); see its error above.")


def _helper_main(rank: int, world: int, port: int, target, args: tuple) -> None:
    os.environ[LAUNCHED_ENV] = "1"
    ctx = init_process_group(rank, world, rank, world, master_addr="127.0.0.1", master_port=port)
    try:
        target(ctx, *args)
    finally:
        shutdown(ctx)


# -- one step's sums: gradients, loss values, the stop flag -----------------------------------

def sync_step(params: Sequence[torch.nn.Parameter], values: Sequence[torch.Tensor], stop: bool,
              ctx: DistContext) -> tuple[list[float], bool]:
    """Sum the gradients of `params` over ranks (in place; a missing gradient counts as zero), and
    the scalar `values` and the stop flag, in one all-reduce. Returns (summed values, any stop)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    dev = ctx.comm_device(grads[0].device if grads else torch.device("cpu"))
    extra = torch.tensor([float(v.detach()) for v in values] + [1.0 if stop else 0.0], dtype=torch.float64)
    flat = torch.cat([g.detach().reshape(-1).to(dev, torch.float32) for g in grads] +
                     [extra.to(dev, torch.float32)]) if grads else extra.to(dev)
    # The loss values travel in float32 with the gradients: rounding of ~1e-7 relative at most.
    ctx.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).to(g.device, g.dtype)
        offset += n
    tail = flat[offset:].double().cpu()
    return [float(v) for v in tail[:-1]], bool(tail[-1] > 0)


def broadcast_module(model: torch.nn.Module, ctx: DistContext) -> None:
    """Rank 0's parameters and buffers on every rank (the same start whatever each rank drew)."""
    if not ctx.active:
        return
    for t in list(model.parameters()) + list(model.buffers()):
        buf = t.data.to(ctx.comm_device(t.device))
        dist.broadcast(buf, src=0, group=ctx.group)
        t.data.copy_(buf.to(t.device))


def agree(flag: bool, ctx: DistContext) -> bool:
    """True on every rank when any rank says True."""
    if not ctx.active:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    return bool(ctx.all_reduce_max(t)[0] > 0)


def broadcast_float(value: float | None, ctx: DistContext) -> float | None:
    """Rank 0's value (None allowed) on every rank."""
    if not ctx.active:
        return value
    t = torch.tensor([np.nan if value is None else float(value), 0.0 if value is None else 1.0],
                     dtype=torch.float64)
    dist.broadcast(t, src=0, group=ctx.group)
    return float(t[0]) if t[1] > 0 else None


# -- exact cross-rank pieces of the losses ----------------------------------------------------

def _reduce_to(t: torch.Tensor, ctx: DistContext, grad: bool) -> torch.Tensor:
    """Differentiable (or plain) sum over ranks, moved through the backend's device."""
    dev = ctx.comm_device(t.device)
    moved = t.to(dev)
    out = ctx.all_reduce_grad(moved) if grad else ctx.all_reduce(moved.clone())
    return out.to(t.device)


def telescope_loss(z1: torch.Tensor, z2: torch.Tensor, n_total: int, ctx: DistContext,
                   eps: float = 1e-12) -> torch.Tensor:
    """Spotscape's similarity telescope over the spots of *all* ranks, each rank passing its own
    spots' embeddings: the d x d Grams A^T A, B^T B and B^T A are sums over spots, so their
    all-reduce gives the single-process value exactly (losses.similarity_telescope_loss for the
    formula). Returns the global loss, the same on every rank, with gradients to this rank's rows."""
    import torch.nn.functional as F

    a = F.normalize(z1.double(), dim=1, eps=eps)
    b = F.normalize(z2.double(), dim=1, eps=eps)
    d = a.shape[1]
    grams = torch.stack([a.T @ a, b.T @ b, b.T @ a]).reshape(3, d, d)
    grams = _reduce_to(grams, ctx, grad=True)
    gram_a, gram_b, cross = grams[0], grams[1], grams[2]
    sq = 2.0 * (gram_a * gram_b).sum() - 2.0 * (cross * cross.T).sum()
    return (sq.clamp_min(0.0) / float(n_total) ** 2).to(z1.dtype)


def batch_norm(bn: torch.nn.BatchNorm1d, h: torch.Tensor, rows: torch.Tensor | None, n_total: int,
               ctx: DistContext) -> torch.Tensor:
    """Training-mode BatchNorm1d of `h` with the batch statistics of the rows of every rank.

    `rows`: which rows of `h` this rank contributes to the statistics (its own spots; None = all;
    the other rows, e.g. a graph halo, are normalised with the same statistics). Mean and variance
    come from two all-reduced sums in float64 (mean first, then centred squares, as a two-pass
    variance); the running statistics are updated as torch does (unbiased variance)."""
    own = h if rows is None else h[rows]
    hd = own.double()
    mean = _reduce_to(hd.sum(0), ctx, grad=True) / n_total
    var = _reduce_to(((hd - mean) ** 2).sum(0), ctx, grad=True) / n_total
    out = (h - mean.to(h.dtype)) * torch.rsqrt(var + bn.eps).to(h.dtype)
    if bn.affine:
        out = out * bn.weight + bn.bias
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked += 1
            m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            unbiased = var.detach() * (n_total / max(n_total - 1, 1))
            bn.running_mean.mul_(1 - m).add_(m * mean.detach().to(bn.running_mean.dtype))
            bn.running_var.mul_(1 - m).add_(m * unbiased.to(bn.running_var.dtype))
    return out


def gather_rows(x: torch.Tensor, global_ids: torch.Tensor, owner_pos: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Rows `global_ids` of the matrix whose rows are spread over the ranks, on every rank.

    `owner_pos`: (n_total,) position of each global row among this rank's rows of `x`, -1 where
    another rank holds it. Each rank fills the rows it holds; a sum over ranks assembles them."""
    pos = owner_pos[global_ids]
    out = torch.zeros(len(global_ids), x.shape[1], dtype=x.dtype, device=x.device)
    mine = pos >= 0
    out[mine] = x[pos[mine]]
    return _reduce_to(out, ctx, grad=False)


def kmeans(x: torch.Tensor, k: int, n_total: int, owner_pos: torch.Tensor, ctx: DistContext, n_iter: int = 20, generator: torch.Generator | None = None,
           block_size: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """losses.torch_kmeans over rows spread across ranks: each rank passes its own rows `x`
    (`owner_pos` as in :func:`gather_rows`: where each global row sits among them) and gets the
    same centroids as a single process would on all rows, with its rows' labels.

    The random draws (k-means++ on a sample of global rows) use `generator` exactly as the
    single-process function does, on the sample gathered from the ranks; each Lloyd step sums
    the centroids' members and counts over ranks; empty clusters are re-seeded at the globally
    farthest rows."""
    from .models.losses import _kmeans_threads

    x = x.detach().float()
    n = int(n_total)
    if not 1 <= k <= n:
        raise ValueError(f"k-means: k={k} must be between 1 and the number of points ({n}).")
    dev = x.device
    gen = generator
    with _kmeans_threads(n * k * x.shape[1], dev):
        return _kmeans_sharded(x, k, n, owner_pos, ctx, n_iter, gen, block_size, dev)


def _kmeans_sharded(x, k, n, owner_pos, ctx, n_iter, gen, block_size, dev):
    from .models.losses import kmeans_pp_seeds

    def nearest(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = x.shape[0]
        labels = torch.empty(m, dtype=torch.long, device=dev)
        dist_ = torch.empty(m, dtype=torch.float32, device=dev)
        c_sq = (c * c).sum(1)
        for start in range(0, m, block_size):
            xb = x[start:start + block_size]
            d = (xb * xb).sum(1, keepdim=True) - 2.0 * xb @ c.T + c_sq
            dist_[start:start + block_size], labels[start:start + block_size] = d.min(1)
        return dist_.clamp_min_(0.0), labels

    if n <= 20_000:
        sample = gather_rows(x, torch.arange(n, device=dev), owner_pos, ctx)
    else:
        sample = gather_rows(x, torch.randint(n, (20_000,), device=dev, generator=gen), owner_pos, ctx)
    c = kmeans_pp_seeds(sample, k, gen)
    for _ in range(n_iter):
        dist_, labels = nearest(c)
        sums = torch.zeros_like(c).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).float()
        both = _reduce_to(torch.cat([sums, counts[:, None]], 1), ctx, grad=False)
        sums, counts = both[:, :-1], both[:, -1]
        empty = counts == 0
        c_new = sums / counts.clamp_min(1.0)[:, None]
        if empty.any():
            c_new[empty] = _farthest_rows(x, dist_, int(empty.sum()), ctx)
        if torch.allclose(c_new, c):
            c = c_new
            break
        c = c_new
    _, labels = nearest(c)
    return c, labels


def _farthest_rows(x: torch.Tensor, dist_: torch.Tensor, m: int, ctx: DistContext) -> torch.Tensor:
    """The `m` rows farthest from their centroid over all ranks (largest distance first)."""
    take = min(m, x.shape[0])
    table = torch.zeros(ctx.world_size, m, 2, dtype=torch.float64, device=x.device)  # (distance, present)
    top = dist_.topk(take) if take else None
    if take:
        table[ctx.rank, :take, 0] = top.values.double()
        table[ctx.rank, :take, 1] = 1.0
    table = _reduce_to(table, ctx, grad=False)  # each rank wrote only its own row
    score = torch.where(table[..., 1] > 0, table[..., 0], torch.full_like(table[..., 0], -np.inf)).reshape(-1)
    chosen = torch.argsort(score, descending=True, stable=True)[:m]
    out = torch.zeros(m, x.shape[1], dtype=x.dtype, device=x.device)
    for j, flat in enumerate(chosen.tolist()):  # m empty clusters: a handful at most
        r, slot = divmod(flat, m)
        if r == ctx.rank and slot < take:
            out[j] = x[top.indices[slot]]
    return _reduce_to(out, ctx, grad=False)


# -- which part of a global batch is this rank's -----------------------------------------------

def balanced_groups(sizes: Sequence[float], world_size: int) -> list[list[int]]:
    """Items (by index) per rank, largest first to the least loaded rank (deterministic), so that
    whole sections of different sizes split into rank loads as equal as possible."""
    loads = [0.0] * world_size
    out: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(sizes)), key=lambda j: (-float(sizes[j]), j)):
        r = min(range(world_size), key=lambda q: (loads[q], q))
        out[r].append(i)
        loads[r] += float(sizes[i])
    return [sorted(g) for g in out]


def keyed_uniform(seed: int, ids: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) numbers, one per global id, from a counter-based hash (splitmix64) of
    (seed, id): the same number for a cell whichever rank or subgraph draws it. Vectorised."""
    with np.errstate(over="ignore"):
        z = np.asarray(ids, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)
