"""The dense network on every worker: data-parallel replicas of a network without agents (the
conv image network, a dense state network). Each worker takes its slice of every global batch,
its loss normalised by the global batch, and :class:`~.replicas.GradReducer` sums the gradients:
exactly one process's. Rank 0 writes checkpoints in the dense engine's format, so a run resumes
on any number of workers or in one process.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..engine import DenseEngine, StepOut
from .exchange import Tracer, evaluating
from .mesh import Groups
from .replicas import GradReducer, WorldReductions, begin_step


class ReplicatedEngine(WorldReductions, DenseEngine):
    def __init__(self, model, groups: Groups, device: str = "cpu", table=None, task: str = "classify",
                 tracer: Tracer | None = None, fault=None):
        super().__init__(model, device, table, task)
        self.groups, self.tracer, self.fault = groups, tracer, fault  # groups: 1 partition x world replicas
        self.rank, self.world = groups.rank, groups.dims.world
        self.steps = 0
        self._broadcast_parameters()
        self.reducer = GradReducer.for_groups(model.parameters(), groups, tracer)

    @torch.no_grad()
    def _broadcast_parameters(self) -> None:
        """Start from rank 0's weights (a setup-time collective; every rank built the same ones
        from the seed, so this only guards against a differing library on another machine)."""
        for p in self.model.parameters():
            t = p.detach().cpu() if dist.get_backend() == "gloo" else p.detach()
            dist.broadcast(t, 0)
            p.copy_(t)

    @property
    def shard_rank(self) -> int | None:
        return 0 if self.rank == 0 else None  # every rank holds the same parameters: rank 0 writes them

    @property
    def shard_count(self) -> int:
        return 1

    def objective(self, x, y, alpha, record=False):
        begin_step(self)
        n_global = len(y)
        x, y = self.groups.local(x).to(self.device), self.groups.local(y).to(self.device)
        out, norms = self.outputs(x, record)
        loss = self.task.loss(out, y, "sum") / n_global  # summed over the workers: the global batch's mean
        self._alpha = alpha
        reg = self.model.body.regularizer_value(alpha) if alpha and self.rank == 0 else loss.new_zeros(())
        return StepOut(loss, torch.cat([self.task.stats(out, y), reg.detach().reshape(1).cpu()]), norms)

    def after_backward(self):
        self.reducer.finish()
        super().after_backward()  # the regulariser's gradient: identical on every worker, added after the sum

    def eval_stats(self, x, y):
        with evaluating(self.tracer):
            return super().eval_stats(self.groups.local(x), self.groups.local(y))
