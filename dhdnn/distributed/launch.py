"""Processes: process groups, local workers on 127.0.0.1, torchrun's environment.

``run_local`` starts ``world`` workers (forkserver, torch preloaded), joins them through a
``FileStore`` in a fresh temp directory (no port guessing; gloo on loopback only) and watches
them: a worker never outlives its launcher (a parent-death signal and a watchdog thread); SIGINT,
SIGTERM and SIGHUP stop every worker (:class:`Interrupted`); when one fails the others follow,
leftovers are killed after a grace, and :class:`WorkerFailure` names the first failure. Under
``torchrun`` the workers join through the agent's store, under a prefix per restart attempt.
"""
from __future__ import annotations

import datetime
import errno
import json
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from .. import forkserver

FAILED_KEY = "dhdnn/failed_rank"
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)  # the run directory could not be written
GRACE_S = 5.0  # after a worker fails, how long the others get to fail on their own before being killed
USER_ERRORS = ("ConfigError", "TopologyError", "CheckpointError", "NotDistributable", "RunDirError")


class WorkerFailure(RuntimeError):
    """A worker process failed; ``rank`` is the first failure, ``details`` its traceback (or its
    one-line message when ``kind`` is ``user``), ``kind`` one of user, nonfinite, hung, killed, error."""

    def __init__(self, rank: int, details: str, exitcodes: list[int | None], kind: str = "error"):
        self.rank, self.details, self.exitcodes, self.kind = rank, details, exitcodes, kind
        super().__init__(f"worker {rank} failed (exit codes by rank: {exitcodes})\n{details}")


class Interrupted(Exception):
    """The run was stopped by a signal (SIGINT, SIGTERM, SIGHUP)."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when launched by torchrun, else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    return None


def pick_backend(backend: str, device: str, local_workers: int = 1) -> str:
    """``auto``: nccl where every worker on this machine has a GPU of its own (nccl refuses two
    ranks on one GPU), else gloo (CUDA tensors then staged through the CPU)."""
    if backend != "auto":
        return backend
    fits = device.startswith("cuda") and local_workers <= torch.cuda.device_count()
    return "nccl" if fits else "gloo"


def init_group(backend: str, rank: int, world: int, timeout_s: float, store=None) -> None:
    """Join the default process group with an explicit timeout (``store`` given: local workers;
    otherwise torchrun's environment, see :func:`torchrun_store`)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if store is None:
        store = torchrun_store(timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)


def torchrun_store(timeout: datetime.timedelta):
    """torchrun's store, prefixed by the restart attempt where every node agrees on it.

    torchrun's agents share one store server across restarts, so keys written by a failed
    attempt (gloo's addresses among them) are still there when the next attempt starts; read
    back, they make it connect to dead ranks or wait forever. On one node the restart count
    names the attempt; across nodes the shipped launch scripts give every attempt a fresh
    store instead (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``)."""
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if shared and os.environ.get("GROUP_WORLD_SIZE", "1") == "1":
        return dist.PrefixStore(f"dhdnn/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    if shared and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and int(os.environ["RANK"]) == 0:
        print("dhdnn: warning: torchrun shares one store across restarts on several nodes; start it through "
              "launch/torchrun_multi_node.sh (or set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1) so that a restart "
              "cannot read the failed attempt's addresses", file=sys.stderr)
    return store


def note_failure(rank: int) -> None:
    """Record in the shared store which rank failed first, so every worker can name it."""
    try:
        dist.distributed_c10d._get_default_store().compare_set(FAILED_KEY, "", str(rank))
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


def available_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def pin(local_rank: int, threads: int, cores: list[int]) -> None:
    """Give worker ``local_rank`` its own ``threads`` cores: its compute thread and gloo's I/O
    thread then hand messages over on one core instead of migrating (a measured 20-30 % off each
    exchange on 2 cores). Only called when the workers fit the cores."""
    mine = cores[local_rank * threads:(local_rank + 1) * threads]
    if mine and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(mine))


def quiet_transport_threads() -> int:
    """Run gloo's transport threads at SCHED_IDLE priority; returns how many were changed.

    gloo's event-loop thread answers socket events with ``try_lock`` on a pair's mutex and,
    failing, spins on ``epoll`` (level-triggered). When it runs while our thread holds that
    mutex (posting a send or receive as a neighbour's message arrives), it spins for a
    whole scheduler tick before our thread gets the core back: measured 10-20 % of posts
    taking ~4 ms on 2 cores. At idle priority it runs exactly when our thread waits, which is
    when its work is needed (one exchange: 1.7 ms -> 0.07 ms on the paper's ring)."""
    changed = 0
    if not hasattr(os, "sched_setscheduler"):
        return 0
    for tid in os.listdir("/proc/self/task"):
        try:
            name = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
            if name.startswith(("gloo", "pt_gloo")):
                os.sched_setscheduler(int(tid), os.SCHED_IDLE, os.sched_param(0))
                changed += 1
        except (OSError, ValueError):
            continue
    return changed


def quiet_gloo() -> None:
    """:func:`quiet_transport_threads` where this process's default group is gloo (every group
    made so far: call it again after making new ones). ``DHDNN_QUIET_GLOO=0`` leaves them at
    normal priority (cores shared with other busy processes, where idle priority could wait)."""
    if dist.is_initialized() and dist.get_backend() == "gloo" and os.environ.get("DHDNN_QUIET_GLOO", "1") != "0":
        quiet_transport_threads()


def describe_failure(rank: int, e: BaseException, primary: bool) -> str:
    culprit = None if primary else failed_rank()
    head = f"rank {rank}: " + (f"worker {culprit} failed; " if culprit is not None and culprit != rank else "")
    return head + "".join(traceback.format_exception(e))


_COMM_ERRORS = ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out", "Broken pipe",
                "Connection refused")


def classify(rank: int, e: BaseException) -> dict:
    """How a worker failed: primary (its own fault) or a peer's consequence, and of what kind."""
    from .exchange import PeerFailure

    name = type(e).__name__
    peer = getattr(e, "peer", None)
    if isinstance(e, PeerFailure) or any(s in str(e) for s in _COMM_ERRORS):
        if peer is not None:
            note_failure(peer)
        return {"primary": False, "kind": "peer", "peer": peer}
    note_failure(rank)
    if name in USER_ERRORS or getattr(e, "exit_code", None) == 2:
        return {"primary": True, "kind": "user", "message": str(e).splitlines()[0]}
    if getattr(e, "exit_code", None) == 3:
        return {"primary": True, "kind": "nonfinite", "message": str(e).splitlines()[0]}
    if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
        return {"primary": True, "kind": "disk", "message": e.strerror}
    return {"primary": True, "kind": "error"}


# ---- the worker side ----------------------------------------------------------------------------
def guard_worker(launcher_pid: int) -> None:
    """This process dies with its launcher: SIGKILL from the kernel when its parent (the
    forkserver, itself tied to the launcher) dies, and a watchdog thread on the launcher's pid."""
    from ..lifeline import alive, die_with_parent

    die_with_parent()

    def watch():
        while alive(launcher_pid):
            time.sleep(0.25)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True, name="dhdnn-launcher-watch").start()


def _child(rank: int, world: int, store_path: str, out_dir: str, backend: str, timeout_s: float,
           target: Callable, args: tuple, launcher_pid: int, cores: list[int] | None, threads: int) -> None:
    guard_worker(launcher_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher handles terminal signals for the run
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # local workers talk over 127.0.0.1 only
    if cores is not None:
        pin(rank, threads, cores)
    import torch

    # as many compute threads as the worker has cores: more (torch's default is every core) spin
    # against each other in the BLAS library's barriers on a pinned worker, many times slower
    torch.set_num_threads(threads)
    try:
        store = dist.FileStore(store_path, world)
        init_group(backend, rank, world, timeout_s, store=store)
        result = target(rank, world, *args)
        with open(Path(out_dir) / f"result{rank}.pkl", "wb") as f:
            pickle.dump(result, f)
        dist.destroy_process_group()
    except BaseException as e:  # report, then leave at once so that peers see the closed sockets
        info = classify(rank, e)
        info["text"] = describe_failure(rank, e, info["primary"])
        (Path(out_dir) / f"error{rank}.json").write_text(json.dumps(info))
        os._exit(1)


# ---- the launcher side --------------------------------------------------------------------------
class Signals:
    """While inside, SIGINT/SIGTERM/SIGHUP (main thread only) are recorded in ``received`` for a
    watch loop to act on, or with ``raising`` raised as :class:`Interrupted` (as SIGINT raises
    KeyboardInterrupt), so cleanup runs on the way out. Handlers are restored on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self, raising: bool = False):
        self.received: int | None = None
        self.raising = raising

    def __enter__(self):
        self.old = {}
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self.old[s] = signal.signal(s, self._on)
        return self

    def _on(self, signum, frame):
        self.received = signum
        if self.raising:
            raise Interrupted(signum)

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)
        return False


def run_local(target: Callable, world: int, args: tuple = (), backend: str = "gloo", timeout_s: float = 60.0,
              run_timeout_s: float | None = None, threads: int = 1, pin_workers: bool = True) -> list[Any]:
    """Run ``target(rank, world, *args)`` in ``world`` local processes; return the results by rank.

    Raises :class:`WorkerFailure` (the first failure) if any worker fails, :class:`Interrupted`
    on SIGINT/SIGTERM/SIGHUP; either way no worker is left running and the temp directory is
    removed."""
    ctx = forkserver.context()
    reap_stale_scratch()
    tmp = Path(tempfile.mkdtemp(prefix=f"{SCRATCH}{os.getpid()}-"))
    cores = available_cores()
    use = cores if pin_workers and world * threads <= len(cores) else None
    procs = [ctx.Process(target=_child, args=(r, world, str(tmp / "store"), str(tmp), backend, timeout_s, target,
                                              args, os.getpid(), use, threads), daemon=False) for r in range(world)]
    try:
        with Signals() as sig:
            for p in procs:
                p.start()
            killed = _watch(procs, timeout_s, run_timeout_s, sig)
            if sig.received is not None:
                raise Interrupted(sig.received)
        codes = [p.exitcode for p in procs]
        if any(c != 0 for c in codes):
            raise _first_failure(tmp, codes, killed, timeout_s)
        out = []
        for r in range(world):
            with open(tmp / f"result{r}.pkl", "rb") as f:
                out.append(pickle.load(f))
        return out
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            if p.pid is not None:
                p.join(5)
        shutil.rmtree(tmp, ignore_errors=True)


SCRATCH = "dhdnn-workers-"  # + launcher pid: the rendezvous file and the workers' results


def reap_stale_scratch() -> list[Path]:
    """Remove the scratch directories of launchers that are gone (killed by SIGKILL, which
    leaves no chance to clean up)."""
    from ..lifeline import alive

    removed = []
    for d in Path(tempfile.gettempdir()).glob(f"{SCRATCH}*"):
        try:
            pid = int(d.name[len(SCRATCH):].split("-", 1)[0])
        except ValueError:
            continue
        if not alive(pid):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def _kill_all(procs) -> set[int]:
    alive = {r for r, p in enumerate(procs) if p.is_alive()}
    for r in alive:
        procs[r].kill()  # SIGKILL also ends a stopped process
    for p in procs:
        p.join(5)
    return alive


def _watch(procs, timeout_s: float, run_timeout_s: float | None, sig: Signals) -> set[int]:
    """Wait for every worker; returns the ranks that had to be killed."""
    start, first_fail = time.monotonic(), None
    while any(p.is_alive() for p in procs):
        if sig.received is not None:
            return _kill_all(procs)
        now = time.monotonic()
        if first_fail is None and any(p.exitcode not in (None, 0) for p in procs):
            first_fail = now
        # a worker stuck past the process-group timeout cannot be waiting on a live peer
        grace_over = first_fail is not None and now - first_fail > GRACE_S
        run_over = run_timeout_s is not None and now - start > run_timeout_s
        if grace_over or run_over:
            return _kill_all(procs)
        time.sleep(0.02)
    for p in procs:
        p.join()
    return set()


def _first_failure(tmp: Path, codes: list[int | None], killed: set[int], timeout_s: float) -> WorkerFailure:
    """The root cause: a primary error, else a worker the others blame that had to be killed
    (hung), else a worker killed by a signal, else the earliest error."""
    errors = {}
    for r in range(len(codes)):
        p = tmp / f"error{r}.json"
        if p.exists():
            errors[r] = (json.loads(p.read_text()), p.stat().st_mtime)
    primary = sorted((r for r, (e, _) in errors.items() if e["primary"]), key=lambda r: errors[r][1])
    if primary:
        r = primary[0]
        e = errors[r][0]
        return WorkerFailure(r, e.get("message") or e["text"], codes, e["kind"])
    blamed = [e["peer"] for e, _ in errors.values() if e.get("peer") is not None]
    hung = [r for r in killed if r in blamed and r not in errors] or [r for r in killed if r not in errors]
    if hung and errors:
        r = max(hung, key=blamed.count)
        return WorkerFailure(r, f"worker {r} stopped answering: its neighbours waited {timeout_s:g} s "
                                f"(run.timeout_s) for its messages; it was still running and was killed", codes, "hung")
    for r, c in enumerate(codes):
        if c is not None and c < 0 and r not in killed:
            return WorkerFailure(r, f"worker {r} was killed by signal {-c} (no traceback: the process died at once)",
                                 codes, "killed")
    if errors:
        r = min(errors, key=lambda r: errors[r][1])
        return WorkerFailure(r, errors[r][0]["text"], codes, errors[r][0]["kind"])
    r = next(r for r, c in enumerate(codes) if c != 0)
    return WorkerFailure(r, f"worker {r} exited with code {codes[r]} without a traceback (timed out?)", codes)


def fault_from_env() -> tuple[int, int, str] | None:
    """Test-only fault injection: ``DHDNN_FAULT=RANK:STEP:kill|raise|stop[:ATTEMPT]`` (ATTEMPT:
    only in that torchrun restart attempt)."""
    spec = os.environ.get("DHDNN_FAULT")
    if not spec:
        return None
    rank, step, mode, *attempt = spec.split(":")
    if attempt and attempt[0] != os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"):
        return None
    return int(rank), int(step), mode
