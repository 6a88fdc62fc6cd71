"""The paper's image network: a 3x3 convolution, an H-DNN on every pixel, a linear readout.

Every pixel's ``C`` channels are a state of the same H-DNN; the final states of all pixels go
through a linear layer to the classes. It follows the :class:`~dhdnn.models.network.Classifier`
protocol (``initial_state``, ``body``, ``readout``); its own forward keeps the pixel states
feature-major (``(C, B * H * W)``), where the H-DNN runs as ``(C/2, C/2) x (C/2, pixels)``
products instead of a batch-major stack of tiny rows. Pure maths.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .hamiltonian import ODENet
from .network import register_network


@register_network("conv")
class ConvClassifier(nn.Module):
    # images per evaluation chunk: ~50,000 pixel states, whose few feature-major fields stay in a
    # core's L2 cache through all layers (measured here: 0.12 ms per image, 0.15 at 283 images)
    eval_batch = 64
    has_agents = False  # one state per pixel, weights shared: on workers it runs as data-parallel replicas
    needs_images = True  # it reads whole images (data with an image shape)

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

    def _features(self, x: Tensor) -> Tensor:
        """``(B, features)`` images -> ``(B, C, H, W)`` convolution features."""
        if x.dim() != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"input: expected (batch, {self.n_features}) flattened images, got {tuple(x.shape)}")
        return self.conv(x.view(-1, *self.image_shape))

    def initial_state(self, x: Tensor) -> Tensor:
        """``(B, features)`` images -> ``(B * H * W, C)`` pixel states."""
        return self._features(x).permute(0, 2, 3, 1).reshape(-1, self.body.dim)

    def readout(self, yL: Tensor) -> Tensor:
        _, H, W = self.image_shape
        return self.linear(yL.reshape(-1, H * W * self.body.dim))

    def pixel_states(self, x: Tensor) -> Tensor:
        """``(B, features)`` images -> ``(C, B * H * W)`` feature-major pixel states."""
        return self._features(x).transpose(0, 1).reshape(self.body.dim, -1)

    def readout_fm(self, Y: Tensor) -> Tensor:
        """Logits from ``(C, B * H * W)`` final pixel states (the linear layer reads pixel after
        pixel, channels innermost, as :meth:`readout`)."""
        _, H, W = self.image_shape
        C = self.body.dim
        return self.linear(Y.view(C, -1, H * W).permute(1, 2, 0).reshape(-1, H * W * C))

    def forward(self, x: Tensor) -> Tensor:
        return self.readout_fm(self.body.forward_fm(self.pixel_states(x)))

    def activation_bytes(self, batch: int, dtype: torch.dtype) -> int:
        """What a forward with gradients keeps for ``batch`` images (every pixel's states)."""
        _, H, W = self.image_shape
        return batch * H * W * 4 * (self.body.layers + 1) * self.body.dim * (torch.finfo(dtype).bits // 8)

    def regularizer(self, alpha: float) -> Tensor:
        return self.body.regularizer(alpha)

    def readout_parameters(self) -> list[nn.Parameter]:
        """Parameters that take ordinary weight decay (the classifier)."""
        return [self.linear.weight]

    # ---- what the builder, the memory estimate and the export need --------------------------
    @staticmethod
    def state_dim(spec, topology) -> int:
        if topology is not None:
            raise ValueError("topology: the conv network has no agents; expected no topology (image patches as "
                             "agents: a topology with embeddings)")
        return spec.channels

    @staticmethod
    def states_per_sample(n_features: int) -> int:
        return n_features  # every pixel (one input channel) is a state

    @classmethod
    def from_spec(cls, spec, body: ODENet, topology) -> "ConvClassifier":
        torch.manual_seed(spec.seed)  # the convolution and readout initialise from torch's generator
        return cls(body, spec.image_shape, spec.n_outputs)

    def export_fields(self) -> dict:
        return {"image_shape": list(self.image_shape)}

    @classmethod
    def from_export(cls, d: dict, body: ODENet) -> "ConvClassifier":
        return cls(body, tuple(d["image_shape"]), d["n_classes"])
