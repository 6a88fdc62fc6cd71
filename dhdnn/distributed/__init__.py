"""The multi-process engine: neighbour exchanges, sharded layers, process launch, and the
library entry point :func:`distribute` (build the dense network, then wrap it for this rank).

Only this package imports ``torch.distributed``.
"""
from .distribute import DistributedNetwork, distribute

__all__ = ["DistributedNetwork", "distribute"]
