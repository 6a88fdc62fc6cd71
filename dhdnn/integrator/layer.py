"""What one layer of an H-DNN is, as the integrator runs it: fields, half-steps, local maps.

A layer is a list of half-steps ``target <- target + h C K^T tanh(K source + b)``; an
architecture declares it as an :class:`AgentLayout`, and the engines derive what they need from
it (exchanges per layer, invertibility, matrices, biases). Pure maths.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

MAPS = ("-", "+", "J1")  # C: -z, +z, or (z_p, z_q) -> (z_q, -z_p) on each agent's (p, q) rows


@dataclass(frozen=True)
class HalfStep:
    """``target <- target + h C (K^T tanh(K source + b))`` with ``K`` = ``matrix``, ``b`` = ``bias``
    and ``C`` = ``map`` (one of :data:`MAPS`). ``K x`` reads the neighbours' ``source`` (one
    gather); ``K^T s`` produces contributions for the neighbours (one scatter-add)."""

    matrix: str
    bias: str
    source: str
    target: str
    map: str

    def __post_init__(self):
        if self.map not in MAPS:
            raise ValueError(f"map: expected one of {list(MAPS)}, got {self.map!r}")


@dataclass(frozen=True)
class AgentLayout:
    """A layer of an architecture: ``fields`` names the agent-local state pieces (each holding the
    listed parts of an agent's state side by side: H2 ``p`` and ``q`` apart, H1 ``(p, q)``
    together) and ``half_steps`` is one layer."""

    fields: tuple[tuple[str, tuple[str, ...]], ...]
    half_steps: tuple[HalfStep, ...]

    def __post_init__(self):
        if len({len(parts) for _, parts in self.fields}) != 1:
            raise ValueError("fields: every field must hold the same number of parts per agent")
        for hs in self.half_steps:
            if {hs.source, hs.target} - set(self.field_names):
                raise ValueError(f"half-step {hs.matrix}: unknown field")
            if hs.map == "J1" and self.parts_per_agent != 2:
                raise ValueError("J1 map needs fields holding (p, q) side by side")

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f for f, _ in self.fields)

    def parts(self, field: str) -> tuple[str, ...]:
        return dict(self.fields)[field]

    @property
    def parts_per_agent(self) -> int:
        """Entries an agent of dimension ``n_i`` holds in each field, in units of ``n_i``."""
        return len(self.fields[0][1])

    @property
    def matrices(self) -> tuple[str, ...]:
        return tuple(hs.matrix for hs in self.half_steps)

    @property
    def biases(self) -> tuple[str, ...]:
        return tuple(hs.bias for hs in self.half_steps)

    @property
    def exchanges_per_layer(self) -> int:
        """Forward exchanges per layer (a gather and a scatter-add per half-step)."""
        return 2 * len(self.half_steps)

    @property
    def invertible(self) -> bool:
        """A layer can be undone exactly from its output (every half-step leaves its source alone)."""
        return all(hs.source != hs.target for hs in self.half_steps)

    def matrix_field(self, matrix: str) -> str:
        return next(hs.source for hs in self.half_steps if hs.matrix == matrix)

    def updates(self, field: str) -> int:
        """Half-steps per layer that update ``field``."""
        return sum(hs.target == field for hs in self.half_steps)


@dataclass
class LocalMap:
    """``C`` of a half-step on a field's rows: a scalar (``-1``, ``+1``) or a signed permutation."""

    scale: float
    perm: Tensor | None = None  # C z = z[perm] * sign
    sign: Tensor | None = None  # (F, 1)
    inv: Tensor | None = None  # C^T g = (g * sign)[inv]

    @classmethod
    def of(cls, kind: str, p_rows=None, q_rows=None, F: int = 0, dtype=torch.float32) -> "LocalMap":
        """The map ``kind`` of :data:`MAPS`; ``J1`` needs the rows of every agent's ``p`` and ``q``."""
        if kind != "J1":
            return cls(-1.0 if kind == "-" else 1.0)
        perm, sign = torch.empty(F, dtype=torch.long), torch.empty(F, dtype=dtype)
        p, q = torch.as_tensor(p_rows), torch.as_tensor(q_rows)
        perm[p], perm[q], sign[p], sign[q] = q, p, 1.0, -1.0
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(F)
        return cls(1.0, perm, sign.unsqueeze(1), inv)

    @property
    def scalar(self) -> bool:
        return self.perm is None

    def apply(self, z: Tensor) -> Tensor:
        """``C z`` without the scalar (the caller folds ``scale`` into its alpha)."""
        return z if self.perm is None else z.index_select(0, self.perm).mul_(self.sign)

    def transpose(self, g: Tensor, out: Tensor, alpha: float) -> Tensor:
        """``out = alpha C^T g``."""
        if self.perm is None:
            return torch.mul(g, alpha * self.scale, out=out)
        return torch.mul(torch.mul(g, self.sign).index_select(0, self.inv), alpha, out=out)

    def move(self, fn) -> None:
        if self.perm is not None:
            self.perm, self.sign, self.inv = fn(self.perm), fn(self.sign), fn(self.inv)
