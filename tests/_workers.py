"""Worker functions run in spawned gloo processes by the distributed tests.

Each spawn checks many things at once (exactness, locality, adjoint, training) to keep
the number of process launches, and so CI time, small."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from dhdnn.config import load_config
from dhdnn.data import Dataset
from dhdnn.distributed.engine import build_sharded_engine
from dhdnn.distributed.exchange import Exchanger
from dhdnn.distributed.mesh import ParallelDims, make_groups
from dhdnn.topology import load_topology

# the local kernel of the exactness tests: blocks, or (DHDNN_TEST_KERNEL=fused) the whole suite on another
KERNEL = os.environ.get("DHDNN_TEST_KERNEL", "blocks")

COLLECTIVES = ["all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "barrier", "monitored_barrier", "gather",
               "scatter", "all_gather_object", "broadcast_object_list"]


class NoCollectives:
    """Make every torch.distributed collective raise while active."""

    def __enter__(self):
        self.saved = {n: getattr(dist, n) for n in COLLECTIVES if hasattr(dist, n)}

        def boom(name):
            def f(*a, **k):
                raise AssertionError(f"collective dist.{name} called inside forward/backward")
            return f
        for n in self.saved:
            setattr(dist, n, boom(n))
        return self

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(dist, n, f)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def make_data(n_features: int, n_classes: int, batch: int, seed: int) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n_features, generator=g, dtype=torch.float64)
    y = torch.randint(0, n_classes, (batch,), generator=g)
    return Dataset("random", x, y, x, y, n_classes)


def cfg_for(topo_path, arch: str, layers: int, out_dir: str, readout: str = "tree", trace: bool = True,
            kernel: str = KERNEL, backprop: str = "autograd", anchors: int = 0, replicas: int = 1, h: float = 0.3,
            state: str = "fixed"):
    cfg = load_config(None, [f"run.reversible_state={state}", f"model.arch={arch}", f"model.layers={layers}", f"model.h={h}", f"run.local_kernel={kernel}",
                             "run.dtype=float64", f"run.out_dir={out_dir}", f"run.readout={readout}",
                             f"run.trace={'true' if trace else 'false'}", "train.alpha=0.01",
                             "train.weight_decay=0.001", "train.lr=0.01", f"run.backprop={backprop}",
                             f"run.reversible_anchor_every={anchors}", f"run.replicas={replicas}"])
    cfg.topology = topo_path
    return cfg


def load_packed(engine, packed: dict) -> None:
    """Write full (canonical) block classes into an engine's entries."""
    with torch.no_grad():
        for e in engine.entries():
            v = packed[e.key]
            e.put(list(e.params), v if e.ids is None else v.index_select(e.block_axis, e.ids))


def held(engine, grads: bool = False) -> dict:
    """{class key: (canonical ids, values)} of what this rank holds (or of its gradients)."""
    out = {}
    for e in engine.entries():
        ts = [(p.grad if p.grad is not None else torch.zeros_like(p)) if grads else p.detach() for p in e.params]
        out[e.key] = (e.ids.clone(), e.get(ts).detach().cpu().clone())  # (compared with a CPU reference)
    return out


def gather(x, ex: Exchanger):
    """The halo of ``x`` (one whole gather)."""
    halo = x.new_empty(ex.layout.halo_width, x.shape[1])
    ex.finish_gather(ex.start_gather([x], [halo]))
    return halo


def scatter_add(c_halo, ex: Exchanger):
    """What the neighbours' contributions ``c_halo`` add to my rows (one whole scatter-add)."""
    out = c_halo.new_zeros(ex.layout.width, c_halo.shape[1])
    ex.finish_scatter(ex.start_scatter([c_halo]), [out])
    return out


def exactness_worker(rank, world, topo_path, arch, layers, packed, data, out_dir, readout, steps, kernel=KERNEL,
                     device="cpu", backprop="autograd", anchors=0, replicas=1, h=0.3, state="fixed"):
    """One forward/backward + checks, then ``steps`` Adam steps; returns what the parent compares."""
    cfg = cfg_for(topo_path, arch, layers, out_dir, readout, kernel=kernel, backprop=backprop, anchors=anchors,
                  replicas=replicas, h=h, state=state)
    groups = make_groups(ParallelDims(world, replicas), rank, device)
    engine = build_sharded_engine(cfg, data, groups, load_topology(topo_path), device=device)
    load_packed(engine, packed)
    x, y = data.x_train, data.y_train
    with NoCollectives() if readout == "tree" and replicas == 1 else _Null():
        out = engine.objective(x, y, cfg.train.alpha)
        out.objective.backward()
    engine.after_backward()
    grads = held(engine, grads=True)
    records = list(engine.tracer.records)
    with torch.no_grad():
        logits = engine.net(x.to(device))
        logits = logits if engine.net.has_logits else None
    engine.tracer.records.clear()
    # dot-product adjoint test of the gather/scatter_add pair on random fields
    ex: Exchanger = engine.net.ex
    g = torch.Generator().manual_seed(100 + rank)
    B = 3
    xr = torch.randn(ex.layout.width, B, generator=g, dtype=torch.float64).to(device)
    hr = torch.randn(ex.layout.halo_width, B, generator=g, dtype=torch.float64).to(device)
    with NoCollectives():
        lhs = (gather(xr, ex) * hr).sum() if ex.active else xr.new_zeros(())  # <G x, y>
        rhs = (xr * scatter_add(hr, ex)).sum() if ex.active else xr.new_zeros(())
    # training steps with the same optimiser the trainer uses
    opt = torch.optim.Adam(engine.optimizer_groups(cfg.train.weight_decay), lr=cfg.train.lr)
    load_packed(engine, packed)
    for _ in range(steps):
        opt.zero_grad()
        engine.objective(x, y, cfg.train.alpha).objective.backward()
        engine.after_backward()
        opt.step()
    final = held(engine)
    sums = engine.reduce_sum(torch.stack([lhs, rhs]).detach().cpu())
    return {"rank": rank, "logits": None if logits is None else logits.cpu(), "objective": out.objective.detach().cpu(),
            "stats": out.stats, "grads": grads, "records": records, "adjoint": sums, "final": final,
            "kernel": engine.net.local_kernel, "writes": engine.shard_rank is not None}


def exact_reversible_worker(rank, world, topo_path, layers, h, runs, out_dir, kernel="auto"):
    """Exact reversible backprop on this rank for each ``(dtype, packed, data)`` of ``runs``: the
    gradients it gives, and whether every state the backward rebuilt equals the forward's."""
    out = []
    for dtype, packed, data in runs:
        cfg = cfg_for(topo_path, "H2", layers, out_dir, trace=False, backprop="reversible", h=h, kernel=kernel)
        cfg.run.dtype = str(dtype).split(".")[-1]
        groups = make_groups(ParallelDims(world, 1), rank, "cpu")
        engine = build_sharded_engine(cfg, data, groups, load_topology(topo_path))
        load_packed(engine, packed)
        cert = engine.net.plan.cert
        cert.states = {"forward": [], "rebuilt": []}
        engine.objective(data.x_train, data.y_train, 0.0).objective.backward()
        fwd, back = cert.states["forward"], cert.states["rebuilt"]
        same = len(fwd) == len(back) == 2 * layers and all(
            all(torch.equal(a, b) for a, b in zip(f, r)) for f, r in zip(fwd, reversed(back)))
        out.append({"grads": held(engine, grads=True), "same": same, "checked": cert.checked,
                    "writes": engine.shard_rank is not None})
    return out


def gloo_priority_worker(rank, world, quiet: str):
    """The library's ``distribute`` with ``DHDNN_QUIET_GLOO=quiet``: the scheduling policy of
    each of this process's gloo transport threads afterwards."""
    import os
    from pathlib import Path

    import dhdnn
    from dhdnn.distributed import distribute

    os.environ["DHDNN_QUIET_GLOO"] = quiet
    topo = dhdnn.load_topology("topologies/ring8.yaml")
    distribute(dhdnn.build_network(topo, arch="H2", layers=2, h=0.1, n_outputs=2))
    names = {tid: Path(f"/proc/self/task/{tid}/comm").read_text().strip() for tid in os.listdir("/proc/self/task")}
    return [os.sched_getscheduler(int(t)) for t, n in names.items() if n.startswith(("gloo", "pt_gloo"))]
