"""Layer 1: topology YAML, validation errors, masks, the partitioner and the halo plan."""
import glob
import itertools
import random

import networkx as nx
import numpy as np
import pytest
import torch

from dhdnn import build_model
from dhdnn.halo import build_plans, predicted_bytes
from dhdnn.models import ARCHITECTURES
from dhdnn.models.hamiltonian import NotDistributable
from dhdnn.partitioner import partition, repair
from dhdnn.topology import TopologyError, dense_masks, load_topology, topology_from_dict

FILES = sorted(glob.glob("topologies/*.yaml"))


def test_topology_files_exist():
    names = {f.split("/")[-1] for f in FILES}
    assert {"ring8.yaml", "ring8_complete.yaml", "line8.yaml", "star8.yaml", "grid4x4_patches.yaml",
            "grid16x16.yaml", "ring256.yaml", "rgg256.yaml"} <= names


@pytest.mark.parametrize("path", FILES)
def test_every_topology_loads_and_partitions(path):
    topo = load_topology(path)
    assert nx.is_connected(topo.graph)
    for w in (1, 2, 3, 4):
        part = partition(topo, w)
        loads = part.loads(topo)
        assert len(part.assignment) == topo.n_agents and min(loads) > 0
        plans = build_plans(topo, part)
        assert sorted(a for p in plans for a in p.local) == list(range(topo.n_agents))


def test_paper_ring_inputs_and_exact_sparsity():
    topo = load_topology("topologies/ring8.yaml")
    assert topo.state_dim == 16
    pl = topo.placement(2)
    assert pl.feature_index == (0, 8 + 4)  # p of agent 1 is entry 0; q of agent 5 is entry 8 + 4
    model = build_model("H2", 16, 4, 0.5, mask=dense_masks(topo, "H2"))
    adj = nx.to_numpy_array(topo.graph, nodelist=range(8)) + torch.eye(8).numpy()
    for K in (model.K_p, model.K_q):
        eff = K * model.mask_K_p
        for i, k in itertools.product(range(8), range(8)):
            nonzero = bool((eff[:, i, k] != 0).any())
            assert nonzero == bool(adj[i, k]), (i, k)


def test_h1_mask_couples_p_and_q_of_neighbours_only():
    topo = load_topology("topologies/line8.yaml")
    mask = dense_masks(topo, "H1")["K"]
    off = topo.offsets
    m = topo.half_dim
    # agent 0 (rows p^[0]) touches q^[1] (neighbour) but not q^[2]
    assert mask[off[0], m + off[1]] and not mask[off[0], m + off[2]]
    assert mask.shape == (2 * m, 2 * m)


def test_generators_and_overrides():
    t = topology_from_dict({"generator": {"kind": "torus", "rows": 3, "cols": 4}, "defaults": {"dim": 2},
                            "agents": [{"id": 5, "dim": 3, "worker": 1}]})
    assert t.n_agents == 12 and all(d == 4 for _, d in t.graph.degree())
    assert t.dims[5] == 3 and dict(t.pinned) == {5: 1}
    for kind, extra in [("ring", {}), ("line", {}), ("star", {}), ("complete", {}),
                        ("erdos_renyi", {"p": 0.6, "seed": 1}), ("watts_strogatz", {"k": 4, "p": 0.1, "seed": 0}),
                        ("random_geometric", {"radius": 0.8, "seed": 0})]:
        t = topology_from_dict({"generator": {"kind": kind, "agents": 10, **extra}})
        assert t.n_agents == 10
    assert topology_from_dict({"generator": {"kind": "grid", "rows": 2, "cols": 3}}).n_agents == 6


BAD = [
    ("agents: [1, 2]\nedges: [[1, 3]]\n", "edges[0]", "unknown agent 3"),
    ("agents: [1, 2, 1]\nedges: [[1, 2]]\n", "agents[2]", "duplicate agent id 1"),
    ("agents: [1, 2]\nedges: [[1, 1], [1, 2]]\n", "edges[0]", "self-loop"),
    ("agents: [{id: 1, dim: 0}, 2]\nedges: [[1, 2]]\n", "agents[0].dim", "expected a positive integer"),
    ("defaults: {dim: -1}\nagents: [1]\n", "defaults.dim", "expected a positive integer"),
    ("agents: [1, 2]\nedges: [[1, 2]]\ninputs: [{feature: 0, agent: 1}, {feature: 0, agent: 2}]\n",
     "inputs[1].feature", "already fed"),
    ("agents: [1, 2]\nedges: [[1, 2]]\ninputs: [{feature: 0, agent: 1, index: 3}]\n", "inputs[0].index",
     r"expected an entry in \[0, 1\)"),
    ("agents: [1, 2]\nedges: [[1, 2]]\ninputs: [{feature: 0, agent: 1, part: r}]\n", "inputs[0].part", "'p' or 'q'"),
    ("agents: [1, 2]\nedges: [[1, 2]]\nreadout: [3]\n", "readout[0]", "unknown agent 3"),
    ("agents: [1, 2, 3]\nedges: [[1, 2]]\n", "edges", "connected graph"),
    ("generator: {kind: erdos_renyi, agents: 6, p: 0.2, seed: 1}\n", "generator", "connected graph.*change its seed"),
    ("agents: [1, 2]\nedges: [[1, 2]]\ncolour: red\n", "colour", "unknown key"),
    ("agents: [{id: 1, worker: -2}, 2]\nedges: [[1, 2]]\n", "agents[0].worker", "worker index >= 0"),
    ("generator: {kind: hexagon, agents: 4}\n", "generator.kind", "expected one of"),
    ("generator: {kind: ring}\n", "generator.agents", "missing"),
    ("agents: [1, 2]\nedges: [[1, 2]]\nembeddings: [{agent: 1, features: []}]\n", "embeddings[0].features",
     "non-empty list"),
    ("agents: [1, 2\n", None, r"line \d+, column \d+: invalid YAML"),
]


@pytest.mark.parametrize("text,key,msg", BAD)
def test_bad_topology_errors_name_file_and_key(tmp_path, text, key, msg):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(TopologyError) as e:
        load_topology(p)
    s = str(e.value)
    assert str(p) in s
    if key is not None:
        assert f"key '{key}'" in s
    assert pytest.importorskip("re").search(msg, s), s


def test_feature_out_of_range_for_data_and_worker_errors(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text("agents: [1, 2]\nedges: [[1, 2]]\ninputs: [{feature: 5, agent: 1}]\n")
    topo = load_topology(p)
    with pytest.raises(TopologyError, match=r"key 'inputs\[0\].feature': expected an index in \[0, 2\)"):
        topo.placement(2)
    with pytest.raises(TopologyError, match="3 workers but .* only 2 agents"):
        partition(topo, 3)
    p.write_text("agents: [{id: 1, worker: 4}, 2]\nedges: [[1, 2]]\n")
    with pytest.raises(TopologyError, match=r"key 'agents\[0\].worker'.*expected a worker in \[0, 2\)"):
        partition(load_topology(p), 2)


def test_distributed_use_refuses_j2_and_baselines():
    with pytest.raises(NotDistributable, match="J2 couples every agent") as e:
        ARCHITECTURES["H1"].agent_layout(J="J2")
    assert e.value.key == "model.J"
    for arch in ("MS1", "MS2", "MS3", "ResNet", "MLP"):
        with pytest.raises(NotDistributable, match=f"{arch} has no agent-local structure"):
            ARCHITECTURES[arch].agent_layout()
    h2, h1 = ARCHITECTURES["H2"].agent_layout(), ARCHITECTURES["H1"].agent_layout(J="J1")
    assert (h2.exchanges_per_layer, h2.invertible, h2.parts_per_agent) == (4, True, 1)
    assert (h1.exchanges_per_layer, h1.invertible, h1.parts_per_agent) == (2, False, 2)


def test_partitioner_special_cases_and_pins():
    ring = load_topology("topologies/ring8.yaml")
    assert partition(ring, 1).assignment.tolist() == [0] * 8
    one = partition(ring, 8)
    assert sorted(one.assignment) == list(range(8))
    pinned = topology_from_dict({"generator": {"kind": "ring", "agents": 12},
                                 "agents": [{"id": 0, "worker": 2}, {"id": 6, "worker": 0}, {"id": 7, "worker": 0}]})
    for method in ("metis", "auto"):
        part = partition(pinned, 3, method)
        assert part.assignment[0] == 2 and part.assignment[6] == 0 and part.assignment[7] == 0
        assert min(part.loads(pinned)) > 0 and part.imbalance(pinned) <= 1.1 + 1e-9


def test_pins_that_leave_a_worker_without_an_agent_are_refused_and_feasible_pins_are_filled():
    """Three of five ring agents pinned to worker 1: two unpinned agents can fill workers 0 and 2
    but not 0, 2 and 3. Repair fills an empty worker from one that has an unpinned agent, even when
    the fullest worker holds pinned agents only (it used to give up there)."""
    ring = topology_from_dict({"generator": {"kind": "ring", "agents": 5},
                               "agents": [{"id": i, "worker": 1} for i in (1, 3, 4)]})
    assert repair(ring, np.array([0, 1, 0, 1, 1]), 3).tolist() == [2, 1, 0, 1, 1]
    for workers in (3, 2):
        part = partition(ring, workers).assignment
        assert part[[1, 3, 4]].tolist() == [1, 1, 1] and sorted(set(part.tolist())) == list(range(workers))
    for workers, free in ((4, 3), (5, 4)):
        with pytest.raises(TopologyError, match=rf"key 'agents': {free} of the {workers} workers have no pinned "
                                                r"agent but only 2 agents are unpinned; expected an agent on every"):
            partition(ring, workers)


def _random_topology(rng, n):
    g = nx.connected_watts_strogatz_graph(n, 4, 0.3, seed=rng.randint(0, 10_000))
    return topology_from_dict({"agents": [{"id": i, "dim": rng.randint(1, 3)} for i in range(n)],
                               "edges": [list(e) for e in g.edges]})


@pytest.mark.parametrize("seed", range(6))
def test_halo_plan_matches_brute_force_from_masks(seed):
    rng = random.Random(seed)
    topo = _random_topology(rng, rng.randint(8, 20))
    workers = rng.randint(2, 5)
    part = partition(topo, workers, rng.choice(["metis", "auto"]))
    plans = build_plans(topo, part)
    owner = part.assignment
    A = topo.block_mask()  # entry-level (m, m) mask
    off = topo.offsets
    for p in plans:
        for s, agents in p.send.items():
            agents = agents.tolist()
            assert plans[s].recv[p.rank].tolist() == agents  # my send list is their receive list
            assert agents == sorted(agents)
            for a in agents:
                assert owner[a] == p.rank
                assert any(topo.graph.has_edge(a, b) for b in plans[s].local)
        # brute force from the mask: agents of mine whose columns some row of rank s reads
        for s in range(workers):
            if s == p.rank:
                continue
            need = sorted({a for a in p.local for b in plans[s].local
                           if A[off[b], off[a]]})
            assert (p.send[s].tolist() if s in p.send else []) == need
    # predicted bytes: each needed (agent -> foreign rank) pair counted from the mask
    batch = 7
    b = predicted_bytes(topo, part, batch, "float64", layers=3)
    brute = sum(topo.dims[a] for a in range(topo.n_agents)
                for s in {owner[r] for r in range(topo.n_agents) if A[off[r], off[a]]} - {owner[a]})
    assert b["per_exchange"] == brute * batch * 8
    tree = sum(1 for p in plans if p.tree_parent is not None)
    assert tree == workers - 1
    assert b["per_step"] == 2 * 3 * 4 * brute * batch * 8 + 2 * tree * batch * 2 * 8


def test_cli_topology_show_and_partition(tmp_path, capsys):
    import json

    from dhdnn.cli import main

    assert main(["topology", "show", "topologies/ring8.yaml", "--plot", str(tmp_path / "g.png")]) == 0
    out = capsys.readouterr().out
    assert "8 agents, 8 edges, state dim 16" in out and (tmp_path / "g.png").stat().st_size > 1000
    assert main(["partition", "topologies/ring8.yaml", "--workers", "3", "--json", "--batch", "10",
                 "--layers", "2", "--plot", str(tmp_path / "p.png")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["assignment"]) == {str(i) for i in range(1, 9)} and sorted(set(res["assignment"].values())) == [0, 1, 2]
    assert sum(res["loads"]) == 8 and len(res["cut_edges"]) == 3 and res["rank_edges"]
    topo = load_topology("topologies/ring8.yaml")
    part = partition(topo, 3)
    assert res["bytes_per_step"] == predicted_bytes(topo, part, 10, "float32", layers=2)["per_step"]
    assert (tmp_path / "p.png").exists()
    assert main(["partition", "topologies/ring8.yaml", "--workers", "3"]) == 0
    assert "cut edges 3" in capsys.readouterr().out
    assert main(["partition", "topologies/ring8.yaml", "--workers", "9"]) == 2
    assert "9 workers but" in capsys.readouterr().err


# ---- the partitioner's objective ------------------------------------------------------------
def _ilp_optimum(topo, workers, bound):
    """The minimum halo volume over every assignment with loads <= bound and no worker empty
    (scipy's MILP): x[a, r] = agent a on rank r; y[a, r] >= x[b, r] - x[a, r] for neighbours b
    (a is read by rank r); minimise sum n_a y[a, r]."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    n, k = topo.n_agents, workers
    nx_, ny_ = n * k, n * k
    xi = lambda a, r: a * k + r  # noqa: E731
    yi = lambda a, r: nx_ + a * k + r  # noqa: E731
    rows, lo, hi = [], [], []

    def add(coefs, lb, ub):
        row = np.zeros(nx_ + ny_)
        for i, c in coefs:
            row[i] += c
        rows.append(row)
        lo.append(lb)
        hi.append(ub)

    for a in range(n):
        add([(xi(a, r), 1) for r in range(k)], 1, 1)
    for r in range(k):
        add([(xi(a, r), int(topo.dims[a])) for a in range(n)], -np.inf, bound)
        add([(xi(a, r), 1) for a in range(n)], 1, np.inf)
    for a, b in topo.edges.tolist():
        for u, v in ((a, b), (b, a)):
            for r in range(k):
                add([(yi(u, r), 1), (xi(v, r), -1), (xi(u, r), 1)], 0, np.inf)
    for a, w in topo.pinned:
        add([(xi(a, w), 1)], 1, 1)
    c = np.concatenate([np.zeros(nx_), np.repeat(topo.dims.astype(float), k)])
    res = milp(c, constraints=LinearConstraint(np.array(rows), lo, hi),
               integrality=np.concatenate([np.ones(nx_), np.zeros(ny_)]), bounds=Bounds(0, 1))
    assert res.success, res.message
    return round(res.fun)


@pytest.mark.parametrize("seed", range(24))
def test_default_partition_reaches_the_exhaustive_optimum_on_small_graphs(seed):
    rng = random.Random(1000 + seed)
    n = rng.randint(6, 16)
    kind = rng.choice(["ws", "er", "tree"])
    if kind == "ws":
        g = nx.connected_watts_strogatz_graph(n, 4, 0.3, seed=seed)
    elif kind == "er":
        g = nx.gnp_random_graph(n, 0.35, seed=seed)
        g.add_edges_from((i, i + 1) for i in range(n - 1))  # connected
    else:
        g = nx.random_labeled_tree(n, seed=seed)
    topo = topology_from_dict({"agents": [{"id": i, "dim": rng.randint(1, 3)} for i in range(n)],
                               "edges": [list(e) for e in g.edges]})
    workers = rng.randint(2, 4)
    part = partition(topo, workers)
    volume, _ = part.objective(topo)
    assert volume == _ilp_optimum(topo, workers, max(part.loads(topo)))
    assert part.imbalance(topo) <= 1.1 + 1e-9 or max(part.loads(topo)) <= max(partition(topo, workers, "metis").loads(topo))


@pytest.mark.parametrize("path", ["topologies/rgg256.yaml", "topologies/grid16x16.yaml"])
def test_default_partition_never_sends_more_than_metis(path):
    topo = load_topology(path)
    for w in range(2, 9):
        ours, metis = partition(topo, w), partition(topo, w, "metis")
        assert ours.objective(topo)[0] <= metis.objective(topo)[0], w
        assert ours.imbalance(topo) <= 1.1 + 1e-9
