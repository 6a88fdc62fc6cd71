"""Gradient analysis: backward sensitivity matrices, symplecticity, reversible-rebuild drift.

The backward sensitivity matrix (BSM) of layer ``j`` is ``dy_L/dy_j``. For H2 (``X = I``)
every BSM is symplectic, ``M^T S M = S`` with ``S = [[0, I], [-I, 0]]``, so its spectral
norm is at least 1 at any depth. Checks are relative, since ``||M||`` itself can be huge.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .models.hamiltonian import ODENet


def layer_jacobians(model: ODENet, y0: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Jacobians ``M_j = dy_{j+1}/dy_j`` (dim x dim) of every layer along the trajectory of
    the single state ``y0`` (shape ``(dim,)``); returns (jacobians, states)."""
    if y0.dim() != 1 or y0.shape[0] != model.dim:
        raise ValueError(f"y0: expected a single state of shape ({model.dim},), got {tuple(y0.shape)}")
    P = {k: v.detach() for k, v in model.effective().items()}  # P[name][j] indexes layer j
    states, jacs = [y0.detach()], []
    for j in range(model.layers):
        f = lambda y, j=j: model.step(y[None], j, P)[0]  # noqa: E731
        jacs.append(torch.autograd.functional.jacobian(f, states[-1], vectorize=True))
        with torch.no_grad():
            states.append(f(states[-1]))
    return jacs, states


def sensitivity_matrices(model: ODENet, y0: Tensor) -> list[Tensor]:
    """BSMs ``[dy_L/dy_0, ..., dy_L/dy_L]`` (the last one is the identity)."""
    jacs, _ = layer_jacobians(model, y0)
    out = [torch.eye(model.dim, dtype=y0.dtype)]
    for M in reversed(jacs):
        out.append(out[-1] @ M)
    return out[::-1]


def sensitivity_norms(model: ODENet, y0: Tensor) -> Tensor:
    """Spectral norms ``||dy_L/dy_j||_2`` for ``j = 0..L``."""
    return torch.stack([torch.linalg.matrix_norm(M, ord=2) for M in sensitivity_matrices(model, y0)])


def symplectic_form(dim: int, dtype=torch.float64, X: Tensor | None = None) -> Tensor:
    """``S = [[0, I], [-I, 0]]``, or ``J^{-1}`` for H2's ``J = [[0, -X^T], [X, 0]]`` with general ``X``."""
    m = dim // 2
    if X is None:
        S = torch.zeros(dim, dim, dtype=dtype)
        S[:m, m:] = torch.eye(m, dtype=dtype)
        S[m:, :m] = -torch.eye(m, dtype=dtype)
        return S
    X = X.to(dtype)
    J = torch.zeros(dim, dim, dtype=dtype)
    J[:m, m:] = -X.T
    J[m:, :m] = X
    return torch.linalg.inv(J)


def symplecticity_error(M: Tensor, S: Tensor | None = None) -> float:
    """``||M^T S M - S||_max / max(1, ||M||_2^2)``: round-off level for a symplectic ``M``."""
    S = symplectic_form(M.shape[0], M.dtype) if S is None else S
    num = (M.T @ S @ M - S).abs().max()
    return float(num / max(1.0, float(torch.linalg.matrix_norm(M, ord=2)) ** 2))


@torch.no_grad()
def reconstruction_drift(model: ODENet, y0: Tensor, anchor_every: int = 0) -> list[float]:
    """How far reversible backprop's rebuilt states drift: run the forward, then rebuild every
    ``y_j`` from ``y_L`` with the inverse step (restarting from the stored state at anchors,
    every ``anchor_every`` layers), and return ``||rebuilt y_j - y_j|| / ||y_j||`` for
    ``j = 0..L`` (the last is 0: ``y_L`` is kept)."""
    if not model.invertible:
        raise ValueError(f"{model.arch_name} layers cannot be inverted exactly")
    P = model.effective()
    states = [y0]
    for j in range(model.layers):
        states.append(model.step(states[-1], j, P))
    y, out = states[-1], [0.0]
    for j in reversed(range(model.layers)):
        y = model.inverse_step(y, j, P)
        ref = states[j]
        out.append(float((y - ref).norm() / ref.norm().clamp_min(1e-300)))
        if anchor_every and j and j % anchor_every == 0:
            y = ref
    return out[::-1]


def reversible_report(dim: int, layers: int, h: float, dtype: torch.dtype = torch.float32, batch: int = 256,
                      seed: int = 0, init_std: float | None = None) -> dict:
    """Reversible backprop on a random H2 network: for autograd, the float rebuild and the exact
    (fixed-point) rebuild in ``dtype``, the relative error of all parameter gradients of
    ``||y_L||^2 / 2`` against float64 autograd, and the rebuild's certificate (the relative drift
    of the rebuilt input; exact mode checks it is bit for bit the forward's)."""
    from .models import build_model

    torch.manual_seed(seed)
    ref_model = build_model("H2", dim, layers, h, init_std=init_std).double()
    y0 = torch.randn(batch, dim, dtype=torch.float64)

    def grads(model, y):
        out = model(y)
        return torch.cat([g.reshape(-1).double() for g in torch.autograd.grad(0.5 * out.square().sum(),
                                                                               list(model.parameters()))])

    ref = grads(ref_model, y0)
    out = {"dim": dim, "layers": layers, "h": h, "dtype": str(dtype).split(".")[-1], "batch": batch}
    for mode, state in (("autograd", None), ("float", "float"), ("exact", "fixed")):
        model = build_model("H2", dim, layers, h, init_std=init_std).to(dtype)
        model.load_state_dict(ref_model.state_dict())
        if state is not None:
            model.set_backprop("reversible", state=state)
        g = grads(model, y0.to(dtype))
        out[f"{mode}_grad_error"] = float((g - ref).norm() / ref.norm())
        if state is not None:
            out[f"{mode}_drift"] = model.certificate.drift
    return out
