"""Layer 2: agent partitions x data-parallel replicas (a 2-D mesh).

float64 on a topology with mixed agent dims: every layout (P, R) trains the network one process
trains (replicas take distinct slices of every global batch and sum gradients normalised by the
global batch, so only the order of additions differs: 1e-9 leaves ample margin). Traces show
halo messages only inside a replica and gradient reductions only inside a replica group.
"""
import json

import pytest
import torch

from dhdnn import checkpoint as ckpt
from dhdnn.config import load_config
from dhdnn.distributed.mesh import LayoutError, candidates, check_layout
from dhdnn.models import ARCHITECTURES
from dhdnn.partitioner import partition
from dhdnn.run import train_from_config
from dhdnn.testing import check_locality, check_reductions, read_trace
from dhdnn.topology import load_topology

from ._runs import assert_same as _same, params_of as _params, write_mixed_run


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    return write_mixed_run(tmp_path_factory.mktemp("mixed"), batch_size=40)


def _run(cfg_path, out, workers, replicas, epochs=1, resume=False, engine="auto", trace=False):
    cfg = load_config(cfg_path, [f"run.out_dir={out}", f"run.workers={workers}", f"run.replicas={replicas}",
                                 f"train.epochs={epochs}", f"run.engine={engine}", f"run.trace={str(trace).lower()}"])
    return train_from_config(cfg, resume=resume)


def test_every_layout_trains_the_one_process_network(mixed, tmp_path):
    _run(mixed, tmp_path / "one", 1, 1, epochs=2)  # the reference: one process, 2 epochs
    ref1, ref2 = _params(tmp_path / "one", 1), _params(tmp_path / "one")
    for P, R in ((1, 2), (2, 2), (1, 4), (4, 1), (2, 1)):
        out = tmp_path / f"p{P}r{R}"
        _run(mixed, out, P * R, R)
        _same(_params(out), ref1)
        meta = json.loads((ckpt.latest(out) / "meta.json").read_text())
        assert meta["shards"] == P  # written once per shard, not once per replica
    # a checkpoint written with (2, 2) resumes with (4, 1) and (1, 2) and matches the uninterrupted run
    for P, R in ((4, 1), (1, 2)):
        out = tmp_path / f"resume{P}{R}"
        _run(mixed, out, 4, 2)
        _run(mixed, out, P * R, R, epochs=2, resume=True)
        _same(_params(out), ref2)


def test_traces_keep_halos_inside_replicas_and_reductions_inside_replica_groups(mixed, tmp_path):
    """Halo and readout messages only between neighbour ranks of one replica, with each replica's
    planned bytes for its share of the batch (40 / 2); gradient sums only in the backward, on the
    replica group, each step exactly the shard's gradient bytes (dhdnn.testing's checks)."""
    P, R = 2, 2
    out = tmp_path / "trace"
    _run(mixed, out, P * R, R, trace=True)
    topo = load_topology(mixed.parent / "mixed9.yaml")
    part = partition(topo, P)
    records = read_trace(out)
    assert {m["src"] for m in records} == set(range(P * R))
    got = check_locality(records, topo, part.assignment, batch=40 // R, layout=ARCHITECTURES["H2"].agent_layout(),
                         layers=3, classes=2, replicas=R)
    assert got["messages"] and got["bytes_per_step"] == got["planned_per_step"]
    red = check_reductions(records, P, R, _shard_gradient_bytes(topo, part, P))
    assert red["reductions"] == 5 * P * R  # 200 training samples / batch 40: every step reduced on every rank


def _shard_gradient_bytes(topo, part, P):
    """The parameter bytes each agent partition holds, from a network built here (no processes)."""
    from dhdnn.blocks import BlockTable
    from dhdnn.distributed.network import ShardedNet
    from dhdnn.halo import build_plans

    table = BlockTable(topo, ARCHITECTURES["H2"].agent_layout(), 3, 2)
    out = {}
    for plan in build_plans(topo, part):
        net = ShardedNet(table, 0.4, plan, part.assignment, 2, 0, 0.5, torch.float64)
        out[plan.rank] = sum(p.numel() * p.element_size() for p in net.parameters())
    return out


@pytest.mark.parametrize("backprop", ["autograd", "reversible"])
def test_a_last_batch_shorter_than_the_replicas_trains_the_one_process_network(tmp_path, backprop):
    """200 training samples in batches of 199: the last batch's one sample leaves replica 1 an empty
    slice; its ranks compute and send nothing and add zero gradients to the sum (the integrator's
    backward once failed on a batch of 0 columns)."""
    cfg_path = write_mixed_run(tmp_path, batch_size=199)

    def run(out, P, R):
        train_from_config(load_config(cfg_path, [f"run.out_dir={out}", f"run.workers={P * R}", f"run.replicas={R}",
                                                 "train.epochs=1", f"run.backprop={backprop}"]))

    run(tmp_path / "one", 1, 1)
    for P, R in ((1, 2), (2, 2)):
        run(tmp_path / f"p{P}r{R}", P, R)
        _same(_params(tmp_path / f"p{P}r{R}"), _params(tmp_path / "one"))


def test_replicas_auto_takes_only_a_layout_that_holds_the_pins(tmp_path):
    """Two of four agents pinned to worker 1: as 4 x 1 three partitions would share two unpinned
    agents and 1 x 4 has no worker 1, so of 4 workers only 2 x 2 holds the pins. ``run.replicas:
    auto`` takes it and trains what ``run.replicas: 2`` trains (before, the up-front check took
    4 x 1 and refused the run, and the start-up measurement built the one-rank network under the
    pins and failed inside the workers); where no layout holds them it is one error naming
    ``run.replicas``."""
    (tmp_path / "t.yaml").write_text("agents: [a, {id: b, worker: 1}, c, {id: d, worker: 1}]\n"
                                     "edges: [[a, b], [b, c], [c, d], [d, a]]\n")
    topo = load_topology(tmp_path / "t.yaml")
    assert candidates(4, topo, 50) == [(2, 2)] and check_layout(4, "auto", topo, 50).replicas == 2
    cfg = tmp_path / "run.yaml"
    cfg.write_text("topology: t.yaml\nmodel: {arch: H2, layers: 2, h: 0.4}\ndata: {name: double_moons, n_samples: 200}\n"
                   "train: {batch_size: 20}\nrun: {dtype: float64, progress: false, timeout_s: 60}\n")
    for replicas in ("auto", 2):
        _run(cfg, tmp_path / str(replicas), 4, replicas)
    layout = json.loads((tmp_path / "auto" / "summary.json").read_text())["layout"]
    assert (layout["agents"], layout["replicas"]) == (2, 2)
    _same(_params(tmp_path / "auto"), _params(tmp_path / "2"))

    (tmp_path / "all.yaml").write_text("agents: [{id: a, worker: 0}, {id: b, worker: 1}, {id: c, worker: 2}]\n"
                                       "edges: [[a, b], [b, c]]\n")
    with pytest.raises(LayoutError) as e:
        check_layout(2, "auto", load_topology(tmp_path / "all.yaml"), 50)
    assert e.value.key == "run.replicas" and "fits the 3 agents of" in e.value.reason and "and their pins" in e.value.reason
