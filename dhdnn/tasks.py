"""What a network is trained to do: the loss, the statistics summed over batches and ranks
(``[loss, score, count]``) and the metric reported from them, for classification and regression.
One registry (``TASKS[cfg.model.task]``): nothing else tests a task's name.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


class Task:
    name: str = "?"
    metric: str = "?"  # the headline metric reported per split (train_<metric>, test_<metric>)
    label, fmt = "?", ".4f"  # how the metric is printed
    score = 1  # which sum of the statistics, divided by the count, is the metric

    def loss(self, out: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
        raise NotImplementedError

    def stats(self, out: Tensor, y: Tensor) -> Tensor:
        """``[loss summed over the samples, score summed over the samples, samples]`` on the CPU."""
        raise NotImplementedError

    def metric_of(self, stats: Tensor) -> float:
        return float(stats[self.score] / stats[2]) if float(stats[2]) else math.nan

    def describe(self, value: float) -> str:
        return f"{self.label} {value:{self.fmt}}"


class Classify(Task):
    """Cross-entropy on integer labels; accuracy."""

    name, metric, label = "classify", "acc", "accuracy"

    def loss(self, out, y, reduction="mean"):
        return F.cross_entropy(out, y, reduction=reduction)

    def stats(self, out, y):
        ce = F.cross_entropy(out, y, reduction="sum").detach()
        correct = (out.argmax(1) == y).sum()
        count = torch.tensor(float(len(y)), dtype=ce.dtype, device=ce.device)
        return torch.stack([ce, correct.to(ce.dtype), count]).cpu()


class Regress(Task):
    """Mean squared error on real targets ``(N, outputs)``, averaged over the outputs; the metric
    is the mean squared error itself (the loss sum: the score stays 0)."""

    name, metric, label, fmt, score = "regress", "mse", "mse", ".4g", 0

    def loss(self, out, y, reduction="mean"):
        per_sample = (out - y.view_as(out)).square().mean(1)
        return per_sample.mean() if reduction == "mean" else per_sample.sum()

    def stats(self, out, y):
        sse = (out.detach() - y.view_as(out)).square().mean(1).sum()
        count = torch.tensor(float(len(y)), dtype=sse.dtype, device=sse.device)
        return torch.stack([sse, torch.zeros_like(sse), count]).cpu()


TASKS: dict[str, Task] = {t.name: t for t in (Classify(), Regress())}
