"""mamba-keras against the shared conformance suite."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")  # before keras is first imported

import pathlib  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import pytest  # noqa: E402
from mamba_keras import MambaBackbone, MambaCausalLM, MambaMixer, MambaResidualBlock  # noqa: E402
from mamba_ssm_core import MambaConfig  # noqa: E402

from tests.conformance.base import Level, MambaConformanceTests, ToyTask  # noqa: E402

_CLASSES = {"mixer": MambaMixer, "block": MambaResidualBlock, "backbone": MambaBackbone,
            "lm": MambaCausalLM}
_FILE = "model.keras"

# Keras's .keras writer calls np.array on its variables without NumPy 2's copy keyword.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


def _build(level: Level, config: MambaConfig, **kwargs: Any) -> Any:
    obj = _CLASSES[level].from_mamba_config(config, **kwargs)
    return obj


def _input_shape(level: Level, config: MambaConfig) -> tuple[Any, ...]:
    return (None, None, config.hidden_size) if level in ("mixer", "block") else (None, None)


def _args(level: Level, inputs: Any) -> tuple[Any, ...]:
    return tuple(inputs) if level == "block" else (inputs,)


def _functional(level: Level, layer: Any) -> keras.Model:
    """A functional model around a mixer or block layer (models are used as they are)."""
    if level in ("backbone", "lm"):
        return layer
    hidden = layer.hidden_size
    inputs = [keras.Input((None, hidden)) for _ in range(2 if level == "block" else 1)]
    return keras.Model(inputs if level == "block" else inputs[0], layer(*inputs))


class TestKerasConformance(MambaConformanceTests):
    adapter = "keras"

    def from_core(self, level: Level, config: MambaConfig, params: Any, *,
                  compute_dtype: Any = None) -> Any:
        dtype = "float32" if compute_dtype is None else f"mixed_{jnp.dtype(compute_dtype).name}"
        obj = _build(level, config, dtype=dtype)
        obj.load_params(params)
        return obj

    def to_core(self, level: Level, obj: Any) -> Any:
        return obj.to_params()

    def init(self, level: Level, config: MambaConfig, *, seed: int) -> Any:
        obj = _build(level, config, seed=seed)
        obj.build(_input_shape(level, config))
        return obj

    def apply(self, level: Level, obj: Any, inputs: Any) -> Any:
        return obj(*_args(level, inputs))

    def apply_jit(self, level: Level, obj: Any, inputs: Any) -> Any:
        # Keras's compiled predict function (jax.jit under the JAX backend)
        model = _functional(level, obj)
        assert model.jit_compile
        out = model.predict_on_batch(list(inputs) if level == "block" else inputs)
        return tuple(out) if level == "block" else out

    def grads(self, level: Level, obj: Any, inputs: Any, cotangent: Any) -> tuple[Any, Any]:
        # The JAX backend's way: jax.grad over the layer's stateless_call.
        trainable = [v.value for v in obj.trainable_variables]
        non_trainable = [v.value for v in obj.non_trainable_variables]
        float_inputs = level in ("mixer", "block")

        @jax.jit
        def grad(trainable, inputs):
            def loss(trainable, inputs):
                out, _ = obj.stateless_call(trainable, non_trainable, *_args(level, inputs))
                return sum(jnp.sum(o.astype(jnp.float32) * c) for o, c in
                           zip(jax.tree.leaves(out), jax.tree.leaves(cotangent), strict=True))

            if float_inputs:
                return jax.grad(loss, argnums=(0, 1))(trainable, inputs)
            return jax.grad(loss)(trainable, inputs), None

        d_trainable, d_inputs = grad(trainable, inputs)
        return d_inputs, obj.to_params(values=d_trainable)

    def decode(self, lm: MambaCausalLM, input_ids: Any, *, prefill: int) -> Any:
        logits, cache = lm.call_with_cache(input_ids[:, :prefill],
                                           lm.init_cache(input_ids.shape[0]))
        steps = [logits]
        for t in range(prefill, input_ids.shape[1]):
            step, cache = lm.decode_step(input_ids[:, t], cache)
            steps.append(step[:, None])
        return jnp.concatenate(steps, axis=1)

    def from_pretrained(self, path: pathlib.Path) -> Any:
        return MambaCausalLM.from_pretrained(path)

    def save(self, level: Level, obj: Any, directory: pathlib.Path) -> None:
        _functional(level, obj).save(directory / _FILE)

    def load(self, level: Level, config: MambaConfig, directory: pathlib.Path) -> Any:
        model = keras.saving.load_model(directory / _FILE)
        if level in ("backbone", "lm"):
            assert isinstance(model, _CLASSES[level])
            return model
        (layer,) = [x for x in model.layers if isinstance(x, _CLASSES[level])]
        return layer

    def train_toy(self, task: ToyTask) -> Sequence[float]:
        keras.utils.set_random_seed(task.seed)
        ids = keras.Input((None,), dtype="int32")
        x = keras.layers.Embedding(task.vocab_size, task.config.hidden_size)(ids)
        x = keras.layers.Add()([x, MambaMixer.from_mamba_config(task.config)(x)])
        model = keras.Model(ids, keras.layers.Dense(task.vocab_size)(x))
        model.compile(optimizer=keras.optimizers.Adam(task.learning_rate),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        # one full batch per epoch: one Adam step each, the loss of that step reported.
        # Keras's Dense adds its bias by NumPy broadcasting, which the tests' rank
        # promotion setting (conftest.py) refuses.
        with jax.numpy_rank_promotion("allow"):
            history = model.fit(task.inputs, task.targets, batch_size=len(task.inputs),
                                epochs=task.steps, shuffle=False, verbose=0)
        return history.history["loss"]
