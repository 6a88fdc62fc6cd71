"""The engine of one rank of a sharded run, and how it is built from a run config.

:func:`build_sharded_engine` partitions the topology (every rank computes the same
partition; a setup-time check confirms it), builds this rank's halo plan and
:class:`~dhdnn.distributed.network.ShardedNet` from per-agent initial blocks, and wraps it
in a :class:`ShardedEngine`, the trainer's interface: objective (the root computes the
loss from the tree-reduced logits), evaluation, logging reductions (outside
forward/backward), barriers and checkpoint entries.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..blocks import BlockTable
from ..engine import EVAL_BYTES, Engine, StepOut, stats_of
from ..halo import build_plans
from ..partition import partition
from ..topology import Topology
from .exchange import Tracer
from .mesh import Groups
from .network import ShardedNet


class ShardedEngine(Engine):
    """The :class:`~dhdnn.engine.Engine` of one rank of a sharded run."""

    def __init__(self, net: ShardedNet, groups: Groups, tracer: Tracer | None = None,
                 fault: tuple[int, int, str] | None = None, device: str = "cpu", collectives: bool = True,
                 train_batch: int = 0):
        self.net, self.groups, self.tracer = net, groups, tracer
        self.rank, self.world = groups.rank, groups.dims.world
        self.table = net.table
        self._step, self._fault, self.device = 0, fault, torch.device(device)
        self._alpha = 0.0
        self.replicas = groups.dims.replicas
        self.reducer = None
        if self.replicas > 1:
            from .replicas import GradReducer

            mates = [groups.dims.global_rank(r, groups.agent_rank) for r in range(self.replicas)]
            self.reducer = GradReducer(list(net.parameters()), groups.replica, mates, tracer)
        # evaluation may use the memory a training batch's activations use (or EVAL_BYTES)
        budget = max(EVAL_BYTES, train_batch * net.bytes_per_sample(training=True))
        self._eval_chunk_size = budget // max(1, net.bytes_per_sample())
        if collectives:
            self._eval_chunk_size = self._agreed_eval_chunk()

    def _mine(self, x: torch.Tensor) -> torch.Tensor:
        """This replica's slice of a global batch (replicas take distinct, nearly equal slices)."""
        return x if self.replicas == 1 else x.tensor_split(self.replicas)[self.groups.replica_rank]

    @property
    def shard_rank(self) -> int | None:
        """Checkpoint shards are written by replica 0 only (one per agent partition)."""
        return self.groups.agent_rank if self.groups.replica_rank == 0 else None

    @property
    def shard_count(self) -> int:
        return self.groups.dims.agents

    def optimizer_groups(self, weight_decay):
        wd = {id(p) for p in self.net.readout_parameters()}
        rest = [p for p in self.net.parameters() if id(p) not in wd]
        return [{"params": rest, "weight_decay": 0.0},
                {"params": self.net.readout_parameters(), "weight_decay": weight_decay}]

    def _maybe_fail(self) -> None:
        """Test-only fault injection (``DHDNN_FAULT=rank:step:kill|raise|stop``)."""
        if self._fault and self._fault[0] == self.rank and self._fault[1] == self._step:
            mode = self._fault[2]
            if mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if mode == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)
            raise RuntimeError(f"injected fault on rank {self.rank} at step {self._step}")

    def objective(self, x, y, alpha, record=False):
        """The loss of this replica's slice, normalised by the global batch: summed over replicas
        (:meth:`after_backward`), the gradients are those of the whole batch in one process."""
        self._maybe_fail()
        if self.tracer is not None:
            self.tracer.step = self._step
        self._step += 1
        n_global = len(y)
        x, y = self._mine(x).to(self.device), self._mine(y).to(self.device)
        if self.reducer is not None:
            self.reducer.start_step()
        out = self.net(x)
        self._alpha = alpha  # the regulariser's gradient is added after backward (after_backward)
        counts = self.groups.replica_rank == 0  # the regulariser is counted once, not once per replica
        reg = (self.net.regularizer_value(alpha) if alpha and counts else out.new_zeros(())).detach().reshape(1).cpu()
        zeros = torch.zeros(3, dtype=reg.dtype)
        if self.net.has_logits:
            ce = F.cross_entropy(out, y) if self.replicas == 1 else \
                F.cross_entropy(out, y, reduction="sum") / n_global
            stats = stats_of(out, y) if self.groups.agent_rank == 0 else zeros
            return StepOut(ce, torch.cat([stats.to(reg.dtype), reg]))
        return StepOut(out, torch.cat([zeros, reg]))  # a placeholder whose backward receives the logits' gradient

    def after_backward(self):
        if self.reducer is not None:
            self.reducer.finish()  # the data term, summed over the replicas of this shard
        if self._alpha:
            self.net.add_regularizer_grad(self._alpha)  # identical on every replica: added after the sum

    @torch.no_grad()
    def eval_stats(self, x, y):
        """Each replica evaluates its own slice; the root of each replica's agent group counts it."""
        x, y = self._mine(x), self._mine(y)
        out = torch.zeros(3, dtype=torch.float64)
        chunk = max(1, min(len(x), self._eval_chunk_size))
        if self.tracer is not None:
            self.tracer.evaluating = True
        try:
            for i in range(0, len(x), chunk):
                logits = self.net(x[i:i + chunk].to(self.device))
                if self.groups.agent_rank == 0:
                    out += stats_of(logits, y[i:i + chunk].to(self.device)).double()
        finally:
            if self.tracer is not None:
                self.tracer.evaluating = False
        return out

    def _agreed_eval_chunk(self) -> int:
        """Evaluation chunks sized by memory, agreed by every rank (they exchange per chunk):
        a setup-time collective."""
        mine = torch.tensor([float(self._eval_chunk_size)])
        return max(1, int(self._reduce(mine, dist.ReduceOp.MIN, dist.group.WORLD).item()))

    def _reduce(self, t, op, group):
        t = t.to(self.device if dist.get_backend(group) == "nccl" else "cpu").clone()
        dist.all_reduce(t, op=op, group=group)  # logging and setup only: outside forward/backward
        return t.cpu()

    def reduce_sum(self, t):
        return self._reduce(t, dist.ReduceOp.SUM, dist.group.WORLD)

    def reduce_max(self, t):
        return self._reduce(t, dist.ReduceOp.MAX, dist.group.WORLD)

    def barrier(self):
        dist.barrier()

    def entries(self):
        return self.net.entries()

    def end_epoch(self):
        if self.tracer is not None:
            self.tracer.flush()

    def close(self):
        self.end_epoch()


def build_sharded_engine(cfg, data, groups: Groups, topo: Topology, device: str = "cpu", fault=None,
                         partition_method: str = "auto", collectives: bool = True) -> ShardedEngine:
    """The engine of this rank: partition, halo plan, per-agent initial blocks, the sharded net.
    ``collectives=False``: no setup-time checks across ranks (a stand-alone engine for timing)."""
    from ..models import ARCHITECTURES
    from ..train import DTYPES

    mc, rc = cfg.model, cfg.run
    layout = ARCHITECTURES[mc.arch].agent_layout(J=mc.J)
    P, agent_rank = groups.dims.agents, groups.agent_rank
    part = partition(topo, P, partition_method)
    if collectives:
        check_same_partition(part.assignment, device)
    plan = build_plans(topo, part, ranks=[agent_rank])[0]
    table = BlockTable(topo, layout, mc.layers, data.n_classes)
    tracer = None
    if rc.trace:
        out = Path(rc.out_dir)
        tracer = Tracer(groups.rank, out / f"trace-rank{groups.rank}.jsonl", groups.to_global)
    stage = device.startswith("cuda") and dist.get_backend() == "gloo"
    net = ShardedNet(table, mc.h, plan, part.assignment, data.n_features, cfg.train.seed, mc.init_std,
                     DTYPES[rc.dtype], rc.readout, groups.agent, tracer, stage, rc.local_kernel,
                     rc.backprop, rc.reversible_anchor_every).to(device)
    return ShardedEngine(net, groups, tracer, fault, device, collectives,
                         -(-cfg.train.batch_size // groups.dims.replicas))


def check_same_partition(assignment, device: str) -> None:
    """Every rank computes the partition itself; make sure they agree (a setup-time collective)."""
    import hashlib

    on = device if dist.get_backend() == "nccl" else "cpu"
    digest = int.from_bytes(hashlib.sha256(assignment.tobytes()).digest()[:6], "little")
    h = torch.tensor([float(digest)], dtype=torch.float64, device=on)
    lo, hi = h.clone(), h.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if lo.item() != hi.item():
        raise RuntimeError("ranks computed different partitions; is pymetis the same version on every machine?")
