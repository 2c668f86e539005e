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
    prepare_delta,
)


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

    h0: (batch, dim, state) f32; delta, u: (batch, length, dim) f32 (delta already
    biased and softplus'd); A: (dim, state); B, C: (batch, length, groups, state);
    keep: (batch, length) bool or None. Returns (y without skip (batch, length, dim) f32,
    final state (batch, dim, state) f32).
    """
    dim = u.shape[-1]
    A = A.astype(jnp.float32)

    def step(h, xs):
        delta_t, u_t, B_t, C_t, keep_t = xs
        dA = jnp.exp(delta_t[..., None] * A)
        if keep_t is not None:
            dA = jnp.where(keep_t[:, None, None], dA, 0.0)
        Bx = expand_groups(B_t.astype(jnp.float32), dim)
        Cx = expand_groups(C_t.astype(jnp.float32), dim)
        h = dA * h + (delta_t * u_t)[..., None] * Bx
        # Elementwise product and sum, not a dot: keeps exact float32 on GPUs
        # whose matrix units would round to tf32.
        y_t = jnp.sum(h * Cx, axis=-1)
        return h, y_t

    time_first = lambda x: None if x is None else jnp.moveaxis(x, 1, 0)
    xs = (time_first(delta), time_first(u), time_first(B), time_first(C), time_first(keep))
    h, ys = jax.lax.scan(step, h0, xs, unroll=unroll)
    return jnp.moveaxis(ys, 0, 1), h


@dataclasses.dataclass(frozen=True)
class ReferenceScan(ScanImplementation):
    """`lax.scan` over time (the oracle). `unroll` steps per loop iteration."""

    name = "reference"
    unroll: int = 1

    def __call__(self, args: ScanArgs, *, delta_softplus: bool) -> tuple[Array, Array]:
        delta = prepare_delta(args.delta, args.delta_bias, delta_softplus)
        y, h = scan_steps(
            initial_state_or_zeros(args),
            delta,
            args.u.astype(jnp.float32),
            args.A,
            args.B,
            args.C,
            keep_mask(args.segment_ids),
            unroll=self.unroll,
        )
        return finish(y, args), h
