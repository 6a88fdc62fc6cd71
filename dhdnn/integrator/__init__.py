"""The one integrator of every H-DNN stack and its three axes.

* ``layer.py``: what a layer is (:class:`AgentLayout`: fields and half-steps; :class:`LocalMap`)
* ``kernels.py``: the coupling's local products (:data:`KERNELS`: assembled matrices, blocks, bands,
  fused); ``fused.py``: the fused kernel's loops, compiled with numba
* ``carriers.py``: the state's carrier (float; fixed point, exact) and the reversible certificate
* ``stack.py``: :class:`Integrate`, the forward and its adjoint written once, on a :class:`Plan`
  that chooses the coupling, the carrier and what the forward keeps

Pure maths: nothing here imports ``torch.distributed`` (a rank's exchanges arrive as an object).
"""
from .carriers import FRACTION_BITS, Certificate, FixedPointOverflow, ReversibleMismatch, fraction_bits
from . import fused
from .kernels import KERNELS, MatrixKernel, build_kernels, class_rows
from .layer import MAPS, AgentLayout, HalfStep, LocalMap
from .stack import CARRIERS, KEEPS, Integrate, Plan, Workspace, local_maps

__all__ = ["CARRIERS", "FRACTION_BITS", "KEEPS", "KERNELS", "MAPS", "AgentLayout", "Certificate",
           "FixedPointOverflow", "HalfStep", "Integrate", "LocalMap", "MatrixKernel", "Plan", "ReversibleMismatch",
           "Workspace", "build_kernels", "class_rows", "fraction_bits", "fused", "local_maps"]
