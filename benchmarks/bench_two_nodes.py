"""The mesh placed by the link: two nodes (network namespaces, ``launch/two_nodes.py``) of 2
workers each, the link shaped to 100 Mbit/s and to 1 Gbit/s (``tc tbf``).

A halo-heavy network (the 8-agent ring with 8 + 8 entries per agent, H2, 8 layers, batch 512,
float32): per step its halo exchanges move ~30x the bytes of its gradient sum. As 2 agent
partitions x 2 replicas it runs node-aware (``run.placement: packed``: the agent groups inside a
node, the gradient sums across the link) or node-unaware (``spread``: the halo across the link).
Per rate: ``run.replicas: auto``'s predictions for every layout (and its choice), and the measured
milliseconds per training step of both placements (the training seconds of epochs 2-3, over
their steps; the median of ``--repeat`` runs, interleaved).

    sudo python benchmarks/bench_two_nodes.py [--rates 100mbit 1gbit] [--repeat 2]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import tempfile
from pathlib import Path

from common import ROOT, write_result

_spec = importlib.util.spec_from_file_location("two_nodes", ROOT / "launch" / "two_nodes.py")
two_nodes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(two_nodes)

CONFIG = ROOT / "launch" / "ring8_swiss_roll.yaml"
SETS = ["topology={generator: {kind: ring, agents: 8}, defaults: {dim: 8}}", "model.layers=8",
        "train.batch_size=512", "train.epochs=3", "run.timeout_s=300"]


def run(nodes, out: Path, extra: list[str]) -> dict:
    args = ["--out", out, "--no-progress", *(a for s in SETS + extra for a in ("--set", s))]
    res = nodes.train(CONFIG, 2, args, timeout=1800)
    if any(r.returncode for r in res):
        raise RuntimeError(res[0].stderr[-3000:] + res[1].stderr[-3000:])
    summary = json.loads((out / "summary.json").read_text())
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = (metrics[-1]["step"] - metrics[0]["step"])
    return {"ms_per_step": 1e3 * sum(m["seconds"] for m in metrics[1:]) / steps, "layout": summary["layout"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", nargs="+", default=["100mbit", "1gbit"])
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    why = two_nodes.unavailable()
    if why:
        raise SystemExit(f"bench_two_nodes: {why}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rate in args.rates:
            with two_nodes.TwoNodes(rate) as nodes:
                auto = run(nodes, Path(tmp) / f"{rate}-auto", ["run.replicas=auto"])["layout"]
                measured = {"packed": [], "spread": []}
                for i in range(args.repeat):
                    for placement in (("packed", "spread") if i % 2 == 0 else ("spread", "packed")):
                        r = run(nodes, Path(tmp) / f"{rate}-{placement}-{i}", ["run.replicas=2",
                                                                               f"run.placement={placement}"])
                        measured[placement].append(r["ms_per_step"])
            row = {"rate": rate, "auto_choice": f"{auto['agents']}x{auto['replicas']} {auto['placement']}",
                   "predicted_ms": {k: 1e3 * v for k, v in auto["candidates"].items()},
                   "measured_ms": {k: statistics.median(v) for k, v in measured.items()}, "runs_ms": measured}
            rows.append(row)
            print(f"{rate}: auto chose {row['auto_choice']}; 2x2 predicted packed "
                  f"{row['predicted_ms']['2x2 packed']:.1f} ms, spread {row['predicted_ms']['2x2 spread']:.1f} ms; "
                  f"measured packed {row['measured_ms']['packed']:.1f} ms, spread {row['measured_ms']['spread']:.1f} "
                  f"ms per step (runs {measured})", flush=True)
    print(f"wrote {write_result('two_nodes', {'config': str(CONFIG.relative_to(ROOT)), 'sets': SETS, 'rows': rows})}")


if __name__ == "__main__":
    main()
