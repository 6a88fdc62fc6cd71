"""Regression on the paper's ring: 8 agents of 1 + 1 state entries learn a damped pendulum's vector
field (``examples/vector_field.yaml``: 2 inputs, 2 real outputs, mean squared error), dense in one
process and on 2 workers (the ring's agents split in two), the same seeds on both sides: the test
MSE, mean ± std over seeds (the seed draws the samples and the initialisation).

    python benchmarks/bench_regression.py [--seeds 0 1 2 3 4]
"""
from __future__ import annotations

import argparse

from common import mean_std, train_many, write_result

CONFIG = "examples/vector_field.yaml"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = ap.parse_args()
    seeds = lambda s, w: [f"train.seed={s}", f"data.options.seed={s}", f"run.workers={w}"]  # noqa: E731
    dense = train_many([(CONFIG, seeds(s, 1)) for s in args.seeds], 2)
    two = train_many([(CONFIG, seeds(s, 2)) for s in args.seeds], 1)
    rows = [{"workers": w, "seed": s, "test_mse": r["test_mse"], "seconds": r["seconds"]}
            for w, runs in ((1, dense), (2, two)) for s, r in zip(args.seeds, runs)]
    table = {}
    print(f"test MSE of the pendulum's vector field on the 8-agent ring, mean ± std over seeds {args.seeds}\n")
    print("| workers | test MSE | seconds per run |\n|---|---|---|")
    for w in (1, 2):
        sel = [r for r in rows if r["workers"] == w]
        m, sd = mean_std([r["test_mse"] for r in sel])
        table[w] = (m, sd)
        print(f"| {w} | {m:.3g} ± {sd:.2g} | {sum(r['seconds'] for r in sel) / len(sel):.1f} |")
    print(f"wrote {write_result('regression', {'config': CONFIG, 'seeds': args.seeds, 'rows': rows, 'mean_std': table})}")


if __name__ == "__main__":
    main()
