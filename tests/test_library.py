"""The distributed network as a library: topologies from networkx, the dense network from a
topology, ``distribute`` in a user's own loop under torchrun (exact against one process,
neighbour-only messages with the planned bytes), its shards loaded as one dense model, a
resumed loop, and the shipped examples."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest
import torch
import torch.nn.functional as F

import dhdnn
from dhdnn.build import build_classifier
from dhdnn.config import load_config
from dhdnn.models import ARCHITECTURES
from dhdnn.testing import check_locality, check_reductions, read_trace
from dhdnn.topology import Topology, TopologyError

from .test_torchrun import free_port, torch_env

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "custom_loop.py"


def load_example():
    spec = importlib.util.spec_from_file_location("custom_loop", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---- topologies and the dense network ------------------------------------------------------------
def test_networkx_graphs_become_validated_topologies():
    g = nx.grid_2d_graph(2, 3)
    nx.set_node_attributes(g, {(0, 0): 3}, "dim")
    topo = Topology.from_networkx(g, dim=2, name="grid", inputs=[{"feature": 0, "agent": (0, 0)},
                                                                 {"feature": 1, "agent": (1, 2), "part": "q"}],
                                  readout=[(1, 2)])
    assert topo.n_agents == 6 and len(topo.edges) == 7 and topo.ids[0] == "(0, 0)"
    assert topo.dims.tolist() == [3, 2, 2, 2, 2, 2] and topo.n_inputs() == 2 and topo.readout.tolist() == [5]
    # the YAML path's validation, with the networkx source in the message
    with pytest.raises(TopologyError, match=r"<networkx two>: key 'edges': expected a connected graph"):
        Topology.from_networkx(nx.Graph([(0, 1), (2, 3)]), name="two")
    with pytest.raises(TopologyError, match=r"^<networkx graph>: key 'inputs\[0\].agent': unknown agent 9"):
        Topology.from_networkx(nx.path_graph(3), inputs=[{"feature": 0, "agent": 9}])
    with pytest.raises(TopologyError, match=r"key 'edges\[\d\]': self-loop"):
        Topology.from_networkx(nx.Graph([(0, 1), (1, 1)]))
    with pytest.raises(TopologyError, match="undirected"):
        Topology.from_networkx(nx.DiGraph([(0, 1)]))
    d = Topology.from_dict({"agents": [1, 2], "edges": [[1, 2]]})
    assert d.n_agents == 2


def test_build_network_is_the_cli_network(tmp_path):
    topo = dhdnn.load_topology(ROOT / "topologies" / "mixed9.yaml")
    cfg = load_config(None, ["model.arch=H2", "model.layers=3", "model.h=0.4", "model.init_std=0.5", "train.seed=4"])
    a, _ = build_classifier(cfg, 2, 2, topo, torch.float64)
    b = dhdnn.build_network(topo, arch="H2", layers=3, h=0.4, init_std=0.5, seed=4, n_outputs=2, dtype=torch.float64)
    assert b.spec.n_features == 2  # read off the topology's inputs
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_distribute_refuses_what_it_cannot_shard():
    from dhdnn.distributed import distribute

    topo = dhdnn.load_topology(ROOT / "topologies" / "ring8.yaml")
    model = dhdnn.build_network(topo, arch="H2", layers=2, h=0.5, n_outputs=2)
    with pytest.raises(RuntimeError, match="init_process_group"):
        distribute(model)
    from dhdnn.distributed.distribute import spec_of

    with pytest.raises(ValueError, match="needs the agent graph"):
        spec_of(dhdnn.build_network(arch="H2", layers=2, h=0.5, dim=4, n_features=2, n_outputs=2))
    plain = dhdnn.build_model("H2", topo.state_dim, 2, 0.5)
    with pytest.raises(ValueError, match="not masked by the topology"):
        spec_of(dhdnn.Classifier(plain, 2, 2, topo.placement(2), topo.readout_state_indices()), topo)
    other = dhdnn.load_topology(ROOT / "topologies" / "line8.yaml")
    with pytest.raises(ValueError, match="differs from the one the model was built on"):
        spec_of(model, other)


# ---- example (a): a user's loop under torchrun -----------------------------------------------------
def run_example(tmp_path: Path, nproc: int, *args, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", str(EXAMPLE), *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=torch_env(), timeout=timeout, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    return p


def one_process(steps: int, dtype=torch.float64):
    """The same loop as the example, on the dense network in this process."""
    ex = load_example()
    data = dhdnn.load_dataset("double_moons", n_samples=2000, seed=0).to(dtype)
    model = ex.make_model(dtype)
    wd = {id(p) for p in model.readout_parameters()}
    opt = torch.optim.Adam([{"params": [p for p in model.parameters() if id(p) not in wd], "weight_decay": 0.0},
                            {"params": model.readout_parameters(), "weight_decay": 1e-3}], lr=0.02)
    for idx in ex.batches(len(data.x_train), 100, steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx]) + model.regularizer(1e-3)
        loss.backward()
        opt.step()
    return model, data


def check_trace(trace_dir: Path, topo, assignment, workers: int, batch: int, layers: int, steps: int,
                replicas: int = 1):
    """Every message between neighbour ranks of one replica; bytes per step equal to the plan (with
    the logits coming back down the tree to every rank); gradient sums only in the replica group
    (dhdnn.testing: the checks users run on their own trace directories)."""
    records = read_trace(trace_dir)
    assert {m["src"] for m in records} == set(range(workers * replicas))  # every rank traced
    lay = ARCHITECTURES["H2"].agent_layout()
    got = check_locality(records, topo, assignment, batch=batch, layout=lay, layers=layers, classes=2,
                         logits_everywhere=True, replicas=replicas)
    assert len({m["step"] for m in records if m["phase"] != "eval" and m["op"] != "allreduce_grad"}) == steps
    assert got["messages"] and got["bytes_per_step"] == got["planned_per_step"]
    check_reductions(records, workers, replicas)


@pytest.mark.parametrize("nproc,replicas", [(2, 1), (3, 1), (4, 2)])
def test_custom_loop_under_torchrun_equals_one_process(nproc, replicas, tmp_path):
    """float64, the mixed-dims topology: parameters after 3 Adam steps equal the dense model's
    (1e-9; measured ~1e-16: the same sums in another order); the saved shards load as one dense
    model whose logits equal the distributed forward's (1e-10); the trace is neighbour-only with
    the planned bytes."""
    steps = 3
    run_example(tmp_path, nproc, "--steps", steps, "--dtype", "float64", "--replicas", replicas, "--save", "ckpt",
                "--trace", "trace", "--logits", "logits.pt")
    reference, data = one_process(steps)
    loaded = dhdnn.load_exported(tmp_path / "ckpt")
    ref, got = reference.state_dict(), loaded.state_dict()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-9, msg=k)
    logits = torch.load(tmp_path / "logits.pt")  # rank 0's: its replica's slice of the test set
    with torch.no_grad():
        dense = loaded(data.x_test.tensor_split(replicas)[0])
    torch.testing.assert_close(logits, dense, rtol=1e-10, atol=1e-10)
    meta = json.loads(next((tmp_path / "ckpt" / "checkpoints").glob("step-*/meta.json")).read_text())
    P = nproc // replicas
    check_trace(tmp_path / "trace", loaded.topology, torch.tensor(meta["assignment"]).numpy(), P,
                100 // replicas, 4, steps, replicas)


def test_custom_loop_resumes_on_another_worker_count(tmp_path):
    """Saved on 3 workers after 2 steps, resumed on 2 workers to step 4: the parameters of 4
    uninterrupted steps in one process."""
    run_example(tmp_path, 3, "--steps", 2, "--dtype", "float64", "--save", "ckpt")
    run_example(tmp_path, 2, "--steps", 4, "--dtype", "float64", "--save", "ckpt", "--resume")
    reference, _ = one_process(4)
    got = dhdnn.load_exported(tmp_path / "ckpt").state_dict()
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=1e-9, atol=1e-9, msg=k)


# ---- examples (b) and (c) ----------------------------------------------------------------------------
def test_networkx_example_trains_and_exports(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "examples" / "networkx_graph.py"), "--out", str(tmp_path / "m.pt"),
                        "--epochs", "5"], capture_output=True, text=True, timeout=240, env=dict(os.environ,
                                                                                                OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "reloaded: identical logits" in p.stdout
    model = dhdnn.load_exported(tmp_path / "m.pt")
    assert model.topology.n_agents == 12 and model.spec.arch == "H2"


def test_file_examples_train_through_the_cli(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = lambda *a: subprocess.run([sys.executable, *map(str, a)], capture_output=True, text=True,  # noqa: E731
                                    timeout=240, env=env, cwd=tmp_path)
    files = ROOT / "examples" / "files"
    p = run(files / "make_files.py", tmp_path / "data")
    assert p.returncode == 0, p.stderr
    for cfg, workers in (("npz.yaml", 1), ("csv.yaml", 2)):
        (tmp_path / cfg).write_text((files / cfg).read_text())  # beside data/, as in the example folder
        p = run("-m", "dhdnn", "train", tmp_path / cfg, "--workers", workers, "--out", tmp_path / f"run-{cfg}", "--no-progress",
                "--set", "train.epochs=3")
        assert p.returncode == 0, p.stderr[-3000:]
        assert float(p.stdout.split("test_acc ")[1].split()[0]) > 0.8


@pytest.mark.skipif(not hasattr(os, "sched_getscheduler"), reason="needs Linux scheduling policies")
def test_distribute_puts_gloos_threads_at_idle_priority_unless_told_not_to():
    """As dhdnn train's workers do: at normal priority gloo's transport threads spin on a core the
    compute needs (exchanges ~1-2 ms instead of ~0.1 ms on 2 cores); DHDNN_QUIET_GLOO=0 opts out."""
    from dhdnn.distributed.launch import run_local

    from ._workers import gloo_priority_worker

    for quiet, policy in (("1", os.SCHED_IDLE), ("0", os.SCHED_OTHER)):
        per_rank = run_local(gloo_priority_worker, 2, (quiet,), timeout_s=60, run_timeout_s=120)
        assert all(p and set(p) == {policy} for p in per_rank), (quiet, per_rank)
