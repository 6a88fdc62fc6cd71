"""The 2-D layout of a sharded run: agent partitions × data-parallel replicas.

``world = agents × replicas``, validated here and nowhere else. Rank ``r`` holds agent
partition ``r % agents`` of replica ``r // agents`` (a row-major ``("replica", "agent")``
``DeviceMesh``): halo exchanges and the readout tree run inside the ``agent`` group of a
replica, gradient averaging inside the ``replica`` group of a partition.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelDims:
    world: int
    replicas: int = 1

    def __post_init__(self):
        if self.world < 1 or self.replicas < 1:
            raise ValueError(f"run.replicas: expected a positive number of replicas and workers, got "
                             f"{self.replicas} replicas of {self.world} workers")
        if self.world % self.replicas:
            raise ValueError(f"run.replicas: {self.replicas} replicas do not divide {self.world} workers; "
                             "expected workers = agent partitions x replicas")

    @property
    def agents(self) -> int:
        """Agent partitions per replica (P)."""
        return self.world // self.replicas

    def coords(self, rank: int) -> tuple[int, int]:
        """(replica, agent partition) of a global rank."""
        return divmod(rank, self.agents)

    def global_rank(self, replica: int, agent: int) -> int:
        return replica * self.agents + agent


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


def make_groups(dims: ParallelDims, rank: int, device: str = "cpu") -> Groups:
    """Process groups for ``dims`` (collective at setup: every rank calls it)."""
    if dims.replicas == 1:
        return Groups(dims, rank, dist.group.WORLD, None)
    from torch.distributed.device_mesh import init_device_mesh

    kind = "cuda" if device.startswith("cuda") else "cpu"
    mesh = init_device_mesh(kind, (dims.replicas, dims.agents), mesh_dim_names=("replica", "agent"))
    groups = Groups(dims, rank, mesh.get_group("agent"), mesh.get_group("replica"), mesh)
    # connect the new groups now (gloo connects a group at its first operation: up to a second)
    for g in (groups.agent, groups.replica):
        dist.all_reduce(torch.zeros(1, device=kind), group=g)
    return groups
