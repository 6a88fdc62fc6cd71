"""Prove locality and exactness of your own network in your CI: copy this file into your tests.

``dhdnn verify`` as a pytest test: your run config (topology, architecture, data, backprop) is
trained a few steps in float64 in one process and sharded on each worker count with every
message traced; the test fails naming the first check that does not hold (a message to a rank
without adjacent agents, bytes off the halo plan, a parameter or logit off the one-process
network, a weight outside the graph's blocks, a gradient reduction outside a replica group).

    pytest examples/test_my_topology.py          # CPU, gloo, local processes; ~20 s on 2 cores
"""
from pathlib import Path

import pytest

from dhdnn.testing import verify

CONFIG = Path(__file__).resolve().parent.parent / "launch" / "ring8_swiss_roll.yaml"  # <- your run config


@pytest.mark.parametrize("replicas,workers", [(1, [2, 3]), (2, [4])])
def test_my_network_is_local_and_exact(replicas, workers):
    report = verify(CONFIG, workers=workers, steps=2, replicas=replicas)
    report.raise_first()  # CheckFailed naming the check and the offending message or entry
    for run in report.runs:
        locality = run["checks"]["locality"]
        assert locality["messages"] and locality["bytes_per_step"] == locality["planned_per_step"]
