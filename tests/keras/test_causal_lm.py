"""MambaCausalLM: the Keras layer contract, checkpoints, decoding and generation."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import keras
import mamba_ssm_core as core
import numpy as np
import pytest
from mamba_keras import MambaBackbone, MambaCausalLM

from tests.keras.layer_test import keras_numpy_semantics, run_layer_test
from tests.oracle import rel_err
from tests.random_inputs import token_ids

# Building a model compiles the core's init_params for its exact MambaConfig (seconds
# each), so the tests share few configs: BACKBONE is test_backbone.py's KWARGS, CONFIG
# is the config of the LM in test_layer_contract (BACKBONE, untied, two eos ids).
BACKBONE = {"vocab_size": 11, "hidden_size": 8, "num_hidden_layers": 2, "state_size": 4,
            "time_step_rank": 2, "seed": 0}
CONFIG = core.MambaConfig(
    vocab_size=11, hidden_size=8, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=4,
    time_step_rank=2, use_bias=False, use_conv_bias=True, layer_norm_epsilon=1e-5,
    residual_in_fp32=True, tie_word_embeddings=False, eos_token_id=(3, 4), pad_token_id=0)


def _ids(length=6, batch=2):
    return token_ids(0, (batch, length), 11, low=1)


def test_layer_contract(tmp_path):
    # logits are float32 under any policy, as the core computes them
    run_layer_test(MambaCausalLM,
                   {"backbone": MambaBackbone(**BACKBONE), "tie_word_embeddings": False,
                    "eos_token_id": [3, 4], "pad_token_id": 0},
                   _ids(), (2, 6, 11), tmp_path=tmp_path, mixed_output_dtype="float32",
                   expected_num_trainable_weights=3 + 2 * 10)


def test_mamba_config_round_trip_and_core_logits():
    lm = MambaCausalLM.from_mamba_config(CONFIG, seed=1)
    assert lm.mamba_config == CONFIG
    ids = _ids()
    np.testing.assert_array_equal(np.asarray(lm(ids)),
                                  np.asarray(core.forward(lm.to_params(), CONFIG, ids)))
    # the whole model is the core's init_params for the seed, the untied head included
    jax.tree.map(np.testing.assert_array_equal, lm.to_params(),
                 core.init_params(jax.random.key(1), CONFIG))


def test_from_pretrained_and_save_pretrained(tmp_path):
    params = core.init_params(jax.random.key(5), CONFIG)
    core.save_pretrained(CONFIG, params, tmp_path / "in")
    lm = MambaCausalLM.from_pretrained(tmp_path / "in")
    # the core writes rescale_prenorm_residual=false (an initialisation-only flag)
    saved = dataclasses.replace(CONFIG, rescale_prenorm_residual=False)
    assert lm.mamba_config == saved
    jax.tree.map(np.testing.assert_array_equal, lm.to_params(), params)
    ids = _ids()
    np.testing.assert_array_equal(np.asarray(lm(ids)),
                                  np.asarray(core.forward(params, CONFIG, ids)))
    lm.save_pretrained(tmp_path / "out")
    config, again = core.load_pretrained(tmp_path / "out")
    assert config == saved
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_from_pretrained_in_bfloat16(tmp_path):
    params = core.init_params(jax.random.key(5), CONFIG)
    core.save_pretrained(CONFIG, params, tmp_path)
    lm = MambaCausalLM.from_pretrained(tmp_path, dtype="bfloat16")
    dtypes = {v.path.rsplit("/", 1)[-1]: keras.backend.standardize_dtype(v.dtype)
              for v in lm.weights}
    assert dtypes["in_proj.weight"] == "bfloat16" and dtypes["embeddings.weight"] == "bfloat16"
    assert dtypes["A_log"] == dtypes["D"] == dtypes["dt_proj.bias"] == "float32"
    ids = _ids()
    logits = lm(ids)
    assert logits.dtype == jnp.float32
    bf16 = core.cast_params(params, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(core.forward(bf16, CONFIG, ids)))


def test_generate_is_the_cores():
    lm = MambaCausalLM.from_mamba_config(CONFIG, seed=2)
    lm.build((None, None))
    ids = np.asarray(_ids(length=4))
    out = lm.generate(ids, max_new_tokens=5, temperature=0.0)
    want = core.generate(lm.to_params(), CONFIG, ids, max_new_tokens=5, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(want.tokens))
    np.testing.assert_array_equal(np.asarray(out.lengths), np.asarray(want.lengths))
    # sampling: an int seed is jax.random.key(seed)
    a = lm.generate(ids, max_new_tokens=5, seed=7, top_k=4)
    b = core.generate(lm.to_params(), CONFIG, ids, max_new_tokens=5, key=jax.random.key(7),
                      top_k=4)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))


def test_decode_step_follows_call_with_cache():
    lm = MambaCausalLM.from_mamba_config(CONFIG, seed=2)
    ids = _ids(length=6)
    logits, cache = lm.call_with_cache(ids[:, :4], lm.init_cache(2))
    steps = [logits]
    # two steps, the second from the first's cache (each compiles anew)
    for t in range(4, 6):
        step, cache = lm.decode_step(ids[:, t], cache)
        steps.append(step[:, None])
    assert rel_err(jnp.concatenate(steps, axis=1), lm(ids)) < 1e-4


def test_backbone_given_built_gets_a_fresh_head():
    backbone = MambaBackbone(**BACKBONE)
    backbone.build((None, None))
    # CONFIG's token ids: the head's init is then the one a loaded test_layer_contract LM
    # compiles
    lm = MambaCausalLM(backbone, tie_word_embeddings=False, eos_token_id=[3, 4], pad_token_id=0)
    assert lm.mamba_config == CONFIG
    lm.build((None, None))
    head = np.asarray(lm.to_params()["lm_head"]["weight"])
    assert head.shape == (11, 8) and 0 < np.abs(head).max() <= 1 / np.sqrt(8)


def test_trains_with_fit_and_sparse_crossentropy():
    lm = MambaCausalLM.from_mamba_config(dataclasses.replace(CONFIG, tie_word_embeddings=True),
                                         seed=0)
    # count on: each token is the previous one plus 1 (mod the vocabulary)
    ids = (np.arange(8)[:, None] + np.arange(12)[None, :]).astype(np.int32) % 11
    lm.compile(optimizer=keras.optimizers.Adam(5e-2),
               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with keras_numpy_semantics():
        history = lm.fit(ids[:, :-1], ids[:, 1:], batch_size=8, epochs=8, verbose=0)
    losses = history.history["loss"]
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0], losses


def test_backbone_must_be_a_mamba_backbone():
    with pytest.raises(TypeError, match="MambaBackbone"):
        MambaCausalLM(keras.layers.Dense(3))


def test_numpy_bool_padding_masks_are_accepted_like_jax_masks():
    lm = MambaCausalLM.from_mamba_config(CONFIG, seed=3)
    lm.build((None, None))
    ids = _ids()
    mask = np.array([[False, False, True, True, True, True], [True] * 6])
    want = core.forward(lm.to_params(), CONFIG, ids, mask=jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(lm(ids, padding_mask=mask)), np.asarray(want))
    logits, _ = lm.call_with_cache(ids, lm.init_cache(2), padding_mask=mask)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(want))
    out = lm.generate(ids, max_new_tokens=2, temperature=0.0, padding_mask=mask)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(lm.generate(
        ids, max_new_tokens=2, temperature=0.0, padding_mask=jnp.asarray(mask)).tokens))
