"""Locality and exactness as checks for your own CI (pytest, or ``dhdnn verify``).

Each check works on what a run leaves (a message trace, a partition, a model, parameters) and
raises :class:`CheckFailed` naming the check and the offending message or entry; on success it
returns the numbers it checked. dhdnn's own tests use the same functions, and :func:`verify`
runs them all for a run config (``dhdnn verify``)::

    from dhdnn.testing import verify
    def test_my_topology():
        verify("my_run.yaml", workers=[2, 3]).raise_first()
"""
from .checks import (CheckFailed, check_close, check_locality, check_masks, check_outside, check_reductions,
                     check_same_network, read_trace)
from .verify import Report, verify

__all__ = ["CheckFailed", "Report", "check_close", "check_locality", "check_masks", "check_outside",
           "check_reductions", "check_same_network", "read_trace", "verify"]
