"""What a run will need and what this machine has: memory per rank, cores.

The estimate counts parameters, gradients and optimiser moments, the activations the backward
keeps, and the dataset; a run that cannot fit is refused before any worker starts.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from .config import ConfigError


ITEMSIZE = {"float32": 4, "float64": 8}


BASELINE = 400 << 20  # a worker process before it holds anything: Python, torch and its libraries


@dataclass
class Estimate:
    params: int  # bytes of parameters on the largest rank
    optimizer: int  # gradients and optimiser moments
    activations: int  # peak of one training batch's pass (what the backward keeps + its scratch)
    data: int
    baseline: int = BASELINE

    @property
    def total(self) -> int:
        return self.params + self.optimizer + self.activations + self.data + self.baseline

    def describe(self) -> str:
        parts = ", ".join(f"{k} {human(getattr(self, k))}" for k in ("params", "optimizer", "activations", "data"))
        return f"{human(self.total)} per rank ({parts})"


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def estimate(cfg, topo, n_features: int, n_classes: int, n_samples: int, agents: int, sharded: bool,
             rows: tuple[int, int] | None = None, param_bytes: int | None = None) -> Estimate:
    """Memory per rank of ``cfg`` with ``agents`` agent partitions. ``rows``: the rank's exact
    ``(F, E)`` field sizes and ``param_bytes`` its exact parameter bytes, where known (a built
    rank); otherwise an even share with 10 % imbalance and a halo as large as the rank's rows.
    Evaluation runs in chunks sized to the training batch's activation bytes, after training's
    buffers are released, so it does not add to the peak."""
    from .models import ARCHITECTURES

    mc, w = cfg.model, ITEMSIZE[cfg.run.dtype]
    cls = ARCHITECTURES[mc.arch]
    replicas = cfg.run.replicas if isinstance(cfg.run.replicas, int) else 1
    B, L = -(-cfg.train.batch_size // replicas), mc.layers
    moments = 3 if cfg.train.optimizer == "adam" else 2  # gradient + moments
    reversible = cfg.run.backprop == "reversible"
    if topo is not None and sharded:
        layout = cls.agent_layout(J=mc.J)
        widths = topo.dims * layout.parts_per_agent
        ip, ix = topo.closed_csr
        per_matrix = float((widths * np.add.reduceat(widths[ix], ip[:-1])).sum())  # sum_i w_i sum_{k in N[i]} w_k
        params = (len(layout.matrices) * per_matrix * L + len(layout.biases) * float(widths.sum()) * L) / agents * 1.1 * w
        F, E = rows if rows is not None else (float(widths.sum()) / agents * 1.1, 2 * float(widths.sum()) / agents * 1.1)
        nf, nhs = len(layout.field_names), len(layout.half_steps)
        kept = 6 * nf * E if reversible else nf * (L + 1) * E + L * nhs * F
        acts = (kept + 6 * E) * B * w  # + the backward's scratch fields
    else:
        from .models import NETWORKS

        net = NETWORKS[mc.network]  # (an image network: every pixel is a state of the H-DNN)
        dim, B = net.state_dim(mc, topo), B * net.states_per_sample(n_features)
        shapes = {"n": dim, "m": dim // 2}
        params = sum(L * math.prod(shapes[s] for s in shape) for shape in cls.param_shapes.values()) * w
        if topo is not None:
            params *= 1.25  # the boolean masks beside the dense matrices
        acts = (6 if reversible else 3 * (L + 1)) * B * dim * w
    if param_bytes is not None:
        params = param_bytes
    return Estimate(int(params), moments * int(params), int(acts), int(n_samples * (n_features + 1) * w))


class TooLarge(ConfigError):
    """What is about to be built needs more memory than this machine has available."""

    def __init__(self, message: str, need: float, avail: int):
        super().__init__(message)
        self.need, self.avail = need, avail


def require(need: float, what: str, then: str = "") -> None:
    """Raise :class:`TooLarge` where ``need`` bytes exceed what this process may still allocate:
    ``what`` (the file, the key, what needs it, ending in "an estimated"), the two sizes, ``then``."""
    avail = available_memory()
    if avail is not None and need > avail:
        raise TooLarge(f"{what} {human(need)}, more than this machine's {human(avail)} available{then}", need, avail)


def available_memory() -> int | None:
    """Bytes this process may still allocate: MemAvailable, capped by a cgroup limit if any."""
    avail = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit != "max":
            used = int(open("/sys/fs/cgroup/memory.current").read())
            room = int(limit) - used
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    return avail


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
