"""Layer 2: the same training command under torchrun (c10d/env:// rendezvous) equals the local
launcher, and torchrun's elastic restart resumes from the last checkpoint, on one node and on two
simulated ones (127.0.0.1). Two nodes that each have their own network stack (exactness, bytes on
the link, the link cut) are in test_two_nodes."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from dhdnn import checkpoint as ckpt

RING = "launch/ring8_swiss_roll.yaml"
ARGS = ["--no-progress", "--set", "data.n_samples=400", "--set", "train.epochs=2", "--set", "train.batch_size=50",
        "--set", "model.layers=3", "--set", "run.dtype=float64", "--set", "run.trace=true"]


def torch_env(**extra):
    bin_dir = str(Path(sys.executable).parent)  # torchrun lives beside this interpreter
    return dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
                PATH=f"{bin_dir}:{os.environ.get('PATH', '')}", **extra)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def params(run):
    return ckpt.assemble(ckpt.load(ckpt.latest(run))[1])


def test_torchrun_matches_local_workers(tmp_path):
    env = torch_env()
    tr = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                         "-m", "dhdnn", "train", RING, "--out", str(tmp_path / "tr"), *ARGS],
                        capture_output=True, text=True, env=env, timeout=300)
    assert tr.returncode == 0, tr.stderr[-3000:]
    loc = subprocess.run([sys.executable, "-m", "dhdnn", "train", RING, "--workers", "2",
                          "--out", str(tmp_path / "loc"), *ARGS], capture_output=True, text=True, env=env, timeout=300)
    assert loc.returncode == 0, loc.stderr[-3000:]
    a, b = params(tmp_path / "tr"), params(tmp_path / "loc")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert json.loads((tmp_path / "tr" / "summary.json").read_text())["workers"] == 2
    for r in (0, 1):
        records = [json.loads(x) for x in (tmp_path / "tr" / f"trace-rank{r}.jsonl").read_text().splitlines()]
        m = records[0]
        assert {"step", "phase", "layer", "op", "src", "dst", "bytes"} <= set(m) and m["src"] == r
        assert {x["phase"] for x in records} == {"forward", "backward", "eval"}
        # training messages: the same number in every step
        per_step = [sum(1 for x in records if x["step"] == s and x["phase"] != "eval") for s in (0, 7)]
        assert per_step[0] == per_step[1] > 0


def restart_run(out: Path, port: int, nnodes: int = 1, nproc: int = 2, extra=(), fault="1:10:kill:0"):
    """The shipped multi-node script with one restart allowed and a worker killed in epoch 2."""
    env = torch_env(MAX_RESTARTS="1", NNODES=str(nnodes), NPROC=str(nproc), RDZV=f"127.0.0.1:{port}",
                    RDZV_ID=f"test{port}", DHDNN_FAULT=fault)
    return subprocess.run(["bash", "launch/torchrun_multi_node.sh", RING, "--out", str(out), *ARGS,
                           "--set", "train.epochs=3", *extra], capture_output=True, text=True, env=env, timeout=300)


def test_torchrun_restart_resumes_from_the_last_checkpoint(tmp_path):
    p = restart_run(tmp_path / "tr", free_port())
    assert p.returncode == 0, p.stderr[-4000:]
    # the worker was killed, and the restarted workers went on from the checkpoint
    assert "test fault: kill rank 1 at step 10" in p.stderr and "resumed from" in p.stderr
    lines = [json.loads(x) for x in (tmp_path / "tr" / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2, 3]
    loc = subprocess.run([sys.executable, "-m", "dhdnn", "train", RING, "--workers", "2", "--out", str(tmp_path / "loc"),
                          *ARGS, "--set", "train.epochs=3"], capture_output=True, text=True, env=torch_env(),
                         timeout=300)
    assert loc.returncode == 0, loc.stderr[-3000:]
    a, b = params(tmp_path / "tr"), params(tmp_path / "loc")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-9, atol=1e-9)


def two_nodes(out: Path, port: int, fault: str, epochs: int):
    """Two torchrun agents on this machine as two nodes (2 workers each) through the shipped
    multi-node script, laid out as 2 agent partitions x 2 replicas."""
    env = torch_env(MAX_RESTARTS="1", NNODES="2", NPROC="2", RDZV=f"127.0.0.1:{port}", RDZV_ID=f"nodes{port}",
                    DHDNN_FAULT=fault)
    cmd = ["bash", "launch/torchrun_multi_node.sh", RING, "--out", str(out), *ARGS, "--set", "run.replicas=2",
           "--set", "run.trace=false", "--set", f"train.epochs={epochs}", "--set", "run.timeout_s=30"]
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    results = [n.communicate(timeout=400) for n in nodes]
    return [n.returncode for n in nodes], [err for _, err in results]


def test_a_killed_worker_on_one_node_restarts_both_nodes_from_the_checkpoint(tmp_path):
    codes, errs = two_nodes(tmp_path / "nodes", free_port(), fault="3:6:kill:0", epochs=3)
    assert codes == [0, 0], "\n".join(e[-3000:] for e in errs)
    # the worker died, and the restarted workers went on from the checkpoint (torchrun names the first
    # failure it polled, which may be a peer's, so its "exitcode" line is not what is checked)
    assert any("test fault: kill rank 3 at step 6" in e for e in errs) and any("resumed from" in e for e in errs)
    lines = [json.loads(x) for x in (tmp_path / "nodes" / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2, 3]
    p = subprocess.run([sys.executable, "-m", "dhdnn", "train", RING, "--out", str(tmp_path / "one"), *ARGS,
                        "--set", "run.trace=false", "--set", "train.epochs=3"],
                       capture_output=True, text=True, env=torch_env(), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = params(tmp_path / "nodes"), params(tmp_path / "one")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-9, atol=1e-9)
