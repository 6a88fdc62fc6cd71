"""Agents -> workers, and the halo plan every exchange follows (DESIGN §3).

The partitioner balances state size (max load <= 1.1 x mean where integrality allows)
and minimises the edge cut weighted by message size: METIS k-way via pymetis by default,
a networkx recursive bisection (BFS-contiguous seed, Kernighan-Lin refinement) as the
fallback. Pinned agents are respected and no worker is left empty.

The :class:`HaloPlan` of a rank is built once: its agents in canonical order, per
neighbour rank the send list (my agents adjacent to some agent of theirs, by global
index) and the receive list (theirs, adjacent to mine), and its place in a spanning tree
of the rank graph for the readout. Sizes are static, so buffers are allocated once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx

from .topology import Topology, TopologyError

BALANCE = 1.1
ITEMSIZE = {"float32": 4, "float64": 8}


@dataclass(frozen=True)
class Partition:
    assignment: tuple[int, ...]  # agent index -> rank
    workers: int
    method: str

    def agents_of(self, rank: int) -> list[int]:
        return [i for i, r in enumerate(self.assignment) if r == rank]

    def loads(self, topo: Topology) -> list[int]:
        out = [0] * self.workers
        for i, r in enumerate(self.assignment):
            out[r] += topo.dims[i]
        return out

    def cut_edges(self, topo: Topology) -> list[tuple[int, int]]:
        return [(i, k) for i, k in topo.edges if self.assignment[i] != self.assignment[k]]

    def rank_graph(self, topo: Topology) -> nx.Graph:
        g = nx.Graph()
        g.add_nodes_from(range(self.workers))
        g.add_edges_from((self.assignment[i], self.assignment[k]) for i, k in self.cut_edges(topo))
        return g

    def imbalance(self, topo: Topology) -> float:
        loads = self.loads(topo)
        return max(loads) / (sum(loads) / self.workers)


def _check_workers(topo: Topology, workers: int) -> None:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise TopologyError(f"run.workers: expected a positive integer, got {workers!r}")
    if workers > topo.n_agents:
        raise TopologyError(f"run.workers: {workers} workers but {topo.source} has only {topo.n_agents} agents; "
                            "expected at most one worker per agent")
    for i, w in topo.pinned:
        if w >= workers:
            raise TopologyError(f"{topo.source}: key 'agents[{i}].worker': agent {topo.ids[i]!r} is pinned to "
                                f"worker {w}, expected a worker in [0, {workers})")


def partition(topo: Topology, workers: int, method: str = "auto") -> Partition:
    """Assign agents to ``workers`` ranks. ``method``: auto (METIS if pymetis imports), metis, bisection."""
    _check_workers(topo, workers)
    if method not in ("auto", "metis", "bisection"):
        raise ValueError(f"method: expected 'auto', 'metis' or 'bisection', got {method!r}")
    if workers == 1:
        return Partition(tuple([0] * topo.n_agents), 1, "single")
    if workers == topo.n_agents:
        return Partition(_one_per_worker(topo), workers, "one-per-worker")
    if method == "auto":
        try:
            import pymetis  # noqa: F401
            method = "metis"
        except ImportError:
            method = "bisection"
    parts = metis_parts(topo, workers) if method == "metis" else bisection_parts(topo, workers)
    parts = _repair(topo, parts, workers)
    return Partition(tuple(parts), workers, method)


def _one_per_worker(topo: Topology) -> tuple[int, ...]:
    pins = dict(topo.pinned)
    if len(set(pins.values())) != len(pins):
        raise TopologyError(f"{topo.source}: key 'agents': with one agent per worker, two agents cannot be "
                            "pinned to the same worker")
    free = iter(sorted(set(range(topo.n_agents)) - set(pins.values())))
    return tuple(pins[i] if i in pins else next(free) for i in range(topo.n_agents))


def _edge_weight(topo: Topology, i: int, k: int) -> int:
    return topo.dims[i] + topo.dims[k]  # both directions of the halo travel over a cut edge


def metis_parts(topo: Topology, workers: int) -> list[int]:
    """Plain METIS k-way on the agent graph (vertex weight n_i, edge weight n_i + n_k)."""
    import pymetis

    xadj, adjncy, ew = [0], [], []
    for i in range(topo.n_agents):
        nbrs = sorted(topo.graph.neighbors(i))
        adjncy += nbrs
        ew += [_edge_weight(topo, i, k) for k in nbrs]
        xadj.append(len(adjncy))
    opts = pymetis.Options(seed=0, ufactor=30)
    _, parts = pymetis.part_graph(workers, pymetis.CSRAdjacency(xadj, adjncy), vweights=list(topo.dims),
                                  eweights=ew, options=opts)
    return list(parts)


def bisection_parts(topo: Topology, workers: int) -> list[int]:
    """Recursive bisection: BFS-contiguous split at the target weight, refined by Kernighan-Lin."""
    g = topo.graph.copy()
    for i, k in g.edges:
        g.edges[i, k]["w"] = _edge_weight(topo, i, k)
    parts = [0] * topo.n_agents
    for r, nodes in enumerate(_bisect(g, list(g.nodes), workers, topo.dims)):
        for i in nodes:
            parts[i] = r
    return parts


def _bfs_order(g: nx.Graph) -> list[int]:
    """Nodes in BFS order from a pseudo-peripheral node, component by component."""
    order = []
    for comp in sorted(nx.connected_components(g), key=min):
        sub = g.subgraph(comp)
        start = min(comp)
        for _ in range(2):  # two sweeps find a far-away (pseudo-peripheral) start
            start = list(nx.bfs_tree(sub, start))[-1]
        order += list(nx.bfs_tree(sub, start))
    return order


def _bisect(g: nx.Graph, nodes: list[int], k: int, dims) -> list[list[int]]:
    if k == 1:
        return [sorted(nodes)]
    sub = g.subgraph(nodes)
    k1 = k // 2
    target = sum(dims[i] for i in nodes) * k1 / k
    order, acc, cut = _bfs_order(sub), 0, 0
    for cut, i in enumerate(order, 1):
        acc += dims[i]
        if acc >= target:
            if acc - target > dims[i] / 2 and cut > 1:  # the split is closer to target without i
                cut -= 1
            break
    cut = min(max(cut, k1), len(order) - (k - k1))  # every side keeps enough agents for its workers
    a, b = set(order[:cut]), set(order[cut:])
    if len(a) > 1 and len(b) > 1:
        a, b = nx.algorithms.community.kernighan_lin_bisection(sub, partition=(a, b), weight="w", seed=0)
    return _bisect(g, list(a), k1, dims) + _bisect(g, list(b), k - k1, dims)


def _repair(topo: Topology, parts: list[int], workers: int) -> list[int]:
    """Apply pins, fill empty workers and rebalance with greedy boundary moves."""
    parts = list(parts)
    pins = dict(topo.pinned)
    if pins:  # relabel parts to agree with as many pins as possible, then force the pins
        overlap = {}
        for i, w in pins.items():
            overlap[(parts[i], w)] = overlap.get((parts[i], w), 0) + topo.dims[i]
        relabel, used = {}, set()
        for (p, w), _ in sorted(overlap.items(), key=lambda kv: -kv[1]):
            if p not in relabel and w not in used:
                relabel[p] = w
                used.add(w)
        free = iter(sorted(set(range(workers)) - used))
        for p in range(workers):
            if p not in relabel:
                relabel[p] = next(free)
        parts = [relabel[p] for p in parts]
        for i, w in pins.items():
            parts[i] = w
    loads = [0] * workers
    for i, r in enumerate(parts):
        loads[r] += topo.dims[i]
    mean = sum(loads) / workers

    def gain(i, dst):  # change in cut weight if agent i moves to dst (negative is better)
        return sum(_edge_weight(topo, i, k) * ((parts[k] == parts[i]) - (parts[k] == dst))
                   for k in topo.graph.neighbors(i))

    for _ in range(4 * topo.n_agents):
        empty = [r for r in range(workers) if loads[r] == 0]
        heavy = max(range(workers), key=lambda r: loads[r])
        if not empty and loads[heavy] <= BALANCE * mean:
            break
        src = heavy
        movable = [i for i in range(topo.n_agents) if parts[i] == src and i not in pins]
        dst_opts = empty or [r for r in range(workers) if r != src]
        best = None
        for i in movable:
            for dst in dst_opts:
                if loads[dst] + topo.dims[i] >= loads[src] and not empty:
                    continue  # would not lower the maximum
                key = (gain(i, dst), loads[dst], i)
                if best is None or key < best[0]:
                    best = (key, i, dst)
        if best is None or sum(parts[i] == src for i in range(topo.n_agents)) <= 1:
            break
        _, i, dst = best
        parts[i] = dst
        loads[src] -= topo.dims[i]
        loads[dst] += topo.dims[i]
    if any(load == 0 for load in loads):
        raise TopologyError(f"{topo.source}: cannot give each of {workers} workers an agent under the pins")
    return parts


# ---- the halo plan ----------------------------------------------------------------------------
@dataclass
class HaloPlan:
    """What rank ``rank`` sends and receives in every exchange, fixed for the whole run."""

    rank: int
    workers: int
    local: list[int]  # my agents, canonical (global index) order
    send: dict[int, list[int]]  # neighbour rank -> my agents it needs, by global index
    recv: dict[int, list[int]]  # neighbour rank -> its agents I need, by global index
    tree_parent: int | None  # readout spanning tree of the rank graph, rooted at rank 0
    tree_children: list[int] = field(default_factory=list)

    @property
    def neighbor_ranks(self) -> list[int]:
        return sorted(self.send)

    @property
    def halo(self) -> list[int]:
        """All received agents, grouped by source rank in rank order (the halo buffer layout)."""
        return [a for s in self.neighbor_ranks for a in self.recv[s]]


def build_plans(topo: Topology, part: Partition) -> list[HaloPlan]:
    """One :class:`HaloPlan` per rank."""
    owner = part.assignment
    send: list[dict[int, set]] = [dict() for _ in range(part.workers)]
    for i, k in topo.edges:
        ri, rk = owner[i], owner[k]
        if ri != rk:
            send[ri].setdefault(rk, set()).add(i)
            send[rk].setdefault(ri, set()).add(k)
    tree = nx.bfs_tree(part.rank_graph(topo), 0)
    plans = []
    for r in range(part.workers):
        s = {peer: sorted(a) for peer, a in sorted(send[r].items())}
        rv = {peer: sorted(send[peer][r]) for peer in s}
        parent = next(iter(tree.predecessors(r)), None)
        plans.append(HaloPlan(r, part.workers, part.agents_of(r), s, rv, parent, sorted(tree.successors(r))))
    return plans


EXCHANGES_PER_LAYER = {"H2": 4, "H1": 2}  # forward; backward runs the same number of adjoints


def predicted_bytes(topo: Topology, part: Partition, batch: int, dtype: str = "float32", arch: str = "H2",
                    layers: int = 1, classes: int = 2) -> dict:
    """Bytes the engine will send: per exchange (over all ranks), per layer and per training step.

    An exchange moves each boundary agent's slice once per neighbour rank that needs it:
    ``n_i`` values for H2 (``p`` or ``q``), ``2 n_i`` for H1 (``p`` and ``q`` together). The
    readout sends ``batch x classes`` partial logits up each tree edge and their gradient down.
    """
    if arch not in EXCHANGES_PER_LAYER:
        raise TopologyError(f"arch: expected H1 or H2 for the distributed engine, got {arch!r}")
    w = ITEMSIZE[dtype]
    per_agent = 2 if arch == "H1" else 1
    plans = build_plans(topo, part)
    per_pair = {(p.rank, s): batch * w * per_agent * sum(topo.dims[a] for a in agents)
                for p in plans for s, agents in p.send.items()}
    per_exchange = sum(per_pair.values())  # a gather and a scatter_add move the same total
    n_ex = EXCHANGES_PER_LAYER[arch]
    tree_edges = sum(1 for p in plans if p.tree_parent is not None)
    readout = 2 * tree_edges * batch * classes * w
    per_layer_fwd = n_ex * per_exchange
    return {"per_exchange": per_exchange, "per_pair": {f"{a}->{b}": v for (a, b), v in sorted(per_pair.items())},
            "per_layer_forward": per_layer_fwd, "readout": readout,
            "per_step": 2 * layers * per_layer_fwd + readout, "exchanges_per_layer_forward": n_ex}
