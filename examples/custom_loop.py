"""Your own training loop on the distributed network, under torchrun.

    torchrun --standalone --nproc-per-node 2 examples/custom_loop.py
    torchrun --standalone --nproc-per-node 4 examples/custom_loop.py --replicas 2 --save runs/custom_loop

Every rank runs this same script: it builds the dense network from a topology, wraps it with
``distribute`` (each rank keeps its agents), and trains with a plain ``torch.optim`` loop. The
logits come back on every rank, so the loss is written once, as in one process. ``--save``
writes the shards; ``dhdnn.load_exported(DIR)`` loads them as one dense model, in one process.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import dhdnn
from dhdnn.distributed import distribute

ROOT = Path(__file__).resolve().parent.parent


def make_model(dtype=torch.float32, topology=ROOT / "topologies" / "mixed9.yaml"):
    """The network: H2 on a 9-agent graph whose agents have 1-3 state entries each."""
    topo = dhdnn.load_topology(topology)
    return dhdnn.build_network(topo, arch="H2", layers=4, h=0.4, n_features=2, n_outputs=2, init_std=0.5,
                               seed=0, dtype=dtype)


def batches(n_samples: int, batch: int, steps: int, seed: int = 0):
    """The indices of every step's global batch: the same on every rank (a seeded generator)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.cat([torch.randperm(n_samples, generator=g) for _ in range(-(-steps * batch // n_samples))])
    return [perm[i * batch:(i + 1) * batch] for i in range(steps)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--alpha", type=float, default=1e-3, help="smoothness regulariser across depth")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--replicas", type=int, default=1, help="data-parallel copies of the agent partitions")
    ap.add_argument("--save", help="checkpoint directory (shards of every rank; load with dhdnn.load_exported)")
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --save")
    ap.add_argument("--trace", help="directory for trace-rank<R>.jsonl: every message sent")
    ap.add_argument("--logits", help="write the trained network's test logits here (from rank 0)")
    args = ap.parse_args(argv)

    dist.init_process_group("gloo")  # torchrun's environment: RANK, WORLD_SIZE, MASTER_ADDR
    dtype = getattr(torch, args.dtype)
    data = dhdnn.load_dataset("double_moons", n_samples=2000, seed=0).to(dtype)
    net = distribute(make_model(dtype), replicas=args.replicas, trace=args.trace)
    opt = torch.optim.Adam(net.param_groups(weight_decay=1e-3), lr=args.lr)
    start = net.load(args.save, opt)["step"] if args.resume else 0  # any worker count may have saved it
    for step, idx in enumerate(batches(len(data.x_train), args.batch, args.steps)):
        if step < start:
            continue
        opt.zero_grad()
        out = net(data.x_train[idx])  # this replica's logits, on every rank
        loss = F.cross_entropy(out, net.local(data.y_train[idx])) + net.regularizer(args.alpha)
        loss.backward()  # neighbour messages only; replica gradients averaged when it ends
        opt.step()
        if net.is_main and (step % 50 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {loss.item():.4f}", flush=True)
    with torch.no_grad():
        logits = net(data.x_test)
        correct = net.replica_sum((logits.argmax(1) == net.local(data.y_test)).sum())  # each replica: its slice
    if net.is_main:
        print(f"test accuracy {correct.item() / len(data.y_test):.4f} on {dist.get_world_size()} ranks "
              f"({net.groups.dims.agents} agent partitions x {net.replicas} replicas)")
    if args.save:
        net.save(args.save, opt)
    if args.logits and net.is_main:
        torch.save(logits, args.logits)
    net.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
