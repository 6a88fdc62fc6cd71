"""Layer 2: the sharded engine on 1-4 gloo ranks against the dense masked model (float64).

Tolerances: both sides compute the same sums in a different order (block products vs one
masked matrix product), so they agree to round-off: ~1e-15 relative per operation, grown
by the depth of the network; 1e-10 leaves ample margin while still catching any wrong term.
"""
import functools
import os
import random

import networkx as nx
import numpy as np
import pytest
import torch
import yaml

from dhdnn.blocks import BlockTable, dense_packed, init_packed, load_dense
from dhdnn.distributed.launch import run_local
from dhdnn.build import build_classifier
from dhdnn.engine import DenseEngine
from dhdnn.models import ARCHITECTURES
from dhdnn.partitioner import partition
from dhdnn.testing import check_locality as check_messages
from dhdnn.topology import load_topology

from ._workers import KERNEL, cfg_for, exact_reversible_worker, exactness_worker, make_data

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


def setup_network(topo_path, arch, seed=0, layers=LAYERS, batch=BATCH, init_std=0.7):
    """Topology, random data and a full set of per-agent blocks (non-zero readout)."""
    topo = load_topology(topo_path)
    n_features = 64 if topo.embeddings else (max(f.feature for f in topo.inputs) + 1 if topo.inputs else 2)
    data = make_data(n_features, 3, batch, seed)
    table = BlockTable(topo, ARCHITECTURES[arch].agent_layout(), layers, data.n_classes)
    packed = init_packed(table, seed, init_std=init_std, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    for k in packed:  # a non-zero readout, so that every parameter gets a gradient
        if k.startswith(("W/", "mu")):
            packed[k] = torch.randn(packed[k].shape, generator=g, dtype=torch.float64)
    return topo, data, table, packed


def dense_reference(topo, topo_path, arch, table, packed, data, tmp_path, layers=LAYERS, steps=STEPS,
                    backprop="autograd", h=0.3):
    """Logits, objective, block gradients and parameters after ``steps`` Adam steps of the dense model."""
    cfg = cfg_for(topo_path, arch, layers, str(tmp_path), h=h)
    model, _ = build_classifier(cfg, data.n_features, data.n_classes, topo, torch.float64)
    model.body.set_backprop(backprop)
    load_dense(table, model, packed)
    eng = DenseEngine(model)
    out = eng.objective(data.x_train, data.y_train, cfg.train.alpha)
    out.objective.backward()
    eng.after_backward()
    grads = dense_packed(table, model, grads=True)
    with torch.no_grad():
        logits = model(data.x_train)
    opt = torch.optim.Adam(eng.optimizer_groups(cfg.train.weight_decay), lr=cfg.train.lr)
    load_dense(table, model, packed)
    for _ in range(steps):
        opt.zero_grad()
        eng.objective(data.x_train, data.y_train, cfg.train.alpha).objective.backward()
        eng.after_backward()
        opt.step()
    return logits, out.objective.detach() + out.stats[3], grads, dense_packed(table, model)


def rel(a, b):
    return float((a - b).norm() / max(b.norm(), 1e-300))


def compare_held(results, full, what, rtol, table, all_ranks=True):
    """Every rank's held blocks (``what``: grads or final) equal the reference's; the ranks
    that write checkpoints hold every block exactly once."""
    axes = {c.key: c.block_axis for c in table}
    counts = {c.key: np.zeros(len(c), int) for c in table}
    for r in results:
        for key, (ids, vals) in r[what].items():
            ref = full[key].index_select(axes[key], ids)
            torch.testing.assert_close(vals, ref, rtol=rtol, atol=rtol * max(1.0, float(ref.abs().max())))
            if r["writes"]:
                np.add.at(counts[key], ids.numpy(), 1)
    for key, c in counts.items():
        assert (c == 1).all(), key


def check_run(topo_path, arch, workers, tmp_path, readout="tree", kernel=KERNEL, device="cpu", backend="gloo",
              backprop="autograd", anchors=0, replicas=1, layers=LAYERS, tol=1e-10, steps=STEPS, h=0.3,
              init_std=0.7, train_tol=1e-9, state="fixed"):
    """The sharded engine against the dense model's autograd: logits, loss, every gradient (``tol``)
    and parameters after ``steps`` Adam steps (``train_tol``)."""
    topo, data, table, packed = setup_network(topo_path, arch, layers=layers, init_std=init_std)
    results = run_local(exactness_worker, workers, (topo_path, arch, layers, packed, data, str(tmp_path), readout,
                                                    steps, kernel, device, backprop, anchors, replicas, h, state),
                        backend=backend, timeout_s=60, run_timeout_s=400)
    logits, objective, grads, final = dense_reference(topo, topo_path, arch, table, packed, data, tmp_path, layers,
                                                      steps, h=h)
    root = results[0]
    # --- exactness: logits, loss (sum of per-rank objectives = CE + global regulariser), every gradient
    assert rel(root["logits"], logits) <= tol
    if readout == "tree" and replicas == 1:  # root's cross-entropy + every rank's regulariser share
        total = root["objective"] + sum(r["stats"][3] for r in results)
        assert abs(float(total - objective)) <= tol * abs(float(objective))
    compare_held(results, grads, "grads", tol, table)
    # --- training: five Adam steps give the same parameters
    compare_held(results, final, "final", train_tol, table)
    # --- adjoint: <G x, y> == <x, G^T y> summed over ranks
    lhs, rhs = results[0]["adjoint"]
    assert abs(float(lhs - rhs)) <= 1e-12 * max(1.0, abs(float(lhs)))
    return topo, results, data


def check_locality(topo, results, workers, arch, batch, classes, backprop="autograd", layers=LAYERS):
    """Every message goes between adjacent ranks, one per neighbour rank per exchange, with
    bytes equal to the halo plan, per exchange and per step (dhdnn.testing: the checks users run)."""
    records = [m for r in results for m in r["records"]]
    assert all(m["phase"] in ("forward", "backward") and m["step"] == 0 for m in records)
    got = check_messages(records, topo, partition(topo, workers).assignment, batch=batch,
                         layout=ARCHITECTURES[arch].agent_layout(), layers=layers, classes=classes, backprop=backprop)
    assert got["messages"] == len(records) and (workers == 1) == (not records)


CASES = [("topologies/ring8.yaml", "H2"), ("topologies/grid4x4_patches.yaml", "H2"), ("random", "H2"),
         ("random", "H1")]


@pytest.mark.parametrize("workers", [1, 2, 3, 4])
@pytest.mark.parametrize("topo_name,arch", CASES)
def test_sharded_matches_dense_and_talks_only_to_neighbours(topo_name, arch, workers, random_topology, tmp_path):
    topo_path = random_topology if topo_name == "random" else topo_name
    topo, results, data = check_run(topo_path, arch, workers, tmp_path)
    check_locality(topo, results, workers, arch, BATCH, data.n_classes)


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("topo_name,arch", [("topologies/ring8.yaml", "H2"), ("random", "H1")])
def test_dense_local_kernel_matches_dense_model(topo_name, arch, workers, random_topology, tmp_path):
    """The assembled-matrix local kernel is exact too."""
    topo_path = random_topology if topo_name == "random" else topo_name
    topo, results, data = check_run(topo_path, arch, workers, tmp_path, kernel="dense")
    assert {r["kernel"] for r in results} == {"dense"}
    check_locality(topo, results, workers, arch, BATCH, data.n_classes)


def test_allreduce_readout_is_an_explicit_option(random_topology, tmp_path):
    topo, data, table, packed = setup_network(random_topology, "H2")
    results = run_local(exactness_worker, 3, (random_topology, "H2", LAYERS, packed, data, str(tmp_path),
                                              "allreduce", STEPS), timeout_s=60, run_timeout_s=240)
    logits, _, grads, final = dense_reference(topo, random_topology, "H2", table, packed, data, tmp_path)
    for r in results:  # every rank holds the logits
        assert rel(r["logits"], logits) <= 1e-10
    compare_held(results, final, "final", 1e-9, table)


@pytest.mark.parametrize("workers,state", [(1, "fixed"), (2, "fixed"), (3, "fixed"), (2, "float"), (3, "float")])
def test_reversible_backprop_matches_autograd_and_talks_only_to_neighbours(workers, state, random_topology, tmp_path):
    """Depth 64, float64, exact (fixed-point) and float rebuilds: rebuilt states give autograd's
    gradients (1e-10: the fixed-point grid of 2^-48 and float round-off are far below) and five
    Adam steps the same parameters (1e-8); the rebuild's messages ride on the adjoint's, so the
    trace shows the same exchanges as autograd with twice the backward bytes (exact mode sends
    the same dequantised values), all between neighbours."""
    topo, results, data = check_run(random_topology, "H2", workers, tmp_path, backprop="reversible", layers=64,
                                    h=0.1, init_std=0.5, train_tol=1e-8, state=state)
    check_locality(topo, results, workers, "H2", BATCH, data.n_classes, backprop="reversible", layers=64)


def test_reversible_backprop_at_depth_1024(random_topology, tmp_path):
    """Depth 1024, float64, 2 workers: gradients within 1e-8 of autograd's (rebuilding 1024 layers
    accumulates round-off), without anchors."""
    check_run(random_topology, "H2", 2, tmp_path, backprop="reversible", layers=1024, tol=1e-8, state="float",
              steps=1, h=0.05, init_std=0.3, train_tol=1e-8)


@functools.lru_cache(maxsize=1)
def _exact_reference(topo_path, layers, h):
    """The dense model's exact reversible gradients, float64 and float32 (computed once for every
    worker count and kernel below: ~5 s at depth 4096)."""
    runs, refs = [], []
    for dtype in (torch.float64, torch.float32):
        topo, data, table, packed = setup_network(topo_path, "H2", layers=layers, init_std=0.5)
        packed = {k: v.to(dtype) for k, v in packed.items()}
        data = data.to(dtype)
        runs.append((dtype, packed, data))
        cfg = cfg_for(topo_path, "H2", layers, os.path.dirname(topo_path), h=h)  # (nothing is written)
        model, _ = build_classifier(cfg, data.n_features, data.n_classes, topo, dtype)
        load_dense(table, model, packed)
        model.body.set_backprop("reversible", state="fixed")
        torch.nn.functional.cross_entropy(model(data.x_train), data.y_train).backward()
        refs.append(dense_packed(table, model, grads=True))
    return table, runs, refs


@pytest.mark.parametrize("workers,kernel", [(1, "auto"), (2, "auto"), (3, "auto"), (1, "fused")])
def test_exact_reversible_rebuilds_every_state_bit_for_bit_at_depth_4096(workers, kernel, random_topology, tmp_path):
    """Exact (fixed-point) reversible backprop on 1-3 workers, mixed agent dims, depth 4096, float64
    and float32: every state the backward rebuilds is ``torch.equal`` to the one the forward made
    (on every rank, the input included), and the gradients are those of the dense model's exact
    stack (itself checked against autograd through the same fixed-point forward in
    test_reversible_exact), 1e-12 / 1e-5 relative: the dense stack sums each increment in
    another order, so a grid unit can differ now and then."""
    layers, h = 4096, 0.0015625
    table, runs, refs = _exact_reference(random_topology, layers, h)
    results = run_local(exact_reversible_worker, workers, (random_topology, layers, h, runs, str(tmp_path), kernel),
                        timeout_s=60, run_timeout_s=400)
    for i, (dtype, tol) in enumerate(((torch.float64, 1e-12), (torch.float32, 1e-5))):
        per_rank = [r[i] for r in results]
        assert all(r["same"] and r["checked"] == 1 for r in per_rank)
        for key in refs[i]:  # relative error of each block class's gradient
            ids, got = zip(*[(r["grads"][key][0], r["grads"][key][1]) for r in per_rank if key in r["grads"]])
            axis = table.by_key()[key].block_axis
            ref = torch.cat([refs[i][key].index_select(axis, t) for t in ids], axis)
            got = torch.cat(got, axis)
            assert float((got - ref).norm() / ref.norm()) <= tol, (dtype, key)


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("topo_name,arch", [("topologies/ring8.yaml", "H2"), ("topologies/grid4x4_patches.yaml", "H2"),
                                            ("topologies/grid4x4_patches.yaml", "H1"), ("random", "H2")])
def test_diagonal_kernel_matches_dense_model(topo_name, arch, workers, random_topology, tmp_path):
    """Blocks stored along graph offsets (products on views; 1x1 blocks element-wise; blocks that
    fit no band, like the random graph's mixed dims, through the gather path) are exact too, and
    talk only to neighbours."""
    topo_path = random_topology if topo_name == "random" else topo_name
    topo, results, data = check_run(topo_path, arch, workers, tmp_path, kernel="diagonal")
    assert {r["kernel"] for r in results} == {"diagonal"}
    check_locality(topo, results, workers, arch, BATCH, data.n_classes)


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("topo_name,arch", [("topologies/ring8.yaml", "H2"), ("topologies/grid4x4_patches.yaml", "H2"),
                                            ("topologies/grid4x4_patches.yaml", "H1"), ("random", "H2")])
def test_fused_kernel_matches_dense_model(topo_name, arch, workers, random_topology, tmp_path):
    """The compiled block kernel (fused per block row; the random graph's mixed dims give several
    block classes, each compiled for its shape) is exact too, and talks only to neighbours."""
    topo_path = random_topology if topo_name == "random" else topo_name
    topo, results, data = check_run(topo_path, arch, workers, tmp_path, kernel="fused")
    assert {r["kernel"] for r in results} == {"fused"}
    check_locality(topo, results, workers, arch, BATCH, data.n_classes)
