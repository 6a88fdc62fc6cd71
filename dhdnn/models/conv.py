"""The paper's image network: a 3x3 convolution, an H-DNN on every pixel, a linear readout.

``image (1, H, W) -> conv 3x3 (padding 1) -> (C, H, W)``; every pixel's ``C``-channel vector
is a state ``y_0`` of the same H-DNN (weights shared across pixels); the final states of all
pixels, ``(C * H * W)``, go through a linear layer to the classes. It follows the
:class:`~dhdnn.models.network.Classifier` protocol (``initial_state``, ``body``, ``readout``),
so every engine, regulariser and gradient-norm record works with it unchanged. Pure maths.
"""
from __future__ import annotations

from torch import Tensor, nn

from .hamiltonian import ODENet


class ConvClassifier(nn.Module):
    def __init__(self, body: ODENet, image_shape: tuple[int, int, int], n_classes: int):
        super().__init__()
        c_in, H, W = image_shape
        self.body, self.image_shape, self.n_classes = body, tuple(image_shape), n_classes
        self.n_features = c_in * H * W
        self.conv = nn.Conv2d(c_in, body.dim, 3, padding=1)
        self.linear = nn.Linear(body.dim * H * W, n_classes)

    @property
    def W(self) -> nn.Parameter:
        return self.linear.weight

    def initial_state(self, x: Tensor) -> Tensor:
        """``(B, features)`` images -> ``(B * H * W, C)`` pixel states."""
        if x.dim() != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"input: expected (batch, {self.n_features}) flattened images, got {tuple(x.shape)}")
        f = self.conv(x.view(-1, *self.image_shape))  # (B, C, H, W)
        return f.permute(0, 2, 3, 1).reshape(-1, self.body.dim)

    def readout(self, yL: Tensor) -> Tensor:
        _, H, W = self.image_shape
        return self.linear(yL.reshape(-1, H * W * self.body.dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.readout(self.body(self.initial_state(x)))

    def regularizer(self, alpha: float) -> Tensor:
        return self.body.regularizer(alpha)

    def readout_parameters(self) -> list[nn.Parameter]:
        """Parameters that take ordinary weight decay (the classifier)."""
        return [self.linear.weight]
