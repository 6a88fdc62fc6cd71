"""Network kinds around an H-DNN, and the state network: input placement, the stack, a readout.

``logits = W y_L + mu``, ``y_0`` holding the input features at fixed state indices, plus learned
embeddings of feature slices (one per agent: image patches). Every kind registers in
:data:`NETWORKS` and declares what the engines need (``has_agents``, ``needs_images``), how it is
built from a spec and exported; no other module names a kind. Pure maths.
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


NETWORKS: dict[str, type] = {}  # model.network -> the network class


def register_network(name: str):
    """Class decorator adding a network kind to :data:`NETWORKS` under ``name``."""

    def deco(cls):
        cls.kind = name
        NETWORKS[name] = cls
        return cls

    return deco


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


@register_network("state")
class Classifier(nn.Module):
    """Input placement -> H-DNN -> linear readout (``W``, ``mu``)."""

    has_agents = True  # with a topology, its state splits into agents: the sharded engine runs it
    needs_images = False  # it places features into the state (which it checks against the data)

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

    # ---- what the builder, the memory estimate and the export need --------------------------
    @staticmethod
    def state_dim(spec, topology) -> int:
        """The H-DNN's state dimension for a spec (or a model config) on ``topology``."""
        if topology is not None:
            return topology.state_dim
        if spec.dim is None:
            raise ValueError("dim: a network without a topology needs its state dimension")
        return spec.dim

    @staticmethod
    def states_per_sample(n_features: int) -> int:
        return 1

    @classmethod
    def from_spec(cls, spec, body: ODENet, topology) -> "Classifier":
        if topology is not None:
            return cls(body, spec.n_features, spec.n_outputs, topology.placement(spec.n_features),
                       topology.readout_state_indices())
        placement = InputPlacement(tuple(spec.feature_index)) if spec.feature_index is not None else None
        return cls(body, spec.n_features, spec.n_outputs, placement)

    def export_fields(self) -> dict:
        pl = self.placement
        return {"readout_states": self.readout_idx.tolist(),
                "placement": {"feature_index": list(pl.feature_index), "features": list(pl.features),
                              "embeddings": [{"features": list(e.features), "states": list(e.states)}
                                             for e in pl.embeddings]}}

    @classmethod
    def from_export(cls, d: dict, body: ODENet) -> "Classifier":
        pl = d["placement"]
        placement = InputPlacement(tuple(pl["feature_index"]), tuple(pl["features"]),
                                   tuple(Embedding(tuple(e["features"]), tuple(e["states"])) for e in pl["embeddings"]))
        return cls(body, d["n_features"], d["n_classes"], placement, tuple(d["readout_states"]))
