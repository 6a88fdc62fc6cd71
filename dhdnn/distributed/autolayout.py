"""``run.replicas: auto``: choose agent partitions x replicas (and on several nodes where the agent
groups sit) from a cost model measured at start-up; rank 0 decides and tells the others.

Per training step of a layout (P, R, placement): compute, a one-rank step at batch ``ceil(B / R)``
``t(b)`` and its fixed part ``t0`` (batch 8), ``t0 + (t(b) - t0) / P`` (``t0`` times
``NEIGHBOUR_PATH_FACTOR`` on the overlapped path of ranks with neighbours); halo exchanges (P > 1),
``2 x layers x exchanges per layer + 2`` of the plan's largest message at the latency and per-byte
cost measured inside a node, or between nodes where agent groups span them; gradient averaging
(R > 1), a ring all-reduce of the shard's bytes, likewise. ``benchmarks/bench_layouts.py`` and
``benchmarks/bench_two_nodes.py`` print its predictions beside measured times.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..config import PLACEMENTS
from .mesh import candidates

NEIGHBOUR_PATH_FACTOR = 1.6  # measured here: per-half-step overhead of the overlapped path / the short path


@dataclass
class Layout:
    agents: int
    replicas: int
    predicted_step_s: float
    placement: str = "packed"
    candidates: dict = field(default_factory=dict)  # "PxR placement" -> predicted seconds per step


def _exchange_cost(peer: int | None, rounds: int = 12) -> tuple[float, float]:
    """(latency in seconds, seconds per byte) of one exchange with ``peer`` (None: this rank sits
    out), from the medians at 256 bytes and at 1 MiB."""
    pg, out = dist.group.WORLD, []
    for n in (64, 1 << 18):
        t, buf, times = torch.zeros(n), torch.empty(n), []
        for _ in range(rounds if peer is not None else 0):
            t0 = time.perf_counter()
            for r in [pg.recv([buf], peer, 0), pg.send([t], peer, 0)]:
                r.wait()
            times.append(time.perf_counter() - t0)
        out.append(sorted(times)[len(times) // 2] if times else 0.0)
    return out[0], max(0.0, out[1] - out[0]) / ((1 << 18) * 4)


def _link_costs(per_node: int) -> dict[str, tuple[float, float]]:
    """Exchange latency and per-byte cost between ranks of one node (``intra``) and of two nodes
    (``inter``), the slowest pair of each (every rank takes part: setup-time collectives)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    node = rank // per_node
    pairs = {"intra": rank ^ 1 if (rank ^ 1) < world and (rank ^ 1) // per_node == node else None}
    if world > per_node:  # node 2k with node 2k + 1
        other = rank + per_node if node % 2 == 0 else rank - per_node
        pairs["inter"] = other if 0 <= other < world else None
    costs = {}
    for kind, peer in pairs.items():
        c = torch.tensor(_exchange_cost(peer), dtype=torch.float64)
        dist.all_reduce(c, op=dist.ReduceOp.MAX)
        costs[kind] = (float(c[0]), float(c[1]))
    return costs


def _step_time(cfg, data, topo, batch: int, steps: int = 5) -> float:
    """Seconds per training step of the whole network on one rank (no exchanges) at ``batch``."""
    import copy
    import dataclasses

    from .engine import build_sharded_engine
    from .mesh import Groups, ParallelDims

    cfg = copy.deepcopy(cfg)
    cfg.run.trace, cfg.run.replicas = False, 1
    lone = Groups(ParallelDims(1), 0, _LoneGroup(), None)
    whole = dataclasses.replace(topo, pinned=())  # (pins place agents on workers; this one rank holds them all)
    eng = build_sharded_engine(cfg, data, lone, whole, collectives=False)
    opt = torch.optim.Adam(eng.optimizer_groups(0.0), lr=1e-6, foreach=True)
    x, y = data.x_train[:batch], data.y_train[:batch]

    eng.train_step(opt, x, y, cfg.train.alpha)  # (the first step warms caches and workspaces)
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.train_step(opt, x, y, cfg.train.alpha)
    return (time.perf_counter() - t0) / steps


class _LoneGroup:
    """Stands in for a process group of one rank (never used to communicate)."""


def choose(cfg, data, topo, log=print) -> Layout:
    """Measure, predict every layout (and on several nodes, both placements of the agent groups),
    pick the fastest; identical on every rank."""
    from ..models import ARCHITECTURES
    from .mesh import ParallelDims, workers_per_node

    world, rank = dist.get_world_size(), dist.get_rank()
    per_node, B = workers_per_node(world), cfg.train.batch_size
    cands = candidates(world, topo, B)
    links = _link_costs(per_node)
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
        for placement in PLACEMENTS if world > per_node and 1 < P < world else ("packed",):
            facts = ParallelDims(world, R, placement).facts(per_node)
            t = t0 * (NEIGHBOUR_PATH_FACTOR if P > 1 else 1.0) + max(0.0, tb - t0) / P
            if P > 1:
                lat, per_byte = links["inter" if facts["agent_groups_span_nodes"] else "intra"]
                t += n_ex * (lat + _halo_bytes(cfg, topo, P, math.ceil(B / R)) * per_byte)
            if R > 1:  # a ring all-reduce: 2 (R - 1) steps of a 1/R share of the shard
                lat, per_byte = links["inter" if facts["replica_groups_span_nodes"] else "intra"]
                t += 2 * (R - 1) * (lat + params / P / R * per_byte)
            name = f"{P}x{R}" + (f" {placement}" if world > per_node else "")
            lines.append(f"{name} {1e3 * t:.2f} ms")
            predicted[name] = t
            if best is None or t < best.predicted_step_s:
                best = Layout(P, R, t, placement)
    best.candidates = predicted
    if rank == 0:
        log(f"dhdnn: run.replicas auto: {world} workers as {best.agents} agent partition(s) x {best.replicas} "
            f"replica(s){f', agent groups {best.placement}' if world > per_node else ''}, predicted "
            f"{1e3 * best.predicted_step_s:.2f} ms per step (partitions x replicas: {', '.join(lines)})")
    return best


def _halo_bytes(cfg, topo, P: int, batch: int) -> float:
    """The most bytes one rank sends in one exchange (the halo plan of the default partition)."""
    from ..halo import predicted_bytes
    from ..models import ARCHITECTURES
    from ..partitioner import partition

    lay = ARCHITECTURES[cfg.model.arch].agent_layout(J=cfg.model.J)
    pairs = predicted_bytes(topo, partition(topo, P), batch, cfg.run.dtype, lay.parts_per_agent)["per_pair"]
    sent: dict[str, int] = {}
    for k, v in pairs.items():
        sent[k.split("->")[0]] = sent.get(k.split("->")[0], 0) + v
    return float(max(sent.values(), default=0))


def _param_bytes(cfg, data, topo) -> float:
    from ..blocks import BlockTable
    from ..models import ARCHITECTURES
    from ..resources import ITEMSIZE

    table = BlockTable(topo, ARCHITECTURES[cfg.model.arch].agent_layout(J=cfg.model.J), cfg.model.layers,
                       data.n_classes)
    return float(sum(len(c) * math.prod(c.shape) * (cfg.model.layers if c.layered else 1) for c in table)) * \
        ITEMSIZE[cfg.run.dtype]
