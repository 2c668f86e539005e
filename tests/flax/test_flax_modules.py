"""mamba-flax beyond the shared suite: NNX conventions, leading batch axes, stacked layers
under nnx.scan, fill-by-path errors, nnx.Cache decoding, generation, checkpoints."""

from __future__ import annotations

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from mamba_flax import MambaLM, MambaMixer, MambaModel, ParamsError, ResidualBlock
from mamba_ssm_core import (
    CheckpointError,
    forward,
    generate,
    init_params,
    layer_params,
    mixer,
    rms_norm,
)
from mamba_ssm_core.params import flatten

from tests.conformance.base import BATCH, CONFIG, LENGTH, core_params, params_at
from tests.oracle import rel_err
from tests.random_inputs import normal, token_ids

MODULES = (MambaMixer, ResidualBlock, MambaModel, MambaLM)


@pytest.fixture(scope="module")
def params():
    return core_params(CONFIG, seed=5)


@pytest.fixture(scope="module")
def lm(params):
    return MambaLM.from_params(CONFIG, params)


def _ids(seed, shape):
    return token_ids(seed, shape, CONFIG.vocab_size)


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_sizes_positional_options_keyword_only_rngs_required(cls):
    sig = inspect.signature(cls.__init__)
    kinds = {n: p.kind for n, p in sig.parameters.items() if n != "self"}
    first = next(iter(kinds))
    assert first == ("hidden_size" if cls in (MambaMixer, ResidualBlock) else "config")
    assert kinds[first] is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert all(k is inspect.Parameter.KEYWORD_ONLY for n, k in kinds.items() if n != first)
    assert sig.parameters["rngs"].default is inspect.Parameter.empty
    assert {"dtype", "param_dtype"} <= set(kinds)


def test_lm_fresh_init_is_exactly_the_core_init():
    lm = MambaLM(CONFIG, rngs=nnx.Rngs(3))
    want = init_params(nnx.Rngs(3).params(), CONFIG)
    jax.tree.map(np.testing.assert_array_equal, lm.to_params(), want)


def test_param_dtype_is_storage_and_dtype_is_compute():
    m = MambaMixer.from_config(CONFIG, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    dtypes = {k: v.dtype for k, v in flatten(m.to_params()).items()}
    assert dtypes.pop("A_log") == dtypes.pop("D") == dtypes.pop("dt_proj.bias") == jnp.float32
    assert set(dtypes.values()) == {jnp.dtype(jnp.bfloat16)}
    x = jnp.ones((BATCH, LENGTH, CONFIG.hidden_size), jnp.float32)
    assert m(x).dtype == jnp.float32  # dtype None: the input's
    m16 = MambaMixer.from_config(CONFIG, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert m16(x).dtype == jnp.bfloat16
    assert {v.dtype for v in jax.tree.leaves(m16.to_params())} == {jnp.dtype(jnp.float32)}


def test_any_leading_axes_equal_the_core_on_the_flattened_batch(params):
    p = params_at("mixer", params)
    m = MambaMixer.from_params(CONFIG, p)
    x = normal(0, (1, BATCH, LENGTH, CONFIG.hidden_size))
    want = mixer(p, CONFIG, x[0])[0]
    np.testing.assert_array_equal(m(x)[0], want)
    assert rel_err(m(x[0, 1]), want[1]) < 1e-6  # no batch axis at all
    lm = MambaLM.from_params(CONFIG, params)
    ids = _ids(1, (BATCH, 1, LENGTH))
    np.testing.assert_array_equal(lm(ids)[:, 0], forward(params, CONFIG, ids[:, 0]))


def test_state_split_merge_and_eval_shape(params):
    lm = MambaLM.from_params(CONFIG, params)
    graphdef, state = nnx.split(lm)
    assert len(jax.tree.leaves(state)) == len(jax.tree.leaves(params))
    assert jax.tree.leaves(nnx.state(lm, nnx.Param)) and not jax.tree.leaves(
        nnx.state(lm, nnx.Cache))
    again = nnx.merge(graphdef, state)
    jax.tree.map(np.testing.assert_array_equal, again.to_params(), params)
    abstract = nnx.eval_shape(lambda: MambaLM(CONFIG, rngs=nnx.Rngs(0)))
    shapes = jax.tree.map(lambda a: (a.shape, a.dtype), nnx.state(abstract))
    assert shapes == jax.tree.map(lambda a: (a.shape, a.dtype), state)


def test_stacked_layers_run_under_nnx_scan(params):
    """A user's own nnx.scan over model.layers gives the model's output."""
    model = MambaModel.from_params(CONFIG, {"backbone": params["backbone"]})
    assert model.layers.mixer.in_proj.kernel.shape[0] == CONFIG.num_hidden_layers
    ids = _ids(2, (BATCH, LENGTH))

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run(carry, block):
        hidden, residual = carry
        return block(hidden, residual)

    x = model.embeddings(ids)
    hidden, residual = run((x, jnp.zeros(x.shape, jnp.float32)), model.layers)
    out = rms_norm(residual + hidden, model.norm_f.scale[...], CONFIG.layer_norm_epsilon)
    assert rel_err(out, model(ids)) < 1e-6
    for i in range(CONFIG.num_hidden_layers):
        jax.tree.map(np.testing.assert_array_equal, model.layer(i).to_params(),
                     layer_params(params, i))


def _top_level_equations(layers: int) -> int:
    config = dataclasses.replace(CONFIG, num_hidden_layers=layers)
    graphdef, state = nnx.split(MambaLM.from_params(config, core_params(config)))
    ids = jnp.zeros((1, 4), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda s, ids: nnx.merge(graphdef, s)(ids))(state, ids)
    return len(jaxpr.jaxpr.eqns)


def test_program_size_does_not_grow_with_depth():
    assert _top_level_equations(1) == _top_level_equations(6)


def test_from_params_names_missing_unexpected_and_misshapen_paths(params):
    p = jax.tree.map(lambda a: a, params_at("mixer", params))
    del p["D"]
    p["extra"] = {"weight": jnp.zeros((3,))}
    p["x_proj"]["weight"] = p["x_proj"]["weight"].T
    with pytest.raises(ParamsError) as err:
        MambaMixer.from_params(CONFIG, p)
    msg = str(err.value)
    assert "missing D: expected shape (32,)" in msg
    assert "unexpected extra.weight" in msg
    assert "shape mismatch x_proj.weight: expected (15, 32), got (32, 15)" in msg
    untied = dataclasses.replace(CONFIG, tie_word_embeddings=False)
    with pytest.raises(ParamsError, match="missing lm_head.weight"):
        MambaLM.from_params(untied, params)


def test_from_pretrained_names_an_unknown_checkpoint_key(tmp_path, params):
    from safetensors.numpy import load_file, save_file

    MambaLM.from_params(CONFIG, params).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["backbone.layers.0.mixer.surprise"] = np.zeros(2, np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected backbone.layers.0.mixer.surprise"):
        MambaLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("tie", [True, False])
def test_save_pretrained_then_from_pretrained_is_exact(tmp_path, tie):
    config = dataclasses.replace(CONFIG, tie_word_embeddings=tie)
    lm = MambaLM.from_params(config, core_params(config, seed=6))
    lm.save_pretrained(tmp_path)
    loaded = MambaLM.from_pretrained(tmp_path)
    assert loaded.config.tie_word_embeddings is tie
    jax.tree.map(np.testing.assert_array_equal, loaded.to_params(), lm.to_params())


def test_mixer_cache_carries_a_batch_with_leading_axes(params):
    m = MambaMixer.from_params(CONFIG, params_at("mixer", params))
    x = normal(3, (2, 3, 7, CONFIG.hidden_size))
    with pytest.raises(ValueError, match="call init_cache"):
        m(x, decode=True)
    m.init_cache((2, 3))
    assert m.conv_state.shape == (2, 3, CONFIG.conv_kernel - 1, CONFIG.intermediate_size)
    assert m.ssm_state.shape == (2, 3, CONFIG.intermediate_size, CONFIG.state_size)
    with pytest.raises(ValueError, match=r"batch shape \(2, 3\).*batch shape \(6,\)"):
        m(x.reshape(6, 7, -1), decode=True)

    @nnx.jit
    def step(m, x):
        return m(x, decode=True)

    pieces = [step(m, x[..., :3, :])] + [step(m, x[..., t:t + 1, :]) for t in range(3, 7)]
    assert rel_err(jnp.concatenate(pieces, axis=-2), m(x)) < 1e-5


def test_decoding_under_nnx_jit_and_nnx_view(params):
    lm = MambaLM.from_params(CONFIG, params)
    ids = _ids(4, (3, 6))
    full = lm(ids)
    lm.init_cache(3)
    decoding = nnx.view(lm, decode=True)
    prefill = nnx.jit(lambda lm, x: lm(x))(decoding, ids[:, :2])
    step = nnx.jit(lambda lm, t: lm.decode_step(t))
    steps = [step(decoding, ids[:, t])[:, None] for t in range(2, 6)]
    assert rel_err(jnp.concatenate([prefill, *steps], axis=1), full) < 1e-4
    assert lm.backbone.layers.mixer.ssm_state.shape == (
        CONFIG.num_hidden_layers, 3, CONFIG.intermediate_size, CONFIG.state_size)


def test_left_padding_mask_leaves_the_sequence_unchanged(lm):
    ids = jnp.asarray([[5, 9, 2, 33, 7]], jnp.int32)
    padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), ids], axis=1)
    mask = jnp.asarray([[0, 0, 0, 1, 1, 1, 1, 1]], jnp.int32)
    assert rel_err(lm(padded, mask=mask)[:, 3:], lm(ids)) < 1e-5


def test_generate_is_the_core_generate(lm, params):
    # leading axes, left padding and sampling, deterministic for a key
    ids = jnp.asarray([[[0, 0, 7, 8], [1, 2, 3, 4]]], jnp.int32)
    mask = jnp.asarray([[[0, 0, 1, 1], [1, 1, 1, 1]]], jnp.int32)
    kwargs = dict(max_new_tokens=5, temperature=0.8, top_k=10, eos_token_id=())
    a = lm.generate(ids, key=jax.random.key(0), mask=mask, **kwargs)
    assert a.tokens.shape == (1, 2, 5) and a.lengths.shape == (1, 2)
    assert a.cache.ssm_state.shape[:3] == (CONFIG.num_hidden_layers, 1, 2)
    want = generate(params, CONFIG, ids[0], key=jax.random.key(0), mask=mask[0], **kwargs)
    np.testing.assert_array_equal(a.tokens[0], want.tokens)
    np.testing.assert_array_equal(a.cache.ssm_state[:, 0], want.cache.ssm_state)
    b = lm.generate(ids, key=jax.random.key(0), mask=mask, **kwargs)
    np.testing.assert_array_equal(a.tokens, b.tokens)
