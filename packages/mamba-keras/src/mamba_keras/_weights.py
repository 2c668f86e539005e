"""Keras weights named by the core's parameter paths, and the conversion to and from them.

Each layer creates its weights in `build` with `add_weight(name=<dotted core path>)` in
the core's (PyTorch) layouts, so converting is renaming: `to_params()` gives the
core's nested dict, `load_params(params)` puts one in. Weights are never autocast:
the core casts each one to the compute dtype where it is used, and keeps A_log, D,
dt_proj.bias and the norm weights in float32, so a mixed-precision layer computes
exactly what the core computes.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from mamba_ssm_core import MambaConfig, ParamsError, check_shapes, flatten, is_ssm_param, unflatten

from . import _config

Getter = Callable[[Any], Any]
Stacker = Callable[..., Any]


def stack_arrays(*xs: Any) -> Any:
    """The core's stacked layout: one leaf per layer, stacked on a leading axis."""
    return jnp.stack(xs)


class Source:
    """A parameter tree computed on first use, then kept.

    Keras may build a layer while tracing a model (a subclassed model's first `fit`) and
    initialise its variables afterwards; initial values computed in `build` would be
    tracers then, so they are computed when the first variable is initialised. Also a
    plain holder: Keras would wrap a dict attribute of a layer.
    """

    __slots__ = ("_make", "_value")

    def __init__(self, make: Callable[[], Any]):
        self._make = make
        self._value = None

    @classmethod
    def given(cls, value: Any) -> Source:
        return cls(lambda: value)

    def __call__(self) -> Any:
        if self._make is None:
            return self._value
        value = self._make()
        # Keras reads an uninitialised variable inside a trace for its shape only; a
        # value computed there is a tracer, to be computed again outside
        if not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(value)):
            self._value, self._make = value, None
        return value

    def sub(self, pick: Callable[[Any], Any]) -> Source:
        """The part `pick(tree)` of this tree, also computed on first use."""
        return Source(lambda: pick(self()))


def fresh(init: Callable[..., Any], config: MambaConfig, seed: int | None) -> Source:
    """The official initialisation `init(key, config)` (the core's `init_params` or
    `init_layer_params`), its key from `seed` (None: drawn now, see
    `_config.draw_seed`), computed on first use."""
    seed = _config.draw_seed(seed)
    return Source(lambda: init(jax.random.key(seed), config))


class _Given:
    """An initializer returning (a copy of) the leaf `path` of a `Source`, cast to the
    variable's dtype."""

    def __init__(self, source: Source, path: str):
        self.source = source
        self.path = path

    def __call__(self, shape: Any, dtype: Any = None) -> Any:
        value = flatten(self.source())[self.path]
        if tuple(np.shape(value)) != tuple(shape):
            raise ParamsError(f"{self.path}: a value of shape {tuple(np.shape(value))} for a "
                              f"weight of shape {tuple(shape)}")
        # a copy: Keras's compiled functions donate variable buffers, which must not be
        # the caller's arrays
        return jnp.array(value, dtype=dtype, copy=True)


class CoreWeights(abc.ABC):
    """Mixin for the Keras layers of this package (see the module docstring)."""

    def _init_core_weights(self) -> None:
        self._core_vars = {}
        self._pending = None

    # --- for subclasses ------------------------------------------------------------------

    @abc.abstractmethod
    def _expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Dotted path -> shape of every parameter this layer (and its sublayers) holds."""

    @abc.abstractmethod
    def _build_input_shape(self) -> tuple[Any, ...]:
        """The input shape `load_params` builds an unbuilt layer with."""

    def _core_tree(self, get: Getter, stack: Stacker = stack_arrays) -> dict[str, Any]:
        """The parameters in the core's layout, each weight's value read with `get(variable)`;
        `stack` joins the blocks' leaves of a model into one stacked leaf."""
        return unflatten({p: get(v) for p, v in self._core_vars.items()})

    def _take_pending(self) -> Source | None:
        """The parameters left for `build` by `load_params` or a parent layer (None for a
        fresh initialisation)."""
        pending, self._pending = self._pending, None
        return pending

    def _add_core_weight(self, path: str, source: Source, key: str | None = None) -> Any:
        """A weight named `path` (core layout) initialised to the leaf `key` (default:
        `path`) of `source`; A_log, D and dt_proj.bias are float32 whatever the variable
        dtype policy, as in the core."""
        variable = self.add_weight(
            name=path, shape=self._expected_shapes()[key or path],
            initializer=_Given(source, key or path),
            dtype="float32" if is_ssm_param(path) else None, autocast=False)
        self._core_vars[path] = variable
        return variable

    def _set_pending(self, source: Source) -> None:
        self._pending = source

    def _ensure_built(self) -> None:
        """Build (a fresh initialisation) before a method other than `__call__` reads
        the weights."""
        if not self.built:
            self.build(self._build_input_shape())

    # --- public --------------------------------------------------------------------------

    def to_params(self, values: Sequence[Any] | None = None) -> dict[str, Any]:
        """The weights as the core's parameter pytree (`mamba_ssm_core.params` layout).

        values: None for the weights' current values, or arrays aligned with
        `self.trainable_variables` (e.g. the gradients of a `jax.grad` over
        `stateless_call`) to arrange those in the core's layout instead.
        """
        if not self.built:
            raise ValueError(f"{type(self).__name__} {self.name!r} is not built yet: call it "
                             f"or build() it first")
        if values is None:
            return self._core_tree(lambda v: v.value)
        trainable = list(self.trainable_variables)
        if len(values) != len(trainable):
            raise ValueError(f"to_params: {len(values)} values for {len(trainable)} trainable "
                             f"variables")
        by_id = {id(v): x for v, x in zip(trainable, values, strict=True)}

        def get(v: Any) -> Any:
            if id(v) not in by_id:
                raise ValueError(f"to_params: weight {v.path} is not trainable, so `values` "
                                 f"has no entry for it")
            return by_id[id(v)]

        return self._core_tree(get)

    def load_params(self, params: Mapping[str, Any]) -> None:
        """Put the core's parameter pytree for this layer into its weights (cast to the
        variables' dtypes); an unbuilt layer is built with them, without drawing a
        random initialisation first. Raises ParamsError listing every mismatch."""
        check_shapes(params, self._expected_shapes(),
                     where=f"{type(self).__name__}.load_params: the parameters")
        if not self.built:
            self._set_pending(Source.given(params))
            self.build(self._build_input_shape())
            return
        flat = flatten(params)
        # the variables in the core's layout, a tuple (one per block) for a stacked leaf
        for path, variable in flatten(self._core_tree(lambda v: v, lambda *vs: vs)).items():
            if isinstance(variable, tuple):
                for i, v in enumerate(variable):
                    v.assign(jnp.array(flat[path][i], dtype=v.dtype, copy=True))
            else:
                variable.assign(jnp.array(flat[path], dtype=variable.dtype, copy=True))
