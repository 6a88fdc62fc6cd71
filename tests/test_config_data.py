"""Layer 1: config YAML/overrides and datasets (generators, digits, local MNIST IDX files)."""
import gzip
import struct

import numpy as np
import pytest
import torch

from dhdnn.config import ConfigError, load_config
from dhdnn.data import load_dataset, read_idx


def write_yaml(tmp_path, text, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_and_overrides(tmp_path):
    p = write_yaml(tmp_path, "model: {arch: H1, layers: 8}\ntrain: {lr: 1}\n")
    cfg = load_config(p, ["train.lr=0.01", "model.J=J2", "run.dtype=float64"])
    assert (cfg.model.arch, cfg.model.layers, cfg.model.J) == ("H1", 8, "J2")
    assert cfg.train.lr == 0.01 and isinstance(cfg.train.lr, float)
    assert cfg.run.dtype == "float64" and cfg.data.name == "swiss_roll"


@pytest.mark.parametrize("text,overrides,match", [
    ("model: {arch: H9}\n", [], r"cfg.yaml: key 'model.arch': expected one of"),
    ("model: {layers: 0}\n", [], r"key 'model.layers': expected a positive integer"),
    ("train: {lrate: 1}\n", [], r"key 'train.lrate': unknown key"),
    ("trian: {}\n", [], r"key 'trian': unknown section"),
    ("model: [1, 2]\n", [], r"key 'model': expected a mapping"),
    ("data: {name: cifar}\n", [], r"key 'data.name': expected one of"),
    ("run: {dtype: float16}\n", [], r"key 'run.dtype'"),
    ("model: {arch: H2\n", [], r"cfg.yaml: line \d+, column \d+: invalid YAML"),
    ("", ["train.lr"], r"expected section.key=value"),
    ("", ["optim.lr=1"], r"unknown section 'optim'"),
    ("", ["train.epochs=-3"], r"key 'train.epochs': expected a positive integer, got -3"),
    ("model:\n  arch: H2\n  layers: 4\n  layers: 5\n", [],
     r"cfg.yaml: line 4, column 3: invalid YAML: duplicate key 'layers' \(first at line 3\)"),
    ("data: {name: swiss_roll, path: x.npz}\n", [], r"key 'data.path': expected no path with data.name swiss_roll"),
    ("data: {name: digits}\n", ["data.n_samples=100"], r"key 'data.n_samples': expected no n_samples with data.name "
                                                       "digits, which reads only train_fraction, seed, class_names"),
])
def test_bad_config_names_file_and_key(tmp_path, text, overrides, match):
    p = write_yaml(tmp_path, text)
    with pytest.raises(ConfigError, match=match):
        load_config(p, overrides)


def test_a_config_that_is_not_utf8_names_the_line(tmp_path):
    p = tmp_path / "cfg.yaml"
    p.write_bytes("model: {arch: H2}\n# café\n".encode("latin-1"))  # once a bare codec message
    with pytest.raises(ConfigError, match=r"cfg.yaml: not UTF-8 text \(line 2, byte 0xe9\); expected a YAML file"):
        load_config(p)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("name", ["swiss_roll", "double_circles", "double_moons"])
def test_2d_generators_are_seeded_and_split(name):
    a = load_dataset(name, n_samples=400, seed=3)
    b = load_dataset(name, n_samples=400, seed=3)
    c = load_dataset(name, n_samples=400, seed=4)
    assert a.x_train.shape == (200, 2) and a.x_test.shape == (200, 2)
    assert torch.equal(a.x_train, b.x_train) and not torch.equal(a.x_train, c.x_train)
    assert set(a.y_train.tolist()) == {0, 1} and a.n_classes == 2


def test_digits_from_scikit_learn():
    d = load_dataset("digits", seed=0)
    assert d.n_features == 64 and d.n_classes == 10
    assert len(d.x_train) + len(d.x_test) == 1797 and float(d.x_train.max()) <= 1.0


def _idx(path, arr, gz):
    codes = {np.uint8: 0x08}
    header = bytes([0, 0, codes[arr.dtype.type], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_reader_on_tiny_idx_files(tmp_path, gz):
    rng = np.random.default_rng(0)
    sfx = ".gz" if gz else ""
    xs = {s: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for s, n in (("train", 6), ("t10k", 3))}
    ys = {s: rng.integers(0, 10, len(xs[s]), dtype=np.uint8) for s in xs}
    for s in xs:
        _idx(tmp_path / f"{s}-images-idx3-ubyte{sfx}", xs[s], gz)
        _idx(tmp_path / f"{s}-labels-idx1-ubyte{sfx}", ys[s], gz)
    d = load_dataset("mnist", path=str(tmp_path))
    assert d.x_train.shape == (6, 784) and d.x_test.shape == (3, 784)
    assert torch.equal(d.y_test, torch.as_tensor(ys["t10k"].astype(np.int64)))
    np.testing.assert_allclose(d.x_train[2].numpy(), xs["train"][2].reshape(-1) / 255.0)
    assert read_idx(tmp_path / f"train-labels-idx1-ubyte{sfx}").shape == (6,)


def test_mnist_missing_files_and_bad_magic(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.*not found"):
        load_dataset("mnist", path=str(tmp_path))
    with pytest.raises(ValueError, match="data.path"):
        load_dataset("mnist")
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="bad magic"):
        read_idx(tmp_path / "bad")
    import gzip

    whole = gzip.compress(b"\x00\x00\x08\x01" + (4).to_bytes(4, "big") + bytes(4))
    (tmp_path / "cut.gz").write_bytes(whole[:-6])  # a download cut short: once an EOFError traceback
    with pytest.raises(ValueError, match=r"cut.gz: cannot be read \(Compressed file ended"):
        read_idx(tmp_path / "cut.gz")
