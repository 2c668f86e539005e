"""causal_conv1d and causal_conv1d_update against the float64 NumPy oracle.

Outputs and final conv states on hypothesis-drawn shapes, half-precision inputs,
decoding step by step (and after a prefill) equal to the full sequence, gradients
by float64 finite differences, jit/vmap, and the refusal of bad input.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from mamba_ssm_core import causal_conv1d, causal_conv1d_update
from tests import oracle
from tests.core.conftest import CORE_SETTINGS, raises_about, unhooked

TOL = 1e-5


def conv_inputs(rng, batch, length, dim, width, *, bias=True, initial_state=True):
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)
    return dict(
        x=f32(batch, length, dim),
        weight=f32(dim, width),
        bias=f32(dim) if bias else None,
        initial_state=f32(batch, width - 1, dim) if initial_state else None,
    )


def _jnp(kwargs, dtype=None):
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, np.ndarray):
            v = jnp.asarray(v)
            if dtype is not None and k in ("x", "initial_state"):
                v = v.astype(dtype)
        out[k] = v
    return out


def _np64(kwargs):
    return {k: None if v is None else np.asarray(v, np.float64) for k, v in kwargs.items()}


conv = jax.jit(lambda kw, activation: causal_conv1d(**kw, activation=activation,
                                                    return_final_state=True),
               static_argnums=1)
conv_step = jax.jit(causal_conv1d_update, static_argnames="activation")


@CORE_SETTINGS
@given(
    batch=st.integers(1, 2),
    length=st.one_of(st.sampled_from([1, 2, 3, 5, 17]), st.integers(1, 40)),
    dim=st.integers(1, 5),
    width=st.integers(1, 4),
    bias=st.booleans(),
    initial_state=st.booleans(),
    activation=st.sampled_from([None, "silu", "swish"]),
    seed=st.integers(0, 2**32 - 1),
)
# A sequence shorter than width - 1: the final state still holds width - 1 inputs,
# the older ones from the initial state.
@example(batch=2, length=1, dim=3, width=4, bias=True, initial_state=True, activation="silu",
         seed=0)
def test_matches_oracle(batch, length, dim, width, bias, initial_state, activation, seed):
    kwargs = conv_inputs(np.random.default_rng(seed), batch, length, dim, width, bias=bias,
                         initial_state=initial_state)
    ref_y, ref_state = oracle.causal_conv1d(**kwargs, activation=activation)
    y, state = conv(_jnp(kwargs), activation)
    assert y.shape == ref_y.shape and y.dtype == jnp.float32
    assert state.shape == ref_state.shape and state.dtype == jnp.float32
    assert oracle.rel_err(y, ref_y) < TOL
    np.testing.assert_array_equal(np.asarray(state, np.float64), ref_state)  # copied inputs


@pytest.mark.parametrize("dtype, rel, tol", [
    (jnp.bfloat16, 1e-2, dict(rtol=3e-2, atol=5e-2)),
    (jnp.float16, 2e-3, dict(rtol=3e-3, atol=5e-3)),
], ids=["bfloat16", "float16"])
def test_half_precision_inputs(dtype, rel, tol):
    kwargs = _jnp(conv_inputs(np.random.default_rng(1), 2, 33, 8, 4), dtype)
    y, state = conv(kwargs, "silu")
    assert y.dtype == dtype and state.dtype == dtype
    ref_y, ref_state = oracle.causal_conv1d(**_np64(kwargs), activation="silu")
    assert oracle.rel_err(y, ref_y) < rel
    np.testing.assert_allclose(np.asarray(y, np.float64), ref_y, **tol)
    np.testing.assert_array_equal(np.asarray(state, np.float64), ref_state)


@pytest.mark.parametrize("prefill", [0, 2, 7])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_decoding_step_by_step_equals_full_sequence(prefill, activation):
    """Prefill `prefill` steps with causal_conv1d, then one causal_conv1d_update a step."""
    kwargs = _jnp(conv_inputs(np.random.default_rng(prefill), 2, 12, 6, 4))
    full_y, full_state = conv(kwargs, activation)
    x, w, b = kwargs["x"], kwargs["weight"], kwargs["bias"]
    state, ys = kwargs["initial_state"], []
    if prefill:
        y0, state = conv(kwargs | {"x": x[:, :prefill]}, activation)
        ys.append(y0)
    for t in range(prefill, x.shape[1]):
        y_t, state = conv_step(state, x[:, t], w, b, activation=activation)
        ys.append(y_t[:, None])
    np.testing.assert_allclose(jnp.concatenate(ys, axis=1), full_y, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(state, full_state)


def test_update_matches_oracle_one_step():
    rng = np.random.default_rng(4)
    kw = conv_inputs(rng, 3, 1, 5, 4)
    y, state = conv_step(jnp.asarray(kw["initial_state"]), jnp.asarray(kw["x"][:, 0]),
                         jnp.asarray(kw["weight"]), jnp.asarray(kw["bias"]), activation="silu")
    ref_y, ref_state = oracle.causal_conv1d(**kw, activation="silu")
    assert oracle.rel_err(y, ref_y[:, 0]) < TOL
    np.testing.assert_array_equal(np.asarray(state, np.float64), ref_state)


def test_gradients_finite_differences_float64():
    rng = np.random.default_rng(9)
    kw = conv_inputs(rng, 2, 11, 3, 4)
    with jax.enable_x64(True):
        diff = {k: jnp.asarray(v, jnp.float64) for k, v in kw.items()}
        wy = jnp.asarray(rng.standard_normal((2, 11, 3)))
        ws = jnp.asarray(rng.standard_normal((2, 3, 3)))

        @jax.jit
        def loss(d):
            y, s = causal_conv1d(**d, activation="silu", return_final_state=True)
            return jnp.sum(y * wy) + jnp.sum(s * ws)

        grads = jax.jit(jax.grad(loss))(diff)
        eps = 1e-6
        for k in diff:
            assert grads[k].dtype == jnp.float64 and float(jnp.linalg.norm(grads[k])) > 0, k
            v = jnp.asarray(rng.standard_normal(diff[k].shape))
            numeric = (float(loss(diff | {k: diff[k] + eps * v}))
                       - float(loss(diff | {k: diff[k] - eps * v}))) / (2 * eps)
            analytic = float(jnp.sum(grads[k] * v))
            assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric)), (k, analytic, numeric)


def test_vmap_equals_loop():
    a = _jnp(conv_inputs(np.random.default_rng(5), 2, 9, 4, 3))
    b = _jnp(conv_inputs(np.random.default_rng(6), 2, 9, 4, 3))
    per = ("x", "initial_state")
    stacked = {k: jnp.stack([a[k], b[k]]) for k in per}
    fn = jax.jit(jax.vmap(lambda s: causal_conv1d(**s, weight=a["weight"], bias=a["bias"],
                                                  activation="silu", return_final_state=True)))
    vy, vs = fn(stacked)
    for i, one in enumerate((a, b)):
        y, s = conv(a | {k: one[k] for k in per}, "silu")
        np.testing.assert_allclose(vy[i], y, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(vs[i], s)


_f = lambda *s: jnp.ones(s, jnp.float32)
_i = lambda *s: jnp.ones(s, jnp.int32)
GOOD = dict(x=_f(2, 5, 4), weight=_f(4, 3), bias=_f(4), initial_state=_f(2, 2, 4))
BAD = {
    "x rank 2": (dict(x=_f(5, 4)), ValueError, "x"),
    "x int": (dict(x=_i(2, 5, 4)), TypeError, "x"),
    "weight dim": (dict(weight=_f(5, 3)), ValueError, "weight"),
    "weight rank 1": (dict(weight=_f(4)), ValueError, "weight"),
    "weight width 0": (dict(weight=_f(4, 0), initial_state=None), ValueError, "weight"),
    "weight int": (dict(weight=_i(4, 3)), TypeError, "weight"),
    "bias shape": (dict(bias=_f(3)), ValueError, "bias"),
    "bias int": (dict(bias=_i(4)), TypeError, "bias"),
    "initial_state width": (dict(initial_state=_f(2, 3, 4)), ValueError, "initial_state"),
    "initial_state dtype": (dict(initial_state=jnp.ones((2, 2, 4), jnp.bfloat16)), TypeError,
                            "initial_state"),
    "activation": (dict(activation="relu"), ValueError, "activation"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
@pytest.mark.parametrize("hooked", [True, False], ids=["public", "own-checks"])
def test_bad_input_is_refused_naming_the_argument(case, hooked):
    over, exc, name = BAD[case]
    fn = causal_conv1d if hooked else unhooked(causal_conv1d)
    with raises_about(exc, name) as info:
        fn(**(GOOD | over))
    if not hooked:
        assert type(info.value) is exc and str(info.value).startswith("causal_conv1d: ")


GOOD_STEP = dict(conv_state=_f(2, 2, 4), x=_f(2, 4), weight=_f(4, 3), bias=_f(4))
BAD_STEP = {
    "x rank 3": (dict(x=_f(2, 1, 4)), ValueError, "x"),
    "x int": (dict(x=_i(2, 4)), TypeError, "x"),
    "conv_state width": (dict(conv_state=_f(2, 3, 4)), ValueError, "conv_state"),
    "conv_state dtype": (dict(conv_state=jnp.ones((2, 2, 4), jnp.float16)), TypeError,
                         "conv_state"),
    "weight dim": (dict(weight=_f(3, 3)), ValueError, "weight"),
    "bias shape": (dict(bias=_f(2)), ValueError, "bias"),
    "activation": (dict(activation="gelu"), ValueError, "activation"),
}


@pytest.mark.parametrize("case", list(BAD_STEP), ids=list(BAD_STEP))
@pytest.mark.parametrize("hooked", [True, False], ids=["public", "own-checks"])
def test_update_bad_input_is_refused_naming_the_argument(case, hooked):
    over, exc, name = BAD_STEP[case]
    fn = causal_conv1d_update if hooked else unhooked(causal_conv1d_update)
    with raises_about(exc, name) as info:
        fn(**(GOOD_STEP | over))
    if not hooked:
        assert type(info.value) is exc and str(info.value).startswith("causal_conv1d_update: ")
