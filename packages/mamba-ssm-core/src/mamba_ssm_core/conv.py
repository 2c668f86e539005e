"""Causal depthwise 1-D convolution, channels-last, for the full sequence and one step.

The convolution state is the last `width - 1` inputs in time order,
(batch, width - 1, dim): prefill hands it to decoding, decoding rolls it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array
from jaxtyping import Float

from . import _checks
from ._scan_common import compute_dtype, lead

_ACTIVATIONS = (None, "silu", "swish")


def _check_common(op: str, x: Array, weight: Array, bias: Array | None, activation) -> None:
    _checks.check_float(op, "x", x)
    _checks.check_float(op, "weight", weight)
    dim = x.shape[-1]
    _checks.check_shape(op, "weight", weight, (dim, None), "(dim, width)")
    if weight.shape[1] < 1:
        raise ValueError(f"{op}: weight must have width >= 1, got shape {tuple(weight.shape)}")
    if bias is not None:
        _checks.check_float(op, "bias", bias)
        _checks.check_shape(op, "bias", bias, (dim,), "(dim,)")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {_ACTIVATIONS}, got {activation!r}")


def _activate(y: Array, bias: Array | None, activation: str | None) -> Array:
    if bias is not None:
        y = y + lead(bias.astype(y.dtype), y.ndim)
    if activation is not None:
        y = jax.nn.silu(y)
    return y


def causal_conv1d(
    x: Float[Array, "batch length dim"],
    weight: Float[Array, "dim width"],
    bias: Float[Array, " dim"] | None = None,
    *,
    activation: str | None = None,
    initial_state: Float[Array, "batch width_minus_1 dim"] | None = None,
    return_final_state: bool = False,
) -> Float[Array, "batch length dim"] | tuple[
    Float[Array, "batch length dim"], Float[Array, "batch width_minus_1 dim"]
]:
    """y[t, d] = sum_k weight[d, k] * x[t - (width - 1) + k, d] (+ bias[d]), then activation.

    Args:
      x: (batch, length, dim).
      weight: (dim, width); the last tap multiplies the current step. A PyTorch
        `Conv1d(groups=dim)` weight (dim, 1, width) is `weight[:, 0, :]`.
      bias: (dim,) or None.
      activation: None or "silu" ("swish" is the same).
      initial_state: the `width - 1` inputs before x, (batch, width - 1, dim), in time
        order; zeros when None.
      return_final_state: also return the last `width - 1` inputs (batch, width - 1, dim),
        initial state included when length < width - 1, in x's dtype.

    Returns y (batch, length, dim) in x's dtype, computed in float32 (float64 when an
    input is float64).
    """
    op = "causal_conv1d"
    _checks.check_rank(op, "x", x, (3,), "(batch, length, dim)")
    _check_common(op, x, weight, bias, activation)
    batch, length, dim = x.shape
    width = weight.shape[1]
    if initial_state is None:
        prev = jnp.zeros((batch, width - 1, dim), x.dtype)
    else:
        _checks.check_shape(
            op, "initial_state", initial_state, (batch, width - 1, dim),
            "(batch, width - 1, dim)",
        )
        _checks.check_same_dtype(op, ("x", "initial_state"), (x, initial_state))
        prev = initial_state
    xp = jnp.concatenate([prev, x], axis=1)
    dtype = compute_dtype(x, weight, bias)
    w = weight.astype(dtype)
    # width is small (4 in every released model): a sum of shifted products is
    # exact float32, fast on every backend, and needs no convolution primitive.
    y = sum(xp[:, k : k + length, :].astype(dtype) * w[None, None, :, k] for k in range(width))
    y = _activate(y, bias, activation).astype(x.dtype)
    if return_final_state:
        return y, xp[:, xp.shape[1] - (width - 1) :, :]
    return y


def causal_conv1d_update(
    conv_state: Float[Array, "batch width_minus_1 dim"],
    x: Float[Array, "batch dim"],
    weight: Float[Array, "dim width"],
    bias: Float[Array, " dim"] | None = None,
    activation: str | None = None,
) -> tuple[Float[Array, "batch dim"], Float[Array, "batch width_minus_1 dim"]]:
    """One decoding step of `causal_conv1d`.

    conv_state: the previous `width - 1` inputs (batch, width - 1, dim); x: (batch, dim).
    Returns (y (batch, dim) in x's dtype, the new state with x appended and the oldest
    input dropped).
    """
    op = "causal_conv1d_update"
    _checks.check_rank(op, "x", x, (2,), "(batch, dim)")
    _check_common(op, x, weight, bias, activation)
    batch, dim = x.shape
    width = weight.shape[1]
    _checks.check_shape(
        op, "conv_state", conv_state, (batch, width - 1, dim), "(batch, width - 1, dim)"
    )
    _checks.check_same_dtype(op, ("x", "conv_state"), (x, conv_state))
    window = jnp.concatenate([conv_state, x[:, None, :]], axis=1)
    dtype = compute_dtype(x, weight, bias)
    y = jnp.sum(window.astype(dtype) * weight.astype(dtype).T[None], axis=1)
    y = _activate(y, bias, activation).astype(x.dtype)
    return y, window[:, 1:, :]
