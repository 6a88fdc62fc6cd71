"""Layer 2: sharded checkpoints are partition-independent; export gives the same logits densely."""
import json

import pytest
import torch

from dhdnn import checkpoint as ckpt
from dhdnn.cli import main
from dhdnn.config import load_config
from dhdnn.export import dense_model_of_run, load_exported
from dhdnn.run import train_from_config
from dhdnn.train import load_data

COMMON = ["data.n_samples=400", "train.batch_size=50", "run.progress=false", "run.dtype=float64", "model.layers=3"]


def _cfg(out, workers, epochs):
    return load_config("launch/ring8_swiss_roll.yaml", COMMON + [f"run.out_dir={out}", f"run.workers={workers}",
                                                                  f"train.epochs={epochs}", "run.engine=sharded"])


def _blocks(run):
    return ckpt.assemble(ckpt.load(ckpt.latest(run))[1])


def test_run_saved_on_4_workers_resumes_on_2(tmp_path):
    train_from_config(_cfg(tmp_path / "a", 4, 2))
    train_from_config(_cfg(tmp_path / "a", 2, 4), resume=True)
    train_from_config(_cfg(tmp_path / "b", 3, 4))
    a, b = _blocks(tmp_path / "a"), _blocks(tmp_path / "b")
    assert set(a) == set(b) and len(a) >= 6
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-9, atol=1e-9)
    meta = json.loads((ckpt.latest(tmp_path / "a") / "meta.json").read_text())
    assert meta["shards"] == 2 and meta["epoch"] == 4
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3, 4]


def test_export_round_trip_and_cli(tmp_path, capsys):
    run = tmp_path / "r"
    train_from_config(_cfg(run, 2, 2))
    assert main(["export", str(run), "--out", str(tmp_path / "m.pt")]) == 0
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    assert payload["format"] == "dhdnn-export" and payload["arch"] == "H2" and payload["layers"] == 3
    assert payload["topology"]["name"] == "ring8"
    model = load_exported(tmp_path / "m.pt")
    cfg, reference, _ = dense_model_of_run(run)
    data = load_data(cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(data.x_test), reference(data.x_test), rtol=0, atol=0)
    # masked entries are exactly zero in the exported matrices
    K = payload["state_dict"]["body.K_p"]
    assert (K[:, ~payload["state_dict"]["body.mask_K_p"]] == 0).all()
    summary = json.loads((run / "summary.json").read_text())
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "m.pt"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["accuracy"] == pytest.approx(summary["test_acc"], abs=1e-12)
    assert main(["evaluate", str(run), "--split", "train", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(summary["train_acc"], abs=1e-12)


def test_bad_export_file_is_reported(tmp_path, capsys):
    bad = tmp_path / "x.pt"
    torch.save({"format": "other"}, bad)
    assert main(["evaluate", str(bad)]) == 2
    assert "key 'format'" in capsys.readouterr().err
    bad.write_bytes(b"not a torch file")
    assert main(["evaluate", str(bad)]) == 2
    assert "not a file torch.save wrote" in capsys.readouterr().err
    import fractions

    torch.save({"format": fractions.Fraction(1, 3)}, bad)  # loading it would run a constructor: refused
    assert main(["evaluate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "objects other than tensors" in err and "weights_only" not in err and len(err.strip().splitlines()) == 1


def _write_format1(run, table_of_names):
    """Rewrite the newest checkpoint of ``run`` in format 1: one tensor per named block."""
    d = ckpt.latest(run)
    meta, shards = ckpt.load(d)
    full = ckpt.assemble(shards)
    blocks, optim = table_of_names(full, shards)
    for s in d.glob("shard-*.pt"):
        s.unlink()
    torch.save({"format": "dhdnn-checkpoint", "version": 1, "blocks": blocks, "optim": optim, "extra": {}},
               d / "shard-0.pt")
    meta = {k: v for k, v in meta.items() if k not in ("shard_sizes", "topology", "optimizer_step")}
    (d / "meta.json").write_text(json.dumps({**meta, "version": 1, "shards": 1}))
    return full


def test_format_1_checkpoints_still_load(tmp_path):
    """Per-agent block names (sharded runs of format 1) map onto the block classes."""
    from dhdnn.blocks import BlockTable, named
    from dhdnn.models import ARCHITECTURES
    from dhdnn.topology import load_topology

    run = tmp_path / "old"
    train_from_config(_cfg(run, 2, 1))
    topo = load_topology("topologies/ring8.yaml")
    table = BlockTable(topo, ARCHITECTURES["H2"].agent_layout(), 3, 2)

    def by_name(full, shards):
        vals = named(table, full)
        moments = {k: named(table, ckpt.assemble([{"entries": {kk: {**v, "values": v["moments"][k]}
                                                               for kk, v in s["entries"].items()}} for s in shards]))
                   for k in ("exp_avg", "exp_avg_sq")}
        return vals, {n: {k: moments[k][n] for k in moments} for n in vals}

    _write_format1(run, by_name)
    train_from_config(_cfg(run, 3, 2), resume=True)  # resumes on 3 workers from format 1 ...
    assert json.loads((ckpt.latest(run) / "meta.json").read_text())["version"] == 2
    train_from_config(_cfg(tmp_path / "straight", 2, 2))  # ... exactly where an uninterrupted run ends
    a, b = _blocks(run), _blocks(tmp_path / "straight")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-9, atol=1e-9)
    # and a format-1 checkpoint exports: the dense model carries the saved blocks
    run2 = tmp_path / "old2"
    train_from_config(_cfg(run2, 2, 1))
    full2 = _write_format1(run2, by_name)
    _, model2, _ = dense_model_of_run(run2)
    from dhdnn.blocks import dense_packed

    for k, v in dense_packed(table, model2).items():
        torch.testing.assert_close(v, full2[k].to(v.dtype), rtol=0, atol=0)


def test_evaluate_asks_for_data_where_none_is_recorded(tmp_path, capsys):
    """A library export records no data unless given: ``dhdnn evaluate`` asks for it (exit 2)
    instead of evaluating on a default dataset; an export that records its data evaluates."""
    from dhdnn import build_network, export_model, load_topology
    from dhdnn.cli import main

    model = build_network(load_topology("topologies/ring8.yaml"), arch="H2", layers=2, h=0.5, n_outputs=2)
    export_model(model, tmp_path / "bare.pt")
    assert main(["evaluate", str(tmp_path / "bare.pt")]) == 2
    err = capsys.readouterr().err
    assert "key 'data'" in err and "--set data.name=" in err and len(err.strip().splitlines()) == 1, err
    assert main(["evaluate", str(tmp_path / "bare.pt"), "--set", "data.name=double_moons", "--json"]) == 0
    export_model(model, tmp_path / "m.pt", data={"name": "double_moons", "n_samples": 400})
    assert main(["evaluate", str(tmp_path / "m.pt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["samples"] == 200
