"""Layer 2: agent partitions x data-parallel replicas (a 2-D mesh).

float64 on a topology with mixed agent dims: every layout (P, R) trains the network one process
trains (replicas take distinct slices of every global batch and sum gradients normalised by the
global batch, so only the order of additions differs: 1e-9 leaves ample margin). Traces show
halo messages only inside a replica and gradient reductions only inside a replica group.
"""
import json
from collections import defaultdict

import pytest
import torch

from dhdnn import checkpoint as ckpt
from dhdnn.config import load_config
from dhdnn.halo import predicted_bytes
from dhdnn.models import ARCHITECTURES
from dhdnn.partition import partition
from dhdnn.run import train_from_config
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
    P, R = 2, 2
    out = tmp_path / "trace"
    _run(mixed, out, P * R, R, trace=True)
    topo = load_topology(mixed.parent / "mixed9.yaml")
    part = partition(topo, P)
    rank_edges = {tuple(sorted(e)) for e in part.rank_graph(topo).edges}
    layout = ARCHITECTURES["H2"].agent_layout()
    grad_bytes = defaultdict(int)
    for r in range(P * R):
        records = [json.loads(x) for x in (out / f"trace-rank{r}.jsonl").read_text().splitlines()]
        replica, agent = divmod(r, P)
        per_exchange = defaultdict(int)
        for m in records:
            if m["op"] == "allreduce_grad":
                assert m["phase"] == "backward" and sorted(m["group"]) == [agent, agent + P], m  # my replica group
                grad_bytes[(r, m["step"])] += m["bytes"]
                continue
            dst_replica, dst_agent = divmod(m["dst"], P)
            assert dst_replica == replica and tuple(sorted((agent, dst_agent))) in rank_edges, m
            if m["phase"] != "eval" and m["op"] != "readout" and m["step"] == 0:
                per_exchange[(m["phase"], m["layer"], m["op"])] += m["bytes"]
        assert not any(m["phase"] == "forward" and m["op"] == "allreduce_grad" for m in records)
        # the halo plan's bytes for this replica's share of the batch (40 / 2): a gather sends my
        # boundary rows (my send lists), a scatter-add the contributions for my neighbours' rows
        share = 40 // R
        plan = predicted_bytes(topo, part, share, "float64", layout.parts_per_agent, layout.exchanges_per_layer)
        out_b = sum(v for k, v in plan["per_pair"].items() if int(k.split("->")[0]) == agent)
        in_b = sum(v for k, v in plan["per_pair"].items() if int(k.split("->")[1]) == agent)
        assert per_exchange and set(per_exchange.values()) == {out_b, in_b}
    shard_bytes = _shard_gradient_bytes(topo, part, P)
    steps = {step for _, step in grad_bytes}
    assert len(steps) == 5  # 200 training samples / batch 40: every step reduced
    for (r, step), b in grad_bytes.items():  # every step reduces exactly this shard's gradients
        assert b == shard_bytes[r % P], (r, step, b, shard_bytes[r % P])


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
