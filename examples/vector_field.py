"""A regression problem as a data factory: learn the vector field of a damped pendulum.

    dhdnn train examples/vector_field.yaml                 # one process
    dhdnn train examples/vector_field.yaml --workers 2     # the ring's agents on 2 workers

``pendulum`` samples states ``(theta, omega)`` and returns the time derivative
``(omega, -sin(theta) - damping * omega)`` as a 2-wide regression target; the config names it
as ``data.factory: "vector_field:pendulum"`` (looked up beside the config).
"""
from __future__ import annotations

import numpy as np


def pendulum(n_samples: int = 4000, seed: int = 0, damping: float = 0.2, test_fraction: float = 0.25) -> dict:
    rng = np.random.default_rng(seed)
    x = np.stack([rng.uniform(-np.pi, np.pi, n_samples), rng.uniform(-2.0, 2.0, n_samples)], 1)
    f = np.stack([x[:, 1], -np.sin(x[:, 0]) - damping * x[:, 1]], 1)
    n_test = int(round(test_fraction * n_samples))
    return {"x_train": x[n_test:], "y_train": f[n_test:], "x_test": x[:n_test], "y_test": f[:n_test]}
