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
posting and waiting. A rank without neighbours and with assembled local matrices takes a
shorter path: ``C K^T`` folded into one matrix per layer, weight gradients formed for all
layers at once after the backward (as the dense model's fused stacks do).

``backprop="reversible"`` keeps no per-layer state: the backward rebuilds each half-step's
input by undoing it (``target -= h C z``), sending the rebuilt values in the same messages as
the adjoint's, so the number of exchanges per layer is unchanged. With
``reversible_state="fixed"`` (the default) the fields are int64 fixed point: every increment
is computed in the run's dtype by the same calls in both directions (the halo carries the
dequantised values each side uses) and added or subtracted as an integer, so every rebuilt
state is bit for bit the forward's; with ``"float"`` the rebuild is float arithmetic and
optional anchors (every ``anchor_every`` layers) bound its drift. Either way the backward
compares what it rebuilt with the stored input (and anchors) in the plan's certificate.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..models import _fused
from ..models.hamiltonian import AgentLayout, HalfStep
from .kernels import DenseKernel


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

    def move(self, fn) -> None:
        if self.perm is not None:
            self.perm, self.sign, self.inv = fn(self.perm), fn(self.sign), fn(self.inv)

    def fold(self, Kt: Tensor) -> Tensor:
        """``C K^T`` for every layer (``Kt``: ``(L, F, F)``)."""
        if self.perm is None:
            return Kt * self.scale
        return Kt.index_select(1, self.perm) * self.sign.unsqueeze(0)



class Workspace:
    """Big buffers kept from one pass to the next: a training step's activations (hundreds of MiB
    on a large rank) would otherwise come back as fresh pages every step, and zero-filling them
    costs more than the arithmetic. A buffer is handed out only when nobody holds it: a forward
    takes its buffers and the backward that consumed them gives them back (a forward whose
    backward never runs simply leaves them to the garbage collector)."""

    def __init__(self, keep: int = 16):
        self.free: list[Tensor] = []
        self.keep = keep

    def take(self, shape, like: Tensor) -> Tensor:
        shape = tuple(shape)
        for i, t in enumerate(self.free):
            if t.shape == shape and t.dtype == like.dtype and t.device == like.device:
                return self.free.pop(i)
        # a pass of another shape (evaluation after training, a last short batch): what was kept
        # for the old shapes goes, so the workspace never holds two passes' buffers
        self.free = [t for t in self.free if t.shape[-1] == shape[-1] and t.dtype == like.dtype]
        return like.new_empty(shape)

    def give(self, *ts: Tensor) -> None:
        self.free = (list(ts) + self.free)[:self.keep]


@dataclass
class StackPlan:
    """Everything fixed about one rank's stack: layout, step, sizes, kernels, bias rows, exchanges."""

    layout: AgentLayout
    h: float
    layers: int
    F: int
    E: int
    kernels: dict  # matrix -> kernel
    n_classes: dict  # matrix or bias -> number of parameter tensors (a bias: one (layers, F) tensor)
    couplings: list  # per half-step: Coupling
    ex: object = None  # Exchanger, or None for a rank without neighbours
    backprop: str = "autograd"
    anchor_every: int = 0
    reversible_state: str = "fixed"  # reversible: fixed (int64 fixed point, exact) or float
    fraction_bits: int | None = None  # fixed: the grid 2^-F (None: the dtype's default)
    cert: _fused.Certificate | None = None  # reversible: what the last backward's rebuild found
    rank: int = 0  # (messages)
    ws: Workspace = field(default_factory=Workspace)

    @property
    def exact(self) -> bool:
        return self.backprop == "reversible" and self.reversible_state == "fixed"

    def move(self, fn) -> None:
        """Move every tensor of the plan (``fn`` as in ``Module._apply``: device and float dtype)."""
        for k in self.kernels.values():
            k.move(fn)
        for c in self.couplings:
            c.move(fn)

    @property
    def local_dense(self) -> bool:
        """No exchanges and assembled matrices: the short path (not for exact reversible steps, whose
        increments must come from the general path's calls in both directions)."""
        return self.ex is None and not self.exact and all(isinstance(k, DenseKernel) for k in self.kernels.values())

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



class _Pass:
    """One forward or backward pass's prepared operands: kernel states, bias columns per layer,
    and on the short path ``C K^T`` per layer."""

    def __init__(self, plan: StackPlan, params, with_bias: bool = True):
        mats, bias_ws = plan.split(params)
        self.kern = [plan.kernels[hs.matrix] for hs in plan.layout.half_steps]
        self.st = [k.prepare(Ws) for k, Ws in zip(self.kern, mats)]
        self.mats = mats
        self.bcols = [list(Ws[0].unsqueeze(2).unbind(0)) for Ws in bias_ws] if with_bias else None
        self.akt = None
        if plan.local_dense:  # per layer: K^T, and C K^T (a scalar C stays in the BLAS call's alpha)
            self.kt = [list(st.K.transpose(1, 2).unbind(0)) for st in self.st]
            self.akt = [kt if c.perm is None else list(c.fold(st.K.transpose(1, 2)).unbind(0))
                        for kt, c, st in zip(self.kt, plan.couplings, self.st)]
            self.alpha = [plan.h * c.scale if c.perm is None else plan.h for c in plan.couplings]


def _ops(hs: HalfStep) -> tuple[str, str]:
    return f"gather_{hs.source}", f"scatter_{hs.source}"


class ShardedStack(torch.autograd.Function):
    """``(fields..., params...) -> final fields``; see the module docstring."""

    @staticmethod
    def forward(ctx, plan: StackPlan, n_fields: int, *tensors):
        fields, params = tensors[:n_fields], tensors[n_fields:]
        lay, F, E, L, h = plan.layout, plan.F, plan.E, plan.layers, plan.h
        names, steps = lay.field_names, lay.half_steps
        B = fields[0].shape[1]
        grad = any(ctx.needs_input_grad)  # (forward itself runs with grad mode off)
        save = grad and plan.backprop == "autograd"
        ps = _Pass(plan, params)
        updates = {f: sum(1 for hs in steps if hs.target == f) for f in names}
        ws = plan.ws
        store = {f: ws.take(((1 + L * updates[f]) if save else 1, E, B), x) for f, x in zip(names, fields)}
        fx = _Fixed(plan, fields[0].dtype) if plan.exact and grad else None
        ints = {}
        for f, x in zip(names, fields):
            if fx is not None:  # the state in fixed point; the fields hold its dequantised values
                ints[f] = fx.quantise(x, "the input", 0)
                fx.dequantise(ints[f], store[f][0, :F])
            else:
                store[f][0, :F] = x
        cur = {f: 0 for f in names}
        S = ws.take((L if save else 1, len(steps), F, B), fields[0])
        Sv = [list(r.unbind(0)) for r in S.unbind(0)]
        Z = ws.take((E, B), fields[0])
        # exact: the tanh buffer as the backward's, (F, B) on its own: the BLAS library's results can
        # depend on where its output starts in memory, and the increments must be bit for bit equal
        s_fixed = ws.take((F, B), fields[0]) if fx is not None else None
        ext = {f: list(store[f].unbind(0)) for f in names}  # views, made once: the loop only indexes lists
        loc = {f: list(store[f][:, :F].unbind(0)) for f in names}
        versions, anchors = [], {}
        start = {f: t.clone() for f, t in ints.items()}  # the input, for the exact certificate
        short = ps.akt is not None
        if grad and plan.backprop == "reversible" and fx is None:
            anchors[0] = {f: x.detach().clone() for f, x in zip(names, fields)}  # the certificate's reference
        for j in range(L):
            if fx is None and grad and plan.backprop == "reversible" and plan.anchor_every and j and \
                    j % plan.anchor_every == 0:
                anchors[j] = {f: loc[f][cur[f]].clone() for f in names}
            row = []
            s_row = Sv[j if save else 0]
            for k, hs in enumerate(steps):
                src, tgt = hs.source, hs.target
                row.append(cur[src])
                s = s_row[k] if fx is None else s_fixed
                old, new = cur[tgt], cur[tgt] + (1 if save else 0)
                if short:  # three BLAS calls
                    _fused.tanh_(torch.addmm(ps.bcols[k][j], ps.st[k].loc[j], loc[src][cur[src]], out=s))
                    torch.addmm(loc[tgt][old], ps.akt[k][j], s, alpha=ps.alpha[k], out=loc[tgt][new])
                else:
                    _half_forward(plan, ps, k, j, ext[src][cur[src]], s, Z)
                    c = plan.couplings[k]
                    if fx is not None:
                        fx.add(ints[tgt], fx.increment(c, Z[:F], h), loc[tgt][new], j, tgt)
                        if plan.cert is not None and plan.cert.states is not None:  # tests
                            plan.cert.keep("forward", *[ints[f] for f in names])
                    else:
                        torch.add(loc[tgt][old], c.apply(Z[:F]), alpha=h * c.scale, out=loc[tgt][new])
                cur[tgt] = new
            versions.append(row)
        outs = tuple(store[f][cur[f], :F].clone() for f in names)
        ws.give(Z, *([s_fixed] if s_fixed is not None else []))
        if not save:
            ws.give(S, *store.values())
        ctx.plan = plan
        ctx.prepared = ps if save and short else None  # the short backward reuses the assembled matrices
        if save:
            ctx.save_for_backward(*params, S, *[store[f] for f in names])
            ctx.versions = versions
        elif grad:  # reversible: keep only the outputs (and anchors, or the fixed-point states)
            ctx.save_for_backward(*params, *outs)
            ctx.anchors = anchors
            ctx.ints = (ints, start) if fx is not None else None
        return outs

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        plan = ctx.plan
        lay, F = plan.layout, plan.F
        names = lay.field_names
        saved = ctx.saved_tensors
        n_p = len(saved) - (1 + len(names) if plan.backprop == "autograd" else len(names))
        params, rest = saved[:n_p], saved[n_p:]
        like = rest[0]
        B = rest[-1].shape[-1]
        g = {f: (gr.clone() if gr is not None else like.new_zeros(F, B)) for f, gr in zip(names, grads)}
        if plan.backprop == "reversible":
            G, gb = _backward_reversible(plan, ctx.anchors, params, rest, g, ctx.ints)
        elif plan.local_dense:
            G, gb = _backward_local(plan, ctx.versions, ctx.prepared, rest[0], dict(zip(names, rest[1:])), g)
        else:
            G, gb = _backward_general(plan, ctx.versions, params, rest[0], dict(zip(names, rest[1:])), g)
        if plan.backprop == "autograd":
            plan.ws.give(*rest)  # the forward's activations: free for the next step
        grads_out = []
        for k, hs in enumerate(lay.half_steps):
            grads_out += plan.kernels[hs.matrix].end_grad(G[k])
            grads_out.append(gb[k])
        return (None, None, *[g[f] for f in names], *grads_out)


# ---- one half-step, with exchanges ------------------------------------------------------------
def _half_forward(plan: StackPlan, ps: _Pass, k: int, j: int, X: Tensor, s: Tensor, Z: Tensor) -> None:
    """``s = tanh(K X + b)`` on my rows, ``Z[:F] = (K^T s)`` for my agents including what the
    neighbours send (``Z[F:]`` holds what I sent them)."""
    kern, st, ex, F = ps.kern[k], ps.st[k], plan.ex, plan.F
    g_op, s_op = _ops(plan.layout.half_steps[k])
    pend = ex.start_gather([X[:F]], [X[F:]], "forward", j, g_op) if ex is not None else None
    kern.mv_local(st, j, X, s, ps.bcols[k][j])
    if pend is not None:
        ex.finish_gather(pend)
        kern.mv_halo(st, j, X, s)
    _fused.tanh_(s)
    if ex is not None:
        kern.tmv_halo(st, j, s, Z)
        pend = ex.start_scatter([Z[F:]], "forward", j, s_op)
    kern.tmv_local(st, j, s, Z)
    if ex is not None:
        ex.finish_scatter(pend, [Z[:F]])


def _backward_general(plan: StackPlan, versions, params, S: Tensor, store: dict, g: dict):
    """The adjoint, half-step by half-step, with the exchanges overlapped."""
    lay, F, E, L, ex = plan.layout, plan.F, plan.E, plan.layers, plan.ex
    ps = _Pass(plan, params, with_bias=False)
    G = [kern.grad_buffers(st) for kern, st in zip(ps.kern, ps.st)]
    gb = [S.new_zeros(L, F) for _ in lay.half_steps]
    B, ws = S.shape[-1], plan.ws
    GZ, GX, GU, D = ws.take((E, B), S), ws.take((E, B), S), ws.take((F, B), S), ws.take((F, B), S)
    for j in reversed(range(L)):
        for k in reversed(range(len(lay.half_steps))):
            hs, kern, st = lay.half_steps[k], ps.kern[k], ps.st[k]
            X = store[hs.source][versions[j][k]]
            g_op, s_op = _ops(hs)
            plan.couplings[k].transpose(g[hs.target], GZ[:F], plan.h)  # dL/dz = h C^T dL/dtarget
            pend = ex.start_gather([GZ[:F]], [GZ[F:]], "backward", j, s_op) if ex is not None else None
            kern.mv_local(st, j, GZ, GU)
            if pend is not None:
                ex.finish_gather(pend)
                kern.mv_halo(st, j, GZ, GU)
            torch.mul(S[j, k], S[j, k], out=D)
            GU.addcmul_(GU, D, value=-1)  # dL/du = (1 - s^2) dL/ds
            if ex is not None:
                kern.tmv_halo(st, j, GU, GX)
                pend = ex.start_scatter([GX[F:]], "backward", j, g_op)
            kern.tmv_local(st, j, GU, GX)
            kern.grad(st, G[k], j, GU, X, S[j, k], GZ)  # overlaps the scatter-add in flight
            torch.sum(GU, 1, out=gb[k][j])
            if ex is not None:
                ex.finish_scatter(pend, [GX[:F]])
            g[hs.source].add_(GX[:F])
    ws.give(GZ, GX, GU, D)
    return G, gb


def _backward_local(plan: StackPlan, versions, ps: _Pass, S: Tensor, store: dict, g: dict):
    """The adjoint of a rank without neighbours: four BLAS-level calls per half-step, then
    every layer's weight and bias gradients in batched products."""
    lay, F, L, h = plan.layout, plan.F, plan.layers, plan.h
    nhs, B = len(lay.half_steps), S.shape[-1]
    GU, GZ = S.new_empty(L, nhs, F, B), S.new_empty(L, nhs, F, B)
    D = S.square().neg_().add_(1)
    GUv, GZv, Dv = ([list(r.unbind(0)) for r in t.unbind(0)] for t in (GU, GZ, D))
    order = [(k, hs.source, hs.target) for k, hs in reversed(list(enumerate(lay.half_steps)))]
    for j in reversed(range(L)):
        for k, src, tgt in order:
            gz, gu = GZv[j][k], GUv[j][k]
            plan.couplings[k].transpose(g[tgt], gz, h)  # dL/dz = h C^T dL/dtarget
            torch.mm(ps.st[k].loc[j], gz, out=gu).mul_(Dv[j][k])
            g[src].addmm_(ps.kt[k][j], gu)
    G, gb = [], []
    for k in range(nhs):
        v = [versions[j][k] for j in range(L)]
        consecutive = v == list(range(v[0], v[0] + L))
        X = store[lay.half_steps[k].source][v[0]:v[0] + L] if consecutive else store[lay.half_steps[k].source][v]
        W = torch.bmm(GU[:, k], X.transpose(1, 2))  # dK = GU X^T + S GZ^T, every layer at once
        G.append(W.baddbmm_(S[:, k], GZ[:, k].transpose(1, 2)))
        gb.append(GU[:, k].sum(-1))
    return G, gb


def _backward_reversible(plan: StackPlan, anchors: dict, params, outs, g: dict, fixed=None):
    """Rebuild every half-step's input by undoing it, and run its adjoint on the way; then check
    the rebuilt input (and anchors) against the stored ones (the certificate)."""
    lay, F, E, L = plan.layout, plan.F, plan.E, plan.layers
    names = lay.field_names
    ps = _Pass(plan, params)
    G = [kern.grad_buffers(st) for kern, st in zip(ps.kern, ps.st)]
    like, B = outs[0], outs[0].shape[1]
    gb = [like.new_zeros(L, F) for _ in lay.half_steps]
    ws = plan.ws
    cur = {f: ws.take((E, B), like) for f in names}
    fx = ints = None
    if fixed is not None:
        fx, ints = _Fixed(plan, like.dtype), {f: t.clone() for f, t in fixed[0].items()}
    for f, y in zip(names, outs):
        cur[f][:F] = y  # (exact: the dequantised final state, as the forward left it)
    S, Z = ws.take((F, B), like), ws.take((E, B), like)
    GZ, GX, GU, D = ws.take((E, B), like), ws.take((E, B), like), ws.take((F, B), like), ws.take((F, B), like)
    for j in reversed(range(L)):
        for k in reversed(range(len(lay.half_steps))):
            _half_reverse(plan, ps, G[k], k, j, g, cur, S, Z, GZ, GX, GU, D, gb[k], fx, ints)
        if j in anchors:  # drift stops here: continue from the stored state
            if plan.cert is not None:
                plan.cert.compare(j, [cur[f][:F] for f in names], [anchors[j][f] for f in names],
                                  f" on rank {plan.rank}")
            for f in names:
                cur[f][:F] = anchors[j][f]
    if fx is not None and plan.cert is not None:
        plan.cert.compare(0, [ints[f] for f in names], [fixed[1][f] for f in names], f" on rank {plan.rank}")
    ws.give(S, Z, GZ, GX, GU, D, *cur.values())
    return G, gb


class _Fixed:
    """The fixed-point state's arithmetic on one rank (see :class:`~dhdnn.models._fused.H2FixedStack`)."""

    def __init__(self, plan: StackPlan, dtype):
        self.bits = _fused.fraction_bits(dtype, plan.fraction_bits)
        self.scale, self.inv, self.rank = 2.0 ** self.bits, 2.0 ** -self.bits, plan.rank

    def quantise(self, x: Tensor, what: str, layer: int) -> Tensor:
        X = _fused.quantise(x, self.scale)
        _fused.check_range(X, layer, f"{what} on rank {self.rank}", self.bits)
        return X

    def dequantise(self, X: Tensor, out: Tensor) -> Tensor:
        return _fused.dequantise(X, self.inv, out)

    def increment(self, c: Coupling, z: Tensor, h: float) -> Tensor:
        """``h C z`` in grid units, in the run's dtype (scaled exactly by the power of two): the
        same expression in both directions."""
        return c.apply(z) * (h * c.scale * self.scale)

    def add(self, X: Tensor, delta: Tensor, out: Tensor, layer: int, field: str, sign: int = 1,
            check: bool = True) -> None:
        """``X += sign * round(delta)`` on the grid (``delta``: grid units, rounded in place), then
        ``out`` = its dequantised values. ``check``: stop when ``X`` left the range (an increment
        outside int64 converts to its most negative value, which the check sees too); the
        backward's rebuilt states are the forward's, checked then."""
        d = delta.round_().to(torch.int64)
        X.add_(d) if sign > 0 else X.sub_(d)
        if check:
            _fused.check_range(X, layer, f"{field} on rank {self.rank}", self.bits)
        self.dequantise(X, out)


def _half_reverse(plan: StackPlan, ps: _Pass, G, k: int, j: int, g: dict, cur: dict, S: Tensor, Z: Tensor,
                  GZ: Tensor, GX: Tensor, GU: Tensor, D: Tensor, gb: Tensor, fx: _Fixed | None = None,
                  ints: dict | None = None) -> None:
    """Undo one half-step (rebuilding ``target`` before it) and run its adjoint; the rebuild's
    messages travel with the adjoint's (one gather and one scatter-add, each two tensors deep)."""
    hs, kern, st, ex, F = plan.layout.half_steps[k], ps.kern[k], ps.st[k], plan.ex, plan.F
    g_op, s_op = _ops(hs)
    X = cur[hs.source]
    c = plan.couplings[k]
    c.transpose(g[hs.target], GZ[:F], plan.h)
    pend = ex.start_gather([X[:F], GZ[:F]], [X[F:], GZ[F:]], "backward", j, g_op) if ex is not None else None
    kern.mv_local(st, j, X, S, ps.bcols[k][j])
    kern.mv_local(st, j, GZ, GU)
    if pend is not None:
        ex.finish_gather(pend)
        kern.mv_halo(st, j, X, S)
        kern.mv_halo(st, j, GZ, GU)
    _fused.tanh_(S)
    torch.mul(S, S, out=D)
    GU.addcmul_(GU, D, value=-1)  # (1 - s^2) dL/ds
    if ex is not None:
        kern.tmv_halo(st, j, S, Z)
        kern.tmv_halo(st, j, GU, GX)
        pend = ex.start_scatter([Z[F:], GX[F:]], "backward", j, s_op)
    kern.tmv_local(st, j, S, Z)
    kern.tmv_local(st, j, GU, GX)
    kern.grad(st, G, j, GU, X, S, GZ)
    torch.sum(GU, 1, out=gb[j])
    if ex is not None:
        ex.finish_scatter(pend, [Z[:F], GX[:F]])
    if fx is not None:  # exactly the integer the forward added
        if plan.cert is not None and plan.cert.states is not None:  # tests: the state this half-step made
            plan.cert.keep("rebuilt", *[ints[f] for f in plan.layout.field_names])
        fx.add(ints[hs.target], fx.increment(c, Z[:F], plan.h), cur[hs.target][:F], j, hs.target, sign=-1,
               check=False)
    else:
        cur[hs.target][:F].sub_(c.apply(Z[:F]), alpha=plan.h * c.scale)  # the target before this half-step
    g[hs.source].add_(GX[:F])
