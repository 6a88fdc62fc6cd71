"""Per-agent parameter blocks: the partition-independent form of a topology network.

Block ``(i, k)`` of a matrix holds agent ``i``'s rows and agent ``k``'s columns for every layer;
blocks of one kind and shape form a :class:`BlockClass` in canonical (row, column agent) order,
stored as one tensor (``(layers, blocks, rows, cols)``, ``(layers, blocks, width)``, or
``(blocks, ...)``), of which a rank holds a subset named by canonical indices. Checkpoints, the
sharded engine and the dense model all speak this form. Initial values come from a counter-based
generator keyed by ``(seed, parameter, row agent, column agent)``, so no draw depends on which
rank makes it: the same network on any number of workers. Vectorised with NumPy; pure maths.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .integrator import AgentLayout
from .topology import Topology

@dataclass(frozen=True, eq=False)
class BlockClass:
    """All blocks of one parameter kind with one shape, in canonical order."""

    kind: str  # "K_p", "b_q", "W", "mu", "embed.weight", "embed.bias"
    shape: tuple[int, ...]  # one block, without the layers axis
    layered: bool  # stored with a leading layers axis (matrices and biases)
    rows: np.ndarray  # owning (row) agent of every block
    cols: np.ndarray | None  # column agent of every block (matrices only)

    @property
    def key(self) -> str:
        """Checkpoint key, e.g. ``K_p/8x8``."""
        return f"{self.kind}/{'x'.join(map(str, self.shape))}" if self.shape else self.kind

    @property
    def block_axis(self) -> int:
        return 1 if self.layered else 0

    def __len__(self) -> int:
        return len(self.rows)

    def names(self) -> list[str]:
        """Human-readable block names (``agent3.K_p.5``), for tests and messages on small graphs."""
        if self.kind == "mu":
            return ["mu"]
        if self.cols is not None:
            return [f"agent{i}.{self.kind}.{k}" for i, k in zip(self.rows.tolist(), self.cols.tolist())]
        return [f"agent{i}.{self.kind}" for i in self.rows.tolist()]


class BlockTable:
    """Every block class of a topology network (one architecture, depth and class count)."""

    def __init__(self, topo: Topology, layout: AgentLayout, layers: int, n_classes: int):
        self.topo, self.layout, self.layers, self.n_classes = topo, layout, layers, n_classes
        self.width = topo.dims * layout.parts_per_agent  # entries of an agent in one field
        self.classes: list[BlockClass] = []
        ip, ix = topo.closed_csr
        rows = np.repeat(np.arange(topo.n_agents), np.diff(ip))
        agents = np.arange(topo.n_agents)
        w, n2 = self.width, 2 * topo.dims
        for matrix in layout.matrices:
            self._split(matrix, True, rows, ix, [w[rows], w[ix]])
        for bias in layout.biases:
            self._split(bias, True, agents, None, [w])
        self._split("W", False, topo.readout, None, [np.full(len(topo.readout), n_classes), n2[topo.readout]])
        self.classes.append(BlockClass("mu", (n_classes,), False, topo.readout[:1].copy(), None))
        emb = np.array([e.agent for e in topo.embeddings], dtype=np.int64)
        self.fan_in = np.zeros(topo.n_agents, np.int64)
        self.fan_in[emb] = [len(e.features) for e in topo.embeddings]
        self._split("embed.weight", False, emb, None, [n2[emb], self.fan_in[emb]])
        self._split("embed.bias", False, emb, None, [n2[emb]])

    def _split(self, kind, layered, rows, cols, shape_cols: list[np.ndarray]) -> None:
        """One class per distinct block shape (``shape_cols``: the shape of every block, by axis);
        the canonical order is kept inside each class."""
        if not len(rows):
            return
        shapes, inv = np.unique(np.stack(shape_cols, 1), axis=0, return_inverse=True)
        inv = inv.ravel()
        for u, shape in enumerate(shapes.tolist()):
            sel = inv == u
            self.classes.append(BlockClass(kind, tuple(shape), layered, rows[sel], None if cols is None else cols[sel]))

    def __iter__(self):
        return iter(self.classes)

    def by_key(self) -> dict[str, BlockClass]:
        return {c.key: c for c in self.classes}

    def full_shape(self, c: BlockClass, n_blocks: int | None = None) -> tuple[int, ...]:
        nb = len(c) if n_blocks is None else n_blocks
        return (self.layers, nb, *c.shape) if c.layered else (nb, *c.shape)


# ---- initial values ------------------------------------------------------------------------
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective scrambling of 64-bit integers."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _hashes(keys: np.ndarray, count: int) -> np.ndarray:
    """``(len(keys), count)`` 64-bit hashes: stream ``keys[b]``, draws ``0 .. count-1``."""
    with np.errstate(over="ignore"):
        c = np.arange(1, count + 1, dtype=np.uint64) * _GOLDEN
        return _mix(keys[:, None] + c[None, :])


def _unit(bits: np.ndarray) -> np.ndarray:
    """24 random bits -> a float32 uniform in (0, 1)."""
    return (bits.astype(np.float32) + np.float32(0.5)) * np.float32(2.0 ** -24)


def _uniforms(keys: np.ndarray, count: int) -> np.ndarray:
    return _unit(_hashes(keys, count) >> np.uint64(40))


def _block_keys(seed: int, kind: str, rows: np.ndarray, cols: np.ndarray | None) -> np.ndarray:
    tag = int.from_bytes(kind.encode()[:8].ljust(8, b"\0"), "little")
    with np.errstate(over="ignore"):
        k = _mix(np.full(len(rows), ((seed * 0x2545F4914F6CDD1D) ^ tag) & 0xFFFFFFFFFFFFFFFF, dtype=np.uint64))
        k = _mix(k + rows.astype(np.uint64) * _GOLDEN)
        if cols is not None:
            k = _mix(k + (cols.astype(np.uint64) + np.uint64(1)) * np.uint64(0xD1B54A32D192ED03))
    return k


def _normals(keys: np.ndarray, count: int) -> np.ndarray:
    """Box-Muller on the two 24-bit halves of one hash per draw (float32 is ample for an initialisation)."""
    x = _hashes(keys, count)
    u1 = _unit(x >> np.uint64(40))
    u2 = _unit((x >> np.uint64(16)) & np.uint64(0xFFFFFF))
    return np.sqrt(np.float32(-2.0) * np.log(u1)) * np.cos(np.float32(2.0 * math.pi) * u2)


CHUNK = 1 << 21  # random draws generated at once (bounds temporary memory)


def init_class(table: BlockTable, c: BlockClass, seed: int, init_std: float | None = None,
               select: np.ndarray | None = None, dtype=torch.float32) -> Tensor:
    """Initial values of the blocks ``select`` (canonical indices; all by default) of class ``c``,
    in stored layout. Matrices and biases ~ N(0, std^2) (std 1 by default, as the dense H-DNNs);
    embeddings as ``torch.nn.Linear`` (U(-1/sqrt(fan_in), 1/sqrt(fan_in))); readout ``W`` and
    ``mu`` start at zero."""
    idx = np.arange(len(c)) if select is None else np.asarray(select, dtype=np.int64)
    if c.kind in ("W", "mu"):
        return torch.zeros(table.full_shape(c, len(idx)), dtype=dtype)
    per_block = int(np.prod(c.shape)) * (table.layers if c.layered else 1)
    rows = c.rows[idx]
    keys = _block_keys(seed, c.kind, rows, None if c.cols is None else c.cols[idx])
    out = np.empty((len(idx), per_block), dtype=np.float32)
    step = max(1, CHUNK // max(1, per_block))
    for a in range(0, len(idx), step):
        b = slice(a, a + step)
        if c.kind.startswith("embed"):
            bound = 1.0 / np.sqrt(table.fan_in[rows[b]])[:, None]
            out[b] = (_uniforms(keys[b], per_block) * 2 - 1) * bound
        else:
            out[b] = _normals(keys[b], per_block) * (1.0 if init_std is None else init_std)
    t = torch.from_numpy(out).to(dtype).view(len(idx), *((table.layers,) if c.layered else ()), *c.shape)
    return t.transpose(0, 1).contiguous() if c.layered else t


# ---- the dense model's view of the blocks --------------------------------------------------
def dense_rows(topo: Topology, layout: AgentLayout, field: str, agents: np.ndarray) -> np.ndarray:
    """``(len(agents), width)`` indices of each agent's entries along the dense axis of a
    parameter acting on ``field``: that axis holds the field's parts one after another
    (``p`` then ``q`` for H1's ``y``; just ``p`` or ``q`` for H2), each ``m`` long. All
    ``agents`` must have the same dimension (as in one block class)."""
    n = int(topo.dims[agents[0]]) if len(agents) else 0
    base = topo.offsets[agents][:, None] + np.arange(n)[None, :]
    return np.concatenate([t * topo.half_dim + base for t in range(len(layout.parts(field)))], 1)


class DenseBinding:
    """Where a block class lives inside a dense masked :class:`~dhdnn.models.Classifier`.

    ``params`` are the dense parameters holding the class (one, or one per embedding);
    ``get(ts)`` reads the blocks out of tensors shaped like them (the parameters, their
    gradients or optimiser moments) and ``put(ts, v)`` writes blocks back."""

    def __init__(self, table: BlockTable, c: BlockClass, model):
        topo, layout = table.topo, table.layout
        if c.kind == "mu":
            self.params = [model.mu]
            self.get = lambda ts: ts[0].unsqueeze(0)
            self.put = lambda ts, v: ts[0].copy_(v[0])
        elif c.kind.startswith("embed"):
            by_agent = {e.agent: k for k, e in enumerate(topo.embeddings)}
            attr = c.kind.split(".")[1]
            self.params = [getattr(model.embed[by_agent[a]], attr) for a in c.rows.tolist()]
            self.get = lambda ts: torch.stack(list(ts))
            self.put = lambda ts, v: [t.copy_(x) for t, x in zip(ts, v)]
        elif c.kind == "W":
            start = np.concatenate([[0], np.cumsum(2 * topo.dims[topo.readout])[:-1]])
            where = np.searchsorted(topo.readout, c.rows)
            cols = torch.as_tensor(start[where][:, None] + np.arange(c.shape[1])[None, :])
            self.params = [model.W]
            self.get = lambda ts: ts[0][:, cols].permute(1, 0, 2)
            self.put = lambda ts, v: ts[0].__setitem__((slice(None), cols), v.permute(1, 0, 2).to(ts[0].device))
        else:
            field = layout.matrix_field(_matrix_of(layout, c.kind))
            R = torch.as_tensor(dense_rows(topo, layout, field, c.rows))
            idx = (slice(None), R[:, :, None], torch.as_tensor(dense_rows(topo, layout, field, c.cols))[:, None, :]) \
                if c.cols is not None else (slice(None), R)
            self.params = [getattr(model.body, c.kind)]
            self.get = lambda ts: ts[0][idx]
            self.put = lambda ts, v: ts[0].__setitem__(idx, v.to(ts[0].device))  # (v: from a CPU checkpoint)


def _matrix_of(layout: AgentLayout, kind: str) -> str:
    """The matrix a bias belongs to (biases sit on the rows of their half-step's matrix)."""
    for hs in layout.half_steps:
        if kind in (hs.matrix, hs.bias):
            return hs.matrix
    raise KeyError(kind)


def dense_packed(table: BlockTable, model, grads: bool = False) -> dict[str, Tensor]:
    """Every class's blocks read out of a dense classifier (or out of its gradients)."""
    out = {}
    with torch.no_grad():
        for c in table:
            b = DenseBinding(table, c, model)
            ts = [(p.grad if p.grad is not None else torch.zeros_like(p)) if grads else p for p in b.params]
            out[c.key] = b.get(ts).clone()
    return out


@torch.no_grad()
def load_dense(table: BlockTable, model, packed: dict[str, Tensor]) -> None:
    """Write every class's blocks into a dense masked classifier (entries outside the mask stay zero)."""
    for n, p in model.named_parameters():
        if n.startswith("body."):
            p.zero_()
    for c in table:
        if c.key not in packed:
            raise KeyError(f"block class {c.key!r} missing")
        b = DenseBinding(table, c, model)
        b.put(b.params, packed[c.key].to(b.params[0].dtype))


def init_packed(table: BlockTable, seed: int, init_std: float | None = None, dtype=torch.float32) -> dict[str, Tensor]:
    """The initial value of every class (all blocks)."""
    return {c.key: init_class(table, c, seed, init_std, dtype=dtype) for c in table}


def named(table: BlockTable, packed: dict[str, Tensor]) -> dict[str, Tensor]:
    """Packed classes as a dict of single blocks by name (tests, small graphs)."""
    out = {}
    for c in table:
        v = packed[c.key]
        for i, n in enumerate(c.names()):
            out[n] = v.select(c.block_axis, i)
    return out
