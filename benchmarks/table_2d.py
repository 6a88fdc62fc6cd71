"""Test accuracy of H1-J1, H1-J2, H2, MS1, MS2, MS3 at 4, 16 and 64 layers on the 2-D
datasets, trained with the launch/ recipe (dim 4, Adam, 8000 points split 50/50), as the
mean ± std over seeds (training seed and data seed both = s). Writes
benchmarks/results/table_2d.json and prints the markdown tables of the README.

    python benchmarks/table_2d.py [--seeds 0 1 2 3 4] [--epochs 40] [--processes 2]

The step is ``h = min(0.5, 6.4 / layers)``: final time 6.4 for deep networks, h <= 0.5 for shallow.
"""
from __future__ import annotations

import argparse
import itertools

from common import mean_std, train_many, write_result

ARCHS = [("H1-J1", "H1", "J1"), ("H1-J2", "H1", "J2"), ("H2", "H2", "J1"),
         ("MS1", "MS1", "J1"), ("MS2", "MS2", "J1"), ("MS3", "MS3", "J1")]
LAYERS = (4, 16, 64)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--processes", type=int, default=2, help="runs trained at once (one thread each)")
    ap.add_argument("--datasets", nargs="+", default=["swiss_roll", "double_circles"])
    args = ap.parse_args()
    grid = list(itertools.product(args.datasets, ARCHS, LAYERS, args.seeds))
    jobs = [("launch/swiss_roll_H2_64.yaml",
             [f"data.name={ds}", f"model.arch={arch}", f"model.J={J}", f"model.layers={L}",
              f"model.h={min(0.5, 6.4 / L)}", f"train.epochs={args.epochs}", f"train.seed={s}", f"data.seed={s}"])
            for ds, (_, arch, J), L, s in grid]
    summaries = train_many(jobs, args.processes)
    rows = [{"dataset": ds, "arch": label, "layers": L, "seed": s, "test_acc": r["test_acc"],
             "train_acc": r["train_acc"], "seconds": r["seconds"]}
            for (ds, (label, _, _), L, s), r in zip(grid, summaries)]
    write_result("table_2d", {"epochs": args.epochs, "seeds": args.seeds, "rows": rows})
    for ds in args.datasets:
        print(f"\n{ds}: test accuracy, mean ± std over seeds {args.seeds}\n\n| arch | "
              + " | ".join(f"{L} layers" for L in LAYERS) + " |")
        print("|---|" + "---|" * len(LAYERS))
        for label, *_ in ARCHS:
            cells = [mean_std([r["test_acc"] for r in rows if (r["dataset"], r["arch"], r["layers"]) == (ds, label, L)])
                     for L in LAYERS]
            print(f"| {label} | " + " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in cells) + " |")


if __name__ == "__main__":
    main()
