"""The paper's distributed experiment: H2 on the 8-agent ring vs its fully connected counterpart,
on swiss roll and double circles, each trained with 4 local gloo workers (launch/ring8*_*.yaml).

    python benchmarks/paper_distributed.py [--workers 4]
"""
from __future__ import annotations

import argparse
import tempfile
import time

from common import write_result
from dhdnn.config import load_config
from dhdnn.train import train_from_config

RUNS = [("ring8", "swiss_roll"), ("ring8_complete", "swiss_roll"), ("ring8", "double_circles"),
        ("ring8_complete", "double_circles")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=4)
    args = ap.parse_args()
    rows = []
    for topo, ds in RUNS:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = load_config(f"launch/{topo}_{ds}.yaml", [f"run.workers={args.workers}", f"run.out_dir={tmp}/run",
                                                           "run.progress=false"])
            t = time.perf_counter()
            s = train_from_config(cfg)
        rows.append({"topology": topo, "dataset": ds, "workers": args.workers, "test_acc": s["test_acc"],
                     "train_acc": s["train_acc"], "seconds": time.perf_counter() - t})
        print(f"{topo:15} {ds:15} workers {args.workers}  test {s['test_acc']:.4f}  train {s['train_acc']:.4f}  "
              f"({time.perf_counter() - t:.0f}s)", flush=True)
    print(f"wrote {write_result('paper_distributed', {'rows': rows})}")


if __name__ == "__main__":
    main()
