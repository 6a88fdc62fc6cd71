"""Reversible backprop: gradient accuracy of the exact and float rebuilds, activation memory
and time per step against depth, and float drift.

  accuracy  random H2 networks (the issue's table: dim, layers, h), batch 256, a squared-norm
            loss: relative error of all parameter gradients against float64 autograd for float32
            autograd, the float32 float rebuild and the float32 exact (fixed-point) rebuild, with
            each rebuild's certificate (exact: every rebuilt state checked bit for bit).
  memory  H2, dim 64, batch 1024, depths 64 ... 4096, dense and 2 sharded workers (an 8-agent
          ring of 4 + 4 dims), autograd, exact reversible and float reversible. Every point runs in a fresh process:
          with parameters, gradients and Adam state allocated by a step at batch 8, one full
          forward + backward runs under torch's memory profiler: activation memory = the peak
          of live tensor bytes during it above those live before it, less the gradients it
          creates: what the backward keeps (including buffers the engine reuses between steps)
          and its temporaries, free of allocator caching and page-level noise.
          Time: two full training steps, in another fresh process (no profiler).
  drift   the relative error of rebuilt states y_j against the forward's, per layer, float32
          and float64, without anchors and with one every 64 layers (H2, dim 64, 4096 layers).

    python benchmarks/bench_reversible.py [accuracy memory drift]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from common import RESULTS, write_result

DEPTHS = (64, 256, 1024, 2048, 4096)
DIM, BATCH, H = 64, 1024, 0.05
RING = {"name": "ring8_d4", "generator": {"kind": "ring", "agents": 8}, "defaults": {"dim": 4}}


def _measure(step, what: str, opt) -> dict:
    """``memory``: the peak of live tensor bytes during one forward + backward at the full batch,
    above what was live before it (parameters, Adam state, and whatever buffers a step at batch 8
    left: buffers an engine keeps between steps are counted when they grow to the full batch),
    less the gradients the step creates. ``time``: the best of three training steps."""
    step(8, True)  # Adam's state, gradients
    if what == "memory":
        step(8, False)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            step(BATCH, False)
        # live tensor bytes over time: every op's own allocations minus frees, in order
        live = torch.tensor([e.self_cpu_memory_usage for e in sorted(prof.events(), key=lambda e: e.time_range.start)],
                            dtype=torch.float64).cumsum(0)
        grads = sum(p.grad.numel() * p.grad.element_size() for g in opt.param_groups for p in g["params"]
                    if p.grad is not None)
        # the previous step's gradients were allocated before the profile: their release is not
        # recorded, the new ones are; they are the step's output, not activations
        return {"activation_bytes": int(live.max()) - grads, "gradient_bytes": grads,
                "kept_after_bytes": int(live[-1]) - grads}
    times = []
    for _ in range(3):
        t = time.perf_counter()
        step(BATCH, True)
        times.append(time.perf_counter() - t)
    return {"step_s": min(times)}


def _stepper(eng, opt, x, y):
    """One training step at the first ``b`` samples (``optimise``: also the Adam update)."""
    def step(b, optimise):
        opt.zero_grad(set_to_none=True)
        eng.objective(x[:b], y[:b], 5e-4).objective.backward()
        eng.after_backward()
        if optimise:
            opt.step()
    return step


MODES = {"autograd": ("autograd", "fixed"), "exact": ("reversible", "fixed"), "float": ("reversible", "float")}


def _config(layers: int, mode: str):
    from dhdnn.config import load_config

    backprop, state = MODES[mode]
    return load_config(None, ["model.arch=H2", f"model.dim={DIM}", f"model.layers={layers}", f"model.h={H}",
                              "model.init_std=0.3", f"run.backprop={backprop}", f"run.reversible_state={state}",
                              "run.dtype=float32"])


def dense_child(layers: int, mode: str, what: str) -> dict:
    from dhdnn.build import build_classifier
    from dhdnn.engine import DenseEngine

    torch.set_num_threads(1)
    cfg = _config(layers, mode)
    model, _ = build_classifier(cfg, 2, 2)
    model.body.set_backprop(cfg.run.backprop, 0, cfg.run.reversible_state)
    eng = DenseEngine(model)
    opt = torch.optim.Adam(eng.optimizer_groups(0.0), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(BATCH, 2, generator=g), torch.randint(0, 2, (BATCH,), generator=g)

    return _measure(_stepper(eng, opt, x, y), what, opt)


def sharded_rank(rank, world, layers, mode, what):
    from dhdnn.data import Dataset
    from dhdnn.distributed.engine import build_sharded_engine
    from dhdnn.distributed.launch import quiet_transport_threads
    from dhdnn.distributed.mesh import ParallelDims, make_groups
    from dhdnn.topology import topology_from_dict

    torch.set_num_threads(1)
    cfg = _config(layers, mode)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(BATCH, 2, generator=g), torch.randint(0, 2, (BATCH,), generator=g)
    data = Dataset("synthetic", x, y, x, y, 2)
    eng = build_sharded_engine(cfg, data, make_groups(ParallelDims(world), rank), topology_from_dict(RING))
    quiet_transport_threads()
    opt = torch.optim.Adam(eng.optimizer_groups(0.0), lr=1e-4)

    return _measure(_stepper(eng, opt, x, y), what, opt)


def sharded_child(layers: int, mode: str, what: str) -> dict:
    from dhdnn.distributed.launch import run_local

    res = run_local(sharded_rank, 2, (layers, mode, what), timeout_s=600)
    return {k: max(r[k] for r in res) for k in res[0]}  # the worst rank


def _fresh(engine: str, layers: int, mode: str) -> dict:
    """Memory and time, each measured in a fresh process."""
    out = {}
    for what in ("memory", "time"):
        p = subprocess.run([sys.executable, __file__, "--child", engine, str(layers), mode, what], capture_output=True,
                           text=True, timeout=1800)
        if p.returncode:
            raise RuntimeError(p.stderr[-3000:])
        out.update(json.loads(p.stdout.strip().splitlines()[-1]))
    return out


def memory() -> list[dict]:
    print(f"\n[memory] H2, dim {DIM}, batch {BATCH}, float32; fresh process per point; MiB of activations "
          "(peak live tensor bytes of forward + backward above those before it), seconds per step; "
          "reversible = the exact (fixed-point) rebuild, float = the float rebuild")
    print(f"{'engine':9} {'layers':>6} {'autograd MiB':>12} {'exact MiB':>10} {'ratio':>6} "
          f"{'autograd s':>10} {'exact s':>8} {'float s':>8} {'exact/autograd':>14} {'exact/float':>11}")
    rows = []
    for engine in ("dense", "2 workers"):
        # (profiling the memory of 2 autograd workers at 4096 layers takes > 24 GiB: OOM-killed here)
        for layers in DEPTHS if engine == "dense" else [d for d in DEPTHS if d <= 2048]:
            kind = "dense" if engine == "dense" else "sharded"
            a, r = _fresh(kind, layers, "autograd"), _fresh(kind, layers, "exact")
            f = _fresh(kind, layers, "float")
            row = {"engine": engine, "layers": layers, "autograd": a, "reversible": r, "float": f,
                   "memory_ratio": r["activation_bytes"] / max(a["activation_bytes"], 1),
                   "time_ratio": r["step_s"] / a["step_s"], "exact_over_float": r["step_s"] / f["step_s"]}
            rows.append(row)
            print(f"{engine:9} {layers:>6} {a['activation_bytes'] / 2**20:>12.1f} {r['activation_bytes'] / 2**20:>10.1f} "
                  f"{row['memory_ratio']:>6.3f} {a['step_s']:>10.3f} {r['step_s']:>8.3f} {f['step_s']:>8.3f} "
                  f"{row['time_ratio']:>14.2f} {row['exact_over_float']:>11.2f}", flush=True)
    for engine in ("dense", "2 workers"):
        rev = [r["reversible"]["activation_bytes"] for r in rows if r["engine"] == engine and r["layers"] >= 256]
        at2048 = next(r for r in rows if r["engine"] == engine and r["layers"] == 2048)
        worst = max(r["exact_over_float"] for r in rows if r["engine"] == engine)
        print(f"  {engine}: at 2048 layers exact-reversible/autograd activations {at2048['memory_ratio']:.3f} "
              f"(target <= 0.1); exact peak from 256 layers on: max/min {max(rev) / max(min(rev), 1):.2f}; exact/float "
              f"time at most {worst:.2f}x (target <= 1.3)")
    _plot(rows)
    return rows


ACCURACY_ROWS = [(16, 64, 0.1), (8, 200, 0.032), (64, 1024, 0.00625), (64, 4096, 0.0015625), (8, 200, 0.3)]


def accuracy() -> list[dict]:
    """The issue's table with exact mode as a third column (float32; errors against float64 autograd)."""
    from dhdnn.analysis import reversible_report

    print("\n[accuracy] relative error of all parameter gradients against float64 autograd (H2, default init, "
          "batch 256, loss ||y_L||^2 / 2), float32")
    print(f"{'dim':>4} {'layers':>6} {'h':>10} {'autograd':>10} {'float rev.':>11} {'exact rev.':>11} "
          f"{'exact/autograd':>14} {'float drift':>11} {'certificate':>12}")
    rows = []
    for dim, layers, h in ACCURACY_ROWS:
        r = reversible_report(dim, layers, h, torch.float32, 256, 0)
        r["chaotic"] = layers * h > 20  # T = 60: float32 is meaningless either way
        r["exact_over_autograd"] = r["exact_grad_error"] / r["autograd_grad_error"]
        rows.append(r)
        print(f"{dim:>4} {layers:>6} {h:>10g} {r['autograd_grad_error']:>10.2e} {r['float_grad_error']:>11.2e} "
              f"{r['exact_grad_error']:>11.2e} {r['exact_over_autograd']:>14.2f} {r['float_drift']:>11.2e} "
              f"{'bit-exact':>12}", flush=True)
    worst = max(r["exact_over_autograd"] for r in rows if not r["chaotic"])
    print(f"  non-chaotic rows: exact reversible's error is at most {worst:.2f}x float32 autograd's (target <= 1.5)")
    return rows


def _plot(rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for engine, ls in (("dense", "-"), ("2 workers", "--")):
        sel = [r for r in rows if r["engine"] == engine]
        d = [r["layers"] for r in sel]
        for mode, c in (("autograd", "#d62728"), ("reversible", "#1f77b4"), ("float", "#2ca02c")):
            name = {"reversible": "exact reversible", "float": "float reversible"}.get(mode, mode)
            a1.plot(d, [r[mode]["activation_bytes"] / 2**20 for r in sel], ls, color=c, marker="o",
                    label=f"{name}, {engine}")
            a2.plot(d, [r[mode]["step_s"] for r in sel], ls, color=c, marker="o", label=f"{name}, {engine}")
    a1.set(xscale="log", yscale="log", xlabel="layers", ylabel="activation memory per rank (MiB)",
           title="activation memory")
    a2.set(xscale="log", yscale="log", xlabel="layers", ylabel="seconds per training step", title="time per step")
    a1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "reversible_memory.png", dpi=110)
    plt.close(fig)


def drift() -> list[dict]:
    from dhdnn.analysis import reconstruction_drift
    from dhdnn.models import build_model

    print("\n[drift] relative error of rebuilt y_j (H2, dim 64, 4096 layers, h 0.05, batch 256), "
          "by distance from the top")
    rows, marks = [], (16, 64, 256, 1024, 4096)
    print(f"{'dtype':8} {'anchors':>7} " + " ".join(f"{f'<= {m}':>10}" for m in marks))
    for dtype in (torch.float32, torch.float64):
        torch.manual_seed(0)
        model = build_model("H2", DIM, 4096, H, init_std=0.3).to(dtype)
        y0 = torch.randn(256, DIM, dtype=dtype)
        for anchors in (0, 64):
            d = reconstruction_drift(model, y0, anchors)
            L = len(d) - 1
            worst = [max(d[L - m:]) for m in marks]
            rows.append({"dtype": str(dtype).split(".")[-1], "anchor_every": anchors, "per_layer": d,
                         "worst_within": dict(zip(marks, worst))})
            print(f"{rows[-1]['dtype']:8} {anchors:>7} " + " ".join(f"{w:>10.2e}" for w in worst), flush=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        d = r["per_layer"]
        ax.plot(range(len(d) - 1, -1, -1), [max(v, 1e-18) for v in d], label=f"{r['dtype']}, anchors {r['anchor_every']}")
    ax.set(yscale="log", xlabel="layers below the top (rebuilt from y_L)", ylabel="relative error of rebuilt y_j",
           title="reversible rebuild drift")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "reversible_drift.png", dpi=110)
    plt.close(fig)
    for r in rows:
        r["per_layer"] = r["per_layer"][::64]  # keep the JSON small
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("parts", nargs="*", default=["accuracy", "memory", "drift"])
    ap.add_argument("--child", nargs=4, metavar=("ENGINE", "LAYERS", "MODE", "WHAT"))
    args = ap.parse_args()
    if args.child:
        engine, layers, mode, what = args.child
        fn = dense_child if engine == "dense" else sharded_child
        print(json.dumps(fn(int(layers), mode, what)))
        return
    results = {p: globals()[p]() for p in args.parts}
    print(f"wrote {write_result('reversible' if len(args.parts) == 3 else 'reversible_' + '_'.join(args.parts), results)}")


if __name__ == "__main__":
    main()
