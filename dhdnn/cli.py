"""The ``dhdnn`` command: parse, call the library, print. No logic of its own."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

USER_ERRORS = (ValueError, FileNotFoundError, RuntimeError, KeyError)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config key, e.g. --set train.lr=0.01 (repeatable)")
    p.add_argument("--dtype", choices=["float32", "float64"], help="shorthand for --set run.dtype=...")
    p.add_argument("--workers", type=int, help="shorthand for --set run.workers=N (local gloo workers)")
    p.add_argument("--out", help="shorthand for --set run.out_dir=DIR")


def _overrides(args) -> list[str]:
    extra = list(args.overrides)
    if args.dtype:
        extra.append(f"run.dtype={args.dtype}")
    if args.workers is not None:
        extra.append(f"run.workers={args.workers}")
    if args.out:
        extra.append(f"run.out_dir={args.out}")
    return extra


def cmd_train(args) -> int:
    from .config import load_config
    from .train import train_from_config

    cfg = load_config(args.config, _overrides(args))
    if args.no_progress:
        cfg.run.progress = False
    summary = train_from_config(cfg, resume="auto" if args.auto_resume else args.resume)
    if summary is not None:
        print(f"train_acc {summary['train_acc']:.4f}  test_acc {summary['test_acc']:.4f}  "
              f"epochs {summary['epochs']}  wall {summary['wall_seconds']:.1f}s  -> {cfg.run.out_dir}")
    return 0


def cmd_plot(args) -> int:
    from . import plots
    from .export import dense_model_of_run
    from .train import load_data

    run = Path(args.run_dir)
    written = []
    if (run / "grad_norms.jsonl").exists():
        written.append(plots.grad_norm_heatmap(run, run / "grad_norms.png"))
    cfg, model, _ = dense_model_of_run(run)
    data = load_data(cfg)
    if data.n_features == 2:
        written.append(plots.decision_boundary(model, data, run / "decision_boundary.png"))
    if not written:
        raise ValueError(f"{run}: nothing to plot (no gradient norms recorded and the data is not 2-D)")
    for w in written:
        print(w)
    return 0


def cmd_analyze(args) -> int:
    import torch

    from .analysis import sensitivity_matrices, symplecticity_error
    from .models import build_model

    torch.manual_seed(args.seed)
    opts = {"J": args.J} if args.arch == "H1" else {}
    model = build_model(args.arch, args.dim, args.layers, args.h, **opts).double()
    bsm = sensitivity_matrices(model, torch.randn(args.dim, dtype=torch.float64))
    norms = [float(torch.linalg.matrix_norm(M, ord=2)) for M in bsm]
    out = {"arch": args.arch, "layers": args.layers, "h": args.h, "dim": args.dim,
           "symplecticity_error": symplecticity_error(bsm[0]), "min_bsm_norm": min(norms),
           "max_bsm_norm": max(norms), "bsm_norms": norms}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{args.arch}: {args.layers} layers, h={args.h}, dim={args.dim}")
        print(f"  relative symplecticity error of dy_L/dy_0: {out['symplecticity_error']:.3e}")
        print(f"  ||dy_L/dy_j||_2 over j: min {out['min_bsm_norm']:.4g}  max {out['max_bsm_norm']:.4g}")
    return 0


def cmd_topology_show(args) -> int:
    from .topology import load_topology

    topo = load_topology(args.file)
    s = topo.summary()
    print(f"{s['name']}: {s['agents']} agents, {s['edges']} edges, state dim {s['state_dim']} "
          f"(agent dims {s['dims']}), degree {s['degree_min']}-{s['degree_max']}, diameter {s['diameter']}")
    if s["description"]:
        print(f"  {s['description']}")
    print(f"  inputs {s['inputs']}, embeddings {s['embeddings']}, readout agents {s['readout_agents']}, "
          f"pinned {s['pinned']}")
    if args.plot:
        from .plots import topology_plot

        print(topology_plot(topo, None, args.plot))
    return 0


def cmd_partition(args) -> int:
    from .partition import build_plans, partition, predicted_bytes
    from .topology import load_topology

    topo = load_topology(args.file)
    part = partition(topo, args.workers, args.method)
    loads, cut = part.loads(topo), part.cut_edges(topo)
    rank_edges = sorted(part.rank_graph(topo).edges)
    b = predicted_bytes(topo, part, args.batch, args.dtype, args.arch, args.layers)
    if args.json:
        print(json.dumps({"assignment": {str(topo.ids[i]): r for i, r in enumerate(part.assignment)},
                          "loads": loads, "cut_edges": [[topo.ids[i], topo.ids[k]] for i, k in cut],
                          "rank_edges": [list(e) for e in rank_edges], "bytes_per_exchange": b["per_exchange"],
                          "bytes_per_step": b["per_step"], "method": part.method,
                          "imbalance": part.imbalance(topo)}))
    else:
        plans = build_plans(topo, part)
        print(f"{topo.name}: {topo.n_agents} agents on {args.workers} workers ({part.method}); "
              f"cut edges {len(cut)}; max/mean load {part.imbalance(topo):.3f}")
        print(f"{'rank':>4} {'agents':>6} {'load':>6}  neighbour ranks")
        for p in plans:
            print(f"{p.rank:>4} {len(p.local):>6} {loads[p.rank]:>6}  {p.neighbor_ranks}")
        print(f"halo bytes ({args.arch}, batch {args.batch}, {args.dtype}): {b['per_exchange']} per exchange, "
              f"{b['per_step']} per training step ({args.layers} layers, forward + backward + readout)")
    if args.plot:
        from .plots import topology_plot

        print(topology_plot(topo, part, args.plot), file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_export(args) -> int:
    from .export import dense_model_of_run, export_model

    cfg, model, topo = dense_model_of_run(args.run_dir)
    out = export_model(model, cfg, topo, args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"exported {model.body.arch_name} ({model.body.layers} layers, dim {model.body.dim}, {n} parameters) "
          f"-> {out}")
    return 0


def cmd_evaluate(args) -> int:
    from .config import apply_overrides, config_from_dict
    from .export import dense_model_of_run, model_from_export, read_export
    from .train import DTYPES, DenseEngine, load_data

    src = Path(args.model)
    if src.is_dir():
        cfg, model, _ = dense_model_of_run(src)
        raw = cfg.to_dict()
    else:
        payload = read_export(src)
        model, raw = model_from_export(payload, src), payload["config"]
    cfg = config_from_dict(apply_overrides(raw, args.overrides), str(src))
    data = load_data(cfg)
    model = model.to(DTYPES[cfg.run.dtype])
    x, y = (data.x_test, data.y_test) if args.split == "test" else (data.x_train, data.y_train)
    ce, correct, count = DenseEngine(model).eval_stats(x, y).tolist()
    result = {"split": args.split, "dataset": data.name, "accuracy": correct / count, "loss": ce / count,
              "samples": int(count)}
    print(json.dumps(result) if args.json else
          f"{data.name} {args.split}: accuracy {result['accuracy']:.4f}  loss {result['loss']:.4f}  "
          f"({int(count)} samples)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dhdnn", description="Sparse Hamiltonian deep neural networks, "
                                 "trained with neighbour-only messages across processes.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train from a run config YAML")
    p.add_argument("config", help="run config file (sections model, topology, data, train, run)")
    _config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    p.add_argument("--auto-resume", action="store_true",
                   help="resume if the run directory holds a complete checkpoint, else start fresh "
                        "(for torchrun --max-restarts)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("plot", help="decision boundary and gradient-norm heatmap of a run directory")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("analyze", help="backward sensitivity norms and symplecticity of a random network")
    p.add_argument("--arch", default="H2")
    p.add_argument("--layers", type=int, default=512)
    p.add_argument("--dim", type=int, default=8)
    p.add_argument("--h", type=float, default=0.1)
    p.add_argument("--J", default="J1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("export", help="write a run's network as one dense, partition-free file")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="output file (e.g. model.pt)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evaluate", help="accuracy and loss of a run directory or exported model on a data split")
    p.add_argument("model", help="run directory or exported .pt file")
    p.add_argument("--split", choices=["train", "test"], default="test")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="change the data section, e.g. --set data.name=double_moons")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("topology", help="inspect topology files")
    tsub = p.add_subparsers(dest="topology_command", required=True)
    t = tsub.add_parser("show", help="summary of a topology (and --plot of its graph)")
    t.add_argument("file")
    t.add_argument("--plot", metavar="OUT.png")
    t.set_defaults(func=cmd_topology_show)

    p = sub.add_parser("partition", help="assign a topology's agents to workers and show the halo plan")
    p.add_argument("file")
    p.add_argument("--workers", type=int, required=True)
    p.add_argument("--method", choices=["auto", "metis", "bisection"], default="auto")
    p.add_argument("--batch", type=int, default=125, help="batch size for the byte figures")
    p.add_argument("--layers", type=int, default=64)
    p.add_argument("--arch", choices=["H1", "H2"], default="H2")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--plot", metavar="OUT.png", help="agents coloured by worker, cut edges dashed")
    p.set_defaults(func=cmd_partition)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"dhdnn: error: {e}", file=sys.stderr)
        return 2
