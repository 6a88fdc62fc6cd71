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

:func:`distribute` keeps this rank's agent blocks with the model's current weights; the
:class:`DistributedNetwork` it returns computes the logits of this replica's slice on every rank
of the agent group (the same loss on every rank gives exactly one process's gradient) and, with
replicas, averages gradients over the replica group as DistributedDataParallel does. The CLI's
sharded engine is a client of the same object: one setup, step, reducer and checkpoint protocol.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import checkpoint as ckpt
from ..build import NetworkSpec
from ..engine import param_groups
from .exchange import Tracer
from .launch import quiet_gloo
from .mesh import Groups, check_layout, make_groups
from .network import ShardedNet, build_shard
from .replicas import GradReducer, begin_step


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
    groups = _groups(mesh, replicas, device, topology)
    tracer = Tracer.for_rank(trace, groups) if trace is not None else None
    net = build_shard(spec, topology, groups, dtype=dtype, device=str(device), assignment=assignment,
                      partition_method=partition_method, readout=readout, tracer=tracer, local_kernel=local_kernel,
                      backprop=backprop, anchor_every=anchor_every, logits_everywhere=True)
    _copy_weights(model, net)
    return DistributedNetwork(net, groups, spec, topology, tracer, device)


def spec_of(model: nn.Module, topology=None) -> tuple[NetworkSpec, object]:
    """The :class:`NetworkSpec` and topology of a dense topology network; a model not built by
    dhdnn is checked against the topology (architecture, masks, input placement, readout)."""
    from ..models import NETWORKS, Classifier

    spec, own = getattr(model, "spec", None), getattr(model, "topology", None)
    topology = topology if topology is not None else own
    if topology is None:
        raise ValueError("topology: distribute needs the agent graph (the model was built without one)")
    if own is not None and own.fingerprint != topology.fingerprint:
        raise ValueError("topology: differs from the one the model was built on")
    if spec is not None:
        if not NETWORKS[spec.network].has_agents:
            raise ValueError(f"model: the {spec.network} network has no agents to distribute; run it as "
                             "data-parallel replicas (dhdnn train with workers) instead")
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
    masks = dense_masks(topo, spec.arch)
    for name, key in body.masked.items():
        want = masks[key]
        got = getattr(body, f"mask_{name}", None)
        if got is None or not torch.equal(got.cpu(), want):
            raise ValueError(f"model: body.{name} is not masked by the topology's agent graph")
    if model.placement != topo.placement(spec.n_features) or \
            tuple(model.readout_idx.tolist()) != topo.readout_state_indices():
        raise ValueError("model: its input placement or readout differs from the topology's inputs and readout")


def _groups(mesh, replicas: int, device, topology) -> Groups:
    rank, world = dist.get_rank(), dist.get_world_size()
    if mesh is None:
        return make_groups(check_layout(world, replicas, topology), rank, str(device))
    names = tuple(mesh.mesh_dim_names or ())
    if names == ("agent",):
        dims = check_layout(world, 1, topology)
        return Groups(dims, rank, mesh.get_group("agent"), None, mesh)
    if names != ("replica", "agent"):
        raise ValueError(f"mesh: expected dimensions named ('replica', 'agent') or ('agent',), got {names}")
    dims = check_layout(world, mesh.size(0), topology)
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


class DistributedNetwork(nn.Module):
    """This rank's share of a topology network (see the module docstring)."""

    def __init__(self, net: ShardedNet, groups: Groups, spec: NetworkSpec, topology, tracer: Tracer | None,
                 device, average: bool = True, fault=None):
        """``average``: replica gradients averaged when the backward ends (a user's loop whose
        replicas normalise their loss by their own slice); else summed by ``reducer.finish()``
        (the trainer normalises by the global batch). ``fault``: test-only fault injection."""
        super().__init__()
        self.net, self.groups, self.spec, self.topology, self.tracer = net, groups, spec, topology, tracer
        self.device, self.fault = torch.device(device), fault
        self.replicas = groups.dims.replicas
        self.steps = 0  # training forwards so far (the trace's step; the default checkpoint step)
        self.reducer = GradReducer.for_groups(net.parameters(), groups, tracer, average=average, auto_finish=average)
        quiet_gloo()  # gloo's transport threads at idle priority: ~25x cheaper exchanges on few cores

    # ---- the step -------------------------------------------------------------------------
    def local(self, t: Tensor) -> Tensor:
        """This replica's slice of a global batch (replicas take distinct, nearly equal slices;
        the whole batch without replicas): cut the targets with it."""
        return self.groups.local(t)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: the global batch ``(B, features)``, the same on every rank; returns the outputs
        of this replica's slice, on every rank of its agent group (the root's, for the trainer)."""
        if self.tracer is not None:
            self.tracer.flush()  # the previous step's messages (its backward has run)
            self.tracer.evaluating = not torch.is_grad_enabled()
        if torch.is_grad_enabled():
            begin_step(self)
        return self.net(self.local(x).to(self.device))

    def regularizer(self, alpha: float) -> Tensor:
        """This rank's share of the smoothness regulariser ``alpha h sum_j 1/2 ||theta_{j+1} -
        theta_j||^2`` (differentiable; its gradient reaches exactly this rank's parameters)."""
        terms = [(P[1:] - P[:-1]).square().sum() for P in self.net.stack_params()]
        return alpha * self.net.h * 0.5 * sum(terms)

    def param_groups(self, weight_decay: float = 0.0) -> list[dict]:
        """Optimiser groups: weight decay on the readout only (as ``dhdnn train`` does)."""
        return param_groups(self.parameters(), self.net.readout_parameters(), weight_decay)

    def replica_sum(self, t: Tensor) -> Tensor:
        """``t`` summed over this rank's replica group (e.g. correct predictions of each replica's
        slice; outside forward/backward). Without replicas: ``t``."""
        if self.replicas == 1:
            return t
        on = "cpu" if dist.get_backend(self.groups.replica) == "gloo" else t.device
        out = t.detach().clone(memory_format=torch.contiguous_format).to(on)  # (collectives add memory order)
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

        topo = self.topology
        d = ckpt.save_all(path, self.steps if step is None else step, self.net.entries(), optimizer,
                          self.groups.agent_rank if self.groups.replica_rank == 0 else None, self.is_main, dist.barrier,
                          {"epoch": epoch, "shards": self.groups.dims.agents, "topology": topo.fingerprint,
                           "network": self.spec.to_dict(), "assignment": self.assignment.tolist(),
                           "topology_spec": topo.spec if topo.spec is not None else topology_to_dict(topo)})
        if self.tracer is not None:
            self.tracer.flush()
        return d

    def load(self, path: str | Path, optimizer=None) -> dict:
        """Continue from the newest readable checkpoint in ``path`` (saved from any number of
        workers or layouts); restores the optimiser's moments into ``optimizer`` if given.
        Returns the checkpoint's metadata (``step``, ``epoch``)."""
        meta = ckpt.resume(path, self.net.entries(), optimizer, self._check_fits)
        self.steps = int(meta["step"])
        return meta

    def _check_fits(self, d: Path, meta: dict) -> None:
        if meta.get("topology") != self.topology.fingerprint:
            raise ckpt.CheckpointError(f"{d}: key 'topology' differs from this network's")
        if meta.get("network", {}).get("arch", self.spec.arch) != self.spec.arch:
            raise ckpt.CheckpointError(f"{d}: key 'network' differs from this network's")

    def close(self) -> None:
        """Write the trace records still held."""
        if self.tracer is not None:
            self.tracer.flush()
