"""The layer stack of one rank, forward and backward, with exchanges hidden behind compute.

A layer is the architecture's list of half-steps (``AgentLayout``); each is
``target += h C (K^T tanh(K source + b))``. On one rank, per half-step:

1. post the gather of ``source``'s boundary rows; compute ``K_local source`` meanwhile;
   wait; add ``K_halo halo`` (PETSc's ``MatMult_MPIAIJ`` pattern);
2. ``s = tanh(.)``; compute the neighbours' contributions ``K_halo^T s`` first and post
   them (scatter-add); compute ``K_local^T s`` meanwhile; wait; add what arrived;
3. update ``target``.

The backward is the exact discrete adjoint, run the same way: the gather of the target's
gradient overlaps ``K_local gz``, and the scatter-add of the source's halo gradient overlaps
the weight-gradient products (the bulk of the backward). One :class:`ShardedStack` call
runs every layer, so there is no autograd graph per layer and no per-message Python beyond
posting and waiting.

``backprop="reversible"`` keeps no per-layer state: the backward rebuilds each half-step's
input by undoing it (``target -= h C z``, exact in exact arithmetic for invertible layouts),
sending the rebuilt values in the same messages as the adjoint's, so the number of exchanges
per layer is unchanged. Optional anchors (every ``anchor_every`` layers) bound float drift.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..models.hamiltonian import AgentLayout, HalfStep


@dataclass
class Coupling:
    """``C`` of a half-step on a field: a scalar (``-1``, ``+1``) or a signed permutation of rows."""

    scale: float
    perm: Tensor | None = None  # C x = x[perm] * sign
    sign: Tensor | None = None  # (F, 1)
    inv: Tensor | None = None  # C^T y = (y * sign)[inv]

    def apply(self, z: Tensor) -> Tensor:
        return z if self.perm is None else z.index_select(0, self.perm).mul_(self.sign)

    def transpose(self, g: Tensor, out: Tensor, h: float) -> Tensor:
        """``out = h C^T g``."""
        if self.perm is None:
            return torch.mul(g, h * self.scale, out=out)
        return torch.mul(torch.mul(g, self.sign).index_select(0, self.inv), h, out=out)


@dataclass
class StackPlan:
    """Everything fixed about one rank's stack: layout, step, sizes, kernels, bias rows, exchanges."""

    layout: AgentLayout
    h: float
    layers: int
    F: int
    E: int
    kernels: dict  # matrix -> kernel
    n_classes: dict  # matrix or bias -> number of class tensors
    bias_rows: dict  # bias -> [(flat row indices, class tensor shape)], one per class
    couplings: list  # per half-step: Coupling
    ex: object = None  # Exchanger, or None for a rank without neighbours
    backprop: str = "autograd"
    anchor_every: int = 0

    def split(self, params: tuple[Tensor, ...]) -> tuple[list, list]:
        """The flat parameter tuple as per-half-step (matrix class tensors, bias class tensors)."""
        mats, biases, at = [], [], 0
        for hs in self.layout.half_steps:
            n = self.n_classes[hs.matrix]
            mats.append(list(params[at:at + n]))
            at += n
            n = self.n_classes[hs.bias]
            biases.append(list(params[at:at + n]))
            at += n
        return mats, biases

    def bias(self, k: int, Ws: list[Tensor]) -> Tensor:
        """Half-step ``k``'s bias for every layer, ``(layers, F)``."""
        b = Ws[0].new_zeros(self.layers, self.F)
        for W, (rows, _) in zip(Ws, self.bias_rows[self.layout.half_steps[k].bias]):
            b.index_copy_(1, rows, W.reshape(self.layers, -1))
        return b

    def bias_grad(self, k: int, gb: Tensor) -> list[Tensor]:
        return [gb.index_select(1, rows).view(shape) for rows, shape in self.bias_rows[self.layout.half_steps[k].bias]]


def _names(hs: HalfStep) -> tuple[str, str]:
    return f"gather_{hs.source}", f"scatter_{hs.source}"


class ShardedStack(torch.autograd.Function):
    """``(fields..., params...) -> final fields``; see the module docstring."""

    @staticmethod
    def forward(ctx, plan: StackPlan, n_fields: int, *tensors):
        fields, params = tensors[:n_fields], tensors[n_fields:]
        lay, F, E, L = plan.layout, plan.F, plan.E, plan.layers
        names = lay.field_names
        B = fields[0].shape[1]
        grad = any(ctx.needs_input_grad)  # (forward itself runs with grad mode off)
        save = grad and plan.backprop == "autograd"
        mats, bias_ws = plan.split(params)
        K = [plan.kernels[hs.matrix].begin(Ws) for hs, Ws in zip(lay.half_steps, mats)]
        b = [plan.bias(k, Ws) for k, Ws in enumerate(bias_ws)]
        updates = {f: sum(1 for hs in lay.half_steps if hs.target == f) for f in names}
        store = {f: x.new_empty((1 + L * updates[f]) if save else 1, E, B) for f, x in zip(names, fields)}
        for f, x in zip(names, fields):
            store[f][0, :F] = x
        cur = {f: 0 for f in names}
        S = fields[0].new_empty(L, len(lay.half_steps), F, B) if save else fields[0].new_empty(1, 1, F, B)
        U, Z = fields[0].new_empty(F, B), fields[0].new_empty(E, B)
        versions, anchors = [], {}
        for j in range(L):
            if grad and plan.anchor_every and j and j % plan.anchor_every == 0 and plan.backprop == "reversible":
                anchors[j] = {f: store[f][cur[f], :F].clone() for f in names}
            row = []
            for k, hs in enumerate(lay.half_steps):
                X = store[hs.source][cur[hs.source]]
                row.append(cur[hs.source])
                s = S[j, k] if save else S[0, 0]
                _half_forward(plan, K[k], hs, k, j, b[k][j], X, U, s, Z)
                T = store[hs.target]
                new = cur[hs.target] + 1 if save else cur[hs.target]
                c = plan.couplings[k]
                torch.add(T[cur[hs.target], :F], c.apply(Z[:F]), alpha=plan.h * c.scale, out=T[new, :F])
                cur[hs.target] = new
            versions.append(row)
        outs = tuple(store[f][cur[f], :F].clone() for f in names)
        ctx.plan, ctx.n_fields = plan, n_fields
        if save:
            ctx.save_for_backward(*params, S, *[store[f] for f in names])
            ctx.versions = versions
        elif grad:  # reversible: keep only the outputs (and anchors)
            ctx.save_for_backward(*params, *outs)
            ctx.anchors = anchors
        return outs

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        plan = ctx.plan
        lay, F, E, L = plan.layout, plan.F, plan.E, plan.layers
        names = lay.field_names
        saved = ctx.saved_tensors
        n_p = len(saved) - (1 + len(names) if plan.backprop == "autograd" else len(names))
        params = saved[:n_p]
        mats, bias_ws = plan.split(params)
        K = [plan.kernels[hs.matrix].begin(Ws) for hs, Ws in zip(lay.half_steps, mats)]
        G = [plan.kernels[hs.matrix].grad_buffers(Ws) for hs, Ws in zip(lay.half_steps, mats)]
        like = saved[n_p]
        B = grads[0].shape[1] if grads[0] is not None else saved[-1].shape[-1]
        g = {f: (gr.clone() if gr is not None else like.new_zeros(F, B)) for f, gr in zip(names, grads)}
        gb = [like.new_zeros(L, F) for _ in lay.half_steps]
        GZ, GX, GU = like.new_empty(E, B), like.new_empty(E, B), like.new_empty(F, B)
        if plan.backprop == "autograd":
            S = saved[n_p]
            store = dict(zip(names, saved[n_p + 1:]))
            for j in reversed(range(L)):
                for k in reversed(range(len(lay.half_steps))):
                    hs = lay.half_steps[k]
                    X = store[hs.source][ctx.versions[j][k]]
                    _half_backward(plan, K[k], G[k], hs, k, j, g, X, S[j, k], GZ, GX, GU, gb[k])
        else:
            b = [plan.bias(k, Ws) for k, Ws in enumerate(bias_ws)]
            cur = {f: like.new_empty(E, B) for f in names}
            for f, y in zip(names, saved[n_p:]):
                cur[f][:F] = y
            S, U, Z = like.new_empty(F, B), like.new_empty(F, B), like.new_empty(E, B)
            for j in reversed(range(L)):
                for k in reversed(range(len(lay.half_steps))):
                    hs = lay.half_steps[k]
                    _half_reverse(plan, K[k], G[k], hs, k, j, b[k][j], g, cur, S, U, Z, GZ, GX, GU, gb[k])
                if j in ctx.anchors:  # drift stops here: continue from the stored state
                    for f in names:
                        cur[f][:F] = ctx.anchors[j][f]
        grads_out = []
        for k, hs in enumerate(lay.half_steps):
            grads_out += plan.kernels[hs.matrix].end_grad(G[k])
            grads_out += plan.bias_grad(k, gb[k])
        return (None, None, *[g[f] for f in names], *grads_out)


def _half_forward(plan: StackPlan, K, hs: HalfStep, k: int, j: int, bias: Tensor, X: Tensor, U: Tensor,
                  s: Tensor, Z: Tensor) -> None:
    """``s = tanh(K X + b)`` on my rows, ``Z[:F] = (K^T s)`` for my agents including what the
    neighbours send (``Z[F:]`` holds what I sent them)."""
    kern, ex, F = plan.kernels[hs.matrix], plan.ex, plan.F
    g_op, s_op = _names(hs)
    pend = ex.start_gather([X[:F]], [X[F:]], "forward", j, g_op) if ex is not None else None
    U.copy_(bias.unsqueeze(1).expand_as(U))
    kern.mv(K, j, X, U, "local")
    if pend is not None:
        ex.finish_gather(pend)
        kern.mv(K, j, X, U, "halo")
    torch.tanh(U, out=s)
    if ex is not None:
        kern.tmv(K, j, s, Z, "halo")
        pend = ex.start_scatter([Z[F:]], "forward", j, s_op)
    kern.tmv(K, j, s, Z, "local")
    if ex is not None:
        ex.finish_scatter(pend, [Z[:F]])


def _half_backward(plan: StackPlan, K, G, hs: HalfStep, k: int, j: int, g: dict, X: Tensor, s: Tensor,
                   GZ: Tensor, GX: Tensor, GU: Tensor, gb: Tensor) -> None:
    """Adjoint of one half-step: ``g[source] += dL/dsource``, weight and bias gradients."""
    kern, ex, F = plan.kernels[hs.matrix], plan.ex, plan.F
    g_op, s_op = _names(hs)
    plan.couplings[k].transpose(g[hs.target], GZ[:F], plan.h)  # dL/dz = h C^T dL/dtarget
    pend = ex.start_gather([GZ[:F]], [GZ[F:]], "backward", j, s_op) if ex is not None else None
    GU.zero_()
    kern.mv(K, j, GZ, GU, "local")
    if pend is not None:
        ex.finish_gather(pend)
        kern.mv(K, j, GZ, GU, "halo")
    GU.mul_(1 - s * s)  # dL/du
    if ex is not None:
        kern.tmv(K, j, GU, GX, "halo")
        pend = ex.start_scatter([GX[F:]], "backward", j, g_op)
    kern.tmv(K, j, GU, GX, "local")
    kern.grad(K, G, j, GU, X, s, GZ)  # overlaps the scatter-add in flight
    torch.sum(GU, 1, out=gb[j])
    if ex is not None:
        ex.finish_scatter(pend, [GX[:F]])
    g[hs.source].add_(GX[:F])


def _half_reverse(plan: StackPlan, K, G, hs: HalfStep, k: int, j: int, bias: Tensor, g: dict, cur: dict,
                  S: Tensor, U: Tensor, Z: Tensor, GZ: Tensor, GX: Tensor, GU: Tensor, gb: Tensor) -> None:
    """Undo one half-step (rebuilding ``target`` before it) and run its adjoint; the rebuild's
    messages travel with the adjoint's (one gather and one scatter-add, each two tensors deep)."""
    kern, ex, F = plan.kernels[hs.matrix], plan.ex, plan.F
    g_op, s_op = _names(hs)
    X = cur[hs.source]
    c = plan.couplings[k]
    c.transpose(g[hs.target], GZ[:F], plan.h)
    pend = ex.start_gather([X[:F], GZ[:F]], [X[F:], GZ[F:]], "backward", j, g_op) if ex is not None else None
    U.copy_(bias.unsqueeze(1).expand_as(U))
    kern.mv(K, j, X, U, "local")
    GU.zero_()
    kern.mv(K, j, GZ, GU, "local")
    if pend is not None:
        ex.finish_gather(pend)
        kern.mv(K, j, X, U, "halo")
        kern.mv(K, j, GZ, GU, "halo")
    torch.tanh(U, out=S)
    GU.mul_(1 - S * S)
    if ex is not None:
        kern.tmv(K, j, S, Z, "halo")
        kern.tmv(K, j, GU, GX, "halo")
        pend = ex.start_scatter([Z[F:], GX[F:]], "backward", j, s_op)
    kern.tmv(K, j, S, Z, "local")
    kern.tmv(K, j, GU, GX, "local")
    kern.grad(K, G, j, GU, X, S, GZ)
    torch.sum(GU, 1, out=gb[j])
    if ex is not None:
        ex.finish_scatter(pend, [Z[:F], GX[:F]])
    T = cur[hs.target]
    T[:F].sub_(c.apply(Z[:F]), alpha=plan.h * c.scale)  # the target before this half-step
    g[hs.source].add_(GX[:F])
