"""Elastic restarts, repeated: torchrun through ``launch/torchrun_multi_node.sh`` (one node, 2
workers, ``MAX_RESTARTS=1``), a worker SIGKILLed after the first checkpoint, N times. Every try
must resume from the checkpoint, finish, and end with the parameters of an uninterrupted run.

    python benchmarks/stress_torchrun_restart.py [--tries 20]
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import ROOT, RESULTS, write_result

ARGS = ["--no-progress", "--set", "data.n_samples=400", "--set", "train.epochs=3", "--set", "train.batch_size=50",
        "--set", "model.layers=3", "--set", "run.dtype=float64"]


def env(**extra):
    return dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
                PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", **extra)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def params(run: Path) -> dict:
    sys.path.insert(0, str(ROOT))
    from dhdnn import checkpoint as ckpt

    return ckpt.assemble(ckpt.load(ckpt.latest(run))[1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tries", type=int, default=20)
    args = ap.parse_args()
    lines, ok = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        ref = Path(tmp) / "reference"
        p = subprocess.run([sys.executable, "-m", "dhdnn", "train", "launch/ring8_swiss_roll.yaml", "--workers", "2",
                            "--out", str(ref), *ARGS], cwd=ROOT, capture_output=True, text=True, env=env(), timeout=600)
        assert p.returncode == 0, p.stderr
        want = params(ref)
        for t in range(args.tries):
            out, port = Path(tmp) / f"try{t}", free_port()
            start = time.perf_counter()
            p = subprocess.run(["bash", "launch/torchrun_multi_node.sh", "launch/ring8_swiss_roll.yaml", "--out", str(out),
                                *ARGS], cwd=ROOT, capture_output=True, text=True, timeout=600,
                               env=env(MAX_RESTARTS="1", NNODES="1", NPROC="2", RDZV=f"127.0.0.1:{port}",
                                       RDZV_ID=f"stress{t}", DHDNN_FAULT="1:6:kill:0"))
            seconds = time.perf_counter() - start
            killed = "exitcode: -9" in p.stderr
            same = p.returncode == 0 and all(torch.allclose(a, b, rtol=1e-9, atol=1e-9)
                                            for a, b in zip(params(out).values(), want.values()))
            ok += same and killed
            line = (f"try {t + 1:2}: exit {p.returncode}, worker killed: {killed}, resumed and equal to the "
                    f"uninterrupted run: {same}, {seconds:.1f} s")
            print(line, flush=True)
            lines.append(line)
    summary = f"{ok} of {args.tries} tries restarted, resumed and matched the uninterrupted run"
    print(summary)
    (RESULTS / "torchrun_restart_stress.txt").write_text("\n".join(lines + [summary]) + "\n")
    print(f"wrote {write_result('torchrun_restart_stress', {'tries': args.tries, 'ok': ok, 'lines': lines})}")


if __name__ == "__main__":
    main()
