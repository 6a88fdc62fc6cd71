"""The fused kernel's two kinds of loops, side by side: loops compiled for one block shape against
the one nest for every shape (``fused.ANY``, the shape read when it runs), which rare shapes share.

One thread, 2,000 blocks (one per output group), batch 128, float32 and float64: the product, the
transposed product and the weight gradient, best of 5 x 10 calls each, and the largest difference
between the two kinds' results. Prints and writes ``benchmarks/results/shape_loops.json``.

    python benchmarks/bench_shape_loops.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from dhdnn.integrator import fused  # noqa: E402

SHAPES = [(8, 8), (4, 4), (3, 5), (2, 3), (1, 1)]


def best_ms(f, rounds: int = 5, calls: int = 10) -> float:
    f()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            f()
        best = min(best, (time.perf_counter() - t) / calls * 1e3)
    return best


def case(R: int, C: int, dtype, nb: int = 2000, B: int = 128) -> dict:
    rng = np.random.default_rng(0)
    W = rng.standard_normal((nb, R, C)).astype(dtype)
    ptr, blk = np.arange(nb + 1, dtype=np.int64), np.arange(nb, dtype=np.int64)
    row0, col0 = blk * R, blk * C
    X, S = rng.standard_normal((nb * C, B)).astype(dtype), rng.standard_normal((nb * R, B)).astype(dtype)
    bias = rng.standard_normal(nb * R).astype(dtype)
    times, results = {}, {}
    for kind, shape in (("own", (R, C)), ("shared", (fused.ANY, fused.ANY))):
        fns = fused._compiled(*shape, dtype)
        out, Z, G = np.empty((nb * R, B), dtype), np.empty((nb * C, B), dtype), np.zeros((nb, R, C), dtype)
        times[kind] = [best_ms(lambda: fns[0](W, ptr, row0, blk, col0, X, out, bias, 2)),
                       best_ms(lambda: fns[1](W, ptr, col0, blk, row0, S, Z, bias, 1)),
                       best_ms(lambda: fns[2](G, row0, col0, S, X, S, X))]
        results[kind] = (out.copy(), Z.copy(), G.copy())
    diff = max(float(np.abs(a - b).max()) for a, b in zip(results["own"], results["shared"]))
    return {"shape": [R, C], "dtype": np.dtype(dtype).name, "own_ms": times["own"], "shared_ms": times["shared"],
            "ratio": [s / o for s, o in zip(times["shared"], times["own"])], "max_abs_difference": diff}


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    print("shape  dtype    product  transposed  gradient   (shared nest / own loops, time)   max |difference|")
    for R, C in SHAPES:
        for dtype in (np.float32, np.float64):
            r = case(R, C, dtype)
            rows.append(r)
            print(f"{R}x{C:<4} {r['dtype']:8s} " + "  ".join(f"{x:8.2f}x" for x in r["ratio"]) +
                  f"   {r['max_abs_difference']:.1e}", flush=True)
    ratios = [x for r in rows for x in r["ratio"]]
    print(f"shared / own: {min(ratios):.2f}-{max(ratios):.2f}x")
    print("written", write_result("shape_loops", {"blocks": 2000, "batch": 128, "rows": rows}))


if __name__ == "__main__":
    main()
