"""Local products with one rank's rows of a block-sparse matrix, split for overlap.

A rank holds the row blocks of its agents for every layer. Against its *extended* field
``X = [x_local; x_halo]`` (``(E, B)``, local rows ``[0, F)`` first) a kernel computes, per
layer ``j`` (every method overwrites its output unless it says "add"):

* ``mv_local(st, j, X, out, bias)``: ``out = K_local X (+ bias)`` — blocks whose column agent
  is mine, computable before the halo arrives; ``mv_halo(st, j, X, out)`` adds the rest;
* ``tmv_halo(st, j, s, Z)``: ``Z[F:] = K_halo^T s``, the contributions neighbours must
  receive; ``tmv_local(st, j, s, Z)``: ``Z[:F] = K_local^T s``;
* ``grad(st, G, j, gu, X, s, GZ)``: the weight gradient of ``s = tanh(K X + b)``,
  ``z = K^T s``: ``dK += gu X^T + s GZ^T`` on the blocks only.

:class:`DenseKernel` works on the rank's rows stored assembled, ``(layers, F, E)`` matrices zero
off the blocks (small or dense ranks: one BLAS call per product); :class:`BlockKernel` multiplies block by
block with chunked ``bmm`` (cost follows the non-zero blocks, so a rank of 30,000 ring agents
never forms a 30,000-agent matrix). Both take the parameter tensors as arguments, so the
autograd Function that calls them owns the gradients. ``prepare`` builds per-pass state
(views per layer), so a product costs one call, not an indexing chain.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

CHUNK_ELEMENTS = 1 << 18  # gathered inputs per bmm chunk (~1 MiB in float32: stays in cache)


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


@dataclass
class DenseState:
    K: Tensor  # (L, F, E)
    loc: list  # per layer: (F, F) views
    halo: list  # per layer: (F, H) views (None without a halo)


class DenseKernel:
    """Assembled local matrices: ``K[j]`` is ``(F, E)``, zero off the blocks."""

    name = "dense"

    def __init__(self, classes: list[ClassRows], F: int, E: int, layers: int):
        self.F, self.E, self.L = F, E, layers
        # flat positions of every block entry in an (F, E) matrix, class by class
        self.flat = [(c.rows[:, :, None] * E + c.cols[:, None, :]).reshape(-1) for c in classes]
        mask = torch.zeros(F * E, dtype=torch.bool)
        for f in self.flat:
            mask[f] = True
        self.mask = mask.view(F, E)

    def move(self, fn) -> None:
        """Move the kernel's index tensors (``fn`` as in ``Module._apply``)."""
        self.flat = [fn(f) for f in self.flat]
        self.mask = fn(self.mask)

    def prepare(self, Ws: list[Tensor]) -> DenseState:
        """``Ws``: the one ``(L, F, E)`` parameter (stored assembled, zero off the blocks)."""
        K = Ws[0]
        F = self.F
        if self.E == F:  # no halo: the whole matrix is local
            return DenseState(K, list(K.unbind(0)), None)
        return DenseState(K, list(K[:, :, :F].unbind(0)), list(K[:, :, F:].unbind(0)))

    def mv_local(self, st, j, X, out, bias=None):
        if bias is None:
            torch.mm(st.loc[j], X[:self.F], out=out)
        else:
            torch.addmm(bias, st.loc[j], X[:self.F], out=out)

    def mv_halo(self, st, j, X, out):
        if st.halo is not None:
            out.addmm_(st.halo[j], X[self.F:])

    def tmv_local(self, st, j, s, Z):
        torch.mm(st.loc[j].T, s, out=Z[:self.F])

    def tmv_halo(self, st, j, s, Z):
        if st.halo is not None:
            torch.mm(st.halo[j].T, s, out=Z[self.F:])

    def grad_buffers(self, st) -> Tensor:
        return torch.zeros_like(st.K)

    def grad(self, st, G, j, gu, X, s, GZ):
        G[j].addmm_(gu, X.T).addmm_(s, GZ.T)

    def end_grad(self, G: Tensor) -> list[Tensor]:
        """Entries off the blocks get no gradient: they stay exactly zero under any optimiser."""
        return [G.mul_(self.mask)]


class BlockKernel:
    """Block-by-block products: per class ``W`` is ``(layers, nb, r, c)``; inputs are gathered
    rows, one ``bmm`` per chunk of blocks, results added into rows with ``index_add_``."""

    name = "blocks"

    def __init__(self, classes: list[ClassRows], F: int, E: int, layers: int):
        self.F, self.E, self.L = F, E, layers
        self.classes = classes

    def move(self, fn) -> None:
        self.classes = [ClassRows(fn(c.rows), fn(c.cols), c.n_local) for c in self.classes]

    def _chunks(self, c: ClassRows, part: str, B: int):
        nb, r, cc = c.shape
        lo, hi = (0, c.n_local) if part == "local" else (c.n_local, nb)
        step = max(1, CHUNK_ELEMENTS // (max(r, cc) * max(B, 1)))
        for a in range(lo, hi, step):
            b = min(hi, a + step)
            yield slice(a, b), c.rows[a:b].reshape(-1), c.cols[a:b].reshape(-1)

    def prepare(self, Ws):
        return Ws

    def _mv(self, Ws, j, X, out, part):
        B = X.shape[1]
        for W, c in zip(Ws, self.classes):
            _, r, cc = c.shape
            for sl, rows, cols in self._chunks(c, part, B):
                xs = X.index_select(0, cols).view(-1, cc, B)
                out.index_add_(0, rows, torch.bmm(W[j, sl], xs).view(-1, B))

    def mv_local(self, Ws, j, X, out, bias=None):
        if bias is None:
            out.zero_()
        else:
            out.copy_(bias.expand_as(out))
        self._mv(Ws, j, X, out, "local")

    def mv_halo(self, Ws, j, X, out):
        self._mv(Ws, j, X, out, "halo")

    def _tmv(self, Ws, j, s, Z, part):
        B = s.shape[1]
        (Z[:self.F] if part == "local" else Z[self.F:]).zero_()
        for W, c in zip(Ws, self.classes):
            _, r, cc = c.shape
            for sl, rows, cols in self._chunks(c, part, B):
                ss = s.index_select(0, rows).view(-1, r, B)
                Z.index_add_(0, cols, torch.bmm(W[j, sl].transpose(1, 2), ss).view(-1, B))

    def tmv_local(self, Ws, j, s, Z):
        self._tmv(Ws, j, s, Z, "local")

    def tmv_halo(self, Ws, j, s, Z):
        self._tmv(Ws, j, s, Z, "halo")

    def grad_buffers(self, Ws):
        return [torch.zeros_like(W) for W in Ws]

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

    def end_grad(self, G):
        return G


def choose_kernel(requested: str, F: int, E: int, nnz: int) -> str:
    """``dense`` where the assembled local matrix is small or at least 1/4 full; otherwise
    ``blocks``, whose cost follows the number of non-zero blocks."""
    if requested != "auto":
        return requested
    return "dense" if F * E <= max(4096, 4 * nnz) else "blocks"


KERNELS = {"dense": DenseKernel, "blocks": BlockKernel}


def class_rows(rows_ext: np.ndarray, cols_ext: np.ndarray, F: int, device=None) -> tuple[ClassRows, np.ndarray]:
    """Order one class's blocks local-columns first; returns the rows and that order."""
    halo = cols_ext[:, 0] >= F if cols_ext.shape[1] else np.zeros(len(cols_ext), bool)
    order = np.concatenate([np.flatnonzero(~halo), np.flatnonzero(halo)])
    c = ClassRows(torch.as_tensor(rows_ext[order], device=device), torch.as_tensor(cols_ext[order], device=device),
                  int((~halo).sum()))
    return c, order
