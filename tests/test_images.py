"""Layer 1-2: the paper's image network, MNIST files, patches as agents, and the pictures of a run."""
import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from dhdnn.cli import main
from dhdnn.config import load_config
from dhdnn.models import build_model
from dhdnn.models.conv import ConvClassifier
from dhdnn.plots import heatmap_values
from dhdnn.topology import topology_from_dict

CONV = "launch/digits_conv_H2.yaml"


def test_conv_network_shares_the_hdnn_across_pixels(f64):
    torch.manual_seed(0)
    m = ConvClassifier(build_model("H2", 8, 3, 0.2), (1, 5, 4), 10)
    x = torch.randn(6, 20)
    y0 = m.initial_state(x)
    assert y0.shape == (6 * 20, 8)  # every pixel's 8 channels, one state each
    logits = m(x)
    assert logits.shape == (6, 10)
    # one image's logits do not depend on another image in the batch
    torch.testing.assert_close(m(x[2:3]), logits[2:3])
    # the same H-DNN on every pixel: permuting the pixels' states permutes the output states alike
    perm = torch.randperm(len(y0))
    torch.testing.assert_close(m.body(y0[perm]), m.body(y0)[perm])


def test_conv_run_trains_exports_and_plots(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", CONV, "--out", str(out), "--no-progress", "--set", "train.epochs=2",
                 "--set", "train.grad_norm_every=5"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_acc"] > 0.5
    assert main(["export", str(out), "--out", str(tmp_path / "m.pt")]) == 0
    assert "trainable parameters" in capsys.readouterr().out
    from dhdnn import load_exported
    from dhdnn.export import dense_model_of_run
    from dhdnn.train import load_data

    cfg, ref, _ = dense_model_of_run(out)
    data = load_data(cfg)
    with torch.no_grad():
        torch.testing.assert_close(load_exported(tmp_path / "m.pt")(data.x_test), ref(data.x_test), rtol=0, atol=0)
    assert main(["plot", str(out)]) == 0
    files = {p.split("/")[-1] for p in capsys.readouterr().out.split()}
    assert {"curves.png", "grad_norms.png", "confusion.png", "misclassified.png"} <= files
    for f in files:
        assert (out / f).stat().st_size > 5000
    # metrics also went to TensorBoard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert {"loss", "test_acc", "train_acc"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("test_acc")] == [1, 2]


def test_heatmap_colour_range_ignores_exact_zeros():
    norms = np.array([[0.0, 1e-3, 10.0], [0.0, 1e-2, 100.0]])
    logn, (lo, hi) = heatmap_values(norms)
    assert np.isnan(logn[:, 0]).all()  # zeros are masked, drawn blank
    assert (lo, hi) == pytest.approx((-3.0, 2.0))  # the range spans the positive values only


def _write_idx(path, array, code):
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(">u1" if code == 0x08 else array.dtype).tobytes())


def test_mnist_files_end_to_end(tmp_path, capsys):
    """Tiny IDX files in MNIST's layout: the shipped MNIST config loads them, trains an epoch, evaluates."""
    rng = np.random.default_rng(0)
    d = tmp_path / "mnist"
    d.mkdir()
    for split, n in (("train", 40), ("t10k", 20)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = np.zeros((n, 28, 28), np.uint8)
        for i, c in enumerate(labels):  # a learnable pattern: a bright row at the label's position
            images[i, 2 + 2 * c, 4:24] = 255
        _write_idx(d / f"{split}-images-idx3-ubyte.gz", images, 0x08)
        _write_idx(d / f"{split}-labels-idx1-ubyte.gz", labels, 0x08)
    out = tmp_path / "run"
    assert main(["train", "launch/mnist_conv_H2.yaml", "--out", str(out), "--no-progress",
                 "--set", f"data.path={d}", "--set", "train.epochs=1", "--set", "train.batch_size=20",
                 "--set", "model.layers=2"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["dataset"] == "mnist" and res["samples"] == 20 and 0 <= res["accuracy"] <= 1


def test_patches_are_generated_for_a_grid():
    t = topology_from_dict({"generator": {"kind": "grid", "rows": 4, "cols": 4}, "defaults": {"dim": 4},
                            "embeddings": {"patches": {"image": [8, 8], "patch": [2, 2]}}})
    assert len(t.embeddings) == 16
    assert t.embeddings[0].features == (0, 1, 8, 9) and t.embeddings[5].features == (18, 19, 26, 27)
    from dhdnn.topology import TopologyError

    with pytest.raises(TopologyError, match=r"key 'embeddings.patches': a 4x4 grid of 3x3 patches covers a 12x12"):
        topology_from_dict({"generator": {"kind": "grid", "rows": 4, "cols": 4},
                            "embeddings": {"patches": {"image": [8, 8], "patch": [3, 3]}}})


def test_sharded_patch_run_draws_its_partition(tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["train", "launch/digits_patches_H2.yaml", "--workers", "2", "--out", str(out), "--no-progress",
                 "--set", "train.epochs=1"]) == 0
    capsys.readouterr()
    assert main(["plot", str(out)]) == 0
    files = {p.split("/")[-1] for p in capsys.readouterr().out.split()}
    assert {"curves.png", "confusion.png", "misclassified.png", "partition.png"} <= files


def test_version_and_partition_of_a_run_config(capsys):
    from dhdnn import __version__

    with pytest.raises(SystemExit):
        main(["--version"])
    assert __version__ in capsys.readouterr().out
    assert main(["partition", "launch/digits_patches_H2.yaml", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    cfg = load_config("launch/digits_patches_H2.yaml")
    assert sorted(set(res["assignment"].values())) == list(range(cfg.run.workers))
    assert res["halo_volume"] > 0 and res["bytes_per_step"] > 0
    from dhdnn.halo import predicted_bytes
    from dhdnn.partitioner import partition
    from dhdnn.topology import load_topology

    topo = load_topology(cfg.topology)  # the readout's partial logits counted with the data's 10 classes
    want = predicted_bytes(topo, partition(topo, 4), cfg.train.batch_size, "float32", layers=cfg.model.layers, classes=10)
    assert res["bytes_per_step"] == want["per_step"]


def _fashion_files(d, n_train=40, n_test=20):
    """Tiny 28x28 IDX files in Fashion-MNIST's layout (a learnable pattern per class)."""
    rng = np.random.default_rng(1)
    d.mkdir()
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = (rng.random((n, 28, 28)) * 60).astype(np.uint8)
        for i, c in enumerate(labels):
            images[i, 2 + 2 * c, 4:24] = 255
        _write_idx(d / f"{split}-images-idx3-ubyte.gz", images, 0x08)
        _write_idx(d / f"{split}-labels-idx1-ubyte.gz", labels, 0x08)
    return d


def _same_parameters_on_workers(tmp_path, config: str, workers: int, *sets: str) -> list[Path]:
    """Train ``config`` on the tiny 28x28 files in one process and on ``workers``, float64, two
    epochs, traced: the parameters agree within 1e-9 (the same sums in another order). Returns
    both run directories."""
    from dhdnn import checkpoint as ckpt

    d = _fashion_files(tmp_path / "fashion")
    runs = []
    for w in (1, workers):
        out = tmp_path / f"run{w}"
        assert main(["train", config, "--out", str(out), "--no-progress", "--workers", str(w),
                     *(a for x in (f"data.path={d}", "train.epochs=2", "train.batch_size=10", "run.dtype=float64",
                                   "run.trace=true", *sets) for a in ("--set", x))]) == 0
        runs.append(out)
    a, b = (ckpt.assemble(ckpt.load(ckpt.latest(r))[1]) for r in runs)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-9, atol=1e-9, msg=k)
    return runs


def test_conv_network_on_2_workers_equals_one_process(tmp_path):
    """The image network without agents runs as data-parallel replicas on workers: float64, two
    epochs of 28x28 images, the parameters of one process (1e-9; the replicas' gradient sum adds
    the same terms in another order) and the same accuracy; every gradient sum traced inside the
    replica group, never in the forward."""
    runs = _same_parameters_on_workers(tmp_path, "launch/fashion_conv_H2.yaml", 2, "model.layers=3")
    s1, s2 = (json.loads((r / "summary.json").read_text()) for r in runs)
    assert s1["test_acc"] == s2["test_acc"] and s2["workers"] == 2 and s2["engine"] == "replicated"
    for r in (0, 1):
        records = [json.loads(x) for x in (runs[1] / f"trace-rank{r}.jsonl").read_text().splitlines()]
        assert records and all(m["op"] == "allreduce_grad" and m["phase"] == "backward" and m["group"] == [0, 1]
                               for m in records)


def test_fashion_patch_grid_trains_on_2_workers_and_plots(tmp_path, capsys):
    """The 28x28 patch grid (7x7 agents, generated 4x4 patches) trains on 2 workers; the pictures
    name Fashion-MNIST's classes."""
    d = _fashion_files(tmp_path / "fashion")
    out = tmp_path / "run"
    assert main(["train", "launch/fashion_patches_H2.yaml", "--out", str(out), "--no-progress", "--set",
                 f"data.path={d}", "--set", "train.epochs=1", "--set", "train.batch_size=10",
                 "--set", "model.layers=2"]) == 0
    capsys.readouterr()
    assert main(["plot", str(out)]) == 0
    written = {Path(x).name for x in capsys.readouterr().out.split()}
    assert {"confusion.png", "misclassified.png", "partition.png"} <= written
    from dhdnn.data import FASHION_CLASSES
    from dhdnn.config import load_config
    from dhdnn.train import load_data

    data = load_data(load_config(out / "config.yaml"))
    assert data.class_names == FASHION_CLASSES and data.image_shape == (1, 28, 28)


def test_fashion_patch_grid_on_4_workers_equals_one_process(tmp_path):
    """The 28x28 patch grid (49 agents, generated 4x4 patches) on 4 workers: float64, two epochs,
    the parameters of one process (1e-9: the same sums, boundary rows added in another order) and
    every traced halo message between ranks adjacent in the rank graph."""
    from dhdnn.partitioner import partition
    from dhdnn.topology import load_topology

    runs = _same_parameters_on_workers(tmp_path, "launch/fashion_patches_H2.yaml", 4, "model.layers=2")
    topo = load_topology(Path("topologies/grid7x7_patches.yaml"))
    edges = {tuple(sorted(e)) for e in partition(topo, 4).rank_graph(topo).edges}
    for r in range(4):
        records = [json.loads(x) for x in (runs[1] / f"trace-rank{r}.jsonl").read_text().splitlines()]
        assert records and all(m["src"] == r and tuple(sorted((m["src"], m["dst"]))) in edges for m in records)
