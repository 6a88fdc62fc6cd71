"""This code against a landed commit (default 1824fcf, before the one integrator), side by side in
one run: every case alternates the two checkouts (who goes first alternates too) and repeats;
each run is a fresh process of its checkout (a git worktree, run from its own directory).

  main         ``dhdnn train launch/ring8_swiss_roll.yaml`` in one process: training seconds (the
               120 epochs' steps, from metrics.jsonl)
  conv2        ``launch/fashion_conv_H2.yaml``, one epoch on 2 workers (the conv network as
               replicas): training seconds (needs the Fashion-MNIST IDX files)
  grid8        ``bench_kernels.py``'s grid8 case (4,096 agents, 8x8 blocks, one rank, local kernel
               auto): median seconds per training step
  exact_dense  ``bench_reversible.py``'s dense exact-reversible point (H2, dim 64, batch 1024,
               256 layers): best of three training steps
  exact_2w     its 2-worker point (the 8-agent ring of 4 + 4 dims), the slower rank
  body         ``bench_body.py``: the main job's H-DNN body alone, forward + backward (median seconds)

Reports per case the median seconds of each side over the repeats, the ratio landed / this
(above 1: this code is faster) and every repeat's ratio (the spread).

    python benchmarks/bench_vs_landed.py [--cases ...] [--repeat 3] [--commit 1824fcf] [--name vs_landed]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, landed_worktree, train_cli, write_result

HERE = Path(__file__).resolve().parent
FASHION = "/usr/share/datasets/fashion-mnist"


def _child(script: str, args: list[str], root: Path, env: dict) -> dict:
    p = subprocess.run([sys.executable, str(HERE / script), *args], capture_output=True, text=True, cwd=root,
                       env={**os.environ, **env}, timeout=3600)
    if p.returncode:
        raise RuntimeError(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_case(case: str, root: Path, env: dict) -> float:
    """Seconds of ``case`` in the checkout at ``root`` (``env``: its PYTHONPATH)."""
    with tempfile.TemporaryDirectory() as tmp:
        if case in ("main", "conv2"):
            config = "launch/ring8_swiss_roll.yaml" if case == "main" else "launch/fashion_conv_H2.yaml"
            sets = () if case == "main" else ("train.epochs=1", f"data.path={FASHION}")
            s = train_cli(Path(tmp) / "run", 1 if case == "main" else 2, sets, config=str(root / config), env=env,
                          cwd=root, timeout=3600)
            return sum(m["seconds"] for m in s["metrics"])
    if case == "grid8":
        return _child("bench_kernels.py", ["--child", "auto", "--case", "grid8", "--steps", "3"], root,
                      {**env, "OMP_NUM_THREADS": "1"})["seconds"]
    if case == "body":
        return _child("bench_body.py", [], root, env)["seconds"]
    engine = "dense" if case == "exact_dense" else "sharded"
    return _child("bench_reversible.py", ["--child", engine, "256", "exact", "time"], root, env)["step_s"]


CASES = ("main", "conv2", "grid8", "exact_dense", "exact_2w", "body")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--commit", default="1824fcf")
    ap.add_argument("--name", default="vs_landed", help="results file: benchmarks/results/NAME.json")
    args = ap.parse_args()
    if "conv2" in args.cases and not Path(FASHION).is_dir():
        print(f"conv2: no Fashion-MNIST files in {FASHION} (apt-get install dataset-fashion-mnist); skipped")
        args.cases = [c for c in args.cases if c != "conv2"]
    rows = []
    with landed_worktree(commit=args.commit) as wt:
        sides = {"landed": (wt, {"PYTHONPATH": str(wt)}), "this": (ROOT, {})}
        for case in args.cases:
            times = {"landed": [], "this": []}
            for i in range(args.repeat):
                for side in (("landed", "this") if i % 2 == 0 else ("this", "landed")):
                    times[side].append(run_case(case, *sides[side]))
            ratios = [a / b for a, b in zip(times["landed"], times["this"])]
            row = {"case": case, "landed_s": statistics.median(times["landed"]),
                   "this_s": statistics.median(times["this"]), "times": times, "ratios": ratios}
            row["ratio"] = row["landed_s"] / row["this_s"]
            rows.append(row)
            print(f"{case:12} landed {row['landed_s']:.4g} s  this {row['this_s']:.4g} s  landed/this "
                  f"{row['ratio']:.2f}x  (per repeat: {', '.join(f'{r:.2f}' for r in ratios)})", flush=True)
    print(f"wrote {write_result(args.name, {'commit': args.commit, 'repeat': args.repeat, 'rows': rows})}")


if __name__ == "__main__":
    main()
