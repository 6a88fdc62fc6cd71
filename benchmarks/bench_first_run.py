"""A user's first run on a graph of many agent dims: how long before training starts.

The fused kernel compiles its loops per block shape on first use (numba caches them on disk for
later runs). A graph whose agents have dims 1-8 has up to 64 block shapes; before this change
``auto``'s trial compiled every one of them (3 loops each) before the first step. Now shapes that
carry less than 1/8 of a matrix's entries share one loop nest whose shape is read when it runs.

Side by side, in one run: ``dhdnn train`` of a 3,000-agent random geometric graph (agent dims
1-8, H2, 4 layers, the sharded engine on one worker, ``run.local_kernel: auto``, three epochs of 4 steps) in a
fresh process, with an empty numba cache (cold) and again with the cache it left (warm), for
this checkout and for the commit before the change (``--before``, in a git worktree),
interleaved and repeated. Prints and writes ``benchmarks/results/first_run.json``.

    python benchmarks/bench_first_run.py [--repeat 2] [--before 64fc22b]
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, landed_worktree, train_cli, write_result  # noqa: E402


def write_case(d: Path) -> Path:
    """The mixed-dims graph and its run config in ``d``; returns the config."""
    import networkx as nx

    g = nx.random_geometric_graph(3000, 0.03, seed=1)
    g = nx.convert_node_labels_to_integers(g.subgraph(max(nx.connected_components(g), key=len)).copy())
    rng = random.Random(0)
    topo = {"name": "rgg_dims1to8", "agents": [{"id": i, "dim": rng.randint(1, 8)} for i in g.nodes],
            "edges": [[a, b] for a, b in g.edges]}
    (d / "topo.yaml").write_text(yaml.safe_dump(topo))
    cfg = d / "run.yaml"
    cfg.write_text("topology: topo.yaml\nmodel: {arch: H2, layers: 4}\ndata: {name: double_moons, n_samples: 400}\n"
                   "train: {epochs: 3, batch_size: 100}\nrun: {engine: sharded, local_kernel: auto}\n")
    return cfg


def one(cfg: Path, cache: Path, out: Path, cwd: Path) -> dict:
    s = train_cli(out, 1, config=str(cfg), env={"NUMBA_CACHE_DIR": str(cache)}, cwd=cwd)
    t = s["timing"]
    return {"to_first_step_s": t["first_step_unix"] - s["command_start_unix"],
            "kernel_compile_s": t["kernel_compile_seconds"], "train_acc": s["train_acc"],
            "train_wall_s": s["wall_seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--before", default="64fc22b", help="the commit before the change")
    args = ap.parse_args()
    rows = {f"{v} {c}": [] for v in ("before", "now") for c in ("cold", "warm")}
    with tempfile.TemporaryDirectory() as tmp, landed_worktree(commit=args.before) as before:
        tmp = Path(tmp)
        cfg = write_case(tmp)
        for r in range(args.repeat):
            for version, cwd in (("before", before), ("now", ROOT)):
                cache = tmp / f"cache-{version}-{r}"
                for c in ("cold", "warm"):
                    res = one(cfg, cache, tmp / f"run-{version}-{r}-{c}", cwd)
                    rows[f"{version} {c}"].append(res)
                    print(f"{version:6s} {c}: {res['to_first_step_s']:6.1f} s to the first step "
                          f"(compiling or loading loops {res['kernel_compile_s']:5.1f} s), then training "
                          f"{res['train_wall_s']:.1f} s, train acc {res['train_acc']:.4f}",
                          flush=True)
    summary = {k: {"median_to_first_step_s": statistics.median(x["to_first_step_s"] for x in v),
                   "range_to_first_step_s": [min(x["to_first_step_s"] for x in v), max(x["to_first_step_s"] for x in v)],
                   "median_kernel_compile_s": statistics.median(x["kernel_compile_s"] for x in v),
                   "median_train_wall_s": statistics.median(x["train_wall_s"] for x in v)}
               for k, v in rows.items()}
    for k, v in summary.items():
        print(f"{k:12s} median {v['median_to_first_step_s']:6.1f} s to the first step "
              f"(range {v['range_to_first_step_s'][0]:.1f}-{v['range_to_first_step_s'][1]:.1f}), "
              f"training {v['median_train_wall_s']:.1f} s")
    print("written", write_result("first_run", {"before": args.before, "runs": rows, "summary": summary}))


if __name__ == "__main__":
    main()
