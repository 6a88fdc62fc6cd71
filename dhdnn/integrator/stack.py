"""The one integrator: every H-DNN stack, forward and backward, written once.

A layer is its :class:`~.layer.AgentLayout`'s half-steps, ``target += h C A^T tanh(K source + b)``,
on feature-major fields (``(rows, batch)``; a rank's fields carry its halo rows below its own).
Three independent choices make a stack (a :class:`Plan`): the **coupling** (``kernels``, ``ex``:
assembled matrices, or a rank's block-sparse rows with their halo exchange; one process is the
one-rank case), the **carrier** (``carriers.py``: float, or fixed point for exact reversible
backprop) and what the forward **keeps** (``every`` state, ``anchors`` every ``anchor_every``
layers, or ``nothing``: the backward rebuilds each state by undoing its half-step, the rebuild's
messages riding in the adjoint's).

On a rank with neighbours each product posts its exchange, computes the local part meanwhile and
adds the halo's after the wait (PETSc's ``MatMult_MPIAIJ`` pattern, the transpose too); the
backward is the exact discrete adjoint, overlapped the same way. One :class:`Integrate` call runs
every layer: no autograd graph per layer. Pure maths: exchanges arrive as an object with
``start_*``/``finish_*`` methods (``distributed.exchange.Exchanger``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .carriers import Certificate, FixedCarrier, FloatCarrier, fraction_bits
from .layer import AgentLayout, LocalMap

KEEPS = ("every", "anchors", "nothing")
CARRIERS = ("float", "fixed")
DEFER_BELOW = 1 << 16  # entries of a field below which a one-process backward batches its weight gradients
_MINUS_ONE = torch.tensor(-1.0)  # (a 0-dim tensor: adds in the other operand's dtype, on its device)


def _fast_cpu_tanh() -> bool:
    """Whether ``tanh_`` beats ``2 sigmoid(2u) - 1`` on this CPU: torch's CPU tanh is MKL's where torch
    has MKL, fast on Intel's CPUs only (one thread, 32 x 1024 float32: a Xeon 9.4 vs 16.1 us, an AMD
    EPYC 83 vs 16). Fixed per machine, never timed (a run's bits must not depend on a timing);
    ``DHDNN_TANH=native`` or ``sigmoid`` overrides."""
    env = os.environ.get("DHDNN_TANH")
    if env:
        if env not in ("native", "sigmoid"):
            raise ValueError(f"environment variable DHDNN_TANH: expected native or sigmoid, got {env!r}")
        return env == "native"
    try:
        with open("/proc/cpuinfo") as f:
            return "GenuineIntel" in f.read(4096) and torch.backends.mkl.is_available()
    except OSError:  # (not Linux: the form that is never far from the best)
        return False


NATIVE_TANH = _fast_cpu_tanh()  # on the CPU; other devices take the sigmoid form (one fused add)


class Workspace:
    """Big buffers kept from one pass to the next (a large rank's activations would otherwise be
    fresh pages every step, whose zero-filling costs more than the arithmetic). A forward takes
    its buffers and the backward that consumed them gives them back; a graph kept for a second
    backward across another forward finds them reused (autograd's version check raises).
    ``Workspace(0)`` keeps nothing."""

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
class Plan:
    """Everything fixed about one stack: its layer, step, sizes, coupling, carrier and keep."""

    layout: AgentLayout
    h: float
    layers: int
    F: int  # rows of a field (a rank's own)
    E: int  # with the halo below them
    kernels: list  # per half-step: the local products of its matrix (kernels.py)
    maps: list  # per half-step: C on the target's rows (LocalMap)
    n_tensors: list  # per half-step: how many parameter tensors its matrix has (then one bias tensor)
    ex: object = None  # exchanges with neighbour ranks (distributed.exchange.Exchanger), or None
    keep: str = "every"
    anchor_every: int = 0  # keep == "anchors": the state every k layers
    carrier: str = "float"
    fraction_bits: int | None = None  # fixed: the grid 2^-F (None: the dtype's default)
    cert: Certificate | None = None  # reversible: what the last backward's rebuild found
    where: str = ""  # in messages (" on rank 3")
    ws: Workspace = field(default_factory=Workspace)
    norms: list | None = None  # a list: the next backward appends ||dL/dY_j||^2 on these rows, j = L..0

    def __post_init__(self):
        if self.keep not in KEEPS or self.carrier not in CARRIERS:
            raise ValueError(f"keep, carrier: expected one of {KEEPS} and {CARRIERS}, got {self.keep}, {self.carrier}")

    def set_backprop(self, reversible: bool, anchor_every: int = 0, carrier: str = "fixed",
                     fraction_bits: int | None = None) -> None:
        """Autograd keeps every state (float carrier); reversible keeps anchors or nothing, on the
        fixed (exact) or float carrier, and certifies its rebuild."""
        self.carrier = carrier if reversible else "float"
        self.keep = "every" if not reversible else ("anchors" if anchor_every and carrier == "float" else "nothing")
        self.anchor_every, self.fraction_bits = anchor_every, fraction_bits
        self.cert = Certificate(exact=self.carrier == "fixed") if reversible else None

    def set_anchor_every(self, k: int) -> None:
        if self.keep != "every" and self.carrier == "float":
            self.anchor_every, self.keep = k, "anchors" if k else "nothing"

    def move(self, fn) -> None:
        """Move every tensor of the plan (``fn`` as in ``Module._apply``: device and float dtype)."""
        for k in self.kernels:
            k.move(fn)
        for c in self.maps:
            c.move(fn)

    def facts(self, exact: bool, device: str) -> tuple:
        """Per half-step, for a pass on the fixed (``exact``) or float carrier on ``device``'s type:
        whether it updates the state in the product's own call (no exchange, assembled matrices,
        float carrier, scalar map: ``direct``); whether the kernel folds the sigmoid form's factor 2
        into the product, and that factor (``mv_local``'s ``scale``); its exchanges' names; and
        whether tanh is torch's own (:data:`NATIVE_TANH`). Computed once per plan."""
        key = (exact, self.ex is None, self.E == self.F, device)
        if getattr(self, "_facts", (None,))[0] != key:
            steps, native = range(len(self.kernels)), NATIVE_TANH and device == "cpu"
            direct = [self.ex is None and not exact and self.kernels[k].direct and self.maps[k].scalar for k in steps]
            pre = [not native and self.kernels[k].scales_mv and self.E == self.F for k in steps]
            names = [(f"gather_{hs.source}", f"scatter_{hs.source}") for hs in self.layout.half_steps]
            self._facts = (key, (direct, pre, [2.0 if p else 1.0 for p in pre], names, native))
        return self._facts[1]


class _Operands:
    """One pass's prepared operands per half-step: kernel state, its adjoint, bias columns per
    layer; and what the plan says of it (direct, tanh's factor, the exchanges' names, tanh's form)."""

    def __init__(self, plan: Plan, params, exact: bool):
        self.st, self.adj, self.bias, at = [], [], [], 0
        for kern, n in zip(plan.kernels, plan.n_tensors):
            st = kern.prepare(params[at:at + n])
            self.st.append(st)
            self.adj.append(kern.adjoint(st))
            self.bias.append(params[at + n].unsqueeze(2).unbind(0))
            at += n + 1
        self.direct, self.prescaled, self.scale, self.names, self.native = plan.facts(exact, params[0].device.type)


def tanh_(s: Tensor, prescaled: bool, native: bool = False) -> Tensor:
    """``s`` holds ``u`` (``2u`` when ``prescaled``) -> ``tanh(u)`` in place: torch's (``native``), or
    ``2 sigmoid(2u) - 1`` (an absolute error below 2e-7 in float32, 1e-16 in float64; its
    derivative is still ``1 - tanh^2``)."""
    if native:
        return s.tanh_()
    if not prescaled:
        s.mul_(2)
    return torch.add(_MINUS_ONE, s.sigmoid_(), alpha=2, out=s)


class _Store:
    """One forward's buffers (from the workspace): every version of each field (keeping every
    state) or one, halo rows below a rank's own; the tanh outputs; a scratch ``Z``."""

    def __init__(self, plan: Plan, like: Tensor, every: bool):
        names, L, F, E, B, ws = plan.layout.field_names, plan.layers, plan.F, plan.E, like.shape[1], plan.ws
        self.plan, self.every = plan, every
        self.buf = {f: ws.take((1 + L * plan.layout.updates(f) if every else 1, E, B), like) for f in names}
        self.ext = {f: list(t.unbind(0)) for f, t in self.buf.items()}  # views, made once: the loop indexes lists
        self.loc = self.ext if E == F else {f: list(t[:, :F].unbind(0)) for f, t in self.buf.items()}
        # keeping nothing, one (F, B) tanh buffer on its own, as the backward's: the BLAS library's
        # results can depend on where its output starts in memory, and exact increments must not
        nhs = len(plan.layout.half_steps)
        self.S = ws.take((L, nhs, F, B) if every else (F, B), like)
        self.Sv = self.S.view(L * nhs, F, B).unbind(0) if every else None
        self.Z = ws.take((E, B), like)
        self.cur, self.versions, self.nhs = dict.fromkeys(names, 0), [], nhs
        self.ends = [(hs.source, hs.target) for hs in plan.layout.half_steps]

    def half(self, k: int, j: int):
        """Half-step ``k`` of layer ``j``: its source (with halo rows), tanh buffer, and the target
        before and after it; records which version of the source it read."""
        src, tgt = self.ends[k]
        cur = self.cur
        if k == 0:
            self.versions.append([])
        self.versions[j].append(cur[src])
        old = cur[tgt]
        cur[tgt] = new = old + self.every
        s = self.Sv[j * self.nhs + k] if self.every else self.S
        return self.ext[src][cur[src] if src != tgt else old], s, self.loc[tgt][old], self.loc[tgt][new]

    def now(self) -> dict[str, Tensor]:
        return {f: self.loc[f][i] for f, i in self.cur.items()}


class Integrate(torch.autograd.Function):
    """``(plan, transposed, Y, *params) -> Y_L``: ``Y`` is the state, its fields stacked
    ``(fields x F, B)`` (feature-major; ``transposed``: ``(B, fields x F)``, batch-major), ``Y_L``
    the final state in the same form; see the module docstring. ``params``: per half-step its
    matrix tensors, then its ``(layers, F)`` bias."""

    @staticmethod
    def forward(ctx, plan: Plan, transposed: bool, Y: Tensor, *params):
        ctx.plan, ctx.transposed = plan, transposed
        if Y.shape[0 if transposed else 1] == 0:  # a replica's empty share of a short last batch: every rank
            ctx.keep = "empty"                    # of its agent group has it, so none computes or sends
            ctx.save_for_backward(*params)
            return Y.clone()
        names = plan.layout.field_names
        fields = dict(zip(names, (Y.T if transposed else Y).chunk(len(names), 0)))  # (chunk: split, minus a wrapper)
        grad = any(ctx.needs_input_grad)  # (forward itself runs with grad mode off)
        keep = plan.keep if grad else "nothing"  # no gradient: in place, keep nothing
        like = fields[names[0]]
        carrier = _carrier(plan, Y.dtype) if grad else FloatCarrier()
        ops, st = _Operands(plan, params, carrier.exact), _Store(plan, like, keep == "every")
        carrier.begin(fields, st.now(), _bound(plan, ops, carrier), plan.layers * len(plan.kernels))
        # float reversible: the input (the certificate's reference), and every anchor_every-th state
        anchors = {0: {f: x.detach().clone() for f, x in fields.items()}} \
            if keep != "every" and plan.cert is not None and not carrier.exact else {}
        for j in range(plan.layers):
            if keep == "anchors" and j and j % plan.anchor_every == 0:
                anchors[j] = {f: x.clone() for f, x in st.now().items()}
            for k in range(len(plan.kernels)):
                _forward_half(plan, ops, st, carrier, k, j)
        out = torch.cat(list(st.now().values()), 0)
        outs = out.chunk(len(names), 0)
        plan.ws.give(st.Z)
        ctx.keep, ctx.ops = keep, ops
        if keep == "every":
            ctx.save_for_backward(*params, st.S, *st.buf.values())
            ctx.versions = st.versions
        else:
            plan.ws.give(st.S, *st.buf.values())
            if grad:  # reversible: keep only the outputs (and anchors, or the fixed-point states)
                ctx.save_for_backward(*params, *outs)
                ctx.anchors, ctx.carrier = anchors, carrier
        return out.T if transposed else out

    @staticmethod
    @once_differentiable
    def backward(ctx, gY):
        plan = ctx.plan
        if ctx.keep == "empty":  # zero gradients (they still join the replicas' sum)
            for _ in range(plan.layers + 1):
                _note(plan, {})
            return (None, None, gY.clone(), *(torch.zeros_like(p) for p in ctx.saved_tensors))
        names = plan.layout.field_names
        saved = ctx.saved_tensors
        n_p = sum(plan.n_tensors) + len(plan.kernels)
        # a copy (the backward adds into it in place) whose fields are contiguous row blocks
        gin = (gY.T if ctx.transposed else gY).clone(memory_format=torch.contiguous_format)
        g = dict(zip(names, gin.chunk(len(names), 0)))
        _note(plan, g)
        if ctx.keep == "every":
            S, store = saved[n_p], dict(zip(names, saved[n_p + 1:]))
            G, gb = _adjoint(plan, ctx.ops, ctx.versions, S, store, g)
            plan.ws.give(S, *store.values())  # the forward's activations: free for the next step
        else:
            G, gb = _reverse(plan, ctx.ops, saved[n_p:], ctx.anchors, ctx.carrier, g)
        out = []
        for k, kern in enumerate(plan.kernels):
            out += kern.end_grad(G[k])
            out.append(gb[k])
        return (None, None, gin.T if ctx.transposed else gin, *out)


def _note(plan: Plan, g: dict) -> None:
    """``train.grad_norm_every``: the squared norm of the state's gradient on this rank's rows."""
    if plan.norms is not None:
        plan.norms.append(sum(float(x.double().square().sum()) for x in g.values()))  # (0 for {})


def _carrier(plan: Plan, dtype):
    if plan.carrier == "float":
        return FloatCarrier()
    return FixedCarrier(fraction_bits(dtype, plan.fraction_bits), plan.where, plan.cert)


def _bound(plan: Plan, ops: _Operands, carrier) -> float | None:
    """How far every increment together can move a state (the weights' column sums; 1 % for the
    products' rounding), where the kernels know it; None otherwise."""
    if not carrier.exact or plan.ex is not None:
        return None
    sums = [kern.column_bound(st) for kern, st in zip(plan.kernels, ops.st)]
    return None if None in sums else sum(sums) * abs(plan.h) * 1.01


# ---- one half-step, with exchanges ------------------------------------------------------------
def _forward_half(plan: Plan, ops: _Operands, st: _Store, carrier, k: int, j: int) -> None:
    """Half-step ``k`` of layer ``j``: ``s = tanh(K X + b)`` on my rows, ``Z[:F] = A^T s`` with what
    the neighbours send (``Z[F:]`` holds what I send them), then the target's update."""
    X, s, old, new = st.half(k, j)
    kern, stk = plan.kernels[k], ops.st[k]
    if ops.direct[k]:  # three BLAS-level calls
        kern.mv_local(stk, j, X, s, ops.bias[k][j], ops.scale[k])
        tanh_(s, ops.prescaled[k], ops.native)
        kern.tmv_into(stk, j, s, old, new, plan.h * plan.maps[k].scale)
        return
    ex, F, Z, (g_op, s_op) = plan.ex, plan.F, st.Z, ops.names[k]
    pend = ex.start_gather([X[:F]], [X[F:]], "forward", j, g_op) if ex is not None else None
    kern.mv_local(stk, j, X, s, ops.bias[k][j], ops.scale[k])
    if pend is not None:
        ex.finish_gather(pend)
        kern.mv_halo(stk, j, X, s)
    tanh_(s, ops.prescaled[k], ops.native)
    if ex is not None:
        kern.tmv_halo(stk, j, s, Z)
        pend = ex.start_scatter([Z[F:]], "forward", j, s_op)
    kern.tmv_local(stk, j, s, Z)
    if ex is not None:
        ex.finish_scatter(pend, [Z[:F]])
    carrier.update(st.ends[k][1], old, new, Z[:F], plan.h, plan.maps[k], j)


def _adjoint(plan: Plan, ops: _Operands, versions, S: Tensor, store: dict, g: dict):
    """The adjoint from every kept state, half-step by half-step. Small fields of a process
    without exchanges on assembled matrices form every layer's weight gradients at the end, in
    batched products (``defer``)."""
    steps, F, E, L, ws = plan.layout.half_steps, plan.F, plan.E, plan.layers, plan.ws
    nhs, B = len(steps), S.shape[-1]
    defer = all(ops.direct) and F * B < DEFER_BELOW
    G = [kern.grad_buffers(st) for kern, st in zip(plan.kernels, ops.st)]
    if defer:  # per half-step k, every layer's dL/du and dL/dz side by side (batched weight gradients)
        GU, GZ, D = S.new_empty(nhs, L, F, B), S.new_empty(nhs, L, F, B), S.square().neg_().add_(1)
        GUv, GZv, Dv = (t.view(-1, F, B).unbind(0) for t in (GU, GZ, D))  # views, made once
        sc, gb = {"GX": None}, [None] * nhs
    else:
        sc = {"gz": ws.take((E, B), S), "GX": ws.take((E, B), S), "gu": ws.take((F, B), S), "D": ws.take((F, B), S)}
        gb = [S.new_empty(L, F) for _ in steps]
    for j in reversed(range(L)):
        for k in reversed(range(nhs)):
            if defer:  # this layer's slots, and 1 - s^2 of every layer computed at once; no X, s needed
                sc.update(gz=GZv[k * L + j], gu=GUv[k * L + j], D=Dv[j * nhs + k])
                X = s = None
            else:
                X, s = store[steps[k].source][versions[j][k]], S[j, k]
            _adjoint_half(plan, ops, sc, g, None if defer else G[k], gb[k], X, s, k, j, squared=defer)
        _note(plan, g)
    if not defer:
        ws.give(*sc.values())
        return G, gb
    for k, hs in enumerate(steps):  # dK = GU X^T, dA = S GZ^T, every layer at once
        v = [versions[j][k] for j in range(L)]
        X = store[hs.source]
        X = X[v[0]:v[0] + L] if v == list(range(v[0], v[0] + L)) else X[v]
        plan.kernels[k].grad_layers(ops.st[k], G[k], GU[k], X, S[:, k], GZ[k])
    return G, list(GU.sum(-1).unbind(0))


def _adjoint_half(plan: Plan, ops: _Operands, sc: dict, g: dict, G, gb, X: Tensor, s: Tensor, k: int, j: int,
                  squared: bool = False) -> None:
    """The adjoint of half-step ``k`` of layer ``j`` from its kept source ``X`` and tanh ``s``:
    ``dL/dsource += K^T ((1 - s^2) A h C^T dL/dtarget)``, exchanges overlapped; the weight
    gradients (unless ``G`` is None: formed later) fill the scatter-add's wait. ``squared``:
    ``sc["D"]`` already holds ``1 - s^2``."""
    hs, kern, st, sa, ex, F = plan.layout.half_steps[k], plan.kernels[k], ops.st[k], ops.adj[k], plan.ex, plan.F
    gz, gu, GX, D = sc["gz"], sc["gu"], sc["GX"], sc["D"]
    g_op, s_op = ops.names[k]
    plan.maps[k].transpose(g[hs.target], gz[:F], plan.h)  # dL/dz = h C^T dL/dtarget
    pend = ex.start_gather([gz[:F]], [gz[F:]], "backward", j, s_op) if ex is not None else None
    kern.mv_local(sa, j, gz, gu)  # dL/ds = A dL/dz
    if pend is not None:
        ex.finish_gather(pend)
        kern.mv_halo(sa, j, gz, gu)
    if squared:
        gu.mul_(D)
    else:
        torch.mul(s, s, out=D)
        gu.addcmul_(gu, D, value=-1)  # dL/du = (1 - s^2) dL/ds
    direct = ops.direct[k]
    if direct:
        kern.tmv_into(sa, j, gu, g[hs.source], g[hs.source])  # dL/dsource += K^T dL/du
    else:
        if ex is not None:
            kern.tmv_halo(sa, j, gu, GX)
            pend = ex.start_scatter([GX[F:]], "backward", j, g_op)
        kern.tmv_local(sa, j, gu, GX)
    if G is not None:
        kern.grad(st, G, j, gu, X, s, gz)  # overlaps the scatter-add in flight
        torch.sum(gu, 1, out=gb[j])
    if not direct:
        if ex is not None:
            ex.finish_scatter(pend, [GX[:F]])
        g[hs.source].add_(GX[:F])


def _reverse(plan: Plan, ops: _Operands, outs, anchors: dict, carrier, g: dict):
    """Rebuild every half-step's input by undoing it, and run its adjoint on the way; then check
    the rebuilt input (and anchors) against the stored ones (the certificate)."""
    names, F, E, L, ws = plan.layout.field_names, plan.F, plan.E, plan.layers, plan.ws
    like, B = outs[0], outs[0].shape[1]
    G = [kern.grad_buffers(st) for kern, st in zip(plan.kernels, ops.st)]
    gb = [like.new_empty(L, F) for _ in plan.kernels]
    cur = {f: ws.take((E, B), like) for f in names}
    for f, y in zip(names, outs):
        cur[f][:F] = y  # (exact: the dequantised final state, as the forward left it)
    sc = {"S": (F, B), "Z": (E, B), "GZ": (E, B), "GX": (E, B), "GU": (F, B), "D": (F, B)}
    sc = {k: ws.take(shape, like) for k, shape in sc.items()}
    for j in reversed(range(L)):
        for k in reversed(range(len(plan.kernels))):
            _reverse_half(plan, ops, sc, cur, g, G[k], gb[k], carrier, k, j)
        _note(plan, g)
        if j in anchors:  # drift stops here: continue from the stored state
            if plan.cert is not None:
                plan.cert.compare(j, [cur[f][:F] for f in names], [anchors[j][f] for f in names], plan.where)
            for f in names:
                cur[f][:F] = anchors[j][f]
    if carrier.exact and plan.cert is not None:
        plan.cert.compare(0, list(carrier.ints.values()), list(carrier.start.values()), plan.where)
    ws.give(*sc.values(), *cur.values())
    return G, gb


def _reverse_half(plan: Plan, ops: _Operands, sc: dict, cur: dict, g: dict, G, gb: Tensor, carrier, k: int,
                  j: int) -> None:
    """Undo half-step ``k`` of layer ``j`` (rebuilding its target) and run its adjoint: the
    rebuild's messages travel with the adjoint's (one gather and one scatter-add, each two
    tensors deep), so a layer needs no more exchanges than in the forward."""
    hs, kern, st, sa, ex, F = plan.layout.half_steps[k], plan.kernels[k], ops.st[k], ops.adj[k], plan.ex, plan.F
    S, Z, GZ, GX, GU, D = (sc[n] for n in ("S", "Z", "GZ", "GX", "GU", "D"))
    X = cur[hs.source]
    g_op, s_op = ops.names[k]
    plan.maps[k].transpose(g[hs.target], GZ[:F], plan.h)
    pend = ex.start_gather([X[:F], GZ[:F]], [X[F:], GZ[F:]], "backward", j, g_op) if ex is not None else None
    kern.mv_local(st, j, X, S, ops.bias[k][j], ops.scale[k])
    kern.mv_local(sa, j, GZ, GU)
    if pend is not None:
        ex.finish_gather(pend)
        kern.mv_halo(st, j, X, S)
        kern.mv_halo(sa, j, GZ, GU)
    tanh_(S, ops.prescaled[k], ops.native)
    torch.mul(S, S, out=D)
    GU.addcmul_(GU, D, value=-1)  # (1 - s^2) dL/ds
    if ex is not None:
        kern.tmv_halo(st, j, S, Z)
        kern.tmv_halo(sa, j, GU, GX)
        pend = ex.start_scatter([Z[F:], GX[F:]], "backward", j, s_op)
    kern.tmv_local(st, j, S, Z)
    if ops.direct[k]:  # dL/dsource += K^T dL/du in one call
        kern.tmv_into(sa, j, GU, g[hs.source], g[hs.source])
    else:
        kern.tmv_local(sa, j, GU, GX)
    kern.grad(st, G, j, GU, X, S, GZ)
    torch.sum(GU, 1, out=gb[j])
    if ex is not None:
        ex.finish_scatter(pend, [Z[:F], GX[:F]])
    carrier.undo(hs.target, cur[hs.target][:F], Z[:F], plan.h, plan.maps[k])  # the target before it
    if not ops.direct[k]:
        g[hs.source].add_(GX[:F])


def local_maps(layout: AgentLayout, folded: bool = True) -> list[LocalMap]:
    """The scalar maps of a one-process stack (``J1`` folded into its matrices by the model)."""
    return [LocalMap.of("+" if hs.map == "J1" and folded else hs.map) for hs in layout.half_steps]
