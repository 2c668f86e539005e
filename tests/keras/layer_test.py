"""`run_layer_test`: one check of a Keras layer's whole contract, in the style of KerasHub's
`TestCase.run_layer_test`. Every layer test of mamba-keras calls it.

It checks, in order: the config round trip (get_config has every constructor argument,
from_config rebuilds the same config, the class is registered under "mamba_keras");
a symbolic call (shapes and dtypes of the KerasTensors) in a functional model; an eager
call (shapes, dtypes, equal to the compiled predict); one training step with `fit`
(finite loss, every trainable weight moves); mixed precision (outputs in the compute
dtype, weights in the variable dtype, close to float32; a global policy is picked up);
and a `.keras` save and `keras.saving.load_model` round trip (identical outputs).
"""

from __future__ import annotations

import contextlib
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import keras
import numpy as np

from tests.oracle import rel_err

# bfloat16 compute against float32 (tiny layers: about 1e-2)
MIXED_VS_FLOAT32 = 5e-2
COMPILED_VS_EAGER = 1e-6


@contextlib.contextmanager
def keras_numpy_semantics():
    """Keras's own layers and losses broadcast as NumPy does (Dense adds its bias by rank
    promotion), which the tests' rank-promotion setting (conftest.py) refuses. Their
    dtypes pass the tests' strict dtype promotion as they are."""
    with jax.numpy_rank_promotion("allow"):
        yield


def _as_tuple(x: Any) -> tuple[Any, ...]:
    return tuple(x) if isinstance(x, tuple | list) else (x,)


def _functional(layer: keras.layers.Layer, input_data: tuple[np.ndarray, ...]) -> keras.Model:
    inputs = [keras.Input(x.shape[1:], dtype=str(x.dtype)) for x in input_data]
    outputs = layer(*inputs)
    return keras.Model(inputs if len(inputs) > 1 else inputs[0], outputs)


def _predict(model: keras.Model, input_data: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    out = model.predict_on_batch(list(input_data) if len(input_data) > 1 else input_data[0])
    return tuple(np.asarray(o) for o in _as_tuple(out))


def _fresh(init_kwargs: Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """init_kwargs with every layer-valued argument (a backbone) rebuilt, unbuilt, from
    its config, so that each layer made here gets its own; overrides (dtype) reach those
    too."""
    kwargs = {}
    for name, value in init_kwargs.items():
        if isinstance(value, keras.layers.Layer):
            value = type(value).from_config({**value.get_config(), **overrides})
        kwargs[name] = value
    return {**kwargs, **overrides}


def _serialized(value: Any) -> Any:
    if isinstance(value, keras.layers.Layer):
        return keras.saving.serialize_keras_object(value)
    return value


def _json(config: Mapping[str, Any]) -> Any:
    """A config as it reads back from a .keras file (tuples become lists)."""
    return json.loads(json.dumps(config))


def _check_config(cls: type, init_kwargs: Mapping[str, Any]) -> None:
    assert keras.saving.get_registered_name(cls) == f"mamba_keras>{cls.__name__}"
    kwargs = _fresh(init_kwargs)
    layer = cls(**kwargs)
    config = layer.get_config()
    for name, value in kwargs.items():
        assert name in config, f"get_config lacks the constructor argument {name!r}"
        assert config[name] == _serialized(value), (
            f"get_config()[{name!r}] = {config[name]!r} != {value!r}")
        assert getattr(layer, name) is value or getattr(layer, name) == value, (
            f"attribute {name!r} is not the argument")
    assert cls.from_config(config).get_config() == config
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(revived) is cls and revived.get_config() == config


def _check_outputs(outputs: tuple[Any, ...], shapes: Sequence[tuple], dtypes: Sequence[str],
                   what: str) -> None:
    assert len(outputs) == len(shapes), f"{what}: {len(outputs)} outputs, expected {len(shapes)}"
    for out, shape, dtype in zip(outputs, shapes, dtypes, strict=True):
        assert tuple(out.shape) == tuple(shape), f"{what}: shape {tuple(out.shape)} != {shape}"
        assert keras.backend.standardize_dtype(out.dtype) == dtype, (
            f"{what}: dtype {out.dtype} != {dtype}")


def run_layer_test(
    cls: type,
    init_kwargs: Mapping[str, Any],
    input_data: Any,
    expected_output_shape: Any,
    *,
    tmp_path: pathlib.Path,
    expected_output_dtype: str | Sequence[str] = "float32",
    mixed_output_dtype: str | Sequence[str] = "bfloat16",
    expected_num_trainable_weights: int | None = None,
) -> None:
    """Run every check above on `cls(**init_kwargs)`.

    input_data: one array or a tuple of arrays (the positional inputs of `call`).
    expected_output_shape: one shape, or a tuple of shapes for several outputs;
    expected_output_dtype / mixed_output_dtype: the output dtype(s) under the float32
    and the "mixed_bfloat16" policies. init_kwargs should fix the `seed`.
    """
    inputs = tuple(np.asarray(x) for x in _as_tuple(input_data))
    several = isinstance(expected_output_shape[0], tuple | list)
    shapes = tuple(expected_output_shape) if several else (tuple(expected_output_shape),)
    n = len(shapes)
    f32_dtypes = (expected_output_dtype,) * n if isinstance(expected_output_dtype, str) else (
        tuple(expected_output_dtype))
    mixed_dtypes = (mixed_output_dtype,) * n if isinstance(mixed_output_dtype, str) else (
        tuple(mixed_output_dtype))

    # 1. config round trip
    _check_config(cls, init_kwargs)

    # 2. symbolic call in a functional model
    layer = cls(**_fresh(init_kwargs))
    model = _functional(layer, inputs)
    symbolic = _as_tuple(model.outputs)
    _check_outputs(symbolic, [(None, *s[1:]) for s in shapes], f32_dtypes, "symbolic call")
    if expected_num_trainable_weights is not None:
        assert len(layer.trainable_weights) == expected_num_trainable_weights
    paths = [v.path for v in layer.weights]
    assert len(set(paths)) == len(paths), f"duplicate weight paths: {paths}"

    # 3. eager call, and the compiled predict function
    eager = tuple(np.asarray(o) for o in _as_tuple(layer(*inputs)))
    _check_outputs(eager, shapes, f32_dtypes, "eager call")
    for got, want in zip(_predict(model, inputs), eager, strict=True):
        assert rel_err(got, want) <= COMPILED_VS_EAGER, "predict_on_batch differs from eager"

    # 4. one training step with fit
    before = [np.array(v.value) for v in layer.trainable_variables]
    first = model.outputs[0]
    trainer = keras.Model(model.inputs, keras.ops.cast(first, "float32"))
    trainer.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    target = np.ones(eager[0].shape, np.float32)
    with keras_numpy_semantics():
        history = trainer.fit(list(inputs) if len(inputs) > 1 else inputs[0], target,
                              batch_size=len(inputs[0]), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    for v, old in zip(layer.trainable_variables, before, strict=True):
        assert not np.array_equal(np.asarray(v.value), old), f"{v.path} did not train"

    # 5. mixed precision: a per-layer policy, and the global one
    mixed = cls(**_fresh(init_kwargs, dtype="mixed_bfloat16"))
    _functional(mixed, inputs)  # builds it
    mixed.load_params(layer.to_params())
    assert all(keras.backend.standardize_dtype(v.dtype) == "float32" for v in mixed.weights), (
        "mixed_bfloat16: weights must stay float32")
    out_mixed = tuple(_as_tuple(mixed(*inputs)))
    _check_outputs(out_mixed, shapes, mixed_dtypes, "mixed_bfloat16 call")
    # the trained float32 layer's outputs through the predict function compiled in step 3
    # (equal to an eager call within COMPILED_VS_EAGER), not a second eager call's compile
    trained = _predict(model, inputs)
    for got, want in zip(out_mixed, trained, strict=True):
        err = rel_err(np.asarray(got, np.float32), np.asarray(want))
        assert err <= MIXED_VS_FLOAT32, f"mixed_bfloat16 vs float32: relative error {err:.3g}"
    previous = keras.config.dtype_policy()
    try:
        keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
        assert cls(**_fresh(init_kwargs)).dtype_policy.name == "mixed_bfloat16"
    finally:
        keras.mixed_precision.set_dtype_policy(previous)

    # 6. .keras round trip
    path = tmp_path / f"{cls.__name__}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    (revived,) = [x for x in loaded.layers if type(x) is cls]
    assert _json(revived.get_config()) == _json(layer.get_config())
    for a, b in zip(revived.weights, layer.weights, strict=True):
        assert a.name == b.name and np.array_equal(np.asarray(a.value), np.asarray(b.value))
    for got, want in zip(_predict(loaded, inputs), trained, strict=True):
        assert np.array_equal(got, want), ".keras round trip changed the outputs"
