"""One training loop for every engine.

The :class:`Trainer` owns epochs, batches, the optimiser, the learning-rate schedule,
metrics, checkpoints and resume. What differs between a dense single-process model and
the sharded multi-process one lives behind the small :class:`Engine` interface: how a batch
becomes an objective, how local statistics are summed over ranks (for logging only,
outside forward/backward), and which named parameter blocks make up a checkpoint.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor

from . import checkpoint as ckpt
from .config import Config
from .data import Dataset, load_dataset
from .models import Classifier, build_model
from .models.network import InputPlacement

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class StepOut:
    """What one training batch produced on this rank."""

    objective: Tensor  # call .backward() on this
    stats: Tensor  # [cross-entropy sum, correct, count, regulariser] (local; summed over ranks)
    grad_norms: Callable[[], list[float]] | None = None  # after backward: ||dloss/dy_j|| per layer


class Engine:
    """What the trainer needs from a model runtime (dense here, sharded in ``distributed``)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        raise NotImplementedError

    def objective(self, x: Tensor, y: Tensor, alpha: float, record: bool = False) -> StepOut:
        raise NotImplementedError

    def eval_stats(self, x: Tensor, y: Tensor) -> Tensor:
        """[cross-entropy sum, correct, count] of a split, local to this rank."""
        raise NotImplementedError

    def reduce_sum(self, t: Tensor) -> Tensor:
        return t

    def barrier(self) -> None:
        pass

    def named_blocks(self) -> list[tuple[str, torch.nn.Parameter, tuple]]:
        """(canonical name, parameter, index into it) for every block this rank owns."""
        raise NotImplementedError

    def end_epoch(self) -> None:
        """Called after every epoch (flush traces, ...)."""


def stats_of(logits: Tensor, y: Tensor) -> Tensor:
    ce = F.cross_entropy(logits, y, reduction="sum")
    correct = (logits.argmax(1) == y).sum()
    count = torch.tensor(float(len(y)), dtype=ce.dtype, device=ce.device)
    return torch.stack([ce.detach(), correct.to(ce.dtype), count]).cpu()


class DenseEngine(Engine):
    """The reference: the whole (masked) network in one process."""

    def __init__(self, model: Classifier, device: str | torch.device = "cpu"):
        self.model, self.device = model, torch.device(device)

    def optimizer_groups(self, weight_decay):
        wd = {id(p) for p in self.model.readout_parameters()}
        rest = [p for p in self.model.parameters() if id(p) not in wd]
        return [{"params": rest, "weight_decay": 0.0},
                {"params": self.model.readout_parameters(), "weight_decay": weight_decay}]

    def objective(self, x, y, alpha, record=False):
        m = self.model
        x, y = x.to(self.device), y.to(self.device)
        y0 = m.initial_state(x)
        states = None
        if record:  # the step-by-step path keeps every intermediate state for the gradient norms
            states = m.body.trajectory(y0.requires_grad_() if not y0.requires_grad else y0)
            for s in states:
                s.retain_grad()
            yL = states[-1]
        else:
            yL = m.body(y0)
        logits = m.readout(yL)
        ce = F.cross_entropy(logits, y)
        reg = m.regularizer(alpha) if alpha else ce.new_zeros(())
        stats = torch.cat([stats_of(logits, y), reg.detach().reshape(1).cpu()])
        norms = (lambda: [float(s.grad.norm()) for s in states]) if record else None
        return StepOut(ce + reg, stats, norms)

    @torch.no_grad()
    def eval_stats(self, x, y):
        out = torch.zeros(3, dtype=x.dtype)
        for i in range(0, len(x), 4096):
            xb, yb = x[i:i + 4096].to(self.device), y[i:i + 4096].to(self.device)
            out += stats_of(self.model(xb), yb)
        return out

    def named_blocks(self):
        return [(n, p, ()) for n, p in self.model.named_parameters()]


def build_classifier(cfg: Config, n_features: int, n_classes: int, topology=None,
                     generator: torch.Generator | None = None) -> Classifier:
    """The dense classifier of a run config (masked by ``topology`` when one is given)."""
    mc = cfg.model
    options = {"init_std": mc.init_std, "generator": generator}
    if mc.arch == "H1":
        options["J"] = mc.J
    if topology is None:
        placement = InputPlacement(tuple(mc.feature_index)) if mc.feature_index is not None else None
        body = build_model(mc.arch, mc.dim, mc.layers, mc.h, **options)
        return Classifier(body, n_features, n_classes, placement)
    from .topology import dense_masks

    body = build_model(mc.arch, topology.state_dim, mc.layers, mc.h,
                       mask=dense_masks(topology, mc.arch, mc.J), **options)
    return Classifier(body, n_features, n_classes, topology.placement(n_features),
                      topology.readout_state_indices())


def load_data(cfg: Config) -> Dataset:
    dc = cfg.data
    ds = load_dataset(dc.name, dc.n_samples, dc.train_fraction, dc.noise, dc.seed, dc.path)
    return ds.to(DTYPES[cfg.run.dtype])


class Trainer:
    """Epoch loop, optimiser, schedule, metrics and checkpoints around an :class:`Engine`."""

    def __init__(self, cfg: Config, engine: Engine, data: Dataset, resume: bool = False):
        self.cfg, self.engine, self.data = cfg, engine, data
        self.out = Path(cfg.run.out_dir)
        tc = cfg.train
        groups = engine.optimizer_groups(tc.weight_decay)
        if tc.optimizer == "adam":
            self.opt = torch.optim.Adam(groups, lr=tc.lr)
        else:
            self.opt = torch.optim.SGD(groups, lr=tc.lr, momentum=0.9)
        self.epoch, self.step = 0, 0
        if resume:
            self._resume()

    # ---- checkpoints ------------------------------------------------------------------
    def _moments(self) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq") if self.cfg.train.optimizer == "adam" else ("momentum_buffer",)

    def save(self) -> None:
        blocks, optim = {}, {}
        for name, p, idx in self.engine.named_blocks():
            blocks[name] = p.detach()[idx]
            st = self.opt.state.get(p, {})
            optim[name] = {k: st[k][idx] for k in self._moments() if k in st}
        ckpt.save_shard(self.out, self.step, self.engine.rank, blocks, optim)
        self.engine.barrier()  # every shard is on disk before the checkpoint is marked complete
        if self.engine.is_main:
            ckpt.finalize(self.out, self.step, {"epoch": self.epoch, "shards": self.engine.world,
                                                "config": self.cfg.to_dict()})
        self.engine.barrier()

    def _resume(self) -> None:
        d = ckpt.latest(self.out)
        if d is None:
            raise ckpt.CheckpointError(f"{self.out}: --resume given but no complete checkpoint found")
        meta, blocks, optim = ckpt.load(d)
        saved = meta.get("config", {})
        for section in ("model", "topology"):
            if saved.get(section) != self.cfg.to_dict()[section]:
                raise ckpt.CheckpointError(f"{d}: key '{section}' differs between the checkpoint and this "
                                           "config; resume with the same model and topology")
        opt_step = float(meta["step"])
        with torch.no_grad():
            for name, p, idx in self.engine.named_blocks():
                if name not in blocks:
                    raise ckpt.CheckpointError(f"{d}: no block {name!r}; the checkpoint does not fit this model")
                if tuple(blocks[name].shape) != tuple(p[idx].shape):
                    raise ckpt.CheckpointError(f"{d}: block {name!r} has shape {tuple(blocks[name].shape)}, "
                                               f"model expects {tuple(p[idx].shape)}")
                p[idx] = blocks[name].to(p.dtype)
                if optim.get(name):
                    st = self.opt.state[p]
                    for k, v in optim[name].items():
                        st.setdefault(k, torch.zeros_like(p))[idx] = v.to(p.dtype)
                    if self.cfg.train.optimizer == "adam":
                        st["step"] = torch.tensor(opt_step)
        self.epoch, self.step = int(meta["epoch"]), int(meta["step"])

    # ---- the loop -----------------------------------------------------------------------
    def _lr(self, epoch: int) -> float:
        tc = self.cfg.train
        return tc.lr * (tc.lr_gamma ** (epoch // tc.lr_step) if tc.lr_step else 1.0)

    def _batches(self, epoch: int) -> list[Tensor]:
        g = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.data.x_train), generator=g)
        bs = self.cfg.train.batch_size
        return [perm[i:i + bs] for i in range(0, len(perm), bs)]

    def run_epoch(self) -> dict:
        tc, d = self.cfg.train, self.data
        for group in self.opt.param_groups:
            group["lr"] = self._lr(self.epoch)
        t0 = time.perf_counter()
        acc = torch.zeros(4, dtype=torch.float64)
        batches = self._batches(self.epoch)
        for idx in batches:
            record = bool(tc.grad_norm_every) and self.step % tc.grad_norm_every == 0
            self.opt.zero_grad(set_to_none=True)
            out = self.engine.objective(d.x_train[idx], d.y_train[idx], tc.alpha, record)
            out.objective.backward()
            self.opt.step()
            acc += out.stats.detach().double().cpu()
            if record and out.grad_norms is not None and self.engine.is_main:
                self._append("grad_norms.jsonl", {"step": self.step, "norms": out.grad_norms()})
            self.step += 1
        seconds = time.perf_counter() - t0
        self.epoch += 1
        self.engine.end_epoch()
        acc = self.engine.reduce_sum(acc)
        return {"epoch": self.epoch, "step": self.step, "lr": self._lr(self.epoch - 1),
                "loss": float(acc[0] / acc[2]), "regularizer": float(acc[3] / len(batches)),
                **self.evaluate(), "seconds": seconds}

    def _append(self, name: str, record: dict) -> None:
        with open(self.out / name, "a") as f:
            f.write(json.dumps(record) + "\n")

    def fit(self) -> dict:
        cfg, main = self.cfg, self.engine.is_main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt.atomic_write_text(self.out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        bar = None
        if main and cfg.run.progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.train.epochs, initial=self.epoch, desc=f"{cfg.model.arch} train", unit="epoch")
        t_start, last = time.perf_counter(), None
        every = cfg.train.checkpoint_every
        while self.epoch < cfg.train.epochs:
            last = self.run_epoch()
            if main:
                self._append("metrics.jsonl", last)
            if (every and self.epoch % every == 0) or self.epoch == cfg.train.epochs:
                self.save()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.4f}", test_acc=f"{last['test_acc']:.4f}")
        if bar is not None:
            bar.close()
        if last is None:  # resumed a finished run: re-evaluate
            last = self.evaluate()
        summary = {"train_acc": last["train_acc"], "test_acc": last["test_acc"],
                   "loss": last.get("loss", last["train_loss"]),
                   "epochs": self.epoch, "steps": self.step, "wall_seconds": time.perf_counter() - t_start,
                   "workers": self.engine.world, "config": cfg.to_dict()}
        if main:
            ckpt.atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=1))
        return summary

    def evaluate(self) -> dict:
        """Accuracy of both splits and the test loss (summed over ranks; outside forward/backward)."""
        d = self.data
        train = self.engine.reduce_sum(self.engine.eval_stats(d.x_train, d.y_train).double().cpu())
        test = self.engine.reduce_sum(self.engine.eval_stats(d.x_test, d.y_test).double().cpu())
        return {"train_acc": float(train[1] / train[2]), "test_acc": float(test[1] / test[2]),
                "test_loss": float(test[0] / test[2]), "train_loss": float(train[0] / train[2])}


def check_fresh_run_dir(out: Path, resume: bool) -> None:
    """Refuse to train over an existing run unless resuming: saved work is never clobbered."""
    if not resume and (Path(out) / "checkpoints").exists():
        raise ckpt.CheckpointError(f"run.out_dir: {out} already holds a run; pass --resume to continue it "
                                   "or choose another run.out_dir")


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def train_dense(cfg: Config, resume: bool = False, topology=None) -> dict:
    """Train the dense single-process model of ``cfg``; returns the summary."""
    check_fresh_run_dir(Path(cfg.run.out_dir), resume)
    torch.set_num_threads(cfg.run.threads)
    data = load_data(cfg)
    gen = seed_everything(cfg.train.seed)
    model = build_classifier(cfg, data.n_features, data.n_classes, topology, generator=gen)
    model = model.to(DTYPES[cfg.run.dtype]).to(cfg.run.device)
    return Trainer(cfg, DenseEngine(model, cfg.run.device), data, resume=resume).fit()


def train_from_config(cfg: Config, resume: bool | str = False) -> dict | None:
    """Entry point of ``dhdnn train``: the dense engine in this process, or the sharded
    engine on local workers / under torchrun. Returns the summary (None on non-main ranks).
    ``resume="auto"`` resumes when the run directory holds a complete checkpoint."""
    if resume == "auto":
        resume = ckpt.latest(Path(cfg.run.out_dir)) is not None
    from .distributed.launch import torchrun_env

    sharded = cfg.run.engine == "sharded" or (cfg.run.engine == "auto" and (cfg.run.workers > 1 or torchrun_env()))
    if sharded:
        from .distributed.launch import train_sharded

        check_fresh_run_dir(Path(cfg.run.out_dir), resume)
        return train_sharded(cfg, resume=resume)
    topology = None
    if cfg.topology is not None:
        from .topology import load_topology

        topology = load_topology(cfg.topology)
    return train_dense(cfg, resume=resume, topology=topology)
