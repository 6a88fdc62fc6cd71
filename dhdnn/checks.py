"""The checks of :mod:`dhdnn.testing` (locality, bytes, reductions, masks, exactness), each on
what a run leaves; :mod:`dhdnn.verify` runs them all for a run config.

Trace records (``run.trace``, ``distribute(trace=...)``) are one dict per message (``step``,
``phase``, ``layer``, ``op``, ``src``, ``dst``, ``bytes``; collectives with their ``group``).
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from .checkpoint import read_log
from .halo import build_plans, predicted_bytes
from .partitioner import Partition


class CheckFailed(AssertionError):
    """A property that does not hold: ``check`` is its name (locality, bytes, exactness, masks,
    reductions), the message names the offending message or entry."""

    def __init__(self, check: str, message: str):
        super().__init__(f"{check}: {message}")
        self.check = check


def read_trace(directory) -> list[dict]:
    """Every record of ``directory/trace-rank*.jsonl``."""
    return [r for p in sorted(Path(directory).glob("trace-rank*.jsonl")) for r in read_log(p)]


def _describe(m: dict) -> str:
    return f"step {m['step']} {m['phase']} {m['op']} of layer {m['layer']} from rank {m['src']} to rank {m['dst']}"


def check_locality(records, topology, assignment, *, batch, layout, layers: int, classes: int,
                   dtype: str = "float64", replicas: int = 1, backprop: str = "autograd",
                   logits_everywhere: bool = False, readout: str = "tree") -> dict:
    """Every halo and readout message goes between ranks of one replica that own adjacent agents,
    one message per neighbour rank per exchange, and each training step of each replica moves
    exactly the halo plan's bytes (per exchange, per phase, per step). ``batch``: a replica's share
    of the global batch (a list: each replica's); ``layout``: the architecture's
    :class:`~dhdnn.integrator.AgentLayout`. ``readout="allreduce"`` (the run's choice): the logits
    go through one all-reduce per rank and forward on its replica's agent ranks instead of the tree,
    the one exchange that is not neighbour-only; with ``"tree"`` such a collective fails the check."""
    assignment = np.asarray(assignment)
    P = int(assignment.max()) + 1
    part = Partition(assignment, P, "given")
    edges = {tuple(sorted(e)) for e in part.rank_graph(topology).edges}
    plans = build_plans(topology, part)
    factor = 2 if backprop == "reversible" else 1
    shares = list(batch) if isinstance(batch, (list, tuple)) else [batch] * replicas
    plans_b = [predicted_bytes(topology, part, b, dtype, layout.parts_per_agent, layout.exchanges_per_layer,
                               layers=layers, classes=classes, backward_factor=factor,
                               logits_everywhere=logits_everywhere, readout=readout) for b in shares]
    exchange, senders, step_bytes, collectives = defaultdict(int), defaultdict(int), defaultdict(int), defaultdict(int)
    n = 0
    for m in records:
        if m["op"] == "allreduce_grad":
            continue
        if m["op"] == "allreduce_readout":
            _readout_collective(m, P, readout, plans_b, collectives)
            continue
        (rs, s), (rd, d) = divmod(m["src"], P), divmod(m["dst"], P)
        if rs != rd or tuple(sorted((s, d))) not in edges:
            raise CheckFailed("locality", f"{_describe(m)}: ranks {m['src']} and {m['dst']} own no adjacent agents "
                                          f"(agent-rank edges {sorted(edges)}, {P} partitions per replica)")
        if m["phase"] == "eval":
            continue
        n += 1
        step_bytes[(m["step"], rs, m["phase"])] += m["bytes"]
        if m["op"] != "readout":
            pp, k = plans_b[rs]["per_pair"], factor if m["phase"] == "backward" else 1
            if m["bytes"] not in (k * pp.get(f"{s}->{d}", 0), k * pp.get(f"{d}->{s}", 0)):
                raise CheckFailed("bytes", f"{_describe(m)}: {m['bytes']} bytes, the plan's rows between agent ranks "
                                           f"{s} and {d} are {k * pp.get(f'{s}->{d}', 0)} / {k * pp.get(f'{d}->{s}', 0)}")
            exchange[(m["step"], rs, m["phase"], m["layer"], m["op"])] += m["bytes"]
            senders[(m["step"], rs, m["phase"], m["layer"], m["op"], s)] += 1
    for key, count in senders.items():
        if count != len(plans[key[-1]].neighbor_ranks):
            raise CheckFailed("locality", f"step {key[0]} {key[2]} {key[4]} of layer {key[3]}: rank {key[-1]} sent "
                                          f"{count} messages, expected one per neighbour rank "
                                          f"({len(plans[key[-1]].neighbor_ranks)})")
    for key, nbytes in exchange.items():
        want = plans_b[key[1]]["per_exchange"] * (factor if key[2] == "backward" else 1)
        if nbytes != want:
            raise CheckFailed("bytes", f"step {key[0]} replica {key[1]} {key[2]} {key[4]} of layer {key[3]}: "
                                       f"{nbytes} bytes, the plan {want}")
    totals = defaultdict(int)
    for (step, replica, _), nbytes in step_bytes.items():
        totals[(step, replica)] += nbytes
    for (step, replica), nbytes in totals.items():
        if nbytes != plans_b[replica]["per_step"]:
            raise CheckFailed("bytes", f"step {step} replica {replica}: {nbytes} bytes, the plan "
                                       f"{plans_b[replica]['per_step']} "
                                       f"(forward {step_bytes[(step, replica, 'forward')]}, backward "
                                       f"{step_bytes[(step, replica, 'backward')]})")
    if P > 1 and not totals:
        raise CheckFailed("locality", "no training messages were traced")
    expected = {(step, rank) for step, replica in totals for rank in range(replica * P, replica * P + P)}
    if readout == "allreduce" and totals and (set(collectives) != expected or set(collectives.values()) - {1}):
        raise CheckFailed("locality", "readout allreduce: expected one all-reduce of the logits per rank and "
                                      f"training step, traced {dict(collectives)} (step, rank) -> count")
    return {"messages": n, "bytes_per_step": sorted(set(totals.values())),
            "planned_per_step": sorted({p["per_step"] for p in plans_b}) if totals else [],
            "readout_collectives": sum(collectives.values())}


def _readout_collective(m: dict, P: int, readout: str, plans_b: list, counts: dict) -> None:
    """One traced all-reduce of the logits: only where the run chose it, on the sender's replica's
    agent ranks, of exactly the replica's ``batch x classes`` logits."""
    replica = m["src"] // P
    where = f"step {m['step']} {m['phase']} all-reduce of the logits by rank {m['src']} on ranks {m['group']}"
    if readout != "allreduce":
        raise CheckFailed("locality", f"{where}: a collective, but the run's readout is tree (neighbour messages "
                                      "only)")
    if sorted(m["group"]) != list(range(replica * P, replica * P + P)):
        raise CheckFailed("locality", f"{where}: expected its replica's agent ranks "
                                      f"{list(range(replica * P, replica * P + P))}")
    if m["phase"] == "eval":
        return
    want = plans_b[replica]["readout_collective"]
    if m["bytes"] != want:
        raise CheckFailed("bytes", f"{where}: {m['bytes']} bytes, the replica's logits are {want}")
    counts[(m["step"], m["src"])] += 1


def check_reductions(records, partitions: int, replicas: int, shard_bytes: dict | None = None) -> dict:
    """Gradient reductions run only in the backward, only on this shard's replica group (its
    agent partition in every replica), and each step reduces exactly the shard's gradient bytes
    (``shard_bytes``: agent partition -> bytes, where known). Without replicas: none at all."""
    per_step = defaultdict(int)
    for m in records:
        if m["op"] != "allreduce_grad":
            continue
        agent = m["src"] % partitions
        group = [agent + k * partitions for k in range(replicas)]
        if replicas == 1 or m["phase"] != "backward" or sorted(m["group"]) != group:
            raise CheckFailed("reductions", f"{_describe(m)}: a gradient reduction on ranks {m['group']} in the "
                                            f"{m['phase']}; expected only in the backward, on the replica group {group}")
        per_step[(m["src"], m["step"])] += m["bytes"]
    for (src, step), nbytes in per_step.items():
        want = (shard_bytes or {}).get(src % partitions)
        if want is not None and nbytes != want:
            raise CheckFailed("reductions", f"step {step} rank {src}: reduced {nbytes} bytes, its shard holds {want}")
    return {"reductions": len(per_step), "bytes_per_step": sorted(set(per_step.values()))}


def check_masks(model) -> dict:
    """Every weight entry of a dense model outside its graph's blocks (its masks) is exactly zero."""
    body, checked = model.body, 0
    for name in body.masked:
        mask = getattr(body, f"mask_{name}", None)
        if mask is None:
            continue
        p = getattr(body, name).detach()
        stray = (p != 0) & ~mask
        checked += int((~mask).sum()) * p.shape[0]
        if stray.any():
            layer, row, col = (int(i) for i in stray.nonzero()[0])
            raise CheckFailed("masks", f"body.{name}[layer {layer}, {row}, {col}] = {float(p[layer, row, col]):.3g} "
                                       "lies outside the graph's blocks; expected exactly 0")
    return {"entries": checked}


def check_outside(stray: list[dict]) -> dict:
    """A shard's stored entries outside the graph's blocks are zero (``stray``: the non-zero ones,
    from :meth:`~dhdnn.distributed.network.ShardedNet.outside` of every rank)."""
    for e in stray:
        raise CheckFailed("masks", f"rank {e['rank']}: {e['name']} layer {e['layer']}, {e['where']} = "
                                   f"{e['value']:.3g} lies outside the graph's blocks; expected exactly 0")
    return {}


def check_close(got: dict, want: dict, tol: float, what: str = "parameters", floor: float = 0.0) -> float:
    """Tensors of ``got`` equal those of ``want`` (same keys) within ``tol`` relative (to the
    largest entry of each, or ``floor`` where that is larger); returns the worst relative
    difference. Parameters after optimiser steps take the learning rate as ``floor``: Adam moves
    an entry by about the learning rate whatever its gradient, so the rounding of a gradient that
    nearly cancels (a readout bias on a balanced batch) shows as a difference on that scale."""
    worst = 0.0
    for key, ref in want.items():
        if key not in got:
            raise CheckFailed("exactness", f"{what}: {key} is missing")
        ref = ref.detach()
        diff = (got[key].detach().double() - ref.double()).abs()
        rel = float(diff.max()) / max(float(ref.abs().max()), floor, 1e-300) if diff.numel() else 0.0
        if not rel <= tol:
            idx = tuple(int(i) for i in np.unravel_index(int(diff.argmax()), tuple(diff.shape)))
            raise CheckFailed("exactness", f"{what}: {key}{list(idx)} differs by {rel:.3g} (relative), above {tol:g}")
        worst = max(worst, rel)
    return worst


def check_same_network(a, b, x: torch.Tensor, tol: float = 1e-10, floor: float = 0.0,
                       param_tol: float | None = None) -> float:
    """Two dense models (e.g. one process's and the shards loaded back) hold the same parameters
    (within ``param_tol``, default ``tol``; ``floor`` as in :func:`check_close`) and compute the
    same outputs on ``x`` (within ``tol``)."""
    worst = check_close(dict(a.named_parameters()), dict(b.named_parameters()),
                        tol if param_tol is None else param_tol, floor=floor)
    with torch.no_grad():
        return max(worst, check_close({"outputs": a(x)}, {"outputs": b(x)}, tol, "outputs"))
