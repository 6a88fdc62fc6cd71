"""Fashion-MNIST at its real size (28x28, 60,000 + 10,000 images): the image network's speed
against the landed commit, and accuracy beside the dataset's published numbers.

  speed     one epoch of ``launch/fashion_conv_H2.yaml``'s network (the paper's image network of
            ``launch/mnist_conv_H2.yaml``: 3x3 convolution to 8 channels, H2 on every pixel, 8
            layers, batch 100) as ``dhdnn train`` runs it, side by side in one run: the landed
            commit 616986c (a git worktree, its own ``launch/mnist_conv_H2.yaml``), this code in one
            process, and on 2 workers (data-parallel replicas). Per run: seconds of training (the
            epoch's 600 steps), the epoch's wall time (steps, evaluation of both splits,
            checkpoint), the peak RSS of any process of the run, and the test accuracy.
  accuracy  test accuracy after the recipe's epochs, mean ± std over seeds (training seed; the
            split is the dataset's own): the conv network with H2, H1-J1, MS1 and ResNet bodies on
            2 workers; the 7x7 patch grid (``launch/fashion_patches_H2.yaml``, agents on 2
            workers); scikit-learn's logistic regression on the raw pixels (deterministic: one run).

The IDX files come from Debian's ``dataset-fashion-mnist`` package; without them the benchmark
says so and stops.

    python benchmarks/bench_fashion.py [speed accuracy] [--data DIR] [--seeds 0 1 2 3 4]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, landed_worktree, mean_std, write_result

DATA = "/usr/share/datasets/fashion-mnist"
ARCHS = {"H2": [], "H1-J1": ["model.arch=H1", "model.J=J1"], "MS1": ["model.arch=MS1"],
         "ResNet": ["model.arch=ResNet", "model.init_std=null"]}
PUBLISHED = [  # the dataset's README ("Benchmark": submitted results, test accuracy)
    ("2 Conv+pooling (Kashif Rasul)", 0.876), ("2 Conv+pooling (TensorFlow's tutorial)", 0.916),
    ("MLP 256-128-100", 0.8833), ("GRU+SVM", 0.888), ("Human performance", 0.835)]


def run(cmd: list[str], env: dict | None = None, cwd: Path = ROOT) -> int:
    """Run a command; returns the peak RSS (bytes) of any process of its tree (``wait4``'s rusage
    covers the descendants the command waited for: local workers, the forkserver). ``python -m``
    puts the working directory first on sys.path: another checkout runs from its own."""
    with tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True, cwd=cwd,
                             env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode:
            err.seek(0)
            raise RuntimeError(f"{' '.join(cmd)}\n{err.read()[-3000:]}")
    return usage.ru_maxrss * 1024


def train(config: str, out: Path, workers: int, sets=(), pythonpath: str | None = None, root: Path = ROOT) -> dict:
    cmd = [sys.executable, "-m", "dhdnn", "train", str(root / config), "--no-progress", "--out", str(out),
           "--workers", str(workers), *(a for s in sets for a in ("--set", s))]
    env = {"PYTHONPATH": pythonpath} if pythonpath else None
    t = time.time()
    peak = run(cmd, env, root)
    summary = json.loads((out / "summary.json").read_text())
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {"test_acc": summary["test_acc"], "train_seconds": sum(m["seconds"] for m in metrics),
            "epoch_wall_seconds": summary["wall_seconds"], "command_seconds": time.time() - t,
            "peak_rss_bytes": max(peak, *summary["memory"]["peak_rss_per_rank"]),
            "peak_rss_per_rank": summary["memory"]["peak_rss_per_rank"], "epochs": summary["epochs"],
            "curve": [m["test_acc"] for m in metrics]}


def speed(data: str) -> dict:
    """One epoch: the landed commit, this code in one process, on 2 workers."""
    rows = {}
    with tempfile.TemporaryDirectory() as tmp, landed_worktree() as wt:
        one = [f"data.path={data}", "train.epochs=1"]
        rows["landed 616986c, 1 process"] = train("launch/mnist_conv_H2.yaml", Path(tmp) / "a", 1, one,
                                                  pythonpath=str(wt), root=wt)
        rows["this code, 1 process"] = train("launch/mnist_conv_H2.yaml", Path(tmp) / "b", 1, one)
        rows["this code, 2 workers"] = train("launch/mnist_conv_H2.yaml", Path(tmp) / "c", 2, one)
    base = rows["landed 616986c, 1 process"]
    print("\n[speed] one epoch of 60,000 Fashion-MNIST images, the image network (launch/mnist_conv_H2.yaml's "
          "recipe), this machine, side by side\n")
    print("| run | training s | epoch wall s | vs landed (training / wall) | peak RSS per process | test acc |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        r["speedup_train"] = base["train_seconds"] / r["train_seconds"]
        r["speedup_wall"] = base["epoch_wall_seconds"] / r["epoch_wall_seconds"]
        print(f"| {name} | {r['train_seconds']:.1f} | {r['epoch_wall_seconds']:.1f} | {r['speedup_train']:.2f}x / "
              f"{r['speedup_wall']:.2f}x | {r['peak_rss_bytes'] / 2**30:.2f} GiB | {r['test_acc']:.4f} |")
    two, one_p = rows["this code, 2 workers"], rows["this code, 1 process"]
    print(f"\n2 workers vs 1 process: {one_p['train_seconds'] / two['train_seconds']:.2f}x (training), "
          f"{one_p['epoch_wall_seconds'] / two['epoch_wall_seconds']:.2f}x (epoch wall)")
    return rows


def logistic_regression(data: str) -> float:
    from sklearn.linear_model import LogisticRegression

    from dhdnn.data import load_dataset

    d = load_dataset("fashion_mnist", path=data)
    clf = LogisticRegression(max_iter=300, C=0.1)  # lbfgs, multinomial; C by a look at 0.01 / 0.1 / 1
    clf.fit(d.x_train.numpy(), d.y_train.numpy())
    return float(clf.score(d.x_test.numpy(), d.y_test.numpy()))


def accuracy(data: str, seeds: list[int]) -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, sets in ARCHS.items():
            for s in seeds:
                r = train("launch/fashion_conv_H2.yaml", Path(tmp) / f"conv-{name}-{s}", 2,
                          [f"data.path={data}", f"train.seed={s}", *sets])
                rows.append({"network": f"conv {name}", "workers": 2, "seed": s, **r})
                print(f"conv {name} seed {s}: {r['test_acc']:.4f} ({r['train_seconds']:.0f} s)", flush=True)
        for s in seeds:
            r = train("launch/fashion_patches_H2.yaml", Path(tmp) / f"patches-{s}", 2, [f"data.path={data}",
                                                                                        f"train.seed={s}"])
            rows.append({"network": "7x7 patch grid H2", "workers": 2, "seed": s, **r})
            print(f"patch grid seed {s}: {r['test_acc']:.4f} ({r['train_seconds']:.0f} s)", flush=True)
    t = time.time()
    lr = logistic_regression(data)
    rows.append({"network": "logistic regression (scikit-learn)", "workers": 1, "seed": None, "test_acc": lr,
                 "train_seconds": time.time() - t})
    print(f"\n[accuracy] Fashion-MNIST test accuracy, mean ± std over seeds {seeds}\n")
    print("| network | workers | test accuracy | seconds per run (training) |\n|---|---|---|---|")
    table = {}
    for name in [*(f"conv {a}" for a in ARCHS), "7x7 patch grid H2", "logistic regression (scikit-learn)"]:
        sel = [r for r in rows if r["network"] == name]
        m, sd = mean_std([r["test_acc"] for r in sel])
        table[name] = (m, sd)
        print(f"| {name} | {sel[0]['workers']} | {m:.4f} ± {sd:.4f} | {sum(r['train_seconds'] for r in sel) / len(sel):.0f} |")
    print("\npublished (the dataset's README):")
    for name, acc in PUBLISHED:
        print(f"| {name} | | {acc:.3f} | |")
    return {"rows": rows, "mean_std": table, "published": PUBLISHED}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", nargs="*", default=["speed", "accuracy"], choices=["speed", "accuracy"])
    ap.add_argument("--data", default=DATA, help="directory of the four Fashion-MNIST IDX files")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])  # the standard: 5 seeds per claim
    args = ap.parse_args()
    if not all((Path(args.data) / f"{s}-ubyte.gz").exists() or (Path(args.data) / f"{s}-ubyte").exists()
               for s in ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")):
        print(f"skipped: no Fashion-MNIST IDX files in {args.data} (apt-get install dataset-fashion-mnist, or --data DIR)")
        return
    out = {"data": args.data}
    if "speed" in args.what:
        out["speed"] = speed(args.data)
    if "accuracy" in args.what:
        out["accuracy"] = accuracy(args.data, args.seeds)
    name = "fashion" if len(args.what) == 2 else f"fashion_{args.what[0]}"
    print(f"wrote {write_result(name, out)}")


if __name__ == "__main__":
    main()
