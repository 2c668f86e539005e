"""Trace-time argument checks shared by the public ops.

Every failure names the calling op, the argument, what was expected and what
was given, so an error reads on its own without the stack trace.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np


def _fmt_shape(shape: Sequence[object]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def check_float(op: str, name: str, x) -> None:
    """Raise TypeError unless `x` has a floating dtype."""
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{op}: {name} must have a floating dtype, got {dtype}")


def check_int(op: str, name: str, x) -> None:
    """Raise TypeError unless `x` has an integer dtype."""
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{op}: {name} must have an integer dtype, got {dtype}")


def check_dtype(op: str, name: str, x, dtype) -> None:
    """Raise TypeError unless `x` has exactly `dtype`."""
    got = jnp.result_type(x)
    if got != jnp.dtype(dtype):
        raise TypeError(f"{op}: {name} must have dtype {jnp.dtype(dtype)}, got {got}")


def check_same_dtype(op: str, names: Sequence[str], xs: Sequence) -> None:
    """Raise TypeError unless all given arrays share one dtype (None entries are skipped)."""
    pairs = [(n, jnp.result_type(x)) for n, x in zip(names, xs, strict=True) if x is not None]
    if len({d for _, d in pairs}) > 1:
        listing = ", ".join(f"{n}: {d}" for n, d in pairs)
        names = ", ".join(n for n, _ in pairs)
        raise TypeError(f"{op}: {names} must share one dtype, got {listing}")


def check_shape(op: str, name: str, x, expected: Sequence[int | None], layout: str) -> None:
    """Raise ValueError unless `x.shape` matches `expected` (None matches any size).

    `layout` names the axes, e.g. "(batch, length, dim)", and is quoted in the message.
    """
    shape = tuple(np.shape(x))
    ok = len(shape) == len(expected) and all(
        e is None or e == s for e, s in zip(expected, shape, strict=False)
    )
    if not ok:
        # A tuple, not a generator: _fmt_shape's Sequence annotation is checked under
        # the jaxtyping hook, and a generator there would hide this error behind its own.
        want = _fmt_shape(tuple("?" if e is None else e for e in expected))
        raise ValueError(
            f"{op}: {name} must have shape {layout} = {want}, got {_fmt_shape(shape)}"
        )


def check_rank(op: str, name: str, x, ranks: Sequence[int], layout: str) -> None:
    """Raise ValueError unless `x.ndim` is one of `ranks`."""
    if np.ndim(x) not in ranks:
        raise ValueError(
            f"{op}: {name} must have rank {' or '.join(map(str, ranks))} {layout}, "
            f"got shape {_fmt_shape(np.shape(x))}"
        )
