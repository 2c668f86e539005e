"""selective_scan: every CPU implementation against the float64 NumPy oracle.

Outputs and final states on hypothesis-drawn shapes (float32 within 1e-5 relative
error), half-precision inputs within the official tolerances, gradients of every
input against the reference implementation and against float64 finite
differences, packed sequences, a 131072-step sequence, jit/vmap/grad of every
registered implementation, the `auto` choice and the refusal of bad input.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import mamba_ssm_core as m
from mamba_ssm_core import ChunkedScan, ScanImplementation, ScanSpec, selective_scan
from mamba_ssm_core.scan import _REGISTRY
from tests import oracle
from tests.core.conftest import CORE_SETTINGS, raises_about, scan_inputs, unhooked

TOL = 1e-5  # float32 against the float64 oracle, relative
# The official selective-scan tests' tolerances for half-precision outputs.
HALF_TOL = {jnp.bfloat16: dict(rtol=3e-2, atol=5e-2), jnp.float16: dict(rtol=3e-3, atol=5e-3)}
# Relative-norm bounds for half-precision y: its rounding alone is 2**-8 (bf16), 2**-11 (f16).
HALF_REL = {jnp.bfloat16: 1e-2, jnp.float16: 2e-3}

# Every CPU implementation, and chunked with both inner loops at odd chunk sizes that
# divide few of the lengths drawn below (each distinct config costs compile time in CI;
# chunk sizes 1 and longer than the sequence have their own test).
IMPLS = {
    "reference": "reference",
    "associative": "associative",
    "chunked": "chunked",
    "chunked-parallel-5": ChunkedScan(chunk_size=5, inner="parallel"),
    "chunked-sequential-13-unroll-3": ChunkedScan(chunk_size=13, inner="sequential", unroll=3),
}
DIFF_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def _jnp(kwargs: dict, dtype=None) -> dict:
    """NumPy inputs -> jax arrays; `dtype` recasts u, delta, z, B and C (the activations)."""
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, np.ndarray):
            v = jnp.asarray(v)
            if dtype is not None and k in ("u", "delta", "z", "B", "C"):
                v = v.astype(dtype)
        out[k] = v
    return out


@functools.partial(jax.jit, static_argnames=("impl", "delta_softplus"))
def _scan(impl, delta_softplus, kwargs):
    return selective_scan(**kwargs, delta_softplus=delta_softplus, impl=impl,
                          return_final_state=True)


def run(impl, kwargs: dict):
    """selective_scan under jit with return_final_state; kwargs as from `scan_inputs`."""
    kwargs = dict(kwargs)
    softplus = kwargs.pop("delta_softplus")
    return _scan(impl, softplus, kwargs)


def run_oracle(kwargs: dict):
    return oracle.selective_scan(**{k: np.asarray(v, np.float64) if isinstance(v, jax.Array)
                                    and jnp.issubdtype(v.dtype, jnp.floating) else v
                                    for k, v in kwargs.items()})


# ---------------------------------------------------------------------------
# Forward: outputs and final states against the oracle


@st.composite
def scan_cases(draw):
    groups = draw(st.sampled_from([None, 1, 2, 3]))
    return dict(
        batch=draw(st.integers(1, 2)),
        length=draw(st.one_of(
            st.sampled_from([1, 2, 3, 7, 13, 31, 63, 64, 65, 97, 127, 129]),
            st.integers(1, 150),
        )),
        dim=(groups or 1) * draw(st.integers(1, 3)),
        state=draw(st.integers(1, 5)),
        groups=groups,
        D=draw(st.booleans()),
        z=draw(st.booleans()),
        delta_bias=draw(st.booleans()),
        delta_softplus=draw(st.booleans()),
        initial_state=draw(st.booleans()),
        segments=draw(st.booleans()),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def _case(**kw):
    base = dict(batch=1, length=1, dim=2, state=3, groups=1, D=True, z=True, delta_bias=True,
                delta_softplus=True, initial_state=True, segments=True, seed=0)
    return base | kw


@pytest.mark.parametrize("impl", list(IMPLS.values()), ids=list(IMPLS))
@CORE_SETTINGS
@given(case=scan_cases())
# Lengths the issue names, whatever hypothesis draws: 1, and prime, odd, not a multiple
# of any chunk size above and longer than 2048 (2053).
@example(case=_case(length=1))
@example(case=_case(length=2053, batch=2, groups=3, dim=3, state=2, D=False, z=False,
                    delta_bias=False, delta_softplus=False, seed=3))
def test_matches_oracle(impl, case):
    case = dict(case)
    seed = case.pop("seed")
    kwargs = scan_inputs(np.random.default_rng(seed), **case)
    ref_y, ref_h = oracle.selective_scan(**kwargs)
    y, h = run(impl, _jnp(kwargs))
    assert y.shape == ref_y.shape and y.dtype == jnp.float32
    assert h.shape == ref_h.shape and h.dtype == jnp.float32
    assert oracle.rel_err(y, ref_y) < TOL, oracle.rel_err(y, ref_y)
    assert oracle.rel_err(h, ref_h) < TOL, oracle.rel_err(h, ref_h)


@pytest.mark.parametrize("chunk_size", [1, 4096])
@pytest.mark.parametrize("inner", ["sequential", "parallel"])
def test_chunk_of_one_step_and_chunk_longer_than_the_sequence(chunk_size, inner):
    kwargs = scan_inputs(np.random.default_rng(chunk_size), 2, 29, 4, 3, groups=2)
    ref_y, ref_h = oracle.selective_scan(**kwargs)
    y, h = run(ChunkedScan(chunk_size=chunk_size, inner=inner), _jnp(kwargs))
    assert oracle.rel_err(y, ref_y) < TOL and oracle.rel_err(h, ref_h) < TOL


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("impl", list(IMPLS.values()), ids=list(IMPLS))
def test_half_precision_inputs(impl, dtype):
    kwargs = _jnp(scan_inputs(np.random.default_rng(7), 2, 77, 6, 4, groups=2), dtype)
    y, h = run(impl, kwargs)
    assert y.dtype == dtype and h.dtype == jnp.float32
    # The oracle sees exactly the rounded inputs, so the state (float32 arithmetic on
    # them) must be float32-accurate; y only adds its own rounding to `dtype`.
    ref_y, ref_h = run_oracle(kwargs)
    assert oracle.rel_err(h, ref_h) < TOL
    assert oracle.rel_err(y, ref_y) < HALF_REL[dtype]
    np.testing.assert_allclose(np.asarray(y, np.float64), ref_y, **HALF_TOL[dtype])


# ---------------------------------------------------------------------------
# Gradients


@functools.partial(jax.jit, static_argnames=("impl", "delta_softplus"))
def _value_and_grad(diff, rest, weights, *, impl, delta_softplus):
    """A scalar touching every output, sum(y * wy) + sum(h * wh), and its gradient with
    respect to every input in `diff`. One jitted function for every test, so that a
    (impl, shapes) pair compiles once however many tests differentiate it."""

    def loss(diff):
        y, h = selective_scan(**diff, **rest, delta_softplus=delta_softplus, impl=impl,
                              return_final_state=True)
        return jnp.sum(y * weights[0]) + jnp.sum(h * weights[1])

    return jax.value_and_grad(loss)(diff)


def _loss(impl, kwargs: dict, weights: tuple):
    """(value_and_grad(loss), the differentiable inputs) for `_value_and_grad`'s loss."""
    rest = {k: v for k, v in kwargs.items() if k not in DIFF_ARGS and k != "delta_softplus"}
    return (functools.partial(_value_and_grad, rest=rest, weights=weights, impl=impl,
                              delta_softplus=kwargs["delta_softplus"]),
            {k: kwargs[k] for k in DIFF_ARGS})


def _weights(rng, kwargs, dtype=np.float32):
    b, l, d = kwargs["u"].shape
    n = kwargs["A"].shape[1]
    return (jnp.asarray(rng.standard_normal((b, l, d)).astype(dtype)),
            jnp.asarray(rng.standard_normal((b, d, n)).astype(dtype)))


@pytest.fixture(scope="module")
def grad_problem():
    """Inputs, loss weights and the reference implementation's gradients."""
    rng = np.random.default_rng(11)
    kwargs = _jnp(scan_inputs(rng, 2, 37, 6, 4, groups=3))
    weights = _weights(rng, kwargs)
    value_and_grad, diff = _loss("reference", kwargs, weights)
    return kwargs, weights, value_and_grad(diff)[1]


GRAD_IMPLS = {k: v for k, v in IMPLS.items() if k != "reference"} | {
    "chunked-1": ChunkedScan(chunk_size=1)}


@pytest.mark.parametrize("impl", list(GRAD_IMPLS.values()), ids=list(GRAD_IMPLS))
def test_gradients_match_reference(impl, grad_problem):
    kwargs, weights, ref_grads = grad_problem
    value_and_grad, diff = _loss(impl, kwargs, weights)
    _, grads = value_and_grad(diff)
    for k in DIFF_ARGS:
        ref, got = ref_grads[k], grads[k]
        assert got.shape == kwargs[k].shape and got.dtype == kwargs[k].dtype, k
        assert float(jnp.linalg.norm(ref)) > 0, k  # the loss depends on every input
        assert oracle.rel_err(got, ref) < TOL, (k, oracle.rel_err(got, ref))


FD_CASES = {  # implementation, delta_softplus
    "reference-softplus": ("reference", True),
    "reference-no-softplus": ("reference", False),
    "associative": ("associative", True),
    "chunked-sequential-7": (ChunkedScan(chunk_size=7, inner="sequential"), False),
    "chunked-parallel-5": (ChunkedScan(chunk_size=5, inner="parallel"), True),
}


@pytest.mark.parametrize("case", list(FD_CASES))
def test_gradients_finite_differences_float64(case):
    """jax.grad against central differences, all in float64 (x64 mode for this test only).

    For every input x and a random direction v: <grad, v> against
    (L(x + eps v) - L(x - eps v)) / (2 eps).
    """
    impl, softplus = FD_CASES[case]
    rng = np.random.default_rng(5)
    np_kwargs = scan_inputs(rng, 2, 23, 4, 3, groups=2, delta_softplus=softplus)
    with jax.enable_x64(True):
        kwargs = {k: jnp.asarray(v, np.float64) if isinstance(v, np.ndarray) and v.dtype.kind == "f"
                  else jnp.asarray(v) if isinstance(v, np.ndarray) else v
                  for k, v in np_kwargs.items()}
        value_and_grad, diff = _loss(impl, kwargs, _weights(rng, kwargs, np.float64))
        # the loss's values from the same program as its gradient: one compile
        loss = lambda diff: value_and_grad(diff)[0]  # noqa: E731
        _, grads = value_and_grad(diff)
        eps = 1e-6
        for k in DIFF_ARGS:
            assert grads[k].dtype == jnp.float64, k
            v = jnp.asarray(rng.standard_normal(diff[k].shape))
            plus = float(loss(diff | {k: diff[k] + eps * v}))
            minus = float(loss(diff | {k: diff[k] - eps * v}))
            numeric = (plus - minus) / (2 * eps)
            analytic = float(jnp.sum(grads[k] * v))
            assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric)), (k, analytic, numeric)


def test_float64_inputs_compute_in_float64():
    """No silent rounding: float64 inputs give a float64 state, and want a float64 one."""
    np_kwargs = scan_inputs(np.random.default_rng(6), 1, 9, 2, 2)
    ref_y, ref_h = oracle.selective_scan(**np_kwargs)
    with jax.enable_x64(True):
        kw = {k: jnp.asarray(v, jnp.float64) if isinstance(v, np.ndarray) and v.dtype.kind == "f"
              else jnp.asarray(v) if isinstance(v, np.ndarray) else v
              for k, v in np_kwargs.items()}
        for impl in IMPLS.values():
            y, h = run(impl, kw)
            assert y.dtype == jnp.float64 and h.dtype == jnp.float64
            # float64 all through: far tighter than any float32 result could be
            assert oracle.rel_err(y, ref_y) < 1e-12 and oracle.rel_err(h, ref_h) < 1e-12
        with raises_about(TypeError, "initial_state"):
            run("chunked", kw | {"initial_state": kw["initial_state"].astype(jnp.float32)})


# ---------------------------------------------------------------------------
# Packed sequences and long sequences


@pytest.mark.parametrize("impl", list(IMPLS.values()), ids=list(IMPLS))
def test_packed_sequences_equal_separate_calls(impl):
    """[a | b] with segment ids and an initial state = scan(a, h0) then scan(b) from zero.

    a has 10 steps, so b starts exactly on a chunk boundary of chunk sizes 5 and 1.
    """
    rng = np.random.default_rng(3)
    la, lb = 10, 19
    kw = _jnp(scan_inputs(rng, 2, la + lb, 4, 3, groups=2, segments=False))
    ids = jnp.asarray(np.array([[4] * la + [9] * lb] * 2, np.int32))
    y, h = run(impl, kw | {"segment_ids": ids})

    seq = lambda sl: {k: (v[:, sl] if k in ("u", "delta", "z", "B", "C") else v)
                      for k, v in kw.items()}
    ya, ha = run(impl, seq(slice(0, la)))
    yb, hb = run(impl, seq(slice(la, None)) | {"initial_state": None})
    np.testing.assert_allclose(y[:, :la], ya, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(y[:, la:], yb, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(h, hb, rtol=1e-6, atol=1e-6)
    assert not np.allclose(ha, hb)  # the reset mattered: a's state did not carry over


@pytest.mark.slow
def test_length_131072_stays_finite_and_matches():
    rng = np.random.default_rng(13)
    kwargs = _jnp(scan_inputs(rng, 1, 131072, 2, 2, groups=1))
    ref_y, ref_h = run("reference", kwargs)
    assert np.isfinite(ref_y).all() and np.isfinite(ref_h).all()
    o_y, o_h = run_oracle(kwargs)
    assert oracle.rel_err(ref_y, o_y) < TOL and oracle.rel_err(ref_h, o_h) < TOL
    for impl in ("associative", "chunked"):
        y, h = run(impl, kwargs)
        assert np.isfinite(y).all() and np.isfinite(h).all(), impl
        assert oracle.rel_err(y, ref_y) < TOL and oracle.rel_err(h, ref_h) < TOL, impl
    value_and_grad, diff = _loss("chunked", kwargs, _weights(rng, kwargs))
    _, grads = value_and_grad(diff)
    for k in DIFF_ARGS:
        assert np.isfinite(grads[k]).all() and float(jnp.linalg.norm(grads[k])) > 0, k


# ---------------------------------------------------------------------------
# Every registered implementation through the same transformations (optax style)

SUITE_SPEC = ScanSpec(batch=2, length=19, dim=4, state=3, groups=2, dtype="float32",
                      has_z=True, has_segments=True)
# Implementations registered later (kernels) that cannot run on the CPU are left out here
# at collection, not skipped; the registry is read directly since only names are public.
CPU_IMPLS = [n for n in m.implementations() if _REGISTRY[n].unsupported(SUITE_SPEC, "cpu") is None]


def test_cpu_suite_covers_the_cpu_implementations():
    assert {"reference", "associative", "chunked"} <= set(CPU_IMPLS)


@pytest.mark.parametrize("name", CPU_IMPLS)
def test_implementation_under_jit_vmap_grad(name):
    rng = np.random.default_rng(17)
    kwargs = _jnp(scan_inputs(rng, SUITE_SPEC.batch, SUITE_SPEC.length, SUITE_SPEC.dim,
                              SUITE_SPEC.state, SUITE_SPEC.groups))
    ref_y, ref_h = run_oracle(kwargs)

    # jit: shapes, dtypes, finiteness, values
    y, h = run(name, kwargs)
    assert y.shape == ref_y.shape and y.dtype == jnp.float32
    assert h.shape == ref_h.shape and h.dtype == jnp.float32
    assert np.isfinite(y).all() and np.isfinite(h).all()
    assert oracle.rel_err(y, ref_y) < TOL and oracle.rel_err(h, ref_h) < TOL

    # vmap over an extra leading axis of the per-sequence inputs: equal to a loop
    k = 2
    extra = _jnp(scan_inputs(np.random.default_rng(18), SUITE_SPEC.batch, SUITE_SPEC.length,
                             SUITE_SPEC.dim, SUITE_SPEC.state, SUITE_SPEC.groups))
    mapped = ("u", "delta", "B", "C", "z", "initial_state", "segment_ids")
    stacked = {n: jnp.stack([kwargs[n], extra[n]]) for n in mapped}
    shared = {n: v for n, v in kwargs.items() if n not in mapped and n != "delta_softplus"}
    vfn = jax.jit(jax.vmap(lambda s: selective_scan(**s, **shared, delta_softplus=True,
                                                    impl=name, return_final_state=True)))
    vy, vh = vfn(stacked)
    assert vy.shape == (k, *y.shape) and vh.shape == (k, *h.shape)
    for i, one in enumerate((kwargs, extra)):
        ly, lh = run(name, kwargs | {n: one[n] for n in mapped})
        np.testing.assert_allclose(vy[i], ly, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(vh[i], lh, rtol=1e-6, atol=1e-6)

    # grad under jit: every input gets a finite, correctly shaped, nonzero gradient
    value_and_grad, diff = _loss(name, kwargs, _weights(rng, kwargs))
    value, grads = value_and_grad(diff)  # (jitted)
    assert np.isfinite(float(value))
    for n in DIFF_ARGS:
        assert grads[n].shape == diff[n].shape and grads[n].dtype == diff[n].dtype, n
        assert np.isfinite(grads[n]).all() and float(jnp.linalg.norm(grads[n])) > 0, n


# ---------------------------------------------------------------------------
# Choosing an implementation


def test_auto_picks_chunked_on_cpu():
    # By benchmarks/RESULTS.md ("Selective scan on the CPU"): chunked is the fastest
    # forward+backward and the only one whose training memory stays small.
    name, reason = m.auto_implementation(SUITE_SPEC, "cpu")
    assert name == "chunked" and "cpu" in reason
    kwargs = _jnp(scan_inputs(np.random.default_rng(2), 2, 19, 4, 3, groups=2))
    np.testing.assert_array_equal(run("auto", kwargs)[0], run("chunked", kwargs)[0])


@pytest.mark.parametrize(
    "config, exc, field",
    [(dict(chunk_size=0), ValueError, "chunk_size"),
     (dict(chunk_size=2.5), TypeError, "chunk_size"),
     (dict(inner="fast"), ValueError, "inner"),
     (dict(unroll=0), ValueError, "unroll")],
    ids=["size0", "size-float", "inner", "unroll0"],
)
def test_chunked_config_is_checked(config, exc, field):
    with raises_about(exc, field):
        ChunkedScan(**config)


class _Declines(ScanImplementation):
    name = "declines"

    def unsupported(self, spec, platform):
        return f"never on {platform}"

    def __call__(self, args, *, delta_softplus):
        raise AssertionError("must not be called")


def test_explicit_impl_that_cannot_take_the_call_raises():
    kwargs = _jnp(scan_inputs(np.random.default_rng(1), 1, 5, 2, 2))
    with pytest.raises(ValueError, match=r"impl 'declines' cannot take this call: never on cpu"):
        run(_Declines(), kwargs)


def test_register_implementation_needs_a_name():
    class Nameless(_Declines):
        name = ""

    before = m.implementations()
    with pytest.raises(ValueError, match="impl.name must be a non-empty string"):
        m.register_implementation(Nameless())
    assert m.implementations() == before


# ---------------------------------------------------------------------------
# Bad input


def _good(**over):
    kw = _jnp(scan_inputs(np.random.default_rng(0), 2, 6, 4, 3, groups=2))
    kw.pop("delta_softplus")
    return kw | over


_i32 = lambda *s: jnp.zeros(s, jnp.int32)
_f32 = lambda *s: jnp.ones(s, jnp.float32)

BAD = {
    # name: (overrides, expected error, argument the message must name)
    "u rank 2": (dict(u=_f32(6, 4)), ValueError, "u"),
    "u empty": (dict(u=_f32(2, 0, 4), delta=_f32(2, 0, 4), z=_f32(2, 0, 4),
                     B=_f32(2, 0, 2, 3), C=_f32(2, 0, 2, 3), segment_ids=_i32(2, 0)),
                ValueError, "u"),
    "delta length": (dict(delta=_f32(2, 5, 4)), ValueError, "delta"),
    "A rank 1": (dict(A=_f32(4)), ValueError, "A"),
    "A dim": (dict(A=_f32(5, 3)), ValueError, "A"),
    "B rank 2": (dict(B=_f32(2, 6)), ValueError, "B"),
    "B length": (dict(B=_f32(2, 7, 2, 3)), ValueError, "B"),
    "C state": (dict(C=_f32(2, 6, 2, 4)), ValueError, "C"),
    "C ungrouped, B grouped": (dict(C=_f32(2, 6, 3)), ValueError, "C"),
    "dim not divisible by groups": (dict(B=_f32(2, 6, 3, 3), C=_f32(2, 6, 3, 3)),
                                    ValueError, "groups"),
    "D shape": (dict(D=_f32(5)), ValueError, "D"),
    "delta_bias shape": (dict(delta_bias=_f32(4, 1)), ValueError, "delta_bias"),
    "z shape": (dict(z=_f32(2, 6, 5)), ValueError, "z"),
    "initial_state shape": (dict(initial_state=_f32(2, 3, 4)), ValueError, "initial_state"),
    "segment_ids shape": (dict(segment_ids=_i32(2, 5)), ValueError, "segment_ids"),
    "u int": (dict(u=_i32(2, 6, 4)), TypeError, "u"),
    "delta int": (dict(delta=_i32(2, 6, 4)), TypeError, "delta"),
    "A int": (dict(A=_i32(4, 3)), TypeError, "A"),
    "B int": (dict(B=_i32(2, 6, 2, 3)), TypeError, "B"),
    "C int": (dict(C=_i32(2, 6, 2, 3)), TypeError, "C"),
    "D int": (dict(D=_i32(4)), TypeError, "D"),
    "z int": (dict(z=_i32(2, 6, 4)), TypeError, "z"),
    "delta_bias int": (dict(delta_bias=_i32(4)), TypeError, "delta_bias"),
    "delta dtype differs from u": (dict(delta=jnp.ones((2, 6, 4), jnp.bfloat16)), TypeError,
                                   "delta"),
    "z dtype differs from u": (dict(z=jnp.ones((2, 6, 4), jnp.float16)), TypeError, "z"),
    "segment_ids float": (dict(segment_ids=_f32(2, 6)), TypeError, "segment_ids"),
    "initial_state bfloat16": (dict(initial_state=jnp.ones((2, 4, 3), jnp.bfloat16)),
                               TypeError, "initial_state"),
    "unknown impl": (dict(impl="fastest"), ValueError, "impl"),
    "impl not a name": (dict(impl=3), TypeError, "impl"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
@pytest.mark.parametrize("hooked", [True, False], ids=["public", "own-checks"])
def test_bad_input_is_refused_naming_the_argument(case, hooked):
    over, exc, name = BAD[case]
    fn = selective_scan if hooked else unhooked(selective_scan)
    if hooked:
        with raises_about(exc, name):
            fn(**_good(**over))
    else:
        # The op's own validation, with the jaxtyping hook out of the way: exact type,
        # and a message that names the op and the argument.
        with raises_about(exc, name) as info:
            fn(**_good(**over))
        assert type(info.value) is exc and str(info.value).startswith("selective_scan: ")


def test_unknown_impl_lists_the_registered_ones():
    with pytest.raises(ValueError, match="registered: auto, reference, associative, chunked"):
        selective_scan(**_good(impl="fastest"))
