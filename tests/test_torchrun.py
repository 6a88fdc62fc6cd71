"""Layer 2: the same training command under torchrun (env:// rendezvous) equals the local launcher."""
import json
import os
import subprocess
import sys

import torch

from dhdnn import checkpoint as ckpt

ARGS = ["--no-progress", "--set", "data.n_samples=400", "--set", "train.epochs=2", "--set", "train.batch_size=50",
        "--set", "model.layers=3", "--set", "run.dtype=float64", "--set", "run.trace=true"]


def test_torchrun_matches_local_workers(tmp_path):
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    tr = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                         "-m", "dhdnn", "train", "launch/ring8_swiss_roll.yaml", "--out", str(tmp_path / "tr"), *ARGS],
                        capture_output=True, text=True, env=env, timeout=300)
    assert tr.returncode == 0, tr.stderr[-3000:]
    loc = subprocess.run([sys.executable, "-m", "dhdnn", "train", "launch/ring8_swiss_roll.yaml", "--workers", "2",
                          "--out", str(tmp_path / "loc"), *ARGS], capture_output=True, text=True, env=env, timeout=300)
    assert loc.returncode == 0, loc.stderr[-3000:]
    a = ckpt.load(ckpt.latest(tmp_path / "tr"))[1]
    b = ckpt.load(ckpt.latest(tmp_path / "loc"))[1]
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
