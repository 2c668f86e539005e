"""The functional Mamba LM: logits against transformers, the layer pieces, dtypes, init, checks."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_ssm_core import (
    MambaConfig,
    ParamsError,
    abstract_params,
    backbone,
    cast_params,
    decode_step,
    forward,
    init_cache,
    init_layer_params,
    init_params,
    layer_params,
    lm_head,
    load_pretrained,
    param_shapes,
    residual_block,
    rms_norm,
)
from mamba_ssm_core.params import flatten
from tests.core.conftest import init_params_at
from tests.oracle import rel_err

TINY = MambaConfig(vocab_size=50, hidden_size=16, state_size=4, num_hidden_layers=2, expand=2,
                   conv_kernel=4, time_step_rank=3, use_bias=False, use_conv_bias=True,
                   layer_norm_epsilon=1e-5, residual_in_fp32=True, tie_word_embeddings=True)
# TINY's other side, for the tests that want the linear biases, an untied head or a conv
# kernel other than 4: one config for all of them, since init_params compiles once per
# config (seconds each, more than most of these tests' own programs).
VARIANT = dataclasses.replace(TINY, use_bias=True, conv_kernel=3, tie_word_embeddings=False)


# One compiled program per (config, shapes, impl, dtype) instead of eager op-by-op calls.
fwd = jax.jit(forward, static_argnums=(1,), static_argnames=("impl", "dtype"))


def _ids(config, batch, length, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, config.vocab_size, (batch, length)),
                       jnp.int32)


# ---------------------------------------------------------------------------- ground truth


@pytest.mark.torch
@pytest.mark.parametrize("variant", ["small", "odd", "fp16_residual"])
def test_logits_match_transformers(variant):
    from tests.hf_checkpoints import cached_checkpoint, hf_logits

    path, model = cached_checkpoint(variant)
    config, params = load_pretrained(path)
    ids = _ids(config, 3, 13, seed=1)
    ref = hf_logits(model, ids)
    out = fwd(params, config, ids)
    assert out.dtype == jnp.float32 and out.shape == ref.shape
    assert rel_err(out, ref) < 1e-4


@pytest.mark.torch
def test_every_scan_implementation_gives_the_same_logits():
    from tests.hf_checkpoints import cached_checkpoint, hf_logits

    path, model = cached_checkpoint("odd")
    config, params = load_pretrained(path)
    ids = _ids(config, 2, 21, seed=2)
    ref = hf_logits(model, ids)
    for impl in ("reference", "associative", "chunked"):
        out = fwd(params, config, ids, impl=impl)
        assert rel_err(out, ref) < 1e-4, impl


# ---------------------------------------------------------------------------- structure


def test_layer_pieces_compose_to_the_backbone():
    """What an adapter does with the pieces (embedding, residual_block per layer, final
    norm, lm_head) is the model."""
    config = VARIANT  # two layers: the residual stream passes from one block to the next
    params = init_params_at(0, config)
    ids = _ids(config, 2, 7)

    @jax.jit
    def by_pieces(params, ids):
        hidden = params["backbone"]["embeddings"]["weight"][ids]
        residual = None
        for i in range(config.num_hidden_layers):
            hidden, residual, state = residual_block(layer_params(params, i), config, hidden,
                                                     residual)
            assert state is None
        out = rms_norm(residual + hidden, params["backbone"]["norm_f"]["weight"],
                       config.layer_norm_epsilon)
        return out, lm_head(params, config, out)

    @jax.jit
    def whole(params, ids):
        embeds = params["backbone"]["embeddings"]["weight"][ids]
        return (backbone(params, config, ids), forward(params, config, ids),
                forward(params, config, inputs_embeds=embeds))

    hidden, logits = by_pieces(params, ids)
    ref_hidden, ref_logits, from_embeds = whole(params, ids)
    np.testing.assert_allclose(hidden, ref_hidden, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(from_embeds, ref_logits, rtol=1e-6, atol=1e-6)


def test_remat_recomputes_each_layer_without_changing_the_result():
    """backbone(remat=True) wraps the layer body in jax.checkpoint: the forward is the
    same program's result bit for bit, the gradients agree to rounding, and the
    backward pass recomputes the layer (a remat in the jaxpr) instead of storing it."""
    config = VARIANT
    params = init_params_at(4, config)
    ids = _ids(config, 2, 9, seed=3)
    w = jnp.asarray(np.random.default_rng(5).standard_normal((2, 9, config.vocab_size)),
                    jnp.float32)

    def loss(params, remat):
        return jnp.sum(forward(params, config, ids, remat=remat) * w)

    run = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    (l0, g0), (l1, g1) = run(params, False), run(params, True)
    plain = jax.jit(lambda p: forward(p, config, ids))(params)
    rematted = jax.jit(lambda p: forward(p, config, ids, remat=True))(params)
    np.testing.assert_array_equal(np.asarray(rematted), np.asarray(plain))
    assert rel_err(l1, l0) <= 1e-6
    errors = {k: rel_err(flatten(g1)[k], g) for k, g in flatten(g0).items()}
    assert len(errors) == len(flatten(params)) and max(errors.values()) <= 1e-5, errors
    # (the scan implementation may hold checkpoints of its own)
    n_remat = [str(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(params, r)).count("remat")
               for r in (False, True)]
    assert n_remat[1] > n_remat[0], n_remat


def test_compiled_program_does_not_grow_with_depth():
    """The layers run in one lax.scan: 48 layers trace to the same program as 2."""
    def n_eqns(layers):
        config = dataclasses.replace(TINY, num_hidden_layers=layers)
        params = abstract_params(config)
        ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
        jaxpr = jax.make_jaxpr(lambda p, i: forward(p, config, i))(params, ids)
        return len(str(jaxpr).splitlines())

    assert n_eqns(48) == n_eqns(2)


def test_bfloat16_compute_keeps_the_ssm_in_float32():
    config = TINY
    params = init_params_at(1, config)
    ids = _ids(config, 2, 9)
    ref = fwd(params, config, ids)
    logits, cache = jax.jit(lambda p, i, c: forward(p, config, i, dtype=jnp.bfloat16, cache=c))(
        params, ids, init_cache(config, 2, jnp.bfloat16))
    assert logits.dtype == jnp.float32 and cache.ssm_state.dtype == jnp.float32
    assert cache.conv_state.dtype == jnp.bfloat16
    assert rel_err(logits, ref) < 3e-2
    # bfloat16 parameters (A_log, D, dt bias kept float32) compute in bfloat16 by default.
    # init_params(dtype=bfloat16)'s layout by tracing it (its compile costs seconds); its
    # values are the float32 draws cast (test_params checks that), so cast_params here.
    layout = jax.eval_shape(lambda k: init_params(k, config, dtype=jnp.bfloat16),
                            jax.random.key(1))
    bf16 = cast_params(params, jnp.bfloat16)
    assert jax.tree.map(lambda x: x.dtype, bf16) == jax.tree.map(lambda x: x.dtype, layout)
    flat = flatten(layout)
    for path, leaf in flat.items():
        want = jnp.float32 if path.endswith(("A_log", ".D", "dt_proj.bias")) else jnp.bfloat16
        assert leaf.dtype == want, path
    assert rel_err(fwd(bf16, config, ids), ref) < 5e-2


@pytest.mark.parametrize("residual_in_fp32", [True, False])
def test_residual_dtype_follows_the_config(residual_in_fp32):
    config = dataclasses.replace(TINY, residual_in_fp32=residual_in_fp32)
    # Dtypes only: traced (eval_shape), as a compiled call would give them, compiling nothing.
    params = abstract_params(config)
    hidden = jax.ShapeDtypeStruct((1, 3, config.hidden_size), jnp.bfloat16)
    out, residual, _ = jax.eval_shape(
        lambda p, h: residual_block(layer_params(p, 0), config, h, None), params, hidden)
    assert out.dtype == jnp.bfloat16
    assert residual.dtype == (jnp.float32 if residual_in_fp32 else jnp.bfloat16)


# ---------------------------------------------------------------------------- init


def test_init_params_follows_the_official_recipe():
    config = dataclasses.replace(TINY, hidden_size=64, state_size=8, num_hidden_layers=4,
                                 vocab_size=4000, time_step_rank=4, use_bias=True,
                                 tie_word_embeddings=False)
    params = init_params(jax.random.key(3), config)
    flat = {k: np.asarray(v) for k, v in flatten(params).items()}
    assert {k: v.shape for k, v in flat.items()} == param_shapes(config)
    L, H, I, N, K, R = (config.num_hidden_layers, config.hidden_size, config.intermediate_size,
                        config.state_size, config.conv_kernel, config.time_step_rank)
    mixer = "backbone.layers.mixer."
    np.testing.assert_allclose(flat[mixer + "A_log"], np.broadcast_to(np.log(np.arange(1, N + 1)),
                                                                      (L, I, N)), rtol=1e-6)
    np.testing.assert_array_equal(flat[mixer + "D"], 1.0)
    dt = np.log1p(np.exp(flat[mixer + "dt_proj.bias"].astype(np.float64)))
    assert dt.min() >= config.time_step_min * (1 - 1e-4)
    assert dt.max() <= config.time_step_max * (1 + 1e-4)
    assert np.log(dt).std() > 0.5 * (math.log(0.1) - math.log(0.001)) / math.sqrt(12)  # log-uniform
    assert abs(flat["backbone.embeddings.weight"].std() - 0.02) < 0.002
    bound = 1 / math.sqrt(I) / math.sqrt(L)  # kaiming bound, rescaled by 1/sqrt(n_layer)
    out = flat[mixer + "out_proj.weight"]
    assert np.abs(out).max() <= bound and np.abs(out).max() > 0.9 * bound
    assert np.abs(flat[mixer + "in_proj.weight"]).max() <= 1 / math.sqrt(H)
    assert np.abs(flat[mixer + "dt_proj.weight"]).max() <= R**-0.5
    assert np.abs(flat[mixer + "conv1d.bias"]).max() <= 1 / math.sqrt(K)
    for name in ("in_proj.bias", "out_proj.bias"):
        np.testing.assert_array_equal(flat[mixer + name], 0.0)
    np.testing.assert_array_equal(flat["backbone.norm_f.weight"], 1.0)
    assert not np.array_equal(flat["lm_head.weight"], flat["backbone.embeddings.weight"])
    # layers are drawn independently
    assert not np.array_equal(flat[mixer + "in_proj.weight"][0], flat[mixer + "in_proj.weight"][1])


def test_init_floors_dt_and_skips_the_rescale_when_asked():
    config = dataclasses.replace(TINY, time_step_min=1e-6, time_step_max=2e-6,
                                 rescale_prenorm_residual=False, time_step_init_scheme="constant")
    # Every option here acts inside one layer's draw, which init_params vmaps over the
    # layers (test_params: its layers are init_layer_params'): one layer's init_layer_params
    # program compiles in about half the time of the whole model's.
    m = init_layer_params(jax.random.key(4), config)["mixer"]
    dt = np.log1p(np.exp(np.asarray(m["dt_proj"]["bias"], np.float64)))
    np.testing.assert_allclose(dt, config.time_step_floor, rtol=1e-3)
    np.testing.assert_allclose(m["dt_proj"]["weight"], config.time_step_rank**-0.5, rtol=1e-6)
    bound = 1 / math.sqrt(config.intermediate_size)
    assert np.abs(np.asarray(m["out_proj"]["weight"])).max() > bound / math.sqrt(2)


# ---------------------------------------------------------------------------- bad input


def test_bad_params_list_every_problem():
    params = init_params_at(5, TINY)
    layers = params["backbone"]["layers"]
    del layers["mixer"]["D"]
    layers["mixer"]["x_proj"]["weight"] = layers["mixer"]["x_proj"]["weight"][:, :, :-1]
    params["extra"] = {"weight": jnp.zeros(3)}
    with pytest.raises(ParamsError) as info:
        forward(params, TINY, _ids(TINY, 1, 4))
    msg = str(info.value)
    assert "3 problems" in msg
    assert "missing backbone.layers.mixer.D: expected shape (2, 32)" in msg
    assert "shape mismatch backbone.layers.mixer.x_proj.weight: expected (2, 11, 32), got (2, 11, 31)" in msg
    assert "unexpected extra.weight" in msg


def test_backbone_needs_no_head_and_lm_head_names_a_missing_one():
    untied = VARIANT
    assert not untied.tie_word_embeddings
    params = init_params_at(7, untied)
    ids = _ids(untied, 2, 5)
    headless = {"backbone": params["backbone"]}
    run_backbone = jax.jit(backbone, static_argnums=1)
    np.testing.assert_array_equal(run_backbone(headless, untied, ids),
                                  run_backbone(params, untied, ids))
    with pytest.raises(ParamsError, match=r"lm_head: config.tie_word_embeddings is False, so "
                       r"params needs lm_head.weight of shape \(vocab, hidden\) = \(50, 16\); "
                       r"it is missing"):
        fwd(headless, untied, ids)  # (refused while tracing: nothing is compiled)
    bad = {**params, "lm_head": {"weight": params["lm_head"]["weight"][:, :-1]}}
    with pytest.raises(ParamsError, match=r"it is shape \(50, 15\)"):
        lm_head(bad, untied, jnp.ones((2, 16)))


def test_masks_may_be_numpy_bool_or_int():
    params = init_params_at(9, TINY)
    ids = _ids(TINY, 2, 6)
    mask = np.array([[0, 0, 1, 1, 1, 1], [1] * 6], bool)
    cache = init_cache(TINY, 2)

    # One program: the masks are closed over, so forward and decode_step (and their type
    # checks) receive the NumPy arrays themselves, as in an eager call.
    @jax.jit
    def every_kind(params, ids, cache):
        ref = forward(params, TINY, ids, mask=jnp.asarray(mask))
        want, _ = decode_step(params, TINY, ids[:, 0], cache, mask=jnp.asarray(mask[:, 0]))
        return (ref, forward(params, TINY, ids, mask=mask),
                forward(params, TINY, ids, mask=mask.astype(np.int32)),
                want, decode_step(params, TINY, ids[:, 0], cache, mask=mask[:, 0])[0])

    ref, from_bool, from_int, want, got = every_kind(params, ids, cache)
    np.testing.assert_array_equal(from_bool, ref)
    np.testing.assert_array_equal(from_int, ref)
    np.testing.assert_array_equal(got, want)


def test_bad_inputs_are_refused():
    params = init_params_at(6, TINY)
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, vocab_size=50\), got values in \[0, 50\]"):
        forward(params, TINY, jnp.array([[0, 50]], jnp.int32))
    with pytest.raises(Exception, match="input_ids"):
        forward(params, TINY, jnp.zeros((4,), jnp.int32))
    with pytest.raises(TypeError, match="conv_state has dtype float32 but the compute dtype is bfloat16"):
        forward(params, TINY, _ids(TINY, 1, 3), dtype=jnp.bfloat16, cache=init_cache(TINY, 1))
    with pytest.raises(ValueError, match=r"cache.conv_state must have shape .* = \(2, 2, 3, 32\) for this config and batch 2, got \(2, 1, 3, 32\)"):
        forward(params, TINY, _ids(TINY, 2, 3), cache=init_cache(TINY, 1))
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        forward(params, TINY)


# ---------------------------------------------------------------------------- the cache


@pytest.fixture(scope="module")
def full_prefill():
    """VARIANT (conv kernel 3, biases) on 12 random tokens: params, ids, and the full
    forward's logits and cache, both from one program shared by the impl cases."""
    config = VARIANT
    params = init_params_at(7, config)
    ids = _ids(config, 2, 12, seed=3)
    full, (_, prefilled) = jax.jit(lambda p, i: (
        forward(p, config, i), forward(p, config, i, cache=init_cache(config, 2))))(params, ids)
    return params, ids, full, prefilled


@pytest.mark.parametrize("impl", ["auto", "recurrent"])
def test_cached_decoding_equals_the_full_forward(impl, full_prefill):
    """Chunked prefill and decoding (with the decoding ops for "auto", a length-1
    scan otherwise) give the full forward's logits and state."""
    config = VARIANT
    params, ids, full, prefilled = full_prefill

    @jax.jit
    def pieces(params, ids):
        cache = init_cache(config, 2)
        out = []
        # chunked prefill: 5 tokens, then 1, then 3 on the warm cache, then one by one
        for a, b in ((0, 5), (5, 6), (6, 9)):
            logits, cache = forward(params, config, ids[:, a:b], cache=cache, impl=impl)
            out.append(logits)
        for t in range(9, 12):
            logits, cache = decode_step(params, config, ids[:, t], cache, impl=impl)
            out.append(logits[:, None])
        return jnp.concatenate(out, axis=1), cache

    stepped, cache = pieces(params, ids)
    assert rel_err(stepped, full) < 1e-5
    np.testing.assert_allclose(cache.ssm_state, prefilled.ssm_state, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cache.conv_state, prefilled.conv_state, rtol=1e-6, atol=1e-6)


def test_left_padding_leaves_each_row_as_without_it():
    config = VARIANT  # in_proj bias: padding must not feed it
    params = init_params_at(8, config)
    short, long = _ids(config, 1, 3, seed=4), _ids(config, 1, 7, seed=5)
    pad = jnp.full((1, 4), 9, jnp.int32)  # a real token id in the padding
    ids = jnp.concatenate([jnp.concatenate([pad, short], axis=1), long], axis=0)
    mask = jnp.asarray([[0, 0, 0, 0, 1, 1, 1], [1] * 7], bool)

    def run(p, i, m):
        return forward(p, config, i, mask=m, cache=init_cache(config, i.shape[0]))

    logits, cache = jax.jit(run)(params, ids, mask)
    # both rows alone, unpadded, in one program
    refs = jax.jit(lambda p, a, b: [run(p, x, jnp.ones(x.shape, bool)) for x in (a, b)])(
        params, short, long)
    for (row, alone), (ref_logits, ref_cache) in zip(((0, short), (1, long)), refs, strict=True):
        assert ref_logits.shape[1] == alone.shape[1]
        np.testing.assert_allclose(logits[row, -1], ref_logits[0, -1], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(cache.ssm_state[:, row], ref_cache.ssm_state[:, 0],
                                   rtol=1e-5, atol=1e-7)
        # (rounding of the batch-2 and batch-1 matmuls may differ in the last bit)
        np.testing.assert_allclose(cache.conv_state[:, row], ref_cache.conv_state[:, 0],
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["auto", "recurrent"])
def test_decoding_is_constant_work_per_token(impl):
    """decode_step loops over the layers and at most over the one new token: nothing
    scans the past tokens."""
    config = dataclasses.replace(TINY, num_hidden_layers=3)
    params = abstract_params(config)
    cache = jax.eval_shape(lambda: init_cache(config, 2))
    jaxpr = jax.make_jaxpr(lambda p, t, c: decode_step(p, config, t, c, impl=impl))(
        params, jax.ShapeDtypeStruct((2,), jnp.int32), cache)

    def loops(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("scan", "while"):
                yield eqn
            for value in eqn.params.values():
                for sub in value if isinstance(value, tuple | list) else (value,):
                    if hasattr(sub, "eqns"):
                        yield from loops(sub)
                    elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                        yield from loops(sub.jaxpr)

    found = list(loops(jaxpr.jaxpr))
    assert all(e.primitive.name == "scan" for e in found)
    lengths = [e.params["length"] for e in found]
    assert lengths[0] == config.num_hidden_layers and all(n == 1 for n in lengths[1:])
    assert len(lengths) == (1 if impl == "auto" else 2)


@functools.cache
def _warm_tiny_cache():
    """TINY's params and its cache after 5 random tokens, shared by the impl cases below."""
    params = init_params_at(9, TINY)
    _, cache = jax.jit(lambda p, i: forward(p, TINY, i, cache=init_cache(TINY, 2)))(
        params, _ids(TINY, 2, 5))
    return params, cache


@pytest.mark.parametrize("impl", ["auto", "recurrent"])
def test_masked_rows_keep_their_state_while_decoding(impl):
    params, cache = _warm_tiny_cache()
    _, after = jax.jit(lambda p, c: decode_step(p, TINY, jnp.array([3, 4], jnp.int32), c,
                                                mask=jnp.array([True, False]), impl=impl))(
        params, cache)
    np.testing.assert_array_equal(after.ssm_state[:, 1], cache.ssm_state[:, 1])
    np.testing.assert_array_equal(after.conv_state[:, 1], cache.conv_state[:, 1])
    assert not np.array_equal(after.ssm_state[:, 0], cache.ssm_state[:, 0])
