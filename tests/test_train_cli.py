"""Layer 1: the trainer end to end (dense engine), checkpoints, resume, plots and the CLI."""
import json
from pathlib import Path

import pytest
import torch

from dhdnn import checkpoint as ckpt
from dhdnn.cli import main
from dhdnn.config import load_config
from dhdnn.export import dense_model_of_run
from dhdnn.rundir import RunDirError
from dhdnn.run import train_from_config

SMALL = ["data.n_samples=400", "model.layers=4", "model.dim=4", "train.epochs=3", "train.batch_size=50",
         "run.progress=false", "train.lr=0.02"]


def small_cfg(tmp_path, *extra):
    return load_config(None, SMALL + [f"run.out_dir={tmp_path / 'run'}", *extra])


def test_train_writes_metrics_summary_and_checkpoints(tmp_path):
    cfg = small_cfg(tmp_path, "train.grad_norm_every=4")
    summary = train_from_config(cfg)
    run = tmp_path / "run"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2, 3]
    assert {"loss", "train_acc", "test_acc", "seconds"} <= set(lines[0])
    s = json.loads((run / "summary.json").read_text())
    assert s["test_acc"] == summary["test_acc"] and s["config"]["model"]["layers"] == 4
    norms = [json.loads(x) for x in (run / "grad_norms.jsonl").read_text().splitlines()]
    assert len(norms[0]["norms"]) == 5 and norms[1]["step"] == 4
    assert (run / "config.yaml").exists()
    assert ckpt.latest(run).name == "step-00000012"


def test_resume_continues_exactly(tmp_path):
    full = small_cfg(tmp_path / "a", "train.epochs=4")
    train_from_config(full)
    part = small_cfg(tmp_path / "b", "train.epochs=2")
    train_from_config(part)
    resumed = small_cfg(tmp_path / "b", "train.epochs=4")
    train_from_config(resumed, resume=True)
    _, m_full, _ = dense_model_of_run(tmp_path / "a" / "run")
    _, m_res, _ = dense_model_of_run(tmp_path / "b" / "run")
    for (n, a), (_, b) in zip(m_full.named_parameters(), m_res.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    assert len((tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()) == 4


def test_refuses_to_overwrite_a_run_and_rejects_mismatched_resume(tmp_path):
    train_from_config(small_cfg(tmp_path))
    with pytest.raises(RunDirError, match="already holds a run"):
        train_from_config(small_cfg(tmp_path))
    with pytest.raises(RunDirError, match=r"key 'model' differs .*model\.layers"):
        train_from_config(small_cfg(tmp_path, "model.layers=5", "train.epochs=5"), resume=True)


def test_a_resume_says_which_train_and_data_keys_changed_and_when_nothing_is_left_to_train(tmp_path, capsys):
    train_from_config(small_cfg(tmp_path, "train.epochs=2"))
    capsys.readouterr()
    train_from_config(small_cfg(tmp_path, "train.epochs=3"), resume=True)  # the same run, extended
    assert "changed since the checkpoint" not in capsys.readouterr().err
    train_from_config(small_cfg(tmp_path, "train.epochs=4", "train.lr=0.01", "data.noise=0.2"), resume=True)
    err = capsys.readouterr().err
    assert "at epoch 3 with data.noise 0.0 -> 0.2, train.lr 0.02 -> 0.01: changed since the checkpoint" in err
    s = train_from_config(small_cfg(tmp_path, "train.epochs=4", "train.lr=0.01", "data.noise=0.2"), resume=True)
    err = capsys.readouterr().err
    assert "is at epoch 4 and train.epochs is 4: nothing to train" in err and "changed since" not in err
    assert s["epochs"] == 4 and len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 4


def test_corrupt_checkpoint_is_reported(tmp_path):
    train_from_config(small_cfg(tmp_path))
    d = ckpt.latest(tmp_path / "run")
    shard = d / "shard-0.pt"
    size = shard.stat().st_size
    shard.write_bytes(b"x" * size)  # same size, not a checkpoint
    with pytest.raises(ckpt.CheckpointError, match="shard-0.pt: cannot be read"):
        ckpt.load(d)
    shard.write_bytes(b"x" * (size // 2))  # truncated
    with pytest.raises(ckpt.CheckpointError, match=f"shard-0.pt: {size // 2} bytes, the checkpoint recorded {size}"):
        ckpt.load(d)


def test_cli_train_plot_analyze(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {arch: H1, dim: 4, layers: 3}\ndata: {n_samples: 200}\ntrain: {epochs: 2}\n")
    out = tmp_path / "r"
    assert main(["train", str(cfg), "--out", str(out), "--no-progress", "--set", "train.grad_norm_every=2"]) == 0
    assert "test_acc" in capsys.readouterr().out
    assert main(["plot", str(out)]) == 0
    assert (out / "decision_boundary.png").stat().st_size > 1000 and (out / "grad_norms.png").exists()
    capsys.readouterr()
    assert main(["analyze", "--arch", "H2", "--layers", "32", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["min_bsm_norm"] >= 1 - 1e-9
    assert main(["train", str(cfg), "--set", "model.arch=Nope"]) == 2
    assert "key 'model.arch'" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["partition", "topologies/ring8.yaml", "--workers", "0"],
                                  ["partition", "topologies/ring8.yaml", "--workers", "2", "--batch", "0"],
                                  ["partition", "topologies/ring8.yaml", "--workers", "2", "--layers", "-1"],
                                  ["analyze", "--backprop", "reversible", "--batch", "0"],
                                  ["verify", "launch/ring8_swiss_roll.yaml", "--workers", "2", "x"]])
def test_a_count_flag_below_one_is_refused_not_read_as_its_default(argv, capsys):
    """(``--workers 0`` was read as "not given", ``--batch 0`` as the default 125, ``--layers -1``
    printed negative bytes, ``analyze --batch 0`` a nan gradient error.)"""
    with pytest.raises(SystemExit) as e:
        main(argv)
    flag = argv[-2] if argv[-2].startswith("--") else "--workers"
    assert e.value.code == 2 and f"argument {flag}: expected a positive integer, got '{argv[-1]}'" in \
        capsys.readouterr().err


def test_plot_bounds_what_a_large_network_costs(tmp_path, capsys, monkeypatch):
    """A large graph's run: the decision boundary's grid shrinks with the dense model's cost per
    sample (200 points a side for a small network, 20 at the least), and where the dense model
    does not fit in memory the model's pictures are left out with the reason, the others drawn,
    and export is refused (memory fixed at 16 bytes here)."""
    from dhdnn import resources
    from dhdnn.plots import grid_resolution

    small, huge = torch.nn.Linear(16, 16), torch.nn.Linear(1, 1)
    huge.weight = torch.nn.Parameter(torch.zeros(1, 1).expand(1 << 15, 1 << 15))  # 2^30 entries, no storage
    assert grid_resolution(small) == 200 and grid_resolution(huge) == 20
    cfg = tmp_path / "c.yaml"
    cfg.write_text("topology: {generator: {kind: ring, agents: 8}}\nmodel: {arch: H2, layers: 2}\n"
                   "data: {n_samples: 200}\ntrain: {epochs: 1}\n")
    out = tmp_path / "r"
    assert main(["train", str(cfg), "--out", str(out), "--no-progress"]) == 0
    monkeypatch.setattr(resources, "available_memory", lambda: 16)
    capsys.readouterr()
    assert main(["plot", str(out)]) == 0
    printed = capsys.readouterr()
    assert "no pictures of the model's predictions: its dense form needs an estimated" in printed.err
    assert "decision_boundary.png" not in printed.out and "topology.png" in printed.out
    assert main(["export", str(out), "--out", str(tmp_path / "m.pt")]) == 2  # the same refusal, one line
    err = capsys.readouterr().err
    assert "key 'model': the dense model of" in err and len(err.strip().splitlines()) == 1, err


def test_auto_resume_starts_fresh_then_continues(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {arch: H2, dim: 4, layers: 2}\ndata: {n_samples: 200}\ntrain: {epochs: 2}\n")
    out = tmp_path / "r"
    assert main(["train", str(cfg), "--out", str(out), "--no-progress", "--auto-resume"]) == 0
    assert main(["train", str(cfg), "--out", str(out), "--no-progress", "--auto-resume", "--set", "train.epochs=3"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_the_readmes_pictures_are_what_plot_writes(tmp_path):
    """The README's list of pictures equals what ``dhdnn plot`` writes for the runs it describes:
    a 2-D topology run with gradient norms (one process), a regression on 2 workers, images."""
    import re

    from dhdnn.plots import plot_run

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    paragraph = readme.split("**Pictures**", 1)[1].split("\n\n", 1)[0]
    listed = set(re.findall(r"`([a-z_]+\.png)`", paragraph))
    tiny = ["train.epochs=1", "run.progress=false", "model.layers=2"]
    runs = {"ring8": ("launch/ring8_swiss_roll.yaml", ["data.n_samples=200", "train.grad_norm_every=2"]),
            "field": ("examples/vector_field.yaml", ["data.options.n_samples=200", "run.workers=2"]),
            "digits": ("launch/digits_conv_H2.yaml", ["data.train_fraction=0.1"])}
    written = set()
    for name, (config, sets) in runs.items():
        cfg = load_config(config, [*tiny, *sets, f"run.out_dir={tmp_path / name}"])
        train_from_config(cfg)
        written |= {p.name for p in plot_run(tmp_path / name)}
    assert written == listed, (sorted(written), sorted(listed))


# ---- start-up: `import dhdnn` is free; `dhdnn train` on workers starts their forkserver first ----
def _fresh(code: str) -> str:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_import_dhdnn_imports_no_torch_and_every_public_name_resolves():
    """Public names and submodules load on first use (PEP 562); ``dhdnn.partition`` stays the
    function even after its module was imported by name."""
    out = _fresh("import sys, dhdnn\nbefore = 'torch' in sys.modules\n"
                 "import dhdnn.partitioner, dhdnn.topology\n"
                 "names = [n for n in dhdnn.__all__ if getattr(dhdnn, n) is None]\n"
                 "print(before, dhdnn.partition is dhdnn.partitioner.partition, callable(dhdnn.distributed.distribute),"
                 " names, set(dhdnn.__all__) <= set(dir(dhdnn)), hasattr(dhdnn, 'no_such_name'))")
    assert out == "False True True [] True False"


def test_a_bad_dhdnn_tanh_is_a_one_line_error_of_the_command():
    """``DHDNN_TANH`` is read when the integrator is imported; the command refuses a bad value in
    one line (exit 2), as any bad input, instead of a traceback."""
    import os
    import subprocess
    import sys

    topo = Path(__file__).resolve().parent.parent / "topologies" / "grid4x4_patches.yaml"
    out = subprocess.run([sys.executable, "-m", "dhdnn", "topology", "show", str(topo)], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "DHDNN_TANH": "fast"})
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "dhdnn: error: environment variable DHDNN_TANH: expected native or sigmoid, got 'fast'"]


def test_a_reader_that_stops_early_ends_the_command_without_a_traceback():
    """``dhdnn partition ... | head``: once the reader has gone, writing to stdout fails; the command
    exits 1 with nothing on stderr (a traceback there read as a crash of dhdnn)."""
    import os
    import subprocess
    import sys

    topo = Path(__file__).resolve().parent.parent / "topologies" / "ring8.yaml"
    read, write = os.pipe()
    os.close(read)  # (the reader is gone before the first line)
    try:
        out = subprocess.run([sys.executable, "-m", "dhdnn", "partition", str(topo), "--workers", "2"], stdout=write,
                             stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert (out.returncode, out.stderr) == (1, "")


@pytest.mark.parametrize("argv,started", [(["train", "CFG", "--workers", "2"], True),
                                          (["train", "CFG", "--set", "run.workers=3"], True),
                                          (["train", "CFG"], False),  # the file says 1 worker
                                          (["plot", "CFG", "--workers", "2"], False),
                                          (["verify", "CFG"], True),  # always on workers
                                          (["train", "missing.yaml", "--workers", "2"], False)])
def test_train_on_workers_starts_their_forkserver_before_torch(tmp_path, argv, started):
    """While the launcher imports torch, the forkserver imports its preload (8.5 s -> 4.7 s for a
    one-epoch run on 2 workers, 2 cores); a bad file or flag is left to the real parse."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text("run:\n  workers: 1\n")
    argv = [str(cfg) if a == "CFG" else a for a in argv]
    out = _fresh("import sys\nfrom multiprocessing import forkserver\nfrom dhdnn.cli import _start_workers_early\n"
                 f"_start_workers_early({argv!r})\n"
                 "print(forkserver._forkserver._forkserver_pid is not None, 'torch' in sys.modules)")
    assert out == f"{started} False"
