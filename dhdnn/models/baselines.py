"""Baseline architectures: the earlier ODE-inspired networks MS1-MS3 and ResNet/MLP.

MS1 (Haber & Ruthotto 2017, Verlet) and MS3 (Chang et al. 2018, Verlet) are special
cases of the Hamiltonian ODE with block-antidiagonal ``K``; MS2 is forward Euler with an
antisymmetric ``K``. ResNet and MLP are the gradient baselines. Pure maths.
"""
from __future__ import annotations

import torch

from .hamiltonian import ODENet, register


@register("MS1")
class MS1(ODENet):
    """``q <- q + h tanh(K p + b_q)``; ``p <- p + h tanh(-K^T q + b_p)`` (K = [[0, K], [-K^T, 0]])."""

    param_shapes = {"K": ("m", "m"), "b_p": ("m",), "b_q": ("m",)}
    masked = {"K": "K"}
    smooth_params = ("K", "b_p", "b_q")
    needs_even_dim = True

    def step(self, y, j, P):
        m = self.half
        p, q = y[:, :m], y[:, m:]
        K = P["K"][j]
        q = q + self.h * torch.tanh(p @ K.T + P["b_q"][j])
        p = p + self.h * torch.tanh(-(q @ K) + P["b_p"][j])
        return torch.cat([p, q], dim=1)

    def forward_fm(self, Y):
        """Feature-major (``(dim, N)``): the same steps as products on contiguous rows (autograd)."""
        P, m = self.per_layer(), self.half
        p, q = Y[:m], Y[m:]
        for j in range(self.layers):
            K = P["K"][j]
            q = q + self.h * torch.tanh(torch.addmm(P["b_q"][j].unsqueeze(1), K, p))
            p = p + self.h * torch.tanh(torch.addmm(P["b_p"][j].unsqueeze(1), K.T, q, alpha=-1))
        return torch.cat([p, q], 0)


@register("MS2")
class MS2(ODENet):
    """Forward Euler with antisymmetric ``K = W - W^T``: ``y <- y + h tanh(K^T y + b)``."""

    param_shapes = {"W": ("n", "n"), "b": ("n",)}
    masked = {"W": "K"}
    smooth_params = ("W", "b")

    def step(self, y, j, P):
        W = P["W"][j]
        return y + self.h * torch.tanh(y @ (W - W.T) + P["b"][j])


@register("MS3")
class MS3(ODENet):
    """Two-layer Hamiltonian network (Verlet): ``q <- q - h K1 tanh(K1^T p + b_q)``;
    ``p <- p + h K2 tanh(K2^T q + b_p)``."""

    param_shapes = {"K1": ("m", "m"), "K2": ("m", "m"), "b_p": ("m",), "b_q": ("m",)}
    masked = {"K1": "K1", "K2": "K2"}
    smooth_params = ("K1", "K2", "b_p", "b_q")
    needs_even_dim = True

    def step(self, y, j, P):
        m = self.half
        p, q = y[:, :m], y[:, m:]
        K1, K2 = P["K1"][j], P["K2"][j]
        q = q - self.h * torch.tanh(p @ K1 + P["b_q"][j]) @ K1.T
        p = p + self.h * torch.tanh(q @ K2 + P["b_p"][j]) @ K2.T
        return torch.cat([p, q], dim=1)


@register("ResNet")
class ResNet(ODENet):
    """``y <- y + h tanh(W y + b)``; torch.nn.Linear's default initialisation."""

    param_shapes = {"W": ("n", "n"), "b": ("n",)}
    masked = {"W": "W"}
    smooth_params = ("W", "b")
    default_std = None
    residual = True  # (MLP: no skip connection)

    def _out(self, y, u):
        return y + self.h * u if self.residual else u

    def step(self, y, j, P):
        return self._out(y, torch.tanh(y @ P["W"][j].T + P["b"][j]))

    def forward_fm(self, Y):
        """Feature-major (``(dim, N)``): the same steps as products on contiguous rows (autograd)."""
        P = self.per_layer()
        for j in range(self.layers):
            Y = self._out(Y, torch.tanh(torch.addmm(P["b"][j].unsqueeze(1), P["W"][j], Y)))
        return Y


@register("MLP")
class MLP(ResNet):
    """``y <- tanh(W y + b)`` (``h`` is unused); torch.nn.Linear's default initialisation."""

    residual = False
