"""Datasets: seeded 2-D generators, scikit-learn's 8x8 digits and local IDX image files (a user's
own arrays: ``datafiles.py``). Nothing is downloaded. A :class:`Dataset` holds float features and
integer labels (classification) or real ``(N, outputs)`` targets (regression).
"""
from __future__ import annotations

import gzip
import math
import struct
import zlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


@dataclass
class Dataset:
    name: str
    x_train: Tensor
    y_train: Tensor  # class labels (long, (N,)) or regression targets (float, (N, outputs))
    x_test: Tensor
    y_test: Tensor
    n_classes: int  # classes (classification); 0 for regression
    domain: tuple[float, float, float, float] | None = None  # plot window for 2-D sets
    image_shape: tuple[int, int, int] | None = None  # (channels, rows, cols) of image sets (features row-major)
    task: str = "classify"  # classify | regress
    class_names: tuple[str, ...] | None = None  # for pictures
    source: str = ""  # where the data came from (error messages)

    @property
    def n_features(self) -> int:
        return self.x_train.shape[1]

    @property
    def n_outputs(self) -> int:
        """What the network outputs: one logit per class, or one value per regression target."""
        return self.n_classes if self.task == "classify" else self.y_train.shape[1]

    def to(self, dtype: torch.dtype) -> "Dataset":
        """Features (and regression targets) in ``dtype``; a no-op (no copy) where they already are."""
        ys = {} if self.task == "classify" else {"y_train": self.y_train.to(dtype), "y_test": self.y_test.to(dtype)}
        return dataclasses.replace(self, x_train=self.x_train.to(dtype), x_test=self.x_test.to(dtype), **ys)


def _split(name, x, y, train_fraction, rng, n_classes, domain=None) -> Dataset:
    perm = rng.permutation(len(x))
    x, y = x[perm], y[perm]
    n_train = int(round(train_fraction * len(x)))
    if not 0 < n_train < len(x):
        raise ValueError(f"data.train_fraction: {train_fraction} leaves an empty train or test split")
    xt = torch.as_tensor(x, dtype=torch.float64)
    yt = torch.as_tensor(y, dtype=torch.long)
    return Dataset(name, xt[:n_train], yt[:n_train], xt[n_train:], yt[n_train:], n_classes, domain)


def swiss_roll(n_samples=8000, noise=0.0, rng=None):
    """Two interleaved spirals, radius 0-1 and 0.2-1.2, two turns each."""
    half = n_samples // 2
    theta = np.linspace(0, 4 * math.pi, half, endpoint=False)
    r1, r2 = np.linspace(0, 1, half), np.linspace(0.2, 1.2, half)
    x = np.concatenate([np.stack([r1 * np.cos(theta), r1 * np.sin(theta)], 1),
                        np.stack([r2 * np.cos(theta), r2 * np.sin(theta)], 1)])
    y = np.concatenate([np.ones(half), np.zeros(half)]).astype(np.int64)
    return x + noise * rng.standard_normal(x.shape), y, (-1.2, 1.2, -1.2, 1.2)


def double_circles(n_samples=8000, noise=0.0, rng=None):
    """Four jittered rings of radius 1-4 with alternating labels."""
    quarter = n_samples // 4
    theta = np.arange(quarter) / quarter * 4 * math.pi
    xs, ys = [], []
    for k, r in enumerate((1, 2, 3, 4)):
        jitter = 0.6 * (rng.random((quarter, 2)) - 0.5)
        xs.append(np.stack([r * np.cos(theta), r * np.sin(theta)], 1) + jitter)
        ys.append(np.full(quarter, k % 2))
    x = np.concatenate(xs)
    return x + noise * rng.standard_normal(x.shape), np.concatenate(ys).astype(np.int64), (-5, 5, -5, 5)


def double_moons(n_samples=8000, noise=0.0, rng=None):
    """Two pairs of interleaved half-moons."""
    quarter = n_samples // 4
    theta = np.arange(quarter) / quarter * math.pi
    j = lambda: 0.3 * (rng.random(quarter) - 0.5)  # noqa: E731
    parts = [
        (np.cos(theta) + j(), np.sin(theta) + j(), 0),
        (1 - np.cos(theta) + j(), 0.5 - np.sin(theta) + j(), 1),
        (np.cos(theta) + j() + 2, np.sin(theta) + j(), 0),
        (3 - np.cos(theta) + j(), 0.5 - np.sin(theta) + j(), 1),
    ]
    x = np.concatenate([np.stack([a, b], 1) for a, b, _ in parts])
    y = np.concatenate([np.full(quarter, c) for *_, c in parts]).astype(np.int64)
    return x + noise * rng.standard_normal(x.shape), y, (-2, 5, -1, 2)


GENERATORS_2D = {"swiss_roll": swiss_roll, "double_circles": double_circles, "double_moons": double_moons}
FILE_DATASETS = ("npz", "csv", "factory")  # a user's own data (datafiles.py)
DATASETS = (*GENERATORS_2D, "digits", "mnist", "fashion_mnist", *FILE_DATASETS)
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")


def load_dataset(name: str, n_samples: int = 8000, train_fraction: float = 0.5, noise: float = 0.0,
                 seed: int = 0, path: str | None = None) -> Dataset:
    """Load a dataset by name; every split is a deterministic function of ``seed``."""
    rng = np.random.default_rng(seed)
    if name in GENERATORS_2D:
        x, y, domain = GENERATORS_2D[name](n_samples, noise, rng)
        return _split(name, x, y, train_fraction, rng, 2, domain)
    if name == "digits":  # 8x8 images, 1797 samples: a stratified, seeded split
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        xtr, xte, ytr, yte = train_test_split(d.data / 16.0, d.target, train_size=train_fraction, stratify=d.target,
                                              random_state=seed)
        t = lambda a, dt: torch.as_tensor(a, dtype=dt)  # noqa: E731
        return Dataset(name, t(xtr, torch.float64), t(ytr, torch.long), t(xte, torch.float64), t(yte, torch.long),
                       10, image_shape=(1, 8, 8))
    if name in ("mnist", "fashion_mnist"):
        d = load_mnist(path)
        return dataclasses.replace(d, name=name, class_names=FASHION_CLASSES if name == "fashion_mnist" else None)
    raise ValueError(f"data.name: unknown dataset {name!r}; expected one of {list(DATASETS)}")


# ---- IDX image files (MNIST, Fashion-MNIST) ------------------------------------------------
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte",
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (plain or gzip-compressed) into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, OSError, zlib.error) as e:  # a truncated or corrupt gzip stream, an unreadable file
        raise ValueError(f"{path}: cannot be read ({e}); expected an IDX file, gzip-compressed or not") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    count = int(np.prod(dims))
    body = raw[4 + 4 * ndim:]
    if len(body) != count * dtype.itemsize:
        raise ValueError(f"{path}: header promises {dims} items of {dtype.itemsize} bytes, "
                         f"file holds {len(body)} bytes")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def _find(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (directory / name).exists():
            return directory / name
    raise FileNotFoundError(f"data.path: IDX file {stem}[.gz] not found in {directory}; "
                            "place the four IDX files there (nothing is downloaded)")


def load_mnist(path: str | None) -> Dataset:
    """MNIST-format images from the four IDX files in directory ``path``; pixels scaled to
    [0, 1] in float32 (a 60,000-image set is 188 MB, not twice that in float64), flattened."""
    if not path:
        raise ValueError("data.path: the mnist dataset needs a directory holding the IDX files")
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"data.path: {directory} is not a directory")
    arrays = {k: read_idx(_find(directory, stem)) for k, stem in MNIST_FILES.items()}
    for split in ("train", "test"):
        if len(arrays[f"x_{split}"]) != len(arrays[f"y_{split}"]):
            raise ValueError(f"{directory}: {split} images and labels differ in count")
    scale = np.float32(1 / 255.0)
    x = {k: torch.from_numpy(arrays[k].reshape(len(arrays[k]), -1).astype(np.float32) * scale)
         for k in ("x_train", "x_test")}
    y = {k: torch.as_tensor(arrays[k].astype(np.int64)) for k in ("y_train", "y_test")}
    shape = (1, *arrays["x_train"].shape[1:]) if arrays["x_train"].ndim == 3 else None
    n_classes = int(max(y["y_train"].max(), y["y_test"].max())) + 1
    return Dataset("mnist", x["x_train"], y["y_train"], x["x_test"], y["y_test"], max(10, n_classes),
                   image_shape=shape, source=str(directory))
