"""selective_state_update(_tokens) against the float64 oracle, and decoding against the full op.

One step on hypothesis-drawn shapes; half-precision inputs; a few tokens at once
equal to repeated single steps (final state and every intermediate state); and a
Mamba-style mixer (causal conv, SiLU, selective scan, gate) decoded one token at a
time, from scratch and after a prefill, equal to running it on the whole sequence.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mamba_ssm_core import (
    causal_conv1d,
    causal_conv1d_update,
    selective_scan,
    selective_state_update,
    selective_state_update_tokens,
)
from tests import oracle
from tests.core.conftest import CORE_SETTINGS, raises_about, scan_inputs, unhooked

TOL = 1e-5


def step_inputs(rng, batch, dim, state, groups=1, *, tokens=None, D=True, z=True, dt_bias=True,
                dt_softplus=True):
    """Inputs of one decoding step (tokens=None) or of `tokens` steps, as NumPy keywords."""
    kw = scan_inputs(rng, batch, tokens or 1, dim, state, groups, D=D, z=z,
                     delta_bias=dt_bias, delta_softplus=dt_softplus, segments=False)
    take = (lambda a: a[:, 0]) if tokens is None else (lambda a: a)
    return dict(
        state=kw["initial_state"], x=take(kw["u"]), dt=take(kw["delta"]), A=kw["A"],
        B=take(kw["B"]), C=take(kw["C"]), D=kw["D"], z=None if kw["z"] is None else take(kw["z"]),
        dt_bias=kw["delta_bias"], dt_softplus=dt_softplus,
    )


def _jnp(kw, dtype=None):
    out = {}
    for k, v in kw.items():
        if isinstance(v, np.ndarray):
            v = jnp.asarray(v)
            if dtype is not None and k in ("x", "dt", "z", "B", "C"):
                v = v.astype(dtype)
        out[k] = v
    return out


step = jax.jit(selective_state_update, static_argnames="dt_softplus")
tokens_fn = jax.jit(selective_state_update_tokens, static_argnames=("dt_softplus",
                                                                    "return_all_states"))


@CORE_SETTINGS
@given(
    batch=st.integers(1, 3),
    groups=st.sampled_from([None, 1, 2]),
    per_group=st.integers(1, 3),
    state=st.integers(1, 6),
    D=st.booleans(), z=st.booleans(), dt_bias=st.booleans(), dt_softplus=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_step_matches_oracle(batch, groups, per_group, state, D, z, dt_bias, dt_softplus, seed):
    kw = step_inputs(np.random.default_rng(seed), batch, (groups or 1) * per_group, state,
                     groups, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
    ref_y, ref_h = oracle.selective_state_update(**kw)
    y, h = step(**_jnp(kw))
    assert y.shape == ref_y.shape and y.dtype == jnp.float32
    assert h.shape == ref_h.shape and h.dtype == jnp.float32
    assert oracle.rel_err(y, ref_y) < TOL and oracle.rel_err(h, ref_h) < TOL


@pytest.mark.parametrize("dtype, rel, tol", [
    (jnp.bfloat16, 1e-2, dict(rtol=3e-2, atol=5e-2)),
    (jnp.float16, 2e-3, dict(rtol=3e-3, atol=5e-3)),
], ids=["bfloat16", "float16"])
def test_step_half_precision_inputs(dtype, rel, tol):
    kw = _jnp(step_inputs(np.random.default_rng(2), 4, 8, 5, 2), dtype)
    y, h = step(**kw)
    assert y.dtype == dtype and h.dtype == jnp.float32
    ref_y, ref_h = oracle.selective_state_update(
        **{k: np.asarray(v, np.float64) if isinstance(v, jax.Array) else v for k, v in kw.items()})
    assert oracle.rel_err(h, ref_h) < TOL
    assert oracle.rel_err(y, ref_y) < rel
    np.testing.assert_allclose(np.asarray(y, np.float64), ref_y, **tol)


@pytest.mark.parametrize("n_tokens", [1, 5])
@pytest.mark.parametrize("groups", [None, 2])
def test_tokens_equal_repeated_single_steps(n_tokens, groups):
    kw = _jnp(step_inputs(np.random.default_rng(n_tokens), 2, 6, 4, groups, tokens=n_tokens))
    ys, h_last = tokens_fn(**kw)
    ys_all, hs = tokens_fn(**kw, return_all_states=True)
    assert ys.shape == (2, n_tokens, 6) and h_last.shape == (2, 6, 4)
    assert hs.shape == (2, n_tokens, 6, 4) and hs.dtype == jnp.float32
    h = kw["state"]
    per = ("x", "dt", "B", "C", "z")
    for t in range(n_tokens):
        y_t, h = step(**(kw | {k: kw[k][:, t] for k in per} | {"state": h}))
        np.testing.assert_allclose(ys[:, t], y_t, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(ys_all[:, t], y_t, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(hs[:, t], h, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(h_last, h, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------
# Decoding a Mamba-style mixer one token at a time


def _mixer_inputs(rng, batch=2, length=14, dim=6, state=4, groups=2, width=4):
    kw = scan_inputs(rng, batch, length, dim, state, groups, initial_state=False,
                     segments=False)
    kw = {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
    kw["conv_weight"] = jnp.asarray(rng.standard_normal((dim, width)).astype(np.float32))
    kw["conv_bias"] = jnp.asarray(rng.standard_normal(dim).astype(np.float32))
    return kw


def _full(kw, impl, upto=None):
    """The whole (or first `upto` steps of the) mixer: conv, SiLU, scan with the gate."""
    sl = slice(None, upto)
    u, conv_state = causal_conv1d(kw["u"][:, sl], kw["conv_weight"], kw["conv_bias"],
                                  activation="silu", return_final_state=True)
    y, h = selective_scan(u, kw["delta"][:, sl], kw["A"], kw["B"][:, sl], kw["C"][:, sl],
                          kw["D"], z=kw["z"][:, sl], delta_bias=kw["delta_bias"],
                          delta_softplus=True, return_final_state=True, impl=impl)
    return y, conv_state, h


@jax.jit
def _decode_one(kw, t, conv_state, h):
    u_t, conv_state = causal_conv1d_update(conv_state, kw["u"][:, t], kw["conv_weight"],
                                           kw["conv_bias"], activation="silu")
    y_t, h = selective_state_update(h, u_t, kw["delta"][:, t], kw["A"], kw["B"][:, t],
                                    kw["C"][:, t], kw["D"], z=kw["z"][:, t],
                                    dt_bias=kw["delta_bias"], dt_softplus=True)
    return y_t, conv_state, h


@pytest.mark.parametrize("prefill", [0, 5])
@pytest.mark.parametrize("impl", ["reference", "associative", "chunked"])
def test_decoding_token_by_token_equals_full_sequence(impl, prefill):
    kw = _mixer_inputs(np.random.default_rng(21))
    full_y, full_conv, full_h = jax.jit(_full, static_argnums=(1,))(kw, impl)
    b, length, dim = kw["u"].shape
    if prefill:
        y0, conv_state, h = jax.jit(_full, static_argnums=(1, 2))(kw, impl, prefill)
        ys = [y0]
    else:
        conv_state = jnp.zeros((b, kw["conv_weight"].shape[1] - 1, dim), jnp.float32)
        h = jnp.zeros((b, dim, kw["A"].shape[1]), jnp.float32)
        ys = []
    for t in range(prefill, length):
        y_t, conv_state, h = _decode_one(kw, t, conv_state, h)
        ys.append(y_t[:, None])
    y = jnp.concatenate(ys, axis=1)
    assert oracle.rel_err(y, full_y) < TOL and oracle.rel_err(h, full_h) < TOL
    np.testing.assert_array_equal(conv_state, full_conv)


def test_multi_token_decoding_after_prefill_equals_full_sequence():
    """Prefill, then the rest in one selective_state_update_tokens call (the conv first)."""
    kw = _mixer_inputs(np.random.default_rng(22))
    full_y, _, full_h = jax.jit(_full, static_argnums=(1,))(kw, "chunked")
    k = 6

    @jax.jit
    def prefill_then_tokens(kw):
        y0, conv_state, h = _full(kw, "chunked", k)
        rest = slice(k, None)
        u = causal_conv1d(kw["u"][:, rest], kw["conv_weight"], kw["conv_bias"],
                          activation="silu", initial_state=conv_state)
        y1, h = selective_state_update_tokens(
            h, u, kw["delta"][:, rest], kw["A"], kw["B"][:, rest], kw["C"][:, rest], kw["D"],
            z=kw["z"][:, rest], dt_bias=kw["delta_bias"], dt_softplus=True)
        return jnp.concatenate([y0, y1], axis=1), h

    y, h = prefill_then_tokens(kw)
    assert oracle.rel_err(y, full_y) < TOL
    assert oracle.rel_err(h, full_h) < TOL


def test_step_under_vmap_and_grad():
    kw = _jnp(step_inputs(np.random.default_rng(8), 2, 4, 3, 2))
    kw2 = _jnp(step_inputs(np.random.default_rng(9), 2, 4, 3, 2))
    per = ("state", "x", "dt", "B", "C", "z")
    shared = {k: v for k, v in kw.items() if k not in per and k != "dt_softplus"}
    vy, vh = jax.vmap(lambda s: selective_state_update(**s, **shared, dt_softplus=True))(
        {k: jnp.stack([kw[k], kw2[k]]) for k in per})
    for i, one in enumerate((kw, kw2)):
        y, h = step(**(kw | {k: one[k] for k in per}))
        np.testing.assert_allclose(vy[i], y, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(vh[i], h, rtol=1e-6, atol=1e-6)
    diff_names = ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias")

    def loss(d):
        y, h = selective_state_update(**d, dt_softplus=True)
        return jnp.sum(y) + jnp.sum(h)

    grads = jax.jit(jax.grad(loss))({k: kw[k] for k in diff_names})
    for k in diff_names:
        assert grads[k].shape == kw[k].shape
        assert np.isfinite(grads[k]).all() and float(jnp.linalg.norm(grads[k])) > 0, k


# ---------------------------------------------------------------------------
# Bad input

_f = lambda *s: jnp.ones(s, jnp.float32)
_i = lambda *s: jnp.ones(s, jnp.int32)
GOOD = dict(state=_f(2, 4, 3), x=_f(2, 4), dt=_f(2, 4), A=_f(4, 3), B=_f(2, 2, 3), C=_f(2, 2, 3),
            D=_f(4), z=_f(2, 4), dt_bias=_f(4))
BAD = {
    "state bfloat16": (dict(state=jnp.ones((2, 4, 3), jnp.bfloat16)), TypeError, "state"),
    "state rank 2": (dict(state=_f(2, 4)), ValueError, "state"),
    "x rank 3": (dict(x=_f(2, 1, 4)), ValueError, "x"),
    "x int": (dict(x=_i(2, 4)), TypeError, "x"),
    "dt shape": (dict(dt=_f(2, 5)), ValueError, "dt"),
    "dt int": (dict(dt=_i(2, 4)), TypeError, "dt"),
    "A shape": (dict(A=_f(4, 2)), ValueError, "A"),
    "B and C rank 4": (dict(B=_f(2, 1, 2, 3), C=_f(2, 1, 2, 3)), ValueError, "B"),
    "dim not divisible by groups": (dict(B=_f(2, 3, 3), C=_f(2, 3, 3)), ValueError, "B"),
    "C state": (dict(C=_f(2, 2, 4)), ValueError, "C"),
    "D shape": (dict(D=_f(3)), ValueError, "D"),
    "z shape": (dict(z=_f(2, 3)), ValueError, "z"),
    "dt_bias int": (dict(dt_bias=_i(4)), TypeError, "dt_bias"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
@pytest.mark.parametrize("hooked", [True, False], ids=["public", "own-checks"])
def test_bad_input_is_refused_naming_the_argument(case, hooked):
    over, exc, name = BAD[case]
    fn = selective_state_update if hooked else unhooked(selective_state_update)
    with raises_about(exc, name) as info:
        fn(**(GOOD | over))
    if not hooked:
        assert type(info.value) is exc and str(info.value).startswith("selective_state_update: ")


GOOD_TOKENS = dict(state=_f(2, 4, 3), x=_f(2, 5, 4), dt=_f(2, 5, 4), A=_f(4, 3), B=_f(2, 5, 3),
                   C=_f(2, 5, 3))
BAD_TOKENS = {
    "state float16": (dict(state=jnp.ones((2, 4, 3), jnp.float16)), TypeError, "state"),
    "x rank 2": (dict(x=_f(2, 4)), ValueError, "x"),
    "dt tokens": (dict(dt=_f(2, 6, 4)), ValueError, "dt"),
    "B tokens": (dict(B=_f(2, 6, 3)), ValueError, "B"),
    "C int": (dict(C=_i(2, 5, 3)), TypeError, "C"),
}


@pytest.mark.parametrize("case", list(BAD_TOKENS), ids=list(BAD_TOKENS))
@pytest.mark.parametrize("hooked", [True, False], ids=["public", "own-checks"])
def test_tokens_bad_input_is_refused_naming_the_argument(case, hooked):
    over, exc, name = BAD_TOKENS[case]
    fn = selective_state_update_tokens if hooked else unhooked(selective_state_update_tokens)
    with raises_about(exc, name) as info:
        fn(**(GOOD_TOKENS | over))
    if not hooked:
        assert type(info.value) is exc
        assert str(info.value).startswith("selective_state_update_tokens: ")
