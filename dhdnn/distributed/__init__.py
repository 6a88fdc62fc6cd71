"""The multi-process engine: neighbour exchanges, sharded layers, process launch.

Only this package imports ``torch.distributed``.
"""
