"""``dhdnn verify`` and ``dhdnn.testing``: the checks hold on shipped configs (reversible,
replicas, mixed agent dims), a user's pytest file runs them, and each injected fault — a message
to a non-neighbour rank, a corrupted halo row, a masked weight that learns, gradients twice their
size (which Adam's steps hide) — is caught by the check that names it (exit code 1); bad input is exit code 2."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def verify_cli(*args, env=None):
    p = subprocess.run([sys.executable, "-m", "dhdnn", "verify", *map(str, args), "--json"], capture_output=True,
                       text=True, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    return p.returncode, (json.loads(p.stdout) if p.stdout.strip().startswith("{") else None), p.stderr


def test_verify_holds_on_the_mixed_dims_graph_reversible_with_replicas(tmp_path):
    """Exact reversible backprop (twice the backward bytes, the rebuild riding on the adjoint's
    messages) on the 9-agent graph of state dims 1-3: 2 agent partitions, and 2 partitions x 2
    replicas (each replica its own plan for its half of the batch; gradient sums per shard)."""
    from ._runs import write_mixed_run

    cfg = write_mixed_run(tmp_path, 40)
    code, report, err = verify_cli(cfg, "--workers", 4, "--replicas", 2, "--set", "run.backprop=reversible")
    assert code == 0, err[-3000:]
    run = report["runs"][0]
    assert run["layout"] == "2x2" and run["checks"]["reductions"]["reductions"] == 2 * 4
    loc = run["checks"]["locality"]
    assert loc["messages"] > 0 and loc["bytes_per_step"] == loc["planned_per_step"]
    assert max(run["checks"]["exactness"].values()) <= 1e-9


@pytest.mark.parametrize("fault,workers,check,names", [
    ("message", 4, "locality", "from rank 0 to rank 2: ranks 0 and 2 own no adjacent agents"),
    ("halo", 2, "exactness", "first-step gradients: "),  # the first exactness check
    ("mask", 2, "masks", "lies outside the graph's blocks"),
    ("scale", 2, "exactness", "first-step gradients: ")])
def test_each_injected_fault_is_caught_by_its_check(fault, workers, check, names):
    code, report, err = verify_cli("launch/ring8_swiss_roll.yaml", "--workers", workers,
                                   env={"DHDNN_TEST_FAULT": fault})
    assert code == 1, err[-3000:]
    assert report["failure"]["check"] == check and names in report["failure"]["message"], report["failure"]


def test_bad_input_is_one_line_and_exit_code_2(tmp_path):
    bad = tmp_path / "dense.yaml"
    bad.write_text("model: {arch: H2, dim: 4, layers: 2}\n")
    code, _, err = verify_cli(bad)
    assert code == 2 and "key 'topology'" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = verify_cli("launch/ring8_swiss_roll.yaml", "--workers", 3, "--replicas", 2)
    assert code == 2 and "key 'run.replicas'" in err, err
    # the byte plans are a full batch's: steps past an epoch's full batches are refused, not misjudged
    code, _, err = verify_cli("launch/ring8_swiss_roll.yaml", "--steps", 1000)
    assert code == 2 and "--steps: expected at most" in err and len(err.strip().splitlines()) == 1, err


def test_the_users_pytest_example_runs():
    """examples/test_my_topology.py, as a user copies it into their CI."""
    spec = importlib.util.spec_from_file_location("test_my_topology", ROOT / "examples" / "test_my_topology.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.test_my_network_is_local_and_exact(1, [2, 3])
    mod.test_my_network_is_local_and_exact(2, [4])


def test_a_network_whose_dense_reference_does_not_fit_is_refused_before_anything_runs(tmp_path, monkeypatch):
    """verify's reference is the dense one-process network (float64, held twice): a 3,000-agent
    ring's dense form needs far more than the sharded ranks; with memory fixed at 2 GiB the
    sharded layout passes its own check and verify refuses, naming why, before any worker starts."""
    from dhdnn import resources
    from dhdnn.config import ConfigError
    from dhdnn.distributed import launch
    from dhdnn.testing import verify

    def boom(*a, **k):
        raise AssertionError("a worker was started")

    monkeypatch.setattr(resources, "available_memory", lambda: 2 << 30)
    monkeypatch.setattr(launch, "run_local", boom)
    (tmp_path / "ring.yaml").write_text("generator: {kind: ring, agents: 3000}\n")
    cfg = tmp_path / "run.yaml"
    cfg.write_text("topology: ring.yaml\nmodel: {arch: H2, layers: 4}\ndata: {n_samples: 200}\n")
    with pytest.raises(ConfigError, match=r"run.yaml: key 'topology': verify compares the sharded network with the "
                                          r"one-process dense network in float64 .* an estimated [0-9.]+ GiB"):
        verify(str(cfg), workers=(2,))


STAR5 = """name: star5
generator: {kind: star, agents: 5}
defaults: {dim: 2}
agents: [{id: 3, dim: 4}, {id: 2, dim: 1}]
"""


def test_the_allreduce_readout_is_exact_and_verified_as_the_one_collective(tmp_path):
    """``run.readout: allreduce`` on a star of state dims 1-4: rank 0's partial logits come out of
    the einsum transposed, rank 1's do not, and the collective must add them entry by entry (it
    added memory orders once: logits 0.6 off). verify sees the collective in the trace: one per
    rank and step, of the replica's logits, on its agent ranks; the halo bytes equal the plan; with one
    agent partition there is none."""
    (tmp_path / "star5.yaml").write_text(STAR5)
    cfg = tmp_path / "run.yaml"
    cfg.write_text("topology: star5.yaml\nmodel: {arch: H2, layers: 2, h: 0.45}\n"
                   "data: {name: swiss_roll, n_samples: 400, seed: 9}\ntrain: {batch_size: 50, lr: 0.01}\n"
                   "run: {readout: allreduce, progress: false}\n")
    code, report, err = verify_cli(cfg, "--workers", 2)
    assert code == 0, (report or {}).get("failure") or err[-3000:]
    loc = report["runs"][0]["checks"]["locality"]
    assert loc["readout_collectives"] == 2 * 2 and loc["bytes_per_step"] == loc["planned_per_step"]
    assert max(report["runs"][0]["checks"]["exactness"].values()) <= 1e-9
    assert "all-reduce" in report["network"]
    # one agent partition x 2 replicas: no collective at all (the agent group of one rank is torch's
    # None, every rank: the replicas' logits were once summed with each other)
    code, report, err = verify_cli(cfg, "--workers", 2, "--replicas", 2)
    assert code == 0, (report or {}).get("failure") or err[-3000:]
    assert report["runs"][0]["checks"]["locality"]["readout_collectives"] == 0


def test_a_readout_collective_fails_locality_unless_the_run_chose_it():
    """The check can fail: a traced all-reduce of the logits where the run's readout is the tree,
    or on ranks outside the sender's replica."""
    from dhdnn import Topology
    from dhdnn.models import ARCHITECTURES
    from dhdnn.testing import CheckFailed, check_locality

    topo = Topology.from_dict({"generator": {"kind": "ring", "agents": 4}})
    rec = {"step": 0, "phase": "forward", "layer": -1, "op": "allreduce_readout", "src": 0, "dst": -1,
           "bytes": 5 * 2 * 8, "group": [0, 1]}
    kw = dict(batch=5, layout=ARCHITECTURES["H2"].agent_layout(), layers=1, classes=2)
    with pytest.raises(CheckFailed, match="a collective, but the run's readout is tree"):
        check_locality([rec], topo, [0, 0, 1, 1], **kw)
    with pytest.raises(CheckFailed, match="expected its replica's agent ranks"):
        check_locality([dict(rec, group=[0, 2])], topo, [0, 0, 1, 1], readout="allreduce", **kw)
