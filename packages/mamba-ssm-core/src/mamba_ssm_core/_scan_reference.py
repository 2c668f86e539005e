"""The reference selective scan: `lax.scan` over time, one step of the recurrence a step.

This is the oracle the other implementations are checked against on device. It
never builds the (batch, length, dim, state) tensor in the forward, but its
autodiff saves one state per step, so its backward holds that much.
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
    initial_state_or_zeros,
    keep_mask,
    lead,
    prepare_delta,
)


def steps_time_major(
    h0: Array,
    delta: Array,
    u: Array,
    A: Array,
    B: Array,
    C: Array,
    keep: Array | None,
    *,
    unroll: int = 1,
) -> tuple[Array, Array]:
    """`scan_steps` with time as the leading axis of every sequence input and of y.

    delta, u: (length, batch, dim); B, C: (length, batch, groups, state);
    keep: (length, batch) or None. Returns (y (length, batch, dim), final state).
    """
    dim = u.shape[-1]
    dtype = h0.dtype
    A = lead(A.astype(dtype), h0.ndim)

    def step(h, xs):
        delta_t, u_t, B_t, C_t, keep_t = xs
        dA = jnp.exp(delta_t[..., None] * A)
        if keep_t is not None:
            dA = jnp.where(keep_t[:, None, None], dA, 0.0)
        Bx = expand_groups(B_t.astype(dtype), dim)
        Cx = expand_groups(C_t.astype(dtype), dim)
        h = dA * h + (delta_t * u_t)[..., None] * Bx
        # Elementwise product and sum, not a dot: keeps exact float32 on GPUs
        # whose matrix units would round to tf32.
        y_t = jnp.sum(h * Cx, axis=-1)
        return h, y_t

    h, ys = jax.lax.scan(step, h0, (delta, u, B, C, keep), unroll=unroll)
    return ys, h


def scan_steps(
    h0: Array,
    delta: Array,
    u: Array,
    A: Array,
    B: Array,
    C: Array,
    keep: Array | None,
    *,
    unroll: int = 1,
) -> tuple[Array, Array]:
    """Run the recurrence step by step.

    h0: (batch, dim, state) in the compute dtype (float32, or float64); delta, u:
    (batch, length, dim) in that dtype (delta already biased and softplus'd);
    A: (dim, state); B, C: (batch, length, groups, state); keep: (batch, length) bool
    or None. Returns (y without skip (batch, length, dim), final state
    (batch, dim, state)), both in h0's dtype.
    """
    time_first = lambda x: None if x is None else jnp.moveaxis(x, 1, 0)
    ys, h = steps_time_major(
        h0, *(time_first(x) for x in (delta, u)), A, *(time_first(x) for x in (B, C, keep)),
        unroll=unroll,
    )
    return jnp.moveaxis(ys, 0, 1), h


@dataclasses.dataclass(frozen=True)
class ReferenceScan(ScanImplementation):
    """`lax.scan` over time (the oracle). `unroll` steps per loop iteration."""

    name = "reference"
    unroll: int = 1

    def __call__(self, args: ScanArgs, *, delta_softplus: bool) -> tuple[Array, Array]:
        h0 = initial_state_or_zeros(args)
        delta = prepare_delta(args.delta, args.delta_bias, delta_softplus, h0.dtype)
        y, h = scan_steps(
            h0,
            delta,
            args.u.astype(h0.dtype),
            args.A,
            args.B,
            args.C,
            keep_mask(args.segment_ids),
            unroll=self.unroll,
        )
        return finish(y, args), h
