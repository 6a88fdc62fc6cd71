"""Random run configs killed and resumed: on the same layout the resumed run is the uninterrupted
one, and on another layout it is where the layouts themselves agree.

Each seed draws a run config as ``fuzz_verify.py`` does (topology, dims, pins, inputs, embeddings,
readout subset, architecture, task, kernel, readout, backprop, optimiser, batch), in float64 with a
checkpoint per epoch, and a second layout B (one process, or 2-4 workers as agent partitions x
replicas) besides its own, A. It trains 2 epochs on A and on B (uninterrupted), and 1 epoch on A
that it resumes twice, to 2 epochs, on A and on B. Checks, on the runs loaded as dense models:

* **same layout**: resumed on A equals 2 epochs on A within 1e-12 (the same sums in the same
  order: a resume that loses or alters any state — Adam's moments and step, the learning-rate
  schedule, the data order — differs from there on);
* **other layout**: resumed on B equals 2 epochs on A within 1e-6, where the two uninterrupted
  runs agree that far. Some drawn configs train chaotically (H1/H2 with h near 0.5 and batches of
  7-13: a 1e-13 change to the parameters grows to 1e-1 within 15 steps in one process), so that
  two layouts' rounding alone drifts apart; those count as chaotic, checked on the same layout only.

Layouts the product refuses for the config count as refused.

    python benchmarks/fuzz_resume.py --seeds 0 100      # 567 s on this 2-core machine
    python benchmarks/fuzz_resume.py --auto ...          # B may also be run.replicas: auto
Writes benchmarks/results/fuzz_resume.json (one record per seed) and prints a line per seed.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from fuzz_verify import case, write_regression  # noqa: E402

from dhdnn.checks import CheckFailed, check_same_network  # noqa: E402
from dhdnn.config import config_from_dict  # noqa: E402
from dhdnn.export import dense_model_of_run  # noqa: E402
from dhdnn.run import train_from_config  # noqa: E402
from dhdnn.train import load_data  # noqa: E402

SAME_TOL, OTHER_TOL = 1e-12, 1e-6
LAYOUTS = [(1, 1), (2, 1), (3, 1), (4, 1), (2, 2), (4, 2)]  # (workers, replicas); (1, 1): one process
AUTO = [(2, "auto"), (3, "auto"), (4, "auto")]  # --auto: layout B may leave (P, R) to run.replicas: auto


def _cfg(raw: dict, seed: int, out: Path, layout: tuple[int, int], epochs: int):
    raw = copy.deepcopy(raw)
    raw["train"].update(epochs=epochs, checkpoint_every=1)
    raw["run"].update(dtype="float64", out_dir=str(out), progress=False, workers=layout[0], replicas=layout[1])
    if layout[0] == 1:
        raw["run"]["engine"] = "dense"
    return config_from_dict(raw, f"<fuzz {seed}>")


def _train(cfg, resume: bool = False) -> None:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        train_from_config(cfg, resume=resume)


def one(seed: int, reg: str, tmp: Path, auto: bool = False) -> dict:
    raw, workers, replicas = case(seed, reg)
    r = random.Random(1000 + seed)
    a = (workers[0], replicas)
    b = r.choice([lay for lay in LAYOUTS + (AUTO if auto else []) if lay != a])
    rec = {"seed": seed, "a": a, "b": b}
    try:
        _train(_cfg(raw, seed, tmp / "full_a", a, 2))
        _train(_cfg(raw, seed, tmp / "full_b", b, 2))
        _train(_cfg(raw, seed, tmp / "cut_a", a, 1))
        shutil.copytree(tmp / "cut_a", tmp / "cut_b")
        _train(_cfg(raw, seed, tmp / "cut_a", a, 2), resume=True)
        _train(_cfg(raw, seed, tmp / "cut_b", b, 2), resume=True)
    except ValueError as e:  # the product's own refusals (ConfigError, TopologyError, RunDirError): one line
        return dict(rec, result=f"refused: {str(e).splitlines()[0]}")
    except Exception as e:  # a crash is a finding
        return dict(rec, result=f"FAILED ({type(e).__name__}) {str(e).splitlines()[0] if str(e) else ''}")
    if b[1] == "auto":  # the (P, R) it chose
        rec["b_chosen"] = [json.loads((tmp / k / "summary.json").read_text())["layout"]["agents"] for k in ("full_b", "cut_b")]
    m = {k: dense_model_of_run(tmp / k)[1] for k in ("full_a", "full_b", "cut_a", "cut_b")}
    probe = load_data(_cfg(raw, seed, tmp / "full_a", a, 2)).x_test[:16].to(next(m["full_a"].parameters()).dtype)
    lr = raw["train"]["lr"]
    try:
        rec["same"] = check_same_network(m["cut_a"], m["full_a"], probe, SAME_TOL, lr)
    except CheckFailed as e:
        return dict(rec, result=f"FAILED same layout: {e}")
    try:
        rec["layouts"] = check_same_network(m["full_b"], m["full_a"], probe, OTHER_TOL, lr)
    except CheckFailed as e:
        return dict(rec, result="chaotic", layouts=str(e))
    try:
        rec["other"] = check_same_network(m["cut_b"], m["full_a"], probe, OTHER_TOL, lr)
    except CheckFailed as e:
        return dict(rec, result=f"FAILED other layout: {e}")
    return dict(rec, result="ok")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs=2, default=[0, 40], metavar=("FIRST", "END"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/fuzz_resume.json"))
    ap.add_argument("--auto", action="store_true", help="layout B may also be 2-4 workers with run.replicas: auto "
                    "(another draw of B per seed than without it)")
    args = ap.parse_args()
    records = []
    with tempfile.TemporaryDirectory(prefix="dhdnn-fuzz-resume-") as tmp:
        reg = write_regression(Path(tmp))
        for seed in range(*args.seeds):
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory(dir=tmp) as d:
                rec = one(seed, reg, Path(d), args.auto)
            rec["seconds"] = round(time.perf_counter() - t0, 1)
            records.append(rec)
            nums = ", ".join(f"{k} {rec[k]:.2g}" for k in ("same", "layouts", "other") if isinstance(rec.get(k), float))
            print(f"{seed:4d} {rec['a']} -> {rec['b']}: {rec['result']}" + (f" ({nums})" if nums else ""), flush=True)
    Path(args.out).write_text(json.dumps(records, indent=1))
    counts = {k: sum(r["result"].startswith(k) for r in records) for k in ("ok", "chaotic", "FAILED", "refused")}
    worst = {k: max((r[k] for r in records if isinstance(r.get(k), float)), default=0.0) for k in ("same", "other")}
    print(f"{counts['ok']} ok, {counts['chaotic']} chaotic (same layout ok), {counts['FAILED']} failed, "
          f"{counts['refused']} refused; worst: same layout {worst['same']:.2g}, other layout {worst['other']:.2g}; "
          f"{sum(r['seconds'] for r in records):.0f} s -> {args.out}")

if __name__ == "__main__":
    main()
