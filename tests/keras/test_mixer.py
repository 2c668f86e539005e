"""MambaMixer: the Keras layer contract, the core's numbers, masking and decoding state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import keras
import mamba_ssm_core as core
import numpy as np
import pytest
from mamba_keras import MambaMixer

from tests.keras.layer_test import run_layer_test
from tests.oracle import rel_err
from tests.random_inputs import normal

KWARGS = {"hidden_size": 8, "state_size": 4, "time_step_rank": 2, "use_bias": True, "seed": 0}


def _x(batch=2, length=6, hidden=8, seed=0):
    return normal(seed, (batch, length, hidden))


def test_layer_contract(tmp_path):
    run_layer_test(MambaMixer, KWARGS, _x(), (2, 6, 8), tmp_path=tmp_path,
                   expected_num_trainable_weights=11)


def test_call_is_the_core_mixer():
    mixer = MambaMixer(**KWARGS)
    x = _x()
    y = mixer(x)
    want, _ = core.mixer(mixer.to_params(), mixer.mamba_config, x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want))


def test_keras_mask_reaches_the_core():
    """An Embedding(mask_zero=True) before the mixer: its mask is the core's mask."""
    ids = np.array([[0, 0, 3, 5, 2, 7], [4, 1, 6, 2, 2, 3]], np.int32)  # row 0 left-padded
    embed = keras.layers.Embedding(9, 8, mask_zero=True)
    mixer = MambaMixer(**KWARGS)
    x = embed(ids)
    y = mixer(x)
    want, _ = core.mixer(mixer.to_params(), mixer.mamba_config, x, mask=jnp.asarray(ids != 0))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want))
    unmasked, _ = core.mixer(mixer.to_params(), mixer.mamba_config, x)
    assert not np.allclose(np.asarray(y)[0], np.asarray(unmasked)[0])  # the mask mattered
    # the mask passes through to the next layer
    np.testing.assert_array_equal(np.asarray(mixer.compute_mask(x, ids != 0)), ids != 0)


def test_state_continues_the_sequence():
    mixer = MambaMixer(**KWARGS)
    x = _x()
    full = mixer(x)
    y, state = mixer.call_with_state(x[:, :4], mixer.init_state(2))
    steps = [y]
    # two single steps, the second from the first's state (each compiles anew)
    for t in range(4, 6):
        y, state = mixer.call_with_state(x[:, t:t + 1], state)
        steps.append(y)
    assert rel_err(jnp.concatenate(steps, axis=1), full) < 1e-4


def test_defaults_are_the_original_mambas():
    config = MambaMixer(32).mamba_config
    assert (config.state_size, config.expand, config.conv_kernel, config.time_step_rank,
            config.use_bias, config.use_conv_bias) == (16, 2, 4, 2, False, True)


def test_impl_must_be_a_name():
    with pytest.raises(TypeError, match="name of a selective-scan implementation"):
        MambaMixer(8, impl=core.ChunkedScan())


def test_seed_makes_the_initialisation_reproducible():
    # KWARGS's sizes: building compiles the core's init for the config, as the other tests do
    sizes = {k: v for k, v in KWARGS.items() if k != "seed"}
    a, b, c = (MambaMixer(**sizes, seed=3), MambaMixer(**sizes, seed=3),
               MambaMixer(**sizes, seed=4))
    for m in (a, b, c):
        m.build((None, None, 8))
    w = [np.asarray(m.to_params()["in_proj"]["weight"]) for m in (a, b, c)]
    np.testing.assert_array_equal(w[0], w[1])
    assert not np.array_equal(w[0], w[2])


def test_numpy_bool_masks_are_accepted_like_jax_masks():
    mixer = MambaMixer(**KWARGS)
    mixer.build((None, None, 8))
    x = _x()
    mask = np.array([[False, False, True, True, True, True], [True] * 6])
    want, want_state = core.mixer(mixer.to_params(), mixer.mamba_config, x,
                                  state=mixer.init_state(2), mask=jnp.asarray(mask))
    y, state = mixer.call_with_state(x, mixer.init_state(2), mask=mask)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(state.ssm), np.asarray(want_state.ssm))
    np.testing.assert_array_equal(np.asarray(mixer(x, mask=mask)),
                                  np.asarray(mixer(x, mask=jnp.asarray(mask))))


def test_fresh_weights_are_the_cores_one_layer_initialisation():
    mixer = MambaMixer(**KWARGS)
    mixer.build((None, None, 8))
    want = core.init_layer_params(jax.random.key(KWARGS["seed"]), mixer.mamba_config)["mixer"]
    jax.tree.map(np.testing.assert_array_equal, mixer.to_params(), want)
    assert mixer.mamba_config == core.MambaConfig.for_mixer(
        8, state_size=4, time_step_rank=2, use_bias=True)
