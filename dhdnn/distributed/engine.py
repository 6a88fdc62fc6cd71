"""The engine of one rank of a sharded run, built from a run config: a client of the library's
:class:`~dhdnn.distributed.DistributedNetwork`, with the trainer's interface (objective, evaluation,
logging reductions outside forward/backward, barriers, checkpoint entries).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..engine import EVAL_BYTES, Engine, StepOut, chunked_stats
from ..tasks import TASKS
from ..topology import Topology
from .distribute import DistributedNetwork
from .exchange import FAULT, Tracer, evaluating
from .mesh import Groups
from .network import build_shard
from .replicas import WorldReductions


class ShardedEngine(WorldReductions, Engine):
    """The :class:`~dhdnn.engine.Engine` of one rank of a sharded run: a client of the library's
    :class:`~dhdnn.distributed.DistributedNetwork` (its step preamble, replica slice, reducer)."""

    def __init__(self, dnet: DistributedNetwork, device: str = "cpu", collectives: bool = True, train_batch: int = 0,
                 task: str = "classify"):
        self.dnet, self.net, self.groups, self.tracer = dnet, dnet.net, dnet.groups, dnet.tracer
        self.task = TASKS[task]
        self.rank, self.world = self.groups.rank, self.groups.dims.world
        self.table, self.spec, self.device = self.net.table, dnet.spec, torch.device(device)
        self._alpha = 0.0
        self.replicas = self.groups.dims.replicas
        # evaluation may use the memory a training batch's activations use (or EVAL_BYTES)
        budget = max(EVAL_BYTES, train_batch * self.net.bytes_per_sample(training=True))
        self._eval_chunk_size = budget // max(1, self.net.bytes_per_sample())
        if collectives:
            self._eval_chunk_size = self._agreed_eval_chunk()

    @property
    def shard_rank(self) -> int | None:
        """Checkpoint shards are written by replica 0 only (one per agent partition)."""
        return self.groups.agent_rank if self.groups.replica_rank == 0 else None

    @property
    def shard_count(self) -> int:
        return self.groups.dims.agents

    def optimizer_groups(self, weight_decay):
        return self.dnet.param_groups(weight_decay)

    def objective(self, x, y, alpha, record=False):
        """The loss of this replica's slice, normalised by the global batch: summed over replicas
        (:meth:`after_backward`), the gradients are those of the whole batch in one process."""
        n_global = len(y)
        plan = self.net.plan
        plan.norms = [] if record else None  # the backward fills it (last layer first)
        norms = (lambda: torch.tensor(plan.norms[::-1], dtype=torch.float64)) if record else None
        out = self.dnet(x.to(self.device))
        y = self.groups.local(y).to(self.device)
        self._alpha = alpha  # the regulariser's gradient is added after backward (after_backward)
        counts = self.groups.replica_rank == 0  # the regulariser is counted once, not once per replica
        reg = (self.net.regularizer_value(alpha) if alpha and counts else out.new_zeros(())).detach().reshape(1).cpu()
        zeros = torch.zeros(3, dtype=reg.dtype)
        if self.net.has_logits:
            loss = self.task.loss(out, y) if self.replicas == 1 else self.task.loss(out, y, "sum") / n_global
            stats = self.task.stats(out, y) if self.groups.agent_rank == 0 else zeros
            return StepOut(loss, torch.cat([stats.to(reg.dtype), reg]), norms)
        return StepOut(out, torch.cat([zeros, reg]), norms)  # a placeholder whose backward receives the logits' gradient

    def after_backward(self):
        if self.dnet.reducer is not None:
            self.dnet.reducer.finish()  # the data term, summed over the replicas of this shard
        if FAULT == "scale":  # test-only: the data term's gradient twice its size (Adam's steps hide it)
            torch._foreach_mul_([p.grad for p in self.net.parameters() if p.grad is not None], 2.0)
        if self._alpha:
            self.net.add_regularizer_grad(self._alpha)  # identical on every replica: added after the sum

    def eval_stats(self, x, y):
        """Each replica evaluates its own slice; the root of each replica's agent group counts it."""
        x, y = self.groups.local(x), self.groups.local(y)
        with evaluating(self.tracer):
            return chunked_stats(self.task, self.net, x, y, max(1, min(len(x), self._eval_chunk_size)), self.device,
                                 self.groups.agent_rank == 0)

    def _agreed_eval_chunk(self) -> int:
        """Evaluation chunks sized by memory, agreed by every rank (they exchange per chunk):
        a setup-time collective."""
        mine = torch.tensor([float(self._eval_chunk_size)])
        return max(1, int(self._reduce(mine, dist.ReduceOp.MIN, dist.group.WORLD).item()))

    def entries(self):
        return self.net.entries()

    def take_drift(self) -> float:
        cert = self.net.plan.cert
        drift = cert.drift if cert is not None else 0.0
        if cert is not None:
            cert.reset()
        return drift

    def set_anchor_every(self, k: int) -> None:
        self.net.plan.set_anchor_every(k)

    @property
    def fault(self):
        return self.dnet.fault


def build_sharded_engine(cfg, data, groups: Groups, topo: Topology, device: str = "cpu", fault=None,
                         partition_method: str = "auto", collectives: bool = True) -> ShardedEngine:
    """The engine of this rank of a run config: :func:`~dhdnn.distributed.network.build_shard`
    (the setup :func:`~dhdnn.distributed.distribute` shares) wrapped for the trainer.
    ``collectives=False``: no setup-time checks across ranks (a stand-alone engine for timing)."""
    from ..build import NetworkSpec
    from ..train import DTYPES

    rc = cfg.run
    tracer = Tracer.for_rank(rc.out_dir, groups) if rc.trace else None
    spec = NetworkSpec.from_config(cfg, data.n_features, data.n_outputs)
    net = build_shard(spec, topo, groups, dtype=DTYPES[rc.dtype], device=device, partition_method=partition_method,
                      readout=rc.readout, tracer=tracer, local_kernel=rc.local_kernel, backprop=rc.backprop,
                      anchor_every=rc.anchors, check=collectives, reversible_state=rc.reversible_state,
                      fraction_bits=rc.reversible_fraction_bits)
    dnet = DistributedNetwork(net, groups, spec, topo, tracer, device, average=False, fault=fault)
    return ShardedEngine(dnet, device, collectives, -(-cfg.train.batch_size // groups.dims.replicas), cfg.model.task)
