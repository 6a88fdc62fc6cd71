"""H-DNN layer stacks: the shared ODE-network base, H1, H2 and the registry.

A class declares its per-layer parameters and ``step`` (the readable step-by-step oracle); the
base class owns initialisation, masks, the layer loop and the regulariser. A class that declares
its :attr:`~ODENet.layout` (H1, H2) runs on the one integrator, in one process as on every rank,
and its facts (invertible, distributable) follow from that layout. Pure maths.
"""
from __future__ import annotations

import math
from typing import ClassVar, Mapping

import torch
from torch import Tensor, nn

from ..integrator import (CARRIERS, KEEPS, AgentLayout, Certificate, HalfStep, Integrate, MatrixKernel, Plan, Workspace,
                          local_maps)
from .regularizer import add_smoothness_grad, smoothness_value

ARCHITECTURES: dict[str, type["ODENet"]] = {}


class NotDistributable(ValueError):
    """An architecture (or option) with no agent-local structure; ``key`` is the config key to change."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.reason = key, message


def register(name: str):
    """Class decorator adding an architecture to :data:`ARCHITECTURES` under ``name``; derives
    its facts from its declared layout (``invertible``: reversible backprop and the fixed carrier)."""

    def deco(cls):
        cls.arch_name = name
        cls.invertible = cls.layout is not None and cls.layout.invertible
        ARCHITECTURES[name] = cls
        return cls

    return deco


class ODENet(nn.Module):
    """Base class: ``layers`` steps of an ODE-inspired residual network on ``(B, dim)`` states.

    Subclasses set :attr:`param_shapes` (parameter name -> per-layer shape, written with the
    symbols ``n`` = dim and ``m`` = dim // 2), :attr:`masked` (which parameters take a mask
    and under which key) and implement :meth:`step`.
    """

    arch_name: ClassVar[str] = "?"
    param_shapes: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    masked: ClassVar[Mapping[str, str]] = {}  # parameter name -> mask key
    smooth_params: ClassVar[tuple[str, ...]] = ()  # entering the smoothness regulariser
    needs_even_dim: ClassVar[bool] = False
    default_std: ClassVar[float | None] = 1.0  # None: torch.nn.Linear's default uniform init
    config_options: ClassVar[tuple[str, ...]] = ()  # model config keys passed to the class (H1: J)
    layout: ClassVar[AgentLayout | None] = None  # the integrator's layer (None: the step-by-step path only)
    distributable: ClassVar[bool] = False  # agent_layout() exists (for some options)
    invertible: ClassVar[bool] = False  # derived by register(): reversible backprop, the fixed carrier

    def __init__(self, dim: int, layers: int, h: float, mask=None, init_std: float | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        _check_positive_int("dim", dim)
        _check_positive_int("layers", layers)
        if not (isinstance(h, (int, float)) and math.isfinite(h) and h > 0):
            raise ValueError(f"h: expected a positive finite step size, got {h!r}")
        if self.needs_even_dim and dim % 2:
            raise ValueError(f"dim: {self.arch_name} splits the state into (p, q) halves, "
                             f"so dim must be even, got {dim}")
        self.dim, self.layers, self.h = dim, layers, float(h)
        self.half = dim // 2
        self.backprop, self.anchor_every = "autograd", 0  # set_backprop() switches invertible stacks
        self.reversible_state, self.fraction_bits = "fixed", None  # exact (fixed point) or float rebuild
        self.certificate = Certificate(exact=True)  # what the last reversible backward found
        self._plans: dict = {}  # integrator plans, by which half-steps share K and A
        self._ws = Workspace()  # buffers kept from one pass to the next
        std = self.default_std if init_std is None else init_std
        for name, shape in self.param_shapes.items():
            self.register_parameter(name, nn.Parameter(self._init((layers, *self._dims(shape)), std, generator)))
        for name, m in self._normalize_mask(mask).items():
            self.register_buffer(f"mask_{name}", m)

    # ---- construction helpers -------------------------------------------------------
    def _dims(self, shape: tuple[str, ...]) -> tuple[int, ...]:
        return tuple({"n": self.dim, "m": self.half}[s] for s in shape)

    def _init(self, shape, std, generator) -> Tensor:
        if std == 0:  # (weights set right after, per agent block: no draw of a large graph's dense matrices)
            return torch.zeros(shape)
        if std is None:  # nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            bound = 1.0 / math.sqrt(shape[-1] if len(shape) > 2 else self.dim)
            return (torch.rand(shape, generator=generator) * 2 - 1) * bound
        return torch.randn(shape, generator=generator) * std

    def _normalize_mask(self, mask) -> dict[str, Tensor]:
        """Map a user mask (tensor, or dict keyed by mask key) to {parameter: bool tensor}."""
        if mask is None:
            return {}
        keys = sorted(set(self.masked.values()))
        if not keys:
            raise ValueError(f"mask: {self.arch_name} takes no mask")
        if isinstance(mask, Mapping):
            unknown = set(mask) - set(keys)
            if unknown:
                raise ValueError(f"mask: unknown key(s) {sorted(unknown)} for {self.arch_name}; expected {keys}")
            by_key = dict(mask)
        elif isinstance(mask, (tuple, list)):
            if len(mask) != len(keys):
                raise ValueError(f"mask: expected {len(keys)} masks {keys} for {self.arch_name}, got {len(mask)}")
            by_key = dict(zip(keys, mask))
        else:
            by_key = {k: mask for k in keys}
        out = {}
        for pname, key in self.masked.items():
            if key not in by_key:
                continue
            m = torch.as_tensor(by_key[key])
            want = self._dims(self.param_shapes[pname])
            if tuple(m.shape) != want:
                raise ValueError(f"mask[{key!r}]: expected shape {want} for {self.arch_name} "
                                 f"with dim={self.dim}, got {tuple(m.shape)}")
            out[pname] = m.to(torch.bool).clone()
            with torch.no_grad():  # start from an exactly sparse point
                getattr(self, pname).mul_(out[pname])
        return out

    # ---- the maths ------------------------------------------------------------------
    def effective(self) -> dict[str, Tensor]:
        """All per-layer parameters with masks applied (masked entries get zero gradient)."""
        out = {}
        for name in self.param_shapes:
            p = getattr(self, name)
            m = getattr(self, f"mask_{name}", None)
            out[name] = p if m is None else p * m
        return out

    def step(self, y: Tensor, j: int, P: Mapping[str, Tensor]) -> Tensor:
        """One layer: map state ``y`` (B, dim) through layer ``j`` using ``P[name][j]`` (see per_layer)."""
        raise NotImplementedError

    def _check_input(self, y: Tensor) -> None:
        if y.dim() != 2 or y.shape[1] != self.dim:
            raise ValueError(f"input: expected a (batch, {self.dim}) state tensor, got shape {tuple(y.shape)}")

    def per_layer(self) -> dict[str, tuple[Tensor, ...]]:
        """Effective parameters split by layer. ``unbind`` once, not ``P[j]`` per layer: its backward
        stacks all layers' gradients once instead of allocating a full-size zero tensor per layer."""
        return {k: v.unbind(0) for k, v in self.effective().items()}

    def forward(self, y: Tensor) -> Tensor:
        self._check_input(y)
        if self.layout is not None:
            return self._integrate(y, transposed=True)
        P = self.per_layer()
        for j in range(self.layers):
            y = self.step(y, j, P)
        return y

    def forward_fm(self, Y: Tensor) -> Tensor:
        """The stack on a feature-major batch: ``Y`` is ``(dim, N)``, one column per state (the
        layout of very many small states, e.g. every pixel of an image batch). An integrated
        architecture runs the integrator on it; the others go through the batch-major path."""
        if self.layout is None:
            return self.forward(Y.T).T
        if Y.dim() != 2 or Y.shape[0] != self.dim:
            raise ValueError(f"input: expected a ({self.dim}, N) feature-major state tensor, got {tuple(Y.shape)}")
        return self._integrate(Y, transposed=False)

    def _integrate(self, Y: Tensor, transposed: bool) -> Tensor:
        """The integrator on the state (its layout's fields are consecutive row blocks: H2's p then
        q, H1's (p, q)), in one process on assembled matrices."""
        P = self.effective()
        params, shared = [], []
        for hs, (K, A) in zip(self.layout.half_steps, self.matrices(P)):
            params += [K] if A is K else [K, A]
            params.append(P[hs.bias])
            shared.append(A is K)
        return Integrate.apply(self._plan(tuple(shared)), transposed, Y, *params)

    def matrices(self, P: Mapping[str, Tensor]) -> list[tuple[Tensor, Tensor]]:
        """Per half-step of :attr:`layout`: ``K`` and ``A`` (``A`` is ``K`` with the architecture's
        fixed factor folded in; ``A is K`` where there is none)."""
        raise NotImplementedError

    def _plan(self, shared: tuple[bool, ...]) -> Plan:
        """The integrator's plan of this stack in one process: assembled matrices, no exchanges."""
        if shared not in self._plans:
            width = self.dim // len(self.layout.fields)
            kernels = [MatrixKernel(None, width, width, self.layers, s) for s in shared]
            plan = Plan(self.layout, self.h, self.layers, width, width, kernels, local_maps(self.layout),
                        [k.n_tensors for k in kernels], ws=self._ws)
            self._plans[shared] = plan
            self._configure(plan)
        return self._plans[shared]

    def _configure(self, plan: Plan) -> None:
        plan.set_backprop(self.backprop == "reversible", self.anchor_every, self.reversible_state,
                          self.fraction_bits)
        plan.cert = self.certificate if self.backprop == "reversible" else None

    def trajectory(self, y: Tensor) -> list[Tensor]:
        """All ``layers + 1`` states ``[y_0, ..., y_L]`` via the step-by-step autograd path."""
        self._check_input(y)
        P = self.per_layer()
        states = [y]
        for j in range(self.layers):
            states.append(self.step(states[-1], j, P))
        return states

    def regularizer(self, alpha: float) -> Tensor:
        """Smoothness across depth: ``alpha h sum_j 1/2 ||theta_{j+1} - theta_j||_F^2`` (differentiable)."""
        P = self.effective()
        total = sum(((P[n][1:] - P[n][:-1]) ** 2).sum() for n in self.smooth_params)
        return alpha * self.h * 0.5 * total

    @torch.no_grad()
    def regularizer_value(self, alpha: float) -> Tensor:
        """:meth:`regularizer`'s value without a graph (see :meth:`add_regularizer_grad`)."""
        P = self.effective()
        return alpha * self.h * 0.5 * smoothness_value([P[n] for n in self.smooth_params])

    def add_regularizer_grad(self, alpha: float) -> None:
        """Add :meth:`regularizer`'s gradient to the parameters' ``.grad`` in place (after
        ``backward``): the same gradient without keeping a parameter-sized graph per step."""
        P = self.effective()
        for n in self.smooth_params:
            p = getattr(self, n)
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        add_smoothness_grad([P[n].detach() for n in self.smooth_params],
                            [getattr(self, n).grad for n in self.smooth_params], alpha * self.h * 0.5,
                            [getattr(self, f"mask_{n}", None) for n in self.smooth_params])

    def extra_repr(self) -> str:
        return f"arch={self.arch_name}, dim={self.dim}, layers={self.layers}, h={self.h}"

    def set_backprop(self, mode: str, anchor_every: int = 0, state: str = "fixed", fraction_bits: int | None = None):
        """``autograd`` (keep every layer's state) or ``reversible`` (rebuild them in the backward):
        with ``state="fixed"`` exactly, from an int64 fixed-point state with ``fraction_bits``
        (None: 32 for float32, 48 for float64); with ``"float"`` by float inversion, bounded by an
        anchor every ``anchor_every`` layers."""
        if mode == "reversible" and "nothing" not in self.axes().get("keep", ()):
            raise ValueError(f"backprop: {self.arch_name} layers cannot be inverted exactly; expected autograd")
        if state not in CARRIERS:
            raise ValueError(f"reversible_state: expected one of {list(CARRIERS)}, got {state!r}")
        self.backprop, self.anchor_every = mode, anchor_every
        self.reversible_state, self.fraction_bits = state, fraction_bits
        self.certificate = Certificate(exact=state == "fixed")
        for plan in self._plans.values():
            self._configure(plan)

    def set_anchor_every(self, k: int) -> None:
        """Float reversible backprop: store the state every ``k`` layers from the next pass on."""
        self.anchor_every = k
        for plan in self._plans.values():
            plan.set_anchor_every(k)

    @classmethod
    def axes(cls) -> dict[str, tuple[str, ...]]:
        """The integrator's axes this architecture supports (none without a layout: it runs step by
        step); reversible keeps and the fixed carrier need an invertible layer."""
        if cls.layout is None:
            return {}
        rev = cls.invertible
        return {"keep": KEEPS if rev else ("every",), "carrier": CARRIERS if rev else ("float",)}

    @classmethod
    def agent_layout(cls, **options) -> AgentLayout:
        """How the distributed engine runs this architecture agent by agent; raises
        :class:`NotDistributable` where it cannot (the default)."""
        raise NotDistributable("model.arch", f"{cls.arch_name} has no agent-local structure; the distributed "
                                             f"engine runs {sorted(a for a, c in ARCHITECTURES.items() if c.distributable)}")


def _check_positive_int(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name}: expected a positive integer, got {v!r}")


def j_matrix(kind: str, dim: int) -> Tensor:
    """The fixed skew matrices: ``J1 = [[0, I], [-I, 0]]``; ``J2`` = +1 above, -1 below."""
    if kind == "J1":
        if dim % 2:
            raise ValueError(f"J: J1 pairs p with q, so dim must be even, got {dim}")
        m = dim // 2
        J = torch.zeros(dim, dim)
        J[:m, m:] = torch.eye(m)
        J[m:, :m] = -torch.eye(m)
        return J
    if kind == "J2":
        return torch.ones(dim, dim).triu(1) - torch.ones(dim, dim).tril(-1)
    raise ValueError(f"J: expected 'J1' or 'J2', got {kind!r}")


@register("H1")
class H1(ODENet):
    """Forward Euler: ``y <- y + h J K_j^T tanh(K_j y + b_j)``."""

    param_shapes = {"K": ("n", "n"), "b": ("n",)}
    masked = {"K": "K"}
    smooth_params = ("K", "b")
    config_options = ("J",)
    distributable = True  # with J1
    layout = AgentLayout(fields=(("y", ("p", "q")),), half_steps=(HalfStep("K", "b", "y", "y", "J1"),))

    def __init__(self, dim, layers, h, mask=None, J: str = "J1", **kw):
        super().__init__(dim, layers, h, mask=mask, **kw)
        self.J_kind = J
        self.register_buffer("J", j_matrix(J, dim))

    def step(self, y, j, P):
        K = P["K"][j]
        return y + self.h * (torch.tanh(y @ K.T + P["b"][j]) @ K) @ self.J.T

    def matrices(self, P):
        return [(P["K"], self._folded(P["K"]))]

    def _folded(self, K: Tensor) -> Tensor:
        """``K J^T`` for every layer (the transposed product's matrix): for J1 a signed swap of the
        p and q column halves (no matmul)."""
        if self.J_kind == "J1":
            return torch.cat([K[:, :, self.half:], -K[:, :, :self.half]], 2)
        return K @ self.J.T.to(K.dtype)

    def extra_repr(self):
        return super().extra_repr() + f", J={self.J_kind}"

    @classmethod
    def agent_layout(cls, J: str = "J1", **options) -> AgentLayout:
        if J != "J1":
            raise NotDistributable("model.J", f"{J} couples every agent with every other (centralised only); "
                                              "use J1 for distributed runs")
        return cls.layout


@register("H2")
class H2(ODENet):
    """Semi-implicit (symplectic) Euler on ``y = (p, q)``:

    ``p <- p - h X^T K_q^T tanh(K_q q + b_q)``, then ``q <- q + h X K_p^T tanh(K_p p + b_p)``
    with the new ``p``. Each layer map is symplectic, so no backward sensitivity vanishes.
    """

    param_shapes = {"K_p": ("m", "m"), "K_q": ("m", "m"), "b_p": ("m",), "b_q": ("m",)}
    masked = {"K_p": "K_p", "K_q": "K_q"}
    smooth_params = ("K_p", "K_q", "b_p", "b_q")
    needs_even_dim = True
    distributable = True
    # X = I: p <- p - h K_q^T tanh(K_q q + b_q), then q <- q + h K_p^T tanh(K_p p + b_p)
    layout = AgentLayout(fields=(("p", ("p",)), ("q", ("q",))),
                         half_steps=(HalfStep("K_q", "b_q", "q", "p", "-"), HalfStep("K_p", "b_p", "p", "q", "+")))

    def __init__(self, dim, layers, h, mask=None, X=None, **kw):
        super().__init__(dim, layers, h, mask=mask, **kw)
        m = self.half
        if X is None:  # the identity (invertible: no O(m^3) rank check, minutes for a large graph's state)
            X = torch.eye(m)
        else:
            X = torch.as_tensor(X, dtype=torch.get_default_dtype())
            if tuple(X.shape) != (m, m):
                raise ValueError(f"X: expected a ({m}, {m}) matrix for dim={dim}, got shape {tuple(X.shape)}")
            if torch.linalg.matrix_rank(X.double()) < m:
                raise ValueError("X: expected an invertible matrix")
        self.register_buffer("X", X.clone())
        self.X_is_identity = bool(torch.equal(X, torch.eye(m, dtype=X.dtype)))

    def step(self, y, j, P):
        m = self.half
        p, q = y[:, :m], y[:, m:]
        Kq, Kp = P["K_q"][j], P["K_p"][j]
        p = p - self.h * (torch.tanh(q @ Kq.T + P["b_q"][j]) @ Kq) @ self.X
        q = q + self.h * (torch.tanh(p @ Kp.T + P["b_p"][j]) @ Kp) @ self.X.T
        return torch.cat([p, q], dim=1)

    def matrices(self, P):
        if self.X_is_identity:
            return [(P["K_q"], P["K_q"]), (P["K_p"], P["K_p"])]
        # the p-update's transposed product uses (K_q X), the q-update's (K_p X^T): folded once per pass
        X = self.X.to(P["K_p"].dtype)
        return [(P["K_q"], P["K_q"] @ X), (P["K_p"], P["K_p"] @ X.T)]

    def inverse_step(self, y: Tensor, j: int, P: Mapping[str, Tensor]) -> Tensor:
        """Undo layer ``j``: the state before it from the state after it (exact in exact arithmetic)."""
        m = self.half
        p, q = y[:, :m], y[:, m:]
        Kq, Kp = P["K_q"][j], P["K_p"][j]
        q = q - self.h * (torch.tanh(p @ Kp.T + P["b_p"][j]) @ Kp) @ self.X.T
        p = p + self.h * (torch.tanh(q @ Kq.T + P["b_q"][j]) @ Kq) @ self.X
        return torch.cat([p, q], dim=1)

    @classmethod
    def agent_layout(cls, **options) -> AgentLayout:
        return cls.layout


def build_model(name: str, dim: int, layers: int, h: float, mask=None, **options) -> ODENet:
    """Build an architecture from :data:`ARCHITECTURES` (``H1``, ``H2``, ``MS1``-``MS3``, ``ResNet``, ``MLP``).

    ``mask`` is a boolean tensor (or, for H2, a dict/tuple with ``K_p`` and ``K_q``) fixing the
    sparsity of the weight matrices; options such as ``J`` (H1), ``X`` (H2) and ``init_std``
    are passed to the class.
    """
    try:
        cls = ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"arch: unknown architecture {name!r}; expected one of {sorted(ARCHITECTURES)}") from None
    try:
        return cls(dim, layers, h, mask=mask, **options)
    except TypeError as e:  # an option the class does not take
        raise ValueError(f"{name}: {e}") from None
