"""Write the data files of the npz and csv examples (three Gaussian blobs, four features).

    python examples/files/make_files.py
    dhdnn train examples/files/npz.yaml
    dhdnn train examples/files/csv.yaml --workers 2

``blobs.npz`` holds ``x_train, y_train, x_test, y_test``; ``blobs.csv`` has a header line
``f0,f1,f2,f3,label`` and no test split (the run draws one, ``data.train_fraction``).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0, 1.0, -1.0], [2.0, 0.5, -1.0, 0.0], [0.5, 2.0, 0.0, 1.5]])
    y = rng.integers(0, 3, n)
    return (centres[y] + 0.6 * rng.standard_normal((n, 4))).astype(np.float32), y


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    x, y = blobs(1200, 0)
    xt, yt = blobs(400, 1)
    np.savez(out / "blobs.npz", x_train=x, y_train=y, x_test=xt, y_test=yt)
    rows = np.concatenate([x, y[:, None].astype(np.float32)], 1)
    np.savetxt(out / "blobs.csv", rows, delimiter=",", header="f0,f1,f2,f3,label", comments="", fmt="%.6g")
    print(f"wrote {out / 'blobs.npz'} and {out / 'blobs.csv'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "data")
