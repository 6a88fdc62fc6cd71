"""The mesh placed by the link: two nodes (network namespaces, ``launch/two_nodes.py``) of 2
workers each, the link shaped to 100 Mbit/s and to 1 Gbit/s (``tc tbf``).

A halo-heavy network (the 8-agent ring with 8 + 8 entries per agent, H2, 8 layers, batch 512,
float32): per step its halo exchanges move ~30x the bytes of its gradient sum. As 2 agent
partitions x 2 replicas it runs node-aware (``run.placement: packed``: the agent groups inside a
node, the gradient sums across the link) or node-unaware (``spread``: the halo across the link).
First the bytes on the wire against the traced bytes between the nodes (:func:`wire`). Then, per
rate: ``run.replicas: auto``'s predictions for every layout (and its choice), and the measured
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


def wire() -> list[dict]:
    """Bytes on the wire: the mixed-dims graph (tests/_runs.py), float64, batch 40, traced, for 1
    and for 3 epochs; the veth's bytes over the 2 extra epochs against the traced bytes between
    the nodes (halo and readout messages; gradient sums whose replica group spans the nodes)."""
    import sys

    sys.path.insert(0, str(ROOT))
    from dhdnn.testing import read_trace
    from tests._runs import write_mixed_run

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = write_mixed_run(Path(tmp), 40)
        for nproc, replicas in ((1, 1), (2, 2)):
            got = {}
            with two_nodes.TwoNodes() as nodes:
                for epochs in (1, 3):
                    out = Path(tmp) / f"w{nproc}{epochs}"
                    before = nodes.link_bytes()
                    res = nodes.train(cfg, nproc, ["--out", out, "--no-progress", "--set", "run.trace=true", "--set",
                                                   f"run.replicas={replicas}", "--set", f"train.epochs={epochs}"])
                    assert all(r.returncode == 0 for r in res), res[0].stderr[-2000:]
                    got[epochs] = (nodes.link_bytes() - before, *two_nodes.cross_node(read_trace(out), nproc))
            row = {"workers_per_node": nproc, "replicas": replicas, "wire_bytes": got[3][0] - got[1][0],
                   "traced_bytes": got[3][1] - got[1][1], "messages": got[3][2] - got[1][2]}
            row["ratio"] = row["wire_bytes"] / row["traced_bytes"]
            rows.append(row)
            print(f"{nproc} worker(s) per node, {replicas} replica(s): {row['traced_bytes']} traced bytes between the "
                  f"nodes over 2 epochs ({row['messages']} messages), {row['wire_bytes']} on the wire: "
                  f"{row['ratio']:.2f}x", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", nargs="+", default=["100mbit", "1gbit"])
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    why = two_nodes.unavailable()
    if why:
        raise SystemExit(f"bench_two_nodes: {why}")
    bytes_rows = wire()
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
    result = {"config": str(CONFIG.relative_to(ROOT)), "sets": SETS, "rows": rows, "wire": bytes_rows}
    print(f"wrote {write_result('two_nodes', result)}")


if __name__ == "__main__":
    main()
