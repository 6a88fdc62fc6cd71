"""The ``dhdnn`` command: parse, call the library, print. No logic of its own.

Exit codes: 0 success; 2 bad input (config, topology, flag, checkpoint, run directory),
with one line naming the file and the key; 3 a non-finite loss or gradient; 128 + N when
stopped by signal N; 1 any other failure (with the failing worker's traceback).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

USER_ERRORS = (ValueError, FileNotFoundError, KeyError)


def positive_int(text: str) -> int:
    """An argparse type: a count (workers, layers, batch, steps) of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _set_arg(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help=help)


def _config_args(p: argparse.ArgumentParser) -> None:
    from .config import DTYPE_NAMES

    _set_arg(p, "override any config key, e.g. --set train.lr=1e-3 (repeatable)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="shorthand for --set run.dtype=...")
    p.add_argument("--workers", type=int, help="shorthand for --set run.workers=N (local gloo workers)")
    p.add_argument("--out", help="shorthand for --set run.out_dir=DIR")


def _overrides(args) -> list[str]:
    flags = {"dtype": args.dtype, "workers": args.workers, "out_dir": args.out}
    return list(args.overrides) + [f"run.{k}={v}" for k, v in flags.items() if v is not None and v != ""]


def cmd_train(args) -> int:
    from .config import load_config
    from .run import train_from_config

    cfg = load_config(args.config, _overrides(args))
    if args.no_progress:
        cfg.run.progress = False
    summary = train_from_config(cfg, resume="auto" if args.auto_resume else args.resume)
    if summary is not None:
        from .tasks import TASKS

        task = TASKS[summary["task"]]
        m, f = task.metric, task.fmt
        print(f"train_{m} {summary[f'train_{m}']:{f}}  test_{m} {summary[f'test_{m}']:{f}}  "
              f"epochs {summary['epochs']}  wall {summary['wall_seconds']:.1f}s  -> {cfg.run.out_dir}")
    return 0


def cmd_plot(args) -> int:
    from .plots import plot_run

    for path in plot_run(Path(args.run_dir), say=lambda m: print(m, file=sys.stderr)):
        print(path)
    return 0


def cmd_analyze(args) -> int:
    import torch

    from .analysis import sensitivity_matrices, symplecticity_error
    from .models import ARCHITECTURES, build_model

    if args.backprop == "reversible":
        return _analyze_reversible(args)
    torch.manual_seed(args.seed)
    opts = {"J": args.J} if "J" in ARCHITECTURES[args.arch].config_options else {}
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


def _analyze_reversible(args) -> int:
    import torch

    from .analysis import reversible_report

    if args.arch != "H2":
        raise ValueError(f"--arch: reversible backprop needs H2 (invertible layers), got {args.arch}")
    r = reversible_report(args.dim, args.layers, args.h, getattr(torch, args.dtype), args.batch, args.seed)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"H2: {args.layers} layers, h={args.h}, dim={args.dim}, batch {args.batch}, {args.dtype}; gradient error "
          "= relative error of all parameter gradients against float64 autograd")
    print(f"  autograd ({args.dtype}):          gradient error {r['autograd_grad_error']:.2e}")
    print(f"  reversible, float rebuild:   gradient error {r['float_grad_error']:.2e}   rebuilt input drifted "
          f"{r['float_drift']:.2e} (relative)")
    print(f"  reversible, exact rebuild:   gradient error {r['exact_grad_error']:.2e}   every rebuilt state bit for "
          "bit the forward's (certificate checked)")
    return 0


def cmd_topology_show(args) -> int:
    from .topology import load_topology

    topo = load_topology(args.file)
    s = topo.summary()
    diameter = f", diameter {s['diameter']}" if s["diameter"] is not None else ""
    print(f"{s['name']}: {s['agents']} agents, {s['edges']} edges, state dim {s['state_dim']} "
          f"(agent dims {s['dims']}), degree {s['degree_min']}-{s['degree_max']}{diameter}")
    if s["description"]:
        print(f"  {s['description']}")
    print(f"  inputs {s['inputs']}, embeddings {s['embeddings']}, readout agents {s['readout_agents']}, "
          f"pinned {s['pinned']}")
    if args.plot:
        from .plots import topology_plot

        print(topology_plot(topo, None, args.plot))
    return 0


def _partition_inputs(args):
    """A topology file, or a run config (topology, layers, batch, architecture, dtype, backprop from it)."""
    from .config import ConfigError, load_config, read_yaml
    from .topology import load_topology

    from .distributed.mesh import LayoutError, check_layout

    raw = read_yaml(args.file)
    if isinstance(raw, dict) and ({"model", "run", "train", "data"} & set(raw) or "topology" in raw):
        cfg = load_config(args.file, args.overrides)
        if cfg.topology is None:
            raise ConfigError(f"{args.file}: key 'topology': the run config has no topology to partition")
        topo = load_topology(cfg.topology)
        try:  # (replicas auto: the layout with the most agent partitions; training measures and may pick another)
            dims = check_layout(cfg.run.workers, cfg.run.replicas, topo, cfg.train.batch_size)
        except LayoutError as e:
            raise ConfigError(f"{args.file}: key '{e.key}': {e.reason}") from None
        from .train import load_data

        return topo, args.workers or dims.agents, dict(
            batch=args.batch or -(-cfg.train.batch_size // dims.replicas), layers=args.layers or cfg.model.layers,
            arch=args.arch or cfg.model.arch, dtype=args.dtype or cfg.run.dtype,
            backprop=args.backprop or cfg.run.backprop, readout=cfg.run.readout, classes=load_data(cfg).n_outputs)
    if not args.workers:
        raise ConfigError(f"{args.file}: --workers is needed with a topology file")
    from .partitioner import check_workers

    topo = load_topology(args.file)
    check_workers(topo, args.workers, "--workers")
    return topo, args.workers, dict(batch=args.batch or 125, layers=args.layers or 64, arch=args.arch or "H2",
                                    dtype=args.dtype or "float32", backprop=args.backprop or "autograd",
                                    readout="tree", classes=2)


def cmd_partition(args) -> int:
    from .halo import build_plans, predicted_bytes
    from .models import ARCHITECTURES
    from .partitioner import partition

    topo, workers, s = _partition_inputs(args)
    batch, layers, arch, dtype, backprop = s["batch"], s["layers"], s["arch"], s["dtype"], s["backprop"]
    layout = ARCHITECTURES[arch].agent_layout()
    part = partition(topo, workers, args.method)
    metis = partition(topo, workers, "metis") if workers > 1 and args.method != "metis" else part
    loads, cut = part.loads(topo), part.cut_edges(topo)
    rank_edges = sorted(part.rank_graph(topo).edges)
    kw = dict(parts_per_agent=layout.parts_per_agent, exchanges_per_layer=layout.exchanges_per_layer, layers=layers,
              backward_factor=2 if backprop == "reversible" else 1, readout=s["readout"], classes=s["classes"])
    b = predicted_bytes(topo, part, batch, dtype, **kw)
    bm = predicted_bytes(topo, metis, batch, dtype, **kw)
    volume, pairs = part.objective(topo)
    if args.json:
        print(json.dumps({"assignment": {str(topo.ids[i]): int(r) for i, r in enumerate(part.assignment)},
                          "loads": loads, "cut_edges": [[topo.ids[i], topo.ids[k]] for i, k in cut.tolist()],
                          "rank_edges": [list(e) for e in rank_edges], "bytes_per_exchange": b["per_exchange"],
                          "bytes_per_step": b["per_step"], "metis_bytes_per_step": bm["per_step"],
                          "halo_volume": volume, "neighbour_pairs": pairs, "method": part.method,
                          "imbalance": part.imbalance(topo), "backprop": backprop,
                          "readout_collective_bytes": b["readout_collective"]}))
    else:
        plans = build_plans(topo, part)
        print(f"{topo.name}: {topo.n_agents} agents on {workers} workers ({part.method}); "
              f"cut edges {len(cut)}; max/mean load {part.imbalance(topo):.3f}")
        print(f"{'rank':>4} {'agents':>6} {'load':>6}  neighbour ranks")
        for p in plans:
            print(f"{p.rank:>4} {len(p.local):>6} {loads[p.rank]:>6}  {p.neighbor_ranks}")
        print(f"objective: halo volume {volume} state entries per exchange, {pairs} neighbour-rank pairs")
        print(f"halo bytes ({arch}, batch {batch}, {s['classes']} outputs, {dtype}, {backprop}): {b['per_exchange']} "
              "per exchange, "
              f"{b['per_step']} per training step ({layers} layers, forward + backward + readout); "
              f"plain METIS: {bm['per_step']}" + (f"; run.readout allreduce: the logits by an all-reduce of "
                                                   f"{b['readout_collective']} bytes per rank and step" if
                                                   b["readout_collective"] else ""))
    if args.plot:
        from .plots import topology_plot

        print(topology_plot(topo, part, args.plot), file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_verify(args) -> int:
    from .config import load_config
    from .topology import load_topology
    from .verify import verify

    cfg = load_config(args.config, args.overrides)
    workers = args.workers
    if workers is None:  # 2, 3 and 4 workers where the agents and replicas allow
        n = load_topology(cfg.topology).n_agents if cfg.topology is not None else 0
        workers = [w for w in (2, 3, 4) if w % args.replicas == 0 and w // args.replicas <= n] or [args.replicas]
    log = None if args.json else (lambda m: print(f"dhdnn verify: {m}", file=sys.stderr, flush=True))
    report = verify(cfg, workers, args.steps, args.replicas, log)
    print(json.dumps(report.to_dict()) if args.json else report.table())
    return 0 if report.ok else 1


def cmd_export(args) -> int:
    from .export import dense_model_of_run, export_model, trainable_parameters

    cfg, model, _ = dense_model_of_run(args.run_dir)
    out = export_model(model, args.out, cfg)
    n = sum(p.numel() for p in model.parameters())
    print(f"exported {model.body.arch_name} ({model.body.layers} layers, dim {model.body.dim}, "
          f"{trainable_parameters(model)} trainable parameters of {n} stored) -> {out}")
    return 0


def cmd_evaluate(args) -> int:
    from .config import ConfigError, apply_overrides, config_from_dict
    from .engine import DenseEngine
    from .export import dense_model_of_run, model_from_export, read_export
    from .train import DTYPES, load_data

    from .tasks import TASKS

    src = Path(args.model)
    if src.is_dir():  # a run directory, or a checkpoint directory a user's loop saved
        cfg, model, _ = dense_model_of_run(src)
        raw = cfg.to_dict() if cfg is not None else {}
    else:
        payload = read_export(src)
        model, raw = model_from_export(payload, src), payload["config"]
    spec = getattr(model, "spec", None)
    task = TASKS[spec.task if spec is not None else "classify"]
    if not raw.get("data") and not any(o.strip().startswith("data.") for o in args.overrides):
        raise ConfigError(f"{src}: key 'data': no data is recorded with this model; expected --set data.name=... "
                          "(and data.path=... for files), or an export that records its data "
                          "(export_model(model, path, data={...}))")
    # the model is given; what matters of the config is its data section (and the task it implies)
    raw = {**raw, "topology": None, "model": {**(raw.get("model") or {}), "task": task.name}}
    cfg = config_from_dict(apply_overrides(raw, args.overrides), str(src))
    data = load_data(cfg)
    model = model.to(DTYPES[cfg.run.dtype])
    x, y = (data.x_test, data.y_test) if args.split == "test" else (data.x_train, data.y_train)
    stats = DenseEngine(model, task=task.name).eval_stats(x, y)
    name = task.label
    result = {"split": args.split, "dataset": data.name, name: task.metric_of(stats),
              "loss": float(stats[0] / stats[2]), "samples": int(stats[2])}
    print(json.dumps(result) if args.json else
          f"{data.name} {args.split}: {task.describe(result[name])}  loss {result['loss']:.4f}  "
          f"({result['samples']} samples)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .config import BACKPROPS, DTYPE_NAMES
    from .models import ARCHITECTURES
    from .partitioner import METHODS

    ap = argparse.ArgumentParser(prog="dhdnn", description="Sparse Hamiltonian deep neural networks, "
                                 "trained with neighbour-only messages across processes.")
    ap.add_argument("--version", action="version", version=f"dhdnn {__version__}")
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

    p = sub.add_parser("plot", help="pictures of a run directory: curves, decision boundary, gradient norms, ...")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("analyze", help="backward sensitivity norms and symplecticity of a random network")
    p.add_argument("--arch", default="H2", choices=sorted(ARCHITECTURES))
    p.add_argument("--layers", type=positive_int, default=512)
    p.add_argument("--dim", type=positive_int, default=8)
    p.add_argument("--h", type=float, default=0.1)
    p.add_argument("--J", default="J1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backprop", choices=BACKPROPS, default="autograd",
                   help="reversible: the float and the exact (fixed-point) rebuild against float64 autograd")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="(--backprop reversible)")
    p.add_argument("--batch", type=positive_int, default=256, help="(--backprop reversible)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("verify", help="prove a run config's locality and exactness: its network sharded on 2, 3, "
                                      "4 workers against one process, every message traced")
    p.add_argument("config", help="run config file (with a topology)")
    p.add_argument("--workers", type=positive_int, nargs="+", help="worker counts (default: 2 3 4, where the agents allow)")
    p.add_argument("--steps", type=positive_int, default=2, help="training steps in float64 (default 2)")
    p.add_argument("--replicas", type=positive_int, default=1, help="data-parallel replicas on every worker count (default 1)")
    _set_arg(p, "override keys of the run config")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("export", help="write a run's network as one dense, partition-free file")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="output file (e.g. model.pt)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evaluate", help="accuracy and loss of a run directory or exported model on a data split")
    p.add_argument("model", help="run directory or exported .pt file")
    p.add_argument("--split", choices=["train", "test"], default="test")
    _set_arg(p, "change the data section, e.g. --set data.name=double_moons")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("topology", help="inspect topology files")
    tsub = p.add_subparsers(dest="topology_command", required=True)
    t = tsub.add_parser("show", help="summary of a topology (and --plot of its graph)")
    t.add_argument("file")
    t.add_argument("--plot", metavar="OUT.png")
    t.set_defaults(func=cmd_topology_show)

    p = sub.add_parser("partition", help="assign a topology's agents to workers and show the halo plan "
                                         "(FILE: a topology, or a run config)")
    p.add_argument("file")
    p.add_argument("--workers", type=positive_int, help="agent partitions (default with a run config: its workers / replicas)")
    p.add_argument("--method", choices=METHODS, default="auto")
    p.add_argument("--batch", type=positive_int, help="batch size per replica for the byte figures (default 125)")
    p.add_argument("--layers", type=positive_int, help="layers (default 64)")
    p.add_argument("--arch", choices=[a for a, c in ARCHITECTURES.items() if c.distributable],
                   help="architecture (default H2)")
    p.add_argument("--dtype", choices=DTYPE_NAMES)
    p.add_argument("--backprop", choices=BACKPROPS)
    _set_arg(p, "override keys of a run config")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--plot", metavar="OUT.png", help="agents coloured by worker, cut edges dashed")
    p.set_defaults(func=cmd_partition)
    return ap


def main(argv: list[str] | None = None) -> int:
    try:  # a module that reads an environment variable refuses a bad value when imported (DHDNN_TANH)
        from .checkpoint import CheckpointError
        from .distributed.exchange import PeerFailure
        from .distributed.launch import DISK_ERRNOS, Interrupted, WorkerFailure
        from .rundir import RunDirError
        from .train import NonFiniteError
    except ValueError as e:
        print(f"dhdnn: error: {e}", file=sys.stderr)
        return 2

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (KeyboardInterrupt, Interrupted) as e:
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"dhdnn: stopped by {signal.Signals(signum).name}; the run directory keeps its last complete "
              "checkpoint (continue with --resume)", file=sys.stderr)
        return 128 + signum
    except NonFiniteError as e:
        print(f"dhdnn: error: {e}", file=sys.stderr)
        return 3
    except WorkerFailure as e:
        if e.kind == "user":
            print(f"dhdnn: error: {e.details}", file=sys.stderr)
            return 2
        if e.kind == "nonfinite":
            print(f"dhdnn: error: worker {e.rank}: {e.details}", file=sys.stderr)
            return 3
        if e.kind == "disk":
            print(f"dhdnn: error: worker {e.rank}: {_disk(e.details)}", file=sys.stderr)
            return 1
        print(f"dhdnn: error: {e}", file=sys.stderr)
        return 1
    except PeerFailure as e:  # (a torchrun worker: local workers report through the launcher)
        print(f"dhdnn: error: rank {os.environ.get('RANK', '?')}: {e}", file=sys.stderr)
        return 1
    except (CheckpointError, RunDirError, *USER_ERRORS) as e:
        print(f"dhdnn: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        print(f"dhdnn: error: {_disk(e.strerror)}", file=sys.stderr)
        return 1


def _disk(why: str) -> str:
    return (f"{why} while writing the run directory; every file is written whole or not at all, so it keeps "
            "its last complete checkpoint: make room, then continue with --resume")


def _start_workers_early(argv: list[str]) -> None:
    """``dhdnn train`` on local workers and ``dhdnn verify`` (always on workers): start their
    forkserver before this process imports torch, so that the two imports overlap (a one-epoch
    run on 2 workers: 8.1-9.7 s -> 5.5-6.2 s on 2 cores). For ``train`` a guess from the file
    and the flags alone; ``main`` validates and reports as ever."""
    from .forkserver import start

    if argv[:1] == ["verify"]:
        return start()
    if argv[:1] != ["train"] or "TORCHELASTIC_RUN_ID" in os.environ:
        return
    p = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    p.add_argument("config", nargs="?")
    _config_args(p)
    try:
        from .config import apply_overrides, read_yaml

        args, _ = p.parse_known_args(argv[1:])
        workers = apply_overrides(read_yaml(args.config), _overrides(args))["run"]["workers"]
    except Exception:  # no file, no run.workers, bad YAML or flags: main's to report
        return
    if isinstance(workers, int) and workers > 1:
        start()


def run() -> None:
    """The console entry point: ``main()``'s exit code as the process's."""
    _start_workers_early(sys.argv[1:])
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # whoever read stdout stopped (`dhdnn partition ... | head`): exit quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    # leave without interpreter finalisation: by now every file is written and closed, and the
    # workers are gone. Tearing down torch's modules would take another ~1 s for nothing, and in
    # a torchrun worker the destructors of communication threads at exit can abort ("terminate
    # called ..."), which is why multiprocessing's workers leave this way too.
    sys.stderr.flush()
    os._exit(code)
