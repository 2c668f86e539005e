"""The Pallas Mosaic GPU kernels (`pallas_mosaic`) against the float64 oracle and the reference VJP.

Three groups:
- lowering for an abstract "NVIDIA H100" at realistic shapes (the real Mosaic GPU lowering
  rules on the CPU; ptxas does not run), forward and backward;
- Mosaic GPU's interpreter on the CPU, tiny shapes (it is slow): forward against the
  oracle, every gradient against the VJP of the sequential reference scan;
- `@pytest.mark.gpu`: the same checks at realistic shapes on a Hopper GPU. Deselected in
  the default run; on the GPU machine run
  `JAX_PLATFORMS=cuda pytest -m gpu tests/core/test_pallas_mosaic.py`.
"""

from __future__ import annotations

import unittest.mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh
from mamba_ssm_core import ScanSpec, auto_implementation, implementations, selective_scan
from mamba_ssm_core import _pallas_mosaic as pm
from mamba_ssm_core._pallas_mosaic import PallasMosaicScan

from tests import oracle

ON_GPU = jax.default_backend() == "gpu"
# Mosaic GPU's API changes between jax releases: the kernels lower on the checked versions
# only (jax 0.10.2, the Python 3.11 environment's, has another `plgpu.load`).
checked_jax = pytest.mark.skipif(
    jax.__version__ not in pm.LOWERING_CHECKED_JAX,
    reason=f"Mosaic GPU kernels target jax {', '.join(pm.LOWERING_CHECKED_JAX)}",
)
needs_gpu = pytest.mark.skipif(
    not ON_GPU, reason="needs a CUDA GPU (run with JAX_PLATFORMS=cuda pytest -m gpu)"
)

# Relative-error bounds against the float64 oracle / the reference VJP: float32 arithmetic
# everywhere; bfloat16 outputs are rounded to 8 bits of mantissa.
REL = {"float32": 2e-5, "bfloat16": 1.5e-2}
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def make_inputs(rng, b, length, d, n, *, groups=None, dtype="float32", segments=True):
    """Fresh random inputs in realistic Mamba ranges (numpy float32, rounded through dtype)."""
    l_ = length
    gshape = (b, l_, n) if groups is None else (b, l_, groups, n)
    f = np.float32
    inp = dict(
        u=rng.standard_normal((b, l_, d)).astype(f),
        delta=(0.5 * rng.standard_normal((b, l_, d))).astype(f),
        A=-np.exp(rng.uniform(0.0, np.log(16.0), (d, n))).astype(f),
        B=rng.standard_normal(gshape).astype(f),
        C=rng.standard_normal(gshape).astype(f),
        D=rng.standard_normal((d,)).astype(f),
        z=rng.standard_normal((b, l_, d)).astype(f),
        # Mamba's dt init: softplus^-1 of log-uniform(1e-3, 1e-1)
        delta_bias=np.log(np.expm1(np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), d)))).astype(f),
        initial_state=rng.standard_normal((b, d, n)).astype(f),
    )
    for k in ("u", "delta", "z", "B", "C"):
        inp[k] = np.asarray(jnp.asarray(inp[k], dtype).astype(jnp.float32))
    seg = np.cumsum(rng.random((b, l_)) < 0.05, axis=1).astype(np.int32) if segments else None
    return inp, seg


def to_jax(inp, dtype):
    out = {k: jnp.asarray(v) for k, v in inp.items()}
    for k in ("u", "delta", "z", "B", "C"):
        if k in out:
            out[k] = out[k].astype(dtype)
    return out


def scan(impl, x, seg, *, softplus=True):
    def call():
        return selective_scan(
            x["u"], x["delta"], x["A"], x["B"], x["C"], x.get("D"), z=x.get("z"),
            delta_bias=x.get("delta_bias"), delta_softplus=softplus,
            initial_state=x.get("initial_state"),
            segment_ids=None if seg is None else jnp.asarray(seg),
            return_final_state=True, impl=impl,
        )

    if impl == "reference":
        # The reference's shared helpers broadcast (dim,) vectors implicitly, which the
        # tree's strict rank promotion rejects; allow it for the reference only.
        with jax.numpy_rank_promotion("allow"):
            return call()
    return call()


def run(impl, x, seg, *, softplus=True):
    """(y, final state) of `scan`, jitted: one compiled program."""
    seg = None if seg is None else jnp.asarray(seg)
    return jax.jit(lambda x, seg: scan(impl, x, seg, softplus=softplus))(x, seg)


def oracle_of(inp, seg, *, softplus=True):
    return oracle.selective_scan(
        inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], inp.get("D"), z=inp.get("z"),
        delta_bias=inp.get("delta_bias"), delta_softplus=softplus,
        initial_state=inp.get("initial_state"), segment_ids=seg,
    )


def grads(impl, x, seg, rng, *, softplus=True):
    """Gradients of every float input through y and the final state, random cotangents.

    One jitted VJP; the cotangents' shapes come from `eval_shape`,
    so the forward is not run an extra time for them."""
    names = [k for k in NAMES if x.get(k) is not None]
    seg = None if seg is None else jnp.asarray(seg)

    def f(vals, seg):
        return scan(impl, {**x, **vals}, seg, softplus=softplus)

    vals = {k: x[k] for k in names}
    y0, h0 = jax.eval_shape(f, vals, seg)
    dy = jnp.asarray(rng.standard_normal(y0.shape), jnp.float32).astype(y0.dtype)
    dh = jnp.asarray(rng.standard_normal(h0.shape), jnp.float32)

    @jax.jit
    def vjp(vals, seg, cotangents):
        _, pullback = jax.vjp(lambda v: f(v, seg), vals)
        return pullback(cotangents)[0]

    return vjp(vals, seg, (dy, dh))


def assert_rel(name, got, ref, bound):
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    assert got.shape == ref.shape, f"{name}: shape {got.shape} != {ref.shape}"
    err = oracle.rel_err(got, ref)
    assert err < bound, f"{name}: relative error {err:.3g} >= {bound:.3g}"


def interp(**kw):
    return PallasMosaicScan(
        interpret=True, **{"chunk": 16, "bwd_chunk": 8, "stages": 2, "unroll": 2, **kw})


def spec(**kw):
    base = dict(batch=2, length=64, dim=256, state=16, groups=1, dtype="bfloat16", has_z=True,
                has_segments=False)
    return ScanSpec(**{**base, **kw})


# ----------------------------------------------------------------------------
# Lowering for an abstract H100 (CPU): the real Mosaic GPU lowering rules


H100 = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
    device_kind="NVIDIA H100", num_cores=132, platform="cuda"))


@pytest.mark.parametrize("dtype, length, dim, state, groups, splits", [
    ("bfloat16", 2048, 2048, 16, None, 1),
    ("float32", 1000, 1024, 32, 2, 1),
    ("bfloat16", 777, 512, 4, None, 2),
])
@checked_jax
def test_lowers_for_h100(dtype, length, dim, state, groups, splits):
    b = 2
    S = jax.ShapeDtypeStruct
    gshape = (b, length, state) if groups is None else (b, length, groups, state)
    shapes = (S((b, length, dim), dtype), S((b, length, dim), dtype), S((dim, state), jnp.float32),
              S(gshape, dtype), S(gshape, dtype), S((dim,), jnp.float32),
              S((b, length, dim), dtype), S((dim,), jnp.float32),
              S((b, dim, state), jnp.float32), S((b, length), jnp.int32))
    impl = PallasMosaicScan(splits=splits)

    def f(u, delta, A, B, C, D, z, bias, h0, seg):
        return selective_scan(u, delta, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True,
                              initial_state=h0, segment_ids=seg, return_final_state=True,
                              impl=impl)

    def fb(*a):
        out, vjp = jax.vjp(lambda *x: f(*x, a[-1]), *a[:-1])
        return vjp(out)

    # The CPU platform would be refused: lift `unsupported` to reach the lowering.
    with jax.sharding.use_abstract_mesh(H100), unittest.mock.patch.object(
        pm.PallasMosaicScan, "unsupported", lambda *a: None
    ):
        for fn, kernels in ((f, 1), (fb, 2)):
            text = jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
            assert text.count("custom_call @mosaic_gpu") == kernels, fn.__name__


# ----------------------------------------------------------------------------
# Interpret mode (CPU): Mosaic GPU's interpreter, tiny shapes


@checked_jax
def test_interpret_forward_and_gradients_all_features():
    """Odd length (a partial last tile in both kernels), grouped B/C, segments, every input."""
    rng = np.random.default_rng(1)
    inp, seg = make_inputs(rng, 1, 21, 256, 16, groups=2)
    x = to_jax(inp, "float32")
    y, h = run(interp(), x, seg)
    y_ref, h_ref = oracle_of(inp, seg)
    assert y.dtype == jnp.float32 and h.dtype == jnp.float32
    assert_rel("y", y, y_ref, REL["float32"])
    assert_rel("h", h, h_ref, REL["float32"])
    gk = grads(interp(), x, seg, np.random.default_rng(3))
    gr = grads("reference", x, seg, np.random.default_rng(3))
    assert set(gk) == set(NAMES)
    for k in NAMES:
        assert_rel(f"d{k}", gk[k], gr[k], REL["float32"])


@checked_jax
def test_interpret_two_warpgroups_bfloat16_no_options():
    """splits=2 (two warpgroups share the states), state 4; no z, D, bias, softplus,
    initial state or segments: the None paths, bfloat16."""
    rng = np.random.default_rng(4)
    inp, _ = make_inputs(rng, 1, 19, 128, 4, dtype="bfloat16", segments=False)
    for k in ("z", "D", "delta_bias", "initial_state"):
        del inp[k]
    inp["delta"] = np.abs(inp["delta"])  # no softplus: keep the steps positive
    x = to_jax(inp, "bfloat16")
    impl = interp(splits=2, bwd_chunk=16)  # state 4: dB/dC sums of 16 tokens at once
    y, h = run(impl, x, None, softplus=False)
    y_ref, h_ref = oracle_of(inp, None, softplus=False)
    assert y.dtype == jnp.bfloat16
    assert_rel("y", y, y_ref, REL["bfloat16"])
    assert_rel("h", h, h_ref, REL["float32"])
    gk = grads(impl, x, None, np.random.default_rng(5), softplus=False)
    gr = grads("reference", x, None, np.random.default_rng(5), softplus=False)
    assert set(gk) == {"u", "delta", "A", "B", "C"}
    for k in gk:
        assert_rel(f"d{k}", gk[k], gr[k], 2e-2)


# ----------------------------------------------------------------------------
# Selection and validation (CPU)


def test_registered_and_reasons_off_gpu():
    assert "pallas_mosaic" in implementations()
    name, why = auto_implementation(spec(), platform="cpu")
    assert name != "pallas_mosaic"
    assert "CUDA GPU" in PallasMosaicScan().unsupported(spec(), "cpu")
    # On a CPU-only process a "gpu" request says why: wrong jax version or no GPU.
    why = PallasMosaicScan().unsupported(spec(), "gpu")
    assert why is not None and ("jax" in why or "GPU" in why)
    assert PallasMosaicScan(interpret=True).unsupported(spec(), "cpu") is None


def test_version_and_device_gates():
    impl = PallasMosaicScan()
    with unittest.mock.patch.object(jax, "__version__", "0.99.0"):
        why = impl.unsupported(spec(), "gpu")
        assert "0.99.0" in why and "0.11.2" in why
        name, reason = auto_implementation(spec(), platform="gpu")
        assert name != "pallas_mosaic" and "pallas_mosaic: jax 0.99.0" in reason
    with unittest.mock.patch.object(jax, "__version__", pm.VERIFIED_JAX[0]):
        with unittest.mock.patch.object(pm, "_device_reason", return_value=None):
            assert impl.unsupported(spec(), "gpu") is None
            name, _ = auto_implementation(spec(), platform="gpu")
            assert name == "pallas_mosaic"
        with unittest.mock.patch.object(
                pm, "_device_reason", return_value="NVIDIA A100 (compute capability 8.0) is not"):
            assert "8.0" in impl.unsupported(spec(), "gpu")


def test_unsupported_shapes_have_reasons():
    impl = PallasMosaicScan(interpret=True)
    assert "multiple of 128" in impl.unsupported(spec(dim=200), "cpu")
    assert "per B/C group" in impl.unsupported(spec(dim=256, groups=4), "cpu")
    assert "state 64" in impl.unsupported(spec(state=64), "cpu")
    assert "float16" in impl.unsupported(spec(dtype="float16"), "cpu")
    assert "bwd_chunk" in PallasMosaicScan(interpret=True, bwd_chunk=8).unsupported(
        spec(state=4), "cpu")


def test_explicit_request_on_cpu_raises_clearly():
    rng = np.random.default_rng(12)
    inp, _ = make_inputs(rng, 1, 4, 128, 4, segments=False)
    with pytest.raises(ValueError, match="pallas_mosaic.*CUDA GPU"):
        run("pallas_mosaic", to_jax(inp, "float32"), None)


@pytest.mark.parametrize("kw, msg", [
    ({"splits": 3}, "splits must be 1 or 2"),
    ({"stages": 0}, "stages must be >= 1"),
    ({"chunk": 32, "bwd_chunk": 12}, "bwd_chunk"),
    ({"chunk": 16, "bwd_chunk": 32}, "bwd_chunk"),
])
def test_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        PallasMosaicScan(**kw)


# ----------------------------------------------------------------------------
# On a Hopper GPU, realistic shapes


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("splits", [1, 2])
def test_gpu_forward_matches_oracle(dtype, splits):
    rng = np.random.default_rng(100)
    inp, seg = make_inputs(rng, 2, 1001, 384, 16, dtype=dtype)
    y, h = run(PallasMosaicScan(splits=splits), to_jax(inp, dtype), seg)
    y_ref, h_ref = oracle_of(inp, seg)
    assert_rel("y", y, y_ref, REL[dtype])
    assert_rel("h", h, h_ref, REL["float32"])


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_gradients_match_reference(dtype):
    """Odd length (the official kernel's padded-tail bug), grouped B/C, every input."""
    rng = np.random.default_rng(101)
    inp, seg = make_inputs(rng, 2, 2049, 512, 16, groups=2, dtype=dtype)
    x = to_jax(inp, dtype)
    gk = grads("pallas_mosaic", x, seg, np.random.default_rng(5))
    gr = grads("reference", x, seg, np.random.default_rng(5))
    for k in NAMES:
        assert_rel(f"d{k}", gk[k], gr[k], {"float32": 2e-5, "bfloat16": 2e-2}[dtype])


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("state", [4, 8, 32])
def test_gpu_state_sizes(state):
    rng = np.random.default_rng(102)
    inp, seg = make_inputs(rng, 1, 300, 256, state)
    x = to_jax(inp, "float32")
    y, h = run("pallas_mosaic", x, seg)
    y_ref, h_ref = oracle_of(inp, seg)
    assert_rel("y", y, y_ref, REL["float32"])
    assert_rel("h", h, h_ref, REL["float32"])
    gk = grads("pallas_mosaic", x, seg, np.random.default_rng(6))
    gr = grads("reference", x, seg, np.random.default_rng(6))
    for k in NAMES:
        assert_rel(f"d{k}", gk[k], gr[k], REL["float32"])


@pytest.mark.gpu
@needs_gpu
def test_gpu_backward_is_deterministic_and_auto_picks_it():
    rng = np.random.default_rng(103)
    inp, seg = make_inputs(rng, 2, 1024, 256, 16, dtype="bfloat16")
    x = to_jax(inp, "bfloat16")
    g1 = grads("pallas_mosaic", x, seg, np.random.default_rng(1))
    g2 = grads("pallas_mosaic", x, seg, np.random.default_rng(1))
    for k in g1:
        np.testing.assert_array_equal(np.asarray(g1[k]), np.asarray(g2[k]), err_msg=k)
    name, _ = auto_implementation(spec(batch=8, length=2048, dim=2048))
    assert name == "pallas_mosaic"
