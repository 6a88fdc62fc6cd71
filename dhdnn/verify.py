"""``dhdnn verify``: prove, for a run config, that its network sharded on workers is the
one-process network and talks only to graph neighbours.

The network trains ``steps`` steps in float64 (the trainer's batches, optimiser and regulariser)
here, then sharded with tracing on each worker count, where the checks of :mod:`dhdnn.testing`
run: locality and bytes against the halo plan, reductions, masks, and exactness (the first
step's gradients, which a uniformly scaled gradient cannot pass as Adam's steps can; every
parameter block after the steps; the logits; the shards loaded back as one dense model).
"""
from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checks as T

# the config's explicit choice, said in the report: the one exchange not between graph neighbours
_READOUT = {"allreduce": "; run.readout allreduce: the logits by an all-reduce on each replica's agent ranks"}
TOL = 1e-9  # float64, a few steps: the same sums in another order (~1e-15), amplified by Adam's first steps
# First-step gradients: relative to the network's largest gradient entry (a block class whose
# gradient nearly cancels, such as a readout bias on a balanced batch, holds only rounding).
# Parameters after Adam steps, relative to the larger of their largest entry and the learning rate:
# Adam moves an entry by ~lr whatever its gradient, so a gradient that nearly cancels (a readout bias
# on a balanced batch) carries its rounding into the step, bounded by Adam's eps at ~1e-16 / 1e-8 of
# lr (seen: 6.9e-10 over 195 random configs). A wrong gradient moves entries by ~lr: relative ~1.
PARAM_TOL = 1e-7


@dataclass
class Report:
    """What :func:`verify` found: per worker count, each check's numbers (or its failure)."""

    config: str
    describe: str
    runs: list[dict] = field(default_factory=list)  # {"workers", "layout", "checks": {name: numbers}}
    failure: T.CheckFailed | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None

    def raise_first(self) -> "Report":
        if self.failure is not None:
            raise self.failure
        return self

    def to_dict(self) -> dict:
        return {"config": self.config, "network": self.describe, "ok": self.ok, "runs": self.runs,
                "failure": None if self.ok else {"check": self.failure.check, "message": str(self.failure)}}

    def table(self) -> str:
        lines = [f"dhdnn verify {self.config}: {self.describe}",
                 f"{'workers':>7} {'layout':>6} {'messages':>8} {'bytes/step':>11} {'plan':>11} {'reductions':>10} "
                 f"{'grads':>9} {'params':>9} {'logits':>9} {'export':>9} {'masks':>7}  result"]
        for r in self.runs:
            c = r["checks"]
            loc, red = c.get("locality", {}), c.get("reductions", {})
            ex = c.get("exactness", {})
            num = lambda d, k, f: format(d[k], f) if k in d else "-"  # noqa: E731
            lines.append(f"{r['workers']:>7} {r['layout']:>6} {num(loc, 'messages', 'd'):>8} "
                         f"{','.join(map(str, loc.get('bytes_per_step', []))) or '-':>11} "
                         f"{','.join(map(str, loc.get('planned_per_step', []))) or '-':>11} {num(red, 'reductions', 'd'):>10} "
                         + "".join(f"{num(ex, k, '.1e'):>9} " for k in ("grads", "params", "logits", "export"))
                         + f"{'zero' if 'masks' in c else '-':>7}  {r.get('failed') or 'ok'}")
        lines.append("all checks hold (relative differences against one process, float64; tolerance "
                     f"{TOL:g}, gradients of the largest gradient entry; parameters {PARAM_TOL:g} of the larger of "
                     "their largest entry and the learning rate)"
                     if self.ok else f"FAILED {self.failure}")
        return "\n".join(lines)


def verify(config, workers=(2, 3, 4), steps: int = 2, replicas: int = 1, log=None) -> Report:
    """See the module docstring. ``config``: a path or a :class:`~dhdnn.config.Config`. Bad input
    raises :class:`~dhdnn.config.ConfigError` before any worker starts."""
    from .config import ConfigError, load_config
    from .run import validate
    from .train import load_data

    cfg = load_config(config) if isinstance(config, (str, Path)) else copy.deepcopy(config)
    if cfg.topology is None:
        raise ConfigError(f"{cfg.source}: key 'topology': verify checks a topology network's agents; expected one")
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"--steps: expected a positive integer, got {steps!r}")
    cfg.run.dtype, cfg.run.engine, cfg.run.progress, cfg.run.replicas = "float64", "sharded", False, replicas
    setups = {}
    for w in workers:  # every layout checked before anything runs
        cfg.run.workers = w
        setups[w] = validate(cfg, warn=False)  # (more workers than cores: slower, still exact)
    setup = setups[workers[0]]
    data = load_data(cfg)
    _check_reference_fits(cfg, setup.topo, data)
    _check_steps(cfg, data, steps)
    report = Report(str(cfg.source), f"{cfg.model.arch}, {cfg.model.layers} layers, {setup.topo.name} "
                                     f"({setup.topo.n_agents} agents), {cfg.run.backprop}, {steps} steps"
                                     + _READOUT.get(cfg.run.readout, ""))
    dense = _dense(cfg, setup.topo, steps, data)
    for w in workers:
        cfg.run.workers = w
        run = _sharded(cfg, setup.topo, steps, replicas, dense)
        report.runs.append(run)
        if log is not None:
            log(f"{w} workers: {run.get('failed') or 'ok'}")
        if "failure" in run and report.failure is None:
            report.failure = run.pop("failure")
        run.pop("failure", None)
    return report


def _check_steps(cfg, data, steps: int) -> None:
    """The checks' byte plans are those of a full batch: the steps stay within epoch 0's full
    batches (its last, shorter batch is tested by the test suite's replica tests)."""
    from .config import ConfigError

    n, bs = len(data.x_train), cfg.train.batch_size
    if bs > n:
        raise ConfigError(f"{cfg.source}: key 'train.batch_size': verify checks full batches; expected at most the "
                          f"{n} training samples, got {bs}")
    if steps > n // bs:
        raise ConfigError(f"--steps: expected at most {n // bs} (the full batches of an epoch: {n} training samples "
                          f"in batches of train.batch_size {bs}), got {steps}")


def _check_reference_fits(cfg, topo, data) -> None:
    """The reference is the one-process dense network in float64, and the shards are loaded back
    as one more dense model: refuse, before anything runs, a network whose dense form does not
    fit here (rather than be killed by the kernel while building it)."""
    from .resources import estimate, require

    est = estimate(cfg, topo, data.n_features, data.n_outputs, len(data.x_train) + len(data.x_test), 1, False)
    require(est.total + est.params, f"{cfg.source}: key 'topology': verify compares the sharded network with the "
            "one-process dense network in float64 (twice: trained, and the shards loaded back), an estimated",
            "; verify a smaller network of the same kind (fewer agents, lower model.layers or the agents' dims)")


def _batches(cfg, data, steps: int):
    """The first ``steps`` training batches (epoch 0's order, as the trainer draws it)."""
    g = torch.Generator().manual_seed(cfg.train.seed * 1_000_003)
    perm = torch.randperm(len(data.x_train), generator=g)
    bs = cfg.train.batch_size
    return [(data.x_train[perm[i * bs:(i + 1) * bs]], data.y_train[perm[i * bs:(i + 1) * bs]]) for i in range(steps)]


def _train(engine, cfg, batches) -> dict:
    """The trainer's steps; returns the first step's gradients as the optimiser sees them (after
    the replicas' reduction and the regulariser), per entry: ``{key: (block ids, values)}``."""
    from .train import make_optimizer

    opt = make_optimizer(engine.optimizer_groups(cfg.train.weight_decay), cfg.train)
    first = {}

    def keep_first(*_) -> None:
        if not first:
            first.update((e.key, (e.ids, e.get([torch.zeros_like(p) if p.grad is None else p.grad
                                                for p in e.params]).clone())) for e in engine.entries())

    opt.register_step_pre_hook(keep_first)
    for x, y in batches:
        engine.train_step(opt, x, y, cfg.train.alpha)
    return first


def _dense(cfg, topo, steps: int, data) -> dict:
    """The one-process reference: parameters (per block class) after ``steps`` steps, logits."""
    from .blocks import dense_packed
    from .build import build_classifier
    from .engine import DenseEngine

    model, table = build_classifier(cfg, data.n_features, data.n_outputs, topo, torch.float64)
    rc = cfg.run
    model.body.set_backprop(rc.backprop, rc.anchors, rc.reversible_state, rc.reversible_fraction_bits)
    batches = _batches(cfg, data, steps)
    grads = _train(DenseEngine(model, table=table, task=cfg.model.task), cfg, batches)
    with torch.no_grad():
        logits = model(batches[0][0])
    return {"model": model, "packed": dense_packed(table, model), "table": table, "probe": batches[0][0],
            "logits": logits, "grads": {k: v for k, (_, v) in grads.items()}}


def _sharded(cfg, topo, steps: int, replicas: int, dense: dict) -> dict:
    from .distributed.launch import run_local
    from .export import load_exported

    W = cfg.run.workers
    P = W // replicas
    run = {"workers": W, "layout": f"{P}x{replicas}", "checks": {}}
    with tempfile.TemporaryDirectory(prefix="dhdnn-verify-") as tmp:
        c = copy.deepcopy(cfg)
        c.run.out_dir, c.run.trace = str(Path(tmp) / "run"), True
        raw = c.to_dict()
        raw["topology"] = topo.spec
        res = run_local(_worker, W, (raw, str(cfg.source), topo.source, steps, replicas, tmp),
                        timeout_s=cfg.run.timeout_s, run_timeout_s=1800)
        records = T.read_trace(c.run.out_dir)
        try:
            checks = run["checks"]
            shares = [len(t) for t in torch.arange(cfg.train.batch_size).tensor_split(replicas)]
            checks["locality"] = T.check_locality(
                records, topo, res[0]["assignment"], batch=shares, layout=dense["table"].layout,
                layers=cfg.model.layers, classes=dense["logits"].shape[1], replicas=replicas, backprop=cfg.run.backprop,
                readout=cfg.run.readout)
            checks["reductions"] = T.check_reductions(records, P, replicas, {r["agent"]: r["shard_bytes"] for r in res})
            loaded = load_exported(tmp)  # (a masked entry that learned changes the numbers too: masks first)
            checks["masks"] = {**T.check_outside([e for r in res for e in r["outside"]]), **T.check_masks(loaded)}
            ref = dense["logits"].tensor_split(replicas)[0]
            scale = max(float(g.abs().max()) for g in dense["grads"].values())
            ex = {"grads": T.check_close(_assemble(res, dense["table"], "grads"), dense["grads"], TOL,
                                         "first-step gradients", scale)}
            ex["logits"] = T.check_close({"logits": res[0]["logits"]}, {"logits": ref}, TOL, "logits")
            lr = cfg.train.lr  # (an optimiser step's size: the scale of parameters that start at 0)
            ex["params"] = T.check_close(_assemble(res, dense["table"]), dense["packed"], PARAM_TOL, "parameters", lr)
            ex["export"] = T.check_same_network(loaded, dense["model"], dense["probe"], TOL, lr, PARAM_TOL)
            checks["exactness"] = ex
        except T.CheckFailed as e:
            run["failed"], run["failure"] = e.check, e
    return run


def _assemble(results: list[dict], table, what: str = "held") -> dict:
    """Every block class (``what``: of the parameters, or of the first step's gradients) from the
    ranks that write checkpoints (replica 0), each block exactly once."""
    out = {}
    for c in table:
        parts = [r[what][c.key] for r in results if r["writes"] and c.key in r[what]]
        ids = torch.cat([i for i, _ in parts])
        if sorted(ids.tolist()) != list(range(len(c))):
            raise T.CheckFailed("exactness", f"{c.key}: the shards hold blocks {sorted(ids.tolist())}, expected each "
                                             f"of the {len(c)} blocks once")
        vals = torch.cat([v for _, v in parts], c.block_axis)
        out[c.key] = vals.index_select(c.block_axis, torch.argsort(ids))
    return out


def _worker(rank, world, raw, source, topo_source, steps, replicas, save_dir):
    """One rank: the same steps as the reference, then what the checks need."""
    from .config import config_from_dict
    from .distributed.engine import build_sharded_engine
    from .distributed.mesh import ParallelDims, make_groups
    from .topology import topology_from_dict
    from .train import load_data

    cfg = config_from_dict(raw, source)
    data = load_data(cfg)
    topo = topology_from_dict(cfg.topology, topo_source)
    groups = make_groups(ParallelDims(world, replicas), rank)
    engine = build_sharded_engine(cfg, data, groups, topo)
    batches = _batches(cfg, data, steps)
    grads = _train(engine, cfg, batches)
    with torch.no_grad():
        logits = engine.dnet(batches[0][0])
    engine.dnet.save(save_dir, step=steps)
    engine.close()
    net = engine.net
    held = {}
    for e in engine.entries():
        held[e.key] = (e.ids.clone(), e.get([p.detach() for p in e.params]).clone())
    return {"held": held, "grads": grads, "writes": engine.shard_rank is not None, "logits": logits if net.has_logits else None,
            "assignment": net.assignment, "agent": groups.agent_rank,
            "shard_bytes": sum(p.numel() * p.element_size() for p in net.parameters()),
            "outside": [dict(e, rank=rank) for e in net.outside()]}
