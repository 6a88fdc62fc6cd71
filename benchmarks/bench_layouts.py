"""Agent partitions x replicas on the paper's ring: which layout of 2 workers trains fastest.

The paper's 8-agent ring (``launch/ring8_swiss_roll.yaml``: H2, 4 layers, batch 125, 8000
samples) trained for a few epochs as one process (dense engine), as 2 workers with 2 agent
partitions (2x1), as 2 workers with 2 replicas (1x2), and with ``run.replicas: auto``, whose
cost model's prediction for every layout is printed beside the measured time. Seconds per
epoch = the training loop's wall time (steps, evaluation of both splits, checkpoints) over
epochs, from ``summary.json``; the median of ``--repeat`` runs, interleaved.

    python benchmarks/bench_layouts.py [--epochs 5] [--repeat 3]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from common import train_cli, write_result

LAYOUTS = {"one process": (1, 1), "2 workers: 2 partitions x 1 replica": (2, 1),
           "2 workers: 1 partition x 2 replicas": (2, 2)}


def run(workers: int, replicas, epochs: int, out: Path) -> dict:
    sets = [f"run.replicas={replicas}", f"train.epochs={epochs}"] + (["run.engine=dense"] if workers == 1 else [])
    s = train_cli(out, workers, sets)
    return {"epoch_s": s["wall_seconds"] / s["epochs"], "train_s": statistics.median(x["seconds"] for x in s["metrics"]),
            "steps": s["steps"] / s["epochs"], "layout": s.get("layout"), "stderr": s["stderr"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    times: dict[str, list] = {name: [] for name in [*LAYOUTS, "2 workers: auto"]}
    auto = None
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeat):  # interleaved, so drifts of the machine hit every layout alike
            for name, (w, r) in LAYOUTS.items():
                times[name].append(run(w, r, args.epochs, Path(tmp) / f"{rep}-{w}-{r}"))
            times["2 workers: auto"].append(run(2, "auto", args.epochs, Path(tmp) / f"{rep}-auto"))
            auto = times["2 workers: auto"][-1]["layout"]
    print(f"\nthe paper's ring, {args.epochs} epochs, median of {args.repeat} interleaved runs")
    print(f"{'layout':40} {'s/epoch':>8} {'train s':>8} {'ms/step':>8} {'predicted ms/step':>18}")
    rows = []
    for name, rs in times.items():
        epoch = statistics.median(r["epoch_s"] for r in rs)
        train = statistics.median(r["train_s"] for r in rs)
        per_step = 1e3 * train / rs[0]["steps"]
        key = {(2, 1): "2x1", (2, 2): "1x2"}.get(LAYOUTS.get(name))
        pred = 1e3 * auto["candidates"][key] if key and auto else None
        rows.append({"layout": name, "epoch_s": epoch, "train_s": train, "ms_per_step": per_step,
                     "predicted_ms_per_step": pred})
        print(f"{name:40} {epoch:>8.3f} {train:>8.3f} {per_step:>8.2f} {f'{pred:.2f}' if pred is not None else '':>18}")
    chosen = f"{auto['agents']}x{auto['replicas']}"
    measured = {"2x1": rows[1]["epoch_s"], "1x2": rows[2]["epoch_s"]}
    fastest = min(measured, key=measured.get)
    print(f"auto chose {chosen} (partitions x replicas); measured fastest of the two: {fastest}")
    print(f"speed of 2 workers' best layout relative to one process: {rows[0]['epoch_s'] / min(measured.values()):.2f}x "
          "(target > 1)")
    print(f"wrote {write_result('layouts', {'epochs': args.epochs, 'repeat': args.repeat, 'rows': rows, 'auto': auto, 'auto_choice': chosen, 'measured_fastest': fastest})}")


if __name__ == "__main__":
    main()
