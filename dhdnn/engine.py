"""What the trainer needs from a model runtime (:class:`Engine`), and the dense one-process runtime.

An engine turns a batch into an objective, evaluates a split, sums logging statistics over
ranks (outside forward/backward) and lists its parameters as checkpoint :class:`Entry` objects
in ``blocks.py``'s partition-independent form. Nothing here imports ``torch.distributed``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from .models import Classifier
from .tasks import TASKS, Task

EVAL_BYTES = 256 << 20  # activation memory an evaluation chunk may use


@dataclass
class StepOut:
    """What one training batch produced on this rank."""

    objective: Tensor  # call .backward() on this, then Engine.after_backward() (the regulariser's gradient)
    stats: Tensor  # [loss sum, score, count, regulariser] (local; summed over ranks; see tasks.py)
    # after backward: ||dloss/dy_j||^2 per state y_0..y_L on this rank's rows and samples (float64;
    # the trainer sums it over the ranks)
    grad_norms: Callable[[], Tensor] | None = None


@dataclass
class Entry:
    """A group of parameter values saved under one checkpoint key.

    For a topology network the key is a block class (``K_p/8x8``) and ``ids`` are the
    canonical indices of the blocks this rank holds, along ``block_axis``; otherwise the key
    is a parameter name and ``ids`` is None. ``get`` reads the values out of tensors shaped
    like ``params`` (the parameters, or their optimiser moments); ``put`` writes them back."""

    key: str
    params: list[nn.Parameter]
    ids: Tensor | None = None
    block_axis: int = 0
    get: Callable[[list[Tensor]], Tensor] = lambda ts: ts[0]
    put: Callable[[list[Tensor], Tensor], None] = lambda ts, v: ts[0].copy_(v)


class Engine:
    """What the trainer needs from a model runtime (dense here, sharded in ``distributed``)."""

    rank: int = 0
    world: int = 1
    task: Task = TASKS["classify"]
    spec = None  # the NetworkSpec (build.py) of the network, where known: saved with checkpoints
    tracer = None  # the rank's message tracer (distributed engines with run.trace)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shard_rank(self) -> int | None:
        """Which checkpoint shard this rank writes (None: none, e.g. a replica of another rank)."""
        return self.rank

    @property
    def shard_count(self) -> int:
        return self.world

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        raise NotImplementedError

    def objective(self, x: Tensor, y: Tensor, alpha: float, record: bool = False) -> StepOut:
        raise NotImplementedError

    def eval_stats(self, x: Tensor, y: Tensor) -> Tensor:
        """[loss sum, score, count] of a split, local to this rank."""
        raise NotImplementedError

    def reduce_sum(self, t: Tensor) -> Tensor:
        return t

    def reduce_max(self, t: Tensor) -> Tensor:
        return t

    def barrier(self) -> None:
        pass

    def entries(self) -> list[Entry]:
        """Every parameter this rank owns, as checkpoint entries."""
        raise NotImplementedError

    def after_backward(self) -> None:
        """Called after ``backward()``, before the optimiser step: adds the smoothness
        regulariser's gradient in place (no parameter-sized graph per step) and, with replicas,
        averages gradients."""

    def train_step(self, opt, x: Tensor, y: Tensor, alpha: float) -> StepOut:
        """One plain optimiser step on ``(x, y)`` (the trainer's loop adds its checks around the same calls)."""
        opt.zero_grad(set_to_none=True)
        out = self.objective(x, y, alpha)
        out.objective.backward()
        self.after_backward()
        opt.step()
        return out

    def take_drift(self) -> float:
        """Reversible backprop: the largest relative drift of a rebuilt state since the last call
        (0 in exact mode, whose certificate raises on any difference)."""
        return 0.0

    def set_anchor_every(self, k: int) -> None:
        """Reversible backprop (float): store the state every ``k`` layers from the next step on."""

    def end_epoch(self) -> None:
        """Called after every epoch: flushes the message trace."""
        if self.tracer is not None:
            self.tracer.flush()

    def close(self) -> None:
        """Release what the engine holds (trace files, ...)."""
        self.end_epoch()


def param_groups(params, readout, weight_decay: float) -> list[dict]:
    """Optimiser groups: weight decay on the readout only (the classifier), none on the H-DNN."""
    wd = {id(p) for p in readout}
    return [{"params": [p for p in params if id(p) not in wd], "weight_decay": 0.0},
            {"params": list(readout), "weight_decay": weight_decay}]


def eval_chunk(bytes_per_sample: int) -> int:
    """Samples per evaluation chunk so that a chunk's activations stay within ``EVAL_BYTES``."""
    return max(1, EVAL_BYTES // max(1, bytes_per_sample))


@torch.no_grad()
def chunked_stats(task: Task, forward, x: Tensor, y: Tensor, chunk: int, device, counts: bool = True) -> Tensor:
    """``task``'s statistics of ``forward`` over a split, ``chunk`` samples at a time (every rank runs
    every chunk; only where ``counts`` are they added)."""
    out = torch.zeros(3, dtype=torch.float64)
    for i in range(0, len(x), chunk):
        logits = forward(x[i:i + chunk].to(device))
        if counts:
            out += task.stats(logits, y[i:i + chunk].to(device)).double()
    return out


class DenseEngine(Engine):
    """The reference: the whole (masked) network in one process."""

    def __init__(self, model: Classifier, device: str | torch.device = "cpu", table=None, task: str = "classify"):
        self.model, self.device, self.table = model, torch.device(device), table
        self.task = TASKS[task]
        self.spec = getattr(model, "spec", None)
        self._alpha = 0.0

    def optimizer_groups(self, weight_decay):
        return param_groups(self.model.parameters(), self.model.readout_parameters(), weight_decay)

    def outputs(self, x: Tensor, record: bool):
        """The model's outputs and, with ``record``, what :attr:`StepOut.grad_norms` returns."""
        m = self.model
        if not record:
            return m(x), None
        # the step-by-step path keeps every intermediate state for the gradient norms
        y0 = m.initial_state(x)
        states = m.body.trajectory(y0.requires_grad_() if not y0.requires_grad else y0)
        for s in states:
            s.retain_grad()
        return m.readout(states[-1]), lambda: torch.stack([s.grad.double().square().sum() for s in states]).cpu()

    def objective(self, x, y, alpha, record=False):
        x, y = x.to(self.device), y.to(self.device)
        logits, norms = self.outputs(x, record)
        loss = self.task.loss(logits, y)
        self._alpha = alpha  # the regulariser's gradient is added after backward (after_backward)
        reg = self.model.body.regularizer_value(alpha) if alpha else loss.new_zeros(())
        stats = torch.cat([self.task.stats(logits, y), reg.reshape(1).cpu()])
        return StepOut(loss, stats, norms)

    def after_backward(self):
        if self._alpha:
            self.model.body.add_regularizer_grad(self._alpha)

    def take_drift(self):
        cert = self.model.body.certificate
        drift = cert.drift
        cert.reset()
        return drift

    def set_anchor_every(self, k):
        self.model.body.set_anchor_every(k)

    def eval_stats(self, x, y):
        chunk = min(eval_chunk(self.model.activation_bytes(1, x.dtype)), getattr(self.model, "eval_batch", len(x)) or 1)
        return chunked_stats(self.task, self.model, x, y, chunk, self.device)

    def entries(self):
        if self.table is None:
            return [Entry(n, [p]) for n, p in self.model.named_parameters()]
        from .blocks import DenseBinding

        out = []
        for c in self.table:
            b = DenseBinding(self.table, c, self.model)
            out.append(Entry(c.key, b.params, torch.arange(len(c)), c.block_axis, b.get, b.put))
        return out
