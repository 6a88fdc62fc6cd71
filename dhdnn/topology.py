"""Topologies of agents (DESIGN §2): the YAML format, generators, validation and masks.

A topology is an undirected connected graph of agents. Agent ``i`` owns ``p^[i]`` and
``q^[i]`` of ``n_i`` entries each; the global state is ordered
``(p^[1], ..., p^[M], q^[1], ..., q^[M])`` in the topology's agent order. The YAML
format (see the README) names agents and edges, or a generator; which input features
enter which agent; readout agents; optional pinned workers.

Every error names the file, the key and what was expected; loading either returns a
whole :class:`Topology` or raises.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import torch

from .models.network import Embedding, InputPlacement


class TopologyError(ValueError):
    """Bad topology input; the message names the source, the key and what was expected."""


@dataclass(frozen=True)
class InputFeed:
    feature: int
    agent: int  # agent index (canonical order)
    part: str  # "p" or "q"
    index: int  # entry within the agent's p or q slice


@dataclass(frozen=True)
class AgentEmbedding:
    agent: int
    features: tuple[int, ...]


@dataclass(frozen=True)
class Topology:
    name: str
    ids: tuple[Any, ...]  # agent ids in canonical order
    dims: tuple[int, ...]  # n_i per agent
    edges: tuple[tuple[int, int], ...]  # (i, k) agent indices, i < k, sorted
    inputs: tuple[InputFeed, ...] = ()
    embeddings: tuple[AgentEmbedding, ...] = ()
    readout: tuple[int, ...] = ()  # agent indices
    pinned: tuple[tuple[int, int], ...] = ()  # (agent index, worker)
    description: str = ""
    source: str = "<topology>"
    graph: nx.Graph = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        g = nx.Graph()
        g.add_nodes_from(range(len(self.ids)))
        g.add_edges_from(self.edges)
        object.__setattr__(self, "graph", g)

    # ---- sizes and offsets --------------------------------------------------------------
    @property
    def n_agents(self) -> int:
        return len(self.ids)

    @property
    def half_dim(self) -> int:
        return sum(self.dims)

    @property
    def state_dim(self) -> int:
        return 2 * self.half_dim

    def offsets(self) -> list[int]:
        """Start of each agent's slice within ``p`` (and within ``q``)."""
        out, acc = [], 0
        for d in self.dims:
            out.append(acc)
            acc += d
        return out

    def neighbors(self, i: int) -> list[int]:
        """``{i} ∪ N(i)`` in canonical order: the columns of agent ``i``'s row blocks."""
        return sorted({i, *self.graph.neighbors(i)})

    def is_complete(self) -> bool:
        m = self.n_agents
        return len(self.edges) == m * (m - 1) // 2

    def agent_index(self, agent_id) -> int:
        return self.ids.index(agent_id)

    # ---- masks and placement ----------------------------------------------------------
    def block_mask(self) -> torch.Tensor:
        """(m, m) boolean: entry block (i, k) is True iff ``k == i`` or ``{i, k}`` is an edge."""
        adj = torch.eye(self.n_agents, dtype=torch.bool)
        for i, k in self.edges:
            adj[i, k] = adj[k, i] = True
        d = torch.tensor(self.dims)
        return adj.repeat_interleave(d, 0).repeat_interleave(d, 1)

    def input_feeds(self, n_features: int) -> tuple[InputFeed, ...]:
        """The direct feeds for data with ``n_features`` features (validated). Without ``inputs``
        or ``embeddings`` feature ``f`` enters the first ``p`` entry of the ``f``-th agent."""
        feeds = self.inputs
        if not feeds and not self.embeddings:
            if n_features > self.n_agents:
                raise TopologyError(f"{self.source}: key 'inputs': the data has {n_features} features but "
                                    f"only {self.n_agents} agents; list the inputs or use embeddings")
            feeds = tuple(InputFeed(f, f, "p", 0) for f in range(n_features))
        for k, f in enumerate(feeds):
            if not 0 <= f.feature < n_features:
                raise TopologyError(f"{self.source}: key 'inputs[{k}].feature': expected an index in "
                                    f"[0, {n_features}) for this dataset, got {f.feature}")
        for k, e in enumerate(self.embeddings):
            bad = [f for f in e.features if not 0 <= f < n_features]
            if bad:
                raise TopologyError(f"{self.source}: key 'embeddings[{k}].features': expected indices in "
                                    f"[0, {n_features}) for this dataset, got {bad[:3]}")
        return feeds

    def placement(self, n_features: int) -> InputPlacement:
        """Where the data's features enter the global state (validated against ``n_features``)."""
        off, m = self.offsets(), self.half_dim
        feeds = self.input_feeds(n_features)
        index = tuple(off[f.agent] + f.index + (m if f.part == "q" else 0) for f in feeds)
        embeds = tuple(Embedding(e.features, tuple(range(off[e.agent], off[e.agent] + self.dims[e.agent]))
                                 + tuple(range(m + off[e.agent], m + off[e.agent] + self.dims[e.agent])))
                       for e in self.embeddings)
        return InputPlacement(index, tuple(f.feature for f in feeds), embeds)

    def readout_state_indices(self) -> tuple[int, ...]:
        """Global state indices read by the readout, agent by agent: ``p^[i]`` then ``q^[i]``."""
        off, m = self.offsets(), self.half_dim
        out = []
        for i in self.readout:
            out += list(range(off[i], off[i] + self.dims[i]))
            out += list(range(m + off[i], m + off[i] + self.dims[i]))
        return tuple(out)

    def summary(self) -> dict:
        degs = [d for _, d in self.graph.degree()]
        return {"name": self.name, "agents": self.n_agents, "edges": len(self.edges),
                "state_dim": self.state_dim, "dims": sorted(set(self.dims)),
                "degree_min": min(degs), "degree_max": max(degs), "diameter": nx.diameter(self.graph),
                "inputs": len(self.inputs), "embeddings": len(self.embeddings), "readout_agents": len(self.readout),
                "pinned": len(self.pinned), "description": self.description}


# ---- masks for the dense model -------------------------------------------------------------
def dense_masks(topo: Topology, arch: str, J: str = "J1") -> dict[str, torch.Tensor] | torch.Tensor:
    """Masks giving the dense masked network of ``topo`` for ``build_model`` (DESIGN §2).

    ``(m, m)``-shaped weights take the agent block mask; ``(n, n)``-shaped ones (H1, MS2,
    ResNet, MLP) couple ``p^[i], q^[i]`` with ``p^[k], q^[k]`` of neighbours only.
    """
    A = topo.block_mask()
    full = A.repeat(2, 2)
    if arch == "H2":
        return {"K_p": A, "K_q": A}
    if arch in ("MS1",):
        return A
    if arch == "MS3":
        return {"K1": A, "K2": A}
    return full


def check_distributable(topo: Topology, arch: str, J: str = "J1") -> None:
    """Refuse what the neighbour-only engine cannot run locally (DESIGN §2), with the reason."""
    if arch not in ("H1", "H2"):
        raise TopologyError(f"model.arch: {arch} has no agent-local structure; the distributed engine runs "
                            "H1 (with J1) and H2 only")
    if arch == "H1" and J != "J1":
        raise TopologyError(f"model.J: {J} couples every agent with every other (centralised only); "
                            "use J1 for distributed runs")


# ---- generators ----------------------------------------------------------------------------
def _gen_graph(kind: str, spec: dict, src: str) -> nx.Graph:
    def need(key, cond=lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, what="a positive integer"):
        if key not in spec:
            raise TopologyError(f"{src}: key 'generator.{key}': missing; {kind} needs {what}")
        v = spec[key]
        if not cond(v):
            raise TopologyError(f"{src}: key 'generator.{key}': expected {what}, got {v!r}")
        return v

    prob = lambda v: isinstance(v, (int, float)) and 0 <= v <= 1  # noqa: E731
    seed = spec.get("seed", 0)
    if kind in ("ring", "line", "star", "complete"):
        n = need("agents")
        g = {"ring": nx.cycle_graph, "line": nx.path_graph, "complete": nx.complete_graph,
             "star": lambda k: nx.star_graph(k - 1)}[kind](n)
        return g
    if kind in ("grid", "torus"):
        r, c = need("rows"), need("cols")
        g = nx.grid_2d_graph(r, c, periodic=(kind == "torus"))
        return nx.relabel_nodes(g, {(a, b): a * c + b for a, b in g.nodes})
    if kind == "erdos_renyi":
        return nx.gnp_random_graph(need("agents"), need("p", prob, "a probability in [0, 1]"), seed=seed)
    if kind == "random_geometric":
        return nx.random_geometric_graph(need("agents"), need("radius", lambda v: isinstance(v, (int, float)) and v > 0,
                                                              "a positive radius"), seed=seed)
    if kind == "watts_strogatz":
        return nx.watts_strogatz_graph(need("agents"), need("k"), need("p", prob, "a probability in [0, 1]"), seed=seed)
    raise TopologyError(f"{src}: key 'generator.kind': expected one of {GENERATOR_KINDS}, got {kind!r}")


GENERATOR_KINDS = ["ring", "line", "grid", "torus", "star", "complete", "erdos_renyi", "random_geometric",
                   "watts_strogatz"]
TOP_KEYS = {"name", "description", "defaults", "agents", "edges", "generator", "inputs", "embeddings", "readout"}


# ---- parsing -------------------------------------------------------------------------------
class _Parser:
    def __init__(self, raw: Any, source: str):
        self.raw, self.src = raw, source

    def err(self, key: str, msg: str) -> TopologyError:
        return TopologyError(f"{self.src}: key '{key}': {msg}")

    def posint(self, key, v):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise self.err(key, f"expected a positive integer, got {v!r}")
        return v

    def parse(self) -> Topology:
        raw = self.raw
        if not isinstance(raw, dict):
            raise TopologyError(f"{self.src}: expected a mapping with keys {sorted(TOP_KEYS)}, "
                                f"got {type(raw).__name__}")
        for k in raw:
            if k not in TOP_KEYS:
                raise self.err(k, f"unknown key; expected one of {sorted(TOP_KEYS)}")
        defaults = raw.get("defaults") or {}
        if not isinstance(defaults, dict) or set(defaults) - {"dim"}:
            raise self.err("defaults", "expected a mapping with key 'dim'")
        default_dim = self.posint("defaults.dim", defaults.get("dim", 1))
        ids, dims, pins, edges = self._agents_and_edges(raw, default_dim)
        index = {a: i for i, a in enumerate(ids)}
        topo_edges = self._edges(edges, index)
        inputs = self._inputs(raw.get("inputs") or [], index, dims)
        embeds = self._embeddings(raw.get("embeddings") or [], index)
        readout = self._readout(raw.get("readout"), index)
        name = raw.get("name", Path(self.src).stem)
        topo = Topology(str(name), tuple(ids), tuple(dims), topo_edges, inputs, embeds, readout,
                        tuple(sorted(pins.items())), str(raw.get("description", "")), self.src)
        if topo.n_agents > 1 and not nx.is_connected(topo.graph):
            comps = sorted(nx.connected_components(topo.graph), key=len)
            lonely = [ids[i] for i in sorted(comps[0])][:5]
            raise self.err("edges", f"expected a connected graph; {len(comps)} components, e.g. agents {lonely} "
                                    "are cut off from the rest")
        return topo

    def _agents_and_edges(self, raw, default_dim):
        gen = raw.get("generator")
        agents_raw = raw.get("agents")
        if gen is not None:
            if not isinstance(gen, dict) or "kind" not in gen:
                raise self.err("generator", f"expected a mapping with 'kind' (one of {GENERATOR_KINDS})")
            g = _gen_graph(gen["kind"], {k: v for k, v in gen.items() if k != "kind"}, self.src)
            ids = sorted(g.nodes)
            edges = [list(e) for e in g.edges] + list(raw.get("edges") or [])
            dims, pins = [default_dim] * len(ids), {}
            index = {a: i for i, a in enumerate(ids)}
            for k, a in enumerate(agents_raw or []):  # overrides of generated agents
                key = f"agents[{k}]"
                if not isinstance(a, dict) or "id" not in a:
                    raise self.err(key, "expected a mapping {id, dim, worker} overriding a generated agent")
                if a["id"] not in index:
                    raise self.err(f"{key}.id", f"unknown agent {a['id']!r}; the generator made ids 0..{len(ids) - 1}")
                self._agent_fields(a, key, index[a["id"]], dims, pins)
            return ids, dims, pins, edges
        if not isinstance(agents_raw, list) or not agents_raw:
            raise self.err("agents", "expected a non-empty list of agent ids or {id, dim, worker} mappings "
                                     "(or a 'generator')")
        ids, dims, pins = [], [], {}
        for k, a in enumerate(agents_raw):
            key = f"agents[{k}]"
            aid = a.get("id") if isinstance(a, dict) else a
            if isinstance(a, dict) and "id" not in a:
                raise self.err(key, "expected a mapping with an 'id'")
            if not isinstance(aid, (int, str)) or isinstance(aid, bool):
                raise self.err(key, f"expected an agent id (integer or string), got {aid!r}")
            if aid in ids:
                raise self.err(key, f"duplicate agent id {aid!r}")
            ids.append(aid)
            dims.append(default_dim)
            if isinstance(a, dict):
                self._agent_fields(a, key, len(ids) - 1, dims, pins)
        return ids, dims, pins, list(raw.get("edges") or [])

    def _agent_fields(self, a, key, i, dims, pins):
        extra = set(a) - {"id", "dim", "worker"}
        if extra:
            raise self.err(f"{key}.{sorted(extra)[0]}", "unknown key; expected id, dim, worker")
        if "dim" in a:
            dims[i] = self.posint(f"{key}.dim", a["dim"])
        if "worker" in a:
            w = a["worker"]
            if isinstance(w, bool) or not isinstance(w, int) or w < 0:
                raise self.err(f"{key}.worker", f"expected a worker index >= 0, got {w!r}")
            pins[i] = w

    def _edges(self, edges, index) -> tuple[tuple[int, int], ...]:
        if not isinstance(edges, list):
            raise self.err("edges", "expected a list of [agent, agent] pairs")
        out = set()
        for k, e in enumerate(edges):
            key = f"edges[{k}]"
            if not isinstance(e, (list, tuple)) or len(e) != 2:
                raise self.err(key, f"expected a pair [agent, agent], got {e!r}")
            for a in e:
                if a not in index:
                    raise self.err(key, f"unknown agent {a!r}; expected one of the ids in 'agents'")
            i, j = index[e[0]], index[e[1]]
            if i == j:
                raise self.err(key, f"self-loop on agent {e[0]!r}; self-coupling is implicit, list only edges "
                                    "between distinct agents")
            out.add((min(i, j), max(i, j)))
        return tuple(sorted(out))

    def _inputs(self, raw, index, dims) -> tuple[InputFeed, ...]:
        if not isinstance(raw, list):
            raise self.err("inputs", "expected a list of {feature, agent, part, index} mappings")
        feeds, seen = [], {}
        for k, f in enumerate(raw):
            key = f"inputs[{k}]"
            if not isinstance(f, dict) or not {"feature", "agent"} <= set(f):
                raise self.err(key, "expected a mapping with 'feature' and 'agent' (and optional 'part', 'index')")
            extra = set(f) - {"feature", "agent", "part", "index"}
            if extra:
                raise self.err(f"{key}.{sorted(extra)[0]}", "unknown key; expected feature, agent, part, index")
            feat = f["feature"]
            if isinstance(feat, bool) or not isinstance(feat, int) or feat < 0:
                raise self.err(f"{key}.feature", f"expected a feature index >= 0, got {feat!r}")
            if feat in seen:
                raise self.err(f"{key}.feature", f"feature {feat} is already fed by inputs[{seen[feat]}]; "
                                                 "expected each feature at most once")
            seen[feat] = k
            if f["agent"] not in index:
                raise self.err(f"{key}.agent", f"unknown agent {f['agent']!r}; expected one of the ids in 'agents'")
            i = index[f["agent"]]
            part = f.get("part", "p")
            if part not in ("p", "q"):
                raise self.err(f"{key}.part", f"expected 'p' or 'q', got {part!r}")
            idx = f.get("index", 0)
            if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < dims[i]:
                raise self.err(f"{key}.index", f"expected an entry in [0, {dims[i]}) of agent {f['agent']!r}'s "
                                               f"{part}, got {idx!r}")
            feeds.append(InputFeed(feat, i, part, idx))
        slots = [(f.agent, f.part, f.index) for f in feeds]
        if len(set(slots)) != len(slots):
            raise self.err("inputs", "two features enter the same state entry")
        return tuple(feeds)

    def _embeddings(self, raw, index) -> tuple[AgentEmbedding, ...]:
        if not isinstance(raw, list):
            raise self.err("embeddings", "expected a list of {agent, features} mappings")
        out, used = [], set()
        for k, e in enumerate(raw):
            key = f"embeddings[{k}]"
            if not isinstance(e, dict) or set(e) != {"agent", "features"}:
                raise self.err(key, "expected a mapping with exactly 'agent' and 'features'")
            if e["agent"] not in index:
                raise self.err(f"{key}.agent", f"unknown agent {e['agent']!r}; expected one of the ids in 'agents'")
            i = index[e["agent"]]
            if i in used:
                raise self.err(f"{key}.agent", f"agent {e['agent']!r} already has an embedding")
            used.add(i)
            feats = e["features"]
            if isinstance(feats, dict) and set(feats) == {"start", "stop"}:
                feats = list(range(feats["start"], feats["stop"]))
            if (not isinstance(feats, list) or not feats
                    or not all(isinstance(f, int) and not isinstance(f, bool) and f >= 0 for f in feats)):
                raise self.err(f"{key}.features", "expected a non-empty list of feature indices or {start, stop}")
            out.append(AgentEmbedding(i, tuple(feats)))
        return tuple(out)

    def _readout(self, raw, index) -> tuple[int, ...]:
        if raw is None:
            return tuple(range(len(index)))
        if not isinstance(raw, list) or not raw:
            raise self.err("readout", "expected a non-empty list of agent ids (omit it for all agents)")
        out = []
        for k, a in enumerate(raw):
            if a not in index:
                raise self.err(f"readout[{k}]", f"unknown agent {a!r}; expected one of the ids in 'agents'")
            if index[a] in out:
                raise self.err(f"readout[{k}]", f"agent {a!r} listed twice")
            out.append(index[a])
        return tuple(sorted(out))


def topology_from_dict(raw: Any, source: str = "<topology>") -> Topology:
    return _Parser(raw, source).parse()


def load_topology(spec: str | Path | dict) -> Topology:
    """A topology from a YAML file path, or from an inline mapping (as in a run config)."""
    if isinstance(spec, dict):
        return topology_from_dict(spec, "<inline topology>")
    from .config import ConfigError, read_yaml

    try:
        raw = read_yaml(spec)
    except ConfigError as e:
        raise TopologyError(str(e)) from None
    return topology_from_dict(raw, str(spec))


def topology_to_dict(topo: Topology) -> dict:
    """The explicit YAML form (agents and edges listed) of a topology."""
    agents = []
    pins = dict(topo.pinned)
    for i, a in enumerate(topo.ids):
        entry = {"id": a, "dim": topo.dims[i]}
        if i in pins:
            entry["worker"] = pins[i]
        agents.append(entry)
    out = {"name": topo.name, "description": topo.description, "agents": agents,
           "edges": [[topo.ids[i], topo.ids[k]] for i, k in topo.edges]}
    if topo.inputs:
        out["inputs"] = [{"feature": f.feature, "agent": topo.ids[f.agent], "part": f.part, "index": f.index}
                         for f in topo.inputs]
    if topo.embeddings:
        out["embeddings"] = [{"agent": topo.ids[e.agent], "features": list(e.features)} for e in topo.embeddings]
    out["readout"] = [topo.ids[i] for i in topo.readout]
    return out
