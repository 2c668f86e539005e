"""NNX state <-> the core's parameter pytree, by path.

The modules keep their weights in Flax's own layers, named as the core names them
(`mamba_ssm_core.params`), in Flax's layouts:

    NNX path (under a module)        core path          layout change
    .../<linear>/kernel (in, out)    .../weight         (out, in): the last two axes swapped
    .../conv1d/kernel (K, 1, I)      .../conv1d.weight  (I, 1, K): axes -1 and -3 swapped
    .../<norm>/scale (H,)            .../weight         none
    .../embeddings/embedding (V, H)  .../weight         none
    .../bias, A_log, D               the same names     none

Axes are counted from the end, so a leading layer axis (stacked layers) passes through.
A module's core paths carry its `core_prefix` ("backbone." for `MambaModel`, whose
core parameters are {"backbone": ...}). Everything here moves or renames arrays; the
arithmetic is the core's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx
from mamba_ssm_core import ParamsError
from mamba_ssm_core.params import flatten, is_ssm_param, unflatten

_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def core_path(path: tuple[Any, ...], prefix: str = "") -> str:
    """NNX state path -> the core's dotted path: ("mixer", "in_proj", "kernel") ->
    "mixer.in_proj.weight"."""
    *parents, leaf = (str(p) for p in path)
    return prefix + ".".join([*parents, _LEAF_NAMES.get(leaf, leaf)])


def _swap(path: tuple[Any, ...]) -> tuple[int, int] | None:
    """The two axes that differ between the NNX and the core layout of `path`, or None."""
    if str(path[-1]) != "kernel":
        return None
    return (-3, -1) if len(path) >= 2 and str(path[-2]) == "conv1d" else (-2, -1)


def swap_layout(path: tuple[Any, ...], value: Any) -> Any:
    """The value at NNX `path` in the core's layout, or back (the swap is its own inverse)."""
    axes = _swap(path)
    return value if axes is None else jnp.swapaxes(value, *axes)


def core_shape(path: tuple[Any, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape the core gives the parameter held at NNX `path` with NNX `shape`."""
    axes = _swap(path)
    if axes is None:
        return tuple(shape)
    s = list(shape)
    s[axes[0]], s[axes[1]] = s[axes[1]], s[axes[0]]
    return tuple(s)


def given(value: Any) -> Callable[..., Any]:
    """A Flax initializer that returns `value` (already drawn by the core) as it is."""

    def init(key: Any, shape: Any, dtype: Any = None) -> Any:
        del key, dtype
        if tuple(shape) != tuple(value.shape):
            raise ValueError(f"initializer for shape {tuple(shape)} given an array of shape "
                             f"{tuple(value.shape)}")
        return value

    return init


def to_params(module: nnx.Module, prefix: str = "") -> dict[str, Any]:
    """The module's nnx.Param values in the core's layout, as a nested dict."""
    flat = {}
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        flat[core_path(path, prefix)] = swap_layout(path, var[...])
    return unflatten(flat)


def storage_dtype(params: Mapping[str, Any]) -> Any:
    """The dtype of the first parameter that is not one of the float32 SSM parameters."""
    flat = flatten(params)
    for path, value in flat.items():
        if not is_ssm_param(path):
            return jnp.result_type(value)
    return jnp.result_type(next(iter(flat.values())))


def fill(abstract: nnx.Module, params: Mapping[str, Any], prefix: str, where: str) -> Any:
    """`abstract` (from nnx.eval_shape) with every nnx.Param replaced by the array at its
    core path in `params`, in NNX layout; split, filled by path, merged.

    Raises ParamsError listing every missing path, unexpected path, shape mismatch and
    non-float leaf, named by core path.
    """
    if not isinstance(params, Mapping):
        raise ParamsError(f"{where}: expected the core's nested dict of arrays, got "
                          f"{type(params).__name__}")
    graphdef, state = nnx.split(abstract)
    given_flat = dict(flatten(params))
    problems: list[str] = []
    filled = []
    for path, var in nnx.to_flat_state(state):
        if not isinstance(var, nnx.Param):
            raise ParamsError(f"{where}: {'/'.join(map(str, path))} is a "
                              f"{type(var).__name__}, not a parameter; build the module "
                              "without decoding state")
        name = core_path(path, prefix)
        want = core_shape(path, var.shape)
        if name not in given_flat:
            problems.append(f"missing {name}: expected shape {want}")
            continue
        value = given_flat.pop(name)
        shape = tuple(jnp.shape(value))
        if shape != want:
            problems.append(f"shape mismatch {name}: expected {want}, got {shape}")
        elif not jnp.issubdtype(jnp.result_type(value), jnp.floating):
            problems.append(f"dtype {name}: expected a floating dtype, got "
                            f"{jnp.result_type(value)}")
        else:
            filled.append((path, var.replace(swap_layout(path, jnp.asarray(value)))))
    for name, value in sorted(given_flat.items()):
        problems.append(f"unexpected {name}: shape {tuple(jnp.shape(value))}")
    if problems:
        raise ParamsError(f"{where}: the parameters do not fit the module "
                          f"({len(problems)} problems):\n  " + "\n  ".join(problems))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))
