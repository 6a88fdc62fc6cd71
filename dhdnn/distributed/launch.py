"""Processes: process groups, local workers on 127.0.0.1, torchrun's environment.

``run_local`` starts ``world`` worker processes (forkserver, torch preloaded), joins them
through a ``FileStore`` in a fresh temp directory (no port guessing), and watches them:
when one fails, the others fail too within the process-group timeout (a dead peer closes
its sockets, so neighbours see it at once), leftovers are killed after a grace period,
and :class:`WorkerFailure` names the failing worker with its traceback. Every wait has a
timeout. Under ``torchrun`` the same worker code reads ``RANK``/``WORLD_SIZE`` and joins
with ``env://``.
"""
from __future__ import annotations

import datetime
import os
import pickle
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

FAILED_KEY = "dhdnn/failed_rank"


class WorkerFailure(RuntimeError):
    """A worker process failed; ``rank`` is the first failure, ``details`` its traceback."""

    def __init__(self, rank: int, details: str, exitcodes: list[int | None]):
        self.rank, self.details, self.exitcodes = rank, details, exitcodes
        super().__init__(f"worker {rank} failed (exit codes by rank: {exitcodes})\n{details}")


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when launched by torchrun, else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    return None


def pick_backend(backend: str, device: str) -> str:
    if backend != "auto":
        return backend
    return "nccl" if device.startswith("cuda") else "gloo"


def init_group(backend: str, rank: int, world: int, timeout_s: float, store=None) -> None:
    """Join the default process group with an explicit timeout (store given: local workers)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if store is not None:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    else:
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, timeout=timeout)


def note_failure(rank: int) -> None:
    """Record in the shared store which rank failed first, so every worker can name it."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.compare_set(FAILED_KEY, "", str(rank))
    except Exception:  # the store itself may be gone; the launcher still reports
        pass


def failed_rank(wait_s: float = 2.0) -> int | None:
    """The rank recorded by :func:`note_failure`, waiting briefly for it to appear."""
    try:
        store = dist.distributed_c10d._get_default_store()
    except Exception:
        return None
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            if store.check([FAILED_KEY]):
                v = store.get(FAILED_KEY).decode()
                return int(v) if v else None
        except Exception:
            return None
        time.sleep(0.05)
    return None


def keep_freed_memory() -> None:
    """Ask glibc to keep freed memory instead of unmapping every large block: otherwise each
    step's big temporaries come back as fresh pages and zero-filling them (page faults) costs
    more than the arithmetic. Harmless elsewhere; a no-op where glibc is absent."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: serve blocks up to 32 MiB from the heap
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: do not return heap memory eagerly
    except (OSError, AttributeError):
        pass


def _child(rank: int, world: int, store_path: str, out_dir: str, backend: str, timeout_s: float,
           target: Callable, args: tuple) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # local workers talk over 127.0.0.1 only
    keep_freed_memory()
    try:
        store = dist.FileStore(store_path, world)
        init_group(backend, rank, world, timeout_s, store=store)
        result = target(rank, world, *args)
        with open(Path(out_dir) / f"result{rank}.pkl", "wb") as f:
            pickle.dump(result, f)
        dist.destroy_process_group()
    except BaseException as e:  # report, then leave at once so that peers see the closed sockets
        primary = report_failure(rank, e)
        text = describe_failure(rank, e, primary)
        (Path(out_dir) / f"error{rank}.txt").write_text(("PRIMARY\n" if primary else "PEER\n") + text)
        os._exit(1)


_COMM_ERRORS = ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out", "Broken pipe")


def report_failure(rank: int, e: BaseException) -> bool:
    """Record who failed first in the store; True if ``e`` is this rank's own failure rather than
    the consequence of a peer's."""
    from .exchange import PeerFailure

    if isinstance(e, PeerFailure):
        if e.peer is not None:
            note_failure(e.peer)
        return False
    if any(s in str(e) for s in _COMM_ERRORS):
        return False
    note_failure(rank)
    return True


def describe_failure(rank: int, e: BaseException, primary: bool) -> str:
    culprit = None if primary else failed_rank()
    head = f"rank {rank}: " + (f"worker {culprit} failed; " if culprit is not None and culprit != rank else "")
    return head + "".join(traceback.format_exception(e))


_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["torch", "torch.distributed", "dhdnn.distributed.sharded"])
    return _CTX


def run_local(target: Callable, world: int, args: tuple = (), backend: str = "gloo", timeout_s: float = 60.0,
              run_timeout_s: float | None = None) -> list[Any]:
    """Run ``target(rank, world, *args)`` in ``world`` local processes; return the results by rank.

    Raises :class:`WorkerFailure` naming the first failing worker (with its traceback) if any
    worker fails, and kills workers still alive ``timeout_s + 10`` s after the first failure or
    after ``run_timeout_s`` overall."""
    ctx = _context()
    tmp = Path(tempfile.mkdtemp(prefix="dhdnn-workers-"))
    procs = [ctx.Process(target=_child, args=(r, world, str(tmp / "store"), str(tmp), backend, timeout_s, target,
                                              args), daemon=False) for r in range(world)]
    try:
        for p in procs:
            p.start()
        _watch(procs, timeout_s, run_timeout_s)
        codes = [p.exitcode for p in procs]
        if any(c != 0 for c in codes):
            rank, details = _first_failure(tmp, codes)
            raise WorkerFailure(rank, details, codes)
        out = []
        for r in range(world):
            with open(tmp / f"result{r}.pkl", "rb") as f:
                out.append(pickle.load(f))
        return out
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def _watch(procs, timeout_s: float, run_timeout_s: float | None) -> None:
    start, first_fail = time.monotonic(), None
    while any(p.is_alive() for p in procs):
        now = time.monotonic()
        if first_fail is None and any(p.exitcode not in (None, 0) for p in procs):
            first_fail = now
        grace_over = first_fail is not None and now - first_fail > timeout_s + 10
        run_over = run_timeout_s is not None and now - start > run_timeout_s
        if grace_over or run_over:
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(5)
            return
        time.sleep(0.02)
    for p in procs:
        p.join()


def _first_failure(tmp: Path, codes: list[int | None]) -> tuple[int, str]:
    """The root cause: a worker killed by a signal, else a primary error, else the earliest error."""
    for r, c in enumerate(codes):
        if c is not None and c < 0:
            return r, f"worker {r} was killed by signal {-c} (no traceback: the process died at once)"
    errors = {r: (tmp / f"error{r}.txt") for r in range(len(codes)) if (tmp / f"error{r}.txt").exists()}
    primary = [r for r, p in errors.items() if p.read_text().startswith("PRIMARY")]
    pool = primary or sorted(errors, key=lambda r: errors[r].stat().st_mtime)
    if pool:
        r = pool[0]
        return r, errors[r].read_text().split("\n", 1)[1]
    r = next(r for r, c in enumerate(codes) if c != 0)
    return r, f"worker {r} exited with code {codes[r]} without a traceback (timed out?)"


# ---- training ---------------------------------------------------------------------------------
def fault_from_env() -> tuple[int, int, str] | None:
    """Test-only fault injection: ``DHDNN_FAULT=RANK:STEP:kill|raise``."""
    spec = os.environ.get("DHDNN_FAULT")
    if not spec:
        return None
    rank, step, mode = spec.split(":")
    return int(rank), int(step), mode


def sharded_worker(rank: int, world: int, cfg_dict: dict, resume: bool, source: str = "<config>",
                   local_rank: int | None = None, fault: tuple[int, int, str] | None = None):
    """Train one rank of a sharded run; returns the summary on rank 0, None elsewhere."""
    from ..config import config_from_dict
    from ..train import Trainer, load_data
    from .sharded import build_sharded_engine

    cfg = config_from_dict(cfg_dict, source)
    torch.set_num_threads(cfg.run.threads)
    device = cfg.run.device
    if device.startswith("cuda") and device == "cuda":
        device = f"cuda:{(rank if local_rank is None else local_rank) % torch.cuda.device_count()}"
    data = load_data(cfg)
    engine = build_sharded_engine(cfg, data, rank, world, device=device, fault=fault)
    summary = Trainer(cfg, engine, data, resume=resume).fit()
    return summary if rank == 0 else None


def train_sharded(cfg, resume: bool = False) -> dict | None:
    """The sharded engine: under torchrun in this process, else on ``run.workers`` local workers."""
    backend = pick_backend(cfg.run.backend, cfg.run.device)
    env = torchrun_env()
    if env is not None:
        rank, world, local_rank = env
        if cfg.run.workers not in (1, world):
            raise ValueError(f"run.workers: {cfg.run.workers} differs from torchrun's world size {world}; "
                             "leave it at 1 under torchrun")
        init_group(backend, rank, world, cfg.run.timeout_s)
        keep_freed_memory()
        try:
            return sharded_worker(rank, world, cfg.to_dict(), resume, cfg.source, local_rank, fault_from_env())
        except BaseException as e:
            primary = report_failure(rank, e)
            raise RuntimeError(describe_failure(rank, e, primary)) from e
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    results = run_local(sharded_worker, cfg.run.workers, (cfg.to_dict(), resume, cfg.source, None, fault_from_env()),
                        backend, cfg.run.timeout_s)
    return results[0]
