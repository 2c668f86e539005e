"""The LM's input checks under an enclosing trace (ids closed over as constants)."""

import jax
import jax.numpy as jnp
import numpy as np

import mamba_ssm_core as m
from tests.oracle import rel_err


def test_forward_with_closed_over_ids_matches_ids_as_argument():
    config = m.training.byte_lm_config(hidden_size=32, num_hidden_layers=2)
    params = m.init_params(jax.random.key(1), config)
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 256, (2, 9)), jnp.int32)
    closed = jax.jit(lambda p: m.forward(p, config, ids))(params)
    passed = jax.jit(lambda p, i: m.forward(p, config, i))(params, ids)
    assert closed.shape == (2, 9, config.vocab_size)
    assert rel_err(closed, passed) < 1e-6
    # make_jaxpr stages the forward out without running it; the range check must not trace.
    assert jax.make_jaxpr(lambda p: m.forward(p, config, ids))(params).jaxpr.eqns
