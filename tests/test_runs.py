"""Layer 2: one network for every worker count, and run directories that stand on their own.

float64 throughout: the dense engine and 1-3 sharded workers compute the same sums in a
different order, so parameters after an epoch agree to round-off (1e-9 leaves ample margin).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dhdnn import checkpoint as ckpt
from dhdnn.cli import main
from dhdnn.config import load_config
from dhdnn.run import train_from_config

from ._runs import MIXED, assert_same as _same, params_of as _params, write_mixed_run


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    return write_mixed_run(tmp_path_factory.mktemp("mixed"), batch_size=50)


def _run(cfg_path, out, workers, epochs, resume=False, engine="auto", *extra):
    cfg = load_config(cfg_path, [f"run.out_dir={out}", f"run.workers={workers}", f"train.epochs={epochs}",
                                 f"run.engine={engine}", *extra])
    return train_from_config(cfg, resume=resume)


def test_one_network_for_every_worker_count_and_resume_both_ways(mixed, tmp_path):
    _run(mixed, tmp_path / "dense", 1, 2)  # the reference: dense engine, uninterrupted, 2 epochs
    ref2, ref1 = _params(tmp_path / "dense"), _params(tmp_path / "dense", 1)
    # one epoch: 1, 2 and 3 sharded workers train the dense engine's network
    _run(mixed, tmp_path / "w1", 1, 1, engine="sharded")
    _run(mixed, tmp_path / "w2", 2, 1)
    _run(mixed, tmp_path / "w3", 3, 1)
    for w in ("w1", "w2", "w3"):
        _same(_params(tmp_path / w), ref1)
    # saved on 1 worker, resumed on 3; saved on 3, resumed on 1 (dense): both end where the reference ends
    _run(mixed, tmp_path / "w1", 3, 2, resume=True)
    _run(mixed, tmp_path / "w3", 1, 2, resume=True)
    _same(_params(tmp_path / "w1"), ref2)
    _same(_params(tmp_path / "w3"), ref2)
    assert json.loads((ckpt.latest(tmp_path / "w1") / "meta.json").read_text())["shards"] == 3


def test_gradient_norms_per_layer_are_one_process_s_on_every_layout(mixed, tmp_path):
    """``train.grad_norm_every`` on workers: each rank's share of ``||dloss/dy_j||^2`` (its agents'
    rows, its replica's samples), summed over the ranks, is the dense engine's norm for every state
    y_0..y_L at every step: agent partitions (autograd, and reversible on 3), replicas, and the
    dense network on every worker. (Same sums in another order: 1e-9 as above.)"""
    def norms(run):
        return [json.loads(x) for x in (run / "grad_norms.jsonl").read_text().splitlines()]

    every = "train.grad_norm_every=1"
    _run(mixed, tmp_path / "dense", 1, 1, False, "auto", every)
    ref = norms(tmp_path / "dense")
    assert [r["step"] for r in ref] == [0, 1, 2, 3] and len(ref[0]["norms"]) == 4  # 3 layers: y_0..y_3
    layouts = {"partitions": (2, "auto"), "reversible": (3, "auto", "run.backprop=reversible"),
               "replicas": (2, "auto", "run.replicas=2"), "replicated": (2, "dense")}
    for name, (workers, engine, *extra) in layouts.items():
        _run(mixed, tmp_path / name, workers, 1, False, engine, every, *extra)
        got = norms(tmp_path / name)
        assert [r["step"] for r in got] == [r["step"] for r in ref], name
        for a, b in zip(got, ref):
            torch.testing.assert_close(torch.tensor(a["norms"]), torch.tensor(b["norms"]), rtol=1e-9, atol=0,
                                       msg=name)


def test_an_edited_topology_is_refused_on_resume_with_what_changed(mixed, tmp_path):
    _run(mixed, tmp_path / "r", 1, 1)
    edited = dict(MIXED, edges=MIXED["edges"] + [[1, 5]])
    d = tmp_path / "edited"
    d.mkdir()
    (d / "mixed9.yaml").write_text(yaml.safe_dump(edited))
    (d / "run.yaml").write_text(mixed.read_text())
    with pytest.raises(Exception, match=r"key 'topology' differs .*1 edge\(s\) added, 0 removed"):
        _run(d / "run.yaml", tmp_path / "r", 1, 2, resume=True)
    # the same topology given by another path (absolute) is the same topology
    cfg = load_config(mixed, [f"run.out_dir={tmp_path / 'r'}", "train.epochs=2"])
    cfg.topology = str(Path(cfg.topology).resolve())
    train_from_config(cfg, resume=True)


def test_a_run_directory_works_from_any_working_directory(tmp_path, monkeypatch):
    """Trained by the console command; then export, evaluate (run and model), plot and resume from
    another directory (in this process: the paths are what is tested, not the start-up)."""
    from dhdnn.cli import main

    run = tmp_path / "r"
    env = dict(os.environ, PYTHONPATH=str(Path.cwd()))
    p = subprocess.run([sys.executable, "-m", "dhdnn", "train", str(Path("launch/ring8_swiss_roll.yaml").resolve()),
                        "--out", str(run), "--no-progress", "--set", "data.n_samples=400", "--set", "train.epochs=1"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for cmd in (["export", str(run), "--out", "m.pt"], ["evaluate", str(run)], ["evaluate", "m.pt"],
                ["plot", str(run)],
                ["train", str(run / "config.yaml"), "--resume", "--set", "train.epochs=2", "--no-progress"]):
        assert main(cmd) == 0, cmd
    assert yaml.safe_load((run / "config.yaml").read_text())["topology"] == "topology.yaml"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


def test_run_files_honour_the_umask_and_numbers_parse(tmp_path):
    cfg = load_config("launch/ring8_swiss_roll.yaml", ["train.lr=1e-3", "data.n_samples=200", "train.epochs=1",
                                                       f"run.out_dir={tmp_path / 'r'}", "run.progress=false"])
    assert cfg.train.lr == 1e-3
    old = os.umask(0o022)
    try:
        train_from_config(cfg)
    finally:
        os.umask(old)
    for name in ("config.yaml", "summary.json", "checkpoints/latest", "topology.yaml"):
        assert (tmp_path / "r" / name).stat().st_mode & 0o777 == 0o644, name


def test_local_workers_use_loopback_whatever_the_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "no-such-interface0")
    assert main(["train", "launch/ring8_swiss_roll.yaml", "--workers", "2", "--out", str(tmp_path / "r"),
                 "--no-progress", "--set", "data.n_samples=200", "--set", "train.epochs=1"]) == 0


def test_load_exported_is_public():
    import dhdnn

    assert callable(dhdnn.load_exported) and "load_exported" in dhdnn.__all__
