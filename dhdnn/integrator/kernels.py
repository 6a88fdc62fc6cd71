"""The coupling's local products: a matrix's rows times a field, split for overlap.

A rank (one process is the one-rank case) holds its agents' row blocks for every layer. Against
its extended field ``X = [x_local; x_halo]`` (``(E, B)``, local rows ``[0, F)`` first) a kernel
computes per layer ``j``: ``mv_local`` (``K_local X + bias``: blocks whose column agent is mine,
computable before the halo arrives) and ``mv_halo`` (adds the rest); ``tmv_halo`` (``Z[F:] =
K_halo^T s``, what the neighbours receive) and ``tmv_local`` (``Z[:F] = K_local^T s``); ``grad``
(``dK += gu X^T + s GZ^T`` on the blocks only). Every method overwrites its output unless it says
"add"; parameters come in as arguments, so the integrator's autograd Function owns the gradients.
:data:`KERNELS` is the registry ``run.local_kernel`` names. Pure maths.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from . import fused

CHUNK_ELEMENTS = 1 << 18  # gathered inputs per bmm chunk (~1 MiB in float32: stays in cache)
# on a GPU a kernel launch costs more than the cache: a few large products (64 MiB in float32). The
# CPU's chunks made an 8 x 8-block grid step ~80 bmm per product there (15,000 launches: 0.34 s on an
# H200, 0.022 s with these)
DEVICE_CHUNK_ELEMENTS = 1 << 24


def chunk_elements(t: Tensor) -> int:
    """Gathered input entries per batched product, for tensors on ``t``'s device."""
    return CHUNK_ELEMENTS if t.device.type == "cpu" else DEVICE_CHUNK_ELEMENTS


FAULT = os.environ.get("DHDNN_TEST_FAULT")  # test-only (dhdnn verify's tests): "mask" lets an off-block entry learn


@dataclass
class ClassRows:
    """One block class on one rank: where its blocks' rows and columns sit in the extended field.
    Blocks ``[0, n_local)`` have local column agents, ``[n_local, nb)`` halo ones."""

    rows: Tensor  # (nb, r) ext rows (all local)
    cols: Tensor  # (nb, c) ext rows
    n_local: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.rows.shape[0], self.rows.shape[1], self.cols.shape[1]


def contiguous(c: ClassRows) -> bool:
    """Every block of ``c`` takes consecutive rows and consecutive columns of the extended field."""
    rows, cols = c.rows.cpu().numpy(), c.cols.cpu().numpy()
    return bool(len(rows)) and bool((rows == rows[:, :1] + np.arange(rows.shape[1])).all()) and \
        bool((cols == cols[:, :1] + np.arange(cols.shape[1])).all())


class MatrixState(NamedTuple):
    """One pass's operands of :class:`MatrixKernel`: per layer the matrix ``mv`` multiplies with
    (``loc``, ``halo``: local and halo columns) and the transposed views ``tmv`` multiplies with
    (``tloc``, ``thalo``). Forward: ``K`` and ``A^T``; :meth:`MatrixKernel.adjoint` swaps them."""

    K: Tensor
    A: Tensor
    loc: list
    halo: list | None
    tloc: list
    thalo: list | None


class MatrixKernel:
    """Assembled matrices, one BLAS call per product: the dense model and the conv network
    (``(layers, m, m)``, no halo; ``A``, the matrix of the transposed product, may differ from ``K``
    when a fixed factor is folded in), and a rank's rows stored ``(layers, F, E)``, zero off the
    blocks (small or dense ranks). Without a halo its products can also update the state
    directly (:attr:`direct`), and its weights bound every increment (:meth:`column_bound`)."""

    name = "dense"
    scales_mv = True  # mv_local folds a scale into the BLAS call (the activation's factor 2)

    def __init__(self, classes: list[ClassRows] | None, F: int, E: int, layers: int, shared: bool = True):
        self.F, self.E, self.L, self.shared = F, E, layers, shared
        self.n_tensors = 1 if shared else 2
        self.mask = None
        if classes is not None:  # a rank's blocks: flat positions of every block entry, class by class
            self.flat = [(c.rows[:, :, None] * E + c.cols[:, None, :]).reshape(-1) for c in classes]
            self.mask = torch.zeros(F * E, dtype=torch.bool).index_fill_(0, torch.cat(self.flat), True).view(F, E)

    @property
    def direct(self) -> bool:
        return self.E == self.F

    def move(self, fn) -> None:
        """Move the kernel's index tensors (``fn`` as in ``Module._apply``)."""
        if self.mask is not None:
            self.flat, self.mask = [fn(f) for f in self.flat], fn(self.mask)

    def prepare(self, Ws: list[Tensor]) -> MatrixState:
        """``Ws``: ``[K]`` (or ``[K, A]``), each ``(L, F, E)``."""
        K, A, F = Ws[0], Ws[-1], self.F
        At = A.transpose(1, 2)
        if self.E == F:
            return MatrixState(K, A, K.unbind(0), None, At.unbind(0), None)
        return MatrixState(K, A, K[:, :, :F].unbind(0), K[:, :, F:].unbind(0), At[:, :F].unbind(0), At[:, F:].unbind(0))

    def adjoint(self, st: MatrixState) -> MatrixState:
        """The backward's operands: ``mv`` with ``A``, ``tmv`` with ``K^T``."""
        return st if self.shared else self.prepare([st.A, st.K])

    def mv_local(self, st, j, X, out, bias=None, scale=1.0):
        X = X[:self.F] if st.halo is not None else X
        if bias is None:
            torch.mm(st.loc[j], X, out=out)
        else:
            torch.addmm(bias, st.loc[j], X, beta=scale, alpha=scale, out=out)

    def mv_halo(self, st, j, X, out):
        if st.halo is not None:
            out.addmm_(st.halo[j], X[self.F:])

    def tmv_local(self, st, j, s, Z):
        torch.mm(st.tloc[j], s, out=Z[:self.F] if st.halo is not None else Z)

    def tmv_halo(self, st, j, s, Z):
        if st.thalo is not None:
            torch.mm(st.thalo[j], s, out=Z[self.F:])

    def tmv_into(self, st, j, s, base, out, alpha=1.0):
        """``out = base + alpha tmv(s)`` in one call (:attr:`direct` only)."""
        torch.addmm(base, st.tloc[j], s, alpha=alpha, out=out)

    def grad_buffers(self, st) -> list[Tensor]:
        return [torch.zeros_like(st.K)] + ([] if self.shared else [torch.zeros_like(st.A)])

    def grad(self, st, G, j, gu, X, s, GZ):
        """``dK += gu X^T``, ``dA += s GZ^T``."""
        G[0][j].addmm_(gu, X.T)
        G[-1][j].addmm_(s, GZ.T)

    def grad_layers(self, st, G, GU, X, S, GZ):
        """:meth:`grad` for every layer at once (``(L, rows, B)`` operands), as batched products."""
        G[0].baddbmm_(GU, X.transpose(1, 2))
        G[-1].baddbmm_(S, GZ.transpose(1, 2))

    def end_grad(self, G: list[Tensor]) -> list[Tensor]:
        """Entries off the blocks get no gradient: they stay exactly zero under any optimiser."""
        if self.mask is None:
            return G
        G = [g.mul_(self.mask) for g in G]
        if FAULT == "mask" and (~self.mask).any():  # test-only: one entry off the blocks gets a gradient
            G[0].view(self.L, -1)[:, int((~self.mask).view(-1).nonzero()[0])] = 1.0
        return G

    def outside(self, Ws: list[Tensor]) -> list[dict]:
        """The non-zero entries stored outside the graph's blocks (none, unless a bug)."""
        if self.mask is None:
            return []
        bad = (Ws[0].detach() != 0) & ~self.mask
        return [{"layer": int(j), "where": f"local row {int(r)}, column {int(c)}", "value": float(Ws[0][j, r, c])}
                for j, r, c in bad.nonzero()[:5].tolist()]

    def column_bound(self, st) -> float | None:
        """``sum_j max_c sum_r |A_j[r, c]|``: how far ``tmv`` of a vector in [-1, 1] can move an
        entry over all layers (None with a halo: other ranks' rows add to the same columns)."""
        return float(st.A.detach().abs().sum(1).amax(-1).double().sum()) if self.E == self.F else None


class _BlockProducts:
    """What the block kernels share: products accumulated block class by block class into the
    output (``_mv``, ``_tmv_add``), started from the bias or zero."""

    F: int
    scales_mv, direct, n_tensors = False, False, None  # (n_tensors: one per block class)

    def adjoint(self, st):
        return st  # K is A

    def column_bound(self, st):
        return None

    def mv_local(self, Ws, j, X, out, bias=None, scale=1.0):
        out.zero_() if bias is None else out.copy_(bias.expand_as(out))
        self._mv(Ws, j, X, out, "local")

    def mv_halo(self, Ws, j, X, out):
        self._mv(Ws, j, X, out, "halo")

    def _tmv(self, Ws, j, s, Z, part):
        (Z[:self.F] if part == "local" else Z[self.F:]).zero_()
        self._tmv_add(Ws, j, s, Z, part)

    def tmv_local(self, Ws, j, s, Z):
        self._tmv(Ws, j, s, Z, "local")

    def tmv_halo(self, Ws, j, s, Z):
        self._tmv(Ws, j, s, Z, "halo")

    def prepare(self, Ws):
        return Ws

    def grad_buffers(self, Ws):
        return [torch.zeros_like(W) for W in Ws]

    def end_grad(self, G):
        return G

    def outside(self, Ws):
        return []  # only the blocks are stored


class BlockKernel(_BlockProducts):
    """Block-by-block products: per class ``W`` is ``(layers, nb, r, c)``; inputs are gathered
    rows, one ``bmm`` per chunk of blocks, results added into rows with ``index_add_``."""

    name = "blocks"

    def __init__(self, classes: list[ClassRows], F: int, E: int, layers: int):
        self.F, self.E, self.L = F, E, layers
        self.classes = classes
        self._chunk_lists = {}  # (class, part, batch) -> its chunks: built once, every layer reuses them

    def move(self, fn) -> None:
        self.classes = [ClassRows(fn(c.rows), fn(c.cols), c.n_local) for c in self.classes]
        self._chunk_lists = {}

    def _chunks(self, c: ClassRows, part: str, B: int) -> list:
        key = (id(c), part, B)
        if key not in self._chunk_lists:
            nb, r, cc = c.shape
            lo, hi = (0, c.n_local) if part == "local" else (c.n_local, nb)
            step = max(1, chunk_elements(c.rows) // (max(r, cc) * max(B, 1)))
            cuts = [slice(a, min(hi, a + step)) for a in range(lo, hi, step)]
            self._chunk_lists[key] = [(sl, c.rows[sl].reshape(-1), c.cols[sl].reshape(-1)) for sl in cuts]
        return self._chunk_lists[key]

    def _mv(self, Ws, j, X, out, part, transpose: bool = False):
        """``out[rows] += K X[cols]`` block by block (``transpose``: ``out[cols] += K^T X[rows]``)."""
        B = X.shape[1]
        for W, c in zip(Ws, self.classes):
            for sl, rows, cols in self._chunks(c, part, B):
                src, dst = (rows, cols) if transpose else (cols, rows)
                w = W[j, sl].transpose(1, 2) if transpose else W[j, sl]
                out.index_add_(0, dst, torch.bmm(w, X.index_select(0, src).view(len(w), w.shape[2], B)).view(-1, B))

    def _tmv_add(self, Ws, j, s, Z, part):
        self._mv(Ws, j, s, Z, part, transpose=True)

    def grad(self, Ws, G, j, gu, X, s, GZ):
        B = X.shape[1]
        for gW, c in zip(G, self.classes):
            _, r, cc = c.shape
            for part in ("local", "halo"):
                for sl, rows, cols in self._chunks(c, part, 2 * B):
                    g = gW[j, sl]
                    torch.bmm(gu.index_select(0, rows).view(-1, r, B),
                              X.index_select(0, cols).view(-1, cc, B).transpose(1, 2), out=g)
                    g.baddbmm_(s.index_select(0, rows).view(-1, r, B),
                               GZ.index_select(0, cols).view(-1, cc, B).transpose(1, 2))


class FusedKernel(_BlockProducts):
    """The block products compiled per block shape (``fused.py``): per block row, every neighbour
    block's product and the bias accumulate in one pass over a tile that stays in cache; the
    transposed product per block column likewise; the weight gradient in one pass per block.
    Same storage as :class:`BlockKernel` (one tensor per class); classes whose blocks are not
    contiguous rows go through its gathers (``rest``)."""

    name = "fused"

    def __init__(self, classes: list[ClassRows], F: int, E: int, layers: int):
        why = fused.available()
        if why is not None:
            raise RuntimeError(f"run.local_kernel: fused is unavailable: {why}; use auto, blocks or diagonal")
        self.F, self.E, self.L = F, E, layers
        self.plan = []  # per class: None (gather path), or its block starts and groups by part
        total = sum(c.shape[0] * c.shape[1] * c.shape[2] for c in classes)
        for c in classes:
            if not contiguous(c):
                self.plan.append(None)
                continue
            nb, r, cc = c.shape
            # compiled for its shape where it carries a good share of the products (each shape costs
            # a compilation of 1-3 s on a first run); the rest share one nest for every shape
            shape = (r, cc) if nb * r * cc >= SPECIALISE_SHARE * total else (fused.ANY, fused.ANY)
            r0, c0 = c.rows[:, 0].cpu().numpy().astype(np.int64), c.cols[:, 0].cpu().numpy().astype(np.int64)
            parts = {"local": np.arange(c.n_local), "halo": np.arange(c.n_local, nb)}
            spans = {"local": (0, F), "halo": (F, E)}
            self.plan.append({"shape": shape, "row0": r0, "col0": c0,
                              "rows": {p: fused.Groups(r0, b, r, 0, F) for p, b in parts.items()},
                              "cols": {p: fused.Groups(c0, b, cc, *spans[p]) for p, b in parts.items()}})
        self.rest = BlockKernel([c for c, p in zip(classes, self.plan) if p is None], F, E, layers)
        alone = len(classes) == 1 and self.plan[0] is not None  # one class does every row's products
        # where that class covers a part's output rows, its loops start them (no separate zero or bias pass)
        self.at_once = {(k, part): alone and self.plan[0][k][part].covers for k in ("rows", "cols")
                        for part in ("local", "halo")}

    def move(self, fn) -> None:
        if fn(torch.zeros(1)).device.type != "cpu":
            raise RuntimeError(f"run.local_kernel: fused: {fused.available('cuda')}; use auto, blocks or diagonal")
        self.rest.move(fn)

    def _rest(self, ts):
        return [t for t, p in zip(ts, self.plan) if p is None]

    def _fused(self, ts):
        return [(t, p) for t, p in zip(ts, self.plan) if p is not None]

    def prepare(self, Ws) -> "_FusedState":
        """One pass's operands, with each fused class's loop nests compiled for its dtype."""
        mine = self._fused(Ws)
        arrays = [_np(W) for W, _ in mine]
        fns = [fused._compiled(*p["shape"], a.dtype) for a, (_, p) in zip(arrays, mine)]
        return _FusedState(Ws, list(zip(arrays, (p for _, p in mine), fns)),
                           np.empty(0, arrays[0].dtype if arrays else np.float32))

    def grad_buffers(self, st):
        return [torch.zeros_like(W) for W in st.Ws]

    def mv_local(self, st, j, X, out, bias=None, scale=1.0):
        at_once = self.at_once["rows", "local"]
        if not at_once:
            out.copy_(bias.expand_as(out)) if bias is not None else out.zero_()
        self._mv(st, j, X, out, "local", (2 if bias is not None else 1) if at_once else 0, bias)

    def _mv(self, st, j, X, out, part, init=0, bias=None):
        x, o = _np(X), _np(out)
        b = _np(bias).reshape(-1) if bias is not None else st.no_bias
        for W, p, fn in st.fused:
            g = p["rows"][part]
            fn[0](W[j], g.ptr, g.start, g.blk, p["col0"], x, o, b, init)
        self.rest._mv(self._rest(st.Ws), j, X, out, part)

    def _tmv(self, st, j, s, Z, part):
        at_once = self.at_once["cols", part]
        if not at_once:
            (Z[:self.F] if part == "local" else Z[self.F:]).zero_()
        self._tmv_add(st, j, s, Z, part, int(at_once))

    def _tmv_add(self, st, j, s, Z, part, init=0):
        sv, z = _np(s), _np(Z)
        for W, p, fn in st.fused:
            g = p["cols"][part]
            fn[1](W[j], g.ptr, g.start, g.blk, p["row0"], sv, z, st.no_bias, init)
        self.rest._tmv_add(self._rest(st.Ws), j, s, Z, part)

    def grad(self, st, G, j, gu, X, s, GZ):
        a, x, sv, z = _np(gu), _np(X), _np(s), _np(GZ)
        for (gW, _), (_, p, fn) in zip(self._fused(G), st.fused):
            fn[2](_np(gW)[j], p["row0"], p["col0"], a, x, sv, z)
        self.rest.grad(self._rest(st.Ws), self._rest(G), j, gu, X, s, GZ)


class _FusedState(NamedTuple):
    """One pass's operands of :class:`FusedKernel`."""

    Ws: list  # the class tensors (the gather path takes its classes from these)
    fused: list  # per compiled class: (its blocks as a NumPy array, its plan, its loop nests)
    no_bias: np.ndarray  # an empty bias (the loops read the bias only with init 2)


def _np(t: Tensor) -> np.ndarray:
    """A C-contiguous CPU tensor as a NumPy array on the same memory (the compiled loops write it)."""
    if not t.is_contiguous() or t.device.type != "cpu":
        raise RuntimeError("the fused kernel needs contiguous CPU tensors")
    return t.detach().numpy()


@dataclass
class Band:
    """Blocks of one class along one diagonal: block ``i`` (``0 <= i < count``) couples output
    rows ``lo + i r .. lo + (i + 1) r`` with input rows shifted by ``delta``; stored at positions
    ``start .. start + count`` of its class tensor (zero where the graph has no block)."""

    cls: int
    lo: int
    delta: int
    r: int
    start: int
    count: int

    @property
    def hi(self) -> int:
        return self.lo + self.count * self.r


class DiagonalKernel(_BlockProducts):
    """Blocks stored along diagonals (DIA format, the stencil form of a regular graph): for a
    band of blocks whose input rows are their output rows shifted by one ``delta``, every
    product is one batched product on *views* of the fields — no index gathers, no scatter-adds,
    no temporaries: ``out[lo:hi] += K_band x[lo + delta : hi + delta]``. A grid or a ring on
    contiguous agents is a handful of bands (one per neighbour offset, the halo's included);
    missing blocks inside a band are zeros whose gradient is masked. Blocks that fit no band (an
    irregular graph's, blocks that are not square) go through :class:`BlockKernel`'s gathers.
    Blocks of one entry (``r = 1``) are multiplied element-wise."""

    name = "diagonal"
    MIN_FILL = 0.5  # a band is kept where at least half its positions hold real blocks
    MIN_BLOCKS = 4  # shorter runs go to the gather path

    def __init__(self, classes: list[ClassRows], F: int, E: int, layers: int):
        self.F, self.E, self.L = F, E, layers
        self.bands: dict[str, list[Band]] = {"local": [], "halo": []}
        self.positions, self.pads, rest, self.sizes = [], [], [], []
        for ci, c in enumerate(classes):
            pos, pad, left, size = self._plan_class(ci, c)
            self.positions.append(pos)
            self.pads.append(pad)
            rest.append(left)
            self.sizes.append(size)
        # what fits no band: gathered and scattered, stored after the bands in each class tensor
        self.rest = BlockKernel([ClassRows(c.rows[r], c.cols[r], int((c.cols[r][:, 0] < F).sum()) if len(r) else 0)
                                 for c, r in zip(classes, rest)], F, E, layers)
        self.rest_start = [size - len(r) for size, r in zip(self.sizes, rest)]

    def _plan_class(self, ci: int, c: ClassRows):
        """Bands of one class: blocks grouped by ``delta = col - row`` (square blocks only), cut into
        runs dense enough to store whole. Returns each block's stored position, the padding
        positions, the blocks left for the gather path and the class tensor's length."""
        nb, r, cc = c.shape
        R0 = c.rows[:, 0].cpu().numpy().astype(np.int64)
        C0 = c.cols[:, 0].cpu().numpy().astype(np.int64)
        pos = np.full(nb, -1, np.int64)
        pads, at = [], 0
        if r == cc and contiguous(c):
            key = np.stack([C0 - R0, R0 % r], 1)
            order = np.lexsort((R0, key[:, 1], key[:, 0]))
            for group in np.split(order, np.flatnonzero(np.any(np.diff(key[order], axis=0) != 0, axis=1)) + 1):
                for run in self._runs(R0[group] // r, group):
                    # block rows are slot * r + ph: agents of other dims before them shift the phase
                    ph = int(R0[run[0]] % r)
                    lo_slot, hi_slot = int(R0[run[0]] // r), int(R0[run[-1]] // r) + 1
                    delta = int(C0[run[0]] - R0[run[0]])
                    local = lo_slot * r + ph + delta >= 0 and hi_slot * r + ph + delta <= self.F
                    halo = lo_slot * r + ph + delta >= self.F
                    if not (local or halo):  # straddles the local/halo boundary: split it there
                        cut = (self.F - delta - ph + r - 1) // r
                        parts = [run[R0[run] // r < cut], run[R0[run] // r >= cut]]
                    else:
                        parts = [run]
                    for part in parts:
                        if len(part) < self.MIN_BLOCKS:
                            continue
                        lo_s, hi_s = int(R0[part[0]] // r), int(R0[part[-1]] // r) + 1
                        band = Band(ci, lo_s * r + ph, delta, r, at, hi_s - lo_s)
                        self.bands["local" if band.lo + delta < self.F else "halo"].append(band)
                        pos[part] = at + (R0[part] // r - lo_s)
                        pads.append(np.setdiff1d(np.arange(at, at + band.count), pos[part]))
                        at += band.count
        left = np.flatnonzero(pos < 0)
        pos[left] = at + np.arange(len(left))
        pad = np.concatenate(pads) if pads else np.zeros(0, np.int64)
        return torch.as_tensor(pos), torch.as_tensor(pad), torch.as_tensor(left), at + len(left)

    def _runs(self, slots: np.ndarray, idx: np.ndarray):
        """Cut sorted block slots into runs whose fill stays at least MIN_FILL."""
        start = 0
        for k in range(1, len(slots) + 1):
            if k == len(slots) or (slots[k] - slots[start] + 1) * self.MIN_FILL > k - start + 1 and \
                    slots[k] - slots[k - 1] > 1:
                yield idx[start:k]
                start = k

    def move(self, fn) -> None:
        self.rest.move(fn)
        self.pads = [fn(p) for p in self.pads]

    def flat(self, ci: int, r: int, c: int) -> Tensor:
        """Flat element positions (within one layer of the class tensor) of the class's blocks, in
        the class's block order (for checkpoint entries)."""
        return (self.positions[ci][:, None] * (r * c) + torch.arange(r * c)[None, :]).reshape(-1)

    def _band_mv(self, W, j, b: Band, X, out, transpose: bool = False):
        lo, hi, d, r, R = b.lo, b.hi, b.delta, b.r, b.count
        w = W[j, b.start:b.start + R]
        if transpose:  # out[lo + d : hi + d] += K^T x[lo : hi]
            src, dst = X[lo:hi], out[lo + d:hi + d]
        else:
            src, dst = X[lo + d:hi + d], out[lo:hi]
        if r == 1:
            dst.addcmul_(w.view(R, 1), src)
            return
        B = X.shape[1]
        src, dst = src.view(R, r, B), dst.view(R, r, B)
        w = w.transpose(1, 2) if transpose else w
        # a few hundred blocks at a time: the input copied into a fresh buffer and a fresh output,
        # then added. Small batched products run 1.3-2x faster on operands just written (in cache)
        # than on views into a large field (measured here: 26 against 20 GFLOP/s at 8 x 8)
        step = max(1, chunk_elements(X) // (r * max(B, 1)))
        for a in range(0, R, step):
            dst[a:a + step] += torch.bmm(w[a:a + step], src[a:a + step].clone())

    def _rest(self, ts):
        return [t[:, st:] for t, st in zip(ts, self.rest_start)]

    def _mv(self, Ws, j, X, out, part):
        for b in self.bands[part]:
            self._band_mv(Ws[b.cls], j, b, X, out)
        self.rest._mv(self._rest(Ws), j, X, out, part)

    def _tmv_add(self, Ws, j, s, Z, part):
        for b in self.bands[part]:
            self._band_mv(Ws[b.cls], j, b, s, Z, transpose=True)
        self.rest._tmv_add(self._rest(Ws), j, s, Z, part)

    def grad(self, Ws, G, j, gu, X, s, GZ):
        for part in ("local", "halo"):
            for b in self.bands[part]:
                lo, hi, d, r, R = b.lo, b.hi, b.delta, b.r, b.count
                g = G[b.cls][j, b.start:b.start + R]
                if r == 1:
                    torch.sum(gu[lo:hi] * X[lo + d:hi + d], 1, out=g.view(R))
                    g.view(R).add_((s[lo:hi] * GZ[lo + d:hi + d]).sum(1))
                else:
                    B = X.shape[1]
                    a_, x_ = gu[lo:hi].view(R, r, B), X[lo + d:hi + d].view(R, r, B)
                    s_, z_ = s[lo:hi].view(R, r, B), GZ[lo + d:hi + d].view(R, r, B)
                    step = max(1, chunk_elements(X) // (r * max(B, 1)))
                    for c0 in range(0, R, step):
                        sl = slice(c0, c0 + step)
                        torch.add(torch.bmm(a_[sl].clone(), x_[sl].transpose(1, 2).clone()),
                                  torch.bmm(s_[sl].clone(), z_[sl].transpose(1, 2).clone()), out=g[sl])
        self.rest.grad(self._rest(Ws), self._rest(G), j, gu, X, s, GZ)

    def end_grad(self, G):
        """Padding inside the bands gets no gradient: it stays exactly zero under any optimiser."""
        for g, pad in zip(G, self.pads):
            if len(pad):
                g.index_fill_(1, pad, 0)
        return G

    def outside(self, Ws):
        """The non-zero padding entries of the bands (none, unless a bug)."""
        out = []
        for ci, (W, pad) in enumerate(zip(Ws, self.pads)):
            vals = W.detach()[:, pad].flatten(2).abs().amax(-1)  # (layers, padding slots)
            out += [{"layer": j, "where": f"block class {ci}, band slot {int(pad[i])}", "value": float(vals[j, i])}
                    for j, i in (vals != 0).nonzero()[:5].tolist()]
        return out


DIAGONAL_COVERAGE = 0.5  # share of a matrix's entries in bands above which auto takes the diagonal kernel


def _entries(classes: list[ClassRows]) -> int:
    return sum(int(np.prod(c.shape)) for c in classes)


def band_coverage(kernel: DiagonalKernel, classes: list[ClassRows]) -> float:
    """The share of the entries of these blocks that ``kernel`` (built on them) stores in bands."""
    total = _entries(classes)
    return 1.0 - _entries(kernel.rest.classes) / total if total else 0.0


FUSED_TRIAL_ENTRIES = 1 << 15  # block entries per matrix from which auto times its candidates on the rank's blocks
SPECIALISE_SHARE = 1 / 8  # a block shape with this share of a matrix's entries gets loops of its own (at most 8)
FUSED_MAX_BLOCK = 32  # larger blocks: batched BLAS products win by far; the fused kernel is not tried
TRIAL_BATCH = 64  # batch columns of that trial


def build_kernels(requested: str, classes: dict[str, list[ClassRows]], F: int, E: int, layers: int,
                  device="cpu", dtype=torch.float32):
    """The local kernel of every matrix, and its name: the one requested, or ``auto``'s choice —
    ``dense`` where the assembled local matrix is small or at least 1/4 full (one BLAS call beats
    any bookkeeping); else ``diagonal`` where bands hold most of every matrix's entries (a regular
    graph on contiguous agents: products on views), else ``blocks`` (cost follows the non-zero
    blocks whatever the graph). From :data:`FUSED_TRIAL_ENTRIES` block entries per matrix the
    candidates — that choice, ``blocks``, and ``fused`` where it can run (numba, CPU, blocks up to
    :data:`FUSED_MAX_BLOCK`) — are timed on this rank's blocks and the fastest kept (compiling
    the fused loops is not timed; it is reported apart). ``classes``: each matrix's class rows.
    The diagonal kernels built to measure the bands are the ones kept."""
    if requested != "auto":
        return requested, {m: KERNELS[requested](v, F, E, layers) for m, v in classes.items()}
    nnz = min(_entries(v) for v in classes.values())
    if F * E <= max(4096, 4 * nnz):
        return "dense", {m: MatrixKernel(v, F, E, layers) for m, v in classes.items()}
    candidates = {"diagonal": {m: DiagonalKernel(v, F, E, layers) for m, v in classes.items()}}
    if min(band_coverage(candidates["diagonal"][m], v) for m, v in classes.items()) < DIAGONAL_COVERAGE:
        candidates = {}
    candidates["blocks"] = {m: BlockKernel(v, F, E, layers) for m, v in classes.items()}
    small = all(max(c.shape[1:]) <= FUSED_MAX_BLOCK for v in classes.values() for c in v)
    if nnz >= FUSED_TRIAL_ENTRIES and small and fused.available(device) is None:
        candidates["fused"] = {m: FusedKernel(v, F, E, layers) for m, v in classes.items()}
    if nnz < FUSED_TRIAL_ENTRIES or len(candidates) == 1:  # nothing worth timing
        return next(iter(candidates.items()))
    m = next(iter(classes))
    name = min(candidates, key=lambda n: trial_seconds(candidates[n][m], classes[m], F, E, dtype))
    return name, candidates[name]


def trial_seconds(kern, classes: list[ClassRows], F: int, E: int, dtype, repeat: int = 3) -> float:
    """The best of ``repeat`` timings of one layer's products (forward, transposed, weight
    gradient) of ``kern`` on random blocks and fields (:data:`TRIAL_BATCH` columns)."""
    import time

    g = torch.Generator().manual_seed(0)
    sizes = getattr(kern, "sizes", [c.shape[0] for c in classes])  # (the diagonal kernel stores padded bands)
    Ws = [torch.randn(1, n, c.shape[1], c.shape[2], generator=g, dtype=dtype) for n, c in zip(sizes, classes)]
    X, Z = torch.randn(E, TRIAL_BATCH, generator=g, dtype=dtype), torch.empty(E, TRIAL_BATCH, dtype=dtype)
    out, bias = torch.empty(F, TRIAL_BATCH, dtype=dtype), torch.randn(F, 1, generator=g, dtype=dtype)
    st = kern.prepare(Ws)
    G = kern.grad_buffers(st)
    best = float("inf")
    for _ in range(repeat + 1):  # (the first run warms caches and workspaces)
        t0 = time.perf_counter()
        kern.mv_local(st, 0, X, out, bias)
        kern.mv_halo(st, 0, X, out)
        kern.tmv_halo(st, 0, out, Z)
        kern.tmv_local(st, 0, out, Z)
        kern.grad(st, G, 0, out, X, out, Z)
        best = min(best, time.perf_counter() - t0)
    return best


KERNELS = {"dense": MatrixKernel, "blocks": BlockKernel, "diagonal": DiagonalKernel, "fused": FusedKernel}


def class_rows(rows_ext: np.ndarray, cols_ext: np.ndarray, F: int, device=None) -> tuple[ClassRows, np.ndarray]:
    """Order one class's blocks local-columns first; returns the rows and that order."""
    halo = cols_ext[:, 0] >= F if cols_ext.shape[1] else np.zeros(len(cols_ext), bool)
    order = np.concatenate([np.flatnonzero(~halo), np.flatnonzero(halo)])
    c = ClassRows(torch.as_tensor(rows_ext[order], device=device), torch.as_tensor(cols_ext[order], device=device),
                  int((~halo).sum()))
    return c, order
