"""The readout's messages: partial logits to the root, and their gradient back.

With the ``tree`` readout every rank's ``sum_i W^[i] y_L^[i]`` travels up a BFS spanning tree of
the rank graph to rank 0 and the gradient comes back down (:class:`TreeReduce`, the trainer's);
for a user's loop the sum also comes back down to every rank and the backward averages the
ranks' logit gradients the same way (:class:`TreeAllReduce`). ``allreduce`` is the explicit
collective alternative, never chosen silently.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .exchange import CommStats, PeerFailure, Tracer


@dataclass
class Tree:
    """One rank's place in the readout tree and how it talks to its parent and children."""

    parent: int | None
    children: list[int]
    group: object
    tracer: Tracer | None
    stage_cpu: bool
    stats: CommStats
    shape: tuple[int, int] = (0, 0)
    size: int = 1  # ranks in the tree

    @property
    def pg(self):
        """The process group the tree's ranks belong to (ranks are ranks of this group)."""
        return self.group if self.group is not None else dist.group.WORLD

    def _send(self, t: Tensor, dst: int, phase: str):
        nbytes = t.numel() * t.element_size()
        if self.tracer is not None:
            self.tracer.record(phase, -1, "readout", dst, nbytes)
        self.stats.bytes += nbytes
        self.stats.messages += 1
        return self.pg.send([t], dst, 0)

    def _wait(self, reqs, what: str) -> None:
        peer, t0 = None, time.perf_counter()
        try:
            for peer, r in reqs:
                r.wait()
        except RuntimeError as e:
            raise PeerFailure(f"readout {what}: exchange with rank {peer} failed: "
                              f"{str(e).splitlines()[0][:300]}", peer) from e
        self.stats.seconds += time.perf_counter() - t0

    def _cpu(self, t: Tensor) -> Tensor:
        return t.cpu() if self.stage_cpu else t

    def up(self, partial: Tensor, phase: str = "forward") -> Tensor:
        """The sum of every rank's partial logits on the root; a 0-dim placeholder elsewhere."""
        self.shape = tuple(partial.shape)
        bufs = {c: torch.empty_like(self._cpu(partial)) for c in self.children}
        self._wait([(c, self.pg.recv([b], c, 0)) for c, b in bufs.items()], "gather")
        total = partial.clone()
        for b in bufs.values():
            total += b.to(total.device)
        if self.parent is None:
            return total
        self._wait([(self.parent, self._send(self._cpu(total), self.parent, phase))], "send to parent")
        return partial.new_zeros(())

    def down(self, g: Tensor, phase: str = "backward") -> Tensor:
        """The root's ``g`` on every rank: received from the parent and passed on to the children
        (the logits' gradient in the backward; the logits themselves for :class:`TreeAllReduce`)."""
        if self.parent is not None:
            buf = torch.empty(self.shape, dtype=g.dtype, device="cpu" if self.stage_cpu else g.device)
            self._wait([(self.parent, self.pg.recv([buf], self.parent, 0))], "receive from parent")
            g = buf.to(g.device)
        else:
            g = g.contiguous()
        if self.children:
            msg = self._cpu(g)
            self._wait([(c, self._send(msg, c, phase)) for c in self.children], "send to children")
        return g


class TreeReduce(torch.autograd.Function):
    """Partial logits up the tree (forward); the logits' gradient down (backward)."""

    @staticmethod
    def forward(ctx, partial, tree: Tree):
        ctx.tree = tree
        return tree.up(partial.contiguous())

    @staticmethod
    def backward(ctx, g):
        return ctx.tree.down(g), None


class TreeAllReduce(torch.autograd.Function):
    """Every rank gets the sum of the partial logits (up the tree, then back down); backward:
    every rank gets the mean of the ranks' logit gradients, the same way. The adjoint of
    "each rank holds the logits and the objective is the mean of the ranks' losses": with
    the same loss on every rank, the gradient of one process."""

    @staticmethod
    def forward(ctx, partial, tree: Tree):
        ctx.tree = tree
        total = tree.up(partial.contiguous(), "forward")
        return tree.down(total if tree.parent is None else partial.new_empty(partial.shape), "forward").clone()

    @staticmethod
    def backward(ctx, g):
        tree = ctx.tree
        total = tree.up(g.contiguous(), "backward")
        mean = total / tree.size if tree.parent is None else g.new_empty(g.shape)
        return tree.down(mean, "backward").clone(), None


class AllReduceSum(torch.autograd.Function):
    """The explicit collective readout: every rank gets the logits (and computes the same loss)."""

    @staticmethod
    def forward(ctx, partial, group):
        # contiguous on every rank: ranks' partials can differ in strides (an einsum's transposed
        # result here, a sum with mu there), and the collective adds the buffers in memory order
        out = partial.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        return g, None
