"""Layer 2: failures and the run lifecycle — a failing, hung or interrupted run stops every
process fast and loudly, leaves nothing running, never writes after it was told to stop, and
never saves a non-finite value; bad input is one line before any worker starts."""
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from dhdnn import checkpoint as ckpt
from dhdnn.cli import main
from dhdnn.config import load_config
from dhdnn.distributed.launch import WorkerFailure
from dhdnn.run import train_from_config

TIMEOUT = 20
RING = "launch/ring8_swiss_roll.yaml"


def _cfg(tmp_path, workers=3, *extra):
    return load_config(RING, [f"run.workers={workers}", f"run.out_dir={tmp_path / 'run'}", "run.progress=false",
                              "data.n_samples=800", "train.epochs=3", "train.batch_size=50",
                              f"run.timeout_s={TIMEOUT}", *extra])


def _train_cmd(out, *extra):
    return [sys.executable, "-m", "dhdnn", "train", RING, "--no-progress", "--out", str(out), *extra]


# ---- a failing or hung worker --------------------------------------------------------------
@pytest.mark.parametrize("mode", ["kill", "raise"])
def test_a_failing_worker_fails_every_worker_and_the_launcher(tmp_path, monkeypatch, mode):
    monkeypatch.setenv("DHDNN_FAULT", f"1:5:{mode}")
    t = time.monotonic()
    with pytest.raises(WorkerFailure) as e:
        train_from_config(_cfg(tmp_path))
    elapsed = time.monotonic() - t
    assert e.value.rank == 1
    assert all(c != 0 for c in e.value.exitcodes), e.value.exitcodes  # the others exit non-zero too
    assert elapsed < TIMEOUT + 15
    if mode == "raise":
        assert "injected fault on rank 1 at step 5" in e.value.details and "Traceback" in e.value.details
    else:
        assert "killed by signal 9" in e.value.details
    assert not list(Path(tempfile.gettempdir()).glob(f"dhdnn-workers-{os.getpid()}-*"))  # scratch removed


def test_peers_name_the_failed_rank(tmp_path, monkeypatch):
    """Every surviving worker's own error says which worker failed (via the shared store)."""
    from dhdnn.distributed import launch

    seen = {}
    real = launch._first_failure

    def spy(tmp, codes, killed, timeout_s):
        for r in range(len(codes)):
            p = tmp / f"error{r}.json"
            if p.exists():
                seen[r] = json.loads(p.read_text())["text"]
        return real(tmp, codes, killed, timeout_s)

    monkeypatch.setattr(launch, "_first_failure", spy)
    monkeypatch.setenv("DHDNN_FAULT", "2:4:kill")
    with pytest.raises(WorkerFailure):
        train_from_config(_cfg(tmp_path, workers=4))
    survivors = [r for r in range(4) if r != 2]
    assert set(seen) == set(survivors)
    for r in survivors:
        assert "worker 2 failed" in seen[r], seen[r]


def test_a_hung_worker_is_named_and_every_process_ends(tmp_path):
    """A SIGSTOPped worker: its neighbours time out (run.timeout_s = 10 s), the launcher gives the
    others GRACE_S (5 s) and kills it. Timed from the moment the worker is seen stopped, so worker
    start-up (seconds, and three times that on a slow machine) does not count: every process ends
    within timeout + grace + 10 s (the error's way up and the kills, at 3x this machine's ~1 s)."""
    from dhdnn.distributed.launch import GRACE_S

    env = dict(os.environ, DHDNN_FAULT="1:5:stop")
    p = subprocess.Popen(_train_cmd(tmp_path / "r", "--workers", "2", "--set", "run.timeout_s=10",
                                    "--set", "data.n_samples=400", "--set", "train.batch_size=50"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen: set[int] = set()
    t, hung = time.monotonic(), None
    while p.poll() is None and time.monotonic() - t < 300:
        seen |= _descendants(p.pid)
        if hung is None and any(_state(w) == "T" for w in seen):
            hung = time.monotonic()
        time.sleep(0.1)
    _, err = p.communicate(timeout=30)
    assert hung is not None, err[-2000:]
    assert time.monotonic() - hung < 10 + GRACE_S + 10, time.monotonic() - hung
    assert p.returncode == 1
    assert "worker 1 stopped answering" in err, err[-2000:]
    # a process that closed its pipes may still be finishing its exit (tearing down its memory)
    # when communicate() returns: on a busy machine that takes a moment, so give it 5 s to end
    left = _still_alive(seen, 5.0)
    assert seen and not left, f"outlived the launcher by 5 s: {left}"


def test_cli_exits_nonzero_and_prints_the_traceback(tmp_path):
    env = dict(os.environ, DHDNN_FAULT="0:3:raise")
    p = subprocess.run(_train_cmd(tmp_path / "r", "--workers", "2", "--set", "data.n_samples=400",
                                  "--set", "train.epochs=2", "--set", f"run.timeout_s={TIMEOUT}"),
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 1
    assert "injected fault on rank 0" in p.stderr and "Traceback" in p.stderr


# ---- the launcher stopped from outside -------------------------------------------------------
def _descendants(pid: int) -> set[int]:
    parents = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, frontier = set(), {pid}
    while frontier:
        frontier = {c for c, p in parents.items() if p in frontier} - out
        out |= frontier
    return out


def _state(pid: int) -> str | None:
    """A process's state letter (R, S, T: stopped, Z: zombie), None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    return _state(pid) not in (None, "Z")


def _still_alive(pids: set[int], within_s: float) -> dict[int, str]:
    """The processes of ``pids`` still running after up to ``within_s`` seconds, with their
    command lines (for the failure message); empty when every one has ended."""
    t = time.monotonic()
    while any(_alive(w) for w in pids) and time.monotonic() - t < within_s:
        time.sleep(0.05)
    left = {}
    for w in pids:
        if _alive(w):
            try:
                left[w] = Path(f"/proc/{w}/cmdline").read_text().replace("\0", " ")[:200]
            except OSError:
                left[w] = "?"
    return left


def _snapshot(run: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGHUP])
def test_workers_never_outlive_their_launcher(tmp_path, sig):
    run = tmp_path / "r"
    proc = subprocess.Popen(_train_cmd(run, "--workers", "2", "--set", "train.epochs=200",
                                       "--set", "data.n_samples=2000", "--set", "train.checkpoint_every=1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (run / "metrics.jsonl").exists() or not (run / "checkpoints" / "latest").exists():
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.05)
        workers = _descendants(proc.pid)
        assert workers
        proc.send_signal(sig)
        left = _still_alive(workers, 5.0)
        assert not left, f"outlived the launcher by 5 s: {left}"
        before = _snapshot(run)
        time.sleep(1.5)
        assert _snapshot(run) == before  # nothing written after the stop
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    if sig != signal.SIGKILL:
        assert proc.returncode == 128 + sig, err
        assert "stopped by" in err and "Traceback" not in err
        assert not list(run.rglob("*.tmp"))  # temporary files removed
        assert ckpt.load(ckpt.latest(run))  # the last complete checkpoint reads back
    leftovers = list(Path(tempfile.gettempdir()).glob(f"dhdnn-workers-{proc.pid}-*"))
    if sig == signal.SIGKILL:  # no chance to clean up: the next launcher removes it
        from dhdnn.distributed.launch import reap_stale_scratch

        assert set(reap_stale_scratch()) >= set(leftovers)
    assert not list(Path(tempfile.gettempdir()).glob(f"dhdnn-workers-{proc.pid}-*"))


# ---- ownership ------------------------------------------------------------------------------
def test_two_runs_into_one_directory(tmp_path):
    cmd = _train_cmd(tmp_path / "r", "--workers", "2", "--set", "train.epochs=4", "--set", "data.n_samples=800")
    a = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    b = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    (_, ea), (_, eb) = a.communicate(timeout=180), b.communicate(timeout=180)
    codes = sorted([a.returncode, b.returncode])
    assert codes == [0, 2], (ea, eb)
    loser = ea if a.returncode == 2 else eb
    assert "is in use by another run (pid" in loser and len(loser.strip().splitlines()) == 1
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3, 4]


# ---- non-finite values ----------------------------------------------------------------------
@pytest.mark.parametrize("workers", [1, 2])
def test_a_non_finite_loss_stops_with_exit_3_and_saves_nothing_non_finite(tmp_path, capsys, workers):
    # epoch 1 trains normally (and is checkpointed); epoch 2 runs with lr 1e30
    args = ["train", RING, "--no-progress", "--out", str(tmp_path / "r"), "--workers", str(workers),
            "--set", "data.n_samples=400", "--set", "train.epochs=3", "--set", "train.lr_step=1",
            "--set", "train.lr_gamma=1.0e+30", "--set", "train.lr=0.01"]
    assert main(args) == 3
    err = capsys.readouterr().err
    assert "non-finite" in err and "epoch 2, step" in err and len(err.strip().splitlines()) == 1
    d = ckpt.latest(tmp_path / "r")
    assert d is not None and json.loads((d / "meta.json").read_text())["epoch"] == 1
    for k, v in ckpt.assemble(ckpt.load(d)[1]).items():
        assert torch.isfinite(v).all(), k
    for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)  # strict JSON (no bare NaN)
        assert all(v is None or not isinstance(v, float) or math.isfinite(v) for v in rec.values())


# ---- falling back to an older checkpoint -----------------------------------------------------
def test_a_truncated_newest_shard_falls_back_to_the_previous_checkpoint(tmp_path, capsys):
    args = ["train", RING, "--no-progress", "--out", str(tmp_path / "r"), "--workers", "2",
            "--set", "data.n_samples=400", "--set", "train.batch_size=100"]
    assert main(args + ["--set", "train.epochs=2"]) == 0
    newest = ckpt.latest(tmp_path / "r")
    shard = newest / "shard-1.pt"
    shard.write_bytes(shard.read_bytes()[:100])
    capsys.readouterr()
    assert main(args + ["--set", "train.epochs=3", "--auto-resume"]) == 0
    err = capsys.readouterr().err
    assert f"{shard}" in err and "resuming from the previous complete checkpoint" in err
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]


# ---- bad input: one line, exit 2, before any worker starts ------------------------------------
@pytest.mark.parametrize("extra,message", [
    (["--workers", "9"], "9 workers but"),
    (["--workers", "2", "--set", "model.arch=MS1"], "key 'model.arch': MS1 has no agent-local structure"),
    (["--workers", "2", "--set", "model.arch=H1", "--set", "model.J=J2"], "key 'model.J': J2 couples"),
    (["--workers", "2", "--set", "data.name=mnist", "--set", "data.path=/nonexistent"],
     "data.path: /nonexistent is not a directory"),
    (["--workers", "3", "--set", "run.replicas=2"], "key 'run.replicas'"),
    (["--set", "topology=null", "--set", "model.dim=100000"], "key 'model': the run needs an estimated"),
])
def test_errors_found_before_spawning_are_one_line(tmp_path, capsys, monkeypatch, extra, message):
    from dhdnn.distributed import launch

    def boom(*a, **k):
        raise AssertionError("a worker was started")

    monkeypatch.setattr(launch, "run_local", boom)
    assert main(["train", RING, "--no-progress", "--out", str(tmp_path / "r"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("gpus,extra,message", [
    (0, ["--set", "run.device=cuda"], "key 'run.device': cuda, but torch"),
    (1, ["--workers", "2", "--set", "run.device=cuda", "--set", "run.backend=nccl"],
     "key 'run.backend': nccl needs a GPU per rank, but 2 ranks share 1 GPU(s) here")])
def test_gpu_settings_this_machine_cannot_run_are_refused_before_spawning(tmp_path, capsys, monkeypatch, gpus, extra,
                                                                         message):
    """(Seen on a one-GPU machine: two workers with nccl died in NCCL's 'Duplicate GPU detected'.)"""
    from dhdnn.distributed import launch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(launch, "run_local", lambda *a, **k: pytest.fail("a worker was started"))
    assert main(["train", RING, "--no-progress", "--out", str(tmp_path / "r"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_a_log_line_torn_by_a_kill_or_a_full_disk_stops_neither_resume_nor_plot(tmp_path, capsys):
    """A run killed (or out of disk) mid-append leaves half a JSON line at the end of metrics.jsonl:
    plot leaves it out, resume rewrites the log without it (both once failed on it)."""
    out = tmp_path / "r"
    assert main(["train", RING, "--no-progress", "--out", str(out), "--set", "train.epochs=2"]) == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "lo')
    assert main(["plot", str(out)]) == 0
    assert main(["train", RING, "--no-progress", "--out", str(out), "--set", "train.epochs=3", "--resume"]) == 0
    assert [json.loads(ln)["epoch"] for ln in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    (out / "metrics.jsonl").write_text('{"epoch": 1}\n{"ep\n{"epoch": 3}\n')  # torn inside: named
    capsys.readouterr()
    assert main(["plot", str(out)]) == 2
    assert "metrics.jsonl: line 2 is not a JSON record" in capsys.readouterr().err


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    """(Seen on a 64 KiB tmpfs: a traceback.) The write after the first checkpoint fails with ENOSPC."""
    import errno

    out, real = tmp_path / "r", ckpt.atomic_write

    def full(path, write, sync=True):
        if "step-" in str(path) and ckpt.latest(out) is not None:  # the disk fills after the first checkpoint
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, write, sync)

    monkeypatch.setattr(ckpt, "atomic_write", full)
    assert main(["train", RING, "--no-progress", "--out", str(out), "--set", "train.epochs=3",
                 "--set", "train.checkpoint_every=1"]) == 1
    err = capsys.readouterr().err
    assert "No space left on device while writing the run directory" in err and len(err.strip().splitlines()) == 1
    assert ckpt.latest(out).name == "step-00000032"  # the first epoch's, complete


def test_an_out_dir_that_cannot_be_created_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["train", RING, "--no-progress", "--out", str(tmp_path / "file" / "run")]) == 2
    err = capsys.readouterr().err
    assert "run.out_dir: cannot create" in err and "Not a directory" in err and len(err.strip().splitlines()) == 1


def test_the_auto_backend_takes_nccl_only_with_a_gpu_per_worker(monkeypatch):
    from dhdnn.distributed.launch import pick_backend

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert (pick_backend("auto", "cuda", 1), pick_backend("auto", "cuda", 2)) == ("nccl", "gloo")
    assert (pick_backend("auto", "cpu", 1), pick_backend("gloo", "cuda", 1)) == ("gloo", "gloo")


def test_pinned_worker_out_of_range_is_reported_before_spawning(tmp_path, capsys):
    topo = tmp_path / "t.yaml"
    topo.write_text("agents: [{id: 1, worker: 3}, 2, 3]\nedges: [[1, 2], [2, 3]]\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"topology: {topo}\nmodel: {{arch: H2, layers: 2}}\ndata: {{n_samples: 100}}\n")
    assert main(["train", str(cfg), "--workers", "2", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "key 'agents[0].worker'" in err and len(err.strip().splitlines()) == 1


def test_pins_no_layout_can_honour_are_refused_before_verify_runs_any_layout(tmp_path, capsys):
    """Two of four agents pinned to one worker: 2 workers can hold them, 4 (one agent each) cannot.
    verify refuses the config before running the 2-worker layout (found by fuzz_verify seed 312,
    where the refusal came from inside the 4 workers)."""
    topo = tmp_path / "t.yaml"
    topo.write_text("agents: [a, {id: b, worker: 1}, c, {id: d, worker: 1}]\nedges: [[a, b], [b, c], [c, d], [d, a]]\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"topology: {topo}\nmodel: {{arch: H2, layers: 2}}\ndata: {{n_samples: 400}}\ntrain: {{batch_size: 13}}\n")
    assert main(["verify", str(cfg), "--workers", "2", "4", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"dhdnn: error: {topo}: key 'agents': 3 of the 4 workers have no pinned agent "
                                        "but only 2 agents are unpinned; expected an agent on every worker (pin "
                                        "fewer agents to one worker, or use fewer workers)"], err


def test_a_graph_too_large_for_the_dense_engine_is_pointed_to_the_sharded_one(tmp_path, capsys, monkeypatch):
    """One process takes the dense engine, whose matrices grow with the square of the state; where
    it does not fit but the sharded engine (the graph's blocks only) would, the error names the key
    that selects it, with its estimate; where neither fits, it does not (memory fixed at 1 GiB)."""
    from dhdnn import resources

    monkeypatch.setattr(resources, "available_memory", lambda: 1 << 30)
    (tmp_path / "ring.yaml").write_text("generator: {kind: ring, agents: 3000}\n")
    cfg = tmp_path / "run.yaml"
    cfg.write_text("topology: ring.yaml\nmodel: {arch: H2, layers: 4}\ndata: {n_samples: 200}\n")
    for layers, hint in ((4, True), (10**7, False)):
        args = ["train", str(cfg), "--no-progress", "--out", str(tmp_path / "r"), "--set", f"model.layers={layers}"]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "key 'model': the run needs an estimated" in err and len(err.strip().splitlines()) == 1, err
        assert ("(or set run.engine: sharded, an estimated" in err) == hint, err
