"""A user's own data without code: npz / npy / csv files and factories, through ``dhdnn train``
on 1 and 2 workers; every bad input is refused with one line naming the file and the key,
exit code 2, before anything is written; regression end to end (metrics, pictures, export)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dhdnn.config import ConfigError, load_config
from dhdnn.train import load_data

TOPO = {"name": "ring4", "generator": {"kind": "ring", "agents": 4}, "defaults": {"dim": 2}}  # feature f -> agent f


def blobs(n=240, seed=0, features=3, classes=3):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.standard_normal((n, features)) * 0.5 + y[:, None]
    return x.astype(np.float32), y


def write_config(d: Path, data: dict, model=None, topology=TOPO, name="run.yaml") -> Path:
    cfg = {"topology": topology, "model": {"arch": "H2", "layers": 3, "h": 0.4, "init_std": 0.5, **(model or {})},
           "data": data, "train": {"epochs": 2, "batch_size": 40, "lr": 0.02},
           "run": {"out_dir": str(d / "run"), "progress": False}}
    path = d / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def factory_module(d: Path) -> None:
    (d / "mydata.py").write_text(
        "import numpy as np\n"
        "def make(n=240, seed=0):\n"
        "    rng = np.random.default_rng(seed)\n"
        "    y = rng.integers(0, 3, n)\n"
        "    x = rng.standard_normal((n, 3)) * 0.5 + y[:, None]\n"
        "    return {'x_train': x[:180], 'y_train': y[:180], 'x_test': x[180:], 'y_test': y[180:]}\n"
        "def broken():\n"
        "    raise RuntimeError('disk on fire')\n"
        "def field(n=200):\n"
        "    x = np.linspace(-1, 1, 2 * n).reshape(n, 2)\n"
        "    return x, np.stack([x[:, 1], -np.sin(x[:, 0])], 1)\n")


# ---- the readers ------------------------------------------------------------------------------
def test_npz_npy_csv_and_factory_read_the_same_arrays(tmp_path):
    x, y = blobs()
    np.savez(tmp_path / "d.npz", X=x[:180], Y=y[:180], Xt=x[180:], Yt=y[180:])
    (tmp_path / "npy").mkdir()
    for k, v in {"x_train": x[:180], "y_train": y[:180], "x_test": x[180:], "y_test": y[180:]}.items():
        np.save(tmp_path / "npy" / f"{k}.npy", v)
    rows = np.concatenate([y[:, None], x], 1)
    np.savetxt(tmp_path / "train.csv", rows[:180], delimiter=",", header="label,a,b,c", comments="")
    np.savetxt(tmp_path / "test.csv", rows[180:], delimiter=",", header="label,a,b,c", comments="")
    factory_module(tmp_path)
    cases = {
        "npz": {"name": "npz", "path": str(tmp_path / "d.npz"),
                "keys": {"x_train": "X", "y_train": "Y", "x_test": "Xt", "y_test": "Yt"}},
        "npy": {"name": "npz", "path": str(tmp_path / "npy")},
        "csv": {"name": "csv", "path": str(tmp_path / "train.csv"), "test_path": str(tmp_path / "test.csv"),
                "target": "label"},
        "csv by index": {"name": "csv", "path": str(tmp_path / "train.csv"), "test_path": str(tmp_path / "test.csv"),
                         "target": 0, "features": [1, 2, 3]},
        "factory": {"factory": "mydata:make"},
    }
    for what, data in cases.items():
        cfg = load_config(write_config(tmp_path, data))
        d = load_data(cfg)
        assert d.n_classes == 3 and d.n_features == 3 and len(d.x_train) == 180 and len(d.x_test) == 60, what
        torch.testing.assert_close(d.x_train, torch.as_tensor(x[:180]), rtol=1e-6, atol=1e-6, msg=what)
        assert torch.equal(d.y_test, torch.as_tensor(y[180:])), what


def test_a_missing_test_split_is_drawn_by_the_seed(tmp_path):
    x, y = blobs(200)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y)
    a = load_data(load_config(write_config(tmp_path, {"name": "npz", "path": str(tmp_path / "d.npz"),
                                                      "train_fraction": 0.75, "seed": 3})))
    b = load_data(load_config(write_config(tmp_path, {"name": "npz", "path": str(tmp_path / "d.npz"),
                                                      "train_fraction": 0.75, "seed": 3})))
    c = load_data(load_config(write_config(tmp_path, {"name": "npz", "path": str(tmp_path / "d.npz"),
                                                      "train_fraction": 0.75, "seed": 4})))
    assert len(a.x_train) == 150 and len(a.x_test) == 50
    assert torch.equal(a.x_test, b.x_test) and not torch.equal(a.x_test, c.x_test)


def test_relative_data_paths_are_found_beside_the_config_and_recorded_absolute(tmp_path):
    (tmp_path / "cfgdir").mkdir()
    x, y = blobs()
    np.savez(tmp_path / "cfgdir" / "d.npz", x_train=x, y_train=y)
    cfg = load_config(write_config(tmp_path / "cfgdir", {"name": "npz", "path": "d.npz"}))
    assert Path(cfg.data.path).is_absolute() and Path(cfg.data.path).exists()
    assert load_data(cfg).n_features == 3


# ---- every bad input: one line, the file and the key, exit code 2, nothing written ---------------
def _bad_cases(d: Path):
    x, y = blobs()
    cases = {}

    def npz(name, key_hint, **arrays):
        base = {"x_train": x, "y_train": y, "x_test": x[:20], "y_test": y[:20]}
        base.update(arrays)
        np.savez(d / f"{name}.npz", **{k: v for k, v in base.items() if v is not None})
        cases[name] = ({"name": "npz", "path": str(d / f"{name}.npz")}, None, [f"{name}.npz", key_hint])

    npz("shape", "key 'x_train'", x_train=x[:, 0])
    x_nan = x.copy()
    x_nan[7, 1] = np.nan
    npz("nonfinite", "key 'x_train'", x_train=x_nan)
    npz("fraction", "key 'y_train'", y_train=y + 0.5)
    npz("negative", "key 'y_test'", y_test=-np.ones(20, int))
    npz("outofrange", "key 'y_test'", y_test=np.full(20, 7))
    npz("oneclass", "key 'y_train'", y_train=np.zeros(len(y), int))
    npz("testfeatures", "key 'x_test'", x_test=x[:20, :2])
    npz("count", "key 'y_train'", y_train=y[:-3])
    np.savez(d / "missing.npz", X=x, y=y)
    cases["missing key"] = ({"name": "npz", "path": str(d / "missing.npz")}, None, ["missing.npz", "key 'x_train'"])
    # labels out of range for a declared number of classes
    cases["n_classes"] = ({"name": "npz", "path": str(d / "outofrange.npz"), "n_classes": 3}, None,
                          ["outofrange.npz", "key 'y_test'"])
    # csv: a word in a number column, an unknown target column
    (d / "words.csv").write_text("a,b,c,label\n1,2,3,0\n1,two,3,1\n")
    cases["csv words"] = ({"name": "csv", "path": str(d / "words.csv"), "target": "label"}, None,
                          ["words.csv", "line 3, column 'b' (key 'data.features'): 'two' is not a number"])
    # a nan in a target cell: the file's line as an editor counts it (a blank line included) and the column's name
    (d / "nan.csv").write_text("a,b,c,label\n1,2,3,0\n\n1,2,3,nan\n" + "".join(f"{i},{i},{i},{i % 2}\n"
                                                                              for i in range(20)))
    cases["csv nan"] = ({"name": "csv", "path": str(d / "nan.csv"), "target": "label"}, None,
                        ["nan.csv", "line 4, column 'label' (key 'data.target'): non-finite value nan"])
    (d / "text.npz").write_text("x_train,y_train\n1,2\n")
    cases["npz text"] = ({"name": "npz", "path": str(d / "text.npz")}, None,
                         ["text.npz", "key 'data.path': not an .npz (zip) archive"])
    (d / "ok.csv").write_text("a,b,c,label\n" + "".join(f"{i},{i},{i},{i % 2}\n" for i in range(20)))
    cases["csv target"] = ({"name": "csv", "path": str(d / "ok.csv"), "target": "klass"}, None,
                           ["ok.csv", "key 'data.target'"])
    cases["csv missing"] = ({"name": "csv", "path": str(d / "nope.csv")}, None, ["nope.csv"])
    (d / "latin1.csv").write_bytes("a,b,c,label\n1,2,3,0\n1,2,3,1 # é\n".encode("latin-1"))  # once a traceback
    cases["csv not utf-8"] = ({"name": "csv", "path": str(d / "latin1.csv")}, None,
                              ["latin1.csv", "not UTF-8 text (line 3, byte 0xe9)"])
    # factories: not importable, raising, returning the wrong thing
    factory_module(d)
    cases["factory import"] = ({"factory": "no_such_module:make"}, None, ["key 'data.factory'", "no_such_module"])
    cases["factory raises"] = ({"factory": "mydata:broken"}, None, ["mydata.py:broken", "disk on fire"])
    cases["factory function"] = ({"factory": "mydata:nothing"}, None, ["key 'data.factory'", "nothing"])
    # features the topology would not read: 3 features, a topology reading 2
    two = dict(TOPO, inputs=[{"feature": 0, "agent": 0}, {"feature": 1, "agent": 1}])
    cases["unread features"] = ({"name": "npz", "path": str(d / "n_classes_ok.npz")}, two,
                                ["n_classes_ok.npz", "key 'x_train'", "[2]"])
    np.savez(d / "n_classes_ok.npz", x_train=x, y_train=y, x_test=x[:20], y_test=y[:20])
    # a topology reading a feature the data does not have
    five = dict(TOPO, inputs=[{"feature": 4, "agent": 0}])
    cases["missing feature"] = ({"name": "npz", "path": str(d / "n_classes_ok.npz")}, five,
                                ["inputs[0].feature"])
    # regression targets for a classifier, class labels for a regression
    np.savez(d / "real.npz", x_train=x, y_train=x[:, :2], x_test=x[:20], y_test=x[:20, :2])
    cases["real targets"] = ({"name": "npz", "path": str(d / "real.npz")}, None, ["real.npz", "key 'y_train'"])
    cases["regress labels"] = ({"name": "digits"}, "regress", ["key 'model.task'"])
    return cases


def test_every_bad_input_is_one_line_with_exit_code_2_and_writes_nothing(tmp_path, capsys):
    """In-process (``dhdnn.cli.main`` is what the console script exits with), to keep CI short."""
    from dhdnn.cli import main

    cases = _bad_cases(tmp_path)
    for i, (what, (data, topo, needles)) in enumerate(cases.items()):
        d = tmp_path / f"case{i}"
        d.mkdir()
        factory_module(d)  # beside the config
        model = {"task": "regress"} if topo == "regress" else None
        topology = TOPO if topo in (None, "regress") else topo
        if data.get("name") == "digits":
            topology = None
            model = {**model, "dim": 64}
        cfg = write_config(d, data, model=model, topology=topology)
        code = main(["train", str(cfg)])
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2, (what, err[-2000:])
        assert len(lines) == 1 and lines[0].startswith("dhdnn: error: "), (what, err)
        assert "pickle" not in lines[0], (what, lines[0])  # never unsafe loading advice
        assert not what.startswith("csv") or " row " not in lines[0], lines[0]  # a file's lines, not array rows
        for needle in needles:
            assert needle in lines[0], (what, needle, lines[0])
        assert not (d / "run").exists(), what  # refused before the run directory was made


# ---- training through the CLI, 1 and 2 workers ---------------------------------------------------
@pytest.mark.parametrize("kind", ["npz", "csv", "factory"])
def test_user_data_trains_on_one_and_two_workers(kind, tmp_path, monkeypatch):
    """The command in this process (the console command's start-up is tested elsewhere): from the
    data's directory, the factory module importable from there as the console finds it."""
    from dhdnn.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    x, y = blobs(300)
    np.savez(tmp_path / "d.npz", x_train=x[:240], y_train=y[:240], x_test=x[240:], y_test=y[240:])
    rows = np.concatenate([x, y[:, None]], 1)
    np.savetxt(tmp_path / "d.csv", rows, delimiter=",", fmt="%.6g")  # no header: columns by index
    factory_module(tmp_path)
    data = {"npz": {"name": "npz", "path": "d.npz"}, "csv": {"name": "csv", "path": "d.csv", "train_fraction": 0.8},
            "factory": {"factory": "mydata:make", "options": {"n": 300}}}[kind]
    cfg = write_config(tmp_path, data)
    summaries = []
    for workers in (1, 2):
        out = tmp_path / f"run{workers}"
        assert main(["train", str(cfg), "--workers", str(workers), "--out", str(out), "--set", "run.dtype=float64",
                     "--no-progress"]) == 0
        summaries.append(json.loads((out / "summary.json").read_text()))
    # the same network on 1 and 2 workers (float64): the same accuracy
    assert [s["workers"] for s in summaries] == [1, 2]
    assert summaries[0]["test_acc"] == summaries[1]["test_acc"] and summaries[0]["test_acc"] > 0.5


def test_regression_end_to_end(tmp_path, monkeypatch, capsys):
    """``model.task: regress``: mean squared error as loss and metric, 2 workers equal one process,
    pictures, export and evaluate all speak MSE (the commands in this process, from the data's
    directory)."""
    from dhdnn.cli import main

    factory_module(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # the factory module, as the console command finds it
    cfg = write_config(tmp_path, {"factory": "mydata:field", "train_fraction": 0.75},
                       model={"task": "regress"}, topology=dict(TOPO, inputs=[{"feature": 0, "agent": 0},
                                                                              {"feature": 1, "agent": 2}]))
    runs = []
    for workers in (1, 2):
        out = tmp_path / f"run{workers}"
        capsys.readouterr()
        assert main(["train", str(cfg), "--workers", str(workers), "--out", str(out), "--set", "run.dtype=float64",
                     "--set", "train.epochs=4", "--no-progress"]) == 0
        assert "test_mse" in capsys.readouterr().out
        runs.append(out)
    rows = [json.loads(ln) for ln in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["test_mse"] < rows[0]["test_mse"] and "test_acc" not in rows[-1]
    a, b = (json.loads((r / "summary.json").read_text()) for r in runs)
    assert a["task"] == "regress" and abs(a["test_mse"] - b["test_mse"]) <= 1e-9 * a["test_mse"]
    assert main(["plot", str(runs[1])]) == 0
    printed = capsys.readouterr().out
    assert {"curves.png", "predictions.png", "vector_field.png"} <= {Path(x).name for x in printed.split()}
    assert main(["export", str(runs[1]), "--out", str(tmp_path / "m.pt")]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "m.pt"), "--json"]) == 0
    assert abs(json.loads(capsys.readouterr().out)["mse"] - b["test_mse"]) <= 1e-9 * b["test_mse"]


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="key 'data.factory'"):
        load_config(None, ["data.name=npz", "data.factory=a:b"])
    with pytest.raises(ConfigError, match="key 'data.header'"):
        load_config(None, ["data.header=maybe"])
    with pytest.raises(ConfigError, match="key 'model.task'"):
        load_config(None, ["model.task=cluster"])
