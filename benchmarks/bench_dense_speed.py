"""Forward+backward samples/s of dense H1 and H2 on one thread, against a straightforward
baseline written here: a per-layer loop that slices an ``(n, n, L)`` parameter and multiplies
the mask every layer, as the authors' public code does. Both run side by side in one process.

    python benchmarks/bench_dense_speed.py [--repeat 20]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from common import timeit, write_result
from dhdnn import build_model

CONFIGS = [(16, 64, 125), (512, 16, 1024)]


class BaselineH1(torch.nn.Module):
    def __init__(self, n, L, h):
        super().__init__()
        self.K = torch.nn.Parameter(torch.randn(n, n, L) / n ** 0.5)
        self.b = torch.nn.Parameter(torch.randn(n, 1, L))
        m = n // 2
        J = torch.zeros(n, n)
        J[:m, m:], J[m:, :m] = torch.eye(m), -torch.eye(m)
        self.register_buffer("J", J)
        self.register_buffer("mask", torch.ones(n, n))
        self.L, self.h = L, h

    def forward(self, y):
        for j in range(self.L):
            K = self.K[:, :, j] * self.mask
            y = y + self.h * F.linear(torch.tanh(F.linear(y, K, self.b[:, 0, j])), self.J @ K.T)
        return y


class BaselineH2(torch.nn.Module):
    """One (n, n, L) tensor holding blkdiag(K_p, K_q), masked and sliced in every layer."""

    def __init__(self, n, L, h):
        super().__init__()
        m = n // 2
        mask = torch.zeros(n, n)
        mask[:m, :m] = mask[m:, m:] = 1
        self.register_buffer("mask", mask)
        self.K = torch.nn.Parameter(torch.randn(n, n, L) / n ** 0.5 * mask[:, :, None])
        self.b = torch.nn.Parameter(torch.randn(n, 1, L))
        self.L, self.h, self.m = L, h, m

    def forward(self, y):
        m = self.m
        p, q = y[:, :m], y[:, m:]
        for j in range(self.L):
            K = self.K[:, :, j] * self.mask
            Kq, Kp = K[m:, m:], K[:m, :m]
            p = p - self.h * F.linear(torch.tanh(F.linear(q, Kq, self.b[m:, 0, j])), Kq.T)
            q = q + self.h * F.linear(torch.tanh(F.linear(p, Kp, self.b[:m, 0, j])), Kp.T)
        return torch.cat([p, q], 1)


def fwd_bwd(model, y):
    def run():
        model.zero_grad(set_to_none=True)
        model(y).square().mean().backward()
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = []
    print(f"{'arch':5} {'dim':>4} {'layers':>6} {'batch':>5} {'dhdnn samples/s':>16} {'baseline samples/s':>19} {'speed-up':>9}")
    for n, L, B in CONFIGS:
        y = torch.randn(B, n)
        for arch, base_cls in (("H1", BaselineH1), ("H2", BaselineH2)):
            ours = build_model(arch, n, L, 0.1, init_std=n ** -0.5)
            base = base_cls(n, L, 0.1)
            reps = args.repeat if n < 100 else max(3, args.repeat // 4)
            # interleave the two measurements so machine noise hits both alike
            t_ours, t_base = [], []
            for _ in range(3):
                t_ours.append(timeit(fwd_bwd(ours, y), reps))
                t_base.append(timeit(fwd_bwd(base, y), reps))
            to, tb = min(t_ours), min(t_base)
            row = {"arch": arch, "dim": n, "layers": L, "batch": B, "dhdnn_samples_per_s": B / to,
                   "baseline_samples_per_s": B / tb, "speedup": tb / to}
            rows.append(row)
            print(f"{arch:5} {n:>4} {L:>6} {B:>5} {B / to:>16.0f} {B / tb:>19.0f} {tb / to:>8.2f}x")
    path = write_result("dense_speed", {"threads": 1, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
