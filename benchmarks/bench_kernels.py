"""Block-sparse layers at small blocks: dhdnn's local kernels against two peers written here, the
same network and the same training step, side by side in one run (one thread, float32).

Cases (H2, 4 layers, batch 128, a full step: forward, backward, Adam; one rank holding every agent):
grids of 64 x 64 agents with 4 + 4, 8 + 8 and 16 + 16 state entries (blocks of 4x4, 8x8, 16x16), a
ring of 65,536 agents with 1 + 1 (1x1 blocks), and the large-block reference: an 8 x 8 grid with
64 + 64 (64x64 blocks). Implementations:

  dhdnn (this code)  ``run.local_kernel`` auto, blocks, diagonal (and dense where it fits)
  dhdnn (landed)     the landed commit 616986c's engine (a git worktree), auto and blocks
  torch.sparse COO   per layer a COO matrix whose values are the parameters; autograd
  gather/bmm         gather the neighbours' rows, one batched product per block class, ``index_add_``
                     back (the message-passing style of graph libraries); autograd

Every implementation starts from the same per-agent blocks (and a random readout), and its loss
at the first step is checked against dhdnn's. GFLOP/s counts the block products only: six per
half-step (two forward, four backward) of 2 x entries x batch each.

    python benchmarks/bench_kernels.py [--cases grid4 grid8 grid16 ring1 large] [--steps 5]
    python benchmarks/bench_kernels.py --device cuda --no-landed       # on a GPU (results in kernels_cuda.json)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import ROOT, landed_worktree, write_result

CASES = {"grid4": ({"kind": "grid", "rows": 64, "cols": 64}, 4), "grid8": ({"kind": "grid", "rows": 64, "cols": 64}, 8),
         "grid16": ({"kind": "grid", "rows": 64, "cols": 64}, 16), "ring1": ({"kind": "ring", "agents": 65536}, 1),
         "large": ({"kind": "grid", "rows": 8, "cols": 8}, 64)}
LAYERS, BATCH, H = 4, 128, 0.1


def network(case: str):
    """The case's topology, data, block table and initial blocks (a random readout)."""
    from dhdnn.blocks import BlockTable, init_packed
    from dhdnn.data import Dataset
    from dhdnn.models import ARCHITECTURES
    from dhdnn.topology import topology_from_dict

    gen, dim = CASES[case]
    topo = topology_from_dict({"name": case, "generator": gen, "defaults": {"dim": dim}})
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(BATCH, 2, generator=g), torch.randint(0, 2, (BATCH,), generator=g)
    data = Dataset("synthetic", x, y, x, y, 2)
    table = BlockTable(topo, ARCHITECTURES["H2"].agent_layout(), LAYERS, 2)
    packed = init_packed(table, 0, 0.3)
    for k in packed:
        if k.startswith(("W/", "mu")):
            packed[k] = 0.1 * torch.randn(packed[k].shape, generator=g)
    return topo, data, table, packed


def flops(table) -> float:
    entries = sum(len(c) * c.shape[0] * c.shape[1] for c in table if c.kind in ("K_p", "K_q")) / 2
    return 6 * 2 * LAYERS * 2 * entries * BATCH


SLOW_S = 20.0  # a first step slower than this is timed once more only (torch.sparse takes minutes)


def time_steps(step, steps: int) -> tuple[float, float]:
    t = time.perf_counter()
    loss = step()
    if time.perf_counter() - t > SLOW_S:
        steps = 1
    else:
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2], loss


# ---- children: one implementation of one case each, in a fresh process ------------------------------
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def child_dhdnn(case: str, kernel: str, steps: int, device: str = "cpu") -> dict:
    import torch.distributed as dist

    from dhdnn.config import load_config
    from dhdnn.distributed.engine import build_sharded_engine
    from dhdnn.distributed.mesh import ParallelDims, make_groups

    topo, data, table, packed = network(case)
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                store=dist.FileStore(f"{d}/store", 1), rank=0, world_size=1)
        cfg = load_config(None, ["model.arch=H2", f"model.layers={LAYERS}", f"model.h={H}", "run.dtype=float32",
                                 f"run.local_kernel={kernel}", "model.init_std=0.3", f"run.device={device}"])
        engine = build_sharded_engine(cfg, data, make_groups(ParallelDims(1), 0, device), topo, device=device)
        with torch.no_grad():
            for e in engine.entries():
                v = packed[e.key]
                e.put(list(e.params), v if e.ids is None else v.index_select(e.block_axis, e.ids))
        opt = torch.optim.Adam(engine.optimizer_groups(0.0), lr=1e-3)
        x, y = data.x_train, data.y_train

        def step():
            opt.zero_grad()
            out = engine.objective(x, y, 0.0)
            out.objective.backward()
            engine.after_backward()
            opt.step()
            _sync(device)
            return float(out.stats[0] / out.stats[2])
        seconds, loss = time_steps(step, steps)
        kernel = engine.net.local_kernel
        dist.destroy_process_group()
    return {"seconds": seconds, "loss": loss, "kernel": kernel}


class Peer(torch.nn.Module):
    """The same H2 network on feature-major fields, products by a peer method, autograd backward."""

    def __init__(self, topo, table, packed, method: str):
        super().__init__()
        self.method, self.topo = method, topo
        n = topo.dims
        self.start = torch.as_tensor(topo.offsets)
        self.F = int(n.sum())
        self.K, self.rows, self.cols, self.coo = {}, {}, {}, {}
        for kind in ("K_p", "K_q"):
            cls = [c for c in table if c.kind == kind]
            assert len(cls) == 1, "uniform agent dims"
            c = cls[0]
            r = c.shape[0]
            self.K[kind] = torch.nn.Parameter(packed[c.key].clone())  # (L, nb, r, r)
            self.rows[kind] = (self.start[c.rows][:, None] + torch.arange(r)).reshape(-1)
            self.cols[kind] = (self.start[c.cols][:, None] + torch.arange(r)).reshape(-1)
            ri = self.rows[kind].view(-1, r)[:, :, None].expand(-1, r, r).reshape(-1)
            ci = self.cols[kind].view(-1, r)[:, None, :].expand(-1, r, r).reshape(-1)
            self.coo[kind] = (torch.stack([ri, ci]), torch.stack([ci, ri]))
        self.r = r
        self.b = {k: torch.nn.Parameter(packed[f"{k}/{r}"].reshape(LAYERS, -1).clone()) for k in ("b_p", "b_q")}
        for name, p in [*self.K.items(), *self.b.items()]:
            self.register_parameter(name, p)
        readout = [c for c in table if c.kind == "W"][0]
        self.W = torch.nn.Parameter(packed[readout.key].clone())  # (agents, classes, 2r)
        self.mu = torch.nn.Parameter(packed["mu/2"].reshape(-1).clone())

    def product(self, kind, j, x, transpose):
        if self.method == "coo":
            idx = self.coo[kind][1 if transpose else 0]
            A = torch.sparse_coo_tensor(idx, self.K[kind][j].reshape(-1), (self.F, self.F))
            return torch.sparse.mm(A, x)
        W = self.K[kind][j]
        src, dst = (self.rows[kind], self.cols[kind]) if transpose else (self.cols[kind], self.rows[kind])
        xs = x.index_select(0, src).view(-1, self.r, x.shape[1])
        y = torch.bmm(W.transpose(1, 2) if transpose else W, xs)
        return torch.zeros_like(x).index_add(0, dst, y.view(-1, x.shape[1]))

    def forward(self, x):
        B = x.shape[0]
        p = x.new_zeros(self.F, B)
        p = p.index_put((self.start[:2],), x.T)  # feature f enters p of agent f
        q = x.new_zeros(self.F, B)
        for j in range(LAYERS):
            s = torch.tanh(self.product("K_q", j, q, False) + self.b["b_q"][j][:, None])
            p = p - H * self.product("K_q", j, s, True)
            t = torch.tanh(self.product("K_p", j, p, False) + self.b["b_p"][j][:, None])
            q = q + H * self.product("K_p", j, t, True)
        A, r = self.topo.n_agents, self.r
        y = torch.cat([p.view(A, r, B), q.view(A, r, B)], 1)  # (agents, 2r, B): (p^[i], q^[i])
        return torch.einsum("ack,akb->bc", self.W, y) + self.mu


def child_peer(case: str, method: str, steps: int, device: str = "cpu") -> dict:
    topo, data, table, packed = network(case)
    model = Peer(topo, table, packed, method).to(device)
    for k in ("K_p", "K_q"):
        model.rows[k], model.cols[k] = model.rows[k].to(device), model.cols[k].to(device)
        model.coo[k] = tuple(t.to(device) for t in model.coo[k])
    model.start = model.start.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = data.x_train.to(device), data.y_train.to(device)

    def step():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        _sync(device)
        return float(loss)
    seconds, loss = time_steps(step, steps)
    return {"seconds": seconds, "loss": loss}


def child(args) -> None:
    torch.set_num_threads(1)
    impl, case, steps = args.child, args.case, args.steps
    try:
        out = child_peer(case, impl, steps, args.device) if impl in ("coo", "bmm") else \
            child_dhdnn(case, impl, steps, args.device)
    except Exception as e:  # e.g. out of memory, or an operation without a backward
        out = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    print(json.dumps(out))


# ---- the parent -------------------------------------------------------------------------------
def spawn(impl: str, case: str, steps: int, pythonpath: str | None = None, device: str = "cpu") -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"PYTHONPATH": pythonpath} if pythonpath else {})}
    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", impl, "--case", case, "--steps",
                        str(steps), "--device", device], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=3600)
    if p.returncode:
        return {"error": (p.stderr.strip().splitlines() or ["killed"])[-1][:200]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--peers", nargs="*", default=["bmm", "coo"])
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (one GPU, one rank)")
    ap.add_argument("--no-landed", action="store_true", help="skip the landed commit (no git checkout at hand)")
    ap.add_argument("--landed", default="1824fcf", help="the commit compared against (the fused kernel's baseline)")
    ap.add_argument("--child")
    ap.add_argument("--case")
    args = ap.parse_args()
    if args.child:
        return child(args)
    rows = []
    with landed_worktree(not args.no_landed, args.landed) as wt:
        for case in args.cases:
            topo, _, table, _ = network(case)
            fl = flops(table)
            impls = [("dhdnn", k, None) for k in ("auto", "fused", "blocks", "diagonal")]
            impls += [("dhdnn (landed)", k, str(wt)) for k in ("auto", "blocks")]
            impls += [("peer", m, None) for m in args.peers]
            if case == "large":
                impls = [("dhdnn", "auto", None), ("dhdnn", "fused", None), ("dhdnn", "blocks", None),
                         ("dhdnn (landed)", "auto", str(wt))]
            if args.no_landed:
                impls = [i for i in impls if i[0] != "dhdnn (landed)"]
            if args.device != "cpu":  # the fused kernel is numba on the CPU: the config refuses it elsewhere
                impls = [i for i in impls if i[1] != "fused"]
            for who, impl, path in impls:
                r = spawn(impl, case, args.steps, path, args.device)
                row = {"case": case, "implementation": who, "variant": impl, **r,
                       "gflop_per_step": fl / 1e9}
                if "seconds" in r:
                    row["gflops"] = fl / r["seconds"] / 1e9
                rows.append(row)
                print(json.dumps(row), flush=True)
    report(rows)
    name = "kernels" if args.device == "cpu" else f"kernels_{args.device.split(':')[0]}"
    print(f"wrote {write_result(name, {'device': args.device, 'layers': LAYERS, 'batch': BATCH, 'rows': rows})}")


def report(rows: list[dict]) -> None:
    print("\n| case | implementation | ms per step | GFLOP/s | loss at step 0 |\n|---|---|---|---|---|")
    for r in rows:
        kern = f" ({r['kernel']})" if r.get("kernel") and r["kernel"] != r["variant"] else ""
        if "seconds" in r:
            print(f"| {r['case']} | {r['implementation']} {r['variant']}{kern} | {1000 * r['seconds']:,.1f} | "
                  f"{r['gflops']:.1f} | {r['loss']:.6f} |")
        else:
            print(f"| {r['case']} | {r['implementation']} {r['variant']} | – | – | {r.get('error', '')} |")
    by = {(r["case"], r["implementation"], r["variant"]): r for r in rows if "seconds" in r}
    large = by.get(("large", "dhdnn", "auto"))
    for case in sorted({r["case"] for r in rows} - {"large"}):
        ours, old = by.get((case, "dhdnn", "auto")), by.get((case, "dhdnn (landed)", "auto"))
        if ours and old:
            extra = f", {ours['gflops'] / large['gflops']:.2f}x the large-block rate" if large else ""
            print(f"{case}: auto {old['seconds'] / ours['seconds']:.2f}x the landed commit's auto{extra}")


if __name__ == "__main__":
    main()
