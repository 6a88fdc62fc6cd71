"""Networks from a description: :class:`NetworkSpec`, and the dense model it builds.

A spec is everything that defines a network besides its topology and weights; configs,
checkpoints, exports and the library all speak it. With a topology the dense model is masked by
the agent graph and initialised from the per-agent blocks: the network the sharded engine builds.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .models import ARCHITECTURES, NETWORKS, build_model
from .tasks import TASKS


@dataclass(frozen=True)
class NetworkSpec:
    """Everything that defines a network besides its topology and its weights."""

    arch: str = "H2"
    layers: int = 4
    h: float = 0.5
    n_features: int = 2  # input features per sample
    n_outputs: int = 2  # classes (classify) or regression targets (regress)
    task: str = "classify"
    J: str = "J1"  # H1's skew matrix
    init_std: float | None = None  # None: the architecture's default
    seed: int = 0  # initialisation (per agent with a topology, so any worker count builds the same network)
    dim: int | None = None  # state dimension of a network without a topology
    feature_index: tuple[int, ...] | None = None  # without a topology: state index of each feature
    network: str = "state"  # a kind of NETWORKS: state, or conv (the paper's image network: the H-DNN per pixel)
    channels: int = 8  # an image network's channels = the per-pixel state dimension
    image_shape: tuple[int, int, int] | None = None  # an image network's (channels, rows, cols) of its input

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"arch: expected one of {sorted(ARCHITECTURES)}, got {self.arch!r}")
        if self.task not in TASKS:
            raise ValueError(f"task: expected one of {sorted(TASKS)}, got {self.task!r}")
        for k in ("layers", "n_features", "n_outputs", "channels"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{k}: expected a positive integer, got {v!r}")
        if self.network not in NETWORKS:
            raise ValueError(f"network: expected one of {sorted(NETWORKS)}, got {self.network!r}")
        if NETWORKS[self.network].needs_images and self.image_shape is None:
            raise ValueError(f"image_shape: the {self.network} network needs the (channels, rows, cols) of its images")
        for k in ("feature_index", "image_shape"):  # lists from YAML or JSON
            if getattr(self, k) is not None:
                object.__setattr__(self, k, tuple(getattr(self, k)))

    @classmethod
    def from_config(cls, cfg, n_features: int, n_outputs: int, image_shape=None) -> "NetworkSpec":
        """The spec of a run config (``model`` section, ``train.seed``) for data of this shape."""
        mc = cfg.model
        return cls(arch=mc.arch, layers=mc.layers, h=mc.h, n_features=n_features, n_outputs=n_outputs, task=mc.task,
                   J=mc.J, init_std=mc.init_std, seed=cfg.train.seed, dim=mc.dim, feature_index=mc.feature_index,
                   network=mc.network, channels=mc.channels,
                   image_shape=image_shape if NETWORKS[mc.network].needs_images else None)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "NetworkSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def options(self) -> dict:
        """Keyword options of the architecture's class (H1: ``J``) and the initialisation."""
        cls = ARCHITECTURES[self.arch]
        return {**{k: getattr(self, k) for k in cls.config_options}, "init_std": self.init_std}


def build_network(topology=None, spec: NetworkSpec | None = None, dtype: torch.dtype | None = None, **fields):
    """The dense single-process network of ``spec`` (or of the spec fields given as keywords,
    e.g. ``arch="H2", layers=8, h=0.3, n_features=2, n_outputs=2``) on ``topology``.

    With a topology the weights are masked by the agent graph and drawn per agent block, and
    the model remembers both (``model.spec``, ``model.topology``) for
    :func:`dhdnn.distributed.distribute` and for saving. Without one, ``spec.dim`` (or the conv
    network) sets the state. Returns a :class:`~dhdnn.models.Classifier` (its outputs are
    logits, or regression predictions with ``task="regress"``)."""
    if spec is None:
        if topology is not None and "n_features" not in fields:
            fields["n_features"] = topology.n_inputs()
        spec = NetworkSpec(**fields)
    elif fields:
        spec = dataclasses.replace(spec, **fields)
    model, _ = build_with_table(spec, topology, dtype)
    return model


def build_with_table(spec: NetworkSpec, topology=None, dtype=None):
    """``(model, table)``: the dense network and, for a topology network, its
    :class:`~dhdnn.blocks.BlockTable` (None otherwise)."""
    from .blocks import BlockTable, init_packed, load_dense
    from .models import NotDistributable
    from .topology import dense_masks

    dtype = dtype or torch.get_default_dtype()
    cls, options = NETWORKS[spec.network], spec.options()
    arch, table = ARCHITECTURES[spec.arch], None
    if topology is not None and arch.distributable:
        try:
            table = BlockTable(topology, arch.agent_layout(**options), spec.layers, spec.n_outputs)
        except NotDistributable:  # (H1 with J2): masked, without a per-agent form
            pass
    if table is not None:  # every weight is drawn per agent block below: the dense draw would be overwritten
        options = {**options, "init_std": 0.0}
    mask = dense_masks(topology, arch) if topology is not None else None
    body = build_model(spec.arch, cls.state_dim(spec, topology), spec.layers, spec.h, mask=mask,
                       generator=torch.Generator().manual_seed(spec.seed), **options)
    model = cls.from_spec(spec, body, topology).to(dtype)
    if table is not None:
        load_dense(table, model, init_packed(table, spec.seed, spec.init_std, dtype))
    model.spec, model.topology = spec, topology
    return model, table


def build_classifier(cfg, n_features: int, n_outputs: int, topology=None, dtype=None, image_shape=None):
    """``(model, table)`` of a run config (see :func:`build_with_table`)."""
    return build_with_table(NetworkSpec.from_config(cfg, n_features, n_outputs, image_shape), topology, dtype)
