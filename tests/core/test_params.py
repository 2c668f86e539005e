"""mamba_ssm_core.params: one layer's initialisation, the shape checks, the path helpers.

The whole-model initialisation and `check_params` through `forward` are tested in
test_model.py.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import mamba_ssm_core
import numpy as np
import pytest
from mamba_ssm_core import (
    MambaConfig,
    ParamsError,
    cast_params,
    check_params,
    check_shapes,
    flatten,
    init_layer_params,
    init_params,
    is_ssm_param,
    layer_params,
    layer_shapes,
    param_shapes,
    unflatten,
)

CONFIG = MambaConfig(vocab_size=50, hidden_size=16, state_size=4, num_hidden_layers=3, expand=2,
                     conv_kernel=4, time_step_rank=3, use_bias=True, use_conv_bias=True,
                     layer_norm_epsilon=1e-5, residual_in_fp32=True, tie_word_embeddings=False)
SSM = ("mixer.A_log", "mixer.D", "mixer.dt_proj.bias")


def _layer_keys(key, config):
    # init_params' documented derivation of the layer keys
    return jax.random.split(jax.random.split(key, 3)[1], config.num_hidden_layers)


def _layout(fn, *args, **kw):
    """fn(jax.random.key(0), *args, **kw)'s output shapes and dtypes, by tracing (eval_shape):
    what a compiled call returns, without its compile (seconds per config and dtype)."""
    return jax.eval_shape(lambda k: fn(k, *args, **kw), jax.random.key(0))


def test_init_layer_params_has_the_layout_of_one_layer():
    # (the values: test_init_layer_params_draws_the_layers_of_init_params)
    p = _layout(init_layer_params, CONFIG, dtype=jnp.bfloat16)
    assert set(p) == {"norm", "mixer"}
    flat = flatten(p)
    assert {k: v.shape for k, v in flat.items()} == layer_shapes(CONFIG)
    for path, v in flat.items():
        assert v.dtype == (jnp.float32 if path in SSM else jnp.bfloat16), path
    p16 = _layout(init_layer_params, CONFIG, ssm_dtype=jnp.float16)
    assert {v.dtype for k, v in flatten(p16).items() if k in SSM} == {jnp.dtype(jnp.float16)}
    # the same shapes as a layer of the whole model
    model_layer = _layout(lambda k: layer_params(init_params(k, CONFIG), 0))
    assert jax.tree.map(jnp.shape, model_layer) == jax.tree.map(jnp.shape, p)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_init_layer_params_draws_the_layers_of_init_params(dtype):
    key = jax.random.key(7)
    model = init_params(key, CONFIG, dtype=dtype)
    # every leaf drawn in float32 and then cast (test_model's bfloat16 test relies on it)
    drawn = cast_params(init_params(key, CONFIG), dtype)
    for i, k in enumerate(_layer_keys(key, CONFIG)):
        want = flatten(layer_params(model, i))
        got = flatten(init_layer_params(k, CONFIG, dtype=dtype))
        cast = flatten(layer_params(drawn, i))
        assert set(got) == set(want) == set(cast)
        for path in want:
            assert got[path].dtype == want[path].dtype == cast[path].dtype, path
            np.testing.assert_array_equal(np.asarray(got[path], np.float32),
                                          np.asarray(want[path], np.float32), err_msg=path)
            np.testing.assert_array_equal(np.asarray(cast[path], np.float32),
                                          np.asarray(want[path], np.float32), err_msg=path)
    for path, leaf in flatten(model).items():  # the embedding and final norm too
        np.testing.assert_array_equal(np.asarray(leaf, np.float32),
                                      np.asarray(flatten(drawn)[path], np.float32), err_msg=path)


def test_init_layer_params_follows_the_official_recipe():
    config = dataclasses.replace(CONFIG, hidden_size=64, state_size=8, time_step_rank=4,
                                 num_hidden_layers=4)
    flat = {k: np.asarray(v) for k, v in flatten(
        init_layer_params(jax.random.key(3), config)).items()}
    H, I, N, K, R, L = (config.hidden_size, config.intermediate_size,  # noqa: E741
                        config.state_size, config.conv_kernel, config.time_step_rank,
                        config.num_hidden_layers)
    np.testing.assert_array_equal(flat["norm.weight"], 1.0)
    np.testing.assert_allclose(flat["mixer.A_log"],
                               np.broadcast_to(np.log(np.arange(1, N + 1)), (I, N)), rtol=1e-6)
    np.testing.assert_array_equal(flat["mixer.D"], 1.0)
    dt = np.log1p(np.exp(flat["mixer.dt_proj.bias"].astype(np.float64)))
    assert config.time_step_min * (1 - 1e-4) <= dt.min() and dt.max() <= config.time_step_max * (
        1 + 1e-4)
    for name, bound in [("in_proj.weight", 1 / math.sqrt(H)), ("x_proj.weight", 1 / math.sqrt(I)),
                        ("conv1d.weight", 1 / math.sqrt(K)), ("conv1d.bias", 1 / math.sqrt(K)),
                        ("dt_proj.weight", R**-0.5),
                        ("out_proj.weight", 1 / math.sqrt(I) / math.sqrt(L))]:
        w = np.abs(flat["mixer." + name])
        assert 0.9 * bound < w.max() <= bound, name
    for name in ("in_proj.bias", "out_proj.bias"):
        np.testing.assert_array_equal(flat["mixer." + name], 0.0)
    # a different key draws different weights
    other = flatten(init_layer_params(jax.random.key(4), config))
    assert not np.array_equal(other["mixer.in_proj.weight"], flat["mixer.in_proj.weight"])


def test_init_layer_params_for_a_standalone_mixer_needs_no_vocabulary():
    config = MambaConfig.for_mixer(24, use_bias=False, use_conv_bias=False)
    flat = flatten(init_layer_params(jax.random.key(0), config))
    assert {k: v.shape for k, v in flat.items()} == layer_shapes(config)
    assert "mixer.in_proj.bias" not in flat and "mixer.conv1d.bias" not in flat
    # one layer, no rescale by depth
    bound = 1 / math.sqrt(config.intermediate_size)
    assert np.abs(np.asarray(flat["mixer.out_proj.weight"])).max() > 0.9 * bound


def test_check_params_without_the_head_takes_a_backbone():
    params = init_params(jax.random.key(1), CONFIG)
    backbone_only = {"backbone": params["backbone"]}
    with pytest.raises(ParamsError, match="missing lm_head.weight"):
        check_params(backbone_only, CONFIG)
    check_params(backbone_only, CONFIG, head=False)
    check_params(params, CONFIG, head=False)  # a head, when given, is allowed...
    bad = {**params, "lm_head": {"weight": params["lm_head"]["weight"][:, :-1]}}
    with pytest.raises(ParamsError, match=r"shape mismatch lm_head.weight: expected \(50, 16\)"):
        check_params(bad, CONFIG, head=False)  # ...and checked
    tied = dataclasses.replace(CONFIG, tie_word_embeddings=True)
    with pytest.raises(ParamsError, match="unexpected lm_head.weight"):
        check_params(params, tied, head=False)
    del backbone_only["backbone"]["norm_f"]
    with pytest.raises(ParamsError, match="missing backbone.norm_f.weight"):
        check_params(backbone_only, CONFIG, head=False)


def test_check_shapes_lists_every_problem_with_its_path():
    shapes = {"mixer.D": (4,), "mixer.A_log": (4, 2), "norm.weight": (3,)}
    params = unflatten({"mixer.D": jnp.zeros((5,)), "mixer.A_log": jnp.zeros((4, 2), jnp.int32),
                        "extra": jnp.zeros(())})
    with pytest.raises(ParamsError) as info:
        check_shapes(params, shapes, where="my layer")
    msg = str(info.value)
    assert msg.startswith("my layer do not fit (4 problems)")
    assert "missing norm.weight: expected shape (3,)" in msg
    assert "unexpected extra: shape ()" in msg
    assert "shape mismatch mixer.D: expected (4,), got (5,)" in msg
    assert "dtype mixer.A_log: expected a floating dtype, got int32" in msg
    check_shapes(unflatten({"mixer.D": jnp.zeros(4), "mixer.A_log": jnp.zeros((4, 2))}),
                 shapes, optional=("norm.weight",))
    with pytest.raises(ParamsError, match="expected a nested dict of arrays, got list"):
        check_shapes([], shapes)


def test_path_helpers():
    assert all(is_ssm_param(p) for p in (
        "backbone.layers.mixer.A_log", "mixer.D", "D", "dt_proj.bias", "mixer.dt_proj.bias"))
    assert not any(is_ssm_param(p) for p in (
        "mixer.dt_proj.weight", "mixer.in_proj.bias", "norm.weight", "lm_head.weight"))
    shapes = param_shapes(CONFIG)
    layer = layer_shapes(CONFIG)
    assert {p: (CONFIG.num_hidden_layers, *s) for p, s in layer.items()} == {
        p[len("backbone.layers."):]: s for p, s in shapes.items()
        if p.startswith("backbone.layers.")}
    tree = {"a": {"b": 1, "c": {"d": 2}}, "e": 3}
    assert flatten(tree) == {"a.b": 1, "a.c.d": 2, "e": 3}
    assert unflatten(flatten(tree)) == tree


def test_public_names_are_exported():
    for name in ("init_layer_params", "check_shapes", "layer_shapes", "is_ssm_param", "flatten",
                 "unflatten"):
        assert name in mamba_ssm_core.__all__
        assert getattr(mamba_ssm_core, name) is getattr(mamba_ssm_core.params, name)
    assert set(mamba_ssm_core.params.__all__) <= set(dir(mamba_ssm_core.params))
