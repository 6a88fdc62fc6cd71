"""Layer 2: failure handling — a worker that dies or raises fails the whole run, fast and loudly."""
import os
import subprocess
import sys
import time

import pytest

from dhdnn.config import load_config
from dhdnn.distributed.launch import WorkerFailure
from dhdnn.train import train_from_config

TIMEOUT = 20


def _cfg(tmp_path, workers=3):
    return load_config("launch/ring8_swiss_roll.yaml", [
        f"run.workers={workers}", f"run.out_dir={tmp_path / 'run'}", "run.progress=false", "data.n_samples=800",
        "train.epochs=3", "train.batch_size=50", f"run.timeout_s={TIMEOUT}"])


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


def test_peers_name_the_failed_rank(tmp_path, monkeypatch):
    """Every surviving worker's own error says which worker failed (via the shared store)."""
    from dhdnn.distributed import launch

    seen = {}
    real = launch._first_failure

    def spy(tmp, codes):
        for r in range(len(codes)):
            p = tmp / f"error{r}.txt"
            if p.exists():
                seen[r] = p.read_text()
        return real(tmp, codes)

    monkeypatch.setattr(launch, "_first_failure", spy)
    monkeypatch.setenv("DHDNN_FAULT", "2:4:kill")
    with pytest.raises(WorkerFailure):
        train_from_config(_cfg(tmp_path, workers=4))
    survivors = [r for r in range(4) if r != 2]
    assert set(seen) == set(survivors)
    for r in survivors:
        assert "worker 2 failed" in seen[r], seen[r]


def test_cli_exits_nonzero_and_prints_the_traceback(tmp_path):
    env = dict(os.environ, DHDNN_FAULT="0:3:raise")
    cmd = [sys.executable, "-m", "dhdnn", "train", "launch/ring8_swiss_roll.yaml", "--workers", "2", "--no-progress",
           "--out", str(tmp_path / "r"), "--set", "data.n_samples=400", "--set", "train.epochs=2",
           "--set", f"run.timeout_s={TIMEOUT}"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode != 0
    assert "worker 0 failed" in p.stderr and "injected fault on rank 0" in p.stderr and "Traceback" in p.stderr
