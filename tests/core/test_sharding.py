"""The sharding module on 8 virtual CPU devices.

sharded_selective_scan against the unsharded op and the oracle: every layout must
give the unsharded op's outputs, final state and gradients of every input
(float32, 1e-5 relative), with and without an initial state, and with segment
resets inside shards and exactly at shard boundaries. The training layouts: an
AdamW step of the LM with parameters, optimiser state and batch laid out by
`train_shardings` must match the single-device step.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from mamba_ssm_core import (
    ChunkedScan,
    PallasTpuScan,
    PallasTritonScan,
    ShardedScan,
    batch_sharding,
    make_mesh,
    optimizer_state_shardings,
    param_shardings,
    selective_scan,
    sharded_selective_scan,
    train_shardings,
)
from mamba_ssm_core.config import MambaConfig
from mamba_ssm_core.params import abstract_params, flatten
from mamba_ssm_core.training import TrainConfig, lm_loss, make_optimizer

from tests import oracle
from tests.core.conftest import init_params_at, unhooked

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


@functools.cache  # the same draw for every test asking for it (jax arrays are immutable)
def _inputs(seed: int, *, groups: int | None = None, dim: int = DIM, initial_state=True,
            segments=True, batch: int = BATCH) -> dict:
    rng = np.random.default_rng(seed)

    def f(*shape, scale=1.0):
        return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)

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
    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (_, (y, h)), grads = step(diff, rest)
    return y, h, grads


# Unsharded results by (id of the inputs, impl): every layout of one input draw is
# compared with the same unsharded run, computed once (the inputs are cached, so ids
# are stable while the module runs).
_UNSHARDED: dict = {}


def _unsharded(x: dict, impl):
    key = (id(x), impl)
    if key not in _UNSHARDED:  # x is kept with its result: its id is not reused
        _UNSHARDED[key] = x, _run(lambda *a, **k: selective_scan(*a, **k, impl=impl), x)
    return _UNSHARDED[key][1]


def _check_same(x: dict, mesh, layout: dict, impl, *, sharded: bool = True,
                against: str | None = None) -> None:
    """sharded_selective_scan(mesh, layout, impl) against selective_scan(impl), or
    against selective_scan(against) when given; with sharded=False,
    selective_scan(impl) (a ShardedScan) against the reference."""
    ref = against or (impl if sharded else "reference")
    y0, h0, g0 = _unsharded(x, ref)
    if sharded:
        y1, h1, g1 = _run(
            lambda *a, **k: sharded_selective_scan(*a, **k, mesh=mesh, **layout, impl=impl), x
        )
    else:
        y1, h1, g1 = _run(lambda *a, **k: selective_scan(*a, **k, impl=impl), x)
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
    """The Pallas kernels (custom_vjp) run inside shard_map, here in their interpreters.

    Compared with the unsharded reference scan (the run the layout tests share) at the
    same 1e-5: the kernels match it unsharded to that bound (test_pallas_tpu.py,
    test_pallas_triton.py), and an unsharded interpreted kernel is not compiled again.
    """
    _check_same(_inputs(0), mesh, LAYOUTS["batch+channel+sequence"], impl, against="reference")


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
        ),
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


@pytest.mark.parametrize("layout", [dict(batch_axis="data", channel_axis="model"),
                                    dict(batch_axis=("data", "seq"))], ids=["batch+channel",
                                                                             "batch over 2 axes"])
def test_sharded_scan_impl_matches_unsharded(layout):
    """ShardedScan as the impl of a jitted selective_scan (as the trainer passes it to the
    model): each device scans its block, with the mesh's other axes left to XLA."""
    auto = make_mesh({"data": 2, "model": 2, "seq": 2})
    _check_same(_inputs(13), None, {}, ShardedScan(auto, inner="chunked", **layout),
                sharded=False)


def test_sharded_scan_impl_errors():
    auto = make_mesh({"data": 2, "model": 2, "seq": 2})
    with pytest.raises(ValueError, match=r"^ShardedScan: batch_axis='nope' names no axis"):
        ShardedScan(auto, batch_axis="nope")
    with pytest.raises(TypeError, match=r"^ShardedScan: mesh must be a jax.sharding.Mesh"):
        ShardedScan(None, batch_axis="data")
    x = _inputs(14, batch=3)
    with pytest.raises(ValueError, match=r"batch \(3\) must be divisible by the 2 shards"):
        selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"],
                       impl=ShardedScan(auto, batch_axis="data"))


def test_mesh_type_checked():
    x = _inputs(9)
    # Unhooked: the jaxtyping/beartype wrapper of the test run would refuse it first.
    match = r"^sharded_selective_scan: mesh must be a jax.sharding.Mesh, got str"
    with pytest.raises(TypeError, match=match):
        unhooked(sharded_selective_scan)(x["u"], x["delta"], x["A"], x["B"], x["C"], mesh="data")


# ---------------------------------------------------------------- training layouts

_LM = MambaConfig(
    vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=4,
    time_step_rank=2, use_bias=True, use_conv_bias=True, layer_norm_epsilon=1e-5,
    residual_in_fp32=True, tie_word_embeddings=False,
)  # I = 32
TRAIN_LAYOUTS = {
    "data 8": ({"data": 8}, dict()),
    "data 2 fsdp 4": ({"data": 2, "fsdp": 4}, dict(fsdp_axis="fsdp")),
    "data 2 tensor 4": ({"data": 2, "tensor": 4}, dict(tensor_axis="tensor")),
    "data 2 fsdp 2 tensor 2": (
        {"data": 2, "fsdp": 2, "tensor": 2}, dict(fsdp_axis="fsdp", tensor_axis="tensor")
    ),
    "fsdp 8": ({"fsdp": 8}, dict(data_axis=None, fsdp_axis="fsdp")),
}


def _train_step(optimizer):
    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(lm_loss)(params, _LM, tokens, impl="reference")
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return loss, grads, optax.apply_updates(params, updates), opt_state

    return step


@pytest.fixture(scope="module")
def single_device_step():
    """One AdamW step of the LM on one device: inputs and (loss, grads, params, opt_state)."""
    optimizer = make_optimizer(TrainConfig(steps=10, warmup_steps=0, learning_rate=1e-2))
    params = init_params_at(0, _LM)
    opt_state = optimizer.init(params)
    # A first step so the moments are not zero when the sharded step starts.
    step = jax.jit(_train_step(optimizer))
    tokens0 = jax.random.randint(jax.random.key(1), (8, 17), 0, _LM.vocab_size, jnp.int32)
    _, _, params, opt_state = step(params, opt_state, tokens0)
    tokens = jax.random.randint(jax.random.key(2), (8, 17), 0, _LM.vocab_size, jnp.int32)
    out = step(params, opt_state, tokens)
    return optimizer, (params, opt_state, tokens), out


@pytest.mark.parametrize("layout", list(TRAIN_LAYOUTS))
def test_train_step_layouts_match_single_device(single_device_step, layout):
    """Loss, gradients, updated parameters and optimiser state of a sharded AdamW step."""
    axes, kw = TRAIN_LAYOUTS[layout]
    mesh = make_mesh(axes)
    optimizer, (params, opt_state, tokens), expected = single_device_step
    sh = train_shardings(mesh, params, opt_state, **kw)
    # Placed from host copies: the same values, sliced on the host (placing device
    # arrays compiles a slicing program per leaf and layout).
    host = jax.tree.map(np.asarray, (params, opt_state, tokens))
    placed = jax.device_put(host, (sh.params, sh.opt_state, sh.batch))
    replicated = NamedSharding(mesh, PartitionSpec())
    got = jax.jit(
        _train_step(optimizer),
        in_shardings=(sh.params, sh.opt_state, sh.batch),
        out_shardings=(replicated, sh.params, sh.params, sh.opt_state),
    )(*placed)
    names = ("loss", "grads", "params", "opt_state")
    errors = {}
    for name, g, e in zip(names, got, expected, strict=True):
        for (path, a), b in zip(
            jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(e), strict=True
        ):
            b = np.asarray(b)
            if jnp.issubdtype(b.dtype, jnp.floating) and np.abs(b).max() > 0:
                errors[f"{name}{jax.tree_util.keystr(path)}"] = oracle.rel_err(a, b)
            else:
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(errors) > 3 * len(jax.tree.leaves(params))
    bad = {k: e for k, e in errors.items() if not e <= TOL}
    assert not bad, f"relative errors above {TOL}: {bad}"


def test_param_specs():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    specs = {
        k: v.spec
        for k, v in flatten(
            param_shardings(abstract_params(_LM), mesh, fsdp_axis="fsdp", tensor_axis="tensor")
        ).items()
    }
    T, F = "tensor", "fsdp"
    layer = "backbone.layers."
    assert specs == {
        "backbone.embeddings.weight": PartitionSpec(F, None),  # (64, 16)
        layer + "norm.weight": PartitionSpec(None, F),  # (2, 16)
        layer + "mixer.in_proj.weight": PartitionSpec(None, T, F),  # (2, 64, 16)
        layer + "mixer.in_proj.bias": PartitionSpec(None, T),
        layer + "mixer.conv1d.weight": PartitionSpec(None, T, None, F),  # (2, 32, 1, 4)
        layer + "mixer.conv1d.bias": PartitionSpec(None, T),
        layer + "mixer.x_proj.weight": PartitionSpec(None, F, T),  # (2, 10, 32)
        layer + "mixer.dt_proj.weight": PartitionSpec(None, T, F),  # (2, 32, 2)
        layer + "mixer.dt_proj.bias": PartitionSpec(None, T),
        layer + "mixer.A_log": PartitionSpec(None, T, F),  # (2, 32, 4)
        layer + "mixer.D": PartitionSpec(None, T),
        layer + "mixer.out_proj.weight": PartitionSpec(None, F, T),  # (2, 16, 32)
        layer + "mixer.out_proj.bias": PartitionSpec(None, F),
        "backbone.norm_f.weight": PartitionSpec(F),
        "lm_head.weight": PartitionSpec(F, None),
    }
    assert batch_sharding(mesh, fsdp_axis="fsdp").spec == PartitionSpec(("data", "fsdp"), None)
    assert batch_sharding(mesh, sequence_axis="tensor").spec == PartitionSpec("data", "tensor")


def test_optimizer_state_shardings_mirror_params():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    params = abstract_params(_LM)
    optimizer = make_optimizer(TrainConfig(steps=10, warmup_steps=0))
    opt_state = jax.eval_shape(optimizer.init, params)
    sh = train_shardings(mesh, params, opt_state, fsdp_axis="fsdp", tensor_axis="tensor")
    by_path = flatten(sh.params)
    leaves = jax.tree_util.tree_leaves_with_path(sh.opt_state)
    mirrored = 0
    for path, s in leaves:
        key = ".".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
        if key in by_path:
            assert s == by_path[key], key
            mirrored += 1
        else:
            assert s.spec == PartitionSpec(), jax.tree_util.keystr(path)
    assert mirrored == 2 * len(by_path)  # AdamW's two moments
    assert mirrored < len(leaves)  # and its step counts, replicated


def test_tensor_axis_must_divide_channels():
    cfg = dataclasses.replace(_LM, hidden_size=10)  # I = 20
    # The first parameter in pytree order (sorted keys) with channels is A_log.
    match = (r"^param_shardings: tensor_axis=\('tensor',\) has 8 shards, which do not divide "
             r"the 20 channels of backbone.layers.mixer.A_log \(axis 1 of shape \(2, 20, 4\)\)")
    with pytest.raises(ValueError, match=match):
        param_shardings(abstract_params(cfg), make_mesh({"tensor": 8}), data_axis=None,
                        tensor_axis="tensor")


def test_training_layout_errors(mesh):
    params = abstract_params(_LM)
    with pytest.raises(ValueError, match=r"mesh axes \['data'\] are Explicit"):
        param_shardings(params, mesh)
    auto = make_mesh({"data": 2, "fsdp": 4})
    with pytest.raises(ValueError, match=r"distinct mesh axes"):
        param_shardings(params, auto, fsdp_axis="data")
    with pytest.raises(ValueError, match=r"tensor_axis='model' names no axis of the mesh"):
        param_shardings(params, auto, tensor_axis="model")
    with pytest.raises(ValueError, match=r"make 4 shards, but there are 8 devices"):
        make_mesh({"data": 2, "fsdp": 2})
    with pytest.raises(ValueError, match=r"shardings must be param_shardings\(params"):
        optimizer_state_shardings({}, params, {"lm_head": {"weight": None}})
