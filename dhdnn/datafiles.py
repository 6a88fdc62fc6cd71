"""A user's own data, without code: ``.npz`` files, directories of ``.npy`` arrays (memory-mapped),
CSV files, and ``package.module:function`` factories returning arrays.

Every reader returns arrays that :func:`validate_arrays` checks the same way before anything
trains (shapes, non-finite values, labels, classes, matching features); every error is one line
naming the file (or factory), the key and what was expected (exit code 2). Data without a test
split gets one drawn by ``data.train_fraction`` and ``data.seed``.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, not_text
from .data import Dataset

SPLITS = ("x_train", "y_train", "x_test", "y_test")
CHUNK_ROWS = 1 << 16  # rows checked at once for non-finite values (bounds memory on memory-mapped arrays)


def load_user_data(dc, task: str, source: str = "<config>") -> Dataset:
    """The dataset of ``data.name`` npz, csv or factory (``dc``: the :class:`~dhdnn.config.DataConfig`)."""
    where_cfg = f"{source}: key 'data.path'"
    if dc.name in ("npz", "csv") and not dc.path:
        raise ConfigError(f"{where_cfg}: data.name {dc.name} needs data.path (a file"
                          f"{' or a directory of .npy files' if dc.name == 'npz' else ''})")
    if dc.name == "npz":
        arrays, where = read_npz(Path(dc.path), dc.keys)
    elif dc.name == "csv":
        arrays, where = read_csv_splits(dc, source)
    else:
        arrays, where = call_factory(dc.factory, dc.options or {}, source)
    arrays = _with_test_split(arrays, where, dc.train_fraction, dc.seed)
    name = dc.factory.split(":")[1] if dc.name == "factory" else Path(dc.path).stem  # what pictures call the data
    return validate_arrays(arrays, task, where, dc.n_classes, name=name,
                           class_names=tuple(dc.class_names) if dc.class_names else None)


# ---- readers --------------------------------------------------------------------------------
def read_npz(path: Path, keys: dict | None = None) -> tuple[dict[str, np.ndarray], str]:
    """``x_train, y_train[, x_test, y_test]`` from a ``.npz`` file, or from ``<key>.npy`` files in a
    directory (memory-mapped copy-on-write: a large array is paged in as batches read it).
    ``keys`` maps those names to the names in the file."""
    names = {k: (keys or {}).get(k, k) for k in SPLITS}
    where = str(path)
    if not path.exists():
        raise ConfigError(f"{path}: file not found (data.path)")
    if path.is_dir():
        found = {p.stem: p for p in path.glob("*.npy")}
        load = lambda n: _npy(found[n])  # noqa: E731
    else:
        with open(path, "rb") as f:
            magic = f.read(6)
        if magic == b"\x93NUMPY":
            raise ConfigError(f"{path}: key 'data.path': one .npy array, expected an .npz archive of named arrays "
                              "(np.savez), or a directory of x_train.npy, y_train.npy, ...")
        if not zipfile.is_zipfile(path):
            raise ConfigError(f"{path}: key 'data.path': not an .npz (zip) archive; expected the named arrays "
                              "np.savez writes (x_train, y_train[, x_test, y_test])")
        try:
            archive = np.load(path, allow_pickle=False)
        except Exception as e:
            raise ConfigError(f"{path}: key 'data.path': cannot be read as an .npz archive ({_first_line(e)})") \
                from None
        found = {n: n for n in archive.files}
        load = lambda n: archive[n]  # noqa: E731
    out = {}
    for k in SPLITS:
        n = names[k]
        if n in found:
            try:
                out[k] = load(n)
            except Exception as e:
                raise ConfigError(f"{where}: key '{n}': cannot be read ({_first_line(e)})") from None
        elif k in ("x_train", "y_train"):
            raise ConfigError(f"{where}: key '{n}': missing; the file holds {sorted(found)}; "
                              "name its arrays x_train, y_train (x_test, y_test) or map them with data.keys")
    return out, where


def _npy(path: Path) -> np.ndarray:
    """A ``.npy`` array, memory-mapped copy-on-write (never unpickled)."""
    with open(path, "rb") as f:
        if f.read(6) != b"\x93NUMPY":
            raise ValueError(f"{path.name} is not a .npy array file (np.save writes one)")
    return np.load(path, mmap_mode="c", allow_pickle=False)


def read_csv(path: Path, dc, role: str = "data.path") -> tuple[np.ndarray, np.ndarray, str]:
    """Features and targets of one CSV file: ``data.target`` (a column name or index, or a list
    of them for regression; default the last column), ``data.features`` (default every other
    column), ``data.header`` (auto: a first line that is not all numbers), ``data.delimiter``."""
    if not path.exists():
        raise ConfigError(f"{path}: file not found ({role})")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            first = f.readline()
    except UnicodeDecodeError:
        raise not_text(path, f"a CSV file ({role})") from None
    if not first.strip():
        raise ConfigError(f"{path}: the file is empty ({role})")
    fields = [c.strip().strip('"') for c in first.rstrip("\r\n").split(dc.delimiter)]
    header = dc.header if dc.header != "auto" else not all(_is_number(c) for c in fields)
    names = fields if header else None
    width = len(fields)
    target = dc.target if dc.target is not None else -1
    targets = [_column(path, names, width, t, "data.target") for t in (target if isinstance(target, list) else [target])]
    if dc.features is None:
        feats = [c for c in range(width) if c not in targets]
    else:
        feats = [_column(path, names, width, c, "data.features") for c in dc.features]
    if not feats:
        raise ConfigError(f"{path}: key 'data.features': no feature columns left beside the target")
    cols = feats + targets
    keys = ["data.features"] * len(feats) + ["data.target"] * len(targets)
    try:
        table = np.loadtxt(path, delimiter=dc.delimiter, skiprows=1 if header else 0, ndmin=2, dtype=np.float64,
                           usecols=cols, encoding="utf-8")
        bad = np.argwhere(~np.isfinite(table))
    except UnicodeDecodeError:
        raise not_text(path, f"a CSV file ({role})") from None
    except ValueError as e:
        raise ConfigError(_csv_cell(path, dc.delimiter, header, names, cols, keys) or f"{path}: {_first_line(e)} "
                          "(expected numbers in every used column)") from None
    if len(bad):  # in the file's coordinates: its line (as an editor counts) and the column's name
        raise ConfigError(_csv_cell(path, dc.delimiter, header, names, cols, keys, tuple(bad[0])))
    x, y = table[:, :len(feats)], table[:, len(feats):]
    return x, (y[:, 0] if not isinstance(target, list) else y), str(path)


def read_csv_splits(dc, source: str) -> tuple[dict[str, np.ndarray], str]:
    x, y, where = read_csv(Path(dc.path), dc)
    out = {"x_train": x, "y_train": y}
    if dc.test_path:
        xt, yt, _ = read_csv(Path(dc.test_path), dc, "data.test_path")
        out.update(x_test=xt, y_test=yt)
    return out, where


def _csv_cell(path: Path, delimiter: str, header: bool, names, cols: list[int], keys: list[str],
              at: tuple[int, int] | None = None) -> str | None:
    """The error of a CSV cell as the user sees the file: line number (1-based, as an editor
    counts), column name (or number), the config key that uses it. ``at``: (data row, used
    column) of a non-finite value; else the first cell that is not a number."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip() and not line.lstrip().startswith("#")]
    rows = lines[1:] if header else lines
    for r, (n, line) in enumerate(rows):
        if at is not None and r != at[0]:
            continue
        cells = line.rstrip("\r\n").split(delimiter)
        for i, c in enumerate(cols):
            cell = cells[c].strip().strip('"') if c < len(cells) else ""
            if (at is not None and i == at[1]) or (at is None and not _is_number(cell)):
                name = f"column {names[c]!r}" if names else f"column {c + 1}"
                what = f"non-finite value {cell}" if at is not None else f"{cell!r} is not a number"
                return f"{path}: line {n}, {name} (key '{keys[i]}'): {what}; expected finite numbers in every used column"
    return None


def _column(path: Path, names: list[str] | None, width: int, c, key: str) -> int:
    if isinstance(c, str):
        if names is None:
            raise ConfigError(f"{path}: key '{key}': column {c!r} named, but the file has no header line")
        if c not in names:
            raise ConfigError(f"{path}: key '{key}': no column {c!r}; the header has {names}")
        return names.index(c)
    if isinstance(c, bool) or not isinstance(c, int) or not -width <= c < width:
        raise ConfigError(f"{path}: key '{key}': expected a column name or an index in [-{width}, {width}), "
                          f"got {c!r}")
    return c % width


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def call_factory(spec: str | None, options: dict, source: str) -> tuple[dict[str, np.ndarray], str]:
    """Call ``package.module:function(**data.options)`` (or ``path/to/file.py:function``; a
    module found as a file beside the config or in the working directory is recorded that way).
    It returns a dict with ``x_train, y_train[, x_test, y_test]``, or a tuple ``(x_train,
    y_train, x_test, y_test)`` or ``(x, y)``, of NumPy arrays or tensors. It runs in every
    process of a run, so it must return the same arrays every time."""
    key = f"{source}: key 'data.factory'"
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ConfigError(f"{key}: expected 'package.module:function', got {spec!r}")
    module, func = spec.split(":")
    try:
        mod = _import(module)
    except ImportError as e:
        raise ConfigError(f"{key}: cannot import module {module!r} ({_first_line(e)})") from None
    except Exception as e:
        raise ConfigError(f"{key}: importing {module!r} raised {type(e).__name__}: {_first_line(e)}") from None
    fn = getattr(mod, func, None)
    if not callable(fn):
        raise ConfigError(f"{key}: module {module!r} has no function {func!r}")
    try:
        got = fn(**options)
    except Exception as e:
        raise ConfigError(f"{spec}: the factory raised {type(e).__name__}: {_first_line(e)}") from None
    if isinstance(got, dict):
        unknown = set(got) - set(SPLITS)
        if unknown or not {"x_train", "y_train"} <= set(got):
            raise ConfigError(f"{spec}: returned keys {sorted(got)}; expected x_train, y_train (x_test, y_test)")
        arrays = dict(got)
    elif isinstance(got, (tuple, list)) and len(got) in (2, 4):
        arrays = dict(zip(SPLITS, got))
    else:
        raise ConfigError(f"{spec}: returned {type(got).__name__}; expected a dict of arrays or a tuple "
                          "(x_train, y_train, x_test, y_test) or (x, y)")
    out = {}
    for k, v in arrays.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu().numpy()
        try:
            out[k] = np.asarray(v)
        except Exception as e:
            raise ConfigError(f"{spec}: key '{k}': not an array ({_first_line(e)})") from None
    return out, spec


def _import(module: str):
    """A module by dotted name, or by the path of its ``.py`` file."""
    if not module.endswith(".py"):
        return importlib.import_module(module)
    path = Path(module)
    if not path.is_file():
        raise ImportError(f"no file {path}")
    name = f"dhdnn_factory_{abs(hash(str(path.resolve())))}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _with_test_split(arrays: dict, where: str, train_fraction: float, seed: int) -> dict:
    """A seeded test split drawn from the training arrays where the data has none."""
    if ("x_test" in arrays) != ("y_test" in arrays):
        have, miss = ("x_test", "y_test") if "x_test" in arrays else ("y_test", "x_test")
        raise ConfigError(f"{where}: key '{miss}': missing while '{have}' is given; give both or neither")
    if "x_test" in arrays:
        return arrays
    x, y = arrays["x_train"], arrays["y_train"]
    n = len(x) if np.ndim(x) else 0
    n_train = int(round(train_fraction * n))
    if not 0 < n_train < n:
        raise ConfigError(f"{where}: key 'x_train': {n} samples and data.train_fraction {train_fraction} leave an "
                          "empty train or test split; expected at least 2 samples, or x_test and y_test")
    if len(y) != n:
        raise ConfigError(f"{where}: key 'y_train': {len(y)} targets for {n} samples; expected one per sample")
    perm = np.random.default_rng(seed).permutation(n)
    tr, te = np.sort(perm[:n_train]), np.sort(perm[n_train:])
    return {"x_train": x[tr], "y_train": y[tr], "x_test": x[te], "y_test": y[te]}


# ---- validation -----------------------------------------------------------------------------
def validate_arrays(arrays: dict[str, np.ndarray], task: str, where: str, n_classes: int | None = None,
                    name: str = "arrays", class_names: tuple[str, ...] | None = None) -> Dataset:
    """Check a user's arrays and build the dataset; one-line :class:`ConfigError` naming
    ``where`` (a file or factory) and the key on the first problem found."""
    xs = {s: _features(arrays[f"x_{s}"], where, f"x_{s}") for s in ("train", "test")}
    image_shape = None
    if arrays["x_train"].ndim >= 3:  # images: (N, H, W) or (N, C, H, W), flattened row-major
        shp = arrays["x_train"].shape[1:]
        image_shape = (1, *shp) if len(shp) == 2 else tuple(shp) if len(shp) == 3 else None
    if xs["test"].shape[1] != xs["train"].shape[1]:
        raise ConfigError(f"{where}: key 'x_test': {xs['test'].shape[1]} features per sample, x_train has "
                          f"{xs['train'].shape[1]}; expected the same features")
    ys = {}
    for s in ("train", "test"):
        y = np.asarray(arrays[f"y_{s}"])
        count = len(y) if y.ndim else 0  # a scalar holds no target per sample
        if count != len(xs[s]):
            raise ConfigError(f"{where}: key 'y_{s}': {count} targets for {len(xs[s])} samples; expected one per "
                              "sample")
        ys[s] = y
    if task == "classify":
        k = _check_labels(ys, where, n_classes)
        y_t = {s: torch.from_numpy(ys[s].reshape(-1).astype(np.int64)) for s in ys}
    else:
        k = 0
        y_t = {s: torch.from_numpy(_targets(ys[s], where, f"y_{s}")) for s in ys}
        if y_t["test"].shape[1] != y_t["train"].shape[1]:
            raise ConfigError(f"{where}: key 'y_test': {y_t['test'].shape[1]} targets per sample, y_train has "
                              f"{y_t['train'].shape[1]}; expected the same")
    x_t = {s: _tensor(xs[s]) for s in xs}
    return Dataset(name, x_t["train"], y_t["train"], x_t["test"], y_t["test"], k, image_shape=image_shape,
                   task=task, class_names=class_names, source=where)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _features(x, where: str, key: str) -> np.ndarray:
    x = np.asarray(x) if not isinstance(x, np.ndarray) else x
    if x.ndim < 2 or x.shape[0] == 0:
        raise ConfigError(f"{where}: key '{key}': expected a non-empty (samples, features) array, got shape "
                          f"{x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer) or x.dtype == bool):
        raise ConfigError(f"{where}: key '{key}': expected numbers, got dtype {x.dtype}")
    x = x.reshape(len(x), -1)
    _check_finite(x, where, key)
    return x


def _check_finite(a: np.ndarray, where: str, key: str) -> None:
    if not np.issubdtype(a.dtype, np.floating):
        return
    for start in range(0, len(a), CHUNK_ROWS):
        bad = ~np.isfinite(a[start:start + CHUNK_ROWS])
        if bad.any():
            row, col = np.argwhere(bad)[0]
            value = a[start + row][col] if a.ndim > 1 else a[start + row]
            where_in = f"row {start + row}, column {col}" if a.ndim > 1 else f"row {start + row}"
            raise ConfigError(f"{where}: key '{key}': non-finite value {value} at {where_in}; expected finite numbers")


def _check_labels(ys: dict, where: str, n_classes: int | None) -> int:
    for s, y in ys.items():
        if y.ndim > 2 or (y.ndim == 2 and y.shape[1] != 1):
            raise ConfigError(f"{where}: key 'y_{s}': class labels must be one integer per sample, got shape "
                              f"{y.shape} (for real-valued targets set model.task: regress)")
        flat = y.reshape(-1)
        if not (np.issubdtype(flat.dtype, np.integer) or np.issubdtype(flat.dtype, np.floating) or flat.dtype == bool):
            raise ConfigError(f"{where}: key 'y_{s}': class labels must be integers, got dtype {flat.dtype}")
        if np.issubdtype(flat.dtype, np.floating):
            _check_finite(flat, where, f"y_{s}")
            frac = np.flatnonzero(flat != np.round(flat))
            if len(frac):
                raise ConfigError(f"{where}: key 'y_{s}': class labels must be integers, got {flat[frac[0]]} at row "
                                  f"{frac[0]} (for real-valued targets set model.task: regress)")
        neg = np.flatnonzero(flat < 0)
        if len(neg):
            raise ConfigError(f"{where}: key 'y_{s}': class labels must be >= 0, got {flat[neg[0]]} at row {neg[0]}")
    present = np.unique(ys["train"])
    if len(present) < 2:
        raise ConfigError(f"{where}: key 'y_train': only {len(present)} class ({present.tolist()}) in the training "
                          "labels; expected at least 2 classes")
    k = int(ys["train"].max()) + 1 if n_classes is None else n_classes  # test labels: classes seen in training
    for s, y in ys.items():
        out = np.flatnonzero(y.reshape(-1) >= k)
        if len(out):
            raise ConfigError(f"{where}: key 'y_{s}': label {y.reshape(-1)[out[0]]} at row {out[0]} is out of range "
                              f"for {k} classes ({'data.n_classes' if n_classes else 'the training labels'}); "
                              f"expected labels in [0, {k})")
    return k


def _targets(y: np.ndarray, where: str, key: str) -> np.ndarray:
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2 or y.shape[1] == 0:
        raise ConfigError(f"{where}: key '{key}': regression targets must be (samples,) or (samples, outputs), "
                          f"got shape {y.shape}")
    if not (np.issubdtype(y.dtype, np.floating) or np.issubdtype(y.dtype, np.integer)):
        raise ConfigError(f"{where}: key '{key}': expected numbers, got dtype {y.dtype}")
    _check_finite(y, where, key)
    return np.ascontiguousarray(y, dtype=np.float64 if y.dtype != np.float32 else np.float32)


def _tensor(x: np.ndarray) -> torch.Tensor:
    """A float tensor of the features; float arrays (memory-mapped ones too) without a copy."""
    if x.dtype in (np.float32, np.float64) and x.flags.writeable and x.flags.c_contiguous:
        return torch.from_numpy(x)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64 if x.dtype != np.float32 else np.float32))
