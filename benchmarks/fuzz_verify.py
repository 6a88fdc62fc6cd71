"""Random run configs through ``dhdnn.testing.verify``: exactness and locality on graphs, dims,
layouts and options that no test names.

Each seed draws a topology (a generator or an explicit ring with chords; mixed agent dims; pinned
agents; explicit inputs, embeddings or readout subsets), an architecture (H2, H1-J1), a task
(classification, or regression on a written .npz), a local kernel, the readout (tree or allreduce),
autograd or reversible backprop (fixed or float, with anchors), the optimiser, a batch size and a
layout of 2-4 workers as agent partitions x replicas; then runs ``verify`` (2 steps, float64) on
it. Configs the product refuses (e.g. H1-J2 on workers, a disconnected random graph) count as
refused, with their one-line message.

    python benchmarks/fuzz_verify.py --seeds 0 200     # 267-302 s on this 2-core machine (40 seeds: ~1 min)
Writes benchmarks/results/fuzz_verify.json (one record per seed) and prints a line per seed.
This found the allreduce readout's stride bug, its 1 x R bug, the short last batch's crash and the
diagonal kernel's misplaced bands (2026-12-04), and pins that leave a later layout's worker empty
passing the up-front check (seed 312, 2026-12-08).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dhdnn.config import config_from_dict  # noqa: E402
from dhdnn.testing import verify  # noqa: E402

GENERATORS = ["ring", "line", "star", "complete", "grid", "erdos_renyi", "random_geometric", "watts_strogatz"]


def _generated(r: random.Random) -> tuple[dict, int]:
    kind = r.choice(GENERATORS)
    if kind == "grid":
        gen = {"kind": r.choice(["grid", "torus"]), "rows": r.randint(2, 4), "cols": r.randint(2, 4)}
        n = gen["rows"] * gen["cols"]
    else:
        n = r.randint(4, 12)
        gen = {"kind": kind, "agents": n}
        gen.update({"erdos_renyi": {"p": 0.5, "seed": r.randint(0, 99)},
                    "random_geometric": {"radius": 0.6, "seed": r.randint(0, 99)},
                    "watts_strogatz": {"k": 2, "p": 0.3, "seed": r.randint(0, 99)}}.get(kind, {}))
    topo = {"generator": gen, "defaults": {"dim": r.choice([1, 2, 3])}}
    if r.random() < 0.5:  # mixed dims
        topo["agents"] = [{"id": i, "dim": r.randint(1, 4)} for i in r.sample(range(n), min(n, 3))]
    return topo, n


def _explicit(r: random.Random, workers: int) -> tuple[dict, int]:
    """A ring with chords; pins, explicit inputs or embeddings, a readout subset."""
    n = r.randint(4, 10)
    ids = [f"a{i}" for i in range(n)]
    pairs = {tuple(sorted((i, (i + 1) % n))) for i in range(n)}
    pairs |= {tuple(sorted(r.sample(range(n), 2))) for _ in range(n // 2)}
    agents = [dict({"id": a, "dim": r.randint(1, 3)}, **({"worker": r.randrange(workers)} if r.random() < 0.2 else {}))
              for a in ids]
    topo = {"agents": agents, "edges": [[ids[i], ids[k]] for i, k in sorted(pairs)]}
    mode = r.choice(["inputs", "embeddings", "default"])
    if mode == "inputs":
        at = r.sample(range(n), 2)
        topo["inputs"] = [{"feature": f, "agent": ids[at[f]], "part": r.choice(["p", "q"]), "index": 0} for f in (0, 1)]
    elif mode == "embeddings":
        topo["embeddings"] = [{"agent": ids[i], "features": [0, 1]} for i in r.sample(range(n), r.randint(1, 3))]
    if r.random() < 0.5:
        topo["readout"] = [ids[i] for i in sorted(r.sample(range(n), r.randint(1, n)))]
    return topo, n


def case(seed: int, regression_file: str) -> tuple[dict, list[int], int]:
    """A run config (as a dict), the worker counts to verify and the replicas."""
    r = random.Random(seed)
    workers, replicas = r.choice([([2], 1), ([3], 1), ([2, 4], 1), ([3, 4], 1), ([2], 2), ([4], 2), ([3], 3), ([4], 4)])
    if r.random() < 0.6:
        topo, n = _generated(r)
    else:
        topo, n = _explicit(r, min(workers) // replicas)  # pins within every layout's partitions
    topo["name"] = f"fuzz{seed}"
    workers = [w for w in workers if w // replicas <= n] or [replicas]
    arch = r.choice(["H2", "H2", "H1"])
    model = {"arch": arch, "layers": r.randint(1, 8), "h": round(r.uniform(0.05, 0.5), 2)}
    if arch == "H1":
        model["J"] = "J1"
    data = {"name": r.choice(["double_moons", "swiss_roll", "double_circles"]), "n_samples": 400, "seed": r.randint(0, 9)}
    if r.random() < 0.25:
        model["task"], data = "regress", {"name": "npz", "path": regression_file}
    run = {"local_kernel": r.choice(["auto", "dense", "blocks", "diagonal", "fused"]),
           "readout": r.choice(["tree", "allreduce"])}
    if arch == "H2" and r.random() < 0.5:
        run.update(backprop="reversible", reversible_state=r.choice(["fixed", "float"]))
        if run["reversible_state"] == "float" and r.random() < 0.5:
            run["reversible_anchor_every"] = r.choice([2, 3])
    train = {"batch_size": r.choice([7, 13, 24, 50]), "lr": 0.01, "optimizer": r.choice(["adam", "sgd"]),
             "alpha": r.choice([0.0, 1e-3]), "weight_decay": r.choice([0.0, 1e-3]), "seed": r.randint(0, 5)}
    return {"topology": topo, "model": model, "data": data, "train": train, "run": run}, workers, replicas


def write_regression(directory: Path) -> str:
    """The regression configs' .npz file: a smooth map of 2 inputs to 3 outputs, 300 + 100 samples."""
    g = np.random.default_rng(0)
    x = g.normal(size=(400, 2)).astype("float32")
    y = np.stack([np.sin(x[:, 0]), x[:, 0] * x[:, 1], x[:, 1]], 1).astype("float32")
    path = str(directory / "regress.npz")
    np.savez(path, x_train=x[:300], y_train=y[:300], x_test=x[300:], y_test=y[300:])
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs=2, default=[0, 40], metavar=("FIRST", "END"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/fuzz_verify.json"))
    args = ap.parse_args()
    records = []
    with tempfile.TemporaryDirectory(prefix="dhdnn-fuzz-") as tmp:
        reg = write_regression(Path(tmp))
        for seed in range(*args.seeds):
            raw, workers, replicas = case(seed, reg)
            t0 = time.perf_counter()
            try:
                report = verify(config_from_dict(raw, f"<fuzz {seed}>"), workers=workers, steps=2, replicas=replicas)
                result = "ok" if report.ok else f"FAILED {report.failure}"
                each = {}  # exactness check -> its worst relative difference over the worker counts
                for run in report.runs:
                    for k, v in run["checks"].get("exactness", {}).items():
                        each[k] = max(each.get(k, 0.0), v)
                worst = max(each.values(), default=None)
            except ValueError as e:  # the product's own refusals (ConfigError, TopologyError): one line
                result, worst, each = f"refused: {str(e).splitlines()[0]}", None, {}
            except Exception as e:  # a crash is a finding, as a failed check is
                result, worst, each = f"FAILED ({type(e).__name__}) {str(e).splitlines()[0] if str(e) else ''}", None, {}
            records.append({"seed": seed, "workers": workers, "replicas": replicas, "result": result,
                            "max_relative_difference": worst, "exactness": each,
                            "seconds": round(time.perf_counter() - t0, 1),
                            "config": raw})
            print(f"{seed:4d} workers {workers} x{replicas} {raw['model']['arch']} {raw['run']} -> {result}",
                  flush=True)
    Path(args.out).write_text(json.dumps(records, indent=1))
    counts = {k: sum(r["result"].startswith(k) for r in records) for k in ("ok", "FAILED", "refused")}
    worst = {k: max(r["exactness"].get(k, 0.0) for r in records) for k in ("grads", "params", "logits", "export")}
    print(f"{counts['ok']} ok, {counts['FAILED']} failed, {counts['refused']} refused -> {args.out}; worst relative "
          f"differences: {', '.join(f'{k} {v:.2g}' for k, v in worst.items())}")


if __name__ == "__main__":
    main()
