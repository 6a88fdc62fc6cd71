"""The local workers' forkserver: one per launcher, with torch and dhdnn's engine preloaded.

:func:`start` starts it as soon as the launcher knows it will run local workers: ``dhdnn train``
does so before it imports torch itself, so that the two imports overlap (a one-epoch run on 2
workers: 8.1-9.7 s -> 5.5-6.2 s on 2 cores). This module imports nothing heavy."""
from __future__ import annotations

import multiprocessing as mp

# the lifeline first (light: its parent-death signal is set ~50 ms after start, so a launcher that
# exits at once, on a bad config, takes the forkserver with it): it dies with the launcher, and
# its workers with it;
# torch._dynamo: the first optimizer imports it (0.9 s), better once here than in every worker
PRELOAD = ["dhdnn.lifeline", "torch", "torch.distributed", "torch._dynamo", "dhdnn.distributed.engine",
           "dhdnn.run"]
_CTX = None


def context():
    """The multiprocessing context local workers start from."""
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(PRELOAD)
    return _CTX


def start() -> None:
    """Start the forkserver now; it imports its preload in the background (else the first worker
    starts it and waits for the whole preload)."""
    from multiprocessing import forkserver

    context()
    forkserver.ensure_running()
