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


def test_a_format_1_checkpoint_is_refused_in_one_line_naming_it(tmp_path, capsys):
    """Format 1 (one tensor per named block, the first days' format) is no longer read: resume and
    export say so in one line naming the file, and nothing in the run directory changes."""
    run = tmp_path / "old"
    train_from_config(_cfg(run, 1, 1))
    d = ckpt.latest(run)
    meta = json.loads((d / "meta.json").read_text())
    (d / "meta.json").write_text(json.dumps({**meta, "version": 1}))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.suffix != ".lock"}
    sets = [a for kv in COMMON + ["train.epochs=2", "run.engine=sharded"] for a in ("--set", kv)]
    for argv in (["train", "launch/ring8_swiss_roll.yaml", "--resume", "--out", str(run), *sets],
                 ["export", str(run), "--out", str(tmp_path / "m.pt")]):
        assert main(argv) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("dhdnn: error: ") and str(d / "meta.json") in last and "format 1" in last, last
    assert {p: p.read_bytes() for p in before} == before and not (tmp_path / "m.pt").exists()


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
