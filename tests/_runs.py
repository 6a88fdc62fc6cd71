"""What the run-level tests share: a mixed-dims topology and its run config, a run's parameters
from its checkpoints, blockwise comparison."""
from __future__ import annotations

import torch
import yaml

from dhdnn import checkpoint as ckpt

# 9 agents of state dims 1-3, a ring with two chords, inputs into p and q, a partial readout
MIXED = {"name": "mixed9", "agents": [{"id": i, "dim": 1 + i % 3} for i in range(9)],
         "edges": [[0, 1], [1, 2], [2, 3], [3, 4], [4, 5], [5, 6], [6, 7], [7, 8], [8, 0], [0, 4], [2, 6]],
         "inputs": [{"feature": 0, "agent": 0, "part": "p"}, {"feature": 1, "agent": 4, "part": "q", "index": 1}],
         "readout": [0, 2, 4, 6, 8]}


def write_mixed_run(d, batch_size: int):
    """``d/run.yaml``: H2, 3 layers, float64, on ``d/mixed9.yaml``; returns its path."""
    (d / "mixed9.yaml").write_text(yaml.safe_dump(MIXED))
    cfg = d / "run.yaml"
    cfg.write_text("topology: mixed9.yaml\nmodel: {arch: H2, layers: 3, h: 0.4, init_std: 0.5}\n"
                   "data: {name: double_moons, n_samples: 400}\n"
                   f"train: {{batch_size: {batch_size}, lr: 0.02, alpha: 0.001}}\nrun: {{dtype: float64, progress: false}}\n")
    return cfg


def params_of(run, which: int = 0) -> dict:
    """Every block of the run's checkpoint ``which`` (0: newest, 1: the one before)."""
    return ckpt.assemble(ckpt.load(ckpt.complete(run)[which])[1])


def assert_same(a: dict, b: dict, tol: float = 1e-9) -> None:
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol, msg=k)
