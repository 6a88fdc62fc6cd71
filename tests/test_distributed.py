"""Layer 2: the sharded engine on 1-4 gloo ranks against the dense masked model (float64).

Tolerances: both sides compute the same sums in a different order (block products vs one
masked matrix product), so they agree to round-off: ~1e-15 relative per operation, grown
by the depth of the network; 1e-10 leaves ample margin while still catching any wrong term.
"""
import random
from collections import defaultdict

import networkx as nx
import pytest
import torch
import yaml

from dhdnn.blocks import blocks_to_dense, dense_to_blocks, init_blocks
from dhdnn.distributed.launch import run_local
from dhdnn.partition import build_plans, partition, predicted_bytes
from dhdnn.topology import load_topology
from dhdnn.train import DenseEngine, build_classifier

from ._workers import cfg_for, exactness_worker, make_data

LAYERS, BATCH, STEPS = 3, 6, 5


@pytest.fixture(scope="module")
def random_topology(tmp_path_factory):
    """A random connected graph of 13 agents with state dimensions 1-3."""
    rng = random.Random(7)
    g = nx.connected_watts_strogatz_graph(13, 4, 0.4, seed=3)
    topo = {"name": "random13", "agents": [{"id": f"a{i}", "dim": rng.randint(1, 3)} for i in range(13)],
            "edges": [[f"a{i}", f"a{k}"] for i, k in g.edges],
            "inputs": [{"feature": 0, "agent": "a0", "part": "p"}, {"feature": 1, "agent": "a6", "part": "q", "index": 0},
                       {"feature": 2, "agent": "a9", "part": "p"}],
            "readout": [f"a{i}" for i in range(0, 13, 2)]}
    path = tmp_path_factory.mktemp("topo") / "random13.yaml"
    path.write_text(yaml.safe_dump(topo))
    return str(path)


def _setup(topo_path, arch, seed=0):
    topo = load_topology(topo_path)
    n_features = 64 if topo.embeddings else (max(f.feature for f in topo.inputs) + 1 if topo.inputs else 2)
    data = make_data(n_features, 3, BATCH, seed)
    blocks = init_blocks(topo, arch, LAYERS, data.n_classes, seed, init_std=0.7)
    g = torch.Generator().manual_seed(seed + 1)
    for k in blocks:  # a non-zero readout, so that every parameter gets a gradient
        if k.endswith(".W") or k == "mu":
            blocks[k] = torch.randn(blocks[k].shape, generator=g, dtype=torch.float64)
    return topo, data, blocks


def _dense(topo, topo_path, arch, blocks, data, tmp_path):
    cfg = cfg_for(topo_path, arch, LAYERS, str(tmp_path))
    model = build_classifier(cfg, data.n_features, data.n_classes, topo).double()
    blocks_to_dense(model, topo, arch, LAYERS, blocks)
    eng = DenseEngine(model)
    out = eng.objective(data.x_train, data.y_train, cfg.train.alpha)
    out.objective.backward()
    grads = dense_to_blocks(model, topo, arch, LAYERS, grads=True)
    with torch.no_grad():
        logits = model(data.x_train)
    opt = torch.optim.Adam(eng.optimizer_groups(cfg.train.weight_decay), lr=cfg.train.lr)
    blocks_to_dense(model, topo, arch, LAYERS, blocks)
    for _ in range(STEPS):
        opt.zero_grad()
        eng.objective(data.x_train, data.y_train, cfg.train.alpha).objective.backward()
        opt.step()
    return logits, out.objective.detach(), grads, dense_to_blocks(model, topo, arch, LAYERS)


def _rel(a, b):
    return float((a - b).norm() / max(b.norm(), 1e-300))


def _check_run(topo_path, arch, workers, tmp_path, readout="tree", kernel="blocks", device="cpu", backend="gloo"):
    topo, data, blocks = _setup(topo_path, arch)
    results = run_local(exactness_worker, workers, (topo_path, arch, LAYERS, blocks, data, str(tmp_path), readout, STEPS,
                                                    kernel, device), backend=backend, timeout_s=60, run_timeout_s=240)
    logits, objective, grads, final = _dense(topo, topo_path, arch, blocks, data, tmp_path)
    root = results[0]
    # --- exactness: logits, loss (sum of per-rank objectives = CE + global regulariser), every gradient
    assert _rel(root["logits"], logits) <= 1e-10
    total = sum(r["objective"] for r in results) if readout == "tree" else \
        root["objective"] + sum(r["objective"] - root["objective"] for r in results[1:])
    if readout == "tree":
        assert abs(float(total - objective)) <= 1e-10 * abs(float(objective))
    sharded_grads = {k: v for r in results for k, v in r["grads"].items()}
    assert set(sharded_grads) == set(grads)
    for k, g in grads.items():
        torch.testing.assert_close(sharded_grads[k], g, rtol=1e-10, atol=1e-10 * max(1.0, float(g.abs().max())))
    # --- training: five Adam steps give the same parameters
    sharded_final = {k: v for r in results for k, v in r["final"].items()}
    for k, v in final.items():
        torch.testing.assert_close(sharded_final[k], v, rtol=1e-9, atol=1e-9)
    # --- adjoint: <G x, y> == <x, G^T y> summed over ranks
    lhs, rhs = results[0]["adjoint"]
    assert abs(float(lhs - rhs)) <= 1e-12 * max(1.0, abs(float(lhs)))
    return topo, results, data


def _check_locality(topo, results, workers, arch, batch, classes):
    part = partition(topo, workers)
    rank_edges = {tuple(sorted(e)) for e in part.rank_graph(topo).edges}
    plans = build_plans(topo, part)
    pred = predicted_bytes(topo, part, batch, "float64", arch, layers=LAYERS, classes=classes)
    records = [m for r in results for m in r["records"]]
    per_exchange = defaultdict(int)
    per_sender = defaultdict(int)
    for m in records:
        assert m["src"] != m["dst"] and tuple(sorted((m["src"], m["dst"]))) in rank_edges, m
        assert m["phase"] in ("forward", "backward") and m["step"] == 0
        per_exchange[(m["phase"], m["layer"], m["op"])] += m["bytes"]
        per_sender[(m["phase"], m["layer"], m["op"], m["src"])] += 1
    for (phase, layer, op), nbytes in per_exchange.items():
        if op == "readout":
            assert nbytes == pred["readout"] // 2  # up in forward, down in backward
        else:
            assert nbytes == pred["per_exchange"], (phase, layer, op)
    for (phase, layer, op, src), count in per_sender.items():  # one message per neighbour rank
        expected = len(plans[src].neighbor_ranks) if op != "readout" else \
            (1 if phase == "forward" else len(plans[src].tree_children))
        assert count == expected
    n_layer_ex = sum(1 for k in per_exchange if k[2] != "readout")
    assert n_layer_ex == (0 if workers == 1 else 2 * LAYERS * pred["exchanges_per_layer_forward"])
    assert sum(m["bytes"] for m in records) == (pred["per_step"] if workers > 1 else 0)


CASES = [("topologies/ring8.yaml", "H2"), ("topologies/grid4x4_patches.yaml", "H2"), ("random", "H2"),
         ("random", "H1")]


@pytest.mark.parametrize("workers", [1, 2, 3, 4])
@pytest.mark.parametrize("topo_name,arch", CASES)
def test_sharded_matches_dense_and_talks_only_to_neighbours(topo_name, arch, workers, random_topology, tmp_path):
    topo_path = random_topology if topo_name == "random" else topo_name
    topo, results, data = _check_run(topo_path, arch, workers, tmp_path)
    _check_locality(topo, results, workers, arch, BATCH, data.n_classes)


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("topo_name,arch", [("topologies/ring8.yaml", "H2"), ("random", "H1")])
def test_dense_local_kernel_matches_dense_model(topo_name, arch, workers, random_topology, tmp_path):
    """The assembled-matrix local kernel (and, on one worker, the fused stack) is exact too."""
    topo_path = random_topology if topo_name == "random" else topo_name
    topo, results, data = _check_run(topo_path, arch, workers, tmp_path, kernel="dense")
    _check_locality(topo, results, workers, arch, BATCH, data.n_classes)


def test_allreduce_readout_is_an_explicit_option(random_topology, tmp_path):
    topo, data, blocks = _setup(random_topology, "H2")
    results = run_local(exactness_worker, 3, (random_topology, "H2", LAYERS, blocks, data, str(tmp_path),
                                              "allreduce", STEPS), timeout_s=60, run_timeout_s=240)
    logits, _, grads, final = _dense(topo, random_topology, "H2", blocks, data, tmp_path)
    for r in results:  # every rank holds the logits
        assert _rel(r["logits"], logits) <= 1e-10
    sharded_final = {k: v for r in results for k, v in r["final"].items()}
    for k, v in final.items():
        torch.testing.assert_close(sharded_final[k], v, rtol=1e-9, atol=1e-9)
