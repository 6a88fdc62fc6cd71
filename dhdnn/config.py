"""Run configuration: one dataclass per YAML section, validation, ``--set`` overrides.

A run config has the sections ``model``, ``topology``, ``data``, ``train`` and ``run``.
Every error names the file, the key and what was expected.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


DTYPE_NAMES = ("float32", "float64")  # run.dtype and the CLI's --dtype (train.DTYPES maps them to torch dtypes)
BACKPROPS = ("autograd", "reversible")  # run.backprop and the CLI's --backprop
PLACEMENTS = ("packed", "spread")  # run.placement besides auto (distributed.mesh.ParallelDims)


class ConfigError(ValueError):
    """A bad config value; the message names the source, the key and what was expected."""

    exit_code = 2


class Loader(yaml.SafeLoader):
    """``yaml.safe_load`` that also reads ``1e-3`` as a number (YAML 1.2; YAML 1.1 wants ``1.0e-3``)
    and refuses a key written twice in one mapping (plain YAML keeps the last, silently)."""

    def construct_mapping(self, node, deep=False):
        first = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in first:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first at line {first[key] + 1})", key_node.start_mark)
                first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


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


def is_int(v) -> bool:
    """An integer and not a bool (YAML's true is an int to Python)."""
    return isinstance(v, int) and not isinstance(v, bool)


def _int(key, v, lo: int = 1, hi: int | None = None, also=()) -> None:
    """An integer in ``[lo, hi]`` (or one of the words ``also``)."""
    what = "a positive integer" if lo == 1 and hi is None else f"an integer >= {lo}" if hi is None \
        else f"an integer in [{lo}, {hi}]"
    _expect(v in also or (is_int(v) and v >= lo and (hi is None or v <= hi)), key,
            " or ".join([what, *map(repr, also)]), v)


def _number(key, v, positive: bool = True) -> None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > 0 if positive else v >= 0)
    _expect(ok, key, "a positive number" if positive else "a non-negative number", v)


def _choice(key, v, options):
    _expect(v in options, key, f"one of {list(options)}", v)


def _flag(key, v, auto: bool = False):
    _expect(isinstance(v, bool) or (auto and v == "auto"), key, "true, false or auto" if auto else "true or false", v)


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
    task: str = "classify"  # classify (cross-entropy, accuracy) or regress (mean squared error on real targets)

    def __post_init__(self):
        from .models import ARCHITECTURES, NETWORKS
        from .tasks import TASKS

        _choice("arch", self.arch, list(ARCHITECTURES))
        _choice("task", self.task, list(TASKS))
        _choice("network", self.network, list(NETWORKS))
        for key in ("channels", "dim", "layers"):
            _int(key, getattr(self, key))
        _number("h", self.h)
        _choice("J", self.J, ("J1", "J2"))
        if self.init_std is not None:
            _number("init_std", self.init_std)
        if self.feature_index is not None:
            _expect(isinstance(self.feature_index, list)
                    and all(isinstance(i, int) and 0 <= i < self.dim for i in self.feature_index),
                    "feature_index", f"a list of state indices in [0, {self.dim})", self.feature_index)


@dataclass
class DataConfig:
    name: str | None = None  # None: swiss_roll, or factory when data.factory is given
    n_samples: int = 8000  # 2-D generators
    train_fraction: float = 0.5  # share of the samples for training where the data has no test split
    noise: float = 0.0  # 2-D generators
    seed: int = 0  # draws generated points and splits
    path: str | None = None  # mnist/fashion_mnist: a directory of IDX files; npz: an .npz file or a directory
    # of .npy files; csv: a file (relative paths: the working directory, else beside the config)
    test_path: str | None = None  # csv: a separate test file (else a test split is drawn from path)
    keys: dict | None = None  # npz: array names in the file for x_train, y_train, x_test, y_test
    target: Any = None  # csv: target column (name or index; a list for several regression targets); None: last
    features: list | None = None  # csv: feature columns (names or indices); None: every other column
    header: Any = "auto"  # csv: the first line names the columns (auto: when it is not all numbers)
    delimiter: str = ","  # csv
    factory: str | None = None  # "package.module:function" returning the arrays
    options: dict | None = None  # keyword arguments for the factory
    n_classes: int | None = None  # classification: number of classes (None: largest label + 1)
    class_names: list | None = None  # class names for pictures (fashion_mnist has its own)

    def __post_init__(self):
        from .data import DATASETS

        if self.name is None:
            self.name = "factory" if self.factory is not None else "swiss_roll"
        _choice("name", self.name, DATASETS)
        _expect((self.factory is not None) == (self.name == "factory"), "factory",
                "'package.module:function' with data.name factory (and only then)", self.factory)
        _expect(self.keys is None or (isinstance(self.keys, dict) and set(self.keys) <= {
            "x_train", "y_train", "x_test", "y_test"} and all(isinstance(v, str) for v in self.keys.values())),
            "keys", "a mapping from x_train/y_train/x_test/y_test to array names", self.keys)
        _flag("header", self.header, auto=True)
        _expect(isinstance(self.delimiter, str) and len(self.delimiter) == 1, "delimiter", "one character",
                self.delimiter)
        _expect(self.options is None or isinstance(self.options, dict), "options", "a mapping of keyword arguments",
                self.options)
        if self.n_classes is not None:
            _int("n_classes", self.n_classes, 2)
        _expect(self.class_names is None or (isinstance(self.class_names, list)
                                             and all(isinstance(c, str) for c in self.class_names)),
                "class_names", "a list of strings", self.class_names)
        _int("n_samples", self.n_samples)
        _expect(isinstance(self.train_fraction, (int, float)) and 0 < self.train_fraction < 1,
                "train_fraction", "a number strictly between 0 and 1", self.train_fraction)
        _number("noise", self.noise, positive=False)
        _expect(is_int(self.seed), "seed", "an integer", self.seed)
        self._check_read()

    def _check_read(self) -> None:
        """A key set for a source that never reads it would be silently ignored: refused."""
        reads = DATA_KEYS[self.name] + ("name", "class_names")
        for f in dataclasses.fields(self):
            if f.name not in reads and getattr(self, f.name) != f.default:
                raise ValueError(f"{f.name}: expected no {f.name} with data.name {self.name}, which reads only "
                                 f"{', '.join(k for k in reads if k != 'name')}, got {getattr(self, f.name)!r}")


# the keys each data source reads (besides name and class_names): generated points, the 8x8 digits
# (a seeded split), IDX directories (a fixed split), and a user's own arrays
_POINTS = ("n_samples", "train_fraction", "noise", "seed")
_OWN = ("path", "train_fraction", "seed", "n_classes")
DATA_KEYS = {"swiss_roll": _POINTS, "double_circles": _POINTS, "double_moons": _POINTS,
             "digits": ("train_fraction", "seed"), "mnist": ("path",), "fashion_mnist": ("path",),
             "npz": _OWN + ("keys",), "csv": _OWN + ("test_path", "target", "features", "header", "delimiter"),
             "factory": ("factory", "options", "train_fraction", "seed", "n_classes")}


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
        _int("epochs", self.epochs)
        _int("batch_size", self.batch_size)
        _choice("optimizer", self.optimizer, ("adam", "sgd"))
        for key in ("lr", "lr_gamma"):
            _number(key, getattr(self, key))
        for key in ("alpha", "weight_decay"):
            _number(key, getattr(self, key), positive=False)
        _expect(is_int(self.seed), "seed", "an integer", self.seed)
        for key in ("lr_step", "grad_norm_every", "checkpoint_every"):
            _int(key, getattr(self, key), 0)


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    workers: int = 1
    engine: str = "auto"  # auto: sharded (topology networks) or replicated dense (conv) on workers, else dense
    dtype: str = "float32"
    device: str = "cpu"
    backend: str = "auto"  # auto: gloo on CPU, nccl on CUDA
    timeout_s: float = 120.0  # process-group timeout: a dead peer fails the run within this
    readout: str = "tree"  # tree (neighbour ranks only) or allreduce (explicit collective)
    local_kernel: str = "auto"  # sharded local compute: auto, blocks (gathered per-block products), diagonal
    # (blocks along graph offsets, products on views: regular graphs), dense (assembled matrices) or fused
    # (the block products compiled with numba; CPU)
    trace: bool = False
    threads: int = 1  # torch threads per worker
    progress: bool = True
    replicas: int | str = 1  # data-parallel replicas (workers = agent partitions x replicas); auto: measured choice
    placement: str = "auto"  # agent groups on nodes: packed (inside a node, replicas across nodes), spread
    # (across nodes, replicas side by side), auto (packed; with replicas auto, measured on several nodes)
    backprop: str = "autograd"  # autograd (keep every layer's state) or reversible (rebuild states; H2)
    reversible_state: str = "fixed"  # reversible: fixed (int64 fixed point: rebuilt bit for bit) or float
    reversible_fraction_bits: int | None = None  # fixed: grid 2^-F; None: 32 (float32), 48 (float64)
    reversible_anchor_every: int | str = 0  # float: store the state every k layers (bounds drift); 0 = never;
    # auto: none until an epoch's drift exceeds reversible_tolerance, then twice as many each such epoch
    reversible_tolerance: float | None = None  # float: the drift that warns (None: 1e-5 float32, 1e-10 float64)
    pin_workers: bool = True  # give each local worker its own cores when they fit
    tensorboard: bool | str = "auto"  # metrics also as TensorBoard scalars (RUN/tensorboard); auto: if installed

    def __post_init__(self):
        _int("workers", self.workers)
        _choice("engine", self.engine, ("auto", "dense", "sharded"))
        _choice("dtype", self.dtype, DTYPE_NAMES)
        _expect(isinstance(self.device, str) and (self.device == "cpu" or self.device.startswith("cuda")),
                "device", "'cpu' or 'cuda'", self.device)
        _choice("backend", self.backend, ("auto", "gloo", "nccl"))
        _number("timeout_s", self.timeout_s)
        _choice("readout", self.readout, ("tree", "allreduce"))
        from .integrator import CARRIERS, KERNELS, fused

        _choice("local_kernel", self.local_kernel, ["auto", *KERNELS])
        if self.local_kernel == "fused":
            why = fused.available(self.device)
            _expect(why is None, "local_kernel", f"a kernel that runs here ({why})", self.local_kernel)
        _flag("trace", self.trace)
        _int("threads", self.threads)
        _int("replicas", self.replicas, also=("auto",))
        _choice("placement", self.placement, ("auto", *PLACEMENTS))
        _choice("backprop", self.backprop, BACKPROPS)
        _choice("reversible_state", self.reversible_state, CARRIERS)
        _int("reversible_anchor_every", self.reversible_anchor_every, 0, also=("auto",))
        if self.reversible_fraction_bits is not None:
            _int("reversible_fraction_bits", self.reversible_fraction_bits, 8, 60)
        if self.reversible_tolerance is not None:
            _number("reversible_tolerance", self.reversible_tolerance)
        _flag("pin_workers", self.pin_workers)
        _flag("tensorboard", self.tensorboard, auto=True)

    @property
    def anchors(self) -> int:
        """The anchor spacing a run starts with (``auto`` starts without anchors)."""
        return 0 if self.reversible_anchor_every == "auto" else self.reversible_anchor_every

    def tolerance(self) -> float:
        """The float rebuild's drift above which a run warns (and ``auto`` adds anchors)."""
        if self.reversible_tolerance is not None:
            return self.reversible_tolerance
        return 1e-5 if self.dtype == "float32" else 1e-10


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
    if hint in (float, float | None) and is_int(v):
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
        topo = os.path.normpath(cand) if cand.exists() or not Path(topo).exists() else topo
    if isinstance(topo, str) and source != "<overrides>" and not Path(topo).is_file():
        raise ConfigError(f"{source}: key 'topology': {topo}: file not found (a relative path is read beside the "
                          "config file, else in the working directory)")
    _anchor_data_paths(parts["data"], source)
    return Config(topology=topo, source=source, **parts)


def _anchor_data_paths(dc: "DataConfig", source: str) -> None:
    """Data files given relative to the working directory, or else to the config file, and a
    factory module found as a file there, become absolute: a run directory's config then reads
    the same data from anywhere."""
    here = [Path.cwd()] + ([Path(source).parent] if not source.startswith("<") else [])
    for key in ("path", "test_path"):
        value = getattr(dc, key)
        if value and not Path(value).is_absolute():
            found = next((d / value for d in here if (d / value).exists()), None)
            if found is not None:
                setattr(dc, key, str(found.resolve()))
    if dc.factory and dc.factory.count(":") == 1:
        module, func = dc.factory.split(":")
        if not module.endswith(".py"):
            module = module.replace(".", "/") + ".py"
        found = next((d / module for d in here if (d / module).is_file()), None)
        if found is not None:
            dc.factory = f"{found.resolve()}:{func}"


def not_text(path: Path, expected: str) -> ConfigError:
    """Where a file stops being UTF-8 text, in its own coordinates (the line, as an editor counts)."""
    raw, at = Path(path).read_bytes(), ""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        at = f" (line {line}, byte {raw[e.start]:#04x})"
    return ConfigError(f"{path}: not UTF-8 text{at}; expected {expected}")


def read_yaml(path: str | Path) -> Any:
    """``yaml.safe_load`` a file; syntax errors name the file and the line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise not_text(path, "a YAML file") from None
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
    """Apply ``section.key=value`` strings (values parsed as YAML) to a raw config mapping;
    ``section.key.sub=value`` sets one entry of a mapping-valued key (``data.options.seed=3``)."""
    raw = dict(raw or {})
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source} {item!r}: expected section.key=value")
        dotted, value = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) == 1 and parts[0] == "topology":
            raw["topology"] = yaml_load(value)
            continue
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"{source} {item!r}: expected section.key=value (e.g. train.lr=0.01)")
        section, key, *sub = parts
        if section not in SECTIONS:
            raise ConfigError(f"{source} {item!r}: unknown section {section!r}; expected one of {sorted(SECTIONS)}")
        try:
            parsed = yaml_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"{source} {item!r}: value is not valid YAML") from None
        sec = dict(raw.get(section) or {})
        if sub:  # into a mapping-valued key, keeping its other entries
            node = sec[key] = dict(sec.get(key) or {}) if isinstance(sec.get(key) or {}, dict) else {}
            for k in sub[:-1]:
                node = node.setdefault(k, {}) if isinstance(node.get(k, {}), dict) else {}
            node[sub[-1]] = parsed
        else:
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
