"""mamba-equinox beyond the shared suite: Equinox conventions, explicit decoding state,
left padding, checkpoints in the transformers format."""

from __future__ import annotations

import inspect

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mamba_equinox import MambaLM, MambaMixer, MambaModel, MixerState, ResidualBlock
from mamba_ssm_core import forward, generate, layer_params

from tests.conformance.base import CONFIG, core_params, params_at
from tests.oracle import rel_err
from tests.random_inputs import normal, token_ids

MODULES = (MambaMixer, ResidualBlock, MambaModel, MambaLM)


@pytest.fixture(scope="module")
def params():
    return core_params(CONFIG, seed=5)


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_key_is_keyword_only(cls):
    for method in (cls.__init__, cls.__call__):
        key = inspect.signature(method).parameters["key"]
        assert key.kind is inspect.Parameter.KEYWORD_ONLY, f"{cls.__name__}.{method.__name__}"


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_hyperparameters_are_static_and_leaves_are_the_parameters(cls):
    module = cls(CONFIG, key=jax.random.key(0))
    leaves = jax.tree.leaves(module)
    assert all(isinstance(x, jax.Array) for x in leaves)
    # exactly the core's parameters: one leaf per parameter array
    assert len(leaves) == len(jax.tree.leaves(module.to_params()))


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_needs_exactly_one_of_key_and_params(cls):
    with pytest.raises(ValueError, match="exactly one of key="):
        cls(CONFIG)
    with pytest.raises(ValueError, match="exactly one of key="):
        cls(CONFIG, key=jax.random.key(0), params={})


def test_mixer_state_carries_a_sequence_across_calls(params):
    mixer = MambaMixer(CONFIG, params=params_at("mixer", params))
    x = normal(1, (7, CONFIG.hidden_size))
    full = mixer(x)

    @eqx.filter_jit
    def pieces(mixer, x):
        state = mixer.init_state()
        y0, state = mixer(x[:3], state=state)
        ys = [y0]
        for t in range(3, x.shape[0]):
            y, state = mixer(x[t:t + 1], state=state)  # one step: the O(1) update
            ys.append(y)
        return jnp.concatenate(ys), state

    got, state = pieces(mixer, x)
    assert isinstance(state, MixerState)
    assert state.conv.shape == (CONFIG.conv_kernel - 1, CONFIG.intermediate_size)
    assert state.ssm.shape == (CONFIG.intermediate_size, CONFIG.state_size)
    assert rel_err(got, full) < 1e-5


def test_block_state_carries_a_sequence_across_calls(params):
    block = ResidualBlock(CONFIG, params=params_at("block", params))
    hidden, residual = normal(2, (6, CONFIG.hidden_size)), normal(3, (6, CONFIG.hidden_size))
    out, res = block(hidden, residual)
    # two halves of one length: each eager op compiles once per shape
    out_a, res_a, state = block(hidden[:3], residual[:3], state=block.init_state())
    out_b, res_b, _ = block(hidden[3:], residual[3:], state=state)
    assert rel_err(jnp.concatenate([out_a, out_b]), out) < 1e-5
    np.testing.assert_array_equal(jnp.concatenate([res_a, res_b]), res)


def test_layer_unstacks_one_block(params):
    model = MambaModel(CONFIG, params={"backbone": params["backbone"]})
    for i in range(CONFIG.num_hidden_layers):
        got = model.layer(i).to_params()
        jax.tree.map(np.testing.assert_array_equal, got, layer_params(params, i))


def test_left_padding_mask_leaves_the_sequence_unchanged(params):
    lm = MambaLM(CONFIG, params=params)
    ids = jnp.asarray([5, 9, 2, 33, 7], jnp.int32)
    padded = jnp.concatenate([jnp.zeros(3, jnp.int32), ids])
    mask = jnp.asarray([0, 0, 0, 1, 1, 1, 1, 1], jnp.int32)
    got = lm(padded, mask=mask)[3:]
    assert rel_err(got, lm(ids)) < 1e-5


def test_vmapped_lm_is_the_batched_core_forward(params):
    lm = MambaLM(CONFIG, params=params)
    ids = token_ids(3, (3, 6), CONFIG.vocab_size)
    np.testing.assert_array_equal(jax.vmap(lm)(ids), forward(params, CONFIG, ids))


def test_bfloat16_decoding_matches_bfloat16_forward(params):
    lm = MambaLM(CONFIG, params=params, compute_dtype=jnp.bfloat16)
    # a 2-token prefill, then two steps (the second from the first's cache; each eager
    # step compiles anew)
    ids = jnp.asarray([4, 8, 15, 16], jnp.int32)
    cache = lm.init_cache()
    assert cache.conv_state.dtype == jnp.bfloat16 and cache.ssm_state.dtype == jnp.float32
    logits, cache = lm(ids[:2], cache=cache)
    steps = [logits]
    for t in range(2, ids.shape[0]):
        step, cache = lm.decode_step(ids[t], cache)
        steps.append(step[None])
    assert rel_err(jnp.concatenate(steps), lm(ids)) < 2e-2


@pytest.mark.parametrize("tie", [True, False])
def test_save_pretrained_then_from_pretrained_is_exact(tmp_path, tie):
    import dataclasses

    config = dataclasses.replace(CONFIG, tie_word_embeddings=tie)
    lm = MambaLM(config, params=core_params(config, seed=6))
    lm.save_pretrained(tmp_path)
    loaded = MambaLM.from_pretrained(tmp_path)
    assert loaded.config.tie_word_embeddings is tie
    jax.tree.map(np.testing.assert_array_equal, loaded.to_params(), lm.to_params())


def test_generate_one_prompt_is_the_core_generate(params):
    lm = MambaLM(CONFIG, params=params)
    prompt = jnp.asarray([3, 17, 5, 40], jnp.int32)
    out = lm.generate(prompt, max_new_tokens=6, temperature=0.0, eos_token_id=())
    want = generate(params, CONFIG, prompt[None], max_new_tokens=6, temperature=0.0,
                    eos_token_id=())
    assert out.tokens.shape == (6,) and int(out.lengths) == 6
    np.testing.assert_array_equal(out.tokens, want.tokens[0])
    # the unbatched cache continues the sequence: it holds everything but the last token
    logits, _ = lm.decode_step(out.tokens[-1], out.cache)
    full = lm(jnp.concatenate([prompt, out.tokens]))[-1]
    assert rel_err(logits, full) < 1e-4


def test_generate_batch_with_left_padding_and_sampling(params):
    lm = MambaLM(CONFIG, params=params)
    ids = jnp.asarray([[0, 0, 7, 8], [1, 2, 3, 4]], jnp.int32)
    mask = jnp.asarray([[0, 0, 1, 1], [1, 1, 1, 1]], jnp.int32)
    kwargs = dict(max_new_tokens=5, mask=mask, temperature=0.8, top_k=10, eos_token_id=())
    a = lm.generate(ids, key=jax.random.key(0), **kwargs)
    b = lm.generate(ids, key=jax.random.key(0), **kwargs)
    assert a.tokens.shape == (2, 5)
    np.testing.assert_array_equal(a.tokens, b.tokens)  # deterministic for a key
    # the padded row decodes as its unpadded prompt would
    alone = lm.generate(ids[0, 2:], key=jax.random.key(1), max_new_tokens=5,
                        temperature=0.0, eos_token_id=())
    greedy = lm.generate(ids, max_new_tokens=5, mask=mask, temperature=0.0, eos_token_id=())
    np.testing.assert_array_equal(greedy.tokens[0], alone.tokens)
