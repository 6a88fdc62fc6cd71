"""The 2-D layout of a run: agent partitions × data-parallel replicas.

``world = agents × replicas``, validated by :func:`check_layout` and nowhere else (its
:class:`LayoutError` names the config key). Halo exchanges and the readout tree run inside a
replica's ``agent`` group, gradient averaging inside a partition's ``replica`` group.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import PLACEMENTS


class LayoutError(ValueError):
    """A layout that cannot be: ``key`` is the config key to change, ``reason`` what is wrong."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}")
        self.key, self.reason = key, reason


@dataclass(frozen=True)
class ParallelDims:
    world: int
    replicas: int = 1
    # where agent groups sit: "packed", an agent group's ranks consecutive (rank = replica x P +
    # agent: inside a node where P divides the workers per node, replicas across nodes), or
    # "spread" (rank = agent x R + replica: agent groups across nodes, replicas side by side)
    placement: str = "packed"

    def __post_init__(self):
        if self.world < 1 or self.replicas < 1:
            raise LayoutError("run.replicas", f"expected a positive number of replicas and workers, got "
                                              f"{self.replicas} replicas of {self.world} workers")
        if self.placement not in PLACEMENTS:
            raise LayoutError("run.placement", f"expected one of {list(PLACEMENTS)}, got {self.placement!r}")
        if self.world % self.replicas:
            raise LayoutError("run.replicas", f"{self.replicas} replicas do not divide {self.world} workers; "
                                              "expected workers = agent partitions x replicas")

    @property
    def agents(self) -> int:
        """Agent partitions per replica (P)."""
        return self.world // self.replicas

    def coords(self, rank: int) -> tuple[int, int]:
        """(replica, agent partition) of a global rank."""
        if self.placement == "spread":
            return rank % self.replicas, rank // self.replicas
        return divmod(rank, self.agents)

    def global_rank(self, replica: int, agent: int) -> int:
        if self.placement == "spread":
            return agent * self.replicas + replica
        return replica * self.agents + agent

    def facts(self, per_node: int) -> dict:
        """Where the groups sit on nodes of ``per_node`` workers (consecutive global ranks, as
        torchrun numbers them): for summary.json and the layout's prediction."""
        node = lambda r: r // per_node  # noqa: E731
        agent_groups = [{node(self.global_rank(r, a)) for a in range(self.agents)} for r in range(self.replicas)]
        replica_groups = [{node(self.global_rank(r, a)) for r in range(self.replicas)} for a in range(self.agents)]
        return {"agents": self.agents, "replicas": self.replicas, "placement": self.placement,
                "nodes": -(-self.world // per_node), "workers_per_node": per_node,
                "agent_groups_span_nodes": any(len(g) > 1 for g in agent_groups),
                "replica_groups_span_nodes": any(len(g) > 1 for g in replica_groups)}


def workers_per_node(world: int) -> int:
    """torchrun's workers per node (``LOCAL_WORLD_SIZE``); every worker of a local run on one node."""
    import os

    return int(os.environ.get("LOCAL_WORLD_SIZE", world))


def candidates(world: int, topo, batch: int) -> list[tuple[int, int]]:
    """Every (P, R) with P x R = world, P partitions that ``topo`` can take (P <= agents, every
    pinned agent's worker among them, no partition empty; None: a network without agents, P = 1)
    and at least one sample per replica; the most agent partitions (the smallest share of memory
    per rank) first."""
    return [(world // r, r) for r in range(1, world + 1) if world % r == 0 and batch >= r and _fits(topo, world // r)]


def _fits(topo, partitions: int) -> bool:
    if topo is None:
        return partitions == 1
    from ..partitioner import check_workers
    from ..topology import TopologyError

    try:
        check_workers(topo, partitions)
    except TopologyError:
        return False
    return True


def _no_layout(world: int, topo, batch) -> LayoutError:
    what, need = "a network without agents", "at least one sample per replica"
    if topo is not None:
        what = f"the {topo.n_agents} agents of {topo.source}"
    if topo is not None and topo.pinned:
        what, need = f"{what} and their pins", f"P partitions that hold the pins (each pinned worker < P, none empty) and {need}"
    return LayoutError("run.replicas", f"no layout P x R of {world} workers fits {what} and batch {batch}; expected {need}")


def check_layout(world: int, replicas: int | str = 1, topo=None, batch: int | None = None,
                 placement: str = "packed") -> ParallelDims:
    """The one validation of a layout: ``world`` workers as agent partitions x ``replicas``
    (``auto``: the candidate with the most partitions, which a start-up measurement may change),
    no more partitions than ``topo`` has agents (and its pins honoured), at least one sample of
    ``batch`` per replica. Raises :class:`LayoutError` (or the topology's error for a pin)."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise LayoutError("run.workers", f"expected a positive integer, got {world!r}")
    if replicas == "auto":
        cands = candidates(world, topo, batch if batch is not None else world)
        if not cands:
            raise _no_layout(world, topo, batch)
        replicas = cands[0][1]
    dims = ParallelDims(world, replicas, "spread" if placement == "spread" else "packed")
    if topo is not None:
        from ..partitioner import check_workers, too_few_agents

        why = too_few_agents(topo, dims.agents, f"{world} workers" + (
            f" as {dims.agents} agent partitions" if dims.replicas > 1 else ""))
        if why is not None:
            raise LayoutError("run.workers", why)
        check_workers(topo, dims.agents)  # (its pins)
    elif dims.agents != 1:
        raise LayoutError("run.replicas", f"a network without agents runs one copy per worker; expected {world} "
                                          f"replicas of {world} workers, got {replicas}")
    if batch is not None and batch < dims.replicas:
        raise LayoutError("train.batch_size", f"{batch} samples cannot be split over {dims.replicas} replicas; "
                                              "expected at least one sample per replica")
    return dims


@dataclass
class Groups:
    """This rank's process groups: ``agent`` (its replica's partitions) and ``replica`` (its
    partition's copies, or None without replicas)."""

    dims: ParallelDims
    rank: int
    agent: object
    replica: object | None
    mesh: object | None = None

    @property
    def agent_rank(self) -> int:
        return self.dims.coords(self.rank)[1]

    @property
    def replica_rank(self) -> int:
        return self.dims.coords(self.rank)[0]

    def to_global(self, agent_rank: int) -> int:
        return self.dims.global_rank(self.replica_rank, agent_rank)

    def local(self, t):
        """This replica's slice of a global batch (replicas take distinct, nearly equal slices; the
        whole batch without replicas)."""
        return t if self.dims.replicas == 1 else t.tensor_split(self.dims.replicas)[self.replica_rank]

    @property
    def replica_mates(self) -> list[int]:
        """The global ranks holding this rank's agent partition, one per replica."""
        return [self.dims.global_rank(r, self.agent_rank) for r in range(self.dims.replicas)]


def make_groups(dims: ParallelDims, rank: int, device: str = "cpu") -> Groups:
    """Process groups for ``dims`` (collective at setup: every rank calls it)."""
    if dims.replicas == 1:
        return Groups(dims, rank, dist.group.WORLD, None)
    if dims.agents == 1:  # replicas of the whole network (no agent partitions): the default group
        return Groups(dims, rank, None, dist.group.WORLD)
    from torch.distributed.device_mesh import init_device_mesh

    kind = "cuda" if device.startswith("cuda") else "cpu"
    if dims.placement == "spread":  # mesh[replica, agent] = agent x R + replica
        from torch.distributed.device_mesh import DeviceMesh

        ranks = torch.arange(dims.world).view(dims.agents, dims.replicas).T
        mesh = DeviceMesh(kind, ranks, mesh_dim_names=("replica", "agent"))
    else:
        mesh = init_device_mesh(kind, (dims.replicas, dims.agents), mesh_dim_names=("replica", "agent"))
    groups = Groups(dims, rank, mesh.get_group("agent"), mesh.get_group("replica"), mesh)
    # connect the new groups now (gloo connects a group at its first operation: up to a second)
    for g in (groups.agent, groups.replica):
        dist.all_reduce(torch.zeros(1, device=kind), group=g)
    return groups
