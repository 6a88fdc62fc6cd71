"""Agents -> workers: a partition that minimises what is sent.

The objective is the halo volume of an exchange, ``sum_a n_a * |{ranks other than a's own among
a's neighbours' ranks}|`` (proportional to the bytes per step), then the neighbour-rank pairs,
under ``max load <= 1.1 x mean`` where integrality allows, no worker empty, pins respected.
Candidates: METIS k-way on communication volume with several seeds, and plain METIS (so the
result is never worse than it); on small graphs an exact branch-and-bound search. Each is
repaired, refined by single-agent moves on the real objective, and the best one wins.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .topology import Topology, TopologyError

BALANCE = 1.1
EXACT_AGENTS = 20  # graphs up to this size are partitioned exactly (branch and bound)
EXACT_NODES = 2_000_000  # search nodes before the exact search settles for the best found
REFINE_AGENTS = 50_000  # greedy refinement on graphs up to this size
METHODS = ("auto", "metis", "exact")


@dataclass(frozen=True, eq=False)
class Partition:
    assignment: np.ndarray  # agent index -> rank (int64)
    workers: int
    method: str

    def loads(self, topo: Topology) -> list[int]:
        return _loads(topo, self.assignment, self.workers)

    def cut_edges(self, topo: Topology) -> np.ndarray:
        e = topo.edges
        return e[self.assignment[e[:, 0]] != self.assignment[e[:, 1]]] if len(e) else e

    def rank_graph(self, topo: Topology):
        import networkx as nx

        g = nx.Graph()
        g.add_nodes_from(range(self.workers))
        g.add_edges_from(rank_edges(topo, self.assignment).tolist())
        return g

    def imbalance(self, topo: Topology) -> float:
        loads = self.loads(topo)
        return max(loads) / (sum(loads) / self.workers)

    def objective(self, topo: Topology) -> tuple[int, int]:
        """(halo volume in state entries per exchange, neighbour-rank pairs)."""
        return objective(topo, self.assignment)


def objective(topo: Topology, owner: np.ndarray) -> tuple[int, int]:
    t = cut_pairs(topo, owner)
    if not len(t):
        return 0, 0
    pairs = np.unique(np.minimum(t[:, 0], t[:, 1]) * (owner.max() + 1) + np.maximum(t[:, 0], t[:, 1]))
    return int(topo.dims[t[:, 2]].sum()), len(pairs)


def cut_pairs(topo: Topology, owner: np.ndarray) -> np.ndarray:
    """``(sender rank, receiver rank, agent)`` rows, unique and sorted: agent (owned by the sender)
    is read by the receiver because it has a neighbour there."""
    e = topo.edges
    if not len(e):
        return np.zeros((0, 3), np.int64)
    ri, rk = owner[e[:, 0]], owner[e[:, 1]]
    cut = ri != rk
    a, b = e[cut, 0], e[cut, 1]
    trip = np.concatenate([np.stack([owner[a], owner[b], a], 1), np.stack([owner[b], owner[a], b], 1)])
    return np.unique(trip, axis=0)


def rank_edges(topo: Topology, owner: np.ndarray) -> np.ndarray:
    """``(r, s)`` pairs of neighbour ranks, ``r < s``, unique."""
    t = cut_pairs(topo, owner)
    if not len(t):
        return np.zeros((0, 2), np.int64)
    pairs = np.unique(t[:, :2], axis=0)
    return pairs[pairs[:, 0] < pairs[:, 1]]


def too_few_agents(topo: Topology, partitions: int, what: str) -> str | None:
    """Why ``partitions`` agent partitions (``what``: how the user asked for them) do not fit the
    topology, or None."""
    if partitions > topo.n_agents:
        return f"{what} but {topo.source} has only {topo.n_agents} agents; expected at most one partition per agent"
    return None


def check_workers(topo: Topology, workers: int, key: str = "run.workers") -> None:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise TopologyError(f"{key}: expected a positive integer, got {workers!r}")
    why = too_few_agents(topo, workers, f"{workers} workers")
    if why is not None:
        raise TopologyError(f"{key}: {why}")
    for i, w in topo.pinned:
        if w >= workers:
            raise TopologyError(f"{topo.source}: key 'agents[{i}].worker': agent {topo.ids[i]!r} is pinned to "
                                f"worker {w}, expected a worker in [0, {workers})")
    # no worker may be empty: the workers no pin names need an unpinned agent each
    unpinned, unnamed = topo.n_agents - len(topo.pinned), workers - len({w for _, w in topo.pinned})
    if unnamed > unpinned:
        raise TopologyError(f"{topo.source}: key 'agents': {unnamed} of the {workers} workers have no pinned agent "
                            f"but only {unpinned} agents are unpinned; expected an agent on every worker (pin fewer "
                            "agents to one worker, or use fewer workers)")


def load_bound(topo: Topology, workers: int) -> float:
    return BALANCE * float(topo.dims.sum()) / workers


def partition(topo: Topology, workers: int, method: str = "auto") -> Partition:
    """Assign agents to ``workers`` ranks. ``method``: auto (the best candidate, see the module
    docstring), metis (plain METIS, edge cut), exact."""
    check_workers(topo, workers)
    if method not in METHODS:
        raise ValueError(f"method: expected one of {list(METHODS)}, got {method!r}")
    if workers == 1:
        return Partition(np.zeros(topo.n_agents, np.int64), 1, "single")
    if workers == topo.n_agents:
        return Partition(_one_per_worker(topo), workers, "one-per-worker")
    if method == "metis":
        return Partition(repair(topo, metis_parts(topo, workers), workers), workers, "metis")
    candidates = {"metis": metis_parts(topo, workers)}
    for seed in range(_seeds(topo.n_agents)):
        candidates[f"metis-vol{seed}"] = metis_parts(topo, workers, volume=True, seed=seed)
    best = None
    for name, parts in candidates.items():
        parts = repair(topo, parts, workers)
        if topo.n_agents <= REFINE_AGENTS:
            parts = refine(topo, parts, workers)
        key = _score(topo, parts, workers)
        if best is None or key < best[0]:
            best = (key, parts, name)
    if method == "exact" or topo.n_agents <= EXACT_AGENTS:
        # the load bound, or the heuristics' best maximum load where integrality forbids the bound
        bound = max(load_bound(topo, workers), float(max(_loads(topo, best[1], workers))))
        found = exact_parts(topo, workers, bound, best[1])
        if found is not None and _score(topo, found, workers) < best[0]:
            best = (_score(topo, found, workers), found, "exact")
    return Partition(np.asarray(best[1], np.int64), workers, best[2])


def _loads(topo, parts, workers) -> list[int]:
    return np.bincount(np.asarray(parts), weights=topo.dims, minlength=workers).astype(np.int64).tolist()


def _score(topo, parts, workers) -> tuple:
    """Lexicographic: within the load bound first, then volume, neighbour pairs, max load."""
    parts = np.asarray(parts, np.int64)
    loads = _loads(topo, parts, workers)
    over = max(0.0, max(loads) - load_bound(topo, workers))
    vol, pairs = objective(topo, parts)
    return (over, vol, pairs, max(loads))


def _seeds(n: int) -> int:
    """METIS runs per partition: several on small graphs, one on huge ones (time)."""
    return 8 if n <= 20_000 else 3 if n <= 200_000 else 1


def _one_per_worker(topo: Topology) -> np.ndarray:
    pins = dict(topo.pinned)  # (distinct workers: check_workers)
    free = iter(sorted(set(range(topo.n_agents)) - set(pins.values())))
    return np.array([pins[i] if i in pins else next(free) for i in range(topo.n_agents)], np.int64)


def _edge_weights(topo: Topology) -> np.ndarray:
    ip, ix = topo.csr
    rows = np.repeat(np.arange(topo.n_agents), np.diff(ip))
    return topo.dims[rows] + topo.dims[ix]  # both directions of the halo travel over a cut edge


def metis_parts(topo: Topology, workers: int, volume: bool = False, seed: int = 0) -> np.ndarray:
    """METIS: plain k-way edge cut (vertex weight n_i, edge weight n_i + n_k), or k-way
    communication volume (``volume=True``)."""
    import pymetis

    ip, ix = topo.csr
    opts = pymetis.Options(seed=seed, ufactor=30)
    kw = {}
    if volume:
        opts.objtype = int(pymetis.ObjType.VOL)
        kw["recursive"] = False
    else:
        kw["eweights"] = _edge_weights(topo).astype(np.int64)
    _, parts = pymetis.part_graph(workers, pymetis.CSRAdjacency(ip.astype(np.int64), ix.astype(np.int64)),
                                  vweights=topo.dims.astype(np.int64), options=opts, **kw)
    return np.asarray(parts, np.int64)


# ---- repair and refinement -----------------------------------------------------------------
def _fullest_with_unpinned(state: "_MoveState", movable: np.ndarray, workers: int) -> int:
    """The worker an empty worker takes from: the fullest that has an agent free to move."""
    spare = np.bincount(state.parts[movable], minlength=workers) > 0
    return int(np.argmax(np.where(spare, state.count, 0)))


def repair(topo: Topology, parts: np.ndarray, workers: int) -> np.ndarray:
    """Apply pins (relabelling parts to agree with as many as possible), fill empty workers and
    rebalance with boundary moves that cost the least volume."""
    parts = np.asarray(parts, np.int64).copy()
    pins = dict(topo.pinned)
    if pins:
        overlap: dict[tuple[int, int], int] = {}
        for i, w in pins.items():
            overlap[(int(parts[i]), w)] = overlap.get((int(parts[i]), w), 0) + int(topo.dims[i])
        relabel, used = {}, set()
        for (p, w), _ in sorted(overlap.items(), key=lambda kv: -kv[1]):
            if p not in relabel and w not in used:
                relabel[p] = w
                used.add(w)
        free = iter(sorted(set(range(workers)) - used))
        parts = np.array([relabel[p] if p in relabel else next(free) for p in range(workers)], np.int64)[parts]
        for i, w in pins.items():
            parts[i] = w
    movable = np.ones(topo.n_agents, bool)
    movable[list(pins)] = False
    state = _MoveState(topo, parts, workers)
    bound = load_bound(topo, workers)
    for _ in range(4 * topo.n_agents):
        empty = [r for r in range(workers) if state.count[r] == 0]
        heavy = int(np.argmax(state.loads))
        if not empty and state.loads[heavy] <= bound:
            break
        src = heavy if not empty else _fullest_with_unpinned(state, movable, workers)
        if state.count[src] <= 1:
            break
        move = state.best_move_from(src, empty or [r for r in range(workers) if r != src], movable,
                                    must_lower=not empty)
        if move is None:
            break
        state.move(*move)
    if (state.count == 0).any():
        raise TopologyError(f"{topo.source}: cannot give each of {workers} workers an agent under the pins")
    return state.parts


def refine(topo: Topology, parts: np.ndarray, workers: int, passes: int = 4) -> np.ndarray:
    """Greedy single-agent moves of boundary agents that lower (volume, neighbour pairs) while
    keeping the load bound and no worker empty."""
    pins = {i for i, _ in topo.pinned}
    state = _MoveState(topo, parts, workers)
    bound = max(load_bound(topo, workers), float(state.loads.max()))
    for _ in range(passes):
        improved = False
        for a in state.boundary():
            if a in pins or state.count[state.parts[a]] <= 1:
                continue
            best = None
            for s in state.neighbour_ranks(a):
                if state.loads[s] + topo.dims[a] > bound:
                    continue
                gain = state.gain(a, s)
                if gain > (0, 0) and (best is None or gain > best[0]):
                    best = (gain, s)
            if best is not None:
                state.move(a, best[1])
                improved = True
        if not improved:
            break
    return state.parts


class _MoveState:
    """Bookkeeping for single-agent moves: neighbour counts per rank for every agent, loads,
    and the exact change of the objective a move causes."""

    def __init__(self, topo: Topology, parts: np.ndarray, workers: int):
        self.topo, self.parts, self.workers = topo, np.asarray(parts, np.int64).copy(), workers
        self.ip, self.ix = topo.csr
        self.loads = np.bincount(self.parts, weights=topo.dims, minlength=workers).astype(np.int64)
        self.count = np.bincount(self.parts, minlength=workers)
        self.pair_edges: dict[tuple[int, int], int] = {}  # rank pair -> cut edges between them
        e = topo.edges
        ra, rb = self.parts[e[:, 0]], self.parts[e[:, 1]]
        cut = ra != rb
        if cut.any():
            lo, hi = np.minimum(ra[cut], rb[cut]), np.maximum(ra[cut], rb[cut])
            keys, counts = np.unique(np.stack([lo, hi], 1), axis=0, return_counts=True)
            self.pair_edges = {(x, y): c for (x, y), c in zip(keys.tolist(), counts.tolist())}

    def nbrs(self, a: int) -> np.ndarray:
        return self.ix[self.ip[a]:self.ip[a + 1]]

    def rank_counts(self, a: int) -> dict[int, int]:
        r = self.parts[self.nbrs(a)]
        u, c = np.unique(r, return_counts=True)
        return dict(zip(u.tolist(), c.tolist()))

    def neighbour_ranks(self, a: int) -> list[int]:
        own = self.parts[a]
        return [r for r in self.rank_counts(a) if r != own]

    def boundary(self) -> list[int]:
        e = self.topo.edges
        if not len(e):
            return []
        cut = self.parts[e[:, 0]] != self.parts[e[:, 1]]
        return np.unique(e[cut]).tolist()

    def _agent_volume(self, a: int, own: int, counts: dict[int, int]) -> int:
        return int(self.topo.dims[a]) * sum(1 for r, c in counts.items() if r != own and c > 0)

    def gain(self, a: int, s: int) -> tuple[int, int]:
        """(volume saved, neighbour pairs saved) by moving agent ``a`` to rank ``s``."""
        r = int(self.parts[a])
        ca = self.rank_counts(a)
        dv = self._agent_volume(a, r, ca) - self._agent_volume(a, s, ca)
        for b in self.nbrs(a).tolist():
            cb = self.rank_counts(b)
            before = self._agent_volume(b, int(self.parts[b]), cb)
            cb[r] = cb.get(r, 0) - 1
            cb[s] = cb.get(s, 0) + 1
            dv += before - self._agent_volume(b, int(self.parts[b]), cb)
        pe = self._shift_pairs(dict(self.pair_edges), a, r, s)
        pairs_before = sum(1 for c in self.pair_edges.values() if c > 0)
        pairs_after = sum(1 for c in pe.values() if c > 0)
        return (dv, pairs_before - pairs_after)

    def _shift_pairs(self, pe: dict, a: int, r: int, s: int) -> dict:
        """``pe`` (rank pair -> cut edges) after agent ``a`` moves from rank ``r`` to ``s``."""
        for b in self.nbrs(a).tolist():
            t = int(self.parts[b])
            for x, d in ((r, -1), (s, +1)):
                if t != x:
                    k = (min(t, x), max(t, x))
                    pe[k] = pe.get(k, 0) + d
        return pe

    def move(self, a: int, s: int) -> None:
        r = int(self.parts[a])
        self._shift_pairs(self.pair_edges, a, r, s)
        self.parts[a] = s
        n = int(self.topo.dims[a])
        self.loads[r] -= n
        self.loads[s] += n
        self.count[r] -= 1
        self.count[s] += 1

    def best_move_from(self, src: int, dsts: list[int], movable: np.ndarray, must_lower: bool):
        """The move out of ``src`` that costs the least objective (boundary agents first)."""
        agents = np.flatnonzero((self.parts == src) & movable)
        if not len(agents):
            return None
        bnd = set(self.boundary())
        cand = [a for a in agents.tolist() if a in bnd] or agents.tolist()[:1]
        best = None
        for a in cand[:2000]:
            for dst in dsts:
                if must_lower and self.loads[dst] + self.topo.dims[a] >= self.loads[src]:
                    continue  # would not lower the maximum
                g = self.gain(a, dst)
                key = (-g[0], -g[1], int(self.loads[dst]), a)
                if best is None or key < best[0]:
                    best = (key, a, dst)
        return None if best is None else (best[1], best[2])


# ---- exact search on small graphs ----------------------------------------------------------
def exact_parts(topo: Topology, workers: int, bound: float, incumbent: np.ndarray | None = None,
                budget: int = EXACT_NODES) -> np.ndarray | None:
    """Minimum (volume, neighbour pairs) over all assignments with every load <= ``bound`` and no
    worker empty, by depth-first branch and bound (agents in BFS order, rank labels introduced
    in order unless pins fix them). Returns the best found (the optimum unless ``budget``
    search nodes ran out), or None if nothing beats ``incumbent``."""
    n = topo.n_agents
    dims = topo.dims.tolist()
    pins = dict(topo.pinned)
    order = _bfs_agents(topo)
    pos = {a: k for k, a in enumerate(order)}
    nbrs = [[b for b in topo.neighbors(a) if b != a] for a in range(n)]
    earlier = [[b for b in nbrs[a] if pos[b] < pos[a]] for a in order]
    best = [objective(topo, incumbent) if incumbent is not None else (1 << 60, 1 << 60), None]
    if incumbent is not None and max(_loads(topo, incumbent, workers)) > bound:
        best[0] = (1 << 60, 1 << 60)
    parts = [-1] * n
    foreign = [0] * n  # bitmask of foreign ranks among assigned neighbours
    loads = [0] * workers
    count = [0] * workers
    pair_cnt: dict[tuple[int, int], int] = {}
    nodes = [0]

    def rec(k: int, vol: int, used: int) -> None:
        nodes[0] += 1
        if nodes[0] > budget:
            return
        if k == n:
            if min(count) == 0:
                return
            pairs = sum(1 for c in pair_cnt.values() if c > 0)
            if (vol, pairs) < tuple(best[0]):
                best[0], best[1] = (vol, pairs), list(parts)
            return
        empty = sum(1 for c in count if c == 0)
        if n - k < empty:
            return
        a = order[k]
        choices = [pins[a]] if a in pins else range(min(workers, used + 1) if not pins else workers)
        for r in choices:
            if loads[r] + dims[a] > bound:
                continue
            dv, changed = 0, []
            for b in earlier[k]:
                s = parts[b]
                if s != r:
                    if not foreign[b] >> r & 1:
                        dv += dims[b]
                        changed.append((b, r))
                    if not foreign[a] >> s & 1:
                        dv += dims[a]
                        foreign[a] |= 1 << s
                        changed.append((a, s))
            if vol + dv > best[0][0]:
                for x, bit in changed:
                    foreign[x] &= ~(1 << bit)
                continue
            for b, bit in changed:
                if b != a:
                    foreign[b] |= 1 << bit
            parts[a] = r
            loads[r] += dims[a]
            count[r] += 1
            keys = [(min(parts[b], r), max(parts[b], r)) for b in earlier[k] if parts[b] != r]
            for key in keys:
                pair_cnt[key] = pair_cnt.get(key, 0) + 1
            rec(k + 1, vol + dv, max(used, r + 1))
            for key in keys:
                pair_cnt[key] -= 1
            parts[a] = -1
            loads[r] -= dims[a]
            count[r] -= 1
            for x, bit in changed:
                foreign[x] &= ~(1 << bit)

    rec(0, 0, 0)
    return None if best[1] is None else np.asarray(best[1], np.int64)


def _bfs_agents(topo: Topology) -> list[int]:
    """Agents in BFS order from the highest-degree agent (tight bounds early), then the rest."""
    import networkx as nx

    if not topo.n_agents:
        return []
    start = int(np.argmax(topo.degree))
    order = [start] + [b for _, b in nx.bfs_edges(topo.graph, start, sort_neighbors=sorted)]
    seen = set(order)
    return order + [a for a in range(topo.n_agents) if a not in seen]
