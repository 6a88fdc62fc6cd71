"""The paper's image experiments on the 8x8 digits scikit-learn ships (stratified, seeded 80/20
split), mean ± std of the test accuracy over seeds (training seed and split seed both = s):

- the paper's MNIST network (3x3 convolution to 8 channels, an H-DNN on every pixel's vector,
  a linear layer to 10 classes) with H1-J1, H1-J2, H2 and MS1: launch/digits_conv_<ARCH>.yaml;
- patches as agents: a 4x4 grid of agents, each embedding one 2x2 patch, H2 with grid sparsity,
  trained on 4 local gloo workers (launch/digits_patches_H2.yaml) and, same seeds, in one process.

    python benchmarks/bench_images.py [--seeds 0 1 2 3 4] [--patch-workers 4]
"""
from __future__ import annotations

import argparse

from common import mean_std, train_many, write_result

ARCHS = ("H2", "H1-J1", "H1-J2", "MS1")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--patch-workers", type=int, default=4)
    ap.add_argument("--processes", type=int, default=2, help="one-process runs trained at once")
    args = ap.parse_args()
    seeds = lambda s: [f"train.seed={s}", f"data.seed={s}"]  # noqa: E731
    conv = [(a, s) for a in ARCHS for s in args.seeds]
    patches = "launch/digits_patches_H2.yaml"
    one_process = train_many([(f"launch/digits_conv_{a}.yaml", seeds(s)) for a, s in conv]
                             + [(patches, [*seeds(s), "run.workers=1"]) for s in args.seeds], args.processes)
    sharded = train_many([(patches, [*seeds(s), f"run.workers={args.patch_workers}"]) for s in args.seeds], 1)
    rows = [{"network": f"conv {a}", "seed": s, "workers": 1, "test_acc": r["test_acc"], "seconds": r["seconds"]}
            for (a, s), r in zip(conv, one_process)]
    rows += [{"network": "patches H2", "seed": s, "workers": w, "test_acc": r["test_acc"], "seconds": r["seconds"]}
             for w, runs in ((1, one_process[len(conv):]), (args.patch_workers, sharded))
             for s, r in zip(args.seeds, runs)]
    table = {}
    print(f"test accuracy on the 8x8 digits, mean ± std over seeds {args.seeds}\n\n| network | workers | test accuracy |"
          "\n|---|---|---|")
    for name, w in [*((f"conv {a}", 1) for a in ARCHS), ("patches H2", args.patch_workers), ("patches H2", 1)]:
        m, sd = mean_std([r["test_acc"] for r in rows if (r["network"], r["workers"]) == (name, w)])
        table[f"{name}, {w} worker(s)"] = (m, sd)
        print(f"| {name} | {w} | {m:.4f} ± {sd:.4f} |")
    print(f"wrote {write_result('images', {'seeds': args.seeds, 'rows': rows, 'mean_std': table})}")


if __name__ == "__main__":
    main()
