"""The chunked selective scan: `lax.scan` over chunks of the sequence carrying the state.

Inside a chunk the recurrence runs either step by step ("sequential", cheapest
where a loop step costs little, as on CPUs) or as an associative scan over the
chunk ("parallel", for accelerators). Each chunk is rematerialised in the
backward pass, so training memory is O(batch*length*dim) plus one
(batch, dim, state) state per chunk, never the whole (batch, length, dim, state).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import Array

from ._scan_associative import associative_states, discretise
from ._scan_common import (
    ScanArgs,
    ScanImplementation,
    ScanSpec,
    expand_groups,
    finish,
    initial_state_or_zeros,
    keep_mask,
    prepare_delta,
)
from ._scan_reference import steps_time_major

_INNER = ("auto", "sequential", "parallel")


def _pad_time(x: Array | None, length: int, value) -> Array | None:
    if x is None or x.shape[1] == length:
        return x
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, length - x.shape[1])
    return jnp.pad(x, pad, constant_values=value)


def _chunks(x: Array | None, size: int) -> Array | None:
    """(batch, length, ...) -> (length // size, size, batch, ...): chunks, then time-major.

    One transpose here saves one per chunk in the loop: each step then reads a
    contiguous (batch, ...) slice.
    """
    if x is None:
        return None
    b, l, *rest = x.shape
    x = x.reshape(b, l // size, size, *rest)
    return jnp.transpose(x, (1, 2, 0, *range(3, x.ndim)))


def _unchunk(x: Array) -> Array:
    """(chunks, size, batch, ...) -> (batch, chunks * size, ...)."""
    c, t, b, *rest = x.shape
    return jnp.transpose(x, (2, 0, 1, *range(3, x.ndim))).reshape(b, c * t, *rest)


@dataclasses.dataclass(frozen=True)
class ChunkedScan(ScanImplementation):
    """`lax.scan` over chunks of `chunk_size` steps, each rematerialised in the backward.

    inner: "sequential" (a step loop inside the chunk), "parallel" (an associative
    scan inside the chunk), or "auto" (sequential on CPU, parallel elsewhere).
    unroll: steps per iteration of the sequential inner loop.
    """

    name = "chunked"
    chunk_size: int = 64
    inner: str = "auto"
    unroll: int = 1

    def __post_init__(self):
        for field in ("chunk_size", "unroll"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"ChunkedScan: {field} must be an int, got {value!r}")
            if value < 1:
                raise ValueError(f"ChunkedScan: {field} must be >= 1, got {value}")
        if self.inner not in _INNER:
            raise ValueError(f"ChunkedScan: inner must be one of {_INNER}, got {self.inner!r}")

    def unsupported(self, spec: ScanSpec, platform: str) -> str | None:
        del spec, platform
        return None

    def __call__(self, args: ScanArgs, *, delta_softplus: bool) -> tuple[Array, Array]:
        inner = self.inner
        if inner == "auto":
            inner = "sequential" if jax.default_backend() == "cpu" else "parallel"
        b, length, dim = args.u.shape
        size = min(self.chunk_size, length)
        padded = -(-length // size) * size
        h0 = initial_state_or_zeros(args)
        dtype = h0.dtype

        # Padding after softplus with delta = 0 makes each padded step the identity
        # map (decay exp(0) = 1, input 0), so the final state is the true one.
        delta = prepare_delta(args.delta, args.delta_bias, delta_softplus, dtype)
        delta = _pad_time(delta, padded, 0.0)
        u = _pad_time(args.u.astype(dtype), padded, 0.0)
        B = _pad_time(args.B, padded, 0.0)
        C = _pad_time(args.C, padded, 0.0)
        keep = _pad_time(keep_mask(args.segment_ids), padded, True)
        A = args.A
        unroll = min(self.unroll, size)

        @jax.checkpoint
        def chunk(h, xs):
            # Every xs entry is time-major: (size, batch, ...).
            delta_c, u_c, B_c, C_c, keep_c = xs
            if inner == "sequential":
                y_c, h = steps_time_major(h, delta_c, u_c, A, B_c, C_c, keep_c, unroll=unroll)
            else:
                dA, dBu = discretise(delta_c, u_c, A, B_c, keep_c)
                hs = associative_states(h, dA, dBu, axis=0)
                y_c = jnp.sum(hs * expand_groups(C_c.astype(dtype), dim), axis=-1)
                h = hs[-1]
            return h, y_c

        xs = tuple(_chunks(x, size) for x in (delta, u, B, C, keep))
        h, ys = jax.lax.scan(chunk, h0, xs)
        y = _unchunk(ys)[:, :length]
        return finish(y, args), h
