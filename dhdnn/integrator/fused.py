"""The fused block kernel: a rank's block-sparse products compiled with numba, one pass per block row.

At small blocks PyTorch's batched products cost more in calls and separate sweeps (gather,
product, scatter-add, bias) than in arithmetic. Here each product is one loop nest over the graph,
compiled for the block shape: ``K X + b`` per row agent (bias, then every neighbour block, into
rows that stay in cache), ``K^T s`` per column agent, the weight gradient per block. Blocks must
be contiguous rows of the field (a class that is not goes through ``BlockKernel``'s gathers).
Shapes that carry little of the work share one nest that reads the shape at run time, so a graph
of many agent dims compiles a few loop sets; numba caches them on disk (``NUMBA_CACHE_DIR``, else
``__pycache__``), and :data:`COMPILE` says how long this process spent. CPU only; where numba is
missing, :func:`available` says why. Pure maths.
"""
from __future__ import annotations

import time

import numpy as np
import torch

try:  # numba is a dependency, but a broken LLVM install must not break the PyTorch kernels
    import numba
except ImportError as e:  # pragma: no cover (the one-command install brings numba)
    numba, _MISSING = None, f"numba is not importable ({e})"
else:
    _MISSING = None

COMPILE = {"seconds": 0.0, "kernels": 0}  # compiling (or loading from the cache) in this process


def available(device: torch.device | str = "cpu") -> str | None:
    """None where the fused kernel can run on ``device``, else why not."""
    if torch.device(device).type != "cpu":
        return f"the fused kernel runs on CPU only (device {device})"
    return _MISSING


ANY = 0  # the block shape ``(ANY, ANY)``: one nest for every shape, read from the blocks when it runs


def _specialise(R: int, C: int):
    """The loop nests for ``R x C`` blocks: the product, the transposed product and the weight
    gradient (numba folds ``R``, ``C`` and the transpose in as constants, so the innermost loop
    over the batch is vectorised). ``R = C = ANY``: the same nests with the shape read from the
    blocks at run time (one compilation per dtype serves every shape). Closures are cached per shape."""
    jit = numba.njit(fastmath=True, cache=True, nogil=True)

    def product(transpose: bool):
        NO, NI = (C, R) if transpose else (R, C)  # a block's output rows and input rows

        @jit
        def run(W, ptr, out0, blk, in0, X, out, bias, init):
            """``out[the NO rows of group g] (=init or +=) sum over its blocks W[b] X[in0[b]:+NI]``
            (``W[b]^T`` when transposed); ``init``: 0 add, 1 start from zero, 2 from ``bias``."""
            B, no, ni = X.shape[1], NO, NI
            if NO == ANY:  # (folded away where the shape is a constant)
                no, ni = (W.shape[2], W.shape[1]) if transpose else (W.shape[1], W.shape[2])
            for g in range(len(ptr) - 1):
                o0 = out0[g]
                if init:
                    for i in range(no):
                        v = bias[o0 + i] if init == 2 else 0.0
                        for t in range(B):
                            out[o0 + i, t] = v
                for q in range(ptr[g], ptr[g + 1]):
                    b, x0 = blk[q], in0[blk[q]]
                    if NO == ANY:  # a run-time inner bound: the batch loop innermost, to vectorise it
                        for i in range(no):
                            for k in range(ni):
                                w = W[b, k, i] if transpose else W[b, i, k]
                                for t in range(B):
                                    out[o0 + i, t] += w * X[x0 + k, t]
                        continue
                    for i in range(no):
                        for t in range(B):
                            acc = out[o0 + i, t]
                            for k in range(ni):
                                acc += (W[b, k, i] if transpose else W[b, i, k]) * X[x0 + k, t]
                            out[o0 + i, t] = acc
        return run

    @jit
    def grad(G, row0, col0, gu, X, s, GZ):
        """``G[b] = gu[rows] X[cols]^T + s[rows] GZ[cols]^T`` for every block: four columns at a
        time where ``C`` allows (each row of ``gu`` and ``s`` read once for four dot products)."""
        B, nr, nc = X.shape[1], R, C
        if R == ANY:  # (folded away where the shape is a constant)
            nr, nc = G.shape[1], G.shape[2]
        step = 4 if nc % 4 == 0 else 1
        for b in range(len(row0)):
            r0, c0 = row0[b], col0[b]
            for a in range(nr):
                for c in range(0, nc, step):
                    if step == 4:
                        a0 = a1 = a2 = a3 = G[b, a, c] * 0
                        for t in range(B):
                            g, q = gu[r0 + a, t], s[r0 + a, t]
                            a0 += g * X[c0 + c, t] + q * GZ[c0 + c, t]
                            a1 += g * X[c0 + c + 1, t] + q * GZ[c0 + c + 1, t]
                            a2 += g * X[c0 + c + 2, t] + q * GZ[c0 + c + 2, t]
                            a3 += g * X[c0 + c + 3, t] + q * GZ[c0 + c + 3, t]
                        G[b, a, c], G[b, a, c + 1], G[b, a, c + 2], G[b, a, c + 3] = a0, a1, a2, a3
                    else:
                        acc = G[b, a, c] * 0
                        for t in range(B):
                            acc += gu[r0 + a, t] * X[c0 + c, t] + s[r0 + a, t] * GZ[c0 + c, t]
                        G[b, a, c] = acc

    return product(False), product(True), grad


_KERNELS: dict[tuple[int, int], tuple] = {}
_READY: set = set()


def _compiled(R: int, C: int, dtype: np.dtype) -> tuple:
    """The loop nests for one block shape, compiled (or loaded) for ``dtype`` now, timed."""
    key = (R, C, np.dtype(dtype).str)
    if (R, C) not in _KERNELS:
        _KERNELS[R, C] = _specialise(R, C)
    fns = _KERNELS[R, C]
    if key not in _READY:
        t0 = time.perf_counter()
        f, i = np.zeros((2, R, C), dtype), np.zeros(2, np.int64)
        x, v = np.zeros((R + C, 1), dtype), np.zeros(R + C, dtype)
        fns[0](f, i, i[:1], i, i, x, x, v, 2)
        fns[1](f, i, i[:1], i, i, x, x, v, 1)
        fns[2](f, i, i, x, x, x, x)
        COMPILE["seconds"] += time.perf_counter() - t0
        COMPILE["kernels"] += 3
        _READY.add(key)
    return fns


class Groups:
    """One class's blocks of one part (local or halo columns) grouped by an agent: ``ptr`` into
    ``blk`` (block ids, grouped), ``start`` (the group agent's first row), and ``covers`` (the
    groups hold every row of the part's output exactly once: the kernel may start it from
    zero or the bias itself)."""

    def __init__(self, starts: np.ndarray, blocks: np.ndarray, width: int, lo: int, hi: int):
        order = blocks[np.argsort(starts[blocks], kind="stable")]
        first, counts = np.unique(starts[order], return_counts=True)
        self.blk, self.start = order, first.astype(np.int64)
        self.ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        rows = (first[:, None] + np.arange(width)).ravel()
        self.covers = len(rows) == hi - lo and bool(np.array_equal(np.sort(rows), np.arange(lo, hi)))
