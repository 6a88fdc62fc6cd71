"""The sharded network as a library, in the torch idiom: build the model, then wrap it.

::

    dist.init_process_group("gloo")                      # the user owns the process group
    model = dhdnn.build_network(topo, arch="H2", layers=8, h=0.3, n_features=2, n_outputs=2)
    net = distribute(model, topo)                        # this rank's agents; any torch.optim optimiser
    opt = torch.optim.Adam(net.param_groups(weight_decay=1e-3), lr=1e-2)
    for x, y in batches:                                 # x, y: the global batch, the same on every rank
        opt.zero_grad()
        out = net(x)                                     # the logits, on every rank of the agent group
        loss = F.cross_entropy(out, net.local(y)) + net.regularizer(alpha)
        loss.backward()                                  # neighbour messages only; replica gradients averaged
        opt.step()
    net.save("ckpt", opt)                                # shards, loadable as one dense model: load_exported

:func:`distribute` partitions the topology (or takes a saved assignment), keeps this rank's
agent blocks with the model's current weights and returns a :class:`DistributedNetwork`:
its ``parameters()`` are this rank's shard, its forward takes the global batch and returns
the logits of this replica's slice on every rank of the agent group (the partial sums go up
and back down a spanning tree of neighbour ranks; the backward averages the ranks' logit
gradients the same way, so the same loss on every rank gives exactly one process's
gradient). With replicas (a ``("replica", "agent")`` mesh) each replica takes its slice of
the global batch and gradients are averaged over the replica group when the backward ends,
as DistributedDataParallel does. The setup is the CLI engine's own
(:func:`~dhdnn.distributed.network.build_shard`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import checkpoint as ckpt
from ..build import NetworkSpec
from .exchange import Tracer
from .mesh import Groups, ParallelDims, make_groups
from .network import ShardedNet, build_shard
from .replicas import GradReducer


def distribute(model: nn.Module, topology=None, *, mesh=None, replicas: int = 1, assignment=None,
               partition_method: str = "auto", local_kernel: str = "auto", backprop: str = "autograd",
               anchor_every: int = 0, readout: str = "tree", trace: str | Path | None = None,
               device: str | torch.device | None = None) -> "DistributedNetwork":
    """Wrap a dense topology network (from :func:`dhdnn.build_network` or
    :func:`dhdnn.load_exported`) for this rank; call after ``init_process_group``, on every rank.

    ``topology``: the model's own by default. ``mesh``: a ``DeviceMesh`` named ``("replica",
    "agent")`` (or ``("agent",)``), row-major over the ranks; else ``replicas`` data-parallel
    copies of ``world / replicas`` agent partitions. ``assignment``: agent index -> agent
    partition (e.g. a saved one); else the partitioner's (``partition_method``). ``trace``: a
    directory for ``trace-rank<R>.jsonl`` message records. Other options as the run config's
    ``run`` keys."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("distribute: call torch.distributed.init_process_group first "
                           "(in one process, train the dense model itself)")
    spec, topology = spec_of(model, topology)
    dtype = next(model.parameters()).dtype
    device = torch.device(device) if device is not None else next(model.parameters()).device
    groups = _groups(mesh, replicas, device)
    tracer = None
    if trace is not None:
        Path(trace).mkdir(parents=True, exist_ok=True)
        tracer = Tracer(groups.rank, Path(trace) / f"trace-rank{groups.rank}.jsonl", groups.to_global)
    net = build_shard(spec, topology, groups, dtype=dtype, device=str(device), assignment=assignment,
                      partition_method=partition_method, readout=readout, tracer=tracer, local_kernel=local_kernel,
                      backprop=backprop, anchor_every=anchor_every, logits_everywhere=True)
    _copy_weights(model, net)
    return DistributedNetwork(net, groups, spec, topology, tracer, device)


def spec_of(model: nn.Module, topology=None) -> tuple[NetworkSpec, object]:
    """The :class:`NetworkSpec` and topology of a dense topology network; a model not built by
    dhdnn is checked against the topology (architecture, masks, input placement, readout)."""
    from ..models import Classifier

    spec, own = getattr(model, "spec", None), getattr(model, "topology", None)
    topology = topology if topology is not None else own
    if topology is None:
        raise ValueError("topology: distribute needs the agent graph (the model was built without one)")
    if own is not None and own.fingerprint != topology.fingerprint:
        raise ValueError("topology: differs from the one the model was built on")
    if spec is not None:
        if spec.network != "state":
            raise ValueError("model: the conv network has no agents to distribute; run it as data-parallel "
                             "replicas (dhdnn train with workers) instead")
        return spec, topology
    if not isinstance(model, Classifier):
        raise ValueError(f"model: expected a dhdnn network (dhdnn.build_network), got {type(model).__name__}")
    body = model.body
    spec = NetworkSpec(arch=body.arch_name, layers=body.layers, h=body.h, n_features=model.n_features,
                       n_outputs=model.n_classes, J=getattr(body, "J_kind", "J1"))
    _check_matches(model, spec, topology)
    return spec, topology


def _check_matches(model, spec: NetworkSpec, topo) -> None:
    from ..topology import dense_masks

    body = model.body
    if body.dim != topo.state_dim:
        raise ValueError(f"model: state dimension {body.dim}, the topology's is {topo.state_dim}")
    if getattr(body, "X_is_identity", True) is False:
        raise ValueError("model: H2 with X other than the identity has no agent-local form; expected X = I")
    masks = dense_masks(topo, spec.arch, spec.J)
    for name, key in body.masked.items():
        want = masks[key] if isinstance(masks, dict) else masks
        got = getattr(body, f"mask_{name}", None)
        if got is None or not torch.equal(got.cpu(), want):
            raise ValueError(f"model: body.{name} is not masked by the topology's agent graph")
    if model.placement != topo.placement(spec.n_features) or \
            tuple(model.readout_idx.tolist()) != topo.readout_state_indices():
        raise ValueError("model: its input placement or readout differs from the topology's inputs and readout")


def _groups(mesh, replicas: int, device) -> Groups:
    rank, world = dist.get_rank(), dist.get_world_size()
    if mesh is None:
        return make_groups(ParallelDims(world, replicas), rank, str(device))
    names = tuple(mesh.mesh_dim_names or ())
    if names == ("agent",):
        dims = ParallelDims(world, 1)
        return Groups(dims, rank, mesh.get_group("agent"), None, mesh)
    if names != ("replica", "agent"):
        raise ValueError(f"mesh: expected dimensions named ('replica', 'agent') or ('agent',), got {names}")
    dims = ParallelDims(world, mesh.size(0))
    if not torch.equal(mesh.mesh.cpu().reshape(-1), torch.arange(world)):
        raise ValueError("mesh: expected the ranks in row-major order (rank = replica * agents + agent)")
    return Groups(dims, rank, mesh.get_group("agent"), mesh.get_group("replica"), mesh)


@torch.no_grad()
def _copy_weights(model: nn.Module, net: ShardedNet) -> None:
    """This rank's blocks of the model's current weights into the shard."""
    from ..blocks import DenseBinding

    for e in net.entries():
        c = net.table.by_key()[e.key]
        b = DenseBinding(net.table, c, model)
        full = b.get([p.detach() for p in b.params])
        e.put(list(e.params), full.index_select(c.block_axis, e.ids.to(full.device)).to(e.params[0].dtype))


def _moments(optimizer) -> tuple[tuple[str, ...], callable]:
    """The optimiser state tensors shaped like their parameter (Adam's ``exp_avg``, ``exp_avg_sq``;
    SGD's ``momentum_buffer``; ...) and how to reach a parameter's state."""
    if optimizer is None:
        return (), lambda p: {}
    names = set()
    for p, st in optimizer.state.items():
        names |= {k for k, v in st.items() if isinstance(v, Tensor) and v.shape == p.shape}
    return tuple(sorted(names)), lambda p: optimizer.state[p]


class DistributedNetwork(nn.Module):
    """This rank's share of a topology network (see the module docstring)."""

    def __init__(self, net: ShardedNet, groups: Groups, spec: NetworkSpec, topology, tracer: Tracer | None,
                 device):
        super().__init__()
        self.net, self.groups, self.spec, self.topology, self.tracer = net, groups, spec, topology, tracer
        self.device = torch.device(device)
        self.replicas = groups.dims.replicas
        self.steps = 0  # training forwards so far (the trace's step; the default checkpoint step)
        self.reducer = None
        if self.replicas > 1:
            mates = [groups.dims.global_rank(r, groups.agent_rank) for r in range(self.replicas)]
            self.reducer = GradReducer(list(net.parameters()), groups.replica, mates, tracer, average=True,
                                       auto_finish=True)

    # ---- the step -------------------------------------------------------------------------
    def local(self, t: Tensor) -> Tensor:
        """This replica's slice of a global batch (replicas take distinct, nearly equal slices;
        the whole batch without replicas): cut the targets with it."""
        return t if self.replicas == 1 else t.tensor_split(self.replicas)[self.groups.replica_rank]

    def forward(self, x: Tensor) -> Tensor:
        """``x``: the global batch ``(B, features)``, the same on every rank; returns the outputs
        of this replica's slice, on every rank of its agent group."""
        training = torch.is_grad_enabled()
        if self.tracer is not None:
            self.tracer.flush()  # the previous step's messages (its backward has run)
            self.tracer.evaluating = not training
            self.tracer.step = self.steps
        if training:
            self.steps += 1
            if self.reducer is not None:
                self.reducer.start_step()
        return self.net(self.local(x).to(self.device))

    def regularizer(self, alpha: float) -> Tensor:
        """This rank's share of the smoothness regulariser ``alpha h sum_j 1/2 ||theta_{j+1} -
        theta_j||^2`` (differentiable; its gradient reaches exactly this rank's parameters)."""
        terms = [(P[1:] - P[:-1]).square().sum() for P in self.net.stack_params()]
        return alpha * self.net.h * 0.5 * sum(terms)

    def param_groups(self, weight_decay: float = 0.0) -> list[dict]:
        """Optimiser groups: weight decay on the readout only (as ``dhdnn train`` does)."""
        wd = {id(p) for p in self.net.readout_parameters()}
        return [{"params": [p for p in self.parameters() if id(p) not in wd], "weight_decay": 0.0},
                {"params": self.net.readout_parameters(), "weight_decay": weight_decay}]

    def replica_sum(self, t: Tensor) -> Tensor:
        """``t`` summed over this rank's replica group (e.g. correct predictions of each replica's
        slice; outside forward/backward). Without replicas: ``t``."""
        if self.replicas == 1:
            return t
        out = t.detach().clone().to("cpu" if dist.get_backend(self.groups.replica) == "gloo" else t.device)
        dist.all_reduce(out, group=self.groups.replica)
        return out.to(t.device)

    # ---- where things are ------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.groups.rank

    @property
    def is_main(self) -> bool:
        """Global rank 0 (writes checkpoint metadata; print from here)."""
        return self.groups.rank == 0

    @property
    def assignment(self) -> np.ndarray:
        """Agent index -> agent partition (pass it back to :func:`distribute` to keep a placement)."""
        return self.net.assignment

    # ---- checkpoints --------------------------------------------------------------------------
    def save(self, path: str | Path, optimizer=None, step: int | None = None, epoch: int = 0) -> Path:
        """Write a checkpoint of every rank's blocks (and the optimiser's moments) into ``path``
        (format 2, ``path/checkpoints/step-*/``; the two newest kept). Collective: call on every
        rank. Load it as one dense model with :func:`dhdnn.load_exported`, or continue with
        :meth:`load`."""
        from ..topology import topology_to_dict

        step = self.steps if step is None else step
        moments, state_of = _moments(optimizer)
        if self.groups.replica_rank == 0:
            ckpt.save_shard(path, step, self.groups.agent_rank, ckpt.pack(self.net.entries(), state_of, moments))
        dist.barrier()
        if self.is_main:
            opt_step = _optimizer_step(optimizer)
            ckpt.finalize(path, step, {"epoch": epoch, "shards": self.groups.dims.agents, "optimizer_step": opt_step,
                                       "topology": self.topology.fingerprint, "network": self.spec.to_dict(),
                                       "assignment": self.assignment.tolist(),
                                       "topology_spec": self.topology.spec if self.topology.spec is not None
                                       else topology_to_dict(self.topology)})
        dist.barrier()
        if self.tracer is not None:
            self.tracer.flush()
        return ckpt.step_dir(path, step)

    def load(self, path: str | Path, optimizer=None) -> dict:
        """Continue from the newest readable checkpoint in ``path`` (saved from any number of
        workers or layouts); restores the optimiser's moments into ``optimizer`` if given.
        Returns the checkpoint's metadata (``step``, ``epoch``)."""
        found = ckpt.load_newest_readable(Path(path), report=lambda m: None)
        if found is None:
            raise ckpt.CheckpointError(f"{path}: no complete checkpoint")
        d, meta, shards = found
        if meta.get("topology") != self.topology.fingerprint:
            raise ckpt.CheckpointError(f"{d}: key 'topology' differs from this network's")
        if meta.get("network", {}).get("arch", self.spec.arch) != self.spec.arch:
            raise ckpt.CheckpointError(f"{d}: key 'network' differs from this network's")
        names = sorted({k for s in shards for e in s["entries"].values() for k in e["moments"]})
        state_of = (lambda p: optimizer.state[p]) if optimizer is not None else (lambda p: {})
        ckpt.restore(d, shards, self.net.entries(), state_of, tuple(names) if optimizer is not None else ())
        if optimizer is not None and "exp_avg" in names:
            for p in self.parameters():
                if "exp_avg" in optimizer.state[p]:
                    optimizer.state[p]["step"] = torch.tensor(float(meta.get("optimizer_step") or meta["step"]))
        self.steps = int(meta["step"])
        return meta

    def close(self) -> None:
        """Write the trace records still held."""
        if self.tracer is not None:
            self.tracer.flush()


def _optimizer_step(optimizer) -> int | None:
    if optimizer is None:
        return None
    for st in optimizer.state.values():
        s = st.get("step")
        if s is not None:
            return int(s)
    return None
