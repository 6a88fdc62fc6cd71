"""Run configuration: one dataclass per YAML section, validation, ``--set`` overrides.

A run config has the sections ``model``, ``topology``, ``data``, ``train`` and ``run``.
Every error names the file, the key and what was expected.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad config value; the message names the source, the key and what was expected."""

    exit_code = 2


class Loader(yaml.SafeLoader):
    """``yaml.safe_load`` that also reads ``1e-3`` as a number (YAML 1.2; YAML 1.1 wants ``1.0e-3``)."""


Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def yaml_load(text: str):
    return yaml.load(text, Loader=Loader)


def _expect(cond: bool, key: str, expected: str, got) -> None:
    if not cond:
        raise ValueError(f"{key}: expected {expected}, got {got!r}")


def _pos_int(key, v):
    _expect(isinstance(v, int) and not isinstance(v, bool) and v > 0, key, "a positive integer", v)


def _nonneg(key, v):
    _expect(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0,
            key, "a non-negative number", v)


def _pos(key, v):
    _expect(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0,
            key, "a positive number", v)


def _choice(key, v, options):
    _expect(v in options, key, f"one of {list(options)}", v)


ARCH_NAMES = ("H1", "H2", "MS1", "MS2", "MS3", "ResNet", "MLP")


@dataclass
class ModelConfig:
    arch: str = "H2"
    dim: int = 4  # state dimension n (ignored with a topology: n = 2 * sum of agent dims)
    layers: int = 64
    h: float = 0.5
    J: str = "J1"  # H1 only
    init_std: float | None = None  # None: the architecture's default
    feature_index: list[int] | None = None  # state index of each input feature (no topology)
    network: str = "state"  # state: features placed into the H-DNN's state; conv: the paper's image network
    channels: int = 8  # conv: 3x3 convolution channels = the H-DNN's state dimension on every pixel

    def __post_init__(self):
        _choice("arch", self.arch, ARCH_NAMES)
        _choice("network", self.network, ("state", "conv"))
        _pos_int("channels", self.channels)
        _pos_int("dim", self.dim)
        _pos_int("layers", self.layers)
        _pos("h", self.h)
        _choice("J", self.J, ("J1", "J2"))
        if self.init_std is not None:
            _pos("init_std", self.init_std)
        if self.feature_index is not None:
            _expect(isinstance(self.feature_index, list)
                    and all(isinstance(i, int) and 0 <= i < self.dim for i in self.feature_index),
                    "feature_index", f"a list of state indices in [0, {self.dim})", self.feature_index)


@dataclass
class DataConfig:
    name: str = "swiss_roll"
    n_samples: int = 8000
    train_fraction: float = 0.5
    noise: float = 0.0
    seed: int = 0
    path: str | None = None  # directory of local files (mnist)

    def __post_init__(self):
        from .data import DATASETS

        _choice("name", self.name, DATASETS)
        _pos_int("n_samples", self.n_samples)
        _expect(isinstance(self.train_fraction, (int, float)) and 0 < self.train_fraction < 1,
                "train_fraction", "a number strictly between 0 and 1", self.train_fraction)
        _nonneg("noise", self.noise)
        _expect(isinstance(self.seed, int), "seed", "an integer", self.seed)


@dataclass
class TrainConfig:
    epochs: int = 50
    batch_size: int = 125
    optimizer: str = "adam"
    lr: float = 0.05
    lr_step: int = 0  # multiply lr by lr_gamma every lr_step epochs; 0 = constant
    lr_gamma: float = 0.8
    alpha: float = 5e-4  # smoothness regulariser across depth
    weight_decay: float = 5e-4  # on the readout weights
    seed: int = 0
    grad_norm_every: int = 0  # record ||dloss/dy_j|| for every layer every k steps; 0 = off
    checkpoint_every: int = 1  # epochs between checkpoints; 0 = only at the end

    def __post_init__(self):
        _pos_int("epochs", self.epochs)
        _pos_int("batch_size", self.batch_size)
        _choice("optimizer", self.optimizer, ("adam", "sgd"))
        _pos("lr", self.lr)
        _expect(isinstance(self.lr_step, int) and self.lr_step >= 0, "lr_step", "an integer >= 0", self.lr_step)
        _pos("lr_gamma", self.lr_gamma)
        _nonneg("alpha", self.alpha)
        _nonneg("weight_decay", self.weight_decay)
        _expect(isinstance(self.seed, int), "seed", "an integer", self.seed)
        _expect(isinstance(self.grad_norm_every, int) and self.grad_norm_every >= 0,
                "grad_norm_every", "an integer >= 0", self.grad_norm_every)
        _expect(isinstance(self.checkpoint_every, int) and self.checkpoint_every >= 0,
                "checkpoint_every", "an integer >= 0", self.checkpoint_every)


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    workers: int = 1
    engine: str = "auto"  # auto: sharded when workers > 1 or under torchrun, else dense
    dtype: str = "float32"
    device: str = "cpu"
    backend: str = "auto"  # auto: gloo on CPU, nccl on CUDA
    timeout_s: float = 120.0  # process-group timeout: a dead peer fails the run within this
    readout: str = "tree"  # tree (neighbour ranks only) or allreduce (explicit collective)
    local_kernel: str = "auto"  # sharded local compute: auto, blocks (per-block products) or dense
    trace: bool = False
    threads: int = 1  # torch threads per worker
    progress: bool = True
    replicas: int | str = 1  # data-parallel replicas (workers = agent partitions x replicas); auto: measured choice
    backprop: str = "autograd"  # autograd (keep every layer's state) or reversible (rebuild states; H2)
    reversible_anchor_every: int = 0  # reversible: store the state every k layers (bounds float drift); 0 = never
    pin_workers: bool = True  # give each local worker its own cores when they fit
    tensorboard: bool | str = "auto"  # metrics also as TensorBoard scalars (RUN/tensorboard); auto: if installed

    def __post_init__(self):
        _pos_int("workers", self.workers)
        _choice("engine", self.engine, ("auto", "dense", "sharded"))
        _choice("dtype", self.dtype, ("float32", "float64"))
        _expect(isinstance(self.device, str) and (self.device == "cpu" or self.device.startswith("cuda")),
                "device", "'cpu' or 'cuda'", self.device)
        _choice("backend", self.backend, ("auto", "gloo", "nccl"))
        _pos("timeout_s", self.timeout_s)
        _choice("readout", self.readout, ("tree", "allreduce"))
        _choice("local_kernel", self.local_kernel, ("auto", "blocks", "dense"))
        _expect(isinstance(self.trace, bool), "trace", "true or false", self.trace)
        _pos_int("threads", self.threads)
        _expect(self.replicas == "auto" or (isinstance(self.replicas, int) and not isinstance(self.replicas, bool)
                                            and self.replicas > 0), "replicas", "a positive integer or 'auto'",
                self.replicas)
        _choice("backprop", self.backprop, ("autograd", "reversible"))
        _expect(isinstance(self.reversible_anchor_every, int) and not isinstance(self.reversible_anchor_every, bool)
                and self.reversible_anchor_every >= 0, "reversible_anchor_every", "an integer >= 0",
                self.reversible_anchor_every)
        _expect(isinstance(self.pin_workers, bool), "pin_workers", "true or false", self.pin_workers)
        _expect(self.tensorboard in (True, False, "auto"), "tensorboard", "true, false or auto", self.tensorboard)
        _expect(self.engine != "dense" or self.workers == 1, "workers",
                "1 with engine: dense (the dense model runs in one process)", self.workers)


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "run": RunConfig}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    topology: Any = None  # a path to a topology YAML file, or the topology inline (a mapping)
    source: str = "<config>"  # where the config came from, for error messages

    def to_dict(self) -> dict:
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        out["topology"] = self.topology
        return out


def _section(source: str, name: str, cls, raw) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: key '{name}': expected a mapping, got {type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{source}: key '{name}.{key}': unknown key; expected one of {sorted(known)}")
    hints = typing.get_type_hints(cls)
    vals = {k: _coerce(v, hints[k]) for k, v in raw.items()}
    try:
        return cls(**vals)
    except ValueError as e:
        key, _, rest = str(e).partition(": ")
        raise ConfigError(f"{source}: key '{name}.{key}': {rest}") from None


def _coerce(v, hint):
    """Accept ints where floats are expected (YAML writes 1 for 1.0)."""
    if hint in (float, float | None) and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    return v


def config_from_dict(raw: Any, source: str = "<config>") -> Config:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with sections {sorted(SECTIONS) + ['topology']}, "
                          f"got {type(raw).__name__}")
    for key in raw:
        if key not in SECTIONS and key != "topology":
            raise ConfigError(f"{source}: key '{key}': unknown section; expected one of "
                              f"{sorted(SECTIONS) + ['topology']}")
    parts = {name: _section(source, name, cls, raw.get(name)) for name, cls in SECTIONS.items()}
    topo = raw.get("topology")
    if topo is not None and not isinstance(topo, (str, dict)):
        raise ConfigError(f"{source}: key 'topology': expected a file path or an inline mapping, "
                          f"got {type(topo).__name__}")
    if isinstance(topo, str) and not Path(topo).is_absolute() and source not in ("<config>", "<overrides>"):
        # relative topology paths are relative to the config file, so configs travel with their graphs
        cand = Path(source).parent / topo
        topo = str(cand) if cand.exists() or not Path(topo).exists() else topo
    return Config(topology=topo, source=source, **parts)


def read_yaml(path: str | Path) -> Any:
    """``yaml.safe_load`` a file; syntax errors name the file and the line."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return yaml_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{path}:{where}: invalid YAML: {problem}") from None


def apply_overrides(raw: dict, overrides: list[str], source: str = "--set") -> dict:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a raw config mapping."""
    raw = dict(raw or {})
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source} {item!r}: expected section.key=value")
        dotted, value = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) == 1 and parts[0] == "topology":
            raw["topology"] = yaml_load(value)
            continue
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"{source} {item!r}: expected section.key=value (e.g. train.lr=0.01)")
        section, key = parts
        if section not in SECTIONS:
            raise ConfigError(f"{source} {item!r}: unknown section {section!r}; expected one of {sorted(SECTIONS)}")
        try:
            parsed = yaml_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"{source} {item!r}: value is not valid YAML") from None
        sec = dict(raw.get(section) or {})
        sec[key] = parsed
        raw[section] = sec
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a run config file (or defaults when ``path`` is None) and apply overrides."""
    raw = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "<config>"
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    raw = apply_overrides(raw or {}, overrides or [])
    return config_from_dict(raw, source)
