"""Sharded H1 (J1) and H2 networks: each rank holds its agents' state and row blocks.

Per layer every product with ``K`` is local compute plus one neighbour exchange:
``K x`` reads the neighbours' columns (``gather``), ``K^T s`` produces contributions for
the neighbours' agents (``scatter_add``). Local compute runs over the non-zero blocks
only (the rows of agents with the same block-shape signature side by side, one chunked
``bmm`` per group), so its cost grows with the number of edges, never with the square of
the rank's state size; small or dense ranks may use assembled local matrices instead.

The readout's partial logits travel up a spanning tree of the rank graph to rank 0,
which computes the loss; the logits' gradient travels back down (neighbour ranks only).
An all-reduce readout exists as an explicit option.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..blocks import BIASES, MATRICES, field_width
from ..models._fused import H1Stack, H2Stack
from ..partition import HaloPlan
from ..topology import Topology
from ..train import Engine, StepOut, stats_of
from .exchange import CommStats, Exchanger, PeerFailure, Tracer, field_layout, gather, scatter_add


CHUNK_ELEMENTS = 1 << 18


class BlockRows(nn.Module):
    """This rank's row blocks of one matrix (``K_p``, ``K_q`` or ``K``).

    Each of my agents' rows ``[K^[i k] for k in {i} ∪ N(i)]`` is stored side by side; agents
    with the same row signature (own width, neighbours' widths) form a group with weights
    ``(layers, agents, r, sum c)``, so a product is one ``bmm`` per group. ``rows[g]`` /
    ``cols[g]`` hold the local-field / extended-field (local + halo) rows involved, flattened.
    Fields are feature-major ``(F, B)``: gathering a block's input is a contiguous row copy.
    """

    def __init__(self, kind: str, topo: Topology, arch: str, local: list[int], local_col: dict[int, int],
                 ext_col: dict[int, int], init: dict[str, Tensor]):
        super().__init__()
        groups: dict[tuple, list[int]] = {}
        for i in local:
            sig = (field_width(topo, arch, i), tuple(field_width(topo, arch, k) for k in topo.neighbors(i)))
            groups.setdefault(sig, []).append(i)
        self.names: list[list[tuple[str, int, slice]]] = []  # per group: (block name, agent slot, columns)
        self.weights = nn.ParameterList()
        for g, ((r, widths), agents) in enumerate(sorted(groups.items())):
            names, rows, cols, mats = [], [], [], []
            for slot, i in enumerate(agents):
                at, parts = 0, []
                for k, c in zip(topo.neighbors(i), widths):
                    name = f"agent{i}.{kind}.{k}"
                    names.append((name, slot, slice(at, at + c)))
                    parts.append(init[name])
                    cols += [ext_col[k] + t for t in range(c)]
                    at += c
                rows += [local_col[i] + t for t in range(r)]
                mats.append(torch.cat(parts, dim=2))
            self.names.append(names)
            self.weights.append(nn.Parameter(torch.stack(mats, dim=1)))
            self.register_buffer(f"rows{g}", torch.tensor(rows))
            self.register_buffer(f"cols{g}", torch.tensor(cols))

    def _groups(self):
        for g, W in enumerate(self.weights):
            yield W, getattr(self, f"rows{g}"), getattr(self, f"cols{g}")

    def per_layer(self) -> list[tuple[Tensor, ...]]:
        """Every layer's group weights. ``unbind`` once per forward rather than ``W[j]`` per layer:
        its backward stacks all layers' gradients once instead of a full-size zero tensor per layer."""
        return list(zip(*[W.unbind(0) for W in self.weights]))

    def times(self, Wj: tuple[Tensor, ...], x_ext: Tensor, width: int) -> Tensor:
        """``(K x)`` on my rows: ``(width, B)`` from the extended field ``x_ext`` (E, B)."""
        return _BlockProduct.apply(x_ext, (self._index(), width, False), *Wj)

    def transpose_times(self, Wj: tuple[Tensor, ...], s: Tensor, ext_width: int) -> Tensor:
        """``(K^T s)`` restricted to my rows' contributions, over the extended field's rows."""
        return _BlockProduct.apply(s, (self._index(), ext_width, True), *Wj)

    def _index(self) -> list[tuple[Tensor, Tensor]]:
        return [(rows, cols) for _, rows, cols in self._groups()]

    @property
    def nnz(self) -> int:
        return sum(W[0].numel() for W in self.weights)

    def dense(self, width: int, ext_width: int) -> Tensor:
        """All layers' row blocks assembled into ``(layers, width, ext_width)`` (zero off the blocks);
        used only where that matrix is small or dense enough (see ``ShardedNet``)."""
        L = self.weights[0].shape[0]
        out = self.weights[0].new_zeros(L, width, ext_width)
        for W, rows, cols in self._groups():
            _, nb, r, c = W.shape
            out = _put_blocks(out, W, rows.view(nb, r), cols.view(nb, c))
        return out

    def smoothness(self) -> Tensor:
        return sum(((W[1:] - W[:-1]) ** 2).sum() for W in self.weights)

    def named_blocks(self):
        for names, W in zip(self.names, self.weights):
            for name, slot, cols in names:
                yield name, W, (slice(None), slot, slice(None), cols)


class _BlockProduct(torch.autograd.Function):
    """``y[rows] += W x[cols]`` (or, transposed, ``y[cols] += W^T x[rows]``) over groups of
    row blocks ``W`` of shape ``(agents, r, c)``, in agent chunks whose gathered input stays
    around 1 MiB: the cost per agent then stays flat as fields outgrow the cache. Gradients
    are accumulated in place, so chunking never allocates a full-size tensor per chunk."""

    @staticmethod
    def forward(ctx, x, spec, *Ws):
        index, width, transpose = spec
        ctx.spec = spec
        ctx.save_for_backward(x, *Ws)
        y = x.new_zeros(width, x.shape[1])
        for W, (rows, cols), sl in _chunks(Ws, index, x.shape[1]):
            Wc = W[sl]
            src, dst, A, n_src, n_dst = _roles(Wc, rows, cols, sl, transpose)
            xs = x.index_select(0, src).view(A, n_src, -1)
            y.index_add_(0, dst, torch.bmm(Wc.transpose(1, 2) if transpose else Wc, xs).view(A * n_dst, -1))
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, *Ws = ctx.saved_tensors
        index, _, transpose = ctx.spec
        gx = torch.zeros_like(x)
        gWs = {id(W): torch.empty_like(W) for W in Ws}
        for W, (rows, cols), sl in _chunks(Ws, index, x.shape[1]):
            src, dst, A, n_src, n_dst = _roles(W[sl], rows, cols, sl, transpose)
            xs = x.index_select(0, src).view(A, n_src, -1)
            gd = g.index_select(0, dst).view(A, n_dst, -1)
            if transpose:  # y = W^T x: dW = x g^T, dx = W g
                torch.bmm(xs, gd.transpose(1, 2), out=gWs[id(W)][sl])
                gx.index_add_(0, src, torch.bmm(W[sl], gd).view(A * n_src, -1))
            else:  # y = W x: dW = g x^T, dx = W^T g
                torch.bmm(gd, xs.transpose(1, 2), out=gWs[id(W)][sl])
                gx.index_add_(0, src, torch.bmm(W[sl].transpose(1, 2), gd).view(A * n_src, -1))
        return (gx, None, *[gWs[id(W)] for W in Ws])


def _chunks(Ws, index, B):
    """(group weights, (rows, cols), agent slice) for every chunk of every group."""
    for W, rc in zip(Ws, index):
        A, r, c = W.shape
        step = max(1, CHUNK_ELEMENTS // (max(r, c) * B))
        for a in range(0, A, step):
            yield W, rc, slice(a, min(A, a + step))


def _roles(W, rows, cols, sl, transpose):
    """Source rows read and destination rows written by one chunk of a block product."""
    A, r, c = W.shape
    rows, cols = rows[sl.start * r:sl.stop * r], cols[sl.start * c:sl.stop * c]
    return (rows, cols, A, r, c) if transpose else (cols, rows, A, c, r)


def _put_blocks(out: Tensor, W: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``out[:, rows[e, i], cols[e, k]] = W[:, e, i, k]`` (differentiable in ``W``)."""
    L = out.shape[0]
    flat = (rows[:, :, None] * out.shape[2] + cols[:, None, :]).reshape(-1)
    return out.reshape(L, -1).index_copy(1, flat, W.reshape(L, -1)).view_as(out)


class TreeReduce(torch.autograd.Function):
    """Partial logits up the rank tree to the root; the logits' gradient back down.

    The root returns the logits; other ranks return a 0-dim placeholder whose backward
    receives the gradient from the parent."""

    @staticmethod
    def forward(ctx, partial, tree: "Tree"):
        ctx.tree = tree
        return tree.up(partial.contiguous())

    @staticmethod
    def backward(ctx, g):
        return ctx.tree.down(g), None


class AllReduceSum(torch.autograd.Function):
    """The explicit collective readout: every rank gets the logits (and computes the same loss)."""

    @staticmethod
    def forward(ctx, partial, group):
        out = partial.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        return g, None


@dataclass
class Tree:
    rank: int
    parent: int | None
    children: list[int]
    group: object
    tracer: Tracer | None
    stage_cpu: bool
    stats: CommStats
    shape: tuple[int, int] = (0, 0)

    def _send(self, t: Tensor, dst: int, phase: str) -> object:
        nbytes = t.numel() * t.element_size()
        if self.tracer is not None:
            self.tracer.record(phase, -1, "readout", dst, nbytes)
        self.stats.bytes += nbytes
        self.stats.messages += 1
        return dist.isend(t, dst=dst, group=self.group)

    def _wait(self, reqs, what: str) -> None:
        peer = None
        t0 = time.perf_counter()
        try:
            for peer, r in reqs:
                r.wait()
            self.stats.seconds += time.perf_counter() - t0
        except RuntimeError as e:
            raise PeerFailure(f"readout {what}: exchange with rank {peer} failed: "
                              f"{str(e).splitlines()[0][:300]}", peer) from e

    def _cpu(self, t: Tensor) -> Tensor:
        return t.cpu() if self.stage_cpu else t

    def up(self, partial: Tensor) -> Tensor:
        self.shape = tuple(partial.shape)
        bufs = {c: torch.empty_like(self._cpu(partial)) for c in self.children}
        self._wait([(c, dist.irecv(b, src=c, group=self.group)) for c, b in bufs.items()], "gather")
        total = partial.clone()
        for b in bufs.values():
            total += b.to(total.device)
        if self.parent is None:
            return total
        msg = self._cpu(total)
        self._wait([(self.parent, self._send(msg, self.parent, "forward"))], "send to parent")
        return partial.new_zeros(())

    def down(self, g: Tensor) -> Tensor:
        if self.parent is not None:
            buf = torch.empty(self.shape, dtype=g.dtype, device="cpu" if self.stage_cpu else g.device)
            self._wait([(self.parent, dist.irecv(buf, src=self.parent, group=self.group))], "receive from parent")
            g = buf.to(g.device)
        else:
            g = g.contiguous()
        msg = self._cpu(g)
        self._wait([(c, self._send(msg, c, "backward")) for c in self.children], "send to children")
        return g


class ShardedNet(nn.Module):
    """One rank's share of the topology network: inputs, layers, readout partial sums."""

    def __init__(self, topo: Topology, arch: str, layers: int, h: float, plan: HaloPlan, n_features: int,
                 n_classes: int, init: dict[str, Tensor], readout: str = "tree", group=None,
                 tracer: Tracer | None = None, stage_cpu: bool = False, local_kernel: str = "auto"):
        super().__init__()
        self.arch, self.layers, self.h, self.rank = arch, layers, h, plan.rank
        self.readout_mode, self.group = readout, group
        local = plan.local
        w = {a: field_width(topo, arch, a) for a in set(local) | set(plan.halo)}
        local_col, at = {}, 0
        for a in local:
            local_col[a], at = at, at + w[a]
        self.width = at
        ext_col = dict(local_col)
        for a in plan.halo:
            ext_col[a], at = at, at + w[a]
        self.ext_width = at
        self.comm_stats = CommStats()
        self.ex = Exchanger(field_layout(plan, {a: list(range(local_col[a], local_col[a] + w[a])) for a in local},
                                         self.width, w), group, tracer, stage_cpu, self.comm_stats)
        self.mats = nn.ModuleDict({K: BlockRows(K, topo, arch, local, local_col, ext_col, init) for K in MATRICES[arch]})
        self.biases = nn.ParameterDict({b: nn.Parameter(torch.cat([init[f"agent{a}.{b}"] for a in local], 1))
                                        for b in BIASES[arch]})
        self._bias_cols = {a: slice(local_col[a], local_col[a] + w[a]) for a in local}
        self._setup_inputs(topo, local, local_col, n_features, init)
        self._setup_readout(topo, local, local_col, n_classes, init)
        if arch == "H1":  # J1 acts agent by agent: (v_p, v_q) -> (v_q, -v_p)
            perm, sign = [], []
            for a in local:
                n, c = topo.dims[a], local_col[a]
                perm += list(range(c + n, c + 2 * n)) + list(range(c, c + n))
                sign += [1.0] * n + [-1.0] * n
            self.register_buffer("j_perm", torch.tensor(perm))
            self.register_buffer("j_sign", torch.tensor(sign, dtype=init[f"agent{local[0]}.b"].dtype))
        self.tree = Tree(plan.rank, plan.tree_parent, plan.tree_children, group, tracer, stage_cpu, self.comm_stats)
        self.has_neighbors = bool(plan.send)
        self.local_kernel = self._choose_kernel(local_kernel)
        # a lone rank exchanges nothing, so its whole stack can run in the fused dense kernels
        self.fused = self.local_kernel == "dense" and not self.has_neighbors

    def _choose_kernel(self, requested: str) -> str:
        """Assembled dense local matrices where they are small or at least 1/4 full; otherwise the
        per-block products, whose cost follows the number of non-zero blocks."""
        if requested != "auto":
            return requested
        cells = self.width * self.ext_width
        nnz = min(m.nnz for m in self.mats.values())
        return "dense" if cells <= max(4096, 4 * nnz) else "blocks"

    # ---- inputs -------------------------------------------------------------------------
    def _setup_inputs(self, topo, local, local_col, n_features, init):
        mine = set(local)
        feeds = [f for f in topo.input_feeds(n_features) if f.agent in mine]
        fields = 2 if self.arch == "H2" else 1
        src, dst = [[] for _ in range(fields)], [[] for _ in range(fields)]
        for f in feeds:
            if self.arch == "H2":
                k, col = (0 if f.part == "p" else 1), local_col[f.agent] + f.index
            else:
                k, col = 0, local_col[f.agent] + f.index + (topo.dims[f.agent] if f.part == "q" else 0)
            src[k].append(f.feature)
            dst[k].append(col)
        for k in range(fields):
            self.register_buffer(f"in_src{k}", torch.tensor(src[k], dtype=torch.long))
            self.register_buffer(f"in_dst{k}", torch.tensor(dst[k], dtype=torch.long))
        self.embed = nn.ModuleDict()
        self._embed_cols = {}
        for e in topo.embeddings:
            if e.agent in mine:
                lin = nn.Linear(len(e.features), 2 * topo.dims[e.agent])
                lin.weight = nn.Parameter(init[f"agent{e.agent}.embed.weight"].clone())
                lin.bias = nn.Parameter(init[f"agent{e.agent}.embed.bias"].clone())
                self.embed[str(e.agent)] = lin
                self.register_buffer(f"embed_src{e.agent}", torch.tensor(e.features))
                c, n = local_col[e.agent], topo.dims[e.agent]
                self._embed_cols[e.agent] = (c, n)

    def initial_fields(self, x: Tensor) -> list[Tensor]:
        """My agents' initial ``(F, B)`` fields from a batch of input features ``x`` (B, features)."""
        B = x.shape[0]
        fields = []
        for k in range(2 if self.arch == "H2" else 1):
            f = x.new_zeros(self.width, B)
            f[getattr(self, f"in_dst{k}")] = x[:, getattr(self, f"in_src{k}")].T
            fields.append(f)
        for a, lin in self.embed.items():
            c, n = self._embed_cols[int(a)]
            e = lin(x[:, getattr(self, f"embed_src{a}")]).T
            if self.arch == "H2":
                fields[0] = fields[0].index_add(0, torch.arange(c, c + n, device=x.device), e[:n])
                fields[1] = fields[1].index_add(0, torch.arange(c, c + n, device=x.device), e[n:])
            else:
                fields[0] = fields[0].index_add(0, torch.arange(c, c + 2 * n, device=x.device), e)
        if torch.is_grad_enabled():
            # every exchange must be in every rank's graph, so that all ranks run the same backward
            # exchanges in the same order, even where a rank's inputs carry no gradient
            fields = [f if f.requires_grad else f.requires_grad_() for f in fields]
        return fields

    # ---- readout ------------------------------------------------------------------------
    def _setup_readout(self, topo, local, local_col, n_classes, init):
        cols, self._readout_cols, at = [], {}, 0
        for a in local:
            if a not in topo.readout:
                continue
            n, c = topo.dims[a], local_col[a]
            if self.arch == "H2":  # readout field is cat(p, q)
                cols += list(range(c, c + n)) + list(range(self.width + c, self.width + c + n))
            else:
                cols += list(range(c, c + 2 * n))
            self._readout_cols[a] = slice(at, at + 2 * n)
            at += 2 * n
        self.register_buffer("readout_idx", torch.tensor(cols, dtype=torch.long))
        dtype = next(iter(init.values())).dtype
        blocks = [init[f"agent{a}.W"] for a in self._readout_cols]
        self.W = nn.Parameter(torch.cat(blocks, 1) if blocks else torch.zeros(n_classes, 0, dtype=dtype))
        self.mu = nn.Parameter(init["mu"].clone()) if topo.readout[0] in local else None

    def readout_partial(self, fields: list[Tensor]) -> Tensor:
        """``sum_i W^[i] y^[i]`` over my readout agents, batch-first ``(B, classes)``."""
        y = torch.cat(fields, 0) if len(fields) > 1 else fields[0]
        partial = (self.W @ y.index_select(0, self.readout_idx)).T
        return partial + self.mu if self.mu is not None else partial

    # ---- layers -------------------------------------------------------------------------
    def _half(self, K: str, b: str, j: int, x: Tensor, op: str, P: dict) -> Tensor:
        """``K^T tanh(K x + b)`` for my agents, with one gather and one scatter_add."""
        x_ext = torch.cat([x, gather(x, self.ex, j, f"gather_{op}")], 0) if self.has_neighbors else x
        bias = P[b][j].unsqueeze(1)
        Kj = P[K][j]
        if self.local_kernel == "dense":
            s = torch.tanh(torch.addmm(bias, Kj, x_ext))
            z = Kj.T @ s
        else:
            s = torch.tanh(self.mats[K].times(Kj, x_ext, self.width) + bias)
            z = self.mats[K].transpose_times(Kj, s, self.ext_width)
        if not self.has_neighbors:
            return z
        return scatter_add(z[:self.width], z[self.width:], self.ex, j, f"scatter_{op}")

    def _layers(self, fields: list[Tensor]) -> list[Tensor]:
        h = self.h
        if self.local_kernel == "dense":  # assembled once per forward for all layers
            dense = {K: m.dense(self.width, self.ext_width) for K, m in self.mats.items()}
            if self.fused:
                return self._fused(fields, dense)
            P = {K: d.unbind(0) for K, d in dense.items()}
        else:
            P = {K: m.per_layer() for K, m in self.mats.items()}
        P.update({b: v.unbind(0) for b, v in self.biases.items()})
        if self.arch == "H2":
            p, q = fields
            for j in range(self.layers):
                p = p - h * self._half("K_q", "b_q", j, q, "q", P)
                q = q + h * self._half("K_p", "b_p", j, p, "p", P)
            return [p, q]
        (y,) = fields
        for j in range(self.layers):
            v = self._half("K", "b", j, y, "y", P)
            y = y + h * v.index_select(0, self.j_perm) * self.j_sign.unsqueeze(1)
        return [y]

    def _fused(self, fields: list[Tensor], dense: dict[str, Tensor]) -> list[Tensor]:
        """The fused kernels work batch-first: transpose in and out once per forward."""
        if self.arch == "H2":
            Kp, Kq = dense["K_p"], dense["K_q"]
            y = H2Stack.apply(torch.cat(fields, 0).T, Kp, Kp, Kq, Kq, self.biases["b_p"], self.biases["b_q"], self.h)
            return [f.T for f in y.split(self.width, dim=1)]
        K = dense["K"]
        P = K.new_zeros(self.width, self.width)  # J1 in my agent-major layout: v @ P == v[:, perm] * sign
        P[self.j_perm, torch.arange(self.width, device=P.device)] = self.j_sign
        return [H1Stack.apply(fields[0].T, K, K @ P, self.biases["b"], self.h).T]

    def forward(self, x: Tensor) -> Tensor:
        fields = self._layers(self.initial_fields(x))
        partial = self.readout_partial(fields)
        if self.readout_mode == "allreduce":
            return AllReduceSum.apply(partial, self.group)
        return TreeReduce.apply(partial, self.tree)

    @property
    def has_logits(self) -> bool:
        return self.readout_mode == "allreduce" or self.tree.parent is None

    def regularizer(self, alpha: float) -> Tensor:
        """This rank's share of ``alpha h sum_j 1/2 ||theta_{j+1} - theta_j||^2``."""
        total = sum(m.smoothness() for m in self.mats.values())
        total = total + sum(((b[1:] - b[:-1]) ** 2).sum() for b in self.biases.values())
        return alpha * self.h * 0.5 * total

    def named_blocks(self):
        for m in self.mats.values():
            yield from m.named_blocks()
        for name, B in self.biases.items():
            for a, sl in self._bias_cols.items():
                yield f"agent{a}.{name}", B, (slice(None), sl)
        for a, lin in self.embed.items():
            yield f"agent{a}.embed.weight", lin.weight, ()
            yield f"agent{a}.embed.bias", lin.bias, ()
        for a, sl in self._readout_cols.items():
            yield f"agent{a}.W", self.W, (slice(None), sl)
        if self.mu is not None:
            yield "mu", self.mu, ()


class ShardedEngine(Engine):
    """The :class:`~dhdnn.train.Engine` of one rank of a sharded run."""

    def __init__(self, net: ShardedNet, rank: int, world: int, group=None, tracer: Tracer | None = None,
                 fault: tuple[int, int, str] | None = None, device: str = "cpu"):
        self.net, self.rank, self.world, self.group, self.tracer = net, rank, world, group, tracer
        self._step, self._fault, self.device = 0, fault, torch.device(device)

    def optimizer_groups(self, weight_decay):
        rest = [p for p in self.net.parameters() if p is not self.net.W]
        return [{"params": rest, "weight_decay": 0.0}, {"params": [self.net.W], "weight_decay": weight_decay}]

    def _maybe_fail(self) -> None:
        """Test-only fault injection (DHDNN_FAULT=rank:step:kill|raise)."""
        if self._fault and self._fault[0] == self.rank and self._fault[1] == self._step:
            if self._fault[2] == "kill":
                import os
                import signal

                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected fault on rank {self.rank} at step {self._step}")

    def objective(self, x, y, alpha, record=False):
        self._maybe_fail()
        if self.tracer is not None:
            self.tracer.step = self._step
        self._step += 1
        x, y = x.to(self.device), y.to(self.device)
        out = self.net(x)
        reg = self.net.regularizer(alpha) if alpha else out.new_zeros(())
        zeros = torch.zeros(3, dtype=reg.dtype)
        if self.net.has_logits:
            ce = F.cross_entropy(out, y)
            stats = stats_of(out, y) if self.rank == 0 else zeros
            return StepOut(ce + reg, torch.cat([stats, reg.detach().reshape(1).cpu()]))
        return StepOut(out + reg, torch.cat([zeros, reg.detach().reshape(1).cpu()]))

    @torch.no_grad()
    def eval_stats(self, x, y):
        out = torch.zeros(3, dtype=torch.float64)
        if self.tracer is not None:
            self.tracer.evaluating = True
        try:
            for i in range(0, len(x), 4096):
                logits = self.net(x[i:i + 4096].to(self.device))
                if self.rank == 0:
                    out += stats_of(logits, y[i:i + 4096].to(self.device)).double()
        finally:
            if self.tracer is not None:
                self.tracer.evaluating = False
        return out

    def reduce_sum(self, t):
        t = t.to(self.device if dist.get_backend(self.group) == "nccl" else "cpu").clone()
        dist.all_reduce(t, group=self.group)  # logging only: outside forward/backward
        return t.cpu()

    def barrier(self):
        dist.barrier(group=self.group)

    def named_blocks(self):
        return list(self.net.named_blocks())

    def end_epoch(self):
        if self.tracer is not None:
            self.tracer.flush()


def build_sharded_engine(cfg, data, rank: int, world: int, group=None, device: str = "cpu",
                         fault=None, partition_method: str = "auto") -> ShardedEngine:
    """The engine of rank ``rank``: partition, halo plan, per-agent initial blocks, the sharded net."""
    from ..blocks import init_blocks
    from ..partition import build_plans, partition
    from ..topology import check_distributable, load_topology
    from ..train import DTYPES

    mc = cfg.model
    if cfg.topology is None:
        raise ValueError(f"{cfg.source}: key 'topology': the sharded engine needs a topology (a file or inline)")
    if cfg.train.grad_norm_every:
        raise ValueError(f"{cfg.source}: key 'train.grad_norm_every': expected 0 with the sharded engine "
                         "(per-layer gradient norms are recorded by the dense engine)")
    topo = load_topology(cfg.topology)
    check_distributable(topo, mc.arch, mc.J)
    part = partition(topo, world, partition_method)
    _check_same_partition(part.assignment, group, device)
    plan = build_plans(topo, part)[rank]
    dtype = DTYPES[cfg.run.dtype]
    init = init_blocks(topo, mc.arch, mc.layers, data.n_classes, cfg.train.seed, mc.init_std, dtype)
    tracer = None
    if cfg.run.trace:
        from pathlib import Path

        out = Path(cfg.run.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tracer = Tracer(rank, out / f"trace-rank{rank}.jsonl")
    stage = device.startswith("cuda") and dist.get_backend(group) == "gloo"
    net = ShardedNet(topo, mc.arch, mc.layers, mc.h, plan, data.n_features, data.n_classes, init,
                     cfg.run.readout, group, tracer, stage, cfg.run.local_kernel).to(device)
    return ShardedEngine(net, rank, world, group, tracer, fault, device)


def _check_same_partition(assignment, group, device: str) -> None:
    """Every rank computes the partition itself; make sure they agree (a setup-time collective)."""
    on = device if dist.get_backend(group) == "nccl" else "cpu"
    h = torch.tensor([float(hash(tuple(assignment)) % 1_000_003)], dtype=torch.float64, device=on)
    lo, hi = h.clone(), h.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    if lo.item() != hi.item():
        raise RuntimeError("ranks computed different partitions; is pymetis the same version on every machine?")
