"""What the trainer needs from a model runtime, and the dense single-process runtime.

An :class:`Engine` turns a batch into an objective to differentiate, evaluates a split,
sums logging statistics over ranks (outside forward/backward), and lists its parameters as
checkpoint :class:`Entry` objects in the partition-independent block form of
``blocks.py``. :class:`DenseEngine` runs the whole (masked) network in one process; the
sharded engine lives in ``dhdnn.distributed``. Nothing here imports ``torch.distributed``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models import Classifier

EVAL_BYTES = 256 << 20  # activation memory an evaluation chunk may use


@dataclass
class StepOut:
    """What one training batch produced on this rank."""

    objective: Tensor  # call .backward() on this, then Engine.after_backward() (the regulariser's gradient)
    stats: Tensor  # [cross-entropy sum, correct, count, regulariser] (local; summed over ranks)
    grad_norms: Callable[[], list[float]] | None = None  # after backward: ||dloss/dy_j|| per layer


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


def stats_of(logits: Tensor, y: Tensor) -> Tensor:
    ce = F.cross_entropy(logits, y, reduction="sum")
    correct = (logits.argmax(1) == y).sum()
    count = torch.tensor(float(len(y)), dtype=ce.dtype, device=ce.device)
    return torch.stack([ce.detach(), correct.to(ce.dtype), count]).cpu()


class Engine:
    """What the trainer needs from a model runtime (dense here, sharded in ``distributed``)."""

    rank: int = 0
    world: int = 1

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
        """[cross-entropy sum, correct, count] of a split, local to this rank."""
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

    def end_epoch(self) -> None:
        """Called after every epoch (flush traces, ...)."""

    def close(self) -> None:
        """Release what the engine holds (trace files, ...)."""


def eval_chunk(bytes_per_sample: int) -> int:
    """Samples per evaluation chunk so that a chunk's activations stay within ``EVAL_BYTES``."""
    return max(1, EVAL_BYTES // max(1, bytes_per_sample))


class DenseEngine(Engine):
    """The reference: the whole (masked) network in one process."""

    def __init__(self, model: Classifier, device: str | torch.device = "cpu", table=None):
        self.model, self.device, self.table = model, torch.device(device), table
        self._alpha = 0.0

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
        self._alpha = alpha  # the regulariser's gradient is added after backward (after_backward)
        reg = m.body.regularizer_value(alpha) if alpha else ce.new_zeros(())
        stats = torch.cat([stats_of(logits, y), reg.reshape(1).cpu()])
        norms = (lambda: [float(s.grad.norm()) for s in states]) if record else None
        return StepOut(ce, stats, norms)

    def after_backward(self):
        if self._alpha:
            self.model.body.add_regularizer_grad(self._alpha)

    @torch.no_grad()
    def eval_stats(self, x, y):
        body = self.model.body
        itemsize = torch.finfo(x.dtype).bits // 8
        chunk = eval_chunk(4 * (body.layers + 1) * body.dim * itemsize)  # the fused stacks keep every state
        out = torch.zeros(3, dtype=torch.float64)
        for i in range(0, len(x), chunk):
            xb, yb = x[i:i + chunk].to(self.device), y[i:i + chunk].to(self.device)
            out += stats_of(self.model(xb), yb).double()
        return out

    def entries(self):
        if self.table is None:
            return [Entry(n, [p]) for n, p in self.model.named_parameters()]
        from .blocks import DenseBinding

        out = []
        for c in self.table:
            b = DenseBinding(self.table, c, self.model)
            out.append(Entry(c.key, b.params, torch.arange(len(c)), c.block_axis, b.get, b.put))
        return out


def build_classifier(cfg, n_features: int, n_classes: int, topology=None, dtype=None, image_shape=None):
    """The dense classifier of a run config. With a topology: masked by it and initialised
    from the per-agent blocks (the same network the sharded engine builds on any number of
    workers); returns ``(model, table)`` with the topology's :class:`~dhdnn.blocks.BlockTable`
    (None without a topology)."""
    from .models import ARCHITECTURES, build_model
    from .models.network import InputPlacement

    mc = cfg.model
    cls = ARCHITECTURES[mc.arch]
    options = {k: getattr(mc, k) for k in cls.config_options}
    options["init_std"] = mc.init_std
    dtype = dtype or torch.get_default_dtype()
    if mc.network == "conv":
        from .models.conv import ConvClassifier

        torch.manual_seed(cfg.train.seed)  # the convolution and readout initialise from torch's generator
        gen = torch.Generator().manual_seed(cfg.train.seed)
        body = build_model(mc.arch, mc.channels, mc.layers, mc.h, generator=gen, **options)
        return ConvClassifier(body, image_shape, n_classes).to(dtype), None
    if topology is None:
        gen = torch.Generator().manual_seed(cfg.train.seed)
        placement = InputPlacement(tuple(mc.feature_index)) if mc.feature_index is not None else None
        body = build_model(mc.arch, mc.dim, mc.layers, mc.h, generator=gen, **options)
        return Classifier(body, n_features, n_classes, placement).to(dtype), None
    from .blocks import BlockTable, init_packed, load_dense
    from .models.hamiltonian import NotDistributable
    from .topology import dense_masks

    gen = torch.Generator().manual_seed(cfg.train.seed)
    body = build_model(mc.arch, topology.state_dim, mc.layers, mc.h,
                       mask=dense_masks(topology, mc.arch, mc.J), generator=gen, **options)
    model = Classifier(body, n_features, n_classes, topology.placement(n_features),
                       topology.readout_state_indices()).to(dtype)
    try:
        layout = cls.agent_layout(**options)
    except NotDistributable:  # a centralised architecture, masked: no per-agent form
        return model, None
    table = BlockTable(topology, layout, mc.layers, n_classes)
    load_dense(table, model, init_packed(table, cfg.train.seed, mc.init_std, dtype))
    return model, table
