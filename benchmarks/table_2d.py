"""Test accuracy of H1-J1, H1-J2, H2, MS1, MS2, MS3 at 4, 16 and 64 layers on the 2-D
datasets, trained with the launch/ recipe (dim 4, Adam, 8000 points split 50/50).
Writes benchmarks/results/table_2d.json and prints a markdown table for the README.

    python benchmarks/table_2d.py [--epochs 40] [--datasets swiss_roll double_circles]

The step is ``h = min(0.5, 6.4 / layers)``: final time 6.4 for deep networks, h <= 0.5 for shallow.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from common import write_result
from dhdnn.config import load_config
from dhdnn.train import train_from_config

ARCHS = [("H1-J1", "H1", "J1"), ("H1-J2", "H1", "J2"), ("H2", "H2", "J1"),
         ("MS1", "MS1", "J1"), ("MS2", "MS2", "J1"), ("MS3", "MS3", "J1")]
LAYERS = (4, 16, 64)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--datasets", nargs="+", default=["swiss_roll", "double_circles"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = []
    for ds in args.datasets:
        for label, arch, J in ARCHS:
            for L in LAYERS:
                h = min(0.5, 6.4 / L)
                with tempfile.TemporaryDirectory() as tmp:
                    cfg = load_config("launch/swiss_roll_H2_64.yaml", [
                        f"data.name={ds}", f"model.arch={arch}", f"model.J={J}", f"model.layers={L}",
                        f"model.h={h}", f"train.epochs={args.epochs}", f"run.out_dir={tmp}/run",
                        "run.progress=false"])
                    t = time.perf_counter()
                    s = train_from_config(cfg)
                results.append({"dataset": ds, "arch": label, "layers": L, "h": h, "test_acc": s["test_acc"],
                                "train_acc": s["train_acc"], "seconds": time.perf_counter() - t})
                print(f"{ds:15} {label:6} L={L:3}  test {s['test_acc']:.4f}  ({time.perf_counter() - t:.0f}s)",
                      flush=True)
    write_result("table_2d", {"epochs": args.epochs, "rows": results})
    for ds in args.datasets:
        print(f"\n{ds} (test accuracy)\n\n| arch | " + " | ".join(f"{L} layers" for L in LAYERS) + " |")
        print("|---|" + "---|" * len(LAYERS))
        for label, *_ in ARCHS:
            accs = [r["test_acc"] for r in results if r["dataset"] == ds and r["arch"] == label]
            print(f"| {label} | " + " | ".join(f"{a:.3f}" for a in accs) + " |")


if __name__ == "__main__":
    main()
