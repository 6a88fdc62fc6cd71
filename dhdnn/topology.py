"""Topologies of agents: the YAML format, generators, validation and masks.

A topology is an undirected connected graph of agents; agent ``i`` owns ``p^[i]`` and ``q^[i]``
of ``n_i`` entries each, and the state is ``(p^[1], ..., p^[M], q^[1], ..., q^[M])``. Graphs are
NumPy arrays (an edge list and its CSR adjacency: a million agents load in seconds), networkx
only on demand. Every error names the file, the key and what was expected.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .config import ConfigError, is_int, read_yaml
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


@dataclass(frozen=True, eq=False)
class Topology:
    """An agent graph. ``dims``, ``edges`` and ``readout`` are NumPy arrays; ``edges`` holds
    each undirected edge once as ``(i, k)`` with ``i < k``, sorted."""

    name: str
    ids: Sequence[Any]  # agent ids in canonical order (a range for generated topologies)
    dims: np.ndarray  # n_i per agent (int64)
    edges: np.ndarray  # (E, 2) int64
    inputs: tuple[InputFeed, ...] = ()
    embeddings: tuple[AgentEmbedding, ...] = ()
    readout: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # agent indices, sorted
    pinned: tuple[tuple[int, int], ...] = ()  # (agent index, worker)
    description: str = ""
    source: str = "<topology>"
    spec: Any = None  # the mapping it was read from (what a run directory stores)

    # ---- sizes and offsets --------------------------------------------------------------
    @property
    def n_agents(self) -> int:
        return len(self.ids)

    @cached_property
    def half_dim(self) -> int:
        return int(self.dims.sum())

    @property
    def state_dim(self) -> int:
        return 2 * self.half_dim

    @cached_property
    def offsets(self) -> np.ndarray:
        """Start of each agent's slice within ``p`` (and within ``q``)."""
        return np.concatenate([[0], np.cumsum(self.dims)[:-1]]).astype(np.int64)

    @cached_property
    def csr(self) -> tuple[np.ndarray, np.ndarray]:
        """``(indptr, indices)``: the sorted neighbours of every agent (no self-loops)."""
        n = self.n_agents
        both = np.concatenate([self.edges, self.edges[:, ::-1]]) if len(self.edges) else np.zeros((0, 2), np.int64)
        order = np.lexsort((both[:, 1], both[:, 0]))
        both = both[order]
        indptr = np.zeros(n + 1, np.int64)
        np.cumsum(np.bincount(both[:, 0], minlength=n), out=indptr[1:])
        return indptr, both[:, 1].copy()

    @cached_property
    def closed_csr(self) -> tuple[np.ndarray, np.ndarray]:
        """``(indptr, indices)`` of ``{i} ∪ N(i)`` per agent, sorted: the columns of agent ``i``'s row blocks."""
        n = self.n_agents
        ip, ix = self.csr
        rows = np.concatenate([np.repeat(np.arange(n), np.diff(ip)), np.arange(n)])
        cols = np.concatenate([ix, np.arange(n)])
        order = np.lexsort((cols, rows))
        indptr = np.zeros(n + 1, np.int64)
        np.cumsum(np.diff(ip) + 1, out=indptr[1:])
        return indptr, cols[order]

    @property
    def degree(self) -> np.ndarray:
        return np.diff(self.csr[0])

    def neighbors(self, i: int) -> list[int]:
        """``{i} ∪ N(i)`` in canonical order: the columns of agent ``i``'s row blocks."""
        ip, ix = self.closed_csr
        return ix[ip[i]:ip[i + 1]].tolist()

    @cached_property
    def graph(self):
        """A networkx view (built on demand: pictures and small-graph algorithms)."""
        import networkx as nx

        g = nx.Graph()
        g.add_nodes_from(range(self.n_agents))
        g.add_edges_from(self.edges.tolist())
        return g

    def n_inputs(self) -> int:
        """Input features the topology reads (its largest fed feature + 1)."""
        feats = [f.feature for f in self.inputs] + [f for e in self.embeddings for f in e.features]
        if not feats:
            raise TopologyError(f"{self.source}: key 'inputs': the topology lists no inputs or embeddings, so it "
                                "cannot say how many input features there are; give n_features")
        return max(feats) + 1

    # ---- other ways in --------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict, source: str = "<topology dict>") -> "Topology":
        """A topology from a mapping in the YAML format (validated as a file is)."""
        return topology_from_dict(raw, source)

    @classmethod
    def from_networkx(cls, g, dim: int = 1, inputs: Sequence | None = None, readout: Sequence | None = None,
                      embeddings: Sequence | dict | None = None, name: str | None = None,
                      description: str = "") -> "Topology":
        """A topology from a ``networkx.Graph``: its nodes are the agents (node attributes ``dim``
        and ``worker`` override the default ``dim`` and pin an agent), its edges the edges.
        ``inputs``, ``readout`` and ``embeddings`` take the YAML format's entries (mappings, agents
        named by node). Node labels other than integers and strings (a grid's ``(row, col)``
        tuples) become their ``str()``; refer to them by the original label. Validated as a
        YAML file is (the source in messages is ``<networkx NAME>``, or ``<networkx graph>`` for a
        graph without a name)."""
        import networkx as nx

        if not isinstance(g, nx.Graph) or g.is_directed():
            raise TopologyError(f"<networkx>: expected an undirected networkx.Graph, got {type(g).__name__}")
        label = lambda n: n if isinstance(n, (int, str)) and not isinstance(n, bool) else str(n)  # noqa: E731
        name = name or g.graph.get("name")
        agents = []
        for n, attrs in g.nodes(data=True):
            entry = {"id": label(n)}
            entry.update({k: attrs[k] for k in ("dim", "worker") if k in attrs})
            agents.append(entry)
        raw: dict[str, Any] = {"name": name or "networkx", "description": description, "defaults": {"dim": dim},
                               "agents": agents, "edges": [[label(a), label(b)] for a, b in g.edges()]}
        if inputs:
            raw["inputs"] = [dict(f, agent=label(f["agent"])) if isinstance(f, dict) and "agent" in f else f
                             for f in inputs]
        if readout is not None:
            raw["readout"] = [label(a) for a in readout]
        if isinstance(embeddings, dict):
            raw["embeddings"] = embeddings
        elif embeddings:
            raw["embeddings"] = [dict(e, agent=label(e["agent"])) if isinstance(e, dict) and "agent" in e else e
                                 for e in embeddings]
        return topology_from_dict(raw, f"<networkx {name}>" if name else "<networkx graph>")

    # ---- identity -------------------------------------------------------------------------
    def content(self) -> dict:
        """What defines the network besides ``dims``, ``edges`` and ``readout`` (names and
        descriptions excluded)."""
        return {"ids": _ids_json(self.ids), "inputs": [[f.feature, f.agent, f.part, f.index] for f in self.inputs],
                "embeddings": [[e.agent, list(e.features)] for e in self.embeddings],
                "pinned": [list(p) for p in self.pinned]}

    @cached_property
    def fingerprint(self) -> str:
        """A hash of the topology's content: the same network, whatever file or generator made it."""
        h = hashlib.sha256(json.dumps(self.content(), sort_keys=True, default=str).encode())
        for a in (self.dims, self.edges, self.readout):
            h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
        return h.hexdigest()[:32]

    def summary(self) -> dict:
        deg = self.degree
        return {"name": self.name, "agents": self.n_agents, "edges": len(self.edges),
                "state_dim": self.state_dim, "dims": sorted(set(self.dims.tolist())),
                "degree_min": int(deg.min()) if len(deg) else 0, "degree_max": int(deg.max()) if len(deg) else 0,
                "diameter": _diameter(self), "inputs": len(self.inputs), "embeddings": len(self.embeddings),
                "readout_agents": len(self.readout), "pinned": len(self.pinned), "description": self.description}

    # ---- masks and placement ----------------------------------------------------------
    def block_mask(self) -> torch.Tensor:
        """(m, m) boolean: entry block (i, k) is True iff ``k == i`` or ``{i, k}`` is an edge."""
        adj = torch.eye(self.n_agents, dtype=torch.bool)
        e = torch.as_tensor(self.edges)
        adj[e[:, 0], e[:, 1]] = True
        adj[e[:, 1], e[:, 0]] = True
        d = torch.as_tensor(self.dims)
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
        off, m = self.offsets, self.half_dim
        feeds = self.input_feeds(n_features)
        index = tuple(int(off[f.agent]) + f.index + (m if f.part == "q" else 0) for f in feeds)
        embeds = []
        for e in self.embeddings:
            o, n = int(off[e.agent]), int(self.dims[e.agent])
            embeds.append(Embedding(e.features, tuple(range(o, o + n)) + tuple(range(m + o, m + o + n))))
        return InputPlacement(index, tuple(f.feature for f in feeds), tuple(embeds))

    def readout_state_indices(self) -> tuple[int, ...]:
        """Global state indices read by the readout, agent by agent: ``p^[i]`` then ``q^[i]``."""
        off, m = self.offsets, self.half_dim
        out = []
        for i in self.readout.tolist():
            o, n = int(off[i]), int(self.dims[i])
            out += list(range(o, o + n)) + list(range(m + o, m + o + n))
        return tuple(out)


def _ids_json(ids) -> Any:
    return f"range({len(ids)})" if isinstance(ids, range) and ids.start == 0 and ids.step == 1 else list(ids)


def _diameter(topo: Topology) -> int | None:
    """Exact for small graphs; None above a few thousand agents (all-pairs BFS is quadratic)."""
    if topo.n_agents > 4096:
        return None
    from scipy.sparse.csgraph import shortest_path

    d = shortest_path(_sparse_adjacency(topo), unweighted=True, directed=False)
    return int(d.max())


def _sparse_adjacency(topo: Topology):
    from scipy.sparse import csr_matrix

    ip, ix = topo.csr
    return csr_matrix((np.ones(len(ix), np.int8), ix, ip), shape=(topo.n_agents, topo.n_agents))


def describe_change(old: Topology, new: Topology) -> str:
    """What differs between two topologies, in words (for refusing a resume)."""
    parts = []
    if old.n_agents != new.n_agents:
        parts.append(f"agents {old.n_agents} -> {new.n_agents}")
    else:
        if not np.array_equal(old.dims, new.dims):
            parts.append(f"dims of {int((old.dims != new.dims).sum())} agent(s) changed")
        a = {tuple(e) for e in old.edges.tolist()}
        b = {tuple(e) for e in new.edges.tolist()}
        if a != b:
            parts.append(f"{len(b - a)} edge(s) added, {len(a - b)} removed")
    for key in ("inputs", "embeddings", "pinned"):
        if getattr(old, key) != getattr(new, key):
            parts.append(f"{key} changed")
    if not np.array_equal(old.readout, new.readout):
        parts.append("readout agents changed")
    if _ids_json(old.ids) != _ids_json(new.ids) and old.n_agents == new.n_agents:
        parts.append("agent ids changed")
    return "; ".join(parts) or "content differs"


# ---- masks for the dense model -------------------------------------------------------------
def dense_masks(topo: Topology, arch) -> dict[str, torch.Tensor]:
    """Masks giving the dense masked network of ``topo`` for ``build_model``, by mask key.

    ``arch``: an architecture class (or its name). Weights shaped ``(m, m)`` take the agent block
    mask; ``(n, n)``-shaped ones couple ``p^[i], q^[i]`` with ``p^[k], q^[k]`` of neighbours only.
    """
    from .models import ARCHITECTURES

    cls = ARCHITECTURES[arch] if isinstance(arch, str) else arch
    A = topo.block_mask()
    return {key: A if cls.param_shapes[p] == ("m", "m") else A.repeat(2, 2) for p, key in cls.masked.items()}


# ---- generators ----------------------------------------------------------------------------
def _pairs(a, b) -> np.ndarray:
    return np.stack([np.asarray(a, np.int64), np.asarray(b, np.int64)], 1)


def _grid_edges(rows: int, cols: int, periodic: bool) -> np.ndarray:
    ids = np.arange(rows * cols).reshape(rows, cols)
    parts = [_pairs(ids[:, :-1].ravel(), ids[:, 1:].ravel()), _pairs(ids[:-1, :].ravel(), ids[1:, :].ravel())]
    if periodic and cols > 2:
        parts.append(_pairs(ids[:, -1], ids[:, 0]))
    if periodic and rows > 2:
        parts.append(_pairs(ids[-1, :], ids[0, :]))
    return np.concatenate(parts)


def _gen_graph(kind: str, spec: dict, src: str) -> tuple[int, np.ndarray]:
    """(number of agents, edge array) of a generated graph; ids are 0..n-1."""
    def need(key, cond=lambda v: is_int(v) and v > 0, what="a positive integer"):
        if key not in spec:
            raise TopologyError(f"{src}: key 'generator.{key}': missing; {kind} needs {what}")
        v = spec[key]
        if not cond(v):
            raise TopologyError(f"{src}: key 'generator.{key}': expected {what}, got {v!r}")
        return v

    prob = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1  # noqa: E731
    seed = spec.get("seed", 0)
    if kind in ("ring", "line", "star", "complete"):
        n = need("agents")
        a = np.arange(n)
        if kind == "line":
            return n, _pairs(a[:-1], a[1:])
        if kind == "ring":
            return n, _pairs(a[:-1], a[1:]) if n < 3 else np.concatenate([_pairs(a[:-1], a[1:]), _pairs([0], [n - 1])])
        if kind == "star":
            return n, _pairs(np.zeros(n - 1), a[1:])
        i, k = np.triu_indices(n, 1)
        return n, _pairs(i, k)
    if kind in ("grid", "torus"):
        r, c = need("rows"), need("cols")
        return r * c, _grid_edges(r, c, kind == "torus")
    import networkx as nx

    if kind == "erdos_renyi":
        g = nx.gnp_random_graph(need("agents"), need("p", prob, "a probability in [0, 1]"), seed=seed)
    elif kind == "random_geometric":
        g = nx.random_geometric_graph(need("agents"), need("radius", lambda v: isinstance(v, (int, float)) and v > 0,
                                                           "a positive radius"), seed=seed)
    elif kind == "watts_strogatz":
        g = nx.watts_strogatz_graph(need("agents"), need("k"), need("p", prob, "a probability in [0, 1]"), seed=seed)
    else:
        raise TopologyError(f"{src}: key 'generator.kind': expected one of {GENERATOR_KINDS}, got {kind!r}")
    return g.number_of_nodes(), np.array(list(g.edges), dtype=np.int64).reshape(-1, 2)


GENERATOR_KINDS = ["ring", "line", "grid", "torus", "star", "complete", "erdos_renyi", "random_geometric",
                   "watts_strogatz"]
TOP_KEYS = {"name", "description", "defaults", "agents", "edges", "generator", "inputs", "embeddings", "readout"}


# ---- parsing -------------------------------------------------------------------------------
class _Parser:
    def __init__(self, raw: Any, source: str):
        self.raw, self.src = raw, source

    def err(self, key: str, msg: str) -> TopologyError:
        return TopologyError(f"{self.src}: key '{key}': {msg}")

    def integer(self, key, v, lo: int = 1, hi: int | None = None, what: str = "a positive integer") -> int:
        """``v``, an integer in ``[lo, hi)``, named at ``key``."""
        if not (is_int(v) and lo <= v and (hi is None or v < hi)):
            raise self.err(key, f"expected {what}, got {v!r}")
        return v

    def agent(self, key: str, index: "_Index", a) -> int:
        """The index of agent id ``a``, named at ``key``."""
        if a not in index:
            raise self.err(key, f"unknown agent {a!r}; expected one of the ids in 'agents'")
        return index[a]

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
        default_dim = self.integer("defaults.dim", defaults.get("dim", 1))
        ids, dims, pins, edges = self._agents_and_edges(raw, default_dim)
        index = _Index(ids)
        inputs = self._inputs(raw.get("inputs") or [], index, dims)
        embeds = self._embeddings(raw.get("embeddings") or [], index, raw)
        readout = self._readout(raw.get("readout"), index)
        name = raw.get("name", Path(self.src).stem)
        topo = Topology(str(name), ids, dims, edges, inputs, embeds, readout, tuple(sorted(pins.items())),
                        str(raw.get("description", "")), self.src, raw)
        self._check_connected(topo)
        return topo

    def _check_connected(self, topo: Topology) -> None:
        if topo.n_agents <= 1:
            return
        from scipy.sparse.csgraph import connected_components

        n_comp, labels = connected_components(_sparse_adjacency(topo), directed=False)
        if n_comp > 1:
            sizes = np.bincount(labels)
            lonely = np.flatnonzero(labels == sizes.argmin())[:5]
            gen = self.raw.get("generator")  # a random generator's draw: the key to change is its own
            hint = "" if not gen or "edges" in self.raw else "; change its seed or raise its p/radius/k"
            raise self.err("generator" if hint else "edges",
                           f"expected a connected graph; {n_comp} components, e.g. agents "
                           f"{[topo.ids[i] for i in lonely.tolist()]} are cut off from the rest{hint}")

    def _agents_and_edges(self, raw, default_dim):
        gen = raw.get("generator")
        agents_raw = raw.get("agents")
        if gen is not None:
            if not isinstance(gen, dict) or "kind" not in gen:
                raise self.err("generator", f"expected a mapping with 'kind' (one of {GENERATOR_KINDS})")
            n, gen_edges = _gen_graph(gen["kind"], {k: v for k, v in gen.items() if k != "kind"}, self.src)
            ids = range(n)
            dims, pins = np.full(n, default_dim, np.int64), {}
            index = _Index(ids)
            for k, a in enumerate(agents_raw or []):  # overrides of generated agents
                key = f"agents[{k}]"
                if not isinstance(a, dict) or "id" not in a:
                    raise self.err(key, "expected a mapping {id, dim, worker} overriding a generated agent")
                if a["id"] not in index:
                    raise self.err(f"{key}.id", f"unknown agent {a['id']!r}; the generator made ids 0..{n - 1}")
                self._agent_fields(a, key, index[a["id"]], dims, pins)
            extra = self._edges(raw.get("edges") or [], index)
            return ids, dims, pins, _canonical_edges(np.concatenate([gen_edges.reshape(-1, 2), extra]))
        if not isinstance(agents_raw, list) or not agents_raw:
            raise self.err("agents", "expected a non-empty list of agent ids or {id, dim, worker} mappings "
                                     "(or a 'generator')")
        ids, dims, pins, seen = [], [], {}, set()
        for k, a in enumerate(agents_raw):
            key = f"agents[{k}]"
            aid = a.get("id") if isinstance(a, dict) else a
            if isinstance(a, dict) and "id" not in a:
                raise self.err(key, "expected a mapping with an 'id'")
            if not isinstance(aid, (int, str)) or isinstance(aid, bool):
                raise self.err(key, f"expected an agent id (integer or string), got {aid!r}")
            if aid in seen:
                raise self.err(key, f"duplicate agent id {aid!r}")
            seen.add(aid)
            ids.append(aid)
            dims.append(default_dim)
            if isinstance(a, dict):
                self._agent_fields(a, key, len(ids) - 1, dims, pins)
        ids = tuple(ids)
        return ids, np.array(dims, np.int64), pins, _canonical_edges(self._edges(raw.get("edges") or [], _Index(ids)))

    def _agent_fields(self, a, key, i, dims, pins):
        extra = set(a) - {"id", "dim", "worker"}
        if extra:
            raise self.err(f"{key}.{sorted(extra)[0]}", "unknown key; expected id, dim, worker")
        if "dim" in a:
            dims[i] = self.integer(f"{key}.dim", a["dim"])
        if "worker" in a:
            pins[i] = self.integer(f"{key}.worker", a["worker"], 0, what="a worker index >= 0")

    def _edges(self, edges, index) -> np.ndarray:
        if not isinstance(edges, list):
            raise self.err("edges", "expected a list of [agent, agent] pairs")
        out = []
        for k, e in enumerate(edges):
            key = f"edges[{k}]"
            if not isinstance(e, (list, tuple)) or len(e) != 2:
                raise self.err(key, f"expected a pair [agent, agent], got {e!r}")
            i, j = (self.agent(key, index, a) for a in e)
            if i == j:
                raise self.err(key, f"self-loop on agent {e[0]!r}; self-coupling is implicit, list only edges "
                                    "between distinct agents")
            out.append((i, j))
        return np.array(out, dtype=np.int64).reshape(-1, 2)

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
            feat = self.integer(f"{key}.feature", f["feature"], 0, what="a feature index >= 0")
            if feat in seen:
                raise self.err(f"{key}.feature", f"feature {feat} is already fed by inputs[{seen[feat]}]; "
                                                 "expected each feature at most once")
            seen[feat] = k
            i = self.agent(f"{key}.agent", index, f["agent"])
            part = f.get("part", "p")
            if part not in ("p", "q"):
                raise self.err(f"{key}.part", f"expected 'p' or 'q', got {part!r}")
            idx = self.integer(f"{key}.index", f.get("index", 0), 0, dims[i],
                               f"an entry in [0, {dims[i]}) of agent {f['agent']!r}'s {part}")
            feeds.append(InputFeed(feat, i, part, idx))
        slots = [(f.agent, f.part, f.index) for f in feeds]
        if len(set(slots)) != len(slots):
            raise self.err("inputs", "two features enter the same state entry")
        return tuple(feeds)

    def _embeddings(self, raw, index, top) -> tuple[AgentEmbedding, ...]:
        if isinstance(raw, dict):
            return self._patches(raw, index, top)
        if not isinstance(raw, list):
            raise self.err("embeddings", "expected a list of {agent, features} mappings or {patches: ...}")
        out, used = [], set()
        for k, e in enumerate(raw):
            key = f"embeddings[{k}]"
            if not isinstance(e, dict) or set(e) != {"agent", "features"}:
                raise self.err(key, "expected a mapping with exactly 'agent' and 'features'")
            i = self.agent(f"{key}.agent", index, e["agent"])
            if i in used:
                raise self.err(f"{key}.agent", f"agent {e['agent']!r} already has an embedding")
            used.add(i)
            feats = e["features"]
            if isinstance(feats, dict) and set(feats) == {"start", "stop"}:
                feats = list(range(feats["start"], feats["stop"]))
            if (not isinstance(feats, list) or not feats
                    or not all(is_int(f) and f >= 0 for f in feats)):
                raise self.err(f"{key}.features", "expected a non-empty list of feature indices or {start, stop}")
            out.append(AgentEmbedding(i, tuple(feats)))
        return tuple(out)

    def _patches(self, raw, index, top) -> tuple[AgentEmbedding, ...]:
        """``embeddings: {patches: {image: [H, W], patch: [h, w]}}`` on a grid generator: agent
        ``r * cols + c`` embeds the ``h x w`` pixel patch at rows ``r h..``, columns ``c w..`` of a
        row-major ``H x W`` image (feature = row * W + column)."""
        if set(raw) != {"patches"} or not isinstance(raw["patches"], dict):
            raise self.err("embeddings", "expected a list of {agent, features} or {patches: {image, patch}}")
        spec = raw["patches"]
        gen = top.get("generator") or {}
        if gen.get("kind") not in ("grid", "torus"):
            raise self.err("embeddings.patches", "expected a grid or torus generator (agents laid out in rows)")
        pair = lambda v: isinstance(v, list) and len(v) == 2 and all(is_int(t) and t > 0 for t in v)  # noqa: E731
        for key in ("image", "patch"):
            if not pair(spec.get(key)):
                raise self.err(f"embeddings.patches.{key}", f"expected [rows, cols] of positive integers, "
                                                            f"got {spec.get(key)!r}")
        (H, W), (h, w) = spec["image"], spec["patch"]
        rows, cols = gen["rows"], gen["cols"]
        if H != rows * h or W != cols * w:
            raise self.err("embeddings.patches", f"a {rows}x{cols} grid of {h}x{w} patches covers a "
                                                 f"{rows * h}x{cols * w} image, expected image {H}x{W}")
        out = []
        for r in range(rows):
            for c in range(cols):
                feats = tuple((r * h + a) * W + c * w + b for a in range(h) for b in range(w))
                out.append(AgentEmbedding(r * cols + c, feats))
        return tuple(out)

    def _readout(self, raw, index) -> np.ndarray:
        if raw is None:
            return np.arange(len(index), dtype=np.int64)
        if not isinstance(raw, list) or not raw:
            raise self.err("readout", "expected a non-empty list of agent ids (omit it for all agents)")
        out = []
        for k, a in enumerate(raw):
            i = self.agent(f"readout[{k}]", index, a)
            if i in out:
                raise self.err(f"readout[{k}]", f"agent {a!r} listed twice")
            out.append(i)
        return np.array(sorted(out), dtype=np.int64)


class _Index:
    """id -> agent index, O(1) for both explicit id lists and generated ranges."""

    def __init__(self, ids):
        self.ids = ids
        self.map = None if isinstance(ids, range) else {a: i for i, a in enumerate(ids)}

    def __len__(self):
        return len(self.ids)

    def __contains__(self, a):
        if self.map is not None:
            return a in self.map
        return is_int(a) and a in self.ids

    def __getitem__(self, a):
        return self.map[a] if self.map is not None else self.ids.index(a)


def _canonical_edges(e: np.ndarray) -> np.ndarray:
    """Each undirected edge once as ``(min, max)``, sorted, duplicates removed."""
    e = np.sort(e.reshape(-1, 2).astype(np.int64), axis=1)
    return np.unique(e, axis=0) if len(e) else e


def topology_from_dict(raw: Any, source: str = "<topology>") -> Topology:
    return _Parser(raw, source).parse()


def load_topology(spec: str | Path | dict) -> Topology:
    """A topology from a YAML file path, or from an inline mapping (as in a run config)."""
    if isinstance(spec, dict):
        return topology_from_dict(spec, "<inline topology>")
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
        entry = {"id": a, "dim": int(topo.dims[i])}
        if i in pins:
            entry["worker"] = pins[i]
        agents.append(entry)
    out = {"name": topo.name, "description": topo.description, "agents": agents,
           "edges": [[topo.ids[i], topo.ids[k]] for i, k in topo.edges.tolist()]}
    if topo.inputs:
        out["inputs"] = [{"feature": f.feature, "agent": topo.ids[f.agent], "part": f.part, "index": f.index}
                         for f in topo.inputs]
    if topo.embeddings:
        out["embeddings"] = [{"agent": topo.ids[e.agent], "features": list(e.features)} for e in topo.embeddings]
    out["readout"] = [topo.ids[i] for i in topo.readout.tolist()]
    return out
