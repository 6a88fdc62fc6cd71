"""A run directory: owned by one run at a time, and enough on its own to resume, export,
evaluate and plot the run from any working directory.

The run writing it holds an exclusive ``flock`` on ``.dhdnn.lock`` (the launcher, or rank 0 under
torchrun) and every worker a shared one on ``.dhdnn-workers.lock``: a second run exits naming the
holder, and the locks die with their processes. ``config.yaml`` is the resolved config with the
topology beside it (``topology.yaml``, as given); topology identity is by content, so an edited
topology is refused on resume with what changed.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

import yaml

from . import checkpoint as ckpt
from .config import Config

LOCK = ".dhdnn.lock"
WORKERS_LOCK = ".dhdnn-workers.lock"
TOPOLOGY = "topology.yaml"


class RunDirError(RuntimeError):
    """A run directory that another run holds, or that does not fit this run."""

    exit_code = 2


class RunLock:
    """The exclusive lock of the run writing ``out`` (kept until :meth:`release` or process exit)."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.fd: int | None = None

    def acquire(self, workers_wait_s: float = 8.0) -> "RunLock":
        if self.out.exists() and not self.out.is_dir():
            raise RunDirError(f"run.out_dir: {self.out} is a file; expected a directory (or a path to create one)")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.out / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise RunDirError(f"run.out_dir: cannot create {self.out} or write in it ({e.strerror}); expected a "
                              "directory this user can write") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirError(f"run.out_dir: {self.out} is in use by another run ({holder}); wait for it to "
                              "finish or choose another run.out_dir") from None
        # an old run's workers may still be winding down (they die within seconds of their launcher)
        wfd = os.open(self.out / WORKERS_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        deadline = time.monotonic() + workers_wait_s
        while True:
            try:
                fcntl.flock(wfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(wfd, fcntl.LOCK_UN)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(wfd)
                    os.close(fd)
                    raise RunDirError(f"run.out_dir: {self.out}: workers of an earlier run are still "
                                      "writing here") from None
                time.sleep(0.1)
        os.close(wfd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                                 "command": " ".join(sys.argv)[:500]}).encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
        return f"pid {info['pid']} on {info['host']}, started {when}: {info['command']}"
    except (ValueError, KeyError, OSError):
        return "holder unknown"


def hold_as_worker(out: Path) -> int:
    """A worker's shared lock on the run directory (released when the process ends)."""
    Path(out).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(out) / WORKERS_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


LOGS = ("metrics.jsonl", "grad_norms.jsonl", "summary.json")


def check_fresh(out: Path, resume: bool) -> None:
    """Refuse to train over an existing run unless resuming: saved work is never clobbered.
    A directory whose run never completed a checkpoint holds no saved work: its logs go."""
    if resume:
        return
    if ckpt.latest(out) is not None:
        raise RunDirError(f"run.out_dir: {out} already holds a run; pass --resume to continue it "
                          "or choose another run.out_dir")
    for name in LOGS:
        (Path(out) / name).unlink(missing_ok=True)
    for trace in Path(out).glob("trace-rank*.jsonl"):
        trace.unlink()


def check_same_model(out: Path, cfg: Config, meta: dict) -> None:
    saved = meta.get("config", {}).get("model")
    if saved is not None and saved != cfg.to_dict()["model"]:
        changed = sorted(k for k in set(saved) | set(cfg.to_dict()["model"])
                         if saved.get(k) != cfg.to_dict()["model"].get(k))
        raise RunDirError(f"{out}: key 'model' differs between the checkpoint and this config "
                          f"({', '.join(f'model.{k}' for k in changed)}); resume with the same model")


def report_resume(out: Path, cfg: Config, meta: dict, say) -> None:
    """Say what a resume changes: data and train keys that differ from the checkpoint's config
    (they apply from its epoch on; train.epochs is how a run is extended, not listed), and a
    checkpoint already at train.epochs (nothing to train: the run re-evaluates it)."""
    saved, now = meta.get("config", {}), cfg.to_dict()
    changed = [f"{s}.{k} {saved[s].get(k)!r} -> {now[s].get(k)!r}" for s in ("data", "train") if s in saved
               for k in sorted(set(saved[s]) | set(now[s])) if saved[s].get(k) != now[s].get(k) and k != "epochs"]
    epoch = int(meta.get("epoch", 0))
    if changed:
        say(f"dhdnn: resuming {out} at epoch {epoch} with {', '.join(changed)}: changed since the checkpoint, "
            "they apply from here on")
    if epoch >= cfg.train.epochs:
        say(f"dhdnn: {out} is at epoch {epoch} and train.epochs is {cfg.train.epochs}: nothing to train, "
            f"evaluating the checkpoint (raise train.epochs to train on, e.g. --set train.epochs={epoch + 10})")


def saved_topology(out: Path):
    """The topology a run directory was trained on (None without one)."""
    from .topology import topology_from_dict

    path = Path(out) / TOPOLOGY
    if not path.exists():
        return None
    return topology_from_dict(yaml.safe_load(path.read_text()), str(path))


def check_same_topology(out: Path, topo, meta: dict) -> None:
    """On resume: the topology must be the one the run was trained on (by content)."""
    saved_fp = meta.get("topology")
    new_fp = topo.fingerprint if topo is not None else None
    if saved_fp == new_fp:
        return
    from .topology import describe_change

    old = saved_topology(out)
    what = describe_change(old, topo) if old is not None and topo is not None else \
        "one of them has no topology" if (saved_fp is None) != (new_fp is None) else "content differs"
    raise RunDirError(f"{out}: key 'topology' differs from the one the run was trained on ({what}); "
                      "resume with the same topology")


def write_run_files(cfg: Config, topo) -> None:
    """``config.yaml`` (topology by reference to ``topology.yaml`` beside it) and the topology."""
    out = Path(cfg.run.out_dir)
    raw = cfg.to_dict()
    if topo is not None:
        ckpt.atomic_write_text(out / TOPOLOGY, yaml.safe_dump(_plain(topo.spec), sort_keys=False))
        raw["topology"] = TOPOLOGY
    raw["run"]["out_dir"] = str(out)
    ckpt.atomic_write_text(out / "config.yaml", yaml.safe_dump(raw, sort_keys=False))


def _plain(x):
    """YAML-safe copy (tuples to lists)."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def run_config(run_dir: str | Path) -> Config:
    """The config of a run directory, its topology resolved beside it (any working directory)."""
    from .config import config_from_dict

    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: no config.yaml; is this a dhdnn run directory?")
    raw = yaml.safe_load(path.read_text())
    raw.setdefault("run", {})["out_dir"] = str(run_dir)
    return config_from_dict(raw, str(path))


class RunDir:
    """Prepare ``cfg.run.out_dir`` for this run: lock it, clean what an interrupted run left,
    check fresh-vs-resume and the topology, write the run files. Use as a context manager."""

    def __init__(self, cfg: Config, topo, resume: bool):
        self.cfg, self.topo, self.resume = cfg, topo, resume
        self.out = Path(cfg.run.out_dir)
        self.lock = RunLock(self.out)

    def __enter__(self) -> "RunDir":
        self.lock.acquire()
        try:
            ckpt.clean_partial(self.out)
            check_fresh(self.out, self.resume)
            if self.resume:
                found = ckpt.load_newest_readable(self.out, report=lambda m: print(m, file=sys.stderr, flush=True))
                if found is None:
                    raise ckpt.CheckpointError(f"{self.out}: --resume given but no complete checkpoint found")
                meta = found[1]
                check_same_model(self.out, self.cfg, meta)
                check_same_topology(self.out, self.topo, meta)
                report_resume(self.out, self.cfg, meta, lambda m: print(m, file=sys.stderr, flush=True))
            write_run_files(self.cfg, self.topo)
        except BaseException:
            self.lock.release()
            raise
        return self

    def __exit__(self, *exc) -> bool:
        if exc[0] is not None:
            ckpt.clean_partial(self.out)  # an interrupted run leaves no temp files behind
        self.lock.release()
        return False
