"""Equinox parameter containers filled from the core's parameter pytree, and back.

The mixer keeps its weights in `eqx.nn.Linear`, `eqx.nn.Conv1d`, `eqx.nn.RMSNorm` and
`eqx.nn.Embedding`, laid out as the core (and PyTorch) lays them out: a Linear weight
is (out, in), the depthwise conv weight (I, 1, K). Only the conv bias differs:
Equinox stores it as (I, 1), the core as (I,). Containers are built abstractly
(`eqx.filter_eval_shape`, no random numbers drawn) and their arrays then put in place,
so stacked arrays (a leading layer axis) go in unchanged.

Every module is built either fresh (key=) or around existing core parameters (params=);
`key_or_params` makes that choice the same way for all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax

_KEY = jax.random.key(0)  # only for building abstract containers; no numbers are drawn


def key_or_params(
    op: str, key: Any, params: dict[str, Any] | None, fresh: Callable[[Any], dict[str, Any]]
) -> dict[str, Any]:
    """`params`, or `fresh(key)` (the core's official initialisation); exactly one of key
    and params must be given."""
    if (key is None) == (params is None):
        raise ValueError(f"{op}: give exactly one of key= (fresh) and params= (existing)")
    return fresh(key) if params is None else params


def _fill(abstract: eqx.Module, arrays: dict[str, Any]) -> Any:
    names = list(arrays)
    return eqx.tree_at(lambda m: [getattr(m, n) for n in names], abstract,
                       [arrays[n] for n in names])


def linear(p: dict[str, Any], in_features: int, out_features: int) -> eqx.nn.Linear:
    """An eqx.nn.Linear holding p["weight"] (out, in) and p.get("bias") (out,)."""
    use_bias = "bias" in p
    abstract = eqx.filter_eval_shape(eqx.nn.Linear, in_features, out_features,
                                     use_bias=use_bias, key=_KEY)
    return _fill(abstract, {"weight": p["weight"], **({"bias": p["bias"]} if use_bias else {})})


def linear_params(m: eqx.nn.Linear) -> dict[str, Any]:
    return {"weight": m.weight} if m.bias is None else {"weight": m.weight, "bias": m.bias}


def conv1d(p: dict[str, Any], channels: int, width: int) -> eqx.nn.Conv1d:
    """A depthwise, causally padded eqx.nn.Conv1d holding p["weight"] (I, 1, K) and
    p.get("bias") (I,), stored as Equinox's (I, 1)."""
    use_bias = "bias" in p
    abstract = eqx.filter_eval_shape(
        eqx.nn.Conv1d, channels, channels, width, padding=((width - 1, 0),), groups=channels,
        use_bias=use_bias, key=_KEY)
    arrays = {"weight": p["weight"]}
    if use_bias:
        arrays["bias"] = p["bias"][..., None]
    return _fill(abstract, arrays)


def conv1d_params(m: eqx.nn.Conv1d) -> dict[str, Any]:
    if m.bias is None:
        return {"weight": m.weight}
    return {"weight": m.weight, "bias": m.bias[..., 0]}


def rms_norm(weight: Any, size: int, eps: float) -> eqx.nn.RMSNorm:
    abstract = eqx.filter_eval_shape(eqx.nn.RMSNorm, size, eps=eps, use_bias=False)
    return _fill(abstract, {"weight": weight})


def embedding(weight: Any, vocab_size: int, size: int) -> eqx.nn.Embedding:
    abstract = eqx.filter_eval_shape(eqx.nn.Embedding, vocab_size, size, key=_KEY)
    return _fill(abstract, {"weight": weight})
