"""The image network computes what the landed commit's did: ``launch/mnist_conv_H2.yaml``'s network
trained in float64 for 20 Adam steps on small 28x28 IDX files written here, by the landed commit
616986c (a git worktree) and by this code: the largest relative difference of any parameter
tensor. The pixels are 0 or 255, exactly representable in float32: this code keeps images as
float32 (a quarter of the memory), so other pixel values differ from the landed float64 images by
float32's rounding, which Adam's first steps amplify in near-zero gradients.

    python benchmarks/same_as_landed.py
"""
from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from common import ROOT, landed_worktree, write_result
from dhdnn import checkpoint as ckpt

def write_idx(path: Path, arr: np.ndarray) -> None:
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes())


def main():
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        d = tmp / "data"
        d.mkdir()
        rng = np.random.default_rng(1)
        for split, n in (("train", 200), ("t10k", 50)):
            labels = rng.integers(0, 10, n).astype(np.uint8)
            images = ((rng.random((n, 28, 28)) > 0.8) * 255).astype(np.uint8)
            for i, c in enumerate(labels):
                images[i, 2 + 2 * c, 4:24] = 255
            write_idx(d / f"{split}-images-idx3-ubyte.gz", images)
            write_idx(d / f"{split}-labels-idx1-ubyte.gz", labels)
        params = {}
        with landed_worktree() as wt:
            for name, root in (("landed", wt), ("this code", ROOT)):
                out = tmp / name.replace(" ", "_")
                cmd = [sys.executable, "-m", "dhdnn", "train", str(root / "launch/mnist_conv_H2.yaml"), "--no-progress",
                       "--out", str(out), *(a for s in (f"data.path={d}", "train.epochs=2", "train.batch_size=20",
                                                        "run.dtype=float64") for a in ("--set", s))]
                # (python -m puts the working directory first on sys.path: each checkout from its own)
                p = subprocess.run(cmd, cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True,
                                   text=True)
                if p.returncode:
                    raise RuntimeError(p.stderr[-2000:])
                params[name] = ckpt.assemble(ckpt.load(ckpt.latest(out))[1])
    a, b = params["landed"], params["this code"]
    rel = {k: float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-30)) for k in a}
    for k, v in rel.items():
        print(f"{k:16} {v:.2e}")
    print(f"largest relative difference after 20 float64 Adam steps: {max(rel.values()):.2e}")
    print(f"wrote {write_result('same_as_landed', {'relative_difference': rel})}")


if __name__ == "__main__":
    main()
