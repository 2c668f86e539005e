"""The associative selective scan: `lax.associative_scan` over the discretised tensors.

Parallel in time (log2(length) levels), at the price of materialising
(batch, length, dim, state) tensors for the decay and the input, forward and
backward. Useful on accelerators for short sequences; the chunked
implementation bounds that memory.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import Array

from ._scan_common import (
    ScanArgs,
    ScanImplementation,
    expand_groups,
    finish,
    keep_mask,
    lead,
    prepare_delta,
)


def combine(left: tuple[Array, Array], right: tuple[Array, Array]) -> tuple[Array, Array]:
    """Compose two affine maps h -> a*h + b, `left` applied first."""
    a_l, b_l = left
    a_r, b_r = right
    return a_l * a_r, a_r * b_l + b_r


def discretise(
    delta: Array, u: Array, A: Array, B: Array, keep: Array | None
) -> tuple[Array, Array]:
    """Decay exp(delta*A) and input delta*u*B, each (batch, length, dim, state).

    delta, u: (batch, length, dim) in the compute dtype, which the results share;
    B: (batch, length, groups, state); keep: (batch, length) bool or None (False
    zeroes the decay: a state reset).
    """
    dA = jnp.exp(delta[..., None] * lead(A.astype(delta.dtype), delta.ndim + 1))
    if keep is not None:
        dA = jnp.where(keep[:, :, None, None], dA, 0.0)
    dBu = (delta * u)[..., None] * expand_groups(B.astype(delta.dtype), u.shape[-1])
    return dA, dBu


def associative_states(
    h0: Array | None, dA: Array, dBu: Array, axis: int = 1
) -> Array:
    """All states h_t (same shape as dA) of h_t = dA_t h_{t-1} + dBu_t from h_{-1} = h0."""
    if h0 is not None:
        first = jax.lax.index_in_dim(dBu, 0, axis, keepdims=False)
        first = first + jax.lax.index_in_dim(dA, 0, axis, keepdims=False) * h0
        dBu = jax.lax.dynamic_update_index_in_dim(dBu, first, 0, axis)
    _, hs = jax.lax.associative_scan(combine, (dA, dBu), axis=axis)
    return hs


@dataclasses.dataclass(frozen=True)
class AssociativeScan(ScanImplementation):
    """`lax.associative_scan` over (batch, length, dim, state) tensors."""

    name = "associative"

    def __call__(self, args: ScanArgs, *, delta_softplus: bool) -> tuple[Array, Array]:
        dtype = args.compute_dtype
        delta = prepare_delta(args.delta, args.delta_bias, delta_softplus, dtype)
        u = args.u.astype(dtype)
        dA, dBu = discretise(delta, u, args.A, args.B, keep_mask(args.segment_ids))
        hs = associative_states(args.initial_state, dA, dBu)
        y = jnp.sum(hs * expand_groups(args.C.astype(dtype), u.shape[-1]), axis=-1)
        return finish(y, args), hs[:, -1]
