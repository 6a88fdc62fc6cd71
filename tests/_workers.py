"""Worker functions run in spawned gloo processes by the distributed tests.

Each spawn checks many things at once (exactness, locality, adjoint, training) to keep
the number of process launches, and so CI time, small."""
from __future__ import annotations

import torch
import torch.distributed as dist

from dhdnn.config import load_config
from dhdnn.data import Dataset
from dhdnn.distributed.exchange import Exchanger, gather, scatter_add
from dhdnn.distributed.sharded import build_sharded_engine

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


def make_data(n_features: int, n_classes: int, batch: int, seed: int) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n_features, generator=g, dtype=torch.float64)
    y = torch.randint(0, n_classes, (batch,), generator=g)
    return Dataset("random", x, y, x, y, n_classes)


def cfg_for(topo_path, arch: str, layers: int, out_dir: str, readout: str = "tree", trace: bool = True,
            kernel: str = "blocks"):
    cfg = load_config(None, [f"model.arch={arch}", f"model.layers={layers}", "model.h=0.3", f"run.local_kernel={kernel}",
                             "run.dtype=float64", f"run.out_dir={out_dir}", f"run.readout={readout}",
                             f"run.trace={'true' if trace else 'false'}", "train.alpha=0.01",
                             "train.weight_decay=0.001", "train.lr=0.01"])
    cfg.topology = topo_path
    return cfg


def load_blocks(engine, blocks):
    with torch.no_grad():
        for name, p, idx in engine.named_blocks():
            p[idx] = blocks[name]


def exactness_worker(rank, world, topo_path, arch, layers, blocks, data, out_dir, readout, steps, kernel="blocks",
                     device="cpu"):
    """One forward/backward + checks, then ``steps`` Adam steps; returns what the parent compares."""
    cfg = cfg_for(topo_path, arch, layers, out_dir, readout, kernel=kernel)
    engine = build_sharded_engine(cfg, data, rank, world, device=device)
    load_blocks(engine, blocks)
    x, y = data.x_train, data.y_train
    with NoCollectives() if readout == "tree" else _Null():
        out = engine.objective(x, y, cfg.train.alpha)
        out.objective.backward()
    grads = {name: p.grad[idx].clone() for name, p, idx in engine.named_blocks()}
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
        lhs = (gather(xr, ex) * hr).sum()  # <G x, y>
        rhs = (xr * scatter_add(torch.zeros_like(xr), hr, ex)).sum()  # <x, G^T y>
    # training steps with the same optimiser the trainer uses
    opt = torch.optim.Adam(engine.optimizer_groups(cfg.train.weight_decay), lr=cfg.train.lr)
    load_blocks(engine, blocks)
    for _ in range(steps):
        opt.zero_grad()
        engine.objective(x, y, cfg.train.alpha).objective.backward()
        opt.step()
    final = {name: p.detach()[idx].clone() for name, p, idx in engine.named_blocks()}
    sums = engine.reduce_sum(torch.stack([lhs, rhs]).detach().cpu())
    cpu = lambda d: {k: v.cpu() for k, v in d.items()}  # noqa: E731
    return {"rank": rank, "logits": None if logits is None else logits.cpu(), "objective": out.objective.detach().cpu(),
            "stats": out.stats, "grads": cpu(grads), "records": records, "adjoint": sums, "final": cpu(final)}


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
