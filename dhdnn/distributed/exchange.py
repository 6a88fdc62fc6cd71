"""Neighbour exchanges (DESIGN §3-4): ``gather`` and ``scatter_add`` as autograd Functions.

An :class:`Exchanger` turns one rank's halo plan into two static message patterns on a
*field*: an ``(F, B)`` tensor whose rows are this rank's state entries (its agents' slices
of ``p`` or ``q``, or of ``y`` for H1) and whose columns are the batch. Feature-major, so
every message is a set of contiguous rows:

* ``gather(x) -> halo``: send each neighbour rank the rows of my agents it reads,
  receive the rows of theirs that I read (laid out rank by rank, agent by agent);
* ``scatter_add(c_local, c_halo) -> c_local + received``: send each neighbour the
  contributions I computed for its agents, add the ones I receive for mine.

Each is the other's adjoint, so the backward of one runs the other. Every exchange posts
all receives and sends, then waits on all (a blocking ``send`` deadlocks on a ring, and
gloo requests only progress inside ``wait``); one message per neighbour rank; tags carry
nothing. With gloo, CUDA tensors are staged through CPU. Messages can be traced.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from ..partition import HaloPlan


class PeerFailure(RuntimeError):
    """A neighbour rank stopped answering (it crashed, was killed or timed out)."""

    def __init__(self, message: str, peer: int | None = None):
        super().__init__(message)
        self.peer = peer


class Tracer:
    """Records every message sent: step, phase, layer, op, source, destination, bytes."""

    def __init__(self, rank: int, path: Path | None = None):
        self.rank, self.path = rank, path
        self.step = 0
        self.evaluating = False  # forward passes of evaluation are traced as phase "eval"
        self.records: list[dict] = []

    def record(self, phase: str, layer: int, op: str, dst: int, nbytes: int) -> None:
        phase = "eval" if self.evaluating else phase
        self.records.append({"step": self.step, "phase": phase, "layer": layer, "op": op,
                             "src": self.rank, "dst": dst, "bytes": nbytes})

    def flush(self) -> None:
        if self.path is None or not self.records:
            return
        with open(self.path, "a") as f:
            for r in self.records:
                f.write(json.dumps(r) + "\n")
        self.records.clear()


@dataclass
class CommStats:
    """Time spent inside exchanges (posting and waiting) and bytes sent, for benchmarks."""

    seconds: float = 0.0
    bytes: int = 0
    messages: int = 0

    def reset(self) -> None:
        self.seconds, self.bytes, self.messages = 0.0, 0, 0


@dataclass
class FieldLayout:
    """Column bookkeeping of one field on one rank."""

    width: int  # F: local rows
    send_cols: dict[int, Tensor]  # peer -> my rows it reads (LongTensor)
    halo_slices: dict[int, slice]  # peer -> its rows within my halo
    halo_width: int


def field_layout(plan: HaloPlan, local_cols: dict[int, list[int]], width: int,
                 halo_width_of: dict[int, int]) -> FieldLayout:
    """``local_cols[a]``: the field rows of my agent ``a``; ``halo_width_of[a]``: rows of a
    foreign agent ``a`` in this field. Halo layout: neighbour ranks ascending, agents by index."""
    send = {s: torch.tensor([c for a in agents for c in local_cols[a]], dtype=torch.long)
            for s, agents in plan.send.items()}
    slices, at = {}, 0
    for s in plan.neighbor_ranks:
        w = sum(halo_width_of[a] for a in plan.recv[s])
        slices[s] = slice(at, at + w)
        at += w
    return FieldLayout(width, send, slices, at)


class Exchanger:
    """Point-to-point exchanges of one field layout, with static buffers and tracing."""

    def __init__(self, layout: FieldLayout, group=None, tracer: Tracer | None = None, stage_cpu: bool = False,
                 stats: CommStats | None = None):
        self.layout, self.group, self.tracer, self.stage_cpu = layout, group, tracer, stage_cpu
        self.stats = stats if stats is not None else CommStats()
        self._buffers: dict[tuple, Tensor] = {}
        self._send_cols_dev: dict[torch.device, dict[int, Tensor]] = {}

    def _buf(self, key: tuple, shape, like: Tensor) -> Tensor:
        """A message buffer allocated once per (role, peer, batch size, dtype, device) and reused:
        exchanges never overlap, and what leaves an exchange is always a fresh tensor."""
        device = torch.device("cpu") if self.stage_cpu else like.device
        k = (*key, tuple(shape), like.dtype, device)
        b = self._buffers.get(k)
        if b is None:
            b = self._buffers[k] = torch.empty(shape, dtype=like.dtype, device=device)
        return b

    def _cols(self, device) -> dict[int, Tensor]:
        if device not in self._send_cols_dev:
            self._send_cols_dev[device] = {s: c.to(device) for s, c in self.layout.send_cols.items()}
        return self._send_cols_dev[device]

    def _p2p(self, sends: dict[int, Tensor], recvs: dict[int, Tensor], phase: str, layer: int, op: str) -> None:
        """Post every receive and send, then wait on all; errors name the peer."""
        reqs, peer = [], None
        t0 = time.perf_counter()
        try:
            for peer, buf in recvs.items():
                reqs.append((peer, dist.irecv(buf, src=peer, group=self.group)))
            for peer, t in sends.items():
                reqs.append((peer, dist.isend(t, dst=peer, group=self.group)))
                if self.tracer is not None:
                    self.tracer.record(phase, layer, op, peer, t.numel() * t.element_size())
            for peer, r in reqs:
                r.wait()
            st = self.stats
            st.seconds += time.perf_counter() - t0
            st.messages += len(sends)
            st.bytes += sum(t.numel() * t.element_size() for t in sends.values())
        except RuntimeError as e:
            raise PeerFailure(f"{phase} {op} of layer {layer}: exchange with neighbour rank {peer} failed: "
                              f"{str(e).splitlines()[0][:300]}", peer) from e

    def _stage_out(self, t: Tensor) -> Tensor:
        return t.cpu() if self.stage_cpu and t.device.type != "cpu" else t

    def gather_values(self, x: Tensor, phase: str, layer: int, op: str) -> Tensor:
        """Send my boundary rows of ``x`` (F, B); return the halo (H, B) as a new tensor."""
        L, B = self.layout, x.shape[1]
        src = self._stage_out(x)
        sends = {}
        for s, c in self._cols(src.device).items():
            sends[s] = torch.index_select(src, 0, c, out=self._buf(("gs", s), (len(c), B), x))
        recvs = {s: self._buf(("gr", s), (sl.stop - sl.start, B), x) for s, sl in L.halo_slices.items()}
        self._p2p(sends, recvs, phase, layer, op)
        if not recvs:
            return x.new_zeros(0, B)
        return torch.cat([recvs[s] for s in L.halo_slices], dim=0).to(x.device)

    def scatter_values(self, c_local: Tensor | None, c_halo: Tensor, phase: str, layer: int, op: str) -> Tensor:
        """Send the halo contributions to their owners; return ``c_local`` (zeros if None) plus
        what I receive."""
        L, B = self.layout, c_halo.shape[1]
        staged = self._stage_out(c_halo)
        sends = {s: staged[sl] for s, sl in L.halo_slices.items()}  # row slices are contiguous
        cols = self._cols(c_halo.device)
        recvs = {s: self._buf(("sr", s), (len(c), B), c_halo) for s, c in cols.items()}
        self._p2p(sends, recvs, phase, layer, op)
        out = c_halo.new_zeros(L.width, B) if c_local is None else c_local.clone()
        for s, c in cols.items():
            out.index_add_(0, c, recvs[s].to(out.device))
        return out


class Gather(torch.autograd.Function):
    """``x -> halo``; backward: scatter_add of the halo's gradient."""

    @staticmethod
    def forward(ctx, x, ex: Exchanger, layer: int, op: str):
        ctx.ex, ctx.layer, ctx.op = ex, layer, op
        return ex.gather_values(x.contiguous(), "forward", layer, op)

    @staticmethod
    def backward(ctx, g_halo):
        return ctx.ex.scatter_values(None, g_halo.contiguous(), "backward", ctx.layer, ctx.op), None, None, None


class ScatterAdd(torch.autograd.Function):
    """``(c_local, c_halo) -> c_local + received``; backward: gather of the gradient."""

    @staticmethod
    def forward(ctx, c_local, c_halo, ex: Exchanger, layer: int, op: str):
        ctx.ex, ctx.layer, ctx.op = ex, layer, op
        return ex.scatter_values(c_local.contiguous(), c_halo.contiguous(), "forward", layer, op)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        return g, ctx.ex.gather_values(g, "backward", ctx.layer, ctx.op), None, None, None


def gather(x: Tensor, ex: Exchanger, layer: int = -1, op: str = "gather") -> Tensor:
    return Gather.apply(x, ex, layer, op)


def scatter_add(c_local: Tensor, c_halo: Tensor, ex: Exchanger, layer: int = -1, op: str = "scatter_add") -> Tensor:
    return ScatterAdd.apply(c_local, c_halo, ex, layer, op)
