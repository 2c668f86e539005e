"""The chunked selective scan: `lax.scan` over chunks of the sequence carrying the state.

Inside a chunk the recurrence runs either step by step ("sequential", cheapest
where a loop step costs little, as on CPUs) or as an associative scan over the
chunk ("parallel", for accelerators). Each chunk is rematerialised in the
backward pass, so training memory is O(batch*length*dim) plus one
(batch, dim, state) state per chunk, never the whole (batch, length, dim, state).

The sequential steps hold the state as (batch, state, dim), dim minor: the sum over
the state and the exp(delta * A) broadcast then run along whole vectors of channels
instead of a short minor axis of `state` entries. On the 2-core benchmark CPU that
took about 30% off the forward's and 10-15% off the forward+backward's CPU time
(batch 2, length 4096, dim 1536, state 16; benchmarks/RESULTS.md, issue 2).
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
from ._scan_common import lead

_INNER = ("auto", "sequential", "parallel")


def _expand_groups_state_major(x: Array, dim: int) -> Array:
    """(..., groups, state) -> (..., state, dim): group g serves channels g*(dim//groups) on."""
    *rest, g, n = x.shape
    x = jnp.broadcast_to(jnp.swapaxes(x, -1, -2)[..., None], (*rest, n, g, dim // g))
    return x.reshape(*rest, n, dim)


def _steps_state_major(
    h: Array, delta: Array, u: Array, A: Array, B: Array, C: Array, keep: Array | None,
    *, unroll: int,
) -> tuple[Array, Array]:
    """The recurrence over one chunk with a (batch, state, dim) state.

    h: (batch, state, dim) in the compute dtype; delta, u: (size, batch, dim) in it;
    A: (dim, state); B, C: (size, batch, groups, state); keep: (size, batch) or None.
    Returns (y without skip (size, batch, dim), the state after the chunk).
    """
    dtype = h.dtype
    dim = u.shape[-1]
    A_t = lead(A.astype(dtype).T, 3)  # (1, state, dim)

    def step(h, xs):
        delta_t, u_t, B_t, C_t, keep_t = xs
        dA = jnp.exp(delta_t[:, None, :] * A_t)
        if keep_t is not None:
            dA = jnp.where(keep_t[:, None, None], dA, 0.0)
        Bx = _expand_groups_state_major(B_t.astype(dtype), dim)
        Cx = _expand_groups_state_major(C_t.astype(dtype), dim)
        h = dA * h + (delta_t * u_t)[:, None, :] * Bx
        # Elementwise product and sum, not a dot, as in the reference (exact float32).
        return h, jnp.sum(h * Cx, axis=1)

    h, ys = jax.lax.scan(step, h, (delta, u, B, C, keep), unroll=unroll)
    return ys, h


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
    unroll: steps per iteration of the sequential inner loop (2 measured best on the CPU).
    """

    name = "chunked"
    chunk_size: int = 64
    inner: str = "auto"
    unroll: int = 2

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
                y_c, h = _steps_state_major(h, delta_c, u_c, A, B_c, C_c, keep_c, unroll=unroll)
            else:
                dA, dBu = discretise(delta_c, u_c, A, B_c, keep_c)
                hs = associative_states(h, dA, dBu, axis=0)
                y_c = jnp.sum(hs * expand_groups(C_c.astype(dtype), dim), axis=-1)
                h = hs[-1]
            return h, y_c

        # The carried state is (batch, state, dim) for the sequential steps.
        state_major = inner == "sequential"
        if state_major:
            h0 = jnp.swapaxes(h0, 1, 2)
        xs = tuple(_chunks(x, size) for x in (delta, u, B, C, keep))
        h, ys = jax.lax.scan(chunk, h0, xs)
        if state_major:
            h = jnp.swapaxes(h, 1, 2)
        y = _unchunk(ys)[:, :length]
        return finish(y, args), h
