"""Strong scaling on a many-core machine: the compute-heavy ring (256 agents, 64 + 64 state entries,
batch 256, H2, 8 layers), one thread per worker, 1 -> 16 workers: seconds per full training step
(forward, backward, Adam; the slowest rank), and the speed-up over 1 worker. Target at 16
workers: >= 10x. Needs as many cores as workers (a 2-core machine measures nothing here).

    python benchmarks/bench_scaling.py [--workers 1 2 4 8 16]
"""
from __future__ import annotations

import argparse
import os

from bench_distributed import step_worker
from common import write_result
from dhdnn.distributed.launch import run_local

RING = {"name": "ring256_w64", "generator": {"kind": "ring", "agents": 256}, "defaults": {"dim": 64}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    print(f"[scaling] ring of 256 agents, 64 + 64 dims, batch 256, H2, 8 layers, 1 thread per worker, {cores} cores")
    rows = []
    for w in args.workers:
        if w > cores:
            print(f"  {w} workers: skipped ({cores} cores)")
            continue
        res = run_local(step_worker, w, (RING, 8, 256, 1, args.steps, "auto", 1), timeout_s=600)
        row = {"workers": w, "step_s": max(r["step_s"] for r in res), "comm_s": max(r["comm_s"] for r in res),
               "kernel": res[0]["kernel"]}
        row["speedup"] = rows[0]["step_s"] / row["step_s"] if rows else 1.0
        rows.append(row)
        print(f"  {w:2d} workers: {row['step_s']:.3f} s per step ({row['comm_s']:.3f} s posting and waiting on "
              f"exchanges), {row['speedup']:.2f}x, kernel {row['kernel']}", flush=True)
    print(f"wrote {write_result('scaling', {'cores': cores, 'rows': rows})}")


if __name__ == "__main__":
    main()
