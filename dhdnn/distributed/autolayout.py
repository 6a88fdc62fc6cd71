"""``run.replicas: auto``: choose agent partitions x replicas from a cost model measured at start-up.

Every rank takes part (collectives at setup, on the default group); rank 0 decides and tells
the others. Per training step of a layout (P, R):

* compute: a one-rank engine's step at batch ``ceil(B / R)`` is timed on rank 0, ``t(b)``, and
  at batch 8, ``t0`` (the per-step overhead that does not shrink with the work); with P
  partitions a rank does ``t0 + (t(b) - t0) / P``, and ranks with neighbours run the
  overlapped path, ``NEIGHBOUR_PATH_FACTOR`` times the one-rank path's overhead;
* exchanges (P > 1): ``2 x layers x exchanges per layer + 2`` (readout) neighbour exchanges at
  the measured exchange time (ranks paired, irecv + isend + wait, median);
* gradient averaging (R > 1): one all-reduce of the shard's gradient bytes, at the measured
  all-reduce latency plus bytes at the measured rate.

The model is small on purpose; ``benchmarks/bench_layouts.py`` prints its predictions beside
measured times for every layout.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .mesh import candidates

NEIGHBOUR_PATH_FACTOR = 1.6  # measured here: per-half-step overhead of the overlapped path / the short path


@dataclass
class Layout:
    agents: int
    replicas: int
    predicted_step_s: float
    candidates: dict = field(default_factory=dict)  # "PxR" -> predicted seconds per step


def _exchange_time(rounds: int = 40) -> float:
    """Median seconds of one neighbour exchange, ranks paired (0-1, 2-3, ...)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    peer = rank ^ 1
    t = torch.zeros(64)
    buf = torch.empty(64)
    times = []
    pg = dist.group.WORLD
    if peer < world:
        for _ in range(rounds):
            t0 = time.perf_counter()
            reqs = [pg.recv([buf], peer, 0), pg.send([t], peer, 0)]
            for r in reqs:
                r.wait()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] if times else 0.0


def _allreduce_times() -> tuple[float, float]:
    """(latency in seconds, seconds per byte) of an all-reduce on the default group."""
    small, big = torch.zeros(1), torch.zeros(1 << 18)
    for t in (small, big):
        dist.all_reduce(t)
    t0 = time.perf_counter()
    for _ in range(10):
        dist.all_reduce(small)
    lat = (time.perf_counter() - t0) / 10
    t0 = time.perf_counter()
    for _ in range(3):
        dist.all_reduce(big)
    per_byte = max(0.0, (time.perf_counter() - t0) / 3 - lat) / (big.numel() * big.element_size())
    return lat, per_byte


def _step_time(cfg, data, topo, batch: int, steps: int = 5) -> float:
    """Seconds per training step of the whole network on one rank (no exchanges) at ``batch``."""
    import copy

    from .engine import build_sharded_engine
    from .mesh import Groups, ParallelDims

    cfg = copy.deepcopy(cfg)
    cfg.run.trace, cfg.run.replicas = False, 1
    lone = Groups(ParallelDims(1), 0, _LoneGroup(), None)
    eng = build_sharded_engine(cfg, data, lone, topo, collectives=False)
    opt = torch.optim.Adam(eng.optimizer_groups(0.0), lr=1e-6, foreach=True)
    x, y = data.x_train[:batch], data.y_train[:batch]

    def step():
        opt.zero_grad(set_to_none=True)
        eng.objective(x, y, cfg.train.alpha).objective.backward()
        eng.after_backward()
        opt.step()
    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


class _LoneGroup:
    """Stands in for a process group of one rank (never used to communicate)."""


def choose(cfg, data, topo, log=print) -> Layout:
    """Measure, predict every layout, pick the fastest; identical on every rank."""
    from ..models import ARCHITECTURES

    world, rank = dist.get_world_size(), dist.get_rank()
    B = cfg.train.batch_size
    cands = candidates(world, topo.n_agents, B)
    t_ex = torch.tensor([_exchange_time()], dtype=torch.float64)
    dist.all_reduce(t_ex, op=dist.ReduceOp.MAX)
    lat, per_byte = _allreduce_times()
    numbers = torch.zeros(2 + len(cands), dtype=torch.float64)
    if rank == 0:
        numbers[0] = _step_time(cfg, data, topo, min(8, B))
        for i, (P, R) in enumerate(cands):
            numbers[2 + i] = _step_time(cfg, data, topo, math.ceil(B / R))
    dist.broadcast(numbers, 0)
    t0 = float(numbers[0])
    layout = ARCHITECTURES[cfg.model.arch].agent_layout(J=cfg.model.J)
    n_ex = 2 * cfg.model.layers * layout.exchanges_per_layer + 2
    params = _param_bytes(cfg, data, topo)
    best, lines, predicted = None, [], {}
    for i, (P, R) in enumerate(cands):
        tb = float(numbers[2 + i])
        overhead = t0 * (NEIGHBOUR_PATH_FACTOR if P > 1 else 1.0)
        t = overhead + max(0.0, tb - t0) / P
        if P > 1:
            t += n_ex * float(t_ex)
        if R > 1:
            t += lat + params / P * per_byte
        lines.append(f"{P}x{R} {1e3 * t:.2f} ms")
        predicted[f"{P}x{R}"] = t
        if best is None or t < best.predicted_step_s:
            best = Layout(P, R, t)
    best.candidates = predicted
    if rank == 0:
        log(f"dhdnn: run.replicas auto: {world} workers as {best.agents} agent partition(s) x {best.replicas} "
            f"replica(s), predicted {1e3 * best.predicted_step_s:.2f} ms per step (partitions x replicas: "
            f"{', '.join(lines)})")
    return best


def _param_bytes(cfg, data, topo) -> float:
    from ..blocks import BlockTable
    from ..models import ARCHITECTURES
    from ..resources import ITEMSIZE

    table = BlockTable(topo, ARCHITECTURES[cfg.model.arch].agent_layout(J=cfg.model.J), cfg.model.layers,
                       data.n_classes)
    return float(sum(len(c) * math.prod(c.shape) * (cfg.model.layers if c.layered else 1) for c in table)) * \
        ITEMSIZE[cfg.run.dtype]
