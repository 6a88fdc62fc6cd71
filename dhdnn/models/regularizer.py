"""The smoothness regulariser across depth, ``sum_j ||P_{j+1} - P_j||^2``, without a graph.

Its value and its gradient are computed chunk by chunk over the layers, so they cost no memory
beyond a chunk at any depth; the dense model and every rank's shard use these two functions.
Pure maths.
"""
from __future__ import annotations

import torch

SMOOTH_CHUNK = 64  # layers per chunk (bounds the temporaries)


@torch.no_grad()
def smoothness_value(P: torch.Tensor) -> torch.Tensor:
    """``sum_j ||P_{j+1} - P_j||^2`` over the leading (layer) axis, chunk by chunk."""
    total = P.new_zeros((), dtype=torch.float64)
    for a in range(0, P.shape[0] - 1, SMOOTH_CHUNK):
        total += torch.diff(P[a:a + SMOOTH_CHUNK + 1], dim=0).square().sum()
    return total.to(P.dtype)


@torch.no_grad()
def add_smoothness_grad(P: torch.Tensor, grad: torch.Tensor, coef: float, mask: torch.Tensor | None = None) -> None:
    """``grad += coef * d/dP sum_j ||P_{j+1} - P_j||^2`` in place, chunk by chunk. ``mask``: the
    gradient of a masked parameter (``P`` is already masked) stays masked."""
    L = P.shape[0]
    for a in range(0, L - 1, SMOOTH_CHUNK):
        b = min(L, a + SMOOTH_CHUNK + 1)
        d = torch.diff(P[a:b], dim=0).mul_(2 * coef)  # d/dP_j: 2 (P_j - P_{j-1}) - 2 (P_{j+1} - P_j)
        if mask is not None:
            d.mul_(mask)
        grad[a + 1:b] += d
        grad[a:b - 1] -= d
