"""sharded_selective_scan on 8 virtual CPU devices against the unsharded op and the oracle.

Every layout must give the unsharded op's outputs, final state and gradients of
every input (float32, 1e-5 relative), with and without an initial state, and
with segment resets inside shards and exactly at shard boundaries.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec

from mamba_ssm_core import (
    ChunkedScan,
    PallasTpuScan,
    PallasTritonScan,
    selective_scan,
    sharded_selective_scan,
)
from tests import oracle
from tests.core.conftest import unhooked

TOL = 1e-5
BATCH, LENGTH, DIM, STATE = 4, 32, 8, 4

# Every test runs on the (2, 2, 2) mesh; layouts name which axes split what.
LAYOUTS = {
    "batch": dict(batch_axis="data"),
    "channel": dict(channel_axis="model"),
    "sequence": dict(sequence_axis="seq"),
    "batch+channel+sequence": dict(batch_axis="data", channel_axis="model", sequence_axis="seq"),
    "sequence over 8": dict(sequence_axis=("data", "model", "seq")),
    "batch over 2 axes+sequence": dict(batch_axis=("data", "model"), sequence_axis="seq"),
}
IMPLS = {
    "reference": "reference",
    # 3 does not divide the per-shard lengths: exercises the chunked padding per shard.
    "chunked": ChunkedScan(chunk_size=3),
    "associative": "associative",
}
DIFF_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < 8:
        pytest.fail("these tests need 8 devices (the root conftest forces 8 CPU devices)")
    return jax.make_mesh((2, 2, 2), ("data", "model", "seq"))


def _segments(length: int) -> np.ndarray:
    """(4, length) ids: row 0 one segment; row 1 a reset exactly at each boundary of 2
    and of 8 shards; row 2 resets inside shards only; row 3 a reset at step 1 and near the end."""
    t = np.arange(length)
    rows = [
        np.zeros(length),
        (t >= length // 2) + (t >= length // 8) + (t >= 3 * length // 8),
        (t >= 5) + (t >= length // 2 + 3),
        (t >= 1) + (t >= length - 2),
    ]
    return np.stack(rows).astype(np.int32)


def _inputs(seed: int, *, groups: int | None = None, dim: int = DIM, initial_state=True,
            segments=True, batch: int = BATCH) -> dict:
    rng = np.random.default_rng(seed)
    f = lambda *shape, scale=1.0: jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)
    bc = (batch, LENGTH, STATE) if groups is None else (batch, LENGTH, groups, STATE)
    x = dict(
        u=f(batch, LENGTH, dim),
        delta=f(batch, LENGTH, dim, scale=0.5),
        A=-jnp.exp(f(dim, STATE, scale=0.5)),
        B=f(*bc),
        C=f(*bc),
        D=f(dim),
        z=f(batch, LENGTH, dim),
        delta_bias=f(dim, scale=0.5),
        initial_state=f(batch, dim, STATE) if initial_state else None,
        segment_ids=jnp.asarray(_segments(LENGTH)[:batch]) if segments else None,
    )
    # Random cotangents for y and the final state.
    x["_wy"] = f(batch, LENGTH, dim)
    x["_wh"] = f(batch, dim, STATE)
    return x


def _run(scan_fn, x: dict):
    """jit'd (y, final state, gradients of every differentiable input) of a random linear loss."""
    names = [k for k in DIFF_ARGS if x[k] is not None]

    def loss(diff, rest):
        kw = {**rest, **diff}
        y, h = scan_fn(
            kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"],
            z=kw["z"], delta_bias=kw["delta_bias"], delta_softplus=True,
            initial_state=kw["initial_state"], segment_ids=kw["segment_ids"],
            return_final_state=True,
        )
        return jnp.sum(y * x["_wy"]) + jnp.sum(h * x["_wh"]), (y, h)

    diff = {k: x[k] for k in names}
    rest = {k: v for k, v in x.items() if k not in names and not k.startswith("_")}
    (_, (y, h)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(diff, rest)
    return y, h, grads


def _check_same(x: dict, mesh, layout: dict, impl) -> None:
    y0, h0, g0 = _run(lambda *a, **k: selective_scan(*a, **k, impl=impl), x)
    y1, h1, g1 = _run(
        lambda *a, **k: sharded_selective_scan(*a, **k, mesh=mesh, **layout, impl=impl), x
    )
    errors = {"y": oracle.rel_err(y1, y0), "final_state": oracle.rel_err(h1, h0)}
    errors |= {f"d{k}": oracle.rel_err(g1[k], g0[k]) for k in g0}
    assert set(g1) == set(g0) == {k for k in DIFF_ARGS if x[k] is not None}
    bad = {k: e for k, e in errors.items() if not e <= TOL}
    assert not bad, f"relative errors above {TOL}: {bad}"


@pytest.mark.parametrize("impl", ["reference", "chunked"])
@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_layouts_match_unsharded(mesh, layout, impl):
    """Initial state, segment resets, z, D, bias and softplus: outputs and all gradients."""
    _check_same(_inputs(0), mesh, LAYOUTS[layout], IMPLS[impl])


# The associative scan compiles slowest on the CPU: the two layouts that cover its
# sequence chaining and the combined split.
@pytest.mark.parametrize("layout", ["batch+channel+sequence", "sequence over 8"])
def test_associative_matches_unsharded(mesh, layout):
    _check_same(_inputs(0), mesh, LAYOUTS[layout], IMPLS["associative"])


@pytest.mark.parametrize(
    "impl",
    [
        PallasTritonScan(interpret=True, block_d=2, tile_l=4, unroll=2),
        PallasTpuScan(interpret=True),
    ],
    ids=["pallas_triton", "pallas_tpu"],
)
def test_pallas_kernels_per_shard(mesh, impl):
    """The Pallas kernels (custom_vjp) run inside shard_map, here in their interpreters."""
    _check_same(_inputs(0), mesh, LAYOUTS["batch+channel+sequence"], impl)


@pytest.mark.parametrize(
    "initial_state,segments",
    [(False, False), (True, False), (False, True)],
    ids=["plain", "initial_state", "segments"],
)
@pytest.mark.parametrize(
    "layout",
    [LAYOUTS["sequence"], LAYOUTS["sequence over 8"], LAYOUTS["batch+channel+sequence"]],
    ids=["sequence", "sequence over 8", "batch+channel+sequence"],
)
def test_sequence_variants(mesh, layout, initial_state, segments):
    """Without resets the gathered decays carry state across every boundary."""
    x = _inputs(1, initial_state=initial_state, segments=segments)
    _check_same(x, mesh, layout, "reference")


@pytest.mark.parametrize(
    "groups,layout",
    [
        (2, dict(channel_axis="model")),  # each shard holds one whole group
        (4, dict(channel_axis="model", sequence_axis="seq")),  # two groups a shard
        (2, dict(channel_axis=("model", "seq"))),  # two shards share each group
        (2, dict(batch_axis="data", channel_axis=("model", "seq"))),
        (1, dict(channel_axis="model", sequence_axis="seq")),  # grouped layout, one group
    ],
    ids=["g2-c2", "g4-c2-seq", "g2-c4", "g2-c4-batch", "g1-c2-seq"],
)
def test_grouped_bc(mesh, groups, layout):
    _check_same(_inputs(2, groups=groups), mesh, layout, "reference")


def test_matches_float64_oracle(mesh):
    x = _inputs(3)
    y, h = jax.jit(
        lambda u, delta, A, B, C, D, z, bias, h0, seg: sharded_selective_scan(
            u, delta, A, B, C, D, mesh=mesh, **LAYOUTS["batch+channel+sequence"], z=z,
            delta_bias=bias, delta_softplus=True, initial_state=h0, segment_ids=seg,
            return_final_state=True, impl="reference",
        )
    )(*(x[k] for k in (*DIFF_ARGS, "segment_ids")))
    y_ref, h_ref = oracle.selective_scan(
        *(x[k] for k in ("u", "delta", "A", "B", "C", "D")), z=x["z"],
        delta_bias=x["delta_bias"], delta_softplus=True, initial_state=x["initial_state"],
        segment_ids=x["segment_ids"],
    )
    assert oracle.rel_err(y, y_ref) <= TOL
    assert oracle.rel_err(h, h_ref) <= TOL


def test_output_shardings_and_eager_call(mesh):
    """Called outside jit on unplaced arrays: results come back laid out on the mesh."""
    x = _inputs(4, segments=False)
    y, h = sharded_selective_scan(
        x["u"], x["delta"], x["A"], x["B"], x["C"], mesh=mesh, batch_axis="data",
        channel_axis="model", sequence_axis="seq", initial_state=x["initial_state"],
        return_final_state=True, impl="reference",
    )
    assert y.sharding.spec == PartitionSpec("data", "seq", "model")
    assert h.sharding.spec == PartitionSpec("data", "model", None)
    y_ref, h_ref = selective_scan(
        x["u"], x["delta"], x["A"], x["B"], x["C"], initial_state=x["initial_state"],
        return_final_state=True, impl="reference",
    )
    assert oracle.rel_err(y, y_ref) <= TOL
    assert oracle.rel_err(h, h_ref) <= TOL


def test_auto_axis_mesh(mesh):
    """A mesh with Auto axes (shard_map moves the inputs itself) gives the same result."""
    auto = jax.make_mesh((2, 2, 2), ("data", "model", "seq"), axis_types=(AxisType.Auto,) * 3)
    _check_same(_inputs(5), auto, LAYOUTS["batch+channel+sequence"], "reference")


def _call(mesh, x, **kw):
    return sharded_selective_scan(
        x["u"], x["delta"], x["A"], x["B"], x["C"], mesh=mesh, impl="reference", **kw
    )


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(sequence_axis="time"), r"sequence_axis='time' names no axis of the mesh"),
        (dict(batch_axis=("data", "data")), r"batch_axis=\('data', 'data'\) repeats"),
        (dict(batch_axis="data", channel_axis="data"), r"distinct mesh axes"),
        (dict(batch_axis=("data", "model", "seq")), r"batch \(4\) must be divisible by the 8"),
    ],
)
def test_bad_axes_raise(mesh, kw, match):
    with pytest.raises(ValueError, match=match):
        _call(mesh, _inputs(6), **kw)


def test_indivisible_length_raises(mesh):
    x = _inputs(6)
    x = {k: v[:, :30] if k in ("u", "delta", "B", "C") else v for k, v in x.items()}
    match = r"length \(30\) must be divisible by the 8 shards of sequence_axis"
    with pytest.raises(ValueError, match=match):
        _call(mesh, x, sequence_axis=("data", "model", "seq"))


def test_groups_cut_by_channel_shards_raise(mesh):
    x = _inputs(7, groups=3, dim=12)
    with pytest.raises(ValueError, match=r"cut through the 3 groups of B and C"):
        _call(mesh, x, channel_axis=("model", "seq"))


def test_shared_checks_name_this_op(mesh):
    """The checks shared with selective_scan report under this op's name."""
    x = _inputs(8)
    with pytest.raises(TypeError, match=r"^sharded_selective_scan: u, delta must share one dtype"):
        _call(mesh, {**x, "delta": x["delta"].astype(jnp.bfloat16)})
    with pytest.raises(ValueError, match=r"^sharded_selective_scan: unknown impl 'nope'"):
        sharded_selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], mesh=mesh, impl="nope")


def test_mesh_type_checked():
    x = _inputs(9)
    # Unhooked: the jaxtyping/beartype wrapper of the test run would refuse it first.
    match = r"^sharded_selective_scan: mesh must be a jax.sharding.Mesh, got str"
    with pytest.raises(TypeError, match=match):
        unhooked(sharded_selective_scan)(x["u"], x["delta"], x["A"], x["B"], x["C"], mesh="data")
