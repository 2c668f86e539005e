"""The Triton-backend Pallas kernels (`pallas_triton`) against the float64 oracle and the reference VJP.

Three groups:
- interpret mode on the CPU (small shapes, slow interpreter): forward against the
  oracle, every gradient against the VJP of the sequential reference scan;
- lowering for an abstract "NVIDIA H100" on realistic shapes (runs the real Triton
  lowering rules on the CPU; ptxas is not run);
- `@pytest.mark.gpu`: the same checks at realistic shapes on a CUDA GPU. They are
  deselected in the default run (pyproject addopts `-m "not gpu"`); on the GPU
  machine run `JAX_PLATFORMS=cuda pytest -m gpu tests/core/test_pallas_triton.py`.
"""

from __future__ import annotations

import dataclasses
import unittest.mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh

from mamba_ssm_core import (
    PallasTritonScan,
    ScanSpec,
    auto_implementation,
    implementations,
    selective_scan,
)
from mamba_ssm_core import _pallas_triton as pt
from tests import oracle

ON_GPU = jax.default_backend() == "gpu"
needs_gpu = pytest.mark.skipif(
    not ON_GPU, reason="needs a CUDA GPU (run with JAX_PLATFORMS=cuda pytest -m gpu)"
)

# Official selective_scan test tolerances (rtol, atol) for y and final state; the
# gradient factors follow its tests: du x2, d_delta rtol x5 atol x10, dA atol x5.
TOL = {"float32": (6e-4, 2e-3), "float16": (3e-3, 5e-3), "bfloat16": (3e-2, 5e-2)}
GRAD_FACTORS = {"u": (2, 2), "delta": (5, 10), "A": (1, 5)}
# Relative-error bounds against the float64 oracle (outputs are rounded to the dtype).
REL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.5e-2}
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def make_inputs(rng, b, l, d, n, *, groups=None, dtype="float32", segments=True):
    """Fresh random inputs (numpy float32 except where noted), realistic Mamba ranges."""
    gshape = (b, l, n) if groups is None else (b, l, groups, n)
    f = np.float32
    inp = dict(
        u=rng.standard_normal((b, l, d)).astype(f),
        delta=(0.5 * rng.standard_normal((b, l, d))).astype(f),
        A=-np.exp(rng.uniform(0.0, np.log(16.0), (d, n))).astype(f),
        B=rng.standard_normal(gshape).astype(f),
        C=rng.standard_normal(gshape).astype(f),
        D=rng.standard_normal((d,)).astype(f),
        z=rng.standard_normal((b, l, d)).astype(f),
        # Mamba's dt init: softplus^-1 of log-uniform(1e-3, 1e-1)
        delta_bias=np.log(np.expm1(np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), d)))).astype(f),
        initial_state=rng.standard_normal((b, d, n)).astype(f),
    )
    for k in ("u", "delta", "z", "B", "C"):
        # round through the dtype so the oracle sees exactly what the kernel sees
        inp[k] = np.asarray(jnp.asarray(inp[k], dtype).astype(jnp.float32))
    seg = None
    if segments:
        seg = np.cumsum(rng.random((b, l)) < 0.05, axis=1).astype(np.int32)
    return inp, seg


def to_jax(inp, dtype):
    out = {k: jnp.asarray(v) for k, v in inp.items()}
    for k in ("u", "delta", "z", "B", "C"):
        if k in out:
            out[k] = out[k].astype(dtype)
    return out


def scan(impl, x, seg, *, softplus=True):
    return selective_scan(
        x["u"], x["delta"], x["A"], x["B"], x["C"], x.get("D"), z=x.get("z"),
        delta_bias=x.get("delta_bias"), delta_softplus=softplus,
        initial_state=x.get("initial_state"),
        segment_ids=None if seg is None else jnp.asarray(seg),
        return_final_state=True, impl=impl,
    )


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


def assert_close(name, got, ref, rtol, atol, rel):
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    err = oracle.rel_err(got, ref)
    assert err < rel, f"{name}: relative error {err:.3g} >= {rel:.3g}"
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol, err_msg=name)


def check_grads(gk, gr, dtype, rel):
    rtol, atol = TOL[dtype]
    for k in gr:
        fr, fa = GRAD_FACTORS.get(k, (1, 1))
        # gradients are summed over length and batch: compare at the scale of each tensor
        scale = float(np.max(np.abs(np.asarray(jnp.asarray(gr[k], jnp.float32)))))
        assert_close(f"d{k}", gk[k], gr[k], rtol * fr, atol * fa * max(1.0, scale), rel)


def interp(**kw):
    return PallasTritonScan(interpret=True, **{"block_d": 4, "unroll": 4, "tile_l": 16, **kw})


# ----------------------------------------------------------------------------
# Interpret mode (CPU)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_interpret_forward_all_features(dtype):
    rng = np.random.default_rng(1)
    # odd length (not a multiple of the 16-step tile), grouped B/C, 6 channels per
    # group padded to 8 inside the wrapper, state 5 padded to 8
    inp, seg = make_inputs(rng, 2, 37, 12, 5, groups=2, dtype=dtype)
    y, h = run(interp(), to_jax(inp, dtype), seg)
    y_ref, h_ref = oracle_of(inp, seg)
    assert y.dtype == jnp.dtype(dtype) and h.dtype == jnp.float32
    assert y.shape == y_ref.shape and h.shape == h_ref.shape
    rtol, atol = TOL[dtype]
    assert_close("y", y, y_ref, rtol, atol, REL[dtype])
    assert_close("h", h, h_ref, TOL["float32"][0], TOL["float32"][1], 1e-5)


def test_interpret_gradients_all_features():
    rng = np.random.default_rng(2)
    inp, seg = make_inputs(rng, 2, 37, 12, 5, groups=2)
    x = to_jax(inp, "float32")
    gk = grads(interp(), x, seg, np.random.default_rng(3))
    gr = grads("reference", x, seg, np.random.default_rng(3))
    assert set(gk) == set(NAMES)
    check_grads(gk, gr, "float32", 1e-5)


def test_interpret_gradients_bfloat16_no_options():
    """No z, D, bias, softplus, initial state or segments: the None paths, low precision."""
    rng = np.random.default_rng(4)
    inp, _ = make_inputs(rng, 1, 21, 8, 4, dtype="bfloat16", segments=False)
    for k in ("z", "D", "delta_bias", "initial_state"):
        del inp[k]
    inp["delta"] = np.abs(inp["delta"])  # no softplus: keep the steps positive
    x = to_jax(inp, "bfloat16")
    y, h = run(interp(block_d=8), x, None, softplus=False)
    y_ref, h_ref = oracle_of(inp, None, softplus=False)
    assert_close("y", y, y_ref, *TOL["bfloat16"], REL["bfloat16"])
    assert_close("h", h, h_ref, *TOL["float32"], 1e-5)
    gk = grads(interp(block_d=8), x, None, np.random.default_rng(5), softplus=False)
    gr = grads("reference", x, None, np.random.default_rng(5), softplus=False)
    assert set(gk) == {"u", "delta", "A", "B", "C"}
    check_grads(gk, gr, "bfloat16", 2e-2)


@pytest.mark.parametrize("length", [1, 16, 19])
def test_interpret_lengths(length):
    """One step, exactly one tile, and a tile plus a partial sub-tile."""
    rng = np.random.default_rng(10 + length)
    inp, seg = make_inputs(rng, 1, length, 4, 3)
    x = to_jax(inp, "float32")
    y, h = run(interp(), x, seg)
    y_ref, h_ref = oracle_of(inp, seg)
    assert_close("y", y, y_ref, *TOL["float32"], 1e-5)
    assert_close("h", h, h_ref, *TOL["float32"], 1e-5)
    gk = grads(interp(), x, seg, np.random.default_rng(6))
    gr = grads("reference", x, seg, np.random.default_rng(6))
    check_grads(gk, gr, "float32", 1e-5)


@pytest.mark.parametrize("state", [1, 256])
def test_interpret_state_sizes(state):
    rng = np.random.default_rng(20 + state)
    inp, seg = make_inputs(rng, 1, 9, 4, state)
    x = to_jax(inp, "float32")
    impl = interp(unroll=2, tile_l=4)
    y, h = run(impl, x, seg)
    y_ref, h_ref = oracle_of(inp, seg)
    assert_close("y", y, y_ref, *TOL["float32"], 1e-5)
    assert_close("h", h, h_ref, *TOL["float32"], 1e-5)
    gk = grads(impl, x, seg, np.random.default_rng(7))
    gr = grads("reference", x, seg, np.random.default_rng(7))
    check_grads(gk, gr, "float32", 1e-5)


def test_interpret_backward_reference_switch():
    """backward="reference" (VJP of the sequential scan) agrees with the kernel backward,
    here with the other loop structure (no forward prefetch, backward prefetch)."""
    rng = np.random.default_rng(8)
    inp, seg = make_inputs(rng, 1, 13, 8, 4, groups=4)
    x = to_jax(inp, "float32")
    other = interp(prefetch=False, bwd_prefetch=True, bwd_unroll=2)
    y, h = run(other, x, seg)
    y_ref, h_ref = oracle_of(inp, seg)
    assert_close("y", y, y_ref, *TOL["float32"], 1e-5)
    assert_close("h", h, h_ref, *TOL["float32"], 1e-5)
    gk = grads(other, x, seg, np.random.default_rng(9))
    gref = grads(interp(backward="reference"), x, seg, np.random.default_rng(9))
    check_grads(gk, gref, "float32", 1e-5)


def assert_same_grads(got, want, what, *, dA_ulps=0):
    """Equal bits, except dA within dA_ulps float32 roundings of its scale."""
    assert set(got) == set(want)
    for k in want:
        g, w = np.asarray(got[k]), np.asarray(want[k])
        if k == "A" and dA_ulps:
            tol = dA_ulps * np.finfo(np.float32).eps * float(np.max(np.abs(w)))
            np.testing.assert_allclose(g, w, rtol=0, atol=tol, err_msg=f"dA, {what}")
        else:
            np.testing.assert_array_equal(g, w, err_msg=f"d{k}, {what}")


def launches(impl, b, length, d, n, groups=1, dtype="float32"):
    """(first tile, tiles) of each range of tiles `impl`'s backward walks for this call
    (one launch a range while the grid fits `bwd_wave`, as on the CPU)."""
    cfg = impl.kernel_config(
        spec(batch=b, length=length, dim=d, state=n, groups=groups, dtype=dtype),
        softplus=True, has_D=True, has_bias=True, has_h0=True)
    return pt._bwd_ranges(cfg)


def test_interpret_split_backward():
    """The backward in sequential launches over ranges of tiles: the same gradients as
    one launch, bit for bit, and the reference VJP's. Length 37 in 8-step tiles is 5
    tiles (the last partly past the end)."""
    rng = np.random.default_rng(30)
    inp, seg = make_inputs(rng, 2, 37, 12, 5, groups=2)
    x = to_jax(inp, "float32")
    kw = dict(tile_l=8)
    assert launches(interp(**kw), 2, 37, 12, 5, 2) == [(0, 5)]  # tiny: not split by default
    one = grads(interp(bwd_splits=1, **kw), x, seg, np.random.default_rng(31))
    assert launches(interp(bwd_splits=2, **kw), 2, 37, 12, 5, 2) == [(3, 2), (0, 3)]
    # uneven ranges (1, 2, 2 tiles): the gradients of the even split are no further check
    assert launches(interp(bwd_splits=3, **kw), 2, 37, 12, 5, 2) == [(4, 1), (2, 2), (0, 2)]
    got = grads(interp(bwd_splits=3, **kw), x, seg, np.random.default_rng(31))
    assert_same_grads(got, one, "bwd_splits=3", dA_ulps=4)  # see the test below
    gr = grads("reference", x, seg, np.random.default_rng(31))
    check_grads(got, gr, "float32", 1e-5)


@pytest.mark.parametrize("wave, splits", [(3, 3), (5, 2), (7, 2)])
def test_interpret_backward_in_waves(wave, splits):
    """Launches of fewer programs than the grid (batch x channel blocks, here 2 x 4):
    the (program, range) items in launches of `wave`, each launch mixing the end of one
    range with the start of the next. The same bits as one launch, dA included."""
    rng = np.random.default_rng(30)
    inp, seg = make_inputs(rng, 2, 37, 12, 5, groups=2)
    x = to_jax(inp, "float32")
    impl = interp(tile_l=8, bwd_splits=splits, bwd_wave=wave)
    cfg = impl.kernel_config(spec(batch=2, length=37, dim=12, state=5, groups=2),
                             softplus=True, has_D=True, has_bias=True, has_h0=True)
    items = pt._bwd_launch_items(cfg, 8)
    assert cfg.bwd_wave == wave and items[0] == (0, wave)
    assert sum(n for _, n in items) == 8 * splits and len(items) == -(-8 * splits // wave)
    one = grads(interp(tile_l=8, bwd_splits=1), x, seg, np.random.default_rng(31))
    got = grads(impl, x, seg, np.random.default_rng(31))
    assert_same_grads(got, one, f"bwd_wave={wave}, bwd_splits={splits}")


def test_interpret_split_backward_no_options():
    """The split backward without z, D, delta bias, softplus, initial state or segments
    (the carried sums and aliased gradients that do not exist), bfloat16, 2 groups."""
    rng = np.random.default_rng(32)
    inp, _ = make_inputs(rng, 1, 19, 8, 4, groups=2, dtype="bfloat16", segments=False)
    for k in ("z", "D", "delta_bias", "initial_state"):
        del inp[k]
    inp["delta"] = np.abs(inp["delta"])  # no softplus: keep the steps positive
    x = to_jax(inp, "bfloat16")
    # 5 tiles of 4 steps; 4 launches asked: ranges of 2 tiles, so 3 launches
    kw = dict(block_d=4, tile_l=4, bwd_splits=4)
    assert launches(interp(**kw), 1, 19, 8, 4, 2, "bfloat16") == [(4, 1), (2, 2), (0, 2)]
    one = grads(interp(block_d=4, tile_l=4, bwd_splits=1), x, None, np.random.default_rng(33),
                softplus=False)
    got = grads(interp(**kw), x, None, np.random.default_rng(33), softplus=False)
    # The interpreter's dA sum (a * b + c per step, in XLA:CPU code compiled for each
    # launch's loop) can round differently in the last bit across loop lengths; on
    # the GPU it is one fma.rn instruction and the GPU test asserts equal bits.
    assert_same_grads(got, one, "bwd_splits=4", dA_ulps=4)
    gr = grads("reference", x, None, np.random.default_rng(33), softplus=False)
    check_grads(got, gr, "bfloat16", 2e-2)


def test_interpret_under_jit_and_vmap():
    rng = np.random.default_rng(11)
    inp, _ = make_inputs(rng, 1, 8, 4, 2, segments=False)
    x = to_jax(inp, "float32")
    f = jax.jit(lambda x: scan(interp(), x, None)[0])
    # vmapped under a top-level jit
    y = jax.jit(jax.vmap(lambda u: f({**x, "u": u})))(jnp.stack([x["u"], x["u"] * 0.5]))
    for i, scale in enumerate((1.0, 0.5)):
        y_ref, _ = oracle_of({**inp, "u": inp["u"] * scale}, None)
        assert_close(f"y[{i}]", y[i], y_ref, *TOL["float32"], 1e-5)


# ----------------------------------------------------------------------------
# Selection and validation (CPU)


def spec(**kw):
    base = dict(batch=2, length=64, dim=32, state=16, groups=1, dtype="float32", has_z=True,
                has_segments=False)
    return ScanSpec(**{**base, **kw})


def test_registered_and_not_auto_on_cpu():
    assert "pallas_triton" in implementations()
    name, _ = auto_implementation(spec(), platform="cpu")
    assert name != "pallas_triton"
    why = PallasTritonScan().unsupported(spec(), "cpu")
    assert why is not None and "CUDA GPU" in why and "interpret=True" in why
    assert PallasTritonScan(interpret=True).unsupported(spec(), "cpu") is None


def test_explicit_request_on_cpu_raises_clearly():
    rng = np.random.default_rng(12)
    inp, _ = make_inputs(rng, 1, 4, 4, 2, segments=False)
    with pytest.raises(ValueError, match="pallas_triton.*CUDA GPU"):
        run("pallas_triton", to_jax(inp, "float32"), None)


def test_unsupported_shapes_have_reasons():
    impl = PallasTritonScan(interpret=True)
    assert "256" in impl.unsupported(spec(state=257), "gpu")
    assert "float64" in impl.unsupported(spec(dtype="float64"), "gpu")
    with unittest.mock.patch.object(pt, "_cuda_compute_capability", return_value=(7, 5)):
        assert "8.0" in PallasTritonScan().unsupported(spec(), "gpu")
    with unittest.mock.patch.object(pt, "_cuda_compute_capability", return_value=(9, 0)):
        assert PallasTritonScan().unsupported(spec(), "gpu") is None
        name, why = auto_implementation(spec(state=300), platform="gpu")
        assert name != "pallas_triton" and "pallas_triton: state size 300" in why


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"block_d": 24}, "block_d must be a power of two"),
        ({"num_warps": 3}, "num_warps must be"),
        ({"tile_l": 8, "unroll": 16}, "tile_l .* multiple of unroll"),
        ({"backward": "autodiff"}, "backward must be one of"),
        ({"num_stages": 0}, "num_stages"),
        ({"bwd_splits": 0}, "bwd_splits must be None or an int >= 1"),
        ({"bwd_wave": 0}, "bwd_wave must be None or an int >= 1"),
    ],
)
def test_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        PallasTritonScan(**kw)


def test_kernel_config_pads_and_caps():
    cfg = PallasTritonScan(block_d=32).kernel_config(
        spec(dim=12, groups=2, state=5, length=37), softplus=True, has_D=True, has_bias=True,
        has_h0=False,
    )
    # 6 channels a group -> blocks of 8, state 5 -> 8, tile shrunk to the sequence
    assert (cfg.block_d, cfg.blocks_per_group, cfg.state) == (8, 1, 8)
    assert cfg.tile * cfg.n_tiles >= 37 and cfg.masked


@pytest.mark.parametrize("dtype, length, state, splits", [
    # partial sums (2 x 8 x 64 blocks x L x N float32) against u's bytes / 4
    ("float32", 8192, 16, 4), ("bfloat16", 8192, 16, 8), ("float32", 2048, 16, 4),
    ("bfloat16", 2048, 16, 8),
    ("float32", 64, 16, 1),  # 4 MiB of partial sums: not split
    ("float32", 2048, 256, 16),  # 64 would be wanted: capped
])
def test_kernel_config_backward_splits(dtype, length, state, splits):
    s = spec(batch=8, dim=2048, length=length, state=state, dtype=dtype)
    cfg = PallasTritonScan().kernel_config(s, softplus=True, has_D=True, has_bias=True,
                                           has_h0=False)
    assert cfg.bwd_splits == splits
    # explicit: kept, but never more launches than tiles
    fixed = PallasTritonScan(bwd_splits=3).kernel_config(s, softplus=True, has_D=True,
                                                         has_bias=True, has_h0=False)
    assert fixed.bwd_splits == min(3, fixed.n_tiles)
    # 10 tiles asked in 6 launches: ranges of 2 tiles, so 5 launches
    assert PallasTritonScan(bwd_splits=6).kernel_config(
        spec(length=640), softplus=True, has_D=True, has_bias=True, has_h0=False
    ).bwd_splits == 5
    # contiguous ranges covering every tile once, the last range first
    for c in (cfg, fixed, dataclasses.replace(cfg, bwd_splits=cfg.n_tiles)):
        ranges = pt._bwd_ranges(c)
        assert len(ranges) == c.bwd_splits and all(n >= 1 for _, n in ranges)
        ends = [first + n for first, n in ranges]
        assert ends[0] == c.n_tiles and ranges[-1][0] == 0
        assert [first for first, _ in ranges[:-1]] == ends[1:]


def test_kernel_config_backward_wave():
    """On a GPU, backward launches of at most what its SMs hold at once (8 one-warp
    programs an SM at state 16: 255 registers a thread); elsewhere one launch a range."""
    s = spec(batch=8, dim=5120, length=2048, dtype="bfloat16")
    kw = dict(softplus=True, has_D=True, has_bias=True, has_h0=False)
    assert PallasTritonScan().kernel_config(s, **kw).bwd_wave == 8 * 160  # no GPU here
    assert PallasTritonScan().kernel_config(s, **kw).tile == 32
    with unittest.mock.patch.object(pt, "_gpu_sm_count", lambda: 132):
        cfg = PallasTritonScan().kernel_config(s, **kw)
        # a grid of more than one wave: launches of one wave, and 16-step tiles
        assert (cfg.bwd_wave, cfg.tile) == (132 * 8, 16)
        assert PallasTritonScan(tile_l=32).kernel_config(s, **kw).tile == 32
        # a grid within one wave keeps one launch a range, and 32-step tiles
        small = PallasTritonScan().kernel_config(spec(batch=8, dim=2048, length=2048), **kw)
        assert (small.bwd_wave, small.tile) == (8 * 64, 32)
        assert PallasTritonScan(interpret=True).kernel_config(s, **kw).bwd_wave == 8 * 160
        # state 1: 8 entries a thread in 8-step sub-tiles, 168 registers, 12 an SM
        for state, per_sm in ((1, 12), (4, 8)):
            assert PallasTritonScan().kernel_config(
                spec(batch=16, dim=5120, length=2048, state=state), **kw
            ).bwd_wave == 132 * per_sm
    assert PallasTritonScan(bwd_wave=100).kernel_config(s, **kw).bwd_wave == 100
    # 8 ranges of 1280 items in launches of 1056: consecutive, every item once
    items = pt._bwd_launch_items(cfg, 1280)
    assert -(-2048 // cfg.tile) == cfg.n_tiles
    assert cfg.bwd_splits == 8 and len(items) == 10
    assert [q for q, _ in items] == list(range(0, 8 * 1280, 1056))
    assert sum(n for _, n in items) == 8 * 1280


@pytest.mark.parametrize("dtype, state, a_rows, unroll", [
    ("bfloat16", 16, True, 8), ("float16", 16, True, 8), ("float32", 16, True, 8),
    ("bfloat16", 64, False, 2),
])
def test_kernel_config_forward_layouts(dtype, state, a_rows, unroll):
    # A row by row and 8-step sub-tiles up to 16 state entries a thread; beyond that
    # the 2D layout and fewer steps.
    cfg = PallasTritonScan().kernel_config(
        spec(dim=2048, state=state, length=2048, dtype=dtype), softplus=True, has_D=True,
        has_bias=True, has_h0=False,
    )
    assert (cfg.a_rows, cfg.unroll) == (a_rows, unroll)
    assert cfg.tile % cfg.unroll == 0
    assert cfg.fast_math


def test_interpret_forward_2d_layout():
    # a_rows forced off (the layout larger states take): same function
    rng = np.random.default_rng(5)
    inp, seg = make_inputs(rng, 2, 37, 12, 5, groups=2, dtype="float32")
    y, h = run(interp(a_rows=False, unroll=8), to_jax(inp, "float32"), seg)
    y_ref, h_ref = oracle_of(inp, seg)
    rtol, atol = TOL["float32"]
    assert_close("y", y, y_ref, rtol, atol, REL["float32"])
    assert_close("h", h, h_ref, rtol, atol, 1e-5)


# ----------------------------------------------------------------------------
# Lowering for an abstract H100 (CPU): the real Triton lowering rules, realistic shapes


@pytest.mark.parametrize("dtype, length, state, groups, wave", [
    ("bfloat16", 2048, 16, None, None), ("float32", 1000, 64, 4, 80),
    ("float16", 4096, 256, None, None),
])
def test_lowers_for_h100(dtype, length, state, groups, wave):
    b, d = 2, 1536
    S = jax.ShapeDtypeStruct
    gshape = (b, length, state) if groups is None else (b, length, groups, state)
    shapes = (S((b, length, d), dtype), S((b, length, d), dtype), S((d, state), jnp.float32),
              S(gshape, dtype), S(gshape, dtype), S((d,), jnp.float32), S((b, length, d), dtype),
              S((d,), jnp.float32), S((b, d, state), jnp.float32), S((b, length), jnp.int32))
    impl = PallasTritonScan(bwd_wave=wave)

    def f(u, delta, A, B, C, D, z, bias, h0, seg):
        return selective_scan(u, delta, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True,
                              initial_state=h0, segment_ids=seg, return_final_state=True,
                              impl=impl)

    def fb(*a):
        out, vjp = jax.vjp(lambda *x: f(*x, a[-1]), *a[:-1])
        return vjp(out)

    mesh = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
        device_kind="NVIDIA H100", num_cores=132, platform="cuda"))
    s = ScanSpec(batch=b, length=length, dim=d, state=state, groups=groups or 1, dtype=dtype,
                 has_z=True, has_segments=True)
    cfg = impl.kernel_config(s, softplus=True, has_D=True, has_bias=True, has_h0=True)
    splits = cfg.bwd_splits
    assert splits > 1  # these shapes exercise the split backward
    programs = b * d // cfg.bwd_block_d
    n_launch = len(pt._bwd_launch_items(cfg, programs))
    # launches of `wave` items mix two ranges (96 programs a range, launches of 80)
    assert n_launch == (splits if wave is None else -(-splits * programs // wave))
    # The CPU platform would be refused: lift `unsupported` to reach the lowering.
    with jax.sharding.use_abstract_mesh(mesh), unittest.mock.patch.object(
        pt.PallasTritonScan, "unsupported", lambda *a: None
    ):
        for fn, kernels in ((f, 1), (fb, 1 + n_launch)):
            text = jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
            assert text.count("custom_call @__gpu$xla.gpu.triton") == kernels
    # A launch that completes a range, but the last, waits for that range's partial
    # sums to be reduced (with launches of 80 and ranges of 96 items, launch 0 completes
    # none); every launch updates the 4 carried sums in place, and those after the
    # first du, d_delta and dz.
    completing = len({((k + 1) * programs - 1) // cfg.bwd_wave for k in range(splits)})
    assert text.count("stablehlo.optimization_barrier") == completing - 1
    assert text.count("#stablehlo.output_operand_alias<") == 4 * n_launch + 3 * (n_launch - 1)


# ----------------------------------------------------------------------------
# On the GPU, realistic shapes


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_gpu_forward_matches_oracle(dtype):
    rng = np.random.default_rng(100)
    inp, seg = make_inputs(rng, 2, 1000, 384, 16, dtype=dtype)
    y, h = run("pallas_triton", to_jax(inp, dtype), seg)
    y_ref, h_ref = oracle_of(inp, seg)
    assert_close("y", y, y_ref, *TOL[dtype], REL[dtype])
    assert_close("h", h, h_ref, *TOL["float32"], 1e-5)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_gpu_gradients_match_reference(dtype):
    """Odd length (the official kernel's padded-tail bug), grouped B/C, every input."""
    rng = np.random.default_rng(101)
    inp, seg = make_inputs(rng, 2, 2049, 512, 16, groups=2, dtype=dtype)
    x = to_jax(inp, dtype)
    y, h = run("pallas_triton", x, seg)
    y_r, h_r = run("reference", x, seg)
    assert_close("y", y, y_r, *TOL[dtype], REL[dtype])
    assert_close("h", h, h_r, *TOL["float32"], 1e-5)
    gk = grads("pallas_triton", x, seg, np.random.default_rng(5))
    gr = grads("reference", x, seg, np.random.default_rng(5))
    check_grads(gk, gr, dtype, {"float32": 1e-5, "float16": 3e-3, "bfloat16": 2e-2}[dtype])


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("state", [1, 64, 256])
def test_gpu_state_sizes(state):
    rng = np.random.default_rng(102)
    inp, seg = make_inputs(rng, 1, 300, 96, state)
    x = to_jax(inp, "float32")
    y, h = run("pallas_triton", x, seg)
    y_ref, h_ref = oracle_of(inp, seg)
    assert_close("y", y, y_ref, *TOL["float32"], 1e-5)
    assert_close("h", h, h_ref, *TOL["float32"], 1e-5)
    gk = grads("pallas_triton", x, seg, np.random.default_rng(6))
    gr = grads("reference", x, seg, np.random.default_rng(6))
    check_grads(gk, gr, "float32", 1e-5)


@pytest.mark.gpu
@needs_gpu
def test_gpu_backward_is_deterministic_and_auto_picks_a_kernel():
    rng = np.random.default_rng(103)
    inp, seg = make_inputs(rng, 2, 1024, 256, 16, dtype="bfloat16")
    x = to_jax(inp, "bfloat16")
    g1 = grads("pallas_triton", x, seg, np.random.default_rng(1))
    g2 = grads("pallas_triton", x, seg, np.random.default_rng(1))
    for k in g1:
        np.testing.assert_array_equal(np.asarray(g1[k]), np.asarray(g2[k]), err_msg=k)
    # 32 tiles in 3 launches (11 + 11 + 10): the same bits as the one launch of the default
    assert pt._bwd_ranges(PallasTritonScan(bwd_splits=3).kernel_config(
        spec(batch=2, length=1024, dim=256, dtype="bfloat16"), softplus=True, has_D=True,
        has_bias=True, has_h0=True)) == [(22, 10), (11, 11), (0, 11)]
    assert_same_grads(grads(PallasTritonScan(bwd_splits=3), x, seg, np.random.default_rng(1)),
                      g1, "bwd_splits=3")
    # 16 programs (2 x 8 channel blocks) in launches of 5: each launch mixes two ranges
    assert_same_grads(grads(PallasTritonScan(bwd_splits=3, bwd_wave=5), x, seg,
                            np.random.default_rng(1)), g1, "bwd_splits=3, bwd_wave=5")
    s = spec(batch=8, length=2048, dim=2048, dtype="bfloat16")
    assert PallasTritonScan().unsupported(s, "gpu") is None
    assert auto_implementation(s)[0] != "chunked"


@pytest.mark.gpu
@needs_gpu
def test_gpu_split_backward_frees_partial_sums():
    """XLA frees each launch's dB/dC partial sums before the next launch allocates its
    own: the forward+backward executable's memory falls by about 3/4 of them with 4
    launches."""
    b, length, d, n = 2, 4096, 512, 16
    seq, bc = jnp.zeros((b, length, d)), jnp.zeros((b, length, n))
    args = [seq, seq, -jnp.ones((d, n)), bc, bc, jnp.zeros((d,)), seq, jnp.zeros((d,))]

    def peak(splits):
        impl = PallasTritonScan(bwd_splits=splits)

        def fb(args, dy):
            y, vjp = jax.vjp(lambda *a: selective_scan(
                *a[:6], z=a[6], delta_bias=a[7], delta_softplus=True, impl=impl), *args)
            return vjp(dy)

        ma = jax.jit(fb).lower(args, args[0]).compile().memory_analysis()
        return ma.temp_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes

    partials = 2 * b * (d // 32) * length * n * 4  # dB and dC, 32-channel blocks
    saved = peak(1) - peak(4)
    assert saved >= 0.6 * partials, (saved, partials)


@pytest.mark.gpu
@needs_gpu
def test_gpu_offsets_past_4gib():
    """A bf16 tensor over 2**32 bytes: its last batch row must match that row alone."""
    b, l, d, n = 17, 8192, 16384, 16  # 2.28e9 elements a tensor
    keys = jax.random.split(jax.random.key(0), 6)
    bf = jnp.bfloat16
    u = jax.random.normal(keys[0], (b, l, d), bf)
    delta = (0.5 * jax.random.normal(keys[1], (b, l, d), jnp.float32) - 2).astype(bf)
    A = -jnp.exp(jax.random.uniform(keys[2], (d, n), jnp.float32, 0.0, 2.7))
    B = jax.random.normal(keys[3], (b, l, n), bf)
    C = jax.random.normal(keys[4], (b, l, n), bf)
    z = jax.random.normal(keys[5], (b, l, d), bf)
    f = jax.jit(lambda u, delta, B, C, z: selective_scan(
        u, delta, A, B, C, z=z, delta_softplus=True, return_final_state=True,
        impl="pallas_triton"))
    y, h = f(u, delta, B, C, z)
    last = slice(b - 1, b)
    y1, h1 = f(u[last], delta[last], B[last], C[last], z[last])
    np.testing.assert_array_equal(np.asarray(y[last, -64:].astype(jnp.float32)),
                                  np.asarray(y1[:, -64:].astype(jnp.float32)))
    np.testing.assert_array_equal(np.asarray(h[last]), np.asarray(h1))
