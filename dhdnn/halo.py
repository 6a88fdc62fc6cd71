"""The halo plan: what every rank sends and receives in each exchange, fixed for the whole run.

Per rank (like PETSc's scatter context): its agents, per neighbour rank the agents it sends and
receives, and its place in the spanning tree the readout travels; :class:`RankRows` turns it into
rows of the rank's fields. Sizes are static; everything is vectorised.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .partitioner import Partition, cut_pairs, rank_edges
from .topology import Topology

ITEMSIZE = {"float32": 4, "float64": 8}


@dataclass
class HaloPlan:
    """What rank ``rank`` sends and receives in every exchange."""

    rank: int
    workers: int
    local: np.ndarray  # my agents, canonical (global index) order
    send: dict[int, np.ndarray]  # neighbour rank -> my agents it reads, by global index
    recv: dict[int, np.ndarray]  # neighbour rank -> its agents I read, by global index
    tree_parent: int | None  # readout spanning tree of the rank graph, rooted at rank 0
    tree_children: list[int] = field(default_factory=list)

    @property
    def neighbor_ranks(self) -> list[int]:
        return sorted(self.send)

    @property
    def halo(self) -> np.ndarray:
        """All received agents, grouped by source rank in rank order (the halo layout)."""
        parts = [self.recv[s] for s in self.neighbor_ranks]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _tree(workers: int, edges: np.ndarray) -> tuple[list[int | None], list[list[int]]]:
    """BFS spanning tree of the rank graph from rank 0 (neighbours visited in rank order)."""
    adj: list[list[int]] = [[] for _ in range(workers)]
    for r, s in edges.tolist():
        adj[r].append(s)
        adj[s].append(r)
    parent: list[int | None] = [None] * workers
    children: list[list[int]] = [[] for _ in range(workers)]
    seen, frontier = {0}, [0]
    while frontier:
        nxt = []
        for r in frontier:
            for s in sorted(adj[r]):
                if s not in seen:
                    seen.add(s)
                    parent[s] = r
                    children[r].append(s)
                    nxt.append(s)
        frontier = nxt
    return parent, children


def build_plans(topo: Topology, part: Partition, ranks=None) -> list[HaloPlan]:
    """One :class:`HaloPlan` per rank (or only for ``ranks``)."""
    owner = np.asarray(part.assignment, dtype=np.int64)
    trip = cut_pairs(topo, owner)
    parent, children = _tree(part.workers, rank_edges(topo, owner))
    order = np.argsort(owner, kind="stable")
    bounds = np.searchsorted(owner[order], np.arange(part.workers + 1))
    plans = []
    for r in (range(part.workers) if ranks is None else ranks):
        out = trip[trip[:, 0] == r]
        inn = trip[trip[:, 1] == r]
        send = {int(s): out[out[:, 1] == s, 2] for s in np.unique(out[:, 1]).tolist()}
        recv = {int(s): inn[inn[:, 0] == s, 2] for s in np.unique(inn[:, 0]).tolist()}
        plans.append(HaloPlan(r, part.workers, order[bounds[r]:bounds[r + 1]], send, recv, parent[r], children[r]))
    return plans


def ranges(starts: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Concatenation of ``range(starts[i], starts[i] + widths[i])``."""
    total = int(widths.sum())
    if not total:
        return np.zeros(0, np.int64)
    base = np.repeat(starts - np.concatenate([[0], np.cumsum(widths)[:-1]]), widths)
    return base + np.arange(total)


@dataclass
class RankRows:
    """Where every agent a rank touches sits in its fields: local agents' rows ``[0, F)`` in
    canonical order, then halo agents' rows ``[F, F + H)`` in halo order (the *extended* field)."""

    plan: HaloPlan
    width: np.ndarray  # entries per agent in one field (all agents)

    def __post_init__(self):
        p = self.plan
        lw, hw = self.width[p.local], self.width[p.halo]
        self.F, self.H = int(lw.sum()), int(hw.sum())
        self.E = self.F + self.H
        self.start = np.full(len(self.width), -1, np.int64)  # first ext row of each agent (-1: absent)
        self.start[p.local] = np.concatenate([[0], np.cumsum(lw)[:-1]]).astype(np.int64)
        self.start[p.halo] = self.F + np.concatenate([[0], np.cumsum(hw)[:-1]]).astype(np.int64)

    def rows(self, agents: np.ndarray) -> np.ndarray:
        """Ext rows of ``agents``, agent after agent."""
        agents = np.asarray(agents, np.int64)
        return ranges(self.start[agents], self.width[agents])

    def send_rows(self) -> dict[int, np.ndarray]:
        return {s: self.rows(a) for s, a in self.plan.send.items()}

    def halo_slices(self) -> dict[int, slice]:
        out, at = {}, 0
        for s in self.plan.neighbor_ranks:
            w = int(self.width[self.plan.recv[s]].sum())
            out[s] = slice(at, at + w)
            at += w
        return out


def predicted_bytes(topo: Topology, part: Partition, batch: int, dtype: str = "float32", parts_per_agent: int = 1,
                    exchanges_per_layer: int = 4, layers: int = 1, classes: int = 2,
                    backward_factor: int = 1, logits_everywhere: bool = False, readout: str = "tree") -> dict:
    """Bytes the engine will send: per exchange (over all ranks), per layer and per training step.

    An exchange moves each boundary agent's slice once per neighbour rank that reads it
    (``parts_per_agent * n_i`` values). The readout sends ``batch x classes`` partial logits up
    each tree edge and their gradient down; with ``logits_everywhere`` (a user's loop, every
    rank gets the logits) the logits also come back down and the gradients go up first, twice
    the messages. ``backward_factor`` is 2 when the backward also
    rebuilds the forward (reversible backprop: the rebuilt values share the adjoint's messages).
    With ``readout="allreduce"`` the logits go through one all-reduce of ``batch x classes``
    values per rank and forward (``readout_collective``) instead of tree messages.
    """
    w = ITEMSIZE[dtype]
    owner = np.asarray(part.assignment, dtype=np.int64)
    trip = cut_pairs(topo, owner)
    vals = topo.dims[trip[:, 2]] * parts_per_agent * batch * w if len(trip) else np.zeros(0, np.int64)
    per_pair: dict[str, int] = {}
    for (a, b), v in zip(trip[:, :2].tolist(), vals.tolist()):
        per_pair[f"{a}->{b}"] = per_pair.get(f"{a}->{b}", 0) + int(v)
    per_exchange = int(vals.sum())  # a gather and a scatter-add move the same total
    parent, _ = _tree(part.workers, rank_edges(topo, owner))
    tree_edges = sum(1 for p in parent if p is not None)
    logits, collective = batch * classes * w, readout == "allreduce"
    tree = 0 if collective else (4 if logits_everywhere else 2) * tree_edges * logits
    per_layer_fwd = exchanges_per_layer * per_exchange
    return {"per_exchange": per_exchange, "per_pair": per_pair, "per_layer_forward": per_layer_fwd,
            "readout": tree, "readout_collective": logits if collective and part.workers > 1 else 0,
            "exchanges_per_layer_forward": exchanges_per_layer,
            "per_step": (1 + backward_factor) * layers * per_layer_fwd + tree}
