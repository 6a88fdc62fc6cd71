"""Local products with one rank's rows of a block-sparse matrix, split for overlap.

A rank holds the row blocks of its agents for every layer. Against its *extended* field
``X = [x_local; x_halo]`` (``(E, B)``, local rows ``[0, F)`` first) a kernel computes, per
layer ``j``:

* ``mv(j, X, out, part)``: ``out += K_part X`` on my rows (``part`` = ``"local"``: blocks
  whose column agent is mine, computable before the halo arrives; ``"halo"``: the rest);
* ``tmv(j, s, Z, part)``: ``Z[cols] += K_part^T s`` — ``"halo"`` writes the contributions
  neighbours must receive (``Z[F:]``), ``"local"`` those for my own agents (``Z[:F]``);
* ``grad(j, gu, X, s, GZ)``: the weight gradient of ``s = tanh(K X + b)``, ``z = K^T s``:
  ``dK += gu X^T + s GZ^T`` on the blocks only.

:class:`DenseKernel` assembles the blocks into ``(layers, F, E)`` matrices once per pass
(small or dense ranks: one ``addmm`` per product); :class:`BlockKernel` multiplies block by
block with chunked ``bmm`` (cost follows the non-zero blocks, so a rank of 30,000 ring agents
never forms a 30,000-agent matrix). Both take the parameter tensors as arguments, so the
autograd Function that calls them owns the gradients.
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


class DenseKernel:
    """Assembled local matrices: ``K[j]`` is ``(F, E)``, zero off the blocks."""

    name = "dense"

    def __init__(self, classes: list[ClassRows], F: int, E: int, layers: int):
        self.F, self.E, self.L = F, E, layers
        # flat positions of every block entry in an (F, E) matrix, class by class
        self.flat = [(c.rows[:, :, None] * E + c.cols[:, None, :]).reshape(-1) for c in classes]
        self.shapes = [c.shape for c in classes]

    def begin(self, Ws: list[Tensor]) -> Tensor:
        K = Ws[0].new_zeros(self.L, self.F * self.E)
        for W, flat in zip(Ws, self.flat):
            K.index_copy_(1, flat, W.reshape(self.L, -1))
        return K.view(self.L, self.F, self.E)

    def mv(self, K, j, X, out, part):
        F = self.F
        if part == "local":
            out.addmm_(K[j, :, :F], X[:F])
        elif self.E > F:
            out.addmm_(K[j, :, F:], X[F:])

    def tmv(self, K, j, s, Z, part):
        F = self.F
        if part == "local":
            torch.mm(K[j, :, :F].T, s, out=Z[:F])
        elif self.E > F:
            torch.mm(K[j, :, F:].T, s, out=Z[F:])

    def grad_buffers(self, Ws: list[Tensor]) -> Tensor:
        return Ws[0].new_zeros(self.L, self.F, self.E)

    def grad(self, K, G, j, gu, X, s, GZ):
        G[j].addmm_(gu, X.T).addmm_(s, GZ.T)

    def end_grad(self, G: Tensor) -> list[Tensor]:
        flat = G.view(self.L, -1)
        return [flat.index_select(1, f).view(self.L, *shape) for f, shape in zip(self.flat, self.shapes)]


class BlockKernel:
    """Block-by-block products: per class ``W`` is ``(layers, nb, r, c)``; inputs are gathered
    rows, one ``bmm`` per chunk of blocks, results added into rows with ``index_add_``."""

    name = "blocks"

    def __init__(self, classes: list[ClassRows], F: int, E: int, layers: int, batch_hint: int = 128):
        self.F, self.E, self.L = F, E, layers
        self.classes = classes

    def _chunks(self, c: ClassRows, part: str, B: int):
        nb, r, cc = c.shape
        lo, hi = (0, c.n_local) if part == "local" else (c.n_local, nb)
        step = max(1, CHUNK_ELEMENTS // (max(r, cc) * max(B, 1)))
        for a in range(lo, hi, step):
            b = min(hi, a + step)
            yield slice(a, b), c.rows[a:b].reshape(-1), c.cols[a:b].reshape(-1)

    def begin(self, Ws):
        return Ws

    def mv(self, Ws, j, X, out, part):
        B = X.shape[1]
        for W, c in zip(Ws, self.classes):
            nb, r, cc = c.shape
            for sl, rows, cols in self._chunks(c, part, B):
                xs = X.index_select(0, cols).view(-1, cc, B)
                out.index_add_(0, rows, torch.bmm(W[j, sl], xs).view(-1, B))

    def tmv(self, Ws, j, s, Z, part):
        F, B = self.F, s.shape[1]
        (Z[:F] if part == "local" else Z[F:]).zero_()
        for W, c in zip(Ws, self.classes):
            nb, r, cc = c.shape
            for sl, rows, cols in self._chunks(c, part, B):
                ss = s.index_select(0, rows).view(-1, r, B)
                Z.index_add_(0, cols, torch.bmm(W[j, sl].transpose(1, 2), ss).view(-1, B))

    def grad_buffers(self, Ws):
        return [torch.zeros_like(W) for W in Ws]

    def grad(self, Ws, G, j, gu, X, s, GZ):
        B = X.shape[1]
        for gW, c in zip(G, self.classes):
            nb, r, cc = c.shape
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
