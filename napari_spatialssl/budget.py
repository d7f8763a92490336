"""Training memory: an estimate per method before training starts, refused with a setting that fits.

Each method's ``training_memory()`` returns a :class:`MemoryEstimate`: the bytes one training
step needs at its peak (inputs, activations kept for the backward pass and their gradients,
parameters with their optimiser state), what dominates, and how to change the settings to fit a
smaller budget. The estimates are deliberately simple formulas over the sizes of the view built in
``prepare`` (the largest whole-graph step, sampled ego-nets, the full spotscape graph, patches and
their attention); ``benchmarks/training_memory.py`` compares them with the measured peak.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from .data.io import SpatialDataError

GB = 1024**3
DEFAULT_BUDGET_FRACTION = 0.9  # of the memory available when training starts


@dataclass
class MemoryEstimate:
    """Peak bytes of one training step; `parts` says where they go; `fit(fraction)` names a setting
    change that scales the dominant part to `fraction` of today's (a sentence, e.g.
    "--set radius=12.3")."""

    bytes: float
    parts: dict[str, float]
    fit: Callable[[float], str]

    @property
    def gb(self) -> float:
        return self.bytes / GB


def available_memory(device) -> float:
    """Bytes free for training: the GPU's free memory on CUDA, else the machine's available RAM."""
    dev = getattr(device, "type", str(device))
    if dev == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info()
        return float(free)
    try:
        with open("/proc/meminfo") as fh:
            info = {line.split(":")[0]: line.split()[1:] for line in fh}
        avail = float(info["MemAvailable"][0]) * 1024
    except (OSError, KeyError, IndexError, ValueError):
        try:
            avail = float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return float("inf")
    return avail + _cgroup_headroom(avail)


def _cgroup_headroom(avail: float) -> float:
    """A container's memory limit can be lower than the machine's: never report more than it leaves."""
    for path, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = open(path).read().strip()
            if limit == "max":
                return 0.0
            left = float(limit) - float(open(usage).read().strip())
            return min(0.0, left - avail)
        except (OSError, ValueError):
            continue
    return 0.0


def budget_bytes(device, max_memory_gb: float | None) -> float:
    if max_memory_gb is not None:
        return float(max_memory_gb) * GB
    return DEFAULT_BUDGET_FRACTION * available_memory(device)


def check_budget(estimate: MemoryEstimate, device, max_memory_gb: float | None, *, method: str) -> None:
    """SpatialDataError when the estimate exceeds the budget, naming what dominates and a setting that fits."""
    budget = budget_bytes(device, max_memory_gb)
    if estimate.bytes <= budget:
        return
    main = max(estimate.parts, key=estimate.parts.get)
    where = "set max_memory_gb" if max_memory_gb is not None else "available"
    raise SpatialDataError(
        f"{method}: training would need about {estimate.gb:.1f} GB (mostly {main}: "
        f"{estimate.parts[main] / GB:.1f} GB) but {budget / GB:.1f} GB are {where}; "
        f"{estimate.fit(budget / estimate.bytes)} (or raise --set max_memory_gb=N if you know it fits).")


def adam_bytes(n_params: int) -> float:
    """Weights, gradients and AdamW's two moments, float32."""
    return 16.0 * n_params


def graph_step_bytes(n_nodes: float, n_edges: float, in_dim: int, dims: list[int], *, conv: str = "gcn",
                     heads: int = 1, decoder_dims: tuple[int, ...] = ()) -> dict[str, float]:
    """One forward + backward step of a message-passing encoder (and MLP decoder) on a graph of
    `n_nodes` and `n_edges` directed edges (self loops included by the caller), float32.

    Messages: every layer gathers one row per edge (E x C), weights it and scatters it back; the
    gathered rows, the messages and their gradients are alive at the peak (3 copies; GAT adds its
    attention logits, softmax and their gradients per head, and a second gathered side). Nodes:
    the input (x, its masked copy, the standardised copy, their gradient) and per layer about
    six N x C tensors (linear output, aggregate, norm, activation, dropout mask, residual)."""
    msg_copies = 3.0 if conv == "gcn" else 5.0
    edge_rows = sum(n_edges * c * msg_copies * 4.0 for c in dims)
    if conv != "gcn":
        edge_rows += sum(n_edges * heads * 4.0 * 4.0 for _ in dims)
    nodes = n_nodes * in_dim * 4.0 * 4.0 + sum(n_nodes * c * 4.0 * 6.0 for c in dims)
    decoder = sum(n_nodes * c * 4.0 * 4.0 for c in decoder_dims)
    return {"edge messages": edge_rows, "node activations": nodes + decoder}


def release_freed_memory() -> None:
    """Hand memory that Python and the libraries have freed back to the operating system.

    Between the pipeline's stages (after evaluation, before the domain search): a helper thread's
    arrays come from glibc's per-thread arenas, whose freed space is otherwise kept by the process
    (not returned to the system) and counts against a machine's memory while the next stage,
    at atlas scale a few GB of k-NN graph, allocates more. No-op where glibc is not the C library."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
