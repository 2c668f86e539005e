"""mamba-flax against the shared conformance suite."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from flax import nnx
from mamba_flax import MambaLM, MambaMixer, MambaModel, ResidualBlock
from mamba_ssm_core import MambaConfig

from tests.conformance.base import FLOAT_INPUT_LEVELS, Level, MambaConformanceTests, ToyTask

_CLASSES = {"mixer": MambaMixer, "block": ResidualBlock, "backbone": MambaModel, "lm": MambaLM}
_CHECKPOINT = "state"


def _call(level: Level, module: Any, inputs: Any) -> Any:
    """The NNX way: the module takes the batch as it is."""
    if level == "block":
        return module(*inputs)
    return module(inputs)


@nnx.jit(static_argnames="level")
def _call_jit(module: Any, inputs: Any, *, level: Level) -> Any:
    return _call(level, module, inputs)


def _dot(out: Any, cotangent: Any) -> jax.Array:
    return sum(jnp.sum(o.astype(jnp.float32) * c)
               for o, c in zip(jax.tree.leaves(out), jax.tree.leaves(cotangent), strict=True))


@nnx.jit(static_argnames="level")
def _grads(module: Any, inputs: Any, cotangent: Any, *, level: Level) -> tuple[Any, Any]:
    def loss(module: Any, inputs: Any) -> jax.Array:
        return _dot(_call(level, module, inputs), cotangent)

    if level in FLOAT_INPUT_LEVELS:
        return nnx.grad(loss, argnums=(0, 1))(module, inputs)
    return nnx.grad(loss)(module, inputs), None


class _ToyModel(nnx.Module):
    """A user's own NNX model with the Mamba mixer dropped in."""

    def __init__(self, config: MambaConfig, vocab_size: int, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab_size, config.hidden_size, rngs=rngs)
        self.mixer = MambaMixer.from_config(config, rngs=rngs)
        self.head = nnx.Linear(config.hidden_size, vocab_size, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        x = self.embed(ids)
        return self.head(x + self.mixer(x))


class TestFlaxConformance(MambaConformanceTests):
    adapter = "flax"

    def from_core(self, level: Level, config: MambaConfig, params: Any, *,
                  compute_dtype: Any = None) -> Any:
        return _CLASSES[level].from_params(config, params, dtype=compute_dtype)

    def to_core(self, level: Level, obj: Any) -> Any:
        return obj.to_params()

    def init(self, level: Level, config: MambaConfig, *, seed: int) -> Any:
        return _CLASSES[level].from_config(config, rngs=nnx.Rngs(seed))

    def apply(self, level: Level, obj: Any, inputs: Any) -> Any:
        return _call(level, obj, inputs)

    def apply_jit(self, level: Level, obj: Any, inputs: Any) -> Any:
        return _call_jit(obj, inputs, level=level)

    def grads(self, level: Level, obj: Any, inputs: Any, cotangent: Any) -> tuple[Any, Any]:
        d_module, d_inputs = _grads(obj, inputs, cotangent, level=level)
        # the gradients have the module's structure: merged into it, they read as parameters
        return d_inputs, nnx.merge(nnx.graphdef(obj), d_module).to_params()

    def decode(self, lm: MambaLM, input_ids: Any, *, prefill: int) -> Any:
        lm.init_cache(input_ids.shape[:1])
        steps = [lm(input_ids[:, :prefill], decode=True)]
        for t in range(prefill, input_ids.shape[1]):
            steps.append(lm.decode_step(input_ids[:, t])[:, None])
        return jnp.concatenate(steps, axis=1)

    def from_pretrained(self, path: pathlib.Path) -> Any:
        return MambaLM.from_pretrained(path)

    def save(self, level: Level, obj: Any, directory: pathlib.Path) -> None:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(directory.resolve() / _CHECKPOINT, nnx.state(obj, nnx.Param))
        checkpointer.wait_until_finished()

    def load(self, level: Level, config: MambaConfig, directory: pathlib.Path) -> Any:
        abstract = nnx.eval_shape(lambda: _CLASSES[level].from_config(config, rngs=nnx.Rngs(0)))
        graphdef, abstract_state = nnx.split(abstract)
        state = ocp.StandardCheckpointer().restore(directory.resolve() / _CHECKPOINT,
                                                   abstract_state)
        return nnx.merge(graphdef, state)

    def train_toy(self, task: ToyTask) -> Sequence[float]:
        model = _ToyModel(task.config, task.vocab_size, rngs=nnx.Rngs(task.seed))
        optimizer = nnx.Optimizer(model, optax.adam(task.learning_rate), wrt=nnx.Param)
        inputs, targets = jnp.asarray(task.inputs), jnp.asarray(task.targets)

        @nnx.jit
        def step(model: _ToyModel, optimizer: nnx.Optimizer) -> jax.Array:
            def loss_fn(model: _ToyModel) -> jax.Array:
                logits = model(inputs)
                return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

            loss, grads = nnx.value_and_grad(loss_fn)(model)
            # optax mixes Python floats with int32 step counts, which the tests' strict
            # dtype promotion refuses
            with jax.numpy_dtype_promotion("standard"):
                optimizer.update(model, grads)
            return loss

        return [float(step(model, optimizer)) for _ in range(task.steps)]
