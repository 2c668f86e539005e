"""mamba-equinox against the shared conformance suite."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from mamba_equinox import MambaLM, MambaMixer, MambaModel, ResidualBlock
from mamba_ssm_core import MambaConfig

from tests.conformance.base import Level, MambaConformanceTests, ToyTask

_CLASSES = {"mixer": MambaMixer, "block": ResidualBlock, "backbone": MambaModel, "lm": MambaLM}
_FILE = "model.eqx"


def _call(level: Level, module: Any, inputs: Any) -> Any:
    """The Equinox way: the module takes one example, vmap over the batch."""
    if level == "block":
        return jax.vmap(module)(*inputs)
    return jax.vmap(module)(inputs)


@eqx.filter_jit
def _call_jit(level: Level, module: Any, inputs: Any) -> Any:
    return _call(level, module, inputs)


@eqx.filter_jit
@eqx.filter_grad
def _grad(diff: tuple[Any, Any], level: Level, cotangent: Any) -> jax.Array:
    module, inputs = diff
    out = _call(level, module, inputs)
    return sum(jnp.sum(o.astype(jnp.float32) * c)
               for o, c in zip(jax.tree.leaves(out), jax.tree.leaves(cotangent), strict=True))


class _ToyModel(eqx.Module):
    embed: eqx.nn.Embedding
    mixer: MambaMixer
    head: eqx.nn.Linear

    def __init__(self, config: MambaConfig, vocab_size: int, *, key: jax.Array):
        k_embed, k_mixer, k_head = jax.random.split(key, 3)
        self.embed = eqx.nn.Embedding(vocab_size, config.hidden_size, key=k_embed)
        self.mixer = MambaMixer(config, key=k_mixer)
        self.head = eqx.nn.Linear(config.hidden_size, vocab_size, key=k_head)

    def __call__(self, ids: jax.Array) -> jax.Array:
        x = jax.vmap(self.embed)(ids)
        x = x + self.mixer(x)
        return jax.vmap(self.head)(x)


class TestEquinoxConformance(MambaConformanceTests):
    adapter = "equinox"

    def from_core(self, level: Level, config: MambaConfig, params: Any, *,
                  compute_dtype: Any = None) -> Any:
        return _CLASSES[level](config, params=params, compute_dtype=compute_dtype)

    def to_core(self, level: Level, obj: Any) -> Any:
        return obj.to_params()

    def init(self, level: Level, config: MambaConfig, *, seed: int) -> Any:
        return _CLASSES[level](config, key=jax.random.key(seed))

    def apply(self, level: Level, obj: Any, inputs: Any) -> Any:
        return _call(level, obj, inputs)

    def apply_jit(self, level: Level, obj: Any, inputs: Any) -> Any:
        return _call_jit(level, obj, inputs)

    def grads(self, level: Level, obj: Any, inputs: Any, cotangent: Any) -> tuple[Any, Any]:
        d_module, d_inputs = _grad((obj, inputs), level, cotangent)
        return d_inputs, d_module.to_params()

    def decode(self, lm: MambaLM, input_ids: Any, *, prefill: int) -> Any:
        def one(ids: jax.Array) -> jax.Array:
            logits, cache = lm(ids[:prefill], cache=lm.init_cache())
            steps = [logits]
            for t in range(prefill, ids.shape[0]):
                step, cache = lm.decode_step(ids[t], cache)
                steps.append(step[None])
            return jnp.concatenate(steps, axis=0)

        return jax.vmap(one)(input_ids)

    def from_pretrained(self, path: pathlib.Path) -> Any:
        return MambaLM.from_pretrained(path)

    def save(self, level: Level, obj: Any, directory: pathlib.Path) -> None:
        eqx.tree_serialise_leaves(directory / _FILE, obj)

    def load(self, level: Level, config: MambaConfig, directory: pathlib.Path) -> Any:
        like = eqx.filter_eval_shape(_CLASSES[level], config, key=jax.random.key(0))
        return eqx.tree_deserialise_leaves(directory / _FILE, like)

    def train_toy(self, task: ToyTask) -> Sequence[float]:
        model = _ToyModel(task.config, task.vocab_size, key=jax.random.key(task.seed))
        optimiser = optax.adam(task.learning_rate)
        opt_state = optimiser.init(eqx.filter(model, eqx.is_inexact_array))
        inputs, targets = jnp.asarray(task.inputs), jnp.asarray(task.targets)

        @eqx.filter_value_and_grad
        def loss_fn(model: _ToyModel) -> jax.Array:
            logits = jax.vmap(model)(inputs)
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

        @eqx.filter_jit
        def step(model, opt_state):
            loss, grads = loss_fn(model)
            # optax mixes Python floats with int32 step counts, which the tests' strict
            # dtype promotion refuses
            with jax.numpy_dtype_promotion("standard"):
                updates, opt_state = optimiser.update(grads, opt_state, model)
            return eqx.apply_updates(model, updates), opt_state, loss

        losses = []
        for _ in range(task.steps):
            model, opt_state, loss = step(model, opt_state)
            losses.append(float(loss))
        return losses
