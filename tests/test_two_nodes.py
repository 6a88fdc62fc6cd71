"""Two machines for real: two network namespaces joined by a veth pair (``launch/two_nodes.py``),
each node its own network stack, ``launch/torchrun_multi_node.sh`` on each (c10d rendezvous at
node 0's link address, each node's own address, gloo on the veth). Skipped with the reason where
namespaces cannot be made (not root, no iproute2); nothing is left behind either way."""
import importlib.util
import re
import subprocess
import time
from pathlib import Path

import pytest

from dhdnn import checkpoint as ckpt
from dhdnn.config import load_config
from dhdnn.models import ARCHITECTURES
from dhdnn.run import train_from_config
from dhdnn.testing import check_locality, check_reductions, read_trace
from dhdnn.topology import load_topology

from ._runs import assert_same, params_of, write_mixed_run

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("two_nodes", ROOT / "launch" / "two_nodes.py")
two_nodes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(two_nodes)
WHY = two_nodes.unavailable()
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"two nodes need network namespaces: {WHY}")

RING = ROOT / "launch" / "ring8_swiss_roll.yaml"


@pytest.mark.parametrize("nproc,replicas", [(1, 1), (2, 2)])
def test_two_nodes_train_the_one_process_network_and_the_link_carries_the_plan(nproc, replicas, tmp_path):
    """float64, the mixed-dims graph: 1 worker per node (the agents split across the link: halo and
    readout cross it) and 2 per node with 2 replicas (agent groups inside nodes: the gradient sums
    cross it). Parameters equal one process's (1e-9); every message is the plan's (dhdnn.testing);
    the bytes the veth counts over two more epochs are the traced cross-node bytes plus a stated
    overhead: TCP/IP headers and acknowledgements, gloo's framing, the epochs' logging reductions
    and barriers and torchrun's heartbeats, at most 25 % + 64 KiB (measured: 16 % and 36 %)."""
    cfg = write_mixed_run(tmp_path, 40)
    sets = ["--no-progress", "--set", "run.trace=true", "--set", f"run.replicas={replicas}"]
    link, traced = {}, {}
    with two_nodes.TwoNodes() as nodes:
        for epochs in (1, 3):
            out = tmp_path / f"e{epochs}"
            before = nodes.link_bytes()
            res = nodes.train(cfg, nproc, ["--out", out, "--set", f"train.epochs={epochs}", *sets])
            assert all(r.returncode == 0 for r in res), res[0].stderr[-3000:] + res[1].stderr[-3000:]
            link[epochs] = nodes.link_bytes() - before
            traced[epochs] = two_nodes.cross_node(read_trace(out), nproc)
    one = load_config(cfg, [f"run.out_dir={tmp_path / 'one'}", "train.epochs=3"])
    train_from_config(one)
    assert_same(params_of(tmp_path / "e3"), params_of(tmp_path / "one"))
    records, P = read_trace(tmp_path / "e3"), 2 * nproc // replicas
    topo = load_topology(tmp_path / "mixed9.yaml")
    meta = ckpt.read_meta(ckpt.latest(tmp_path / "e3"))
    from dhdnn.partitioner import partition

    got = check_locality(records, topo, partition(topo, P).assignment, batch=40 // replicas, replicas=replicas,
                         layout=ARCHITECTURES["H2"].agent_layout(), layers=3, classes=2)
    assert got["bytes_per_step"] == got["planned_per_step"] and meta["shards"] == P
    check_reductions(records, P, replicas)
    facts = ckpt_summary(tmp_path / "e3")["layout"]  # placement auto: the agent groups inside a node where they fit
    assert facts["nodes"] == 2 and facts["agent_groups_span_nodes"] == (P > nproc)
    assert facts["replica_groups_span_nodes"] == (replicas > 1)
    wire, payload = link[3] - link[1], traced[3][0] - traced[1][0]
    assert payload > 0 and payload <= wire <= 1.25 * payload + 64 * 1024, (wire, payload)


SETS = ["--set", "train.epochs=6", "--set", "run.dtype=float64", "--set", "data.n_samples=2000"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The uninterrupted run of SETS: the same layout (2 agent partitions) on 2 local workers;
    float64 and the same summation order, so bit for bit what the two nodes compute. Trained
    once for the three cut tests below (each compares its own run with it)."""
    out = tmp_path_factory.mktemp("ref")
    cfg = load_config(RING, [f"run.out_dir={out}", "run.workers=2", "run.progress=false",
                             *[s for s in SETS if s != "--set"]])
    train_from_config(cfg)
    return params_of(out)


def _after_first_checkpoint(out: Path, procs, limit: float = 180) -> None:
    t = time.monotonic()
    while not list(out.glob("checkpoints/step-*/meta.json")):
        assert time.monotonic() - t < limit and all(p.poll() is None for p in procs), "no checkpoint"
        time.sleep(0.1)


def test_a_cut_link_stops_every_process_and_a_restart_finishes_bit_identical(tmp_path, reference):
    """The link down mid-epoch for longer than run.timeout_s (8 s): each worker names its failed
    neighbour and exits (code 1); an agent cut off from the rendezvous store is stopped after
    AGENT_IDLE_S (5 s) without workers, so every process of both nodes ends within 8 + 5 + 10 s
    (the slack: the error's way out and 3x this machine's ~1 s); the last complete checkpoint
    reads back. With the link back, the launch script run again (``--auto-resume``) finishes
    with the parameters of an uninterrupted run, bit for bit."""
    out = tmp_path / "run"
    args = ["--out", out, "--no-progress", "--set", "run.timeout_s=8", *SETS]
    with two_nodes.TwoNodes() as nodes:
        procs = [nodes.torchrun(n, RING, 1, args, env={"AGENT_IDLE_S": "5"}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for n in range(2)]
        _after_first_checkpoint(out, procs)
        nodes.link(False)
        cut = time.monotonic()
        while any(p.poll() is None for p in procs) and time.monotonic() - cut < 120:
            time.sleep(0.1)
        stopped = time.monotonic() - cut
        errs = [p.communicate(timeout=30)[1] for p in procs]
        assert stopped < 8 + 5 + 10, stopped
        assert all(p.returncode == 1 for p in procs), [p.returncode for p in procs]
        # the peer is named, whichever exchange the cut caught (a layer's halo or the readout's)
        assert re.search(r"exchange with (neighbour )?rank 1 failed", errs[0]) or \
            re.search(r"exchange with (neighbour )?rank 0 failed", errs[1]), errs[0][-3000:] + errs[1][-3000:]
        assert ckpt.load_newest_readable(out, report=lambda m: None) is not None
        nodes.link(True)
        res = nodes.train(RING, 1, args)
        assert all(r.returncode == 0 for r in res), res[0].stderr[-3000:]
    got = params_of(out)
    assert set(got) == set(reference) and all(got[k].equal(reference[k]) for k in reference)


@pytest.mark.parametrize("down_s,restarts", [(14, 2), (3, 0)])
def test_the_run_rides_out_a_cut_by_elastic_restart_or_a_flap_without_one(down_s, restarts, tmp_path, reference):
    """A cut longer than run.timeout_s (8 s) with torchrun's ``--max-restarts``: the workers fail,
    the agents restart them once the link is back, and they resume from the checkpoint; a flap of
    3 s (shorter than a 30 s timeout) is ridden out by TCP with no restart. Either way the run
    ends with the parameters of an uninterrupted run, bit for bit."""
    out = tmp_path / "run"
    timeout = 8 if restarts else 30
    args = ["--out", out, "--no-progress", "--set", f"run.timeout_s={timeout}", *SETS]
    with two_nodes.TwoNodes() as nodes:
        procs = [nodes.torchrun(n, RING, 1, args, max_restarts=restarts, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for n in range(2)]
        _after_first_checkpoint(out, procs)
        nodes.link(False)
        time.sleep(down_s)
        nodes.link(True)
        errs = [p.communicate(timeout=300)[1] for p in procs]
        assert all(p.returncode == 0 for p in procs), errs[0][-3000:] + errs[1][-3000:]
        # a restart (the workers resume from the checkpoint) only after a worker failed (whichever
        # exchange the cut caught: a layer's halo, the readout, a logging reduction)
        both = errs[0] + errs[1]
        failed = "dhdnn: error: rank" in both or "Traceback" in both
        assert ("resumed from" in both) == failed == bool(restarts), both[-6000:]
    got = params_of(out)
    assert set(got) == set(reference) and all(got[k].equal(reference[k]) for k in reference)


def test_the_mesh_is_placed_by_the_link(tmp_path):
    """2 nodes x 2 workers as 2 agent partitions x 2 replicas. ``spread`` puts the agent groups
    across the link (every halo message crosses it, the gradient sums stay in a node);
    ``run.replicas: auto`` measures intra- and inter-node exchanges, predicts both placements of
    every layout, prints the prediction and takes the fastest predicted. Both train the one-process
    network (1e-9), and summary.json says where the groups sit."""
    cfg = write_mixed_run(tmp_path, 40)
    sets = ["--no-progress", "--set", "run.trace=true", "--set", "train.epochs=1"]
    with two_nodes.TwoNodes("100mbit") as nodes:
        spread = nodes.train(cfg, 2, ["--out", tmp_path / "spread", "--set", "run.replicas=2", "--set",
                                      "run.placement=spread", *sets])
        auto = nodes.train(cfg, 2, ["--out", tmp_path / "auto", "--set", "run.replicas=auto", *sets])
    assert all(r.returncode == 0 for r in spread + auto), spread[0].stderr[-2000:] + auto[0].stderr[-2000:]
    facts = ckpt_summary(tmp_path / "spread")["layout"]
    assert facts["placement"] == "spread" and facts["agent_groups_span_nodes"] and not facts["replica_groups_span_nodes"]
    records = read_trace(tmp_path / "spread")
    halo = [m for m in records if m["op"] != "allreduce_grad" and m["phase"] != "eval"]
    assert halo and all(m["src"] // 2 != m["dst"] // 2 for m in halo)  # ranks 0, 1 on node 0: agent groups {0, 2}, {1, 3}
    assert all(len({r // 2 for r in m["group"]}) == 1 for m in records if m["op"] == "allreduce_grad")
    printed = next(ln for ln in (auto[0].stderr + auto[1].stderr).splitlines() if "run.replicas auto" in ln)
    assert "2x2 packed" in printed and "2x2 spread" in printed, printed
    chosen = ckpt_summary(tmp_path / "auto")["layout"]
    assert chosen["predicted_step_s"] == min(chosen["candidates"].values())
    one = load_config(cfg, [f"run.out_dir={tmp_path / 'one'}", "train.epochs=1"])
    train_from_config(one)
    for run in ("spread", "auto"):
        assert_same(params_of(tmp_path / run), params_of(tmp_path / "one"))


def ckpt_summary(run: Path) -> dict:
    import json

    return json.loads((run / "summary.json").read_text())
