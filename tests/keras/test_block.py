"""MambaResidualBlock: the Keras layer contract, the core's numbers, residual dtypes."""

from __future__ import annotations

import jax.numpy as jnp
import keras
import mamba_ssm_core as core
import numpy as np
from mamba_keras import MambaResidualBlock

from tests.keras.layer_test import run_layer_test
from tests.oracle import rel_err
from tests.random_inputs import normal

KWARGS = {"hidden_size": 8, "state_size": 4, "time_step_rank": 2, "num_hidden_layers": 2,
          "seed": 0}


def _inputs(length=6):
    return normal(0, (2, length, 8), (2, length, 8))


def test_layer_contract(tmp_path):
    # under mixed_bfloat16 the hidden output is bfloat16, the residual stays float32
    run_layer_test(MambaResidualBlock, KWARGS, _inputs(), ((2, 6, 8), (2, 6, 8)),
                   tmp_path=tmp_path, mixed_output_dtype=("bfloat16", "float32"),
                   expected_num_trainable_weights=10)


def test_call_is_the_core_block():
    block = MambaResidualBlock(**KWARGS)
    hidden, residual = _inputs()
    out, res = block(hidden, residual)
    want_out, want_res, _ = core.residual_block(block.to_params(), block.mamba_config, hidden,
                                                residual)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want_out))
    np.testing.assert_array_equal(np.asarray(res), np.asarray(want_res))
    # the first block: no residual yet
    out0, res0 = block(hidden)
    want0, wres0, _ = core.residual_block(block.to_params(), block.mamba_config, hidden, None)
    np.testing.assert_array_equal(np.asarray(out0), np.asarray(want0))
    np.testing.assert_array_equal(np.asarray(res0), np.asarray(wres0))


def test_mixed_precision_keeps_the_float32_residual_exact():
    """Keras would cast every float input to bfloat16; the block casts only hidden."""
    block = MambaResidualBlock(**KWARGS, dtype="mixed_bfloat16")
    hidden, residual = _inputs()
    out, res = block(hidden, residual)
    want_out, want_res, _ = core.residual_block(
        block.to_params(), block.mamba_config, hidden.astype(jnp.bfloat16), residual)
    assert out.dtype == jnp.bfloat16 and res.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(res), np.asarray(want_res))
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want_out, np.float32))


def test_state_continues_the_sequence():
    block = MambaResidualBlock(**KWARGS)
    hidden, residual = _inputs()  # the other tests' shape: eager ops compile once per shape
    full_out, _ = block(hidden, residual)
    out, _, state = block.call_with_state(hidden[:, :4], residual[:, :4], block.init_state(2))
    outs = [out]
    for t in range(4, 6):
        out, _, state = block.call_with_state(hidden[:, t:t + 1], residual[:, t:t + 1], state)
        outs.append(out)
    assert rel_err(jnp.concatenate(outs, axis=1), full_out) < 1e-4


def test_weights_are_named_as_the_core():
    block = MambaResidualBlock(**KWARGS)
    block.build((None, None, 8))
    paths = {v.path for v in block.weights}
    assert {f"{block.name}/norm.weight", f"{block.name}/mixer/in_proj.weight",
            f"{block.name}/mixer/A_log"} <= paths
    assert isinstance(block.mixer, keras.layers.Layer)
