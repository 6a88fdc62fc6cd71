"""Helpers shared by the benchmark scripts: timing and JSON results under benchmarks/results/."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parent.parent
# The benchmarks name configs and topologies relative to the repository root (as the README
# does), wherever they are started from; workers they spawn inherit this directory.
os.chdir(ROOT)


LANDED = "616986c"  # the landed commit that speed targets are measured against, side by side


@contextlib.contextmanager
def landed_worktree(enabled: bool = True, commit: str = LANDED):
    """The landed commit (``commit``) checked out in a temporary git worktree (removed afterwards), or None.
    Run it as ``PYTHONPATH=<worktree>`` from the worktree itself: ``python -m`` puts the working
    directory first on sys.path, so from this checkout it would run this code (checked here)."""
    if not enabled:
        yield None
        return
    with tempfile.TemporaryDirectory() as tmp:
        wt = Path(tmp) / "landed"
        subprocess.run(["git", "worktree", "add", "--detach", str(wt), commit], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            found = subprocess.run([sys.executable, "-c", "import dhdnn; print(dhdnn.__file__)"], cwd=wt,
                                   env={**os.environ, "PYTHONPATH": str(wt)}, capture_output=True, text=True)
            assert found.stdout.strip().startswith(str(wt)), found.stdout  # the landed code, not this one
            yield wt
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(wt)], cwd=ROOT, capture_output=True)


def timeit(fn, repeat: int = 20, warmup: int = 3) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "torch": torch.__version__, "machine": platform.machine(),
               "python": platform.python_version(), **payload}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1))
    return path


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1, as for an estimate from a few seeds)."""
    import numpy as np

    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def train_cli(out: Path, workers: int, sets=(), config: str = "launch/ring8_swiss_roll.yaml", resume: bool = False,
              timeout: int = 1200, env: dict | None = None, cwd: Path = ROOT) -> dict:
    """``dhdnn train CONFIG --out OUT --workers N --set ...`` in a fresh process, as a user runs it:
    the run's ``summary.json``, its ``metrics.jsonl`` rows (``metrics``), when the command started
    (``command_start_unix``) and what it printed on stderr."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "dhdnn", "train", str(ROOT / config), "--no-progress", "--out", str(out),
           "--workers", str(workers), *(a for s in sets for a in ("--set", s))] + (["--resume"] if resume else [])
    start = time.time()
    # (``python -m`` puts the working directory first on sys.path: run another checkout from its own)
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=timeout,
                       env={**os.environ, **env} if env else None)
    if p.returncode:
        raise RuntimeError(p.stderr[-3000:])
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {**json.loads((out / "summary.json").read_text()), "metrics": metrics, "command_start_unix": start,
            "stderr": p.stderr}


def _train_one(job: tuple[str, list[str]]) -> dict:
    """One training run in a fresh process: (config path, overrides) -> the run's summary."""
    import tempfile

    from dhdnn.config import load_config
    from dhdnn.run import train_from_config

    torch.set_num_threads(1)
    path, overrides = job
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(ROOT / path, [*overrides, f"run.out_dir={tmp}/run", "run.progress=false"])
        t = time.perf_counter()
        summary = train_from_config(cfg)
    return {**summary, "seconds": time.perf_counter() - t}


def train_many(jobs: list[tuple[str, list[str]]], processes: int = 2) -> list[dict]:
    """Train every job, ``processes`` at a time, each in its own spawned process (one thread each,
    so two runs share this 2-core machine without slowing each other)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(processes, mp_context=mp.get_context("spawn")) as pool:
        return list(pool.map(_train_one, jobs))
