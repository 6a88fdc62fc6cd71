"""``dhdnn train``: validate, own the run directory, then train densely here or sharded on workers.

Everything that can be checked from the config and the topology (architecture support, the
workers' layout and pins, data, estimated memory, the device) is checked in the launching process
and reported in one line before any worker starts. The run directory is then locked and prepared
(:class:`~dhdnn.rundir.RunDir`); training runs in this process, on local workers, or here as one
rank of a torchrun job. A signal stops the run with its last complete checkpoint intact.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import Config, ConfigError, config_from_dict
from .build import build_classifier
from .engine import DenseEngine
from .rundir import RunDir, hold_as_worker
from .train import DTYPES, Trainer, load_data


@dataclass
class Setup:
    """What validation found: the topology and the engine (dense: one process; sharded: agents on
    workers; replicated: the dense model on every worker)."""

    topo: object
    engine: str


def engine_kind(cfg: Config, topo, torchrun: bool) -> str:
    """``dense``: the whole network in this process; ``sharded``: a topology network's agents on
    workers; ``replicated``: the dense network on every worker, each taking a slice of every
    batch (networks without agents, such as the conv image network, on workers)."""
    rc = cfg.run
    parallel = rc.workers > 1 or torchrun
    if rc.engine == "sharded":
        return "sharded"
    if rc.engine == "dense":
        return "replicated" if parallel else "dense"
    if not parallel:
        return "dense"
    from .models import NETWORKS

    return "sharded" if topo is not None and NETWORKS[cfg.model.network].has_agents else "replicated"


def validate(cfg: Config, world: int | None = None, local_world: int | None = None, warn: bool = True) -> Setup:
    """Check the run before anything starts; errors name the file and the key (ConfigError).
    ``warn``: say when workers outnumber cores (a speed matter)."""
    from .topology import load_topology

    torchrun = world is not None
    world = world or cfg.run.workers
    topo = load_topology(cfg.topology) if cfg.topology is not None else None
    data = load_data(cfg)
    kind = engine_kind(cfg, topo, torchrun)
    _check_network(cfg, data, topo, kind)
    _check_features(cfg, data, topo)
    check = {"sharded": _check_sharded, "replicated": _check_replicated}.get(kind)
    dims = check(cfg, topo, world) if check is not None else _check_dense(cfg)
    here = local_world or (world if kind != "dense" else 1)  # ranks on this machine
    _check_device(cfg, here)
    _check_resources(cfg, topo, data, dims, kind == "sharded", here, warn)
    return Setup(topo, kind)


def _check_network(cfg: Config, data, topo, kind: str) -> None:
    from .models import NETWORKS

    net = NETWORKS[cfg.model.network]
    if net.needs_images and data.image_shape is None:
        raise ConfigError(f"{cfg.source}: key 'model.network': {cfg.model.network} needs an image dataset (digits, "
                          f"mnist, fashion_mnist, or image arrays), got {data.name}")
    if not net.has_agents and (topo is not None or kind == "sharded"):
        raise ConfigError(f"{cfg.source}: key 'model.network': the {cfg.model.network} network has no agents; "
                          "expected no topology and run.engine auto or dense (on workers it runs as data-parallel "
                          "replicas; patches as agents: a topology with embeddings)")


def _check_features(cfg: Config, data, topo) -> None:
    """The data's features are the ones the network reads: every feature is placed somewhere."""
    from .models import NETWORKS

    where = f"{data.source or cfg.source}: key 'x_train'"
    if NETWORKS[cfg.model.network].needs_images:  # it reads whole images
        return
    if topo is not None:
        topo.input_feeds(data.n_features)  # features the topology names must exist (TopologyError)
        read = {f.feature for f in topo.inputs} | {f for e in topo.embeddings for f in e.features}
        if not topo.inputs and not topo.embeddings:
            read = set(range(data.n_features))
        unread = sorted(set(range(data.n_features)) - read)
        if unread:
            raise ConfigError(f"{where}: the data has {data.n_features} features, but the topology "
                              f"{topo.source} reads only {len(read)} ({_few(sorted(read))}); features "
                              f"{_few(unread)} would be ignored; expected the topology's inputs/embeddings to "
                              "read every feature")
        return
    fi = cfg.model.feature_index
    if fi is not None and len(fi) != data.n_features:
        raise ConfigError(f"{where}: the data has {data.n_features} features, model.feature_index places "
                          f"{len(fi)}; expected one state index per feature")
    if fi is None and data.n_features > cfg.model.dim:
        raise ConfigError(f"{where}: the data has {data.n_features} features, more than model.dim {cfg.model.dim}; "
                          "raise model.dim or use a topology with embeddings")


def _few(xs: list) -> str:
    return str(xs) if len(xs) <= 8 else f"[{', '.join(map(str, xs[:8]))}, ... {len(xs)} in all]"


def _check_replicated(cfg: Config, topo, world: int):
    """The dense network on every worker: as many replicas as workers, a sample for each."""
    _check_backprop(cfg)
    return _layout(cfg, world, world if cfg.run.replicas in (1, "auto") else cfg.run.replicas)


def _check_sharded(cfg: Config, topo, world: int):
    """What the sharded engine needs: a topology, a distributable architecture, a layout of the
    workers that fits the agents and the batch. Returns the layout (ParallelDims)."""
    from .models import ARCHITECTURES, NotDistributable

    src, mc, rc = cfg.source, cfg.model, cfg.run
    if topo is None:
        raise ConfigError(f"{src}: key 'topology': the sharded engine needs a topology (a file or inline)")
    try:
        ARCHITECTURES[mc.arch].agent_layout(J=mc.J)
    except NotDistributable as e:
        raise ConfigError(f"{src}: key '{e.key}': {e.reason}") from None
    _check_backprop(cfg)
    return _layout(cfg, world, rc.replicas, topo)


def _layout(cfg: Config, world: int, replicas, topo=None):
    """:func:`~dhdnn.distributed.mesh.check_layout`, its error in the config's coordinates."""
    from .distributed.mesh import LayoutError, check_layout

    try:
        return check_layout(world, replicas, topo, cfg.train.batch_size)
    except LayoutError as e:
        raise ConfigError(f"{cfg.source}: key '{e.key}': {e.reason}") from None


def _check_backprop(cfg: Config) -> None:
    from .models import ARCHITECTURES

    if cfg.run.backprop == "reversible" and not ARCHITECTURES[cfg.model.arch].invertible:
        raise ConfigError(f"{cfg.source}: key 'run.backprop': {cfg.model.arch} layers cannot be inverted exactly; "
                          "expected autograd")


def _check_dense(cfg: Config):
    _check_backprop(cfg)
    if cfg.run.replicas != 1:
        raise ConfigError(f"{cfg.source}: key 'run.replicas': expected 1 with the dense engine (one process)")
    return _layout(cfg, 1, 1)


def _check_device(cfg: Config, here: int) -> None:
    """A GPU run needs a GPU that torch can use, and nccl one per rank on this machine."""
    rc = cfg.run
    if not rc.device.startswith("cuda"):
        return
    gpus = torch.cuda.device_count()
    if gpus == 0:
        raise ConfigError(f"{cfg.source}: key 'run.device': {rc.device}, but torch {torch.__version__} sees no CUDA "
                          "device here; expected cpu")
    if rc.backend == "nccl" and here > gpus:
        raise ConfigError(f"{cfg.source}: key 'run.backend': nccl needs a GPU per rank, but {here} ranks share {gpus} "
                          "GPU(s) here; expected auto or gloo (exchanges staged through the CPU)")


def _check_resources(cfg: Config, topo, data, dims, sharded: bool, here: int, warn: bool = True) -> None:
    """Refuse a run whose estimated memory exceeds the machine's; warn when workers outnumber cores."""
    from .resources import available_memory, cores, estimate, human

    n_samples = len(data.x_train) + len(data.x_test)
    est = estimate(cfg, topo, data.n_features, data.n_outputs, n_samples, dims.agents, sharded)
    avail = available_memory()
    if avail is not None and est.total * here > avail:
        keys = "model.layers, model.dim or the topology's dims, train.batch_size" + (
            ", run.workers" if sharded else _sharded_hint(cfg, topo, data, n_samples, avail))
        raise ConfigError(f"{cfg.source}: key 'model': the run needs an estimated {est.describe()}"
                          f"{f' x {here} ranks' if here > 1 else ''}, more than this machine's {human(avail)} "
                          f"available; lower {keys}")
    threads = cfg.run.threads
    if warn and here * threads > cores():
        print(f"dhdnn: warning: {here} worker(s) x {threads} thread(s) on {cores()} cores: workers will wait "
              "for each other's CPU time (every exchange then costs a scheduling delay); use at most "
              f"{max(1, cores() // threads)} workers here", file=sys.stderr)


def _sharded_hint(cfg: Config, topo, data, n_samples: int, avail: int) -> str:
    """Where the sharded engine would fit in one process (it stores the graph's blocks, not the
    dense matrices), the key that selects it; else nothing."""
    from .models import ARCHITECTURES
    from .resources import estimate

    if topo is None or not getattr(ARCHITECTURES.get(cfg.model.arch), "distributable", False):
        return ""
    est = estimate(cfg, topo, data.n_features, data.n_outputs, n_samples, 1, True)
    return f" (or set run.engine: sharded, an estimated {est.describe()})" if est.total <= avail else ""


def resolve_resume(cfg: Config, resume: bool | str) -> bool:
    """``"auto"``: resume when the run directory holds a complete checkpoint."""
    if resume == "auto":
        return ckpt.latest(Path(cfg.run.out_dir)) is not None
    return bool(resume)


def train_from_config(cfg: Config, resume: bool | str = False) -> dict | None:
    """Entry point of ``dhdnn train``: the dense engine in this process, or the sharded engine on
    local workers / under torchrun. Returns the summary (None on ranks other than 0)."""
    from .distributed.launch import Signals, torchrun_env

    env = torchrun_env()
    if env is not None:
        return _train_torchrun(cfg, resume, env)
    setup = validate(cfg)
    resume = resolve_resume(cfg, resume)
    with RunDir(cfg, setup.topo, resume), Signals(raising=True):
        if setup.engine != "dense":
            return _train_local_workers(cfg, setup, resume)
        return train_dense(cfg, setup, resume)


def _worker_args(cfg: Config, setup: Setup, resume: bool, local_rank: int | None = None) -> tuple:
    """``worker_main``'s arguments after ``(rank, world)``: the config with the topology inline, as
    validated (a file edited meanwhile cannot change what the workers train)."""
    from .distributed.launch import fault_from_env

    raw, topo = cfg.to_dict(), setup.topo
    if topo is not None:
        raw["topology"] = topo.spec
    return raw, resume, cfg.source, local_rank, fault_from_env(), topo.source if topo is not None else None


def _train_local_workers(cfg: Config, setup: Setup, resume: bool) -> dict:
    from .distributed.launch import pick_backend, run_local

    backend = pick_backend(cfg.run.backend, cfg.run.device, cfg.run.workers)
    args = _worker_args(cfg, setup, resume)
    return run_local(worker_main, cfg.run.workers, args, backend, cfg.run.timeout_s, threads=cfg.run.threads,
                     pin_workers=cfg.run.pin_workers)[0]


def _train_torchrun(cfg: Config, resume, env) -> dict | None:
    import torch.distributed as dist

    from .distributed.launch import Signals, available_cores, init_group, pick_backend, pin
    from .distributed.mesh import workers_per_node

    rank, world, local_rank = env
    if cfg.run.workers not in (1, world):
        raise ConfigError(f"{cfg.source}: key 'run.workers': {cfg.run.workers} differs from torchrun's world size "
                          f"{world}; leave it at 1 under torchrun")
    local_world = workers_per_node(world)
    setup = validate(cfg, world, local_world)
    cores = available_cores()
    if cfg.run.pin_workers and local_world * cfg.run.threads <= len(cores):
        pin(local_rank, cfg.run.threads, cores)
    init_group(pick_backend(cfg.run.backend, cfg.run.device, local_world), rank, world, cfg.run.timeout_s)
    rundir = None
    try:
        with Signals(raising=True):
            # rank 0 owns the run directory; everyone learns whether it could and whether to resume
            ok = torch.zeros(2, dtype=torch.float64)
            error = None
            if rank == 0:
                try:
                    resume = resolve_resume(cfg, resume)
                    rundir = RunDir(cfg, setup.topo, resume).__enter__()
                    ok[:] = torch.tensor([1.0, float(resume)])
                except Exception as e:  # reported by rank 0 itself, after the others know
                    error = e
            dist.all_reduce(ok)  # setup-time collective
            if error is not None:
                raise error
            if ok[0] != 1:
                from .rundir import RunDirError

                raise RunDirError(f"run.out_dir: {cfg.run.out_dir}: rank 0 could not take the run directory")
            return worker_main(rank, world, *_worker_args(cfg, setup, bool(ok[1]), local_rank))
    finally:
        if rundir is not None:
            rundir.__exit__(*sys.exc_info())
        if dist.is_initialized():
            dist.destroy_process_group()


def worker_main(rank: int, world: int, cfg_dict: dict, resume: bool, source: str = "<config>",
                local_rank: int | None = None, fault=None, topo_source: str | None = None):
    """Train one rank of a run on workers (already in its process group); the summary on rank 0."""
    from .topology import topology_from_dict

    cfg = config_from_dict(cfg_dict, source)
    torch.set_num_threads(cfg.run.threads)
    hold_as_worker(cfg.run.out_dir)
    device = cfg.run.device
    if device == "cuda":
        device = f"cuda:{(rank if local_rank is None else local_rank) % torch.cuda.device_count()}"
        torch.cuda.set_device(device)  # before any group or DeviceMesh: nccl and the mesh take it as this rank's
    data = load_data(cfg)
    topo = topology_from_dict(cfg.topology, topo_source or "<topology>") if cfg.topology is not None else None
    if engine_kind(cfg, topo, torchrun=True) == "replicated":
        return _replicated_worker(rank, world, cfg, data, topo, device, resume, fault)
    return _sharded_worker(rank, world, cfg, data, topo, device, resume, fault)


def dense_model(cfg: Config, data, topo, device):
    """``(model, table)``: the run's dense network on ``device``, with the run's backprop."""
    model, table = build_classifier(cfg, data.n_features, data.n_outputs, topo, DTYPES[cfg.run.dtype],
                                    data.image_shape)
    rc = cfg.run
    model.to(device).body.set_backprop(rc.backprop, rc.anchors, rc.reversible_state, rc.reversible_fraction_bits)
    return model, table


def _replicated_worker(rank, world, cfg, data, topo, device, resume, fault):
    from .distributed.exchange import Tracer
    from .distributed.mesh import ParallelDims, make_groups
    from .distributed.launch import quiet_gloo
    from .distributed.replicated import ReplicatedEngine

    groups = make_groups(ParallelDims(world, world), rank, device)  # the workers are the replicas
    model, table = dense_model(cfg, data, topo, device)
    tracer = Tracer.for_rank(cfg.run.out_dir, groups) if cfg.run.trace else None
    engine = ReplicatedEngine(model, groups, device, table, cfg.model.task, tracer, fault)
    quiet_gloo()
    fingerprint = topo.fingerprint if topo is not None else None
    try:
        summary = Trainer(cfg, engine, data, resume=resume, fingerprint=fingerprint,
                          extra_summary={"engine": "replicated"}).fit()
    finally:
        engine.close()
    return summary if rank == 0 else None


def _sharded_worker(rank, world, cfg, data, topo, device, resume, fault):
    from .distributed.engine import build_sharded_engine
    from .distributed.launch import quiet_gloo
    from .distributed.mesh import ParallelDims, make_groups, workers_per_node

    layout, placement = None, "spread" if cfg.run.placement == "spread" else "packed"
    quiet_gloo()  # (before measuring exchanges: at normal priority gloo's threads steal the compute core)
    if cfg.run.replicas == "auto":
        from .distributed.autolayout import choose

        layout = choose(cfg, data, topo, log=lambda m: print(m, file=sys.stderr, flush=True))
        cfg.run.replicas = layout.replicas
        placement = layout.placement if cfg.run.placement == "auto" else placement
    dims = ParallelDims(world, cfg.run.replicas, placement)
    groups = make_groups(dims, rank, device)
    engine = build_sharded_engine(cfg, data, groups, topo, device=device, fault=fault)  # quiets the new groups' threads
    from .resources import estimate

    net = engine.net  # this rank's exact rows and parameter bytes
    est = estimate(cfg, topo, data.n_features, data.n_outputs, len(data.x_train) + len(data.x_test),
                   groups.dims.agents, True, rows=(net.rows.F, net.rows.E),
                   param_bytes=sum(p.numel() * p.element_size() for p in net.parameters()))
    extra = {"memory_estimate_per_rank": est.total, "layout": dims.facts(workers_per_node(world))}
    if layout is not None:
        extra["layout"].update(predicted_step_s=layout.predicted_step_s, candidates=layout.candidates)
    try:
        summary = Trainer(cfg, engine, data, resume=resume, fingerprint=topo.fingerprint, extra_summary=extra).fit()
    finally:
        engine.close()
    return summary if rank == 0 else None


def train_dense(cfg: Config, setup: Setup, resume: bool) -> dict:
    """Train the dense single-process model of ``cfg``; returns the summary."""
    torch.set_num_threads(cfg.run.threads)
    data = load_data(cfg)
    model, table = dense_model(cfg, data, setup.topo, cfg.run.device)
    fingerprint = setup.topo.fingerprint if setup.topo is not None else None
    engine = DenseEngine(model, cfg.run.device, table, cfg.model.task)
    return Trainer(cfg, engine, data, resume=resume, fingerprint=fingerprint).fit()
