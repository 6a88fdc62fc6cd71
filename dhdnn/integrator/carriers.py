"""The state's carrier: float, or fixed point (exact reversible backprop), and the certificate.

:class:`FloatCarrier` adds ``alpha C z`` in the run's dtype; undoing subtracts it, so a rebuilt
state drifts by round-off (the certificate measures it). :class:`FixedCarrier` holds the state
on the integer grid ``2^-F`` (int64; or float64 holding the same integers where the weights bound
every state below 2^53 grid units: PyTorch adds float64 ~3x faster). Each increment is computed
in the run's dtype from the dequantised other field, rounded to the grid and added as an integer;
the backward recomputes it from the same bits and subtracts it, so every rebuilt state is the
forward's bit for bit at any depth (the adjoint passes the rounding straight through). Overflow
is ``|state| >= 2^(62 - F)``. Pure maths.
"""
from __future__ import annotations

import torch
from torch import Tensor

FRACTION_BITS = {torch.float32: 32, torch.float64: 48}  # F: the grid 2^-F; states must stay below 2^(62-F)
GUARD = 1 << 62  # |state| in grid units: below it no add can wrap around (checked, or bounded by the weights)
FLOAT_CARRIER_BELOW = 1 << 53  # grid units: float64 holds every integer below this exactly


class FixedPointOverflow(ArithmeticError):
    """A fixed-point state left the representable range."""


class ReversibleMismatch(RuntimeError):
    """Exact reversible backprop rebuilt a state that differs from the forward's: a bug."""


class Certificate:
    """What the last reversible backward found: the largest relative difference between a
    rebuilt state and the one the forward stored (its input, and every anchor before it is
    restored). ``exact``: any difference raises :class:`ReversibleMismatch`."""

    def __init__(self, exact: bool = False):
        self.exact, self.drift, self.checked = exact, 0.0, 0
        self.states: dict | None = None  # tests: {"forward": [...], "rebuilt": [...]} copies of every state

    def keep(self, which: str, *state) -> None:
        """Tests: keep a copy of a fixed-point state (after each forward half-step, before each undo)."""
        if self.states is not None:
            self.states[which].append(tuple(t.clone() for t in state))

    def reset(self) -> None:
        self.drift, self.checked = 0.0, 0

    def compare(self, layer: int, rebuilt, stored, where: str = "") -> None:
        self.checked += 1
        if self.exact:
            if not all(torch.equal(a, b) for a, b in zip(rebuilt, stored)):
                raise ReversibleMismatch(f"exact reversible backprop{where}: the state rebuilt at layer {layer} "
                                         "differs from the forward's; please report this as a bug")
            return
        num = sum(float((a - b).double().square().sum()) for a, b in zip(rebuilt, stored))
        den = sum(float(b.double().square().sum()) for b in stored)
        self.drift = max(self.drift, (num / den) ** 0.5 if den > 0 else num ** 0.5)


class FloatCarrier:
    """The state in the run's dtype: ``new = old + alpha C z``."""

    exact = False

    def begin(self, fields: dict[str, Tensor], views: dict[str, Tensor], bound=None, adds: int = 0) -> None:
        for f, v in views.items():
            v.copy_(fields[f])

    def update(self, f: str, old: Tensor, new: Tensor, z: Tensor, alpha: float, cmap, layer: int) -> None:
        torch.add(old, cmap.apply(z), alpha=alpha * cmap.scale, out=new)

    def undo(self, f: str, cur: Tensor, z: Tensor, alpha: float, cmap) -> None:
        cur.sub_(cmap.apply(z), alpha=alpha * cmap.scale)


class FixedCarrier:
    """The state as integers on the grid ``2^-bits`` (see the module docstring). ``fields``
    (the views the products read) hold the dequantised values; ``ints`` the integers."""

    exact = True

    def __init__(self, bits: int, where: str = "", cert: Certificate | None = None):
        self.bits, self.where = bits, where
        self.cert = cert if cert is not None and cert.states is not None else None  # tests: keep every state
        self.scale, self.inv = 2.0 ** bits, 2.0 ** -bits
        self.ints: dict[str, Tensor] = {}
        self.checked = True

    def begin(self, fields: dict[str, Tensor], views: dict[str, Tensor], bound: float | None, adds: int) -> None:
        """Quantise the input; ``bound``: how far the increments can move a state over the whole
        stack (None: unknown, every add is checked); ``adds``: how many (each rounds by half a unit)."""
        top = 0
        for f, x in fields.items():
            self.ints[f] = quantise(x, self.scale)
            top = max(top, check_range(self.ints[f], 0, f"the input{self.where}", self.bits))
        # the weights bound every increment: within range the adds need no check at all, and
        # below 2^53 grid units float64 holds the same integers exactly and adds them ~3x faster
        reach = top + bound * self.scale + adds if bound is not None else float("inf")
        self.checked = not reach < GUARD  # (NaN weights: checked)
        if reach < FLOAT_CARRIER_BELOW:
            self.ints = {f: t.double() for f, t in self.ints.items()}
        self.start = {f: t.clone() for f, t in self.ints.items()}
        for f, v in views.items():
            dequantise(self.ints[f], self.inv, v)
        self._D = self._buf = None

    def _scratch(self, name: str, like: Tensor, dtype=None) -> Tensor:
        t = getattr(self, name)
        if t is None or t.shape != like.shape:
            t = torch.empty(like.shape, dtype=dtype or like.dtype, device=like.device)
            setattr(self, name, t)
        return t

    def _add(self, f: str, z: Tensor, alpha: float, cmap, sign: int, layer: int, check: bool) -> None:
        X = self.ints[f]
        c = alpha * cmap.scale * self.scale  # grid units, scaled exactly by a power of two
        D = torch.mul(z, c, out=self._scratch("_D", z)) if cmap.scalar else cmap.apply(z).mul_(c)
        if check:  # (the increment first, so that none converts outside int64 either)
            check_increment(D, layer, f"the {f} increment{self.where}", self.bits)
        D.round_()
        if not X.is_floating_point():
            D = self._scratch("_buf", X, torch.int64).copy_(D)
        X.add_(D) if sign > 0 else X.sub_(D)
        if check:
            check_range(X, layer, f"{f}{self.where}", self.bits)

    def update(self, f: str, old: Tensor, new: Tensor, z: Tensor, alpha: float, cmap, layer: int) -> None:
        self._add(f, z, alpha, cmap, 1, layer, self.checked)
        dequantise(self.ints[f], self.inv, new)
        if self.cert is not None:
            self.cert.keep("forward", *self.ints.values())

    def undo(self, f: str, cur: Tensor, z: Tensor, alpha: float, cmap) -> None:
        """Exactly the integer the forward added (every state rebuilt is one the forward checked)."""
        if self.cert is not None:  # the state the half-step made, rebuilt
            self.cert.keep("rebuilt", *self.ints.values())
        self._add(f, z, alpha, cmap, -1, -1, False)
        dequantise(self.ints[f], self.inv, cur)


def fraction_bits(dtype: torch.dtype, bits: int | None = None) -> int:
    return FRACTION_BITS[dtype] if bits is None else bits


def quantise(x: Tensor, scale: float) -> Tensor:
    """``round(x * 2^F)`` as int64 (the scaling by a power of two is exact), contiguous (the input
    may be a transposed view: every add on the state would then stride)."""
    return torch.round(x * scale).to(torch.int64, memory_format=torch.contiguous_format)


def dequantise(X: Tensor, inv: float, out: Tensor) -> Tensor:
    """``X * 2^-F`` in ``out``'s dtype: the integer rounded once to ``out``'s dtype, then scaled by a
    power of two (exact): the same value from either carrier."""
    return out.copy_(X).mul_(inv)


def _overflow(what: str, layer: int, bits: int, detail: str) -> FixedPointOverflow:
    return FixedPointOverflow(f"exact reversible backprop: {what} left the fixed-point range at layer {layer} "
                              f"({detail} with {bits} fraction bits); lower model.h or init_std, raise "
                              "train.alpha, or use run.reversible_state: float")


def check_range(X: Tensor, layer: int, what: str, bits: int) -> int:
    """Stop when ``|X| >= GUARD`` (grid units); returns ``max |X|``."""
    lo, hi = torch.aminmax(X)
    if int(lo) <= -GUARD or int(hi) >= GUARD:
        raise _overflow(what, layer, bits, f"|state| >= 2^{62 - bits}")
    return max(-int(lo), int(hi))


def check_increment(D: Tensor, layer: int, what: str, bits: int) -> None:
    """Stop before an increment (grid units) outside the range, or not finite, converts to int64."""
    if not float(D.abs().amax()) < GUARD:
        raise _overflow(what, layer, bits, f"|increment| >= 2^{62 - bits}, or not finite")
