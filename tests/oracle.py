"""Float64 NumPy oracles for the ops, written from the paper's recurrence (Algorithm 2).

Independent of the library: no JAX, no shared helpers. Every test of an
implementation compares against these with `rel_err`.
"""

from __future__ import annotations

import numpy as np


def rel_err(out, ref) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (NaN anywhere gives NaN, which fails any bound)."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert out.shape == ref.shape, f"shape {out.shape} != reference shape {ref.shape}"
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def softplus(x):
    x = np.asarray(x, np.float64)
    return np.where(x > 20.0, x, np.log1p(np.exp(np.minimum(x, 20.0))))


def silu(x):
    x = np.asarray(x, np.float64)
    return x / (1.0 + np.exp(-x))


def selective_scan(
    u, delta, A, B, C, D=None, *, z=None, delta_bias=None, delta_softplus=False,
    initial_state=None, segment_ids=None,
):
    """Returns (y (b, l, d), final state (b, d, n)) in float64.

    u, delta, z: (b, l, d); A: (d, n); B, C: (b, l, n) or (b, l, g, n); D, delta_bias: (d,);
    initial_state: (b, d, n); segment_ids: (b, l), the state restarts at zero where it changes.
    """
    f = lambda x: None if x is None else np.asarray(x, np.float64)
    u, delta, A, B, C, D, z = map(f, (u, delta, A, B, C, D, z))
    b, l, d = u.shape
    n = A.shape[1]
    if B.ndim == 3:
        B, C = B[:, :, None, :], C[:, :, None, :]
    g = B.shape[2]
    group_of = np.arange(d) // (d // g)
    if delta_bias is not None:
        delta = delta + f(delta_bias)
    if delta_softplus:
        delta = softplus(delta)
    h = np.zeros((b, d, n)) if initial_state is None else f(initial_state).copy()
    y = np.zeros((b, l, d))
    for t in range(l):
        if segment_ids is not None and t > 0:
            restart = np.asarray(segment_ids)[:, t] != np.asarray(segment_ids)[:, t - 1]
            h[restart] = 0.0
        Bt = B[:, t][:, group_of]  # (b, d, n)
        Ct = C[:, t][:, group_of]
        h = np.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * u[:, t])[:, :, None] * Bt
        y[:, t] = np.sum(h * Ct, axis=-1)
    if D is not None:
        y = y + u * D
    if z is not None:
        y = y * silu(z)
    return y, h


def causal_conv1d(x, weight, bias=None, *, activation=None, initial_state=None):
    """Returns (y (b, l, d), last width-1 inputs (b, width-1, d)) in float64.

    x: (b, l, d); weight: (d, width); initial_state: (b, width-1, d).
    """
    x = np.asarray(x, np.float64)
    w = np.asarray(weight, np.float64)
    b, l, d = x.shape
    width = w.shape[1]
    if initial_state is None:
        prev = np.zeros((b, width - 1, d))
    else:
        prev = np.asarray(initial_state, np.float64)
    xp = np.concatenate([prev, x], axis=1)
    y = np.zeros((b, l, d))
    for t in range(l):
        y[:, t] = np.sum(xp[:, t : t + width, :] * w.T[None], axis=1)
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    if activation in ("silu", "swish"):
        y = silu(y)
    return y, xp[:, xp.shape[1] - (width - 1) :, :]


def selective_state_update(
    state, x, dt, A, B, C, D=None, *, z=None, dt_bias=None, dt_softplus=False
):
    """One decoding step of the recurrence: returns (y (b, d), new state (b, d, n)) in float64.

    state: (b, d, n); x, dt, z: (b, d); A: (d, n); B, C: (b, n) or (b, g, n); D, dt_bias: (d,).
    """
    f = lambda v: None if v is None else np.asarray(v, np.float64)
    state, x, dt, A, B, C, D, z = map(f, (state, x, dt, A, B, C, D, z))
    d = x.shape[-1]
    if B.ndim == 2:
        B, C = B[:, None, :], C[:, None, :]
    group_of = np.arange(d) // (d // B.shape[1])
    if dt_bias is not None:
        dt = dt + f(dt_bias)
    if dt_softplus:
        dt = softplus(dt)
    h = np.exp(dt[:, :, None] * A) * state + (dt * x)[:, :, None] * B[:, group_of]
    y = np.sum(h * C[:, group_of], axis=-1)
    if D is not None:
        y = y + x * D
    if z is not None:
        y = y * silu(z)
    return y, h
