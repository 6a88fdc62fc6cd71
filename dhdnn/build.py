"""Networks from a description: :class:`NetworkSpec`, and the dense model it builds.

A spec is everything that defines a network besides its topology and its weights:
architecture, depth, step, input and output sizes, task, initialisation. A run config, a
checkpoint's metadata, an export file and the library (:func:`build_network`,
:func:`dhdnn.distributed.distribute`) all speak it, so one network is built the same way
everywhere. With a topology the dense model is masked by the agent graph and initialised
from the per-agent blocks (``blocks.py``): the same network the sharded engine builds on
any number of workers.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .models import ARCHITECTURES, Classifier, build_model
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
    network: str = "state"  # state, or conv: the paper's image network (a convolution, the H-DNN per pixel)
    channels: int = 8  # conv: channels = the per-pixel state dimension
    image_shape: tuple[int, int, int] | None = None  # conv: (channels, rows, cols) of the input images

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"arch: expected one of {sorted(ARCHITECTURES)}, got {self.arch!r}")
        if self.task not in TASKS:
            raise ValueError(f"task: expected one of {sorted(TASKS)}, got {self.task!r}")
        for k in ("layers", "n_features", "n_outputs", "channels"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{k}: expected a positive integer, got {v!r}")
        if self.network not in ("state", "conv"):
            raise ValueError(f"network: expected state or conv, got {self.network!r}")
        if self.network == "conv" and self.image_shape is None:
            raise ValueError("image_shape: the conv network needs the (channels, rows, cols) of its images")
        for k in ("feature_index", "image_shape"):  # lists from YAML or JSON
            if getattr(self, k) is not None:
                object.__setattr__(self, k, tuple(getattr(self, k)))

    @classmethod
    def from_config(cls, cfg, n_features: int, n_outputs: int, image_shape=None) -> "NetworkSpec":
        """The spec of a run config (``model`` section, ``train.seed``) for data of this shape."""
        mc = cfg.model
        return cls(arch=mc.arch, layers=mc.layers, h=mc.h, n_features=n_features, n_outputs=n_outputs, task=mc.task,
                   J=mc.J, init_std=mc.init_std, seed=cfg.train.seed, dim=mc.dim, feature_index=mc.feature_index,
                   network=mc.network, channels=mc.channels, image_shape=image_shape if mc.network == "conv" else None)

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
    dtype = dtype or torch.get_default_dtype()
    options = spec.options()
    gen = torch.Generator().manual_seed(spec.seed)
    table = None
    if spec.network == "conv":
        from .models.conv import ConvClassifier

        torch.manual_seed(spec.seed)  # the convolution and readout initialise from torch's generator
        body = build_model(spec.arch, spec.channels, spec.layers, spec.h, generator=gen, **options)
        model = ConvClassifier(body, spec.image_shape, spec.n_outputs).to(dtype)
    elif topology is None:
        from .models.network import InputPlacement

        if spec.dim is None:
            raise ValueError("dim: a network without a topology needs its state dimension")
        placement = InputPlacement(tuple(spec.feature_index)) if spec.feature_index is not None else None
        body = build_model(spec.arch, spec.dim, spec.layers, spec.h, generator=gen, **options)
        model = Classifier(body, spec.n_features, spec.n_outputs, placement).to(dtype)
    else:
        model, table = _topology_network(spec, topology, gen, options, dtype)
    model.spec, model.topology = spec, topology
    return model, table


def _topology_network(spec: NetworkSpec, topology, gen, options, dtype):
    from .blocks import BlockTable, init_packed, load_dense
    from .models.hamiltonian import NotDistributable
    from .topology import dense_masks

    body = build_model(spec.arch, topology.state_dim, spec.layers, spec.h,
                       mask=dense_masks(topology, spec.arch, spec.J), generator=gen, **options)
    model = Classifier(body, spec.n_features, spec.n_outputs, topology.placement(spec.n_features),
                       topology.readout_state_indices()).to(dtype)
    try:
        layout = ARCHITECTURES[spec.arch].agent_layout(**options)
    except NotDistributable:  # a centralised architecture, masked: no per-agent form
        return model, None
    table = BlockTable(topology, layout, spec.layers, spec.n_outputs)
    load_dense(table, model, init_packed(table, spec.seed, spec.init_std, dtype))
    return model, table


def build_classifier(cfg, n_features: int, n_outputs: int, topology=None, dtype=None, image_shape=None):
    """``(model, table)`` of a run config (see :func:`build_with_table`)."""
    return build_with_table(NetworkSpec.from_config(cfg, n_features, n_outputs, image_shape), topology, dtype)
