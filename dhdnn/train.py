"""One training loop for every engine: the :class:`Trainer` owns epochs, batches, the optimiser,
the schedule, metrics, checkpoints and resume; what differs between runtimes is behind
:class:`~dhdnn.engine.Engine`. A non-finite loss or gradient stops training before the optimiser
touches the parameters (:class:`NonFiniteError`), so nothing non-finite is ever saved.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

from . import checkpoint as ckpt
from .config import DTYPE_NAMES, Config, ConfigError
from .data import FILE_DATASETS, Dataset, load_dataset
from .engine import Engine
from .integrator import fused

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}  # run.dtype -> torch dtype


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient; the run stops with exit code 3."""

    exit_code = 3


def load_data(cfg: Config) -> Dataset:
    """The run's dataset in the run's dtype; a user's own data (npz, csv, factory) is validated
    here, with one-line errors naming the file and the key."""
    dc, task = cfg.data, cfg.model.task
    if dc.name in FILE_DATASETS:
        from .datafiles import load_user_data

        ds = load_user_data(dc, task, cfg.source)
    else:
        if task != "classify":
            raise ConfigError(f"{cfg.source}: key 'model.task': data.name {dc.name} holds class labels; expected "
                              "classify, or real targets from npz, csv or a factory for regress")
        ds = load_dataset(dc.name, dc.n_samples, dc.train_fraction, dc.noise, dc.seed, dc.path)
        if dc.class_names:
            ds = dataclasses.replace(ds, class_names=tuple(dc.class_names))
    return ds.to(DTYPES[cfg.run.dtype])


def make_optimizer(groups, tc) -> torch.optim.Optimizer:
    """The run's optimiser (``train.optimizer``, ``train.lr``): Adam with its fused kernel (one
    pass over each parameter: 6x faster than the multi-tensor path over the 10 M parameters of a
    4,096-agent grid here; multi-tensor where a torch build has none), or SGD with momentum 0.9."""
    if tc.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=tc.lr, momentum=0.9, foreach=True)
    try:
        return torch.optim.Adam(groups, lr=tc.lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(groups, lr=tc.lr, foreach=True)


def finite_json(record: dict, indent: int | None = None) -> str:
    """Strict JSON: non-finite numbers become null."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    return json.dumps(clean, allow_nan=False, indent=indent)


class Trainer:
    """Epoch loop, optimiser, schedule, metrics and checkpoints around an :class:`Engine`."""

    def __init__(self, cfg: Config, engine: Engine, data: Dataset, resume: bool = False,
                 fingerprint: str | None = None, log=None, extra_summary: dict | None = None):
        self.cfg, self.engine, self.data = cfg, engine, data
        self.extra_summary = extra_summary or {}
        # what the run's own timing says (summary.json "timing"): first step, checkpoint saves and load
        self.timing = {"first_step_start_unix": None, "first_step_unix": None, "kernel_compile_seconds": None,
                       "checkpoint_save_seconds": [], "checkpoint_load_seconds": None}
        self.out = Path(cfg.run.out_dir)
        self.fingerprint = fingerprint  # the topology's content hash (None: no topology)
        tc = cfg.train
        groups = engine.optimizer_groups(tc.weight_decay)
        self.opt = make_optimizer(groups, tc)
        self.params = [p for g in groups for p in g["params"]]
        self.epoch, self.step = 0, 0
        # skipped (unreadable) checkpoints and the one resumed from, said once (by the main rank)
        self.log = log or (lambda msg: print(f"dhdnn: {msg}", file=sys.stderr, flush=True) if engine.is_main else None)
        if resume:
            self._resume()

    # ---- checkpoints ------------------------------------------------------------------
    def _moments(self) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq") if self.cfg.train.optimizer == "adam" else ("momentum_buffer",)

    def save(self) -> None:
        t0 = time.perf_counter()
        eng = self.engine
        spec = getattr(eng, "spec", None)  # what defines the network: exports need no data
        ckpt.save_all(self.out, self.step, eng.entries(), self.opt, eng.shard_rank, eng.is_main, eng.barrier,
                      {"epoch": self.epoch, "shards": eng.shard_count, "topology": self.fingerprint,
                       "config": self.cfg.to_dict(), **({"network": spec.to_dict()} if spec is not None else {})},
                      self._moments())
        self.timing["checkpoint_save_seconds"].append(time.perf_counter() - t0)

    def _resume(self) -> None:
        t0 = time.perf_counter()
        meta = ckpt.resume(self.out, self.engine.entries(), self.opt, self._check_compatible, self.log,
                           self._moments())
        self.epoch, self.step = int(meta["epoch"]), int(meta["step"])
        self.log(f"resumed from {self.out} at epoch {self.epoch}, step {self.step}")
        if self.engine.is_main:
            self._truncate_logs()
        self.timing["checkpoint_load_seconds"] = time.perf_counter() - t0

    def _truncate_logs(self) -> None:
        """Drop log lines written after the checkpoint we resume from (a crash, or a fallback to
        an older checkpoint), so that every epoch appears once."""
        for name, key, last in (("metrics.jsonl", "epoch", self.epoch), ("grad_norms.jsonl", "step", self.step - 1)):
            path = self.out / name
            if path.exists():
                keep = [r for r in ckpt.read_log(path) if r[key] <= last]
                ckpt.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))

    def _check_compatible(self, d: Path, meta: dict) -> None:
        """The same model and topology (run directories check this earlier, with details)."""
        if meta.get("config", {}).get("model") != self.cfg.to_dict()["model"]:
            raise ckpt.CheckpointError(f"{d}: key 'model' differs between the checkpoint and this config; "
                                       "resume with the same model")
        if meta.get("topology", self.fingerprint) != self.fingerprint:
            raise ckpt.CheckpointError(f"{d}: key 'topology' differs from the one the run was trained on; "
                                       "resume with the same topology")

    # ---- the loop -----------------------------------------------------------------------
    def _lr(self, epoch: int) -> float:
        tc = self.cfg.train
        return tc.lr * (tc.lr_gamma ** (epoch // tc.lr_step) if tc.lr_step else 1.0)

    def _batches(self, epoch: int) -> list[Tensor]:
        g = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.data.x_train), generator=g)
        bs = self.cfg.train.batch_size
        return [perm[i:i + bs] for i in range(0, len(perm), bs)]

    def _check_finite(self, stats: Tensor) -> None:
        """Stop before the optimiser step if this rank's loss or any of its gradients is not finite."""
        where = f"epoch {self.epoch + 1}, step {self.step}"
        loss = float(stats[0] / max(float(stats[2]), 1.0)) if float(stats[2]) else 0.0
        if not math.isfinite(loss):
            raise NonFiniteError(f"non-finite loss {loss} at {where}; lower train.lr or raise train.alpha")
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            norm = float(torch.stack(torch._foreach_norm(grads)).norm())
            if not math.isfinite(norm):
                raise NonFiniteError(f"non-finite gradient (norm {norm}) at {where} on rank {self.engine.rank}; "
                                     "lower train.lr or raise train.alpha")

    def run_epoch(self) -> dict:
        tc, d = self.cfg.train, self.data
        for group in self.opt.param_groups:
            group["lr"] = self._lr(self.epoch)
        t0 = time.perf_counter()
        acc = torch.zeros(4, dtype=torch.float64)
        batches = self._batches(self.epoch)
        for idx in batches:
            if self.timing["first_step_start_unix"] is None:
                self.timing["first_step_start_unix"] = time.time()
            record = bool(tc.grad_norm_every) and self.step % tc.grad_norm_every == 0
            self.opt.zero_grad(set_to_none=True)
            out = self.engine.objective(d.x_train[idx], d.y_train[idx], tc.alpha, record)
            stats = out.stats.detach().double().cpu()
            self._check_finite_loss(stats)
            out.objective.backward()
            self.engine.after_backward()
            self._check_finite(stats)
            self.opt.step()
            if self.timing["first_step_unix"] is None:
                self.timing["first_step_unix"] = time.time()
                # compiling (or loading from numba's cache) the fused kernel, in this process so far
                self.timing["kernel_compile_seconds"] = fused.COMPILE["seconds"]
            acc += stats
            if record and out.grad_norms is not None:  # (every rank: a logging reduction)
                norms = self.engine.reduce_sum(out.grad_norms()).sqrt().tolist()
                if self.engine.is_main:
                    self._append("grad_norms.jsonl", {"step": self.step, "norms": norms})
            self.step += 1
        seconds = time.perf_counter() - t0
        self.epoch += 1
        self.engine.end_epoch()
        acc = self.engine.reduce_sum(acc)
        drift = self._reversible_drift()
        return {"epoch": self.epoch, "step": self.step, "lr": self._lr(self.epoch - 1),
                "loss": float(acc[0] / acc[2]), "regularizer": float(acc[3] / len(batches)),
                **self.evaluate(), **drift, "seconds": seconds}

    def _reversible_drift(self) -> dict:
        """Reversible backprop's certificate over the epoch: the largest relative drift of a
        rebuilt state on any rank (0 in exact mode, which stops at any difference), reduced with
        the epoch's statistics. Above ``run.reversible_tolerance`` the run warns once, and with
        ``reversible_anchor_every: auto`` stores four times as many anchors from the next epoch on
        (measured: each halving of the anchor spacing cuts the drift about tenfold)."""
        rc = self.cfg.run
        if rc.backprop != "reversible":
            return {}
        drift = float(self.engine.reduce_max(torch.tensor([self.engine.take_drift()], dtype=torch.float64))[0])
        self.max_drift = max(getattr(self, "max_drift", 0.0), drift)
        tol = rc.tolerance()
        if drift > tol:
            if self.engine.is_main and not getattr(self, "_warned_drift", False):
                print(f"dhdnn: warning: reversible backprop's rebuilt states drifted {drift:.3g} (relative) from the "
                      f"forward's in epoch {self.epoch}, above run.reversible_tolerance {tol:g}; gradients are that "
                      "inexact. Use run.reversible_state: fixed (exact), or anchors (run.reversible_anchor_every)",
                      file=sys.stderr, flush=True)
                self._warned_drift = True
            if rc.reversible_anchor_every == "auto" and self.epoch < self.cfg.train.epochs:
                current = getattr(self, "_anchors", 0)
                self._anchors = max(1, (current or self.cfg.model.layers) // 4)
                self.engine.set_anchor_every(self._anchors)
                if self.engine.is_main:
                    print(f"dhdnn: reversible_anchor_every auto: an anchor every {self._anchors} layers from epoch "
                          f"{self.epoch + 1}", file=sys.stderr, flush=True)
        return {"reversible_drift": drift}

    def _check_finite_loss(self, stats: Tensor) -> None:
        """The loss is known before backward: stop there, so no rank computes from it."""
        if float(stats[2]) and not math.isfinite(float(stats[0])):
            self._check_finite(stats)

    def _append(self, name: str, record: dict) -> None:
        with open(self.out / name, "a") as f:
            f.write(finite_json(record) + "\n")

    def _tensorboard(self):
        """A SummaryWriter into RUN/tensorboard (main rank), or None (off, or not installed under auto)."""
        want = self.cfg.run.tensorboard
        if not self.engine.is_main or want is False:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            if want is True:
                raise RuntimeError("run.tensorboard: true needs the tensorboard package "
                                   "(pip install 'dhdnn[tensorboard]')") from None
            return None
        return SummaryWriter(str(self.out / "tensorboard"))

    def fit(self) -> dict:
        cfg, main = self.cfg, self.engine.is_main
        board = self._tensorboard()
        bar = None
        if main and cfg.run.progress:
            from tqdm import tqdm

            # disable=None: no bar where stderr is not a terminal (a log file would get every redraw)
            bar = tqdm(total=cfg.train.epochs, initial=self.epoch, desc=f"{cfg.model.arch} train", unit="epoch",
                       disable=None)
        t_start, last = time.perf_counter(), None
        every = cfg.train.checkpoint_every
        while self.epoch < cfg.train.epochs:
            last = self.run_epoch()
            if main:
                self._append("metrics.jsonl", last)
            if board is not None:
                for k, v in last.items():
                    if k not in ("epoch", "step") and isinstance(v, float) and math.isfinite(v):
                        board.add_scalar(k, v, self.epoch)
                board.flush()
            if (every and self.epoch % every == 0) or self.epoch == cfg.train.epochs:
                self.save()
            if bar is not None:
                bar.update(1)
                key = f"test_{self.engine.task.metric}"
                bar.set_postfix({"loss": f"{last['loss']:.4f}", key: f"{last[key]:.4f}"})
        if bar is not None:
            bar.close()
        if board is not None:
            board.close()
        if last is None:  # resumed a finished run: re-evaluate
            last = self.evaluate()
        wall = time.perf_counter() - t_start
        latest = ckpt.latest(self.out)
        self.timing["checkpoint_bytes"] = sum(p.stat().st_size for p in latest.glob("shard-*.pt")) if latest else 0
        metric = self.engine.task.metric
        summary = {"task": self.engine.task.name, f"train_{metric}": last[f"train_{metric}"],
                   f"test_{metric}": last[f"test_{metric}"], "loss": last.get("loss", last["train_loss"]),
                   "epochs": self.epoch, "steps": self.step, "wall_seconds": wall,
                   "workers": self.engine.world, "timing": self.timing,
                   **({"reversible_drift": self.max_drift} if hasattr(self, "max_drift") else {}),
                   "memory": {"peak_rss_per_rank": self._peak_rss_per_rank()}, **self.extra_summary,
                   "config": cfg.to_dict()}
        if main:
            ckpt.atomic_write_text(self.out / "summary.json", finite_json(summary, indent=1))
        return summary

    def _peak_rss_per_rank(self) -> list[int]:
        """Every rank's peak resident memory (Linux ``VmHWM``; 0 where unknown), gathered once."""
        try:
            hwm = next(int(ln.split()[1]) * 1024 for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
        except (OSError, StopIteration):
            hwm = 0
        mine = torch.zeros(self.engine.world, dtype=torch.float64)
        mine[self.engine.rank] = hwm
        return [int(v) for v in self.engine.reduce_sum(mine).tolist()]

    def evaluate(self) -> dict:
        """The task's metric (accuracy, or mean squared error) of both splits and their losses
        (summed over ranks; outside forward/backward)."""
        d, task = self.data, self.engine.task
        both = torch.cat([self.engine.eval_stats(d.x_train, d.y_train).double().cpu(),
                          self.engine.eval_stats(d.x_test, d.y_test).double().cpu()])
        both = self.engine.reduce_sum(both)  # one reduction for both splits
        train, test = both[:3], both[3:]
        return {f"train_{task.metric}": task.metric_of(train), f"test_{task.metric}": task.metric_of(test),
                "test_loss": float(test[0] / test[2]), "train_loss": float(train[0] / train[2])}
