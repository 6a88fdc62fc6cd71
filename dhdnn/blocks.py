"""Per-agent parameter blocks: the partition-independent naming of a topology network.

Every trainable tensor of a topology run is a set of named blocks owned by one agent
(the row agent), e.g. ``agent3.K_p.5`` = rows of ``p^[3]``, columns of ``p^[5]`` of
``K_p`` for every layer. The sharded engine stores blocks grouped by shape; the dense
model stores them inside masked matrices; checkpoints and exports use the names. This
module maps between the two and defines a seeded, per-agent (hence partition-
independent) initialisation. Pure maths: no ``torch.distributed``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .topology import Topology

MATRICES = {"H2": ("K_p", "K_q"), "H1": ("K",)}
BIASES = {"H2": ("b_p", "b_q"), "H1": ("b",)}


def field_width(topo: Topology, arch: str, i: int) -> int:
    """Columns agent ``i`` owns in one field: ``n_i`` (H2: ``p`` or ``q``) or ``2 n_i`` (H1: both)."""
    return topo.dims[i] * (2 if arch == "H1" else 1)


def dense_rows(topo: Topology, arch: str, i: int) -> list[int]:
    """Indices of agent ``i``'s field within the dense parameter's axis (``p``/``q`` for H2, ``y`` for H1)."""
    off, n = topo.offsets()[i], topo.dims[i]
    rows = list(range(off, off + n))
    if arch == "H1":
        rows += [topo.half_dim + r for r in rows]
    return rows


@dataclass(frozen=True)
class BlockSpec:
    name: str  # canonical name
    agent: int  # owning agent
    kind: str  # "matrix", "bias", "readout", "mu", "embed_weight", "embed_bias"
    param: str  # parameter kind (K_p, b_q, W, ...) or the dense parameter name for embeddings
    col_agent: int | None  # for matrices: the column agent
    shape: tuple[int, ...]


def block_specs(topo: Topology, arch: str, layers: int, n_classes: int) -> list[BlockSpec]:
    """Every block of a topology network, agent by agent in canonical order; ``mu`` last."""
    specs = []
    emb = {e.agent: (k, e) for k, e in enumerate(topo.embeddings)}
    readout = set(topo.readout)
    for i in range(topo.n_agents):
        wi = field_width(topo, arch, i)
        for K in MATRICES[arch]:
            for k in topo.neighbors(i):
                specs.append(BlockSpec(f"agent{i}.{K}.{k}", i, "matrix", K, k,
                                       (layers, wi, field_width(topo, arch, k))))
        for b in BIASES[arch]:
            specs.append(BlockSpec(f"agent{i}.{b}", i, "bias", b, None, (layers, wi)))
        if i in emb:
            k, e = emb[i]
            specs.append(BlockSpec(f"agent{i}.embed.weight", i, "embed_weight", f"embed.{k}.weight", None,
                                   (2 * topo.dims[i], len(e.features))))
            specs.append(BlockSpec(f"agent{i}.embed.bias", i, "embed_bias", f"embed.{k}.bias", None,
                                   (2 * topo.dims[i],)))
        if i in readout:
            specs.append(BlockSpec(f"agent{i}.W", i, "readout", "W", None, (n_classes, 2 * topo.dims[i])))
    specs.append(BlockSpec("mu", topo.readout[0], "mu", "mu", None, (n_classes,)))
    return specs


def init_blocks(topo: Topology, arch: str, layers: int, n_classes: int, seed: int,
                init_std: float | None = None, dtype=torch.float64) -> dict[str, Tensor]:
    """Initial values of every block, drawn from one generator per agent seeded by
    ``(seed, agent)``: the same network whatever the partition. ``K, b ~ N(0, std^2)`` (std 1
    by default, as the dense H-DNNs); embeddings as ``torch.nn.Linear``; readout at zero."""
    std = 1.0 if init_std is None else init_std
    out, gens = {}, {}
    for s in block_specs(topo, arch, layers, n_classes):
        g = gens.setdefault(s.agent, torch.Generator().manual_seed(seed * 1_000_003 + 7919 * s.agent + 17))
        if s.kind in ("matrix", "bias"):
            t = torch.randn(s.shape, generator=g, dtype=torch.float64) * std
        elif s.kind in ("embed_weight", "embed_bias"):
            fan_in = len(next(e.features for e in topo.embeddings if e.agent == s.agent))
            bound = 1.0 / math.sqrt(fan_in)
            t = (torch.rand(s.shape, generator=g, dtype=torch.float64) * 2 - 1) * bound
        else:  # readout and mu start at zero, as in the dense Classifier
            t = torch.zeros(s.shape, dtype=torch.float64)
        out[s.name] = t.to(dtype)
    return out


def _readout_cols(topo: Topology) -> dict[int, slice]:
    cols, at = {}, 0
    for i in topo.readout:
        cols[i] = slice(at, at + 2 * topo.dims[i])
        at += 2 * topo.dims[i]
    return cols


def dense_view(model, topo: Topology, arch: str, spec: BlockSpec) -> Tensor:
    """The block ``spec`` as a tensor indexed out of the dense :class:`Classifier` ``model``
    (for ``.grad`` too: pass ``model`` whose parameters are replaced by their gradients)."""
    if spec.kind == "matrix":
        rows = torch.tensor(dense_rows(topo, arch, spec.agent))
        cols = torch.tensor(dense_rows(topo, arch, spec.col_agent))
        return getattr(model.body, spec.param)[:, rows][:, :, cols]
    if spec.kind == "bias":
        return getattr(model.body, spec.param)[:, torch.tensor(dense_rows(topo, arch, spec.agent))]
    if spec.kind == "readout":
        return model.W[:, _readout_cols(topo)[spec.agent]]
    if spec.kind == "mu":
        return model.mu
    return model.get_parameter(spec.param)


def dense_to_blocks(model, topo: Topology, arch: str, layers: int, grads: bool = False) -> dict[str, Tensor]:
    """All blocks of a dense masked classifier (or of its gradients, with ``grads=True``)."""
    specs = block_specs(topo, arch, layers, model.n_classes)
    if grads:
        saved = {n: p.data for n, p in model.named_parameters()}
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.data = p.grad if p.grad is not None else torch.zeros_like(p)
            out = {s.name: dense_view(model, topo, arch, s).detach().clone() for s in specs}
            for n, p in model.named_parameters():
                p.data = saved[n]
        return out
    with torch.no_grad():
        return {s.name: dense_view(model, topo, arch, s).detach().clone() for s in specs}


@torch.no_grad()
def blocks_to_dense(model, topo: Topology, arch: str, layers: int, blocks: dict[str, Tensor]) -> None:
    """Write named blocks into a dense masked classifier (entries outside the mask stay zero)."""
    for n, p in model.named_parameters():
        if n.startswith("body."):
            p.zero_()
    for s in block_specs(topo, arch, layers, model.n_classes):
        if s.name not in blocks:
            raise KeyError(f"block {s.name!r} missing")
        v = blocks[s.name].to(model.W.dtype)
        if s.kind == "matrix":
            rows = torch.tensor(dense_rows(topo, arch, s.agent))
            cols = torch.tensor(dense_rows(topo, arch, s.col_agent))
            P = getattr(model.body, s.param)
            P[:, rows[:, None], cols[None, :]] = v
        elif s.kind == "bias":
            getattr(model.body, s.param)[:, torch.tensor(dense_rows(topo, arch, s.agent))] = v
        elif s.kind == "readout":
            model.W[:, _readout_cols(topo)[s.agent]] = v
        else:
            (model.mu if s.kind == "mu" else model.get_parameter(s.param)).copy_(v)
