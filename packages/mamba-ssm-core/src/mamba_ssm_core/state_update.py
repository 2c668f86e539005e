"""The selective-scan recurrence one decoding step at a time, and a few steps at once.

Same semantics as `selective_scan` (softplus threshold, float32 arithmetic and
state, D skip, z gate); the state is (batch, dim, state) float32, or float64 when
an input is float64, like `selective_scan`'s.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array
from jaxtyping import Float

from . import _checks
from ._scan_common import compute_dtype, expand_groups, lead, prepare_delta


def _check_params(op, dim, state_size, A, D, dt_bias):
    _checks.check_float(op, "A", A)
    _checks.check_shape(op, "A", A, (dim, state_size), "(dim, state)")
    for name, v in (("D", D), ("dt_bias", dt_bias)):
        if v is not None:
            _checks.check_float(op, name, v)
            _checks.check_shape(op, name, v, (dim,), "(dim,)")


def _grouped(op: str, name: str, x: Array, lead: dict[str, int], state_size: int, dim: int):
    """Validate B or C and give it a groups axis: (*lead, state) -> (*lead, 1, state)."""
    axes = ", ".join(lead)
    _checks.check_float(op, name, x)
    _checks.check_rank(op, name, x, (len(lead) + 1, len(lead) + 2),
                       f"({axes}, state) or ({axes}, groups, state)")
    if x.ndim == len(lead) + 1:
        x = x[..., None, :]
    groups = x.shape[-2]
    if groups < 1:
        raise ValueError(f"{op}: {name} must have at least one group, got shape {tuple(x.shape)}")
    _checks.check_shape(op, name, x, (*lead.values(), groups, state_size),
                        f"({axes}, groups, state)")
    if dim % groups:
        raise ValueError(f"{op}: dim ({dim}) must be divisible by the groups of {name} ({groups})")
    return x


def _step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    """One step on validated inputs: B, C grouped (batch, groups, state).

    The arithmetic runs in the state's dtype (the compute dtype).
    """
    dim = x.shape[-1]
    dtype = state.dtype
    dt = prepare_delta(dt, dt_bias, dt_softplus, dtype)
    xc = x.astype(dtype)
    dA = jnp.exp(dt[..., None] * lead(A.astype(dtype), state.ndim))
    Bx = expand_groups(B.astype(dtype), dim)
    Cx = expand_groups(C.astype(dtype), dim)
    state = dA * state + (dt * xc)[..., None] * Bx
    y = jnp.sum(state * Cx, axis=-1)
    if D is not None:
        y = y + xc * lead(D.astype(dtype), xc.ndim)
    if z is not None:
        y = y * jax.nn.silu(z.astype(dtype))
    return y.astype(x.dtype), state


def selective_state_update(
    state: Float[Array, "batch dim state"],
    x: Float[Array, "batch dim"],
    dt: Float[Array, "batch dim"],
    A: Float[Array, "dim state"],
    B: Float[Array, "batch *groups state"],
    C: Float[Array, "batch *groups state"],
    D: Float[Array, " dim"] | None = None,
    *,
    z: Float[Array, "batch dim"] | None = None,
    dt_bias: Float[Array, " dim"] | None = None,
    dt_softplus: bool = False,
) -> tuple[Float[Array, "batch dim"], Float[Array, "batch dim state"]]:
    """One step of the selective scan.

    state: (batch, dim, state) float32 (float64 when an input is float64); x, dt, z:
    (batch, dim), dt and z in x's dtype; A: (dim, state); B, C: (batch, state) or
    grouped (batch, groups, state); D, dt_bias: (dim,).
    Returns (y (batch, dim) in x's dtype, new state (batch, dim, state) in state's dtype).
    """
    op = "selective_state_update"
    _checks.check_float(op, "x", x)
    _checks.check_rank(op, "x", x, (2,), "(batch, dim)")
    batch, dim = x.shape
    _checks.check_rank(op, "state", state, (3,), "(batch, dim, state)")
    n = state.shape[-1]
    _checks.check_shape(op, "state", state, (batch, dim, n), "(batch, dim, state)")
    _checks.check_float(op, "dt", dt)
    _checks.check_shape(op, "dt", dt, (batch, dim), "(batch, dim)")
    if z is not None:
        _checks.check_float(op, "z", z)
        _checks.check_shape(op, "z", z, (batch, dim), "(batch, dim)")
    _check_params(op, dim, n, A, D, dt_bias)
    B = _grouped(op, "B", B, {"batch": batch}, n, dim)
    C = _grouped(op, "C", C, {"batch": batch}, n, dim)
    _checks.check_dtype(op, "state", state, compute_dtype(x, dt, A, B, C, D, z, dt_bias))
    return _step(state, x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus))


def selective_state_update_tokens(
    state: Float[Array, "batch dim state"],
    x: Float[Array, "batch tokens dim"],
    dt: Float[Array, "batch tokens dim"],
    A: Float[Array, "dim state"],
    B: Float[Array, "batch tokens *groups state"],
    C: Float[Array, "batch tokens *groups state"],
    D: Float[Array, " dim"] | None = None,
    *,
    z: Float[Array, "batch tokens dim"] | None = None,
    dt_bias: Float[Array, " dim"] | None = None,
    dt_softplus: bool = False,
    return_all_states: bool = False,
) -> tuple[Float[Array, "batch tokens dim"], Float[Array, "..."]]:
    """A few decoding steps at once (chunked prefill, speculative verification).

    Equal to calling `selective_state_update` once per token. x, dt, z:
    (batch, tokens, dim); B, C: (batch, tokens, state) or (batch, tokens, groups, state).
    Returns (y (batch, tokens, dim) in x's dtype, and the final state (batch, dim, state),
    or with return_all_states the state after every token (batch, tokens, dim, state),
    so a verifier can roll back to any accepted prefix).
    """
    op = "selective_state_update_tokens"
    _checks.check_float(op, "x", x)
    _checks.check_rank(op, "x", x, (3,), "(batch, tokens, dim)")
    batch, tokens, dim = x.shape
    _checks.check_rank(op, "state", state, (3,), "(batch, dim, state)")
    n = state.shape[-1]
    _checks.check_shape(op, "state", state, (batch, dim, n), "(batch, dim, state)")
    _checks.check_float(op, "dt", dt)
    _checks.check_shape(op, "dt", dt, (batch, tokens, dim), "(batch, tokens, dim)")
    if z is not None:
        _checks.check_float(op, "z", z)
        _checks.check_shape(op, "z", z, (batch, tokens, dim), "(batch, tokens, dim)")
    _check_params(op, dim, n, A, D, dt_bias)
    B = _grouped(op, "B", B, {"batch": batch, "tokens": tokens}, n, dim)
    C = _grouped(op, "C", C, {"batch": batch, "tokens": tokens}, n, dim)
    _checks.check_dtype(op, "state", state, compute_dtype(x, dt, A, B, C, D, z, dt_bias))

    def body(h, xs):
        x_t, dt_t, B_t, C_t, z_t = xs
        y_t, h = _step(h, x_t, dt_t, A, B_t, C_t, D, z_t, dt_bias, bool(dt_softplus))
        return h, (y_t, h if return_all_states else None)

    tf = lambda v: None if v is None else jnp.moveaxis(v, 1, 0)
    h, (ys, hs) = jax.lax.scan(body, state, (tf(x), tf(dt), tf(B), tf(C), tf(z)))
    return jnp.moveaxis(ys, 0, 1), (jnp.moveaxis(hs, 0, 1) if return_all_states else h)
