"""Neighbour exchanges: ``gather`` and ``scatter_add``, each the other's adjoint.

A rank's *field* is ``(F, B)``: its agents' rows by the batch (feature-major, so a message is a
set of whole rows); its *halo* ``(H, B)`` holds the neighbours' rows it reads, neighbour rank by
rank, agent by agent. A gather sends each neighbour rank the rows of my agents it reads; a
scatter-add sends each the contributions I computed for its agents and adds those I receive.
An :class:`Exchanger` posts every receive and send (``start_*``), lets the caller compute, and
waits (``finish_*``); several tensors travel as one message per neighbour, receives land in the
caller's storage, send buffers are allocated once, a failing peer is named (:class:`PeerFailure`),
CUDA tensors are staged through the CPU with gloo, and every message can be traced.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor


FAULT = os.environ.get("DHDNN_TEST_FAULT")  # test-only (dhdnn verify's tests): "halo" corrupts a received row


class PeerFailure(RuntimeError):
    """A neighbour rank stopped answering (it crashed, was killed or timed out)."""

    def __init__(self, message: str, peer: int | None = None):
        super().__init__(message)
        self.peer = peer


class Tracer:
    """Records every message sent (and every gradient reduction): step, phase, layer, op,
    source, destination, bytes. Written to ``path`` as JSON lines at the end of each epoch."""

    def __init__(self, rank: int, path: Path | None = None, to_global=None):
        self.rank, self.path = rank, path
        self.to_global = to_global or (lambda r: r)  # group rank -> global rank
        self.step = 0
        self.evaluating = False  # forward passes of evaluation are traced as phase "eval"
        self.records: list[dict] = []

    @classmethod
    def for_rank(cls, directory, groups) -> "Tracer":
        """The tracer of this rank of ``groups`` (a :class:`~.mesh.Groups`), writing
        ``directory/trace-rank<R>.jsonl`` with global ranks."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        return cls(groups.rank, directory / f"trace-rank{groups.rank}.jsonl", groups.to_global)

    def record(self, phase: str, layer: int, op: str, dst: int, nbytes: int, **extra) -> None:
        phase = "eval" if self.evaluating else phase
        self.records.append({"step": self.step, "phase": phase, "layer": layer, "op": op,
                             "src": self.rank, "dst": self.to_global(dst) if dst >= 0 else dst, "bytes": nbytes,
                             **extra})

    def flush(self) -> None:
        if self.path is None or not self.records:
            return
        with open(self.path, "a") as f:
            for r in self.records:
                f.write(json.dumps(r) + "\n")
        self.records.clear()


@contextlib.contextmanager
def evaluating(tracer: Tracer | None):
    """Messages sent inside are traced as phase ``eval``."""
    if tracer is not None:
        tracer.evaluating = True
    try:
        yield
    finally:
        if tracer is not None:
            tracer.evaluating = False


@dataclass
class CommStats:
    """Time spent posting and waiting on exchanges, bytes and messages sent (benchmarks)."""

    seconds: float = 0.0
    bytes: int = 0
    messages: int = 0

    def reset(self) -> None:
        self.seconds, self.bytes, self.messages = 0.0, 0, 0


@dataclass
class FieldLayout:
    """Row bookkeeping of one rank's fields (all fields of a layer share it)."""

    width: int  # F: local rows
    send_rows: dict[int, Tensor]  # neighbour rank -> my rows it reads (LongTensor)
    halo_slices: dict[int, slice]  # neighbour rank -> its rows within my halo
    halo_width: int  # H

    @property
    def peers(self) -> list[int]:
        return sorted(self.send_rows)


@dataclass
class Pending:
    """Messages in flight: requests, receive buffers, and where received values go."""

    kind: str
    reqs: list = field(default_factory=list)
    recv: dict = field(default_factory=dict)
    outs: list | None = None
    what: str = ""
    t0: float = 0.0


class Exchanger:
    """Point-to-point exchanges on one :class:`FieldLayout`, with static send buffers and tracing."""

    def __init__(self, layout: FieldLayout, group=None, tracer: Tracer | None = None, stage_cpu: bool = False,
                 stats: CommStats | None = None):
        """``layout``'s ranks are ranks of ``group`` (the default group if None)."""
        self.layout, self.group, self.tracer, self.stage_cpu = layout, group, tracer, stage_cpu
        self.pg = group if group is not None or not layout.send_rows else dist.group.WORLD
        self.stats = stats if stats is not None else CommStats()
        self._buffers: dict[tuple, Tensor] = {}
        self._rows: dict[torch.device, dict[int, Tensor]] = {}

    @property
    def active(self) -> bool:
        return bool(self.layout.send_rows)

    def _buf(self, key: tuple, shape: tuple, like: Tensor, device=None) -> Tensor:
        """A message buffer allocated once per (role, peer, shape, dtype, device) and reused: an
        exchange's buffers are free again once it has finished."""
        device = device or (torch.device("cpu") if self.stage_cpu else like.device)
        k = (*key, shape, like.dtype, device)
        b = self._buffers.get(k)
        if b is None:
            b = self._buffers[k] = torch.empty(shape, dtype=like.dtype, device=device)
        return b

    def _send_rows(self, device) -> dict[int, Tensor]:
        if device not in self._rows:
            self._rows[device] = {s: r.to(device) for s, r in self.layout.send_rows.items()}
        return self._rows[device]

    def _post(self, sends: dict[int, Tensor], recvs: dict[int, Tensor], phase: str, layer: int, op: str) -> list:
        """Post every receive, then every send. The process group's own ``recv``/``send`` (what
        ``dist.irecv``/``dist.isend`` call after their argument checks): once per message, the
        checks would cost more than a small message's transfer."""
        reqs, peer = [], None
        pg = self.pg
        try:
            for peer, buf in recvs.items():
                reqs.append((peer, pg.recv([buf], peer, 0)))
            for peer, t in sends.items():
                reqs.append((peer, pg.send([t], peer, 0)))
        except RuntimeError as e:
            raise self._failure(e, peer, phase, layer, op) from e
        nbytes = 0
        for peer, t in sends.items():
            b = t.numel() * t.element_size()
            nbytes += b
            if self.tracer is not None:
                self.tracer.record(phase, layer, op, peer, b)
        self.stats.messages += len(sends)
        self.stats.bytes += nbytes
        return reqs

    def _wait(self, p: Pending) -> None:
        peer = None
        t = time.perf_counter()
        try:
            for peer, r in p.reqs:
                r.wait()
        except RuntimeError as e:
            raise self._failure(e, peer, *p.what) from e
        self.stats.seconds += time.perf_counter() - t + p.t0

    @staticmethod
    def _failure(e: Exception, peer, phase, layer, op) -> PeerFailure:
        return PeerFailure(f"{phase} {op} of layer {layer}: exchange with neighbour rank {peer} failed: "
                           f"{str(e).splitlines()[0][:300]}", peer)

    # ---- gather ---------------------------------------------------------------------------
    def start_gather(self, xs: list[Tensor], outs: list[Tensor], phase: str = "forward", layer: int = -1,
                     op: str = "gather") -> Pending:
        """Send my boundary rows of every ``xs[i]`` (F, B); their halos arrive in ``outs[i]`` (H, B)
        at :meth:`finish_gather`. One message per neighbour carries all of ``xs``."""
        t = time.perf_counter()
        L, k, B = self.layout, len(xs), xs[0].shape[1]
        rows = self._send_rows(torch.device("cpu") if self.stage_cpu else xs[0].device)
        sends, recvs = {}, {}
        direct = k == 1 and not self.stage_cpu
        src = [x.cpu() for x in xs] if self.stage_cpu else xs
        for s in L.peers:
            buf = self._buf(("gs", s), (k, len(rows[s]), B), xs[0])
            for i, x in enumerate(src):
                torch.index_select(x, 0, rows[s], out=buf[i])
            sends[s] = buf
            sl = L.halo_slices[s]
            recvs[s] = outs[0][sl] if direct else self._buf(("gr", s), (k, sl.stop - sl.start, B), xs[0])
        p = Pending("gather", self._post(sends, recvs, phase, layer, op), recvs, outs, (phase, layer, op))
        p.t0 = time.perf_counter() - t
        return p

    def finish_gather(self, p: Pending) -> None:
        self._wait(p)
        if len(p.outs) > 1 or self.stage_cpu:  # (one tensor: received in place)
            for s, buf in p.recv.items():
                sl = self.layout.halo_slices[s]
                for i, out in enumerate(p.outs):
                    out[sl].copy_(buf[i])
        if FAULT == "halo" and p.what[0] == "forward":  # test-only: a bug that corrupts one halo row
            p.outs[0][0].add_(1.0)

    # ---- scatter-add ----------------------------------------------------------------------
    def start_scatter(self, cs: list[Tensor], phase: str = "forward", layer: int = -1,
                      op: str = "scatter_add") -> Pending:
        """Send the halo rows of every ``cs[i]`` (H, B) to their owners; what I receive is added to
        the caller's local tensors at :meth:`finish_scatter`."""
        t = time.perf_counter()
        L, k, B = self.layout, len(cs), cs[0].shape[1]
        rows = self._send_rows(torch.device("cpu") if self.stage_cpu else cs[0].device)
        sends, recvs = {}, {}
        for s in L.peers:
            sl = L.halo_slices[s]
            if k == 1 and not self.stage_cpu:
                sends[s] = cs[0][sl]  # a row slice of a contiguous tensor is contiguous
            else:
                buf = self._buf(("ss", s), (k, sl.stop - sl.start, B), cs[0])
                for i, c in enumerate(cs):
                    buf[i].copy_(c[sl])
                sends[s] = buf
            recvs[s] = self._buf(("sr", s), (k, len(rows[s]), B), cs[0])
        p = Pending("scatter", self._post(sends, recvs, phase, layer, op), recvs, None, (phase, layer, op))
        p.t0 = time.perf_counter() - t
        return p

    def finish_scatter(self, p: Pending, outs: list[Tensor]) -> None:
        """Wait, then ``outs[i][my rows] += received`` (outs: (F, B) each)."""
        self._wait(p)
        rows = self._send_rows(outs[0].device)
        for s, buf in p.recv.items():
            for i, out in enumerate(outs):
                out.index_add_(0, rows[s], buf[i].to(out.device) if self.stage_cpu else buf[i])
