"""Scale: setup, checkpoints, step time and memory from 1,024 to 65,536 agents, and a
million-agent partition.

Grids of 32x32 ... 256x256 agents with 8 + 8 state dims (65,536 agents: 1,048,576 state
entries), H2, 4 layers, batch 128, 512 samples (2 training steps per epoch), trained for 2
epochs on 1 and 2 local workers by the ``dhdnn train`` command, then resumed twice, one epoch
each. Per run, from the runs' own ``summary.json``: time from starting the command to the first
training step, checkpoint save time (the best of its 4+ saves: a save is fsync'ed, and the
disk's write-back adds noise of up to 2x) and size, load time (the best of the 2 resumes), step
time (epoch 2), every rank's peak resident memory against the estimate for that rank (parameters,
gradients, Adam state, one batch's activations, data, the process itself). Growth factors per
4x agents follow. Then METIS on a 1000x1000 grid for 64 workers: seconds and peak memory.

    python benchmarks/bench_scale.py [--rows 32 64 128 256] [--workers 1 2]
    python benchmarks/bench_scale.py --against-landed [--rows 256] [--workers 2]   # step time and memory
        side by side with the landed commit (--landed, default 1824fcf; a git worktree), 2 epochs each, interleaved
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, landed_worktree, train_cli, write_result





def train(out: Path, rows: int, workers: int, epochs: int, resume: bool = False, env: dict | None = None,
          cwd: Path = ROOT) -> dict:
    return train_cli(out, workers, ["run.engine=sharded",
                                    f"topology={{generator: {{kind: grid, rows: {rows}, cols: {rows}}}, defaults: {{dim: 8}}}}",
                                    "model.layers=4", "model.h=0.1", "model.init_std=0.3", "train.batch_size=128",
                                    "data.n_samples=512", f"train.epochs={epochs}"], resume=resume, timeout=3600,
                     env=env, cwd=cwd)


def against_landed(rows_list, workers_list, rounds: int = 2, commit: str = "1824fcf") -> list[dict]:
    """This code and the landed commit on the same grids, interleaved: the step time (epoch 2)
    and each run's peak memory per rank against this code's estimate."""
    out = []
    with tempfile.TemporaryDirectory() as tmp, landed_worktree(True, commit) as wt:
        for rows in rows_list:
            for w in workers_list:
                best = {}
                for k in range(rounds):
                    for name, env, cwd in (("landed", {"PYTHONPATH": str(wt)}, wt), ("this code", None, ROOT)):
                        s = train(Path(tmp) / f"{name}-{rows}-{w}-{k}".replace(" ", "_"), rows, w, 2, env=env,
                                  cwd=cwd)
                        step = s["metrics"][1]["seconds"] / (s["steps"] / s["epochs"])
                        if name not in best or step < best[name]["step_s"]:
                            best[name] = {"step_s": step, "peak_rss_per_rank": s["memory"]["peak_rss_per_rank"],
                                          "estimate_per_rank": s.get("memory_estimate_per_rank")}
                ratio = best["landed"]["step_s"] / best["this code"]["step_s"]
                est = best["this code"]["estimate_per_rank"]
                peak = max(best["this code"]["peak_rss_per_rank"]) / est
                out.append({"agents": rows * rows, "workers": w, **{k: v for k, v in best.items()}, "speedup": ratio,
                            "peak_over_estimate": peak})
                print(f"{rows * rows:>7} agents, {w} worker(s): landed {best['landed']['step_s']:.2f} s per step, "
                      f"this code {best['this code']['step_s']:.2f} s ({ratio:.2f}x); peak/estimate {peak:.2f}",
                      flush=True)
    return out


def one(rows: int, workers: int, tmp: Path) -> dict:
    out = tmp / f"grid{rows}-w{workers}"
    s = train(out, rows, workers, 2)
    metrics = s["metrics"]
    t = s["timing"]
    resumed = [train(out, rows, workers, 3 + k, resume=True) for k in range(2)]
    saves = t["checkpoint_save_seconds"] + [x for r in resumed for x in r["timing"]["checkpoint_save_seconds"]]
    return {"agents": rows * rows, "workers": workers,
            "to_first_step_s": t["first_step_start_unix"] - s["command_start_unix"],
            "first_step_done_s": t["first_step_unix"] - s["command_start_unix"],
            "checkpoint_save_s": min(saves), "checkpoint_save_all_s": saves, "checkpoint_bytes": t["checkpoint_bytes"],
            "checkpoint_load_s": min(r["timing"]["checkpoint_load_seconds"] for r in resumed),
            "checkpoint_load_all_s": [r["timing"]["checkpoint_load_seconds"] for r in resumed],
            "step_s": metrics[1]["seconds"] / (s["steps"] / s["epochs"]),
            "peak_rss_per_rank": s["memory"]["peak_rss_per_rank"],
            "estimate_per_rank": s["memory_estimate_per_rank"],
            "peak_over_estimate": max(s["memory"]["peak_rss_per_rank"]) / s["memory_estimate_per_rank"]}


def partition_million() -> dict:
    code = ("import time, resource, json\n"
            "t0 = time.time()\n"
            "from dhdnn.topology import topology_from_dict\nfrom dhdnn.partitioner import partition\n"
            "t = topology_from_dict({'generator': {'kind': 'grid', 'rows': 1000, 'cols': 1000}, 'defaults': {'dim': 8}})\n"
            "t1 = time.time()\np = partition(t, 64)\nt2 = time.time()\n"
            "print(json.dumps({'topology_s': t1 - t0, 'partition_s': t2 - t1, 'method': p.method,"
            " 'imbalance': p.imbalance(t), 'halo_volume': p.objective(t)[0],"
            " 'peak_rss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    if p.returncode:
        raise RuntimeError(p.stderr[-2000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="*", default=[32, 64, 128, 256])
    ap.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--against-landed", action="store_true")
    ap.add_argument("--landed", default="1824fcf", help="the commit --against-landed compares with")
    args = ap.parse_args()
    if args.against_landed:
        res = against_landed(args.rows, args.workers, commit=args.landed)
        print(f"wrote {write_result('scale_vs_landed', {'runs': res})}")
        return
    rows_out = []
    print(f"{'agents':>7} {'workers':>7} {'to 1st step s':>13} {'save s':>7} {'load s':>7} {'ckpt MB':>8} "
          f"{'step s':>7} {'peak MiB/rank':>14} {'estimate MiB':>13} {'peak/est':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for w in args.workers:
            for rows in args.rows:
                r = one(rows, w, Path(tmp))
                rows_out.append(r)
                print(f"{r['agents']:>7} {w:>7} {r['to_first_step_s']:>13.2f} {r['checkpoint_save_s']:>7.2f} "
                      f"{r['checkpoint_load_s']:>7.2f} {r['checkpoint_bytes'] / 1e6:>8.1f} {r['step_s']:>7.2f} "
                      f"{max(r['peak_rss_per_rank']) / 2**20:>14.0f} {r['estimate_per_rank'] / 2**20:>13.0f} "
                      f"{r['peak_over_estimate']:>9.2f}", flush=True)
    print("\ngrowth per 4x agents (target <= 4.5x)")
    for w in args.workers:
        sel = [r for r in rows_out if r["workers"] == w]
        for key in ("to_first_step_s", "checkpoint_save_s", "checkpoint_load_s", "step_s"):
            g = [b[key] / a[key] for a, b in zip(sel, sel[1:])]
            print(f"  {w} worker(s) {key:>18}: " + "  ".join(f"{x:.2f}x" for x in g))
    million = partition_million()
    print(f"\n1,000,000-agent grid, 64 workers: topology {million['topology_s']:.1f} s, partition "
          f"{million['partition_s']:.1f} s ({million['method']}, max/mean load {million['imbalance']:.3f}), "
          f"peak memory {million['peak_rss'] / 2**30:.2f} GiB (targets <= 60 s, <= 4 GB)")
    print(f"wrote {write_result('scale', {'runs': rows_out, 'million_agent_partition': million})}")


if __name__ == "__main__":
    main()
