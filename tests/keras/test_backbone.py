"""MambaBackbone: the Keras layer contract, the core's numbers, padding, parameter checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import mamba_ssm_core as core
import numpy as np
import pytest
from mamba_keras import MambaBackbone, MambaResidualBlock
from mamba_ssm_core import ParamsError

from tests.keras.layer_test import run_layer_test
from tests.random_inputs import normal, token_ids

KWARGS = {"vocab_size": 11, "hidden_size": 8, "num_hidden_layers": 2, "state_size": 4,
          "time_step_rank": 2, "seed": 0}


def _ids(length=6):
    return token_ids(0, (2, length), 11)


def test_layer_contract(tmp_path):
    run_layer_test(MambaBackbone, KWARGS, _ids(), (2, 6, 8), tmp_path=tmp_path,
                   expected_num_trainable_weights=2 + 2 * 10)


def test_call_is_the_core_backbone():
    bb = MambaBackbone(**KWARGS)
    ids = _ids()
    out = bb(ids)
    want = core.backbone(bb.to_params(), bb.mamba_config, ids)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
    # the fresh initialisation is the core's init_params for the seed
    want_params = core.init_params(jax.random.key(0), bb.mamba_config)
    jax.tree.map(np.testing.assert_array_equal, bb.to_params(),
                 {"backbone": want_params["backbone"]})


def test_blocks_are_keras_layers_holding_the_core_layers():
    bb = MambaBackbone(**KWARGS)
    bb.build((None, None))
    assert [b.name for b in bb.residual_blocks] == ["residual_block_0", "residual_block_1"]
    assert all(isinstance(b, MambaResidualBlock) for b in bb.residual_blocks)
    stacked = bb.to_params()["backbone"]["layers"]
    for i, block in enumerate(bb.residual_blocks):
        jax.tree.map(lambda s, b, i=i: np.testing.assert_array_equal(s[i], b), stacked,
                     block.to_params())


def test_left_padding_gives_the_unpadded_outputs():
    bb = MambaBackbone(**KWARGS)
    ids = _ids()
    padded = jnp.concatenate([jnp.zeros((2, 3), jnp.int32), ids], axis=1)
    mask = jnp.concatenate([jnp.zeros((2, 3), bool), jnp.ones((2, 6), bool)], axis=1)
    out = bb(padded, padding_mask=mask)
    np.testing.assert_allclose(np.asarray(out[:, 3:]), np.asarray(bb(ids)), rtol=1e-5,
                               atol=1e-5)


def test_cache_continues_the_sequence():
    bb = MambaBackbone(**KWARGS)
    ids = _ids()
    hidden, cache = bb.call_with_cache(ids[:, :4], bb.init_cache(2))
    steps = [hidden]
    # two single-token steps, the second from the first's cache (each compiles anew)
    for t in range(4, 6):
        h, cache = bb.call_with_cache(ids[:, t:t + 1], cache)
        steps.append(h)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, axis=1)), np.asarray(bb(ids)),
                               rtol=1e-4, atol=1e-5)


def test_load_params_lists_every_mismatch():
    bb = MambaBackbone(**KWARGS)
    params = {"backbone": core.init_params(jax.random.key(0), bb.mamba_config)["backbone"]}
    del params["backbone"]["norm_f"]
    params["backbone"]["embeddings"]["weight"] = jnp.zeros((12, 8))
    with pytest.raises(ParamsError) as err:
        bb.load_params(params)
    assert "missing backbone.norm_f.weight" in str(err.value)
    assert "shape mismatch backbone.embeddings.weight: expected (11, 8), got (12, 8)" in str(
        err.value)
    assert not bb.built


def test_to_params_before_build_is_an_error():
    with pytest.raises(ValueError, match="not built yet"):
        MambaBackbone(**KWARGS).to_params()


def test_numpy_bool_padding_masks_are_accepted_like_jax_masks():
    bb = MambaBackbone(**KWARGS)
    bb.build((None, None))
    ids = _ids()
    mask = np.array([[False, True, True, True, True, True], [True] * 6])
    want = core.backbone(bb.to_params(), bb.mamba_config, ids, mask=jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(bb(ids, padding_mask=mask)), np.asarray(want))
    out, _ = bb.call_with_cache(ids, bb.init_cache(2), padding_mask=mask)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
    block = bb.residual_blocks[0]
    hidden = normal(1, (2, 6, 8))
    got = block.call_with_state(hidden, None, block.init_state(2), mask=mask)
    want = core.residual_block(block.to_params(), block.mamba_config, hidden, None,
                               state=block.init_state(2), mask=jnp.asarray(mask))
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_the_weights_mixin_is_abstract():
    from mamba_keras._weights import CoreWeights

    assert CoreWeights.__abstractmethods__ == {"_expected_shapes", "_build_input_shape"}

    class NoShapes(CoreWeights):
        pass

    with pytest.raises(TypeError, match="abstract"):
        NoShapes()
