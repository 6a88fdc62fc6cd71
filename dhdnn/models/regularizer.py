"""The smoothness regulariser across depth, ``sum_j ||P_{j+1} - P_j||^2``, without a graph: value
and gradient chunk by chunk over the layers, all of a stack's parameters at once (``_foreach``
ops), for the dense model and every shard. Pure maths.
"""
from __future__ import annotations

import torch

SMOOTH_CHUNK = 64  # layers per chunk (bounds the temporaries)


def _chunks(L: int):
    for a in range(0, L - 1, SMOOTH_CHUNK):
        yield a, min(L, a + SMOOTH_CHUNK + 1)


@torch.no_grad()
def smoothness_value(Ps: list[torch.Tensor]) -> torch.Tensor:
    """``sum_P sum_j ||P_{j+1} - P_j||^2`` over the leading (layer) axis of every ``P``."""
    total = Ps[0].new_zeros((), dtype=torch.float64)
    for a, b in _chunks(Ps[0].shape[0]):
        d = torch._foreach_sub([P[a + 1:b] for P in Ps], [P[a:b - 1] for P in Ps])
        total += torch.stack(torch._foreach_norm(d)).double().square().sum()
    return total.to(Ps[0].dtype)


@torch.no_grad()
def add_smoothness_grad(Ps: list[torch.Tensor], grads: list[torch.Tensor], coef: float, masks=None) -> None:
    """``grad += coef * d/dP sum_j ||P_{j+1} - P_j||^2`` in place for every ``P`` and its ``grad``.
    ``masks``: per ``P`` its mask or None; a masked parameter's gradient (``P`` is already
    masked) stays masked."""
    for a, b in _chunks(Ps[0].shape[0]):
        d = torch._foreach_sub([P[a + 1:b] for P in Ps], [P[a:b - 1] for P in Ps])
        torch._foreach_mul_(d, 2 * coef)  # d/dP_j: 2 (P_j - P_{j-1}) - 2 (P_{j+1} - P_j)
        for x, m in zip(d, masks or ()):
            if m is not None:
                x.mul_(m)
        torch._foreach_add_([g[a + 1:b] for g in grads], d)
        torch._foreach_sub_([g[a:b - 1] for g in grads], d)
