"""A training step on a worker (:func:`begin_step`), the engines' reductions over every rank, and the
gradient sum of a shard's replicas.

Each replica of an agent partition computes its gradients on its slice of the global batch with
the loss normalised by the *global* batch, so their sum is one process's gradient. As
DistributedDataParallel does, parameters form buckets (~``BUCKET_BYTES``, in reverse order);
a bucket's last gradient starts an asynchronous ``all_reduce`` on the replica group, overlapping
the rest of the backward, and :meth:`GradReducer.finish` writes the sums (or means) back, by
itself when the backward ends with ``auto_finish``. Every reduction can be traced.
"""
from __future__ import annotations

import os
import signal
import sys

import torch
import torch.distributed as dist
from torch import nn

from .exchange import Tracer

BUCKET_BYTES = 25 << 20  # as DistributedDataParallel's default


def maybe_fail(fault: tuple[int, int, str] | None, rank: int, step: int) -> None:
    """Test-only fault injection (``DHDNN_FAULT=rank:step:kill|raise|stop``)."""
    if fault and fault[0] == rank and fault[1] == step:
        print(f"dhdnn: test fault: {fault[2]} rank {rank} at step {step}", file=sys.stderr, flush=True)
        if fault[2] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if fault[2] == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        raise RuntimeError(f"injected fault on rank {rank} at step {step}")


def begin_step(owner) -> None:
    """A training step starts on a worker (``owner``: anything with ``rank``, ``steps``, ``fault``,
    ``tracer`` and ``reducer``): fault injection (tests), the tracer's step number, the step
    count, the replica reducer's buckets. The one preamble of the library and every engine."""
    maybe_fail(owner.fault, owner.rank, owner.steps)
    if owner.tracer is not None:
        owner.tracer.step = owner.steps
    owner.steps += 1
    if owner.reducer is not None:
        owner.reducer.start_step()


class WorldReductions:
    """An engine's logging and setup reductions over every rank (outside forward/backward)."""

    device: torch.device

    def _reduce(self, t, op, group=None):
        t = t.to(self.device if dist.get_backend(group) == "nccl" else "cpu").clone()
        dist.all_reduce(t, op=op, group=group)
        return t.cpu()

    def reduce_sum(self, t):
        return self._reduce(t, dist.ReduceOp.SUM)

    def reduce_max(self, t):
        return self._reduce(t, dist.ReduceOp.MAX)

    def barrier(self):
        dist.barrier()


class GradReducer:
    def __init__(self, params: list[nn.Parameter], group, group_ranks: list[int], tracer: Tracer | None = None,
                 bucket_bytes: int = BUCKET_BYTES, average: bool = False, auto_finish: bool = False):
        self.group, self.ranks, self.tracer = group, group_ranks, tracer
        self.average, self.auto_finish = average, auto_finish
        self._queued = False
        self.buckets: list[list[nn.Parameter]] = []
        size = bucket_bytes
        for p in reversed(params):
            nbytes = p.numel() * p.element_size()
            if size + nbytes > bucket_bytes and (not self.buckets or self.buckets[-1]):
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += nbytes
        self._bucket_of = {id(p): b for b, ps in enumerate(self.buckets) for p in ps}
        self._pending: dict[int, int] = {}
        self._work: list = []
        for p in params:
            p.register_post_accumulate_grad_hook(self._ready)
        self.bytes_per_step = sum(p.numel() * p.element_size() for p in params)

    @classmethod
    def for_groups(cls, params, groups, tracer: Tracer | None = None, **options) -> "GradReducer | None":
        """The reducer of a shard's ``params`` over its replica group (None without replicas)."""
        if groups.dims.replicas == 1:
            return None
        return cls(list(params), groups.replica, groups.replica_mates, tracer, **options)

    def start_step(self) -> None:
        self._pending = {b: len(ps) for b, ps in enumerate(self.buckets)}
        self._work = []
        self._queued = False

    def _ready(self, p: nn.Parameter) -> None:
        b = self._bucket_of[id(p)]
        if b not in self._pending:
            return  # outside a training step (or reduced already)
        if self.auto_finish and not self._queued:  # wait for every bucket when this backward ends
            torch.autograd.Variable._execution_engine.queue_callback(self.finish)
            self._queued = True
        self._pending[b] -= 1
        if self._pending[b] == 0:
            del self._pending[b]
            self._launch(b)

    def _launch(self, b: int) -> None:
        ps = self.buckets[b]
        flat = torch.cat([p.grad.reshape(-1) for p in ps])
        if self.tracer is not None:
            self.tracer.record("backward", -1, "allreduce_grad", -1, flat.numel() * flat.element_size(),
                               group=self.ranks)
        work = dist.all_reduce(flat, group=self.group, async_op=True)
        self._work.append((work, flat, ps))

    def finish(self) -> None:
        """Wait for every bucket (launching any a parameter without gradient held back) and
        write the sums into ``.grad``."""
        for b in list(self._pending):
            for p in self.buckets[b]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            del self._pending[b]
            self._launch(b)
        for work, flat, ps in self._work:
            work.wait()
            if self.average:
                flat /= len(self.ranks)
            at = 0
            for p in ps:
                n = p.numel()
                p.grad.copy_(flat[at:at + n].view_as(p.grad))
                at += n
        self._work = []
