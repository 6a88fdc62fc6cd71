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
    adjoint as :class:`H2Stack`. Activation memory is a few ``(B, m)`` buffers at any depth."""

    @staticmethod
    def forward(ctx, y, Kp, Ap, Kq, Aq, bp, bq, h, anchor_every):
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
        ctx.h, ctx.anchors = h, anchors
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
                P.copy_(ctx.anchors[j][0])
                Q.copy_(ctx.anchors[j][1])
        return (torch.cat([gp, gq], dim=1), gKp, None if ctx.shared[0] else gAp, gKq, None if ctx.shared[1] else gAq,
                gbp, gbq, None, None)


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
