"""Fused layer stacks for H1 and H2 with hand-written adjoints.

At small widths the cost of a layer is per-operation overhead, not flops, so the
forward runs without building an autograd graph (one ``addmm`` + ``tanh`` per update,
writing into preallocated state buffers) and the backward is the discrete adjoint
recursion, with the parameter gradients formed afterwards in a few batched products.
Tests compare both against autograd through ``ODENet.step`` and ``gradcheck``.

Notation (row vectors, batch-first): one update is ``x' = x + c tanh(z K^T + b) A``
where ``A`` is ``K`` with the fixed skew factor folded in by the caller.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


class H1Stack(torch.autograd.Function):
    """``Y_{j+1} = Y_j + h tanh(Y_j K_j^T + b_j) A_j`` for ``j < L``; returns ``Y_L``."""

    @staticmethod
    def forward(ctx, y, K, A, b, h):
        L = K.shape[0]
        Y = y.new_empty(L + 1, *y.shape)
        T = y.new_empty(L, *y.shape)
        Y[0] = y
        Kt = K.transpose(1, 2)
        for j in range(L):
            torch.tanh(torch.addmm(b[j], Y[j], Kt[j]), out=T[j])
            torch.addmm(Y[j], T[j], A[j], alpha=h, out=Y[j + 1])
        ctx.save_for_backward(K, A, Y, T)
        ctx.h = h
        return Y[L].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        K, A, Y, T = ctx.saved_tensors
        h, L = ctx.h, K.shape[0]
        hAt = A.transpose(1, 2) * h
        D = 1 - T * T
        GY = g.new_empty(L + 1, *g.shape)
        GC = torch.empty_like(T)
        GY[L] = g
        for j in reversed(range(L)):
            torch.mul(torch.mm(GY[j + 1], hAt[j]), D[j], out=GC[j])
            torch.addmm(GY[j + 1], GC[j], K[j], out=GY[j])
        gK = torch.bmm(GC.transpose(1, 2), Y[:-1])
        gA = torch.bmm(T.transpose(1, 2), GY[1:]).mul_(h)
        return GY[0], gK, gA, GC.sum(1), None


class H2Stack(torch.autograd.Function):
    """Symplectic Euler on ``(p, q)``, per layer:

    ``S = tanh(q Kq^T + bq); p' = p - h S Aq; T = tanh(p' Kp^T + bp); q' = q + h T Ap``.
    """

    @staticmethod
    def forward(ctx, y, Kp, Ap, Kq, Aq, bp, bq, h):
        L, m = Kp.shape[0], Kp.shape[1]
        B = y.shape[0]
        P, Q = y.new_empty(L + 1, B, m), y.new_empty(L + 1, B, m)
        S, T = y.new_empty(L, B, m), y.new_empty(L, B, m)
        P[0], Q[0] = y[:, :m], y[:, m:]
        Kpt, Kqt = Kp.transpose(1, 2), Kq.transpose(1, 2)
        for j in range(L):
            torch.tanh(torch.addmm(bq[j], Q[j], Kqt[j]), out=S[j])
            torch.addmm(P[j], S[j], Aq[j], alpha=-h, out=P[j + 1])
            torch.tanh(torch.addmm(bp[j], P[j + 1], Kpt[j]), out=T[j])
            torch.addmm(Q[j], T[j], Ap[j], alpha=h, out=Q[j + 1])
        ctx.save_for_backward(Kp, Ap, Kq, Aq, P, Q, S, T)
        ctx.h = h
        return torch.cat([P[L], Q[L]], dim=1)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        Kp, Ap, Kq, Aq, P, Q, S, T = ctx.saved_tensors
        h, (L, m) = ctx.h, Kp.shape[:2]
        hApt, mhAqt = Ap.transpose(1, 2) * h, Aq.transpose(1, 2) * (-h)
        DT, DS = 1 - T * T, 1 - S * S
        GQ = g.new_empty(L + 1, g.shape[0], m)  # dloss/dq_j
        GPn = torch.empty_like(S)  # dloss/dp after the p-update of layer j
        GC, GA = torch.empty_like(T), torch.empty_like(S)
        GQ[L] = g[:, m:]
        gp = g[:, :m]
        for j in reversed(range(L)):
            torch.mul(torch.mm(GQ[j + 1], hApt[j]), DT[j], out=GC[j])
            gp = torch.addmm(gp, GC[j], Kp[j], out=GPn[j])
            torch.mul(torch.mm(gp, mhAqt[j]), DS[j], out=GA[j])
            torch.addmm(GQ[j + 1], GA[j], Kq[j], out=GQ[j])
        gKp = torch.bmm(GC.transpose(1, 2), P[1:])
        gAp = torch.bmm(T.transpose(1, 2), GQ[1:]).mul_(h)
        gKq = torch.bmm(GA.transpose(1, 2), Q[:-1])
        gAq = torch.bmm(S.transpose(1, 2), GPn).mul_(-h)
        gy = torch.cat([gp, GQ[0]], dim=1)
        return gy, gKp, gAp, gKq, gAq, GC.sum(1), GA.sum(1), None


class H2RevStack(torch.autograd.Function):
    """:class:`H2Stack` with reversible backprop: the forward keeps only the last state (and an
    anchor every ``anchor_every`` layers); the backward rebuilds each layer's input by undoing
    the layer, ``q_j = q_{j+1} - h T A_p`` then ``p_j = p_{j+1} + h S A_q``, and runs the same
    adjoint as :class:`H2Stack`. Activation memory is a few ``(B, m)`` buffers at any depth.
    The forward also keeps its input; the backward records in ``cert`` how far the rebuilt
    input (and every anchor, before it is restored) drifted from the stored state."""

    @staticmethod
    def forward(ctx, y, Kp, Ap, Kq, Aq, bp, bq, h, anchor_every, cert=None):
        ctx.shared = (Ap is Kp, Aq is Kq)  # X = I: one gradient buffer per matrix, not two
        L, m = Kp.shape[0], Kp.shape[1]
        P, Q = y[:, :m].clone(), y[:, m:].clone()
        S = torch.empty_like(P)
        Kpt, Kqt = Kp.transpose(1, 2), Kq.transpose(1, 2)
        anchors = {}
        for j in range(L):
            if anchor_every and j and j % anchor_every == 0:
                anchors[j] = (P.clone(), Q.clone())
            torch.tanh(torch.addmm(bq[j], Q, Kqt[j]), out=S)
            P.addmm_(S, Aq[j], alpha=-h)
            torch.tanh(torch.addmm(bp[j], P, Kpt[j]), out=S)
            Q.addmm_(S, Ap[j], alpha=h)
        ctx.save_for_backward(Kp, Ap, Kq, Aq, bp, bq, P, Q)
        ctx.h, ctx.anchors, ctx.cert = h, anchors, cert
        if cert is not None:
            anchors[0] = (y[:, :m].detach().clone(), y[:, m:].detach().clone())  # the certificate's reference
        return torch.cat([P, Q], dim=1)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        Kp, Ap, Kq, Aq, bp, bq, P, Q = ctx.saved_tensors
        h, (L, m) = ctx.h, Kp.shape[:2]
        P, Q = P.clone(), Q.clone()
        gp, gq = g[:, :m].clone(), g[:, m:].clone()
        gKp, gKq = torch.zeros_like(Kp), torch.zeros_like(Kq)
        gAp = gKp if ctx.shared[0] else torch.zeros_like(Ap)
        gAq = gKq if ctx.shared[1] else torch.zeros_like(Aq)
        gbp, gbq = torch.zeros_like(bp), torch.zeros_like(bq)
        Kpt, Kqt = Kp.transpose(1, 2), Kq.transpose(1, 2)
        for j in reversed(range(L)):
            T = torch.tanh(torch.addmm(bp[j], P, Kpt[j]))  # P = p_{j+1}
            Q.addmm_(T, Ap[j], alpha=-h)  # q_j
            gC = torch.mm(gq, Ap[j].T).mul_(h).mul_(1 - T * T)
            gKp[j].addmm_(gC.T, P)
            gAp[j].addmm_(T.T, gq, alpha=h)
            torch.sum(gC, 0, out=gbp[j])
            gp.addmm_(gC, Kp[j])
            S = torch.tanh(torch.addmm(bq[j], Q, Kqt[j]))  # Q = q_j
            P.addmm_(S, Aq[j], alpha=h)  # p_j
            gA = torch.mm(gp, Aq[j].T).mul_(-h).mul_(1 - S * S)
            gKq[j].addmm_(gA.T, Q)
            gAq[j].addmm_(S.T, gp, alpha=-h)
            torch.sum(gA, 0, out=gbq[j])
            gq.addmm_(gA, Kq[j])
            if j in ctx.anchors:  # drift stops here
                if ctx.cert is not None:
                    ctx.cert.compare(j, (P, Q), ctx.anchors[j])
                P.copy_(ctx.anchors[j][0])
                Q.copy_(ctx.anchors[j][1])
        return (torch.cat([gp, gq], dim=1), gKp, None if ctx.shared[0] else gAp, gKq, None if ctx.shared[1] else gAq,
                gbp, gbq, None, None, None)


def tanh_(x: torch.Tensor) -> torch.Tensor:
    """``tanh`` in place as ``2 sigmoid(2x) - 1``: the same function, computed from PyTorch's
    vectorised sigmoid, about 4x faster on CPU than its ``tanh`` (measured here: 0.21 ms against
    0.82 ms for 313,600 floats) at an absolute error below 2e-7 in float32 (1e-16 in float64). Its
    derivative is still ``1 - tanh^2`` exactly. Used where ``tanh`` runs over whole fields: the
    sharded stacks and the feature-major stacks of the image network."""
    return x.mul_(2).sigmoid_().mul_(2).sub_(1)


class H2StackFM(torch.autograd.Function):
    """:class:`H2Stack` on a feature-major state: ``Y`` is ``(2m, N)``, ``p`` its first ``m`` rows
    and ``q`` the rest, a column per sample, so every update is one ``(m, m) x (m, N)`` product
    streaming contiguous rows. This is the layout for very many small states (every pixel of an
    image batch: ``N`` in the tens of thousands, ``m`` of 4), where the batch-major products and
    their copies cost several times the arithmetic. Per layer: ``S = tanh(Kq q + bq);
    p' = p - h Aq^T S; T = tanh(Kp p' + bp); q' = q + h Ap^T T``.

    Element-wise passes over the state are most of the cost, so ``tanh`` is taken as
    ``2 sigma(2x) - 1`` with its factors folded into the small matrices: the forward computes
    ``sigma = sigmoid(2 Kq q + 2 bq)`` (one product, one pass) and ``p' = (p + h Aq^T 1) -
    2h Aq^T sigma``; the backward rebuilds ``tanh`` and ``1 - tanh^2 = 4 sigma (1 - sigma)``
    from the stored ``sigma``."""

    @staticmethod
    def forward(ctx, y, Kp, Ap, Kq, Aq, bp, bq, h):
        L, m = Kp.shape[0], Kp.shape[1]
        ctx.shared = (Ap is Kp, Aq is Kq)  # X = I: one gradient buffer per matrix, not two
        K2p, K2q, b2p, b2q = 2 * Kp, 2 * Kq, (2 * bp).unsqueeze(2), (2 * bq).unsqueeze(2)
        cq, cp = (h * Aq.sum(1)).unsqueeze(2), (-h * Ap.sum(1)).unsqueeze(2)  # h A^T 1 per layer
        if not any(ctx.needs_input_grad):  # evaluation: update in place, keep nothing
            Y = y.clone()
            P, Q, S = Y[:m], Y[m:], torch.empty_like(Y[:m])
            for j in range(L):
                torch.addmm(b2q[j], K2q[j], Q, out=S).sigmoid_()
                P.add_(cq[j]).addmm_(Aq[j].T, S, alpha=-2 * h)
                torch.addmm(b2p[j], K2p[j], P, out=S).sigmoid_()
                Q.add_(cp[j]).addmm_(Ap[j].T, S, alpha=2 * h)
            return Y
        Y = y.new_empty(L + 1, *y.shape)  # every layer's state
        S, T = y.new_empty(L, m, y.shape[1]), y.new_empty(L, m, y.shape[1])  # the sigmoids
        Y[0] = y
        P, Q = Y[:, :m], Y[:, m:]
        for j in range(L):
            torch.addmm(b2q[j], K2q[j], Q[j], out=S[j]).sigmoid_()
            torch.add(P[j], cq[j], out=P[j + 1]).addmm_(Aq[j].T, S[j], alpha=-2 * h)
            torch.addmm(b2p[j], K2p[j], P[j + 1], out=T[j]).sigmoid_()
            torch.add(Q[j], cp[j], out=Q[j + 1]).addmm_(Ap[j].T, T[j], alpha=2 * h)
        ctx.save_for_backward(Kp, Ap, Kq, Aq, Y, S, T)
        ctx.h = h
        return Y[L].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        Kp, Ap, Kq, Aq, Y, S, T = ctx.saved_tensors
        h, (L, m) = ctx.h, Kp.shape[:2]
        P, Q = Y[:, :m], Y[:, m:]
        shared_p, shared_q = ctx.shared
        gy = g.clone(memory_format=torch.contiguous_format)  # (the readout hands over a permuted gradient)
        gp, gq = gy[:m], gy[m:]
        gKp, gKq = torch.zeros_like(Kp), torch.zeros_like(Kq)
        gAp = gKp if shared_p else torch.zeros_like(Ap)
        gAq = gKq if shared_q else torch.zeros_like(Aq)
        gbp, gbq = Kp.new_empty(L, m), Kq.new_empty(L, m)
        gc, d, t = torch.empty_like(gp), torch.empty_like(gp), torch.empty_like(gp)
        for j in reversed(range(L)):
            # q' = q + h Ap^T tanh, tanh = 2 T - 1 = tanh(Kp p' + bp), 1 - tanh^2 = 4 T (1 - T)
            torch.mul(T[j], T[j], out=d).sub_(T[j]).mul_(-4 * h)
            torch.mm(Ap[j], gq, out=gc).mul_(d)
            gKp[j].addmm_(gc, P[j + 1].T)
            torch.mul(T[j], 2, out=t).sub_(1)
            gAp[j].addmm_(t, gq.T, alpha=h)
            torch.sum(gc, 1, out=gbp[j])
            gp.addmm_(Kp[j].T, gc)
            # p' = p - h Aq^T tanh, tanh = 2 S - 1 = tanh(Kq q + bq)
            torch.mul(S[j], S[j], out=d).sub_(S[j]).mul_(4 * h)
            torch.mm(Aq[j], gp, out=gc).mul_(d)
            gKq[j].addmm_(gc, Q[j].T)
            torch.mul(S[j], 2, out=t).sub_(1)
            gAq[j].addmm_(t, gp.T, alpha=-h)
            torch.sum(gc, 1, out=gbq[j])
            gq.addmm_(Kq[j].T, gc)
        return gy, gKp, None if shared_p else gAp, gKq, None if shared_q else gAq, gbp, gbq, None


class H1StackFM(torch.autograd.Function):
    """:class:`H1Stack` on a feature-major state ``y`` (``(n, N)``): ``T = tanh(K y + b);
    y' = y + h A^T T`` per layer (see :class:`H2StackFM` for why the layout)."""

    @staticmethod
    def forward(ctx, y, K, A, b, h):
        L = K.shape[0]
        if not any(ctx.needs_input_grad):
            Y, T = y.clone(), torch.empty_like(y)
            for j in range(L):
                tanh_(torch.addmm(b[j].unsqueeze(1), K[j], Y, out=T))
                Y.addmm_(A[j].T, T, alpha=h)
            return Y
        Y, T = y.new_empty(L + 1, *y.shape), y.new_empty(L, *y.shape)
        Y[0] = y
        for j in range(L):
            tanh_(torch.addmm(b[j].unsqueeze(1), K[j], Y[j], out=T[j]))
            torch.addmm(Y[j], A[j].T, T[j], alpha=h, out=Y[j + 1])
        ctx.save_for_backward(K, A, Y, T)
        ctx.h = h
        return Y[L].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        K, A, Y, T = ctx.saved_tensors
        h, L = ctx.h, K.shape[0]
        gy = g.clone(memory_format=torch.contiguous_format)  # (the readout hands over a permuted gradient)
        gK, gA = torch.zeros_like(K), torch.zeros_like(A)
        gb = K.new_empty(L, K.shape[1])
        gc, d = torch.empty_like(gy), torch.empty_like(gy)
        for j in reversed(range(L)):
            torch.mul(T[j], T[j], out=d).neg_().add_(1)
            torch.mm(A[j], gy, out=gc).mul_(d).mul_(h)
            gK[j].addmm_(gc, Y[j].T)
            gA[j].addmm_(T[j], gy.T, alpha=h)
            torch.sum(gc, 1, out=gb[j])
            gy.addmm_(K[j].T, gc)
        return gy, gK, gA, gb, None


# ---- exact reversible backprop: the state in fixed point ------------------------------------------
FRACTION_BITS = {torch.float32: 32, torch.float64: 48}  # F: the grid 2^-F; states must stay below 2^(62-F)
GUARD = 1 << 62  # |state| in grid units: below it no add can wrap around (checked, or bounded by the weights)


class FixedPointOverflow(ArithmeticError):
    """A fixed-point state left the representable range."""


class ReversibleMismatch(RuntimeError):
    """Exact reversible backprop rebuilt a state that differs from the forward's: a bug."""


class Certificate:
    """What the last reversible backward found: the largest relative difference between a
    rebuilt state and the one the forward stored (its input, and every anchor before it is
    restored). ``exact``: any difference raises :class:`ReversibleMismatch`."""

    def __init__(self, exact: bool = False):
        self.exact, self.drift, self.checked = exact, 0.0, 0
        self.states: dict | None = None  # tests: {"forward": [...], "rebuilt": [...]} copies of every state

    def keep(self, which: str, *state) -> None:
        """Tests: keep a copy of a fixed-point state (after each forward half-step, after each undo)."""
        if self.states is not None:
            self.states[which].append(tuple(t.clone() for t in state))

    def reset(self) -> None:
        self.drift, self.checked = 0.0, 0

    def compare(self, layer: int, rebuilt, stored, where: str = "") -> None:
        self.checked += 1
        if self.exact:
            if not all(torch.equal(a, b) for a, b in zip(rebuilt, stored)):
                raise ReversibleMismatch(f"exact reversible backprop{where}: the state rebuilt at layer {layer} "
                                         "differs from the forward's; please report this as a bug")
            return
        num = sum(float((a - b).double().square().sum()) for a, b in zip(rebuilt, stored))
        den = sum(float(b.double().square().sum()) for b in stored)
        self.drift = max(self.drift, (num / den) ** 0.5 if den > 0 else num ** 0.5)


def fraction_bits(dtype: torch.dtype, bits: int | None = None) -> int:
    return FRACTION_BITS[dtype] if bits is None else bits


FLOAT_CARRIER_BELOW = 1 << 53  # grid units: float64 holds every integer below this exactly


def quantise(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``round(x * 2^F)`` as int64 (the scaling by a power of two is exact)."""
    return torch.round(x * scale).to(torch.int64)


def add_on_grid(X: torch.Tensor, D: torch.Tensor, buf: torch.Tensor | None, sign: int) -> None:
    """``X += sign * round(D)``: ``D`` holds an increment already in grid units (rounded in place,
    half to even). An int64 ``X`` takes it through ``buf`` (a float holding an integer converts
    exactly); a float64 ``X`` adds it directly, exactly while the sums stay below 2^53."""
    D.round_()
    if not X.is_floating_point():
        D = buf.copy_(D)
    X.add_(D) if sign > 0 else X.sub_(D)


def dequantise(X: torch.Tensor, inv: float, out: torch.Tensor) -> torch.Tensor:
    """``X * 2^-F`` in ``out``'s dtype: the integer rounded once to ``out``'s dtype (the scaling by
    a power of two is exact), the same value from either carrier."""
    if X.is_floating_point():
        return torch.mul(X, inv, out=out)
    return out.copy_(X).mul_(inv)


def check_range(X: torch.Tensor, layer: int, what: str, bits: int) -> int:
    """Stop when ``|X| >= GUARD`` (grid units); returns ``max |X|``."""
    lo, hi = torch.aminmax(X)
    if int(lo) <= -GUARD or int(hi) >= GUARD:
        raise FixedPointOverflow(f"exact reversible backprop: {what} left the fixed-point range at layer {layer} "
                                 f"(|state| >= 2^{62 - bits} with {bits} fraction bits); lower model.h or "
                                 "init_std, raise train.alpha, or use run.reversible_state: float")
    return max(-int(lo), int(hi))


def check_increment(D: torch.Tensor, layer: int, what: str, bits: int) -> None:
    """Stop before an increment (grid units) outside the range, or not finite, converts to int64."""
    if not float(D.abs().amax()) < GUARD:
        raise FixedPointOverflow(f"exact reversible backprop: {what} left the fixed-point range at layer {layer} "
                                 f"(|increment| >= 2^{62 - bits} with {bits} fraction bits, or not finite); lower "
                                 "model.h or init_std, raise train.alpha, or use run.reversible_state: float")


def increment_bound(A: torch.Tensor, hs: float) -> float:
    """In grid units, a bound on how far a stack's increments ``hs tanh(.) A_j`` can move a state
    over all its layers (``|tanh| <= 1``: each entry moves by at most ``hs`` times a column's
    absolute sum; 1 % for the products' rounding, one grid unit per layer for the rounding to the
    grid). A state that starts below ``GUARD`` minus this bound cannot leave the range, so its
    adds need no check."""
    return float(A.detach().abs().sum(1).amax(-1).double().sum()) * abs(hs) * 1.01 + A.shape[0]


def _increment(x, Kt, b, A, hs: float, S, D):
    """``D = hs tanh(x K^T + b) A`` (``S``: the tanh; ``hs = h 2^F``: the increment in grid
    units, scaled exactly by the power of two). The one place both directions compute an
    increment, so the backward's is bit for bit the forward's."""
    torch.addmm(b, x, Kt, out=S).tanh_()
    torch.mm(S, A, out=D).mul_(hs)


class H2FixedStack(torch.autograd.Function):
    """Exact reversible H2: ``p`` and ``q`` are carried as int64 fixed point with ``bits`` fraction
    bits. A half-step computes its increment in the run's dtype from the dequantised other half,
    rounds it to the grid and adds it as an integer; the backward recomputes the same increment
    from the same bits and subtracts it, so every rebuilt state is bit for bit the forward's, at
    any depth (checked: the rebuilt input must equal the stored one). The gradient is the adjoint
    of this forward with the rounding passed straight through: :class:`H2RevStack`'s, evaluated
    at the dequantised states."""

    @staticmethod
    def forward(ctx, y, Kp, Ap, Kq, Aq, bp, bq, h, bits, cert=None):
        ctx.shared = (Ap is Kp, Aq is Kq)
        L, m = Kp.shape[0], Kp.shape[1]
        scale, inv = 2.0 ** bits, 2.0 ** -bits
        P, Q = quantise(y[:, :m], scale), quantise(y[:, m:], scale)
        top = max(check_range(P, 0, "the input", bits), check_range(Q, 0, "the input", bits))
        # the weights bound every increment: within range the adds need no check at all, and
        # below 2^53 grid units float64 holds the same integers exactly and adds them ~3x faster
        reach = top + increment_bound(Ap, h * scale) + increment_bound(Aq, h * scale)
        checked = not reach < GUARD  # (NaN weights: checked)
        if reach < FLOAT_CARRIER_BELOW:
            P, Q = P.double(), Q.double()
        start = (P.clone(), Q.clone())
        p, q = dequantise(P, inv, torch.empty_like(y[:, :m])), dequantise(Q, inv, torch.empty_like(y[:, m:]))
        S, D = torch.empty_like(p), torch.empty_like(p)
        buf = None if P.is_floating_point() else torch.empty_like(P)
        Kpt, Kqt = Kp.transpose(1, 2), Kq.transpose(1, 2)
        keep = cert.keep if cert is not None and cert.states is not None else None

        def add(X, sign: int, j: int, what: str) -> None:
            if checked:  # (the increment first, so that none converts outside int64 either)
                check_increment(D, j, f"the {what} increment", bits)
            add_on_grid(X, D, buf, sign)
            if checked:
                check_range(X, j, what, bits)

        for j in range(L):
            _increment(q, Kqt[j], bq[j], Aq[j], h * scale, S, D)
            add(P, -1, j, "p")
            dequantise(P, inv, p)
            _increment(p, Kpt[j], bp[j], Ap[j], h * scale, S, D)
            add(Q, 1, j, "q")
            dequantise(Q, inv, q)
            if keep is not None:
                keep("forward", P, Q)
        ctx.save_for_backward(Kp, Ap, Kq, Aq, bp, bq, P, Q, *start)
        ctx.h, ctx.bits, ctx.cert = h, bits, cert
        return torch.cat([p, q], dim=1)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        Kp, Ap, Kq, Aq, bp, bq, P, Q, P0, Q0 = ctx.saved_tensors
        h, bits, (L, m) = ctx.h, ctx.bits, Kp.shape[:2]
        scale, inv = 2.0 ** bits, 2.0 ** -bits
        P, Q = P.clone(), Q.clone()
        p, q = dequantise(P, inv, torch.empty_like(g[:, :m])), dequantise(Q, inv, torch.empty_like(g[:, m:]))
        gp, gq = g[:, :m].clone(), g[:, m:].clone()
        gKp, gKq = torch.zeros_like(Kp), torch.zeros_like(Kq)
        gAp = gKp if ctx.shared[0] else torch.zeros_like(Ap)
        gAq = gKq if ctx.shared[1] else torch.zeros_like(Aq)
        gbp, gbq = torch.zeros_like(bp), torch.zeros_like(bq)
        S, D = torch.empty_like(p), torch.empty_like(p)
        buf = None if P.is_floating_point() else torch.empty_like(P)
        Kpt, Kqt = Kp.transpose(1, 2), Kq.transpose(1, 2)
        keep = ctx.cert.keep if ctx.cert is not None and ctx.cert.states is not None else None
        for j in reversed(range(L)):  # (no range checks: every state rebuilt is one the forward made)
            if keep is not None:
                keep("rebuilt", P, Q)
            _increment(p, Kpt[j], bp[j], Ap[j], h * scale, S, D)  # p = p_{j+1}: the q-update's increment, again
            add_on_grid(Q, D, buf, -1)  # q_j, exactly
            gC = torch.mm(gq, Ap[j].T).mul_(h).mul_(1 - S * S)
            gKp[j].addmm_(gC.T, p)
            gAp[j].addmm_(S.T, gq, alpha=h)
            torch.sum(gC, 0, out=gbp[j])
            gp.addmm_(gC, Kp[j])
            dequantise(Q, inv, q)
            _increment(q, Kqt[j], bq[j], Aq[j], h * scale, S, D)  # the p-update's increment, again
            add_on_grid(P, D, buf, 1)  # p_j, exactly
            gA = torch.mm(gp, Aq[j].T).mul_(-h).mul_(1 - S * S)
            gKq[j].addmm_(gA.T, q)
            gAq[j].addmm_(S.T, gp, alpha=-h)
            torch.sum(gA, 0, out=gbq[j])
            gq.addmm_(gA, Kq[j])
            dequantise(P, inv, p)
        if ctx.cert is not None:
            ctx.cert.compare(0, (P, Q), (P0, Q0))
        return (torch.cat([gp, gq], dim=1), gKp, None if ctx.shared[0] else gAp, gKq, None if ctx.shared[1] else gAq,
                gbp, gbq, None, None, None)


SMOOTH_CHUNK = 64  # layers per chunk of the smoothness gradient (bounds its temporaries)


@torch.no_grad()
def smoothness_value(P: torch.Tensor) -> torch.Tensor:
    """``sum_j ||P_{j+1} - P_j||^2`` over the leading (layer) axis, chunk by chunk."""
    total = P.new_zeros((), dtype=torch.float64)
    for a in range(0, P.shape[0] - 1, SMOOTH_CHUNK):
        total += torch.diff(P[a:a + SMOOTH_CHUNK + 1], dim=0).square().sum()
    return total.to(P.dtype)


@torch.no_grad()
def add_smoothness_grad(P: torch.Tensor, grad: torch.Tensor, coef: float, mask: torch.Tensor | None = None) -> None:
    """``grad += coef * d/dP sum_j ||P_{j+1} - P_j||^2`` in place, chunk by chunk: the
    regulariser's gradient costs no memory beyond a chunk, at any depth. ``mask``: the
    gradient of a masked parameter (``P`` is already masked) stays masked."""
    L = P.shape[0]
    for a in range(0, L - 1, SMOOTH_CHUNK):
        b = min(L, a + SMOOTH_CHUNK + 1)
        d = torch.diff(P[a:b], dim=0).mul_(2 * coef)  # d/dP_j: 2 (P_j - P_{j-1}) - 2 (P_{j+1} - P_j)
        if mask is not None:
            d.mul_(mask)
        grad[a + 1:b] += d
        grad[a:b - 1] -= d
