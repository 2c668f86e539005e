"""The recurrent scan implementation against the float64 oracle and the reference's gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_ssm_core import RecurrentScan, implementations, selective_scan
from tests import oracle


def _inputs(rng, batch, length, dim, state, groups=None, dtype=np.float32):
    shape_bc = (batch, length, state) if groups is None else (batch, length, groups, state)
    f = lambda *s: jnp.asarray(rng.normal(size=s), dtype)  # noqa: E731
    return dict(
        u=f(batch, length, dim), delta=f(batch, length, dim) - 1.0,
        A=-jnp.exp(jnp.asarray(rng.normal(size=(dim, state)), jnp.float32)),
        B=f(*shape_bc), C=f(*shape_bc), D=jnp.asarray(rng.normal(size=dim), jnp.float32),
        z=f(batch, length, dim), delta_bias=jnp.asarray(rng.normal(size=dim), jnp.float32),
    )


def _oracle(kw, **extra):
    as64 = {k: np.asarray(v, np.float64) for k, v in kw.items()}
    return oracle.selective_scan(**as64, delta_softplus=True, **extra)


def test_registered_without_auto_priority():
    assert "recurrent" in implementations()
    with pytest.raises(ValueError, match="unroll"):
        RecurrentScan(unroll=0)


@pytest.mark.parametrize("groups", [None, 1, 3])
@pytest.mark.parametrize("unroll", [1, 3])
def test_matches_the_oracle(groups, unroll):
    kw = _inputs(np.random.default_rng(0), 2, 11, 6, 4, groups)
    h0 = jnp.asarray(np.random.default_rng(1).normal(size=(2, 6, 4)), jnp.float32)
    seg = jnp.asarray([[0] * 5 + [1] * 6, [0] * 11], jnp.int32)
    run = jax.jit(lambda kw, h0, seg: selective_scan(
        **kw, delta_softplus=True, initial_state=h0, segment_ids=seg, return_final_state=True,
        impl=RecurrentScan(unroll=unroll)))
    y, h = run(kw, h0, seg)
    y_ref, h_ref = _oracle(kw, initial_state=np.asarray(h0, np.float64), segment_ids=np.asarray(seg))
    assert oracle.rel_err(y, y_ref) < 1e-5 and oracle.rel_err(h, h_ref) < 1e-5
    assert y.dtype == jnp.float32 and h.dtype == jnp.float32


def test_bfloat16_inputs_compute_in_float32():
    kw = _inputs(np.random.default_rng(2), 1, 9, 8, 3, dtype=jnp.bfloat16)
    y, h = selective_scan(**kw, delta_softplus=True, return_final_state=True, impl="recurrent")
    y_ref, h_ref = _oracle(kw)
    assert y.dtype == jnp.bfloat16 and h.dtype == jnp.float32
    assert oracle.rel_err(h, h_ref) < 1e-5 and oracle.rel_err(y, y_ref) < 1e-2


def test_gradients_equal_the_reference():
    kw = _inputs(np.random.default_rng(3), 2, 7, 4, 3, groups=2)

    def loss(kw, impl):
        y, h = selective_scan(**kw, delta_softplus=True, return_final_state=True, impl=impl)
        return jnp.sum(y * jnp.cos(y)) + jnp.sum(h**2)

    g = jax.jit(jax.grad(loss), static_argnums=1)
    ours, ref = g(kw, "recurrent"), g(kw, "reference")
    for name in kw:
        np.testing.assert_allclose(ours[name], ref[name], rtol=2e-4, atol=1e-5, err_msg=name)
