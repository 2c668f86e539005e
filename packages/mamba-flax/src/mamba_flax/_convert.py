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
arithmetic is the core's. `CoreModule`, the base of every module of this package, gives
them `from_config`, `from_params`, `to_params` and `set_view` on top of this.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

import jax.numpy as jnp
from flax import nnx
from mamba_ssm_core import (
    MambaConfig,
    ParamsError,
    ScanImplementation,
    check_shapes,
    flatten,
    is_ssm_param,
    unflatten,
)

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
    non-float leaf, named by core path (`mamba_ssm_core.check_shapes`).
    """
    graphdef, state = nnx.split(abstract)
    flat_state = list(nnx.to_flat_state(state))
    for path, var in flat_state:
        if not isinstance(var, nnx.Param):
            raise ParamsError(f"{where}: {'/'.join(map(str, path))} is a "
                              f"{type(var).__name__}, not a parameter; build the module "
                              "without decoding state")
    check_shapes(params, {core_path(path, prefix): core_shape(path, var.shape)
                          for path, var in flat_state}, where=f"{where}: the parameters")
    given_flat = flatten(params)
    filled = [(path, var.replace(swap_layout(path, jnp.asarray(
        given_flat[core_path(path, prefix)])))) for path, var in flat_state]
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


_M = TypeVar("_M", bound="CoreModule")


class CoreModule(nnx.Module):
    """Base of this package's modules: built fresh from a `MambaConfig` or around the
    core's parameters, and read back in the core's layout.

    Subclasses hold `decode` and set `_core_prefix`, the prefix of their core paths.
    """

    _core_prefix: ClassVar[str] = ""

    @classmethod
    def from_config(
        cls: type[_M],
        config: MambaConfig,
        *,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        impl: str | ScanImplementation = "auto",
        decode: bool = False,
        rngs: nnx.Rngs,
    ) -> _M:
        """A fresh module with the sizes of `config` (for a layer: of its layers,
        initialised for its depth); the other arguments as for the constructor."""
        args, options = cls._sizes(config)
        return cls(*args, **options, dtype=dtype, param_dtype=param_dtype, impl=impl,
                   decode=decode, rngs=rngs)

    @classmethod
    def _sizes(cls, config: MambaConfig) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The constructor's size arguments (positional, keyword) for `config`."""
        return (config,), {}

    @classmethod
    def from_params(
        cls: type[_M],
        config: MambaConfig,
        params: Mapping[str, Any],
        *,
        dtype: Any = None,
        impl: str | ScanImplementation = "auto",
        decode: bool = False,
    ) -> _M:
        """A module holding the core's parameters `params` (the pytree `to_params` gives:
        a mixer's dict, a layer's {"norm", "mixer"}, {"backbone": ...}, or the whole LM's),
        stored in their dtype. Built abstractly (`nnx.eval_shape`, no random numbers
        drawn), filled by path and merged. Raises ParamsError naming every missing or
        unexpected path, every shape mismatch and every non-float leaf."""
        param_dtype = storage_dtype(params)
        abstract = nnx.eval_shape(lambda: cls.from_config(
            config, dtype=dtype, param_dtype=param_dtype, impl=impl, decode=decode,
            rngs=nnx.Rngs(0)))
        return fill(abstract, params, cls._core_prefix, cls.__name__)

    def to_params(self) -> dict[str, Any]:
        """The parameters in the core's layout (`mamba_ssm_core.params`): what
        `from_params` takes."""
        return to_params(self, self._core_prefix)

    def set_view(self, decode: bool | None = None) -> None:
        """For `nnx.view`: decode, whether calls continue from the cache by default."""
        if decode is not None:
            self.decode = decode
