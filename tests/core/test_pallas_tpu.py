"""The Pallas Mosaic TPU kernels (`pallas_tpu`), checked without a TPU.

No TPU is reachable from CI, so the kernels are proven two ways:
- in Pallas's TPU interpreter on the CPU, with
  `InterpretParams(random_seed=..., uninitialized_memory="nan")`: grid axes marked
  parallel run in a seeded random order and scratch starts as NaN, so a carry over an
  axis wrongly marked parallel, or a read of unwritten scratch, shows up as a wrong or
  NaN result. Outputs and final states are compared with the float64 oracle,
  gradients of every input with the reference implementation's VJP and with float64
  central differences of the oracle. Shapes are small, but cover several length and
  dim tiles, padding of time and of channels per group, and sub-chunks;
- by lowering for abstract "TPU v5 lite" and "TPU v6 lite" devices at a realistic
  shape (batch 8, dim 5120, length 8192, state 16) in bfloat16 and float32: JAX's real
  Mosaic lowering rules run on the CPU (block-shape rules, supported primitives);
  nothing is compiled by libtpu or run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import AbstractDevice, AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P
from mamba_ssm_core import (
    PallasTpuScan,
    ScanArgs,
    ScanSpec,
    auto_implementation,
    implementations,
    selective_scan,
)
from mamba_ssm_core import _pallas_tpu as pt

from tests import oracle
from tests.core.conftest import scan_inputs

TOL = 1e-5  # float32 against the float64 oracle, relative
HALF_REL = {"bfloat16": 1e-2, "float16": 2e-3}  # y is rounded to the half dtype
DIFF_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def _impl(seed: int, **tiles) -> PallasTpuScan:
    params = pltpu.InterpretParams(random_seed=seed, uninitialized_memory="nan")
    return PallasTpuScan(**tiles, interpret=params)


def _jnp(kwargs: dict, dtype=None) -> dict:
    """NumPy inputs -> jax arrays; `dtype` recasts the activations u, delta, z, B, C."""
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, np.ndarray):
            v = jnp.asarray(v)
            if dtype is not None and k in ("u", "delta", "z", "B", "C"):
                v = v.astype(dtype)
        out[k] = v
    return out


def _np64(kwargs: dict) -> dict:
    """jax arrays -> what the oracle takes (floating arrays as float64)."""
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, jax.Array):
            v = np.asarray(v.astype(jnp.float32) if jnp.issubdtype(v.dtype, jnp.floating) else v)
            if v.dtype.kind == "f":
                v = v.astype(np.float64)
        out[k] = v
    return out


def _run(impl, kwargs: dict):
    kwargs = dict(kwargs)
    softplus = kwargs.pop("delta_softplus")
    return jax.jit(lambda kw: selective_scan(**kw, delta_softplus=softplus, impl=impl,
                                             return_final_state=True))(kwargs)


def _boundary_segments(batch: int, length: int, boundary: int) -> np.ndarray:
    """Row 0 restarts exactly at `boundary` (a length-tile edge); other rows at random steps."""
    rng = np.random.default_rng(length)
    ids = np.cumsum(rng.random((batch, length)) < 0.05, axis=1)
    ids[0] = np.arange(length) >= boundary
    return ids.astype(np.int32)


# ---------------------------------------------------------------------------
# Forward against the oracle, in the interpreter

# name: (batch, length, dim, state, groups, scan_inputs options, tiles, seed)
FWD_CASES = {
    # Each padded to one (128 x 128) tile; 3 groups -> 3 dim tiles of 2 real channels.
    "length-1": (1, 1, 2, 3, 1, {}, {}, 0),
    "odd-3-groups": (2, 37, 6, 4, 3, {}, {}, 1),
    "ungrouped-no-options": (
        2, 130, 5, 3, None,
        dict(D=False, z=False, delta_bias=False, delta_softplus=False, initial_state=False,
             segments=False),
        dict(time_tile=128), 2,
    ),
    "bias-without-softplus": (
        1, 200, 130, 8, 1, dict(z=False, delta_softplus=False), dict(dim_tile=128), 3,
    ),
    "state-64-table-tiles": (1, 64, 128, 64, 1, {}, {}, 4),
}  # fmt: skip


@pytest.mark.parametrize("case", list(FWD_CASES))
def test_forward_matches_oracle(case):
    batch, length, dim, state, groups, options, tiles, seed = FWD_CASES[case]
    kwargs = _jnp(scan_inputs(np.random.default_rng(seed), batch, length, dim, state, groups,
                              **options))
    y, h = _run(_impl(seed, **tiles), kwargs)
    ref_y, ref_h = oracle.selective_scan(**_np64(kwargs))
    assert y.shape == ref_y.shape and y.dtype == jnp.float32
    assert h.shape == ref_h.shape and h.dtype == jnp.float32
    assert oracle.rel_err(y, ref_y) < TOL, oracle.rel_err(y, ref_y)
    assert oracle.rel_err(h, ref_h) < TOL, oracle.rel_err(h, ref_h)


# 3 length tiles (the last padded), 2 dim tiles (one per group), a reset exactly on a
# length-tile edge, an initial state: run under several interpreter seeds.
MULTI_TILE = dict(time_tile=128, dim_tile=128, backward_dim_tile=128, sub_chunk=16)


def _multi_tile_inputs(seed: int) -> dict:
    kwargs = scan_inputs(np.random.default_rng(seed), 2, 300, 256, 16, groups=2)
    kwargs["segment_ids"] = _boundary_segments(2, 300, boundary=128)
    return _jnp(kwargs)


@pytest.mark.parametrize("seed", [10, 11, 12])
def test_multi_tile_forward_under_interpreter_seeds(seed):
    kwargs = _multi_tile_inputs(seed)
    y, h = _run(_impl(seed, **MULTI_TILE), kwargs)
    ref_y, ref_h = oracle.selective_scan(**_np64(kwargs))
    assert oracle.rel_err(y, ref_y) < TOL, oracle.rel_err(y, ref_y)
    assert oracle.rel_err(h, ref_h) < TOL, oracle.rel_err(h, ref_h)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_inputs(dtype):
    """Half-precision activations: y rounded to the dtype, the final state float32."""
    kwargs = _jnp(scan_inputs(np.random.default_rng(20), 2, 150, 128, 8, 1), jnp.dtype(dtype))
    y, h = _run(_impl(20, time_tile=128), kwargs)
    assert y.dtype == jnp.dtype(dtype) and h.dtype == jnp.float32
    ref_y, ref_h = oracle.selective_scan(**_np64(kwargs))  # on the rounded inputs
    assert oracle.rel_err(y, ref_y) < HALF_REL[dtype], oracle.rel_err(y, ref_y)
    assert oracle.rel_err(h, ref_h) < TOL, oracle.rel_err(h, ref_h)


def test_misordered_length_axis_is_caught(monkeypatch):
    """The interpreter check has teeth: marking the length axis parallel breaks the result.

    With all three grid axes "parallel" the interpreter visits length tiles in a
    seeded random order, so the carried state (and its zero/initial fill at tile 0)
    is wrong for some seeds; the real kernel must not be run that way on a TPU either.
    """
    monkeypatch.setattr(pt, "_DIMENSION_SEMANTICS", ("parallel", "parallel", "parallel"))
    kwargs = _multi_tile_inputs(30)
    ref_y, _ = oracle.selective_scan(**_np64(kwargs))
    errors = []
    for seed in (30, 31, 32, 33):
        y, _ = _run(_impl(seed, **MULTI_TILE), kwargs)
        err = oracle.rel_err(y, ref_y)
        errors.append(err)
        if not err < TOL:  # NaN (unwritten scratch read) or a wrong carry
            break
    assert not all(e < TOL for e in errors), errors


# ---------------------------------------------------------------------------
# Gradients: every input, against the reference VJP and float64 central differences


def _loss(impl, kwargs: dict, weights: tuple):
    """A scalar touching y and the final state: sum(y * wy) + sum(h * wh)."""
    softplus = kwargs["delta_softplus"]
    rest = {k: v for k, v in kwargs.items() if k not in DIFF_ARGS and k != "delta_softplus"}

    def loss(diff):
        y, h = selective_scan(**diff, **rest, delta_softplus=softplus, impl=impl,
                              return_final_state=True)
        return jnp.sum(y.astype(jnp.float32) * weights[0]) + jnp.sum(h * weights[1])

    return loss, {k: kwargs[k] for k in DIFF_ARGS}


def _oracle_loss(kwargs64: dict, weights: tuple) -> float:
    y, h = oracle.selective_scan(**kwargs64)
    return float(np.sum(y * np.asarray(weights[0], np.float64))
                 + np.sum(h * np.asarray(weights[1], np.float64)))


GRAD_CASES = {
    # name: (inputs, tiles, seed, dtype)
    "multi-tile-softplus": (lambda: _multi_tile_inputs(40), MULTI_TILE, 40, "float32"),
    "odd-3-groups-no-softplus": (
        lambda: _jnp(scan_inputs(np.random.default_rng(41), 2, 37, 6, 4, 3,
                                 delta_softplus=False)),
        {}, 41, "float32",
    ),
    "bfloat16": (
        lambda: _jnp(scan_inputs(np.random.default_rng(42), 2, 150, 128, 8, 1), jnp.bfloat16),
        dict(time_tile=128, sub_chunk=32), 42, "bfloat16",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_gradients(case):
    make, tiles, seed, dtype = GRAD_CASES[case]
    kwargs = make()
    rng = np.random.default_rng(seed)
    b, length, d = kwargs["u"].shape
    n = kwargs["A"].shape[1]
    weights = (jnp.asarray(rng.standard_normal((b, length, d)), jnp.float32),
               jnp.asarray(rng.standard_normal((b, d, n)), jnp.float32))
    loss, diff = _loss(_impl(seed, **tiles), kwargs, weights)
    grads = jax.jit(jax.grad(loss))(diff)
    ref_loss, _ = _loss("reference", kwargs, weights)
    ref_grads = jax.jit(jax.grad(ref_loss))(diff)
    # bfloat16 gradients of the activations are rounded to bfloat16 (2**-8).
    bound = TOL if dtype == "float32" else 1e-2
    for k in DIFF_ARGS:
        assert grads[k].shape == diff[k].shape and grads[k].dtype == diff[k].dtype, k
        assert float(jnp.linalg.norm(ref_grads[k].astype(jnp.float32))) > 0, k
        err = oracle.rel_err(grads[k], ref_grads[k])
        assert err < bound, (k, err)

    # <grad, v> against (L(x + eps v) - L(x - eps v)) / (2 eps) of the float64 oracle.
    base = _np64(kwargs)
    eps = 1e-6
    fd_bound = 1e-4 if dtype == "float32" else 2e-2
    for k in DIFF_ARGS:
        v = rng.standard_normal(base[k].shape)
        plus = _oracle_loss(base | {k: base[k] + eps * v}, weights)
        minus = _oracle_loss(base | {k: base[k] - eps * v}, weights)
        numeric = (plus - minus) / (2 * eps)
        analytic = float(np.sum(np.asarray(grads[k].astype(jnp.float32), np.float64) * v))
        assert abs(analytic - numeric) <= fd_bound * abs(numeric), (k, analytic, numeric)


def test_vmap_and_jit():
    """vmap over an extra leading axis (Pallas adds a grid axis) and jit, forward and grad.

    interpret=True (the generic interpreter): the TPU interpreter of jax 0.10.2 and
    0.12.0.1 fails on any vmapped pallas_call with dimension_semantics (it zips the
    vmapped grid against the unvmapped semantics). The TPU lowering of the same vmap is
    checked in `test_vmapped_lowers_for_abstract_tpu`.
    """
    rng = np.random.default_rng(50)
    stacked = [scan_inputs(rng, 1, 20, 4, 3, 2) for _ in range(2)]
    kwargs = {k: (jnp.asarray(np.stack([s[k] for s in stacked]))
                  if isinstance(stacked[0][k], np.ndarray) else stacked[0][k])
              for k in stacked[0]}
    softplus = kwargs.pop("delta_softplus")

    segment_ids = kwargs.pop("segment_ids")

    def f(impl):
        @jax.jit
        def run(kw, seg):
            y, h = selective_scan(**kw, segment_ids=seg, delta_softplus=softplus, impl=impl,
                                  return_final_state=True)
            return y, h, jnp.sum(y * y) + jnp.sum(h)
        return run

    def vmapped_grads(run):
        return jax.jit(jax.vmap(jax.grad(lambda kw, seg: run(kw, seg)[2])))(kwargs, segment_ids)

    # The vmapped calls are themselves jitted: one compiled program each.
    run = f(PallasTpuScan(interpret=True))
    y, h, _ = jax.jit(jax.vmap(run))(kwargs, segment_ids)
    grads = vmapped_grads(run)
    ref_grads = vmapped_grads(f("reference"))
    for i, s in enumerate(stacked):
        ref_y, ref_h = oracle.selective_scan(**s)
        assert oracle.rel_err(y[i], ref_y) < TOL and oracle.rel_err(h[i], ref_h) < TOL, i
    for k in DIFF_ARGS:
        assert oracle.rel_err(grads[k], ref_grads[k]) < TOL, k


# ---------------------------------------------------------------------------
# Registration, `auto`, configuration

SPEC = ScanSpec(batch=8, length=8192, dim=5120, state=16, groups=1, dtype="bfloat16",
                has_z=True, has_segments=False)


def test_registered_and_picked_by_auto_on_tpu_only():
    assert "pallas_tpu" in implementations()
    assert auto_implementation(SPEC, "tpu")[0] == "pallas_tpu"
    name, reason = auto_implementation(SPEC, "cpu")
    assert name != "pallas_tpu"
    assert PallasTpuScan().unsupported(SPEC, "cpu") is not None
    assert PallasTpuScan(interpret=True).unsupported(SPEC, "cpu") is None


def test_explicit_request_off_tpu_without_interpret_raises():
    kwargs = _jnp(scan_inputs(np.random.default_rng(60), 1, 8, 4, 2, 1))
    with pytest.raises(ValueError, match="pallas_tpu.*interpret"):
        _run("pallas_tpu", kwargs)


@pytest.mark.parametrize(
    "config,exc,field",
    [
        (dict(time_tile=100), ValueError, "time_tile"),
        (dict(dim_tile=64), ValueError, "dim_tile"),
        (dict(backward_dim_tile=0), ValueError, "backward_dim_tile"),
        (dict(sub_chunk=12), ValueError, "sub_chunk"),
        (dict(sub_chunk=256), ValueError, "sub_chunk"),
        (dict(interpret="yes"), TypeError, "interpret"),
    ],
)
def test_config_is_checked(config, exc, field):
    with pytest.raises(exc, match=field):
        PallasTpuScan(**config)


def test_dim_tile_that_does_not_divide_the_channels_is_refused():
    kwargs = _jnp(scan_inputs(np.random.default_rng(61), 1, 8, 384, 2, 1))
    with pytest.raises(ValueError, match="dim_tile=256"):
        _run(PallasTpuScan(dim_tile=256, interpret=True), kwargs)


@pytest.mark.parametrize("length", [1, 128, 129, 8192])
@pytest.mark.parametrize("state", [1, 16, 32, 64, 256])
@pytest.mark.parametrize("group_channels", [1, 130, 640, 5120])
def test_tile_table_respects_tpu_block_rules(length, state, group_channels):
    tl, td, td_b, k = pt.tile_sizes(length, state, group_channels)
    padded = -(-group_channels // 128) * 128
    assert tl % 128 == 0 and tl in (128, 256)
    for t in (td, td_b):
        assert t % 128 == 0 and padded % t == 0 and t <= 512
    assert k % 8 == 0 and 128 % k == 0
    # The (N, dim tile) float32 state stays at 8 vregs or fewer where N allows it.
    assert state * td <= 8 * 1024 or td == 128


# ---------------------------------------------------------------------------
# Lowering for TPUs we do not have (trace and lower only: nothing is compiled or run)

REALISTIC = dict(batch=8, length=8192, dim=5120, state=16)


def _lower_for_tpu(kind: str, dtype, *, full: bool):
    b, t, d, n = (REALISTIC[k] for k in ("batch", "length", "dim", "state"))
    S = jax.ShapeDtypeStruct
    f32 = jnp.float32
    shapes = dict(
        u=S((b, t, d), dtype), delta=S((b, t, d), dtype), A=S((d, n), f32),
        B=S((b, t, 1, n), dtype), C=S((b, t, 1, n), dtype), D=S((d,), f32),
        z=S((b, t, d), dtype), delta_bias=S((d,), f32), initial_state=S((b, d, n), f32),
        segment_ids=S((b, t), jnp.int32),
    )  # fmt: skip
    if not full:
        shapes = {k: v for k, v in shapes.items() if k in ("u", "delta", "A", "B", "C")}
    impl = PallasTpuScan()

    def loss(diff, rest):
        args = ScanArgs(**{k: None for k in ScanArgs._fields} | diff | rest)
        y, h = impl(args, delta_softplus=full)
        return jnp.sum(y.astype(f32)) + jnp.sum(h)

    diff = {k: v for k, v in shapes.items() if k != "segment_ids"}
    rest = {k: v for k, v in shapes.items() if k == "segment_ids"}
    mesh = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
        device_kind=kind, num_cores=1, platform="tpu"))
    with jax.sharding.use_abstract_mesh(mesh):
        traced = jax.jit(jax.value_and_grad(loss)).trace(diff, rest)
        return traced.lower(lowering_platforms=("tpu",)).as_text()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bfloat16", "float32"])
@pytest.mark.parametrize("kind", ["TPU v5 lite", "TPU v6 lite"])
def test_lowers_for_abstract_tpu_at_realistic_shape(kind, dtype):
    """Forward and backward kernels, every optional input, through the Mosaic lowering."""
    text = _lower_for_tpu(kind, dtype, full=True)
    assert text.count("tpu_custom_call") == 2, text.count("tpu_custom_call")
    assert "selective_scan_tpu_fwd" in text and "selective_scan_tpu_bwd" in text


def test_vmapped_lowers_for_abstract_tpu():
    """vmap adds a leading grid axis; Mosaic's lowering must place it (parallel) itself."""
    b, t, d, n = 4, 2048, 5120, 16
    S = jax.ShapeDtypeStruct
    shapes = dict(u=S((2, b, t, d), jnp.bfloat16), delta=S((2, b, t, d), jnp.bfloat16),
                  A=S((2, d, n), jnp.float32), B=S((2, b, t, 1, n), jnp.bfloat16),
                  C=S((2, b, t, 1, n), jnp.bfloat16))
    impl = PallasTpuScan()

    def loss(diff):
        args = ScanArgs(**{k: None for k in ScanArgs._fields} | diff)
        y, h = impl(args, delta_softplus=True)
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(h)

    mesh = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
        device_kind="TPU v5 lite", num_cores=1, platform="tpu"))
    with jax.sharding.use_abstract_mesh(mesh):
        traced = jax.jit(jax.vmap(jax.value_and_grad(loss))).trace(shapes)
        text = traced.lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") == 2


def test_lowers_without_optional_inputs():
    text = _lower_for_tpu("TPU v5 lite", jnp.float32, full=False)
    assert text.count("tpu_custom_call") == 2


# ---------------------------------------------------------------------------
# Inside jax.shard_map (batch and channel axes)
#
# These use interpret=True: with InterpretParams, the TPU interpreter's io_callbacks copy
# each shard's arrays to CPU device 0 while the other device waits in its own callback,
# which deadlocks above a few tens of KiB per shard (seen on jax 0.10.2, 2 cores).


def _sharded_problem(seed: int):
    kwargs = _jnp(scan_inputs(np.random.default_rng(seed), 2, 150, 256, 8, 1))
    kwargs["segment_ids"] = jnp.asarray(_boundary_segments(2, 150, boundary=128))
    return kwargs


def test_shard_map_over_batch_forward_and_gradients():
    mesh = jax.make_mesh((2,), ("data",))
    kwargs = _sharded_problem(70)
    softplus = kwargs.pop("delta_softplus")
    impl = PallasTpuScan(time_tile=128, dim_tile=128, interpret=True)
    batch_args = ("u", "delta", "B", "C", "z", "initial_state", "segment_ids")
    specs = {k: P("data") if k in batch_args else P() for k in kwargs}
    local_diff = ("u", "delta", "B", "C", "z", "initial_state")

    def body(kw):
        def loss(diff):
            y, h = selective_scan(**(kw | diff), delta_softplus=softplus, impl=impl,
                                  return_final_state=True)
            return jnp.sum(y * y) + jnp.sum(h), (y, h)

        grads, (y, h) = jax.grad(loss, has_aux=True)({k: kw[k] for k in local_diff})
        return y, h, grads

    placed = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in kwargs.items()}
    y, h, grads = jax.jit(jax.shard_map(
        body, mesh=mesh, in_specs=(specs,),
        out_specs=(P("data"), P("data"), {k: P("data") for k in local_diff}),
        check_vma=False,
    ))(placed)
    assert y.sharding.spec[0] == "data"
    ref_y, ref_h = oracle.selective_scan(**_np64(kwargs), delta_softplus=softplus)
    assert oracle.rel_err(y, ref_y) < TOL and oracle.rel_err(h, ref_h) < TOL

    def ref_loss(diff):
        y, h = selective_scan(**(kwargs | diff), delta_softplus=softplus, impl="reference",
                              return_final_state=True)
        # Per-shard losses sum to the whole batch's: each shard's gradient is its slice.
        return jnp.sum(y * y) + jnp.sum(h)

    ref_grads = jax.jit(jax.grad(ref_loss))({k: kwargs[k] for k in local_diff})
    for k in local_diff:
        assert oracle.rel_err(grads[k], ref_grads[k]) < TOL, k


def test_shard_map_over_batch_and_channels():
    mesh = jax.make_mesh((2, 2), ("data", "model"))
    kwargs = _sharded_problem(71)
    softplus = kwargs.pop("delta_softplus")
    impl = PallasTpuScan(interpret=True)
    specs = dict(
        u=P("data", None, "model"), delta=P("data", None, "model"), z=P("data", None, "model"),
        A=P("model"), D=P("model"), delta_bias=P("model"), B=P("data"), C=P("data"),
        initial_state=P("data", "model"), segment_ids=P("data"),
    )  # fmt: skip

    def body(kw):
        return selective_scan(**kw, delta_softplus=softplus, impl=impl, return_final_state=True)

    placed = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in kwargs.items()}
    y, h = jax.jit(jax.shard_map(
        body, mesh=mesh, in_specs=(specs,),
        out_specs=(P("data", None, "model"), P("data", "model")), check_vma=False,
    ))(placed)
    ref_y, ref_h = oracle.selective_scan(**_np64(kwargs), delta_softplus=softplus)
    assert oracle.rel_err(y, ref_y) < TOL and oracle.rel_err(h, ref_h) < TOL
