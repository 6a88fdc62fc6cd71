"""One rank's share of a topology network: its agents' inputs, layers and readout.

The rank holds every block whose row agent is one of its agents (``blocks.py``'s classes), its
agents' embeddings and readout blocks, and ``mu`` with the first readout agent. The forward
places the inputs into the rank's fields, runs the integrator and sums the partial logits over
the readout tree; the architecture's :class:`~dhdnn.integrator.AgentLayout` says what a layer is.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from ..blocks import BlockTable, init_class
from ..engine import Entry
from ..halo import HaloPlan, RankRows, build_plans, ranges
from ..integrator import Integrate, LocalMap, Plan, build_kernels, class_rows
from ..models.regularizer import add_smoothness_grad, smoothness_value
from .exchange import FAULT, CommStats, Exchanger, FieldLayout, Tracer
from .readout import AllReduceSum, Tree, TreeAllReduce, TreeReduce


class ShardedNet(nn.Module):
    """The network of one rank; ``owner[a]`` is the rank of agent ``a``."""

    def __init__(self, table: BlockTable, h: float, plan: HaloPlan, owner: np.ndarray, n_features: int,
                 seed: int, init_std: float | None = None, dtype=torch.float32, readout: str = "tree", group=None,
                 tracer: Tracer | None = None, stage_cpu: bool = False, local_kernel: str = "auto",
                 backprop: str = "autograd", anchor_every: int = 0, logits_everywhere: bool = False,
                 reversible_state: str = "fixed", fraction_bits: int | None = None, device="cpu"):
        super().__init__()
        self.logits_everywhere = logits_everywhere  # every rank gets the logits (a user's loop), not only the root
        self.table, self.layout, self.layers, self.h, self.rank = table, table.layout, table.layers, h, plan.rank
        self.readout_mode, self.group, self.n_outputs = readout, group, table.n_classes
        self.rows = RankRows(plan, table.width)
        self.comm_stats = CommStats()
        layout = FieldLayout(self.rows.F, {s: torch.as_tensor(r) for s, r in self.rows.send_rows().items()},
                             self.rows.halo_slices(), self.rows.H)
        self.ex = Exchanger(layout, group, tracer, stage_cpu, self.comm_stats)
        self.params = nn.ModuleDict()  # block kind -> its class tensors held here
        self._entries: list[Entry] = []
        self._init = (seed, init_std, dtype)
        mine = owner == plan.rank
        self._build_stack(mine, plan, local_kernel, device)  # (auto's kernel choice depends on the device)
        self.plan.set_backprop(backprop == "reversible", anchor_every, reversible_state, fraction_bits)
        self._build_io(mine, n_features)
        self.extra_message = None  # test-only: (src, dst) of one message between non-neighbour ranks
        self.tree = Tree(plan.tree_parent, plan.tree_children, group, tracer, stage_cpu, self.comm_stats,
                         size=plan.workers)

    def _param(self, kind: str, value: Tensor) -> nn.Parameter:
        key = kind.replace(".", "_")
        if key not in self.params:
            self.params[key] = nn.ParameterList()
        p = nn.Parameter(value)
        self.params[key].append(p)
        return p

    def _init_values(self, c, sel: np.ndarray) -> Tensor:
        return init_class(self.table, c, self._init[0], self._init[1], sel, self._init[2])

    def _add(self, c, sel: np.ndarray) -> nn.Parameter:
        """A class's blocks ``sel`` (canonical indices, in stored order) as one parameter."""
        p = self._param(c.kind, self._init_values(c, sel))
        self._entries.append(Entry(c.key, [p], torch.as_tensor(sel), c.block_axis))
        return p

    def _add_inside(self, p: nn.Parameter, c, sel: np.ndarray, flat: Tensor) -> None:
        """Blocks ``sel`` of class ``c`` stored inside ``p`` (``(layers, ...)``) at the flat positions
        ``flat`` of each layer (block after block): initialised there, checkpointed from there."""
        L = self.layers
        shape = (L, len(sel), *c.shape)
        with torch.no_grad():
            p.view(L, -1).index_copy_(1, flat, self._init_values(c, sel).reshape(L, -1))
        # (the parameter may have moved to a GPU since; values to put may come from a CPU checkpoint)
        at = lambda t: flat.to(t.device)  # noqa: E731
        self._entries.append(Entry(c.key, [p], torch.as_tensor(sel), c.block_axis,
                                   get=lambda ts: ts[0].view(L, -1).index_select(1, at(ts[0])).view(shape),
                                   put=lambda ts, v: ts[0].view(L, -1).index_copy_(
                                       1, at(ts[0]), v.reshape(L, -1).to(ts[0].device))))

    def _apply(self, fn, *args, **kwargs):
        """``.to(device)`` and friends also move the stack plan's and the inputs' and readout's index
        tensors (kept beside their parameters, not as buffers)."""
        out = super()._apply(fn, *args, **kwargs)
        self.plan.move(fn)
        self._embed = [(p, fn(feats), fn(rows)) for p, feats, rows in self._embed]
        self._embed_bias = [(p, fn(rows)) for p, rows in self._embed_bias]
        self._readout = [(p, fn(rows), runs) for p, rows, runs in self._readout]
        return out

    def kind(self, kind: str) -> list[nn.Parameter]:
        key = kind.replace(".", "_")
        return list(self.params[key]) if key in self.params else []

    # ---- the layers ---------------------------------------------------------------------
    def _build_stack(self, mine, plan: HaloPlan, local_kernel: str, device) -> None:
        """Matrices: one ``(layers, F, E)`` tensor (zero off the blocks) for the dense kernel, one
        tensor per block class for the block kernel. Biases: one ``(layers, F)`` tensor each."""
        lay, F, E, L, dtype = self.layout, self.rows.F, self.rows.E, self.layers, self._init[2]
        mats: dict[str, list] = {m: [] for m in lay.matrices}
        for c in self.table:
            sel = np.flatnonzero(mine[c.rows])
            if c.kind in mats and len(sel):
                cr, order = class_rows(self.rows.rows(c.rows[sel]).reshape(len(sel), -1),
                                       self.rows.rows(c.cols[sel]).reshape(len(sel), -1), F)
                mats[c.kind].append((c, sel[order], cr))
        self.local_kernel, kernels = build_kernels(local_kernel, {m: [cr for _, _, cr in v] for m, v in mats.items()},
                                                   F, E, L, device, dtype)
        for m, parts in mats.items():
            if self.local_kernel == "dense":
                p = self._param(m, torch.zeros(L, F, E, dtype=dtype))
                for (c, sel, _), flat in zip(parts, kernels[m].flat):
                    self._add_inside(p, c, sel, flat)
            elif self.local_kernel == "diagonal":  # one tensor per class: its bands, then the rest
                for ci, (c, sel, cr) in enumerate(parts):
                    _, r, cc = cr.shape
                    p = self._param(m, torch.zeros(L, kernels[m].sizes[ci], r, cc, dtype=dtype))
                    self._add_inside(p, c, sel, kernels[m].flat(ci, r, cc))
            else:
                for c, sel, _ in parts:
                    self._add(c, sel)
        for b in lay.biases:
            p = self._param(b, torch.zeros(L, F, dtype=dtype))
            for c in self.table:
                sel = np.flatnonzero(mine[c.rows])
                if c.kind == b and len(sel):
                    self._add_inside(p, c, sel, torch.as_tensor(self.rows.rows(c.rows[sel])))
        n = self.table.topo.dims[plan.local]  # J1 acts on each agent's (p, q) rows
        maps = [LocalMap.of(hs.map, ranges(self.rows.start[plan.local], n), ranges(self.rows.start[plan.local] + n, n),
                            F, dtype) for hs in lay.half_steps]
        self.plan = Plan(lay, self.h, L, F, E, [kernels[m] for m in lay.matrices], maps,
                         [len(self.kind(m)) for m in lay.matrices], self.ex if self.ex.active else None,
                         where=f" on rank {plan.rank}")

    def outside(self) -> list[dict]:
        """Non-zero entries this rank stores outside the graph's blocks (none, unless a bug)."""
        out, at = [], 0
        for hs, kern, n in zip(self.layout.half_steps, self.plan.kernels, self.plan.n_tensors):
            out += [dict(e, name=hs.matrix) for e in kern.outside(self.stack_params()[at:at + n])]
            at += n + 1
        return out

    def stack_params(self) -> list[nn.Parameter]:
        """The stack's parameters in the integrator's order (per half-step its matrix tensors,
        then its bias; fixed after construction)."""
        if not hasattr(self, "_stack_params"):
            self._stack_params = [p for hs in self.layout.half_steps for p in self.kind(hs.matrix) + self.kind(hs.bias)]
        return self._stack_params

    # ---- inputs and readout ---------------------------------------------------------------
    def _part_rows(self, agents: np.ndarray, part: str) -> np.ndarray:
        """``(len(agents), n)`` rows of ``part`` of every agent, in the fields stacked one after another."""
        field = next(f for f in self.layout.field_names if part in self.layout.parts(f))
        t = self.layout.parts(field).index(part)
        fi = self.layout.field_names.index(field)
        n = self.table.topo.dims[agents]
        return ranges(fi * self.rows.F + self.rows.start[agents] + t * n, n).reshape(len(agents), -1)

    def _state_rows(self, agents: np.ndarray) -> Tensor:
        """``(len(agents), 2 n)``: rows of ``(p^[i], q^[i])`` of every agent (one dimension per call)."""
        return torch.as_tensor(np.concatenate([self._part_rows(agents, "p"), self._part_rows(agents, "q")], 1))

    def _build_io(self, mine, n_features: int) -> None:
        topo = self.table.topo
        feeds = [f for f in topo.input_feeds(n_features) if mine[f.agent]]
        dst = [int(self._part_rows(np.array([f.agent]), f.part)[0, f.index]) for f in feeds]
        self.register_buffer("in_src", torch.tensor([f.feature for f in feeds], dtype=torch.long))
        self.register_buffer("in_dst", torch.tensor(dst, dtype=torch.long))
        features = {e.agent: e.features for e in topo.embeddings}
        self._embed, self._embed_bias, self._readout, self.mu = [], [], [], None
        for c in self.table:
            sel = np.flatnonzero(mine[c.rows])
            if not len(sel) or c.kind not in ("embed.weight", "embed.bias", "W", "mu"):
                continue
            agents = c.rows[sel]
            p = self._add(c, sel)
            if c.kind == "embed.weight":
                feats = torch.tensor([features[a] for a in agents.tolist()])
                self._embed.append((p, feats, self._state_rows(agents)))
            elif c.kind == "embed.bias":
                self._embed_bias.append((p, self._state_rows(agents)))
            elif c.kind == "W":
                rows = self._state_rows(agents)
                self._readout.append((p, rows, self._runs(rows)))
            else:
                self.mu = p

    def initial_fields(self, x: Tensor) -> Tensor:
        """My agents' initial fields, stacked ``(fields x F, B)``, from a batch of input features ``x``
        (B, features)."""
        B, F, nf = x.shape[0], self.rows.F, len(self.layout.field_names)
        Y = x.new_zeros(nf * F, B)
        Y[self.in_dst] = x[:, self.in_src].T
        for W, feats, rows in self._embed:  # (agents, 2n, f) x (B, agents, f) -> (agents, 2n, B)
            Y = Y.index_add(0, rows.reshape(-1), torch.einsum("akf,baf->akb", W, x[:, feats]).reshape(-1, B))
        for b, rows in self._embed_bias:
            Y = Y.index_add(0, rows.reshape(-1), b.reshape(-1, 1).expand(-1, B))
        if torch.is_grad_enabled() and not Y.requires_grad:
            # every rank must run the same backward exchanges, even where its inputs carry no gradient
            Y.requires_grad_()
        return Y

    def _runs(self, rows: Tensor) -> list[tuple[int, int, int]] | None:
        """``rows`` (agents, 2n) holds each agent's p rows, then its q rows. Where the agents' p
        rows are one run of consecutive rows inside one field, and so are their q rows (agents
        of one shape stored side by side, the usual case): ``[(field, start, stop)]`` for p and
        q, read as views; else None (read by index)."""
        F, n = self.rows.F, rows.shape[1] // 2
        runs = []
        for half in (rows[:, :n], rows[:, n:]):
            flat = half.reshape(-1)
            start = int(flat[0])
            field, start_in = divmod(start, F)
            if start_in + flat.numel() > F or not torch.equal(flat, torch.arange(start, start + flat.numel())):
                return None
            runs.append((field, start_in, start_in + flat.numel()))
        return runs

    def readout_partial(self, fields: list[Tensor]) -> Tensor:
        """``sum_i W^[i] y^[i] (+ mu)`` over my readout agents, batch-first ``(B, classes)``."""
        B, terms, Y = fields[0].shape[1], [], None
        for W, rows, runs in self._readout:  # (agents, C, 2n) x (agents, 2n, B), one GEMM per part
            A, n = rows.shape[0], rows.shape[1] // 2
            if runs is not None:  # views: no gather, and no index_put (slow, sorting) in the backward
                for (f, a, b), k in zip(runs, (slice(0, n), slice(n, 2 * n))):
                    terms.append(torch.einsum("ack,akb->bc", W[:, :, k], fields[f][a:b].view(A, n, B)))
                continue
            Y = torch.cat(fields, 0) if Y is None else Y
            terms.append(torch.einsum("ack,akb->bc", W, Y.index_select(0, rows.reshape(-1)).view(A, 2 * n, B)))
        if self.mu is not None:
            terms.append(self.mu.expand(B, -1))
        # a rank without readout agents still depends on its fields: its backward (and the
        # exchanges its neighbours wait for) must run like everyone else's
        out = terms[0] if terms else fields[0][:1].sum(0, keepdim=True).T.mul(0).expand(-1, self.n_outputs)
        for t in terms[1:]:
            out = out + t
        return out

    def forward(self, x: Tensor) -> Tensor:
        if self.extra_message is not None and torch.is_grad_enabled():
            self._send_extra(*self.extra_message)
        Y = Integrate.apply(self.plan, False, self.initial_fields(x), *self.stack_params())
        partial = self.readout_partial(list(Y.split(self.rows.F, 0)))
        if self.tree.parent is None and not self.tree.children:  # a lone rank: the partial sum is the sum
            return partial  # (with one agent partition its group is None, which torch reads as every rank)
        if self.readout_mode == "allreduce":
            tracer = self.ex.tracer
            if tracer is not None:  # the one message kind that is not neighbour-only: a collective, by choice
                tracer.record("forward", -1, "allreduce_readout", -1, partial.numel() * partial.element_size(),
                              group=[tracer.to_global(r) for r in range(self.tree.size)])
            return AllReduceSum.apply(partial, self.group)
        return (TreeAllReduce if self.logits_everywhere else TreeReduce).apply(partial, self.tree)

    def _send_extra(self, src: int, dst: int) -> None:
        """Test-only (``DHDNN_TEST_FAULT=message``): one traced message between ranks that own no
        adjacent agents, at the first training step."""
        import torch.distributed as dist

        self.extra_message, t = None, torch.zeros(1)
        pg = self.group if self.group is not None else dist.group.WORLD
        if self.rank == src:
            if self.ex.tracer is not None:
                self.ex.tracer.record("forward", 0, f"gather_{self.layout.field_names[0]}", dst, 4)
            pg.send([t], dst, 0).wait()
        elif self.rank == dst:
            pg.recv([t], src, 0).wait()

    @property
    def has_logits(self) -> bool:
        return self.readout_mode == "allreduce" or self.logits_everywhere or self.tree.parent is None

    def readout_parameters(self) -> list[nn.Parameter]:
        return self.kind("W")

    def regularizer_value(self, alpha: float) -> Tensor:
        """This rank's share of ``alpha h sum_j 1/2 ||theta_{j+1} - theta_j||^2``."""
        return alpha * self.h * 0.5 * smoothness_value(self.stack_params())

    def add_regularizer_grad(self, alpha: float) -> None:
        """Its gradient, added to ``.grad`` in place (blocks are stored whole or assembled with
        zeros off the blocks; zeros stay zero)."""
        Ps = self.stack_params()
        for P in Ps:
            if P.grad is None:
                P.grad = torch.zeros_like(P)
        add_smoothness_grad([P.detach() for P in Ps], [P.grad for P in Ps], alpha * self.h * 0.5)

    def entries(self) -> list[Entry]:
        return list(self._entries)

    def bytes_per_sample(self, training: bool = False) -> int:
        """Activation bytes one sample costs here: in evaluation a few extended fields and scratch;
        in training (autograd) every layer's fields and tanh outputs."""
        itemsize = torch.finfo(self._init[2]).bits // 8
        nf, nhs, L, F, E = len(self.layout.field_names), len(self.layout.half_steps), self.layers, self.rows.F, self.rows.E
        if training and self.plan.keep == "every":
            return ((L + 1) * nf * E + L * nhs * F) * itemsize
        return 6 * E * nf * itemsize


def build_shard(spec, topo, groups, *, dtype=torch.float32, device: str = "cpu", assignment=None,
                partition_method: str = "auto", readout: str = "tree", tracer: Tracer | None = None,
                local_kernel: str = "auto", backprop: str = "autograd", anchor_every: int = 0,
                logits_everywhere: bool = False, check: bool = True, reversible_state: str = "fixed",
                fraction_bits: int | None = None) -> ShardedNet:
    """This rank's :class:`ShardedNet` of ``spec`` (a :class:`~dhdnn.build.NetworkSpec`) on ``topo``:
    the partition (computed by every rank and checked to agree, or the ``assignment`` given),
    the halo plan, the block table and this rank's blocks, initialised per agent (the same
    network on any number of workers). The one setup both the CLI's engine and
    :func:`~dhdnn.distributed.distribute` use."""
    import torch.distributed as dist

    from ..models import ARCHITECTURES
    from ..partitioner import Partition, partition

    layout = ARCHITECTURES[spec.arch].agent_layout(J=spec.J)
    P = groups.dims.agents
    part = partition(topo, P, partition_method) if assignment is None else Partition(np.asarray(assignment), P,
                                                                                      "given")
    if check:
        check_same_partition(part.assignment, device)
    plan = build_plans(topo, part, ranks=[groups.agent_rank])[0]
    table = BlockTable(topo, layout, spec.layers, spec.n_outputs)
    stage = str(device).startswith("cuda") and dist.get_backend() == "gloo"
    net = ShardedNet(table, spec.h, plan, part.assignment, spec.n_features, spec.seed, spec.init_std, dtype, readout,
                     groups.agent, tracer, stage, local_kernel, backprop, anchor_every, logits_everywhere,
                     reversible_state, fraction_bits, device)
    net.assignment = part.assignment
    if FAULT == "message":  # test-only: the first pair of ranks that own no adjacent agents
        g = part.rank_graph(topo)
        net.extra_message = next(((r, s) for r in range(P) for s in range(r + 1, P) if not g.has_edge(r, s)), None)
    return net.to(device)


def check_same_partition(assignment, device: str) -> None:
    """Every rank computes the partition itself; make sure they agree (a setup-time collective)."""
    import hashlib

    import torch.distributed as dist

    on = device if dist.get_backend() == "nccl" else "cpu"
    digest = int.from_bytes(hashlib.sha256(np.ascontiguousarray(assignment).tobytes()).digest()[:6], "little")
    h = torch.tensor([float(digest)], dtype=torch.float64, device=on)
    lo, hi = h.clone(), h.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if lo.item() != hi.item():
        raise RuntimeError("ranks computed different partitions; is pymetis the same version on every machine?")
