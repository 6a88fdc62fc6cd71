"""The paper's distributed experiment: H2 on the 8-agent ring vs its fully connected counterpart,
on swiss roll and double circles, same recipe and same seeds on both sides (training seed and
data seed both = s), mean ± std of the test accuracy.

    python benchmarks/paper_distributed.py [--seeds 0 1 2 3 4] [--workers 1]

``--workers 1`` (default) trains the dense engine in one process; the network, its
initialisation and its training are the same for any worker count (tests/test_runs.py checks
1/2/3 workers against one process), so ``--workers 4`` reproduces these numbers on 4 local gloo
workers, only slower on this machine.
"""
from __future__ import annotations

import argparse
import itertools

from common import mean_std, train_many, write_result

TOPOLOGIES = ("ring8", "ring8_complete")
DATASETS = ("swiss_roll", "double_circles")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--processes", type=int, default=2, help="runs trained at once (use 1 with --workers > 1)")
    args = ap.parse_args()
    grid = list(itertools.product(DATASETS, TOPOLOGIES, args.seeds))
    jobs = [(f"launch/{topo}_{ds}.yaml", [f"run.workers={args.workers}", f"train.seed={s}", f"data.seed={s}"])
            for ds, topo, s in grid]
    summaries = train_many(jobs, 1 if args.workers > 1 else args.processes)
    rows = [{"topology": topo, "dataset": ds, "seed": s, "workers": args.workers, "test_acc": r["test_acc"],
             "train_acc": r["train_acc"], "seconds": r["seconds"]} for (ds, topo, s), r in zip(grid, summaries)]
    for r in rows:
        print(f"{r['topology']:15} {r['dataset']:15} seed {r['seed']}  test {r['test_acc']:.4f}  "
              f"train {r['train_acc']:.4f}  ({r['seconds']:.0f}s)")
    table = {}
    print(f"\ntest accuracy, mean ± std over seeds {args.seeds}\n\n| dataset | " + " | ".join(TOPOLOGIES) + " |")
    print("|---|" + "---|" * len(TOPOLOGIES))
    for ds in DATASETS:
        cells = [mean_std([r["test_acc"] for r in rows if (r["dataset"], r["topology"]) == (ds, t)])
                 for t in TOPOLOGIES]
        table[ds] = dict(zip(TOPOLOGIES, cells))
        print(f"| {ds} | " + " | ".join(f"{m:.4f} ± {s:.4f}" for m, s in cells) + " |")
    print(f"wrote {write_result('paper_distributed', {'seeds': args.seeds, 'rows': rows, 'mean_std': table})}")


if __name__ == "__main__":
    main()
