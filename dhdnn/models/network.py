"""The classifier around an H-DNN: input placement, the layer stack, a linear readout.

``logits = W y_L + mu`` where ``y_0`` holds the input features at fixed state indices
(zero elsewhere), optionally plus learned linear embeddings of feature slices (one per
agent, for image patches). Pure maths.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .hamiltonian import ODENet


@dataclass(frozen=True)
class Embedding:
    """A learned linear map from input features ``features`` into state indices ``states``."""

    features: tuple[int, ...]
    states: tuple[int, ...]


@dataclass(frozen=True)
class InputPlacement:
    """Where input features enter the state: direct copies and learned embeddings."""

    feature_index: tuple[int, ...] = ()  # state index of each directly placed feature
    direct_features: tuple[int, ...] | None = None  # which features; default 0..len-1
    embeddings: tuple[Embedding, ...] = field(default_factory=tuple)

    @property
    def features(self) -> tuple[int, ...]:
        if self.direct_features is None:
            return tuple(range(len(self.feature_index)))
        return self.direct_features

    def validate(self, dim: int, n_features: int) -> None:
        if len(self.features) != len(self.feature_index):
            raise ValueError("input placement: features and state indices differ in length")
        for f in list(self.features) + [f for e in self.embeddings for f in e.features]:
            if not 0 <= f < n_features:
                raise ValueError(f"input placement: feature {f} out of range for {n_features} input features")
        targets = list(self.feature_index) + [s for e in self.embeddings for s in e.states]
        for s in targets:
            if not 0 <= s < dim:
                raise ValueError(f"input placement: state index {s} out of range for dim {dim}")
        if len(set(self.feature_index)) != len(self.feature_index):
            raise ValueError("input placement: two features placed into the same state index")


def default_placement(n_features: int, dim: int) -> InputPlacement:
    """Spread the features evenly over the state; with two features: first entry of ``p`` and
    last entry of ``q``, as in the paper's 2-D examples."""
    if n_features > dim:
        raise ValueError(f"model.dim: {dim} is smaller than the {n_features} input features; "
                         "raise model.dim or feed the features through a topology embedding")
    if n_features == 1:
        return InputPlacement((0,))
    idx = tuple(round(k * (dim - 1) / (n_features - 1)) for k in range(n_features))
    return InputPlacement(idx)


class Classifier(nn.Module):
    """Input placement -> H-DNN -> linear readout (``W``, ``mu``)."""

    def __init__(self, body: ODENet, n_features: int, n_classes: int,
                 placement: InputPlacement | None = None, readout_states: tuple[int, ...] | None = None):
        super().__init__()
        self.body = body
        self.n_features, self.n_classes = n_features, n_classes
        placement = placement or default_placement(n_features, body.dim)
        placement.validate(body.dim, n_features)
        self.placement = placement
        self.register_buffer("feat_src", torch.tensor(placement.features, dtype=torch.long))
        self.register_buffer("feat_dst", torch.tensor(placement.feature_index, dtype=torch.long))
        self.embed = nn.ModuleList(nn.Linear(len(e.features), len(e.states)) for e in placement.embeddings)
        for i, e in enumerate(placement.embeddings):
            self.register_buffer(f"embed_src{i}", torch.tensor(e.features, dtype=torch.long))
            self.register_buffer(f"embed_dst{i}", torch.tensor(e.states, dtype=torch.long))
        states = tuple(range(body.dim)) if readout_states is None else tuple(readout_states)
        self.register_buffer("readout_idx", torch.tensor(states, dtype=torch.long))
        self.W = nn.Parameter(torch.zeros(n_classes, len(states)))
        self.mu = nn.Parameter(torch.zeros(n_classes))

    def initial_state(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"input: expected (batch, {self.n_features}) features, got {tuple(x.shape)}")
        y0 = x.new_zeros(x.shape[0], self.body.dim)
        y0[:, self.feat_dst] = x[:, self.feat_src]
        for i, lin in enumerate(self.embed):
            src, dst = getattr(self, f"embed_src{i}"), getattr(self, f"embed_dst{i}")
            y0 = y0.index_add(1, dst, lin(x[:, src]))
        return y0

    def readout(self, yL: Tensor) -> Tensor:
        return yL[:, self.readout_idx] @ self.W.T + self.mu

    def forward(self, x: Tensor) -> Tensor:
        return self.readout(self.body(self.initial_state(x)))

    def regularizer(self, alpha: float) -> Tensor:
        return self.body.regularizer(alpha)

    def activation_bytes(self, batch: int, dtype: torch.dtype) -> int:
        """What a forward with gradients keeps for ``batch`` samples (the fused stacks keep
        every layer's state and activation)."""
        return batch * 4 * (self.body.layers + 1) * self.body.dim * (torch.finfo(dtype).bits // 8)

    def readout_parameters(self) -> list[nn.Parameter]:
        """Parameters that take ordinary weight decay (the classifier)."""
        return [self.W]
