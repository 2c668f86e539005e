"""Pieces shared by every selective-scan implementation.

Implementations receive a validated `ScanArgs` whose B and C are always grouped,
(batch, length, groups, state); channel d reads group d // (dim // groups), as
in the official kernel's `repeat(B, "b g n l -> b (g h) n l")`.

Arithmetic and the state are float32 (`compute_dtype`), or float64 when an input
is float64: a float64 input is never silently rounded to float32, which is also
what lets the tests check gradients by finite differences in float64.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

# The official kernels (and torch.nn.functional.softplus) return x unchanged above 20.
SOFTPLUS_THRESHOLD = 20.0


class ScanArgs(NamedTuple):
    """Validated inputs of the selective scan, channels-last.

    u, delta: (batch, length, dim); A: (dim, state); B, C: (batch, length, groups, state);
    D, delta_bias: (dim,) or None; z: (batch, length, dim) or None;
    initial_state: (batch, dim, state) in the compute dtype, or None;
    segment_ids: (batch, length) int or None.
    """

    u: Array
    delta: Array
    A: Array
    B: Array
    C: Array
    D: Array | None
    z: Array | None
    delta_bias: Array | None
    initial_state: Array | None
    segment_ids: Array | None

    @property
    def compute_dtype(self) -> jnp.dtype:
        """Dtype of the arithmetic and of the state: float32, or float64 if an input is."""
        return compute_dtype(self.u, self.delta, self.A, self.B, self.C, self.D, self.z,
                             self.delta_bias)


@dataclasses.dataclass(frozen=True)
class ScanSpec:
    """Static description of one call, used to pick an implementation."""

    batch: int
    length: int
    dim: int
    state: int
    groups: int
    dtype: str
    has_z: bool
    has_segments: bool

    @classmethod
    def of(cls, args: ScanArgs) -> ScanSpec:
        b, l, d = args.u.shape
        _, _, g, n = args.B.shape
        return cls(b, l, d, n, g, str(jnp.dtype(args.u.dtype)), args.z is not None,
                   args.segment_ids is not None)


@dataclasses.dataclass(frozen=True)
class ScanImplementation(abc.ABC):
    """Base of the registered implementations: a frozen, hashable configuration.

    Subclasses set `name`, may add options as fields, and implement `__call__`,
    which returns y (batch, length, dim) in u's dtype and the final state
    (batch, dim, state) in `args.compute_dtype`. `unsupported` returns a reason string when
    the implementation cannot take a call (then `auto` passes it over and an
    explicit request raises with that reason), or None.
    """

    name: ClassVar[str] = ""

    def unsupported(self, spec: ScanSpec, platform: str) -> str | None:
        del spec, platform
        return None

    @abc.abstractmethod
    def __call__(self, args: ScanArgs, *, delta_softplus: bool) -> tuple[Array, Array]:
        """Run the scan: (y, final_state)."""


def compute_dtype(*xs: Array | None) -> jnp.dtype:
    """float64 if any of the arrays (None entries skipped) is float64, else float32."""
    if any(x is not None and jnp.result_type(x) == jnp.float64 for x in xs):
        return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


def lead(x: Array, ndim: int) -> Array:
    """`x` with leading unit axes up to rank `ndim`: explicit broadcasting, which
    keeps the ops valid under `jax_numpy_rank_promotion="raise"`."""
    return x.reshape((1,) * (ndim - x.ndim) + x.shape)


def softplus(x: Array) -> Array:
    """softplus with the official threshold: identity above 20."""
    below = jnp.log1p(jnp.exp(jnp.minimum(x, SOFTPLUS_THRESHOLD)))
    return jnp.where(x > SOFTPLUS_THRESHOLD, x, below)


def prepare_delta(
    delta: Array, delta_bias: Array | None, delta_softplus: bool, dtype=None
) -> Array:
    """delta (+ bias), softplus'd if asked, in `dtype` (default: `compute_dtype` of both).

    Shape unchanged.
    """
    dtype = compute_dtype(delta, delta_bias) if dtype is None else dtype
    delta = delta.astype(dtype)
    if delta_bias is not None:
        delta = delta + lead(delta_bias.astype(dtype), delta.ndim)
    if delta_softplus:
        delta = softplus(delta)
    return delta


def expand_groups(x: Array, dim: int) -> Array:
    """(..., groups, state) -> (..., dim, state): each group repeated over its channels.

    Group g serves channels g * (dim // groups) to (g + 1) * (dim // groups) - 1.
    """
    *rest, g, n = x.shape
    x = jnp.broadcast_to(x[..., :, None, :], (*rest, g, dim // g, n))
    return x.reshape(*rest, dim, n)


def keep_mask(segment_ids: Array | None) -> Array | None:
    """(batch, length) bool: False where the state resets (the segment id changes), else True."""
    if segment_ids is None:
        return None
    same = segment_ids[:, 1:] == segment_ids[:, :-1]
    # Not ones_like(same[:, :1]): at length 1 `same` is empty and so would be that slice.
    first = jnp.ones((segment_ids.shape[0], 1), jnp.bool_)
    return jnp.concatenate([first, same], axis=1)


def finish(y: Array, args: ScanArgs) -> Array:
    """y (compute dtype, without skip) -> y + D*u, gated by silu(z), cast to u's dtype."""
    if args.D is not None:
        y = y + args.u.astype(y.dtype) * lead(args.D.astype(y.dtype), y.ndim)
    if args.z is not None:
        y = y * jax.nn.silu(args.z.astype(y.dtype))
    return y.astype(args.u.dtype)


def initial_state_or_zeros(args: ScanArgs) -> Array:
    """The initial state, or zeros (batch, dim, state) in the compute dtype."""
    b, _, d = args.u.shape
    n = args.A.shape[1]
    if args.initial_state is None:
        return jnp.zeros((b, d, n), args.compute_dtype)
    return args.initial_state
