"""Running on a device mesh, with JAX's own machinery (Mesh, NamedSharding, shard_map).

`sharded_selective_scan` splits the op over named axes of a `jax.sharding.Mesh`
with `jax.shard_map`: batch and channel shards are independent scans; sequence
shards are chained by the affine map each applies to the state entering it
(see `_sharding_scan`). Any registered implementation runs inside, forward and
backward.

`sequence_parallel_forward` runs the whole LM with the token sequence split over a
mesh axis: every mixer's conv takes a halo from the previous shard and its scan is
chained as above (`model.forward(..., sequence_axis=)` inside `shard_map`), so a
sequence longer than one device's memory runs, and trains, across devices.

`param_shardings`, `optimizer_state_shardings`, `batch_sharding` and
`train_shardings` lay the LM's parameters, optimiser state and token batches out
over data, FSDP and tensor (channel) axes (rules in `_sharding_params`); `jax.jit`
and XLA's partitioner do the rest, except the scan: `ShardedScan`, passed as the
model's `impl`, runs it on each device's block, as the partitioner cannot split a
Pallas kernel. `make_mesh` builds a mesh for them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Bool, Float, Int

from . import model as _model
from . import scan as _scan
from ._scan_common import ScanArgs, ScanImplementation, ScanSpec
from ._sharding_params import dotted, param_spec
from ._sharding_scan import ShardLayout, shard_body
from .config import MambaConfig

_OP = "sharded_selective_scan"

AxisNames = str | tuple[str, ...] | None
"""A mesh axis name, several (the logical axis splits over their product, first major), or None."""


@contextlib.contextmanager
def _as_this_op() -> Iterator[None]:
    """Re-raise the shared checks' errors under this op's name."""
    try:
        yield
    except (ValueError, TypeError) as e:
        msg = str(e)
        prefix = f"{_scan._OP}: "
        if msg.startswith(prefix):
            raise type(e)(f"{_OP}: {msg[len(prefix):]}") from None
        raise


def _axes(mesh: Mesh, arg: str, value: AxisNames, op: str = _OP) -> tuple[str, ...]:
    if value is None:
        return ()
    names = (value,) if isinstance(value, str) else tuple(value)
    for name in names:
        if not isinstance(name, str) or name not in mesh.axis_names:
            raise ValueError(
                f"{op}: {arg}={value!r} names no axis of the mesh; its axes are "
                f"{tuple(mesh.axis_names)}"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"{op}: {arg}={value!r} repeats a mesh axis")
    return names


def _entry(axes: tuple[str, ...]) -> str | tuple[str, ...] | None:
    """A PartitionSpec entry for a logical axis split over `axes`."""
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else axes


def _layout(
    mesh: Mesh, args: ScanArgs, batch_axis: AxisNames, channel_axis: AxisNames,
    sequence_axis: AxisNames,
) -> ShardLayout:
    batch = _axes(mesh, "batch_axis", batch_axis)
    channel = _axes(mesh, "channel_axis", channel_axis)
    sequence = _axes(mesh, "sequence_axis", sequence_axis)
    used = [*batch, *channel, *sequence]
    if len(set(used)) != len(used):
        raise ValueError(
            f"{_OP}: batch_axis, channel_axis and sequence_axis must use distinct mesh axes, "
            f"got {batch_axis!r}, {channel_axis!r}, {sequence_axis!r}"
        )
    sizes = tuple((name, int(mesh.shape[name])) for name in mesh.axis_names)
    b, length, d = args.u.shape
    groups = args.B.shape[2]
    layout = ShardLayout(batch, channel, sequence, sizes, groups, "all")
    for arg, axes, what, size in (
        ("batch_axis", batch, "batch", b),
        ("sequence_axis", sequence, "length", length),
        ("channel_axis", channel, "dim", d),
    ):
        k = layout.size(axes)
        if size % k:
            raise ValueError(
                f"{_OP}: {what} ({size}) must be divisible by the {k} shards of {arg}={axes}"
            )
    kc = layout.size(channel)
    if kc == 1 or groups == 1:
        mode = "all"
    elif groups % kc == 0:
        mode = "split"
    elif kc % groups == 0:
        mode = "pick"
    else:
        raise ValueError(
            f"{_OP}: channel_axis={channel} splits dim into {kc} shards, which would cut "
            f"through the {groups} groups of B and C; use a number of channel shards that "
            f"divides the groups or is a multiple of them"
        )
    return ShardLayout(batch, channel, sequence, sizes, groups, mode)


def _specs(layout: ShardLayout) -> dict[str, P]:
    bs, ss, cs = _entry(layout.batch), _entry(layout.sequence), _entry(layout.channel)
    gs = cs if layout.group_mode == "split" else None
    return {
        "u": P(bs, ss, cs), "delta": P(bs, ss, cs), "z": P(bs, ss, cs),
        "A": P(cs, None), "D": P(cs), "delta_bias": P(cs),
        "B": P(bs, ss, gs, None), "C": P(bs, ss, gs, None),
        "initial_state": P(bs, cs, None), "segment_ids": P(bs, ss),
    }


def _place(x: Array, mesh: Mesh, spec: P) -> Array:
    """Reshard `x` to `spec` over the mesh's explicit axes.

    shard_map itself moves arrays over auto axes, but an array on a mesh with
    explicit axes must already carry the sharding shard_map expects.
    """
    explicit = {
        name for name, t in zip(mesh.axis_names, mesh.axis_types, strict=True)
        if t == jax.sharding.AxisType.Explicit
    }
    if not explicit:
        return x

    def keep(entry):
        names = () if entry is None else (entry,) if isinstance(entry, str) else entry
        names = tuple(n for n in names if n in explicit)
        return _entry(names)

    return jax.sharding.reshard(x, NamedSharding(mesh, P(*(keep(e) for e in spec))))


def sharded_selective_scan(
    u: Float[Array, "batch length dim"],
    delta: Float[Array, "batch length dim"],
    A: Float[Array, "dim state"],
    B: Float[Array, "batch length *groups state"],
    C: Float[Array, "batch length *groups state"],
    D: Float[Array, " dim"] | None = None,
    *,
    mesh: Mesh,
    batch_axis: AxisNames = None,
    channel_axis: AxisNames = None,
    sequence_axis: AxisNames = None,
    z: Float[Array, "batch length dim"] | None = None,
    delta_bias: Float[Array, " dim"] | None = None,
    delta_softplus: bool = False,
    initial_state: Float[Array, "batch dim state"] | None = None,
    return_final_state: bool = False,
    segment_ids: Int[Array, "batch length"] | None = None,
    impl: str | ScanImplementation = "auto",
) -> Float[Array, "batch length dim"] | tuple[
    Float[Array, "batch length dim"], Float[Array, "batch dim state"]
]:
    """`selective_scan` split over the axes of `mesh` with `jax.shard_map`.

    Same inputs, outputs and semantics as `selective_scan` (see there), plus:

    Args:
      mesh: the device mesh.
      batch_axis, channel_axis, sequence_axis: mesh axis name(s) that split the
        batch, the channels (dim) and the sequence (length); None leaves that axis
        whole. Each size must be divisible by its number of shards. With grouped
        B and C the channel shards must divide the groups or be a multiple of them.
        Sequence shards each scan their block from zero, gather the (decay, state)
        maps of all blocks, fold them in order and rerun from the true incoming
        state: outputs, final state and gradients equal the unsharded op's, at
        about twice the scan's compute.
      impl: the implementation each shard runs (chosen for the per-shard shapes).

    Returns:
      y, (batch, length, dim), sharded P(batch_axis, sequence_axis, channel_axis),
      and with return_final_state the final state, (batch, dim, state) in
      selective_scan's state dtype, sharded P(batch_axis, channel_axis, None).
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"{_OP}: mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    with _as_this_op():
        args = _scan._validate(
            u, delta, A, B, C, D, z, delta_bias, initial_state, segment_ids
        )
    layout = _layout(mesh, args, batch_axis, channel_axis, sequence_axis)
    with _as_this_op():
        chosen = _scan._resolve(impl, _local_spec(args, layout))
    y, h = _run_sharded(args, mesh, layout, chosen, bool(delta_softplus), manual=None)
    return (y, h) if return_final_state else y


def _local_spec(args: ScanArgs, layout: ShardLayout) -> ScanSpec:
    """The call each shard makes: the implementation is chosen (and its limits checked)
    for these per-shard shapes."""
    b, length, d = args.u.shape
    g = args.B.shape[2]
    kc = layout.size(layout.channel)
    return dataclasses.replace(
        ScanSpec.of(args),
        batch=b // layout.size(layout.batch),
        length=length // layout.size(layout.sequence),
        dim=d // kc,
        groups={"all": g, "split": g // kc, "pick": 1}[layout.group_mode],
    )


def _run_sharded(
    args: ScanArgs, mesh: Mesh, layout: ShardLayout, chosen: ScanImplementation,
    delta_softplus: bool, manual: frozenset[str] | None,
) -> tuple[Array, Array]:
    """shard_map of `shard_body` over the layout's axes (manual: those axes only, the
    others left to XLA's partitioner; None: every mesh axis)."""
    specs = _specs(layout)
    names = [k for k, v in args._asdict().items() if v is not None]
    xs = [_place(getattr(args, k), mesh, specs[k]) for k in names]

    def body(*local_xs):
        given = dict(zip(names, local_xs, strict=True))
        local_args = ScanArgs(**{k: given.get(k) for k in ScanArgs._fields})
        return shard_body(local_args, impl=chosen, delta_softplus=delta_softplus, layout=layout)

    # check_vma=False: the per-shard implementation is ordinary single-device code
    # (Pallas kernels included), not written for varying-axis tracking.
    kw = {} if manual is None else {"axis_names": _with_unit_axes(mesh, manual)}
    # Inside another shard_map (the sequence-parallel LM) some axes are already manual:
    # the inner one must name the enclosing context's mesh, which records that.
    context = jax.sharding.get_abstract_mesh()
    if not context.empty and tuple(context.axis_names) == tuple(mesh.axis_names):
        mesh = context
    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=tuple(specs[k] for k in names),
        out_specs=(specs["u"], specs["initial_state"]),
        check_vma=False,
        **kw,
    )(*xs)


def _with_unit_axes(mesh: Mesh, manual: frozenset[str]) -> frozenset[str]:
    """`manual` plus the mesh's axes of size 1 not already manual here.

    They split nothing, so the result is the same; leaving them to the partitioner
    crashed XLA's CPU compiler (jax 0.10, bfloat16 training step on a
    (1, 1, 2) mesh: "Invalid binary instruction opcode copy").
    """
    context = jax.sharding.get_abstract_mesh()
    taken = set() if context.empty else {
        n for n, t in zip(context.axis_names, context.axis_types, strict=True)
        if t == jax.sharding.AxisType.Manual
    }
    unit = {n for n in mesh.axis_names if int(mesh.shape[n]) == 1 and n not in taken}
    return frozenset(manual | unit)


@dataclasses.dataclass(frozen=True)
class ShardedScan(ScanImplementation):
    """A scan implementation that runs `inner` on each device's block of a mesh.

    For a model traced under `jax.jit` with its activations laid out over `mesh` (e.g.
    `impl=ShardedScan(mesh, batch_axis="data", channel_axis="tensor")` in `forward`):
    XLA's partitioner splits plain JAX ops, but not a Pallas kernel, whose inputs it
    would gather onto every device. This runs the scan under `jax.shard_map` over
    batch_axis and channel_axis (manual there, every other mesh axis left to the
    partitioner), as `sharded_selective_scan` does. The axes must be Auto axes not
    already manual where it runs (inside `sequence_parallel_forward`, the batch and
    tensor axes, not the sequence axis). `inner` is chosen for the per-shard shapes.
    """

    name = "sharded"
    mesh: Mesh | None = None
    batch_axis: AxisNames = None
    channel_axis: AxisNames = None
    inner: str | ScanImplementation = "auto"

    def __post_init__(self):
        if not isinstance(self.mesh, Mesh):
            raise TypeError(f"ShardedScan: mesh must be a jax.sharding.Mesh, got "
                            f"{type(self.mesh).__name__}")
        _rule_axes("ShardedScan", self.mesh, batch_axis=self.batch_axis,
                   channel_axis=self.channel_axis)
        if isinstance(self.inner, ShardedScan):
            raise TypeError("ShardedScan: inner must be a per-device implementation, got "
                            "another ShardedScan")

    def unsupported(self, spec: ScanSpec, platform: str) -> str | None:
        return None  # checked per shard, when the shard shapes are known

    def __call__(self, args: ScanArgs, *, delta_softplus: bool) -> tuple[Array, Array]:
        layout = _layout(self.mesh, args, self.batch_axis, self.channel_axis, None)
        if layout.size(layout.batch) * layout.size(layout.channel) == 1:
            return _scan._resolve(self.inner, ScanSpec.of(args))(
                args, delta_softplus=delta_softplus)
        with _as_this_op():
            chosen = _scan._resolve(self.inner, _local_spec(args, layout))
        return _run_sharded(args, self.mesh, layout, chosen, delta_softplus,
                            manual=frozenset((*layout.batch, *layout.channel)))


# ---------------------------------------------------------------- training layouts


class TrainShardings(NamedTuple):
    """NamedShardings of a training step's inputs.

    params: a pytree of the parameters' structure; opt_state: one of the optimiser
    state's structure, or None; batch: for token arrays (batch, length, ...).
    """

    params: Any
    opt_state: Any
    batch: NamedSharding


def make_mesh(axes: Mapping[str, int], *, devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh with the named axes and sizes, e.g. {"data": 2, "fsdp": 2, "tensor": 2}.

    The axes are `AxisType.Auto`: the model leaves layouts to XLA's partitioner,
    which starts from the shardings given here (with `Explicit` axes, JAX's default,
    every op would need its output sharding spelled out). devices: default
    `jax.devices()`, every process's devices after `jax.distributed.initialize()`;
    the sizes' product must equal their number.
    """
    op = "make_mesh"
    if not isinstance(axes, Mapping) or not axes:
        raise ValueError(f"{op}: axes must be a non-empty mapping of name to size, got {axes!r}")
    for name, size in axes.items():
        if not isinstance(name, str) or not isinstance(size, int) or size < 1:
            raise ValueError(f"{op}: axes must map names to sizes >= 1, got {name!r}: {size!r}")
    devices = list(jax.devices() if devices is None else devices)
    if math.prod(axes.values()) != len(devices):
        raise ValueError(
            f"{op}: axes {dict(axes)} make {math.prod(axes.values())} shards, but there are "
            f"{len(devices)} devices"
        )
    return jax.make_mesh(
        tuple(axes.values()), tuple(axes), axis_types=(jax.sharding.AxisType.Auto,) * len(axes),
        devices=devices,
    )


def _rule_axes(op: str, mesh: Mesh, **named: AxisNames) -> dict[str, tuple[str, ...]]:
    """Validated axis tuples per argument: known, distinct, and not Explicit."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"{op}: mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    out = {arg: _axes(mesh, arg, value, op) for arg, value in named.items()}
    used = [a for axes in out.values() for a in axes]
    if len(set(used)) != len(used):
        listing = ", ".join(f"{k}={v!r}" for k, v in named.items())
        raise ValueError(f"{op}: the axis arguments must use distinct mesh axes, got {listing}")
    types = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
    explicit = [a for a in used if types[a] == jax.sharding.AxisType.Explicit]
    if explicit:
        raise ValueError(
            f"{op}: mesh axes {explicit} are Explicit; the model leaves layouts to XLA's "
            "partitioner, which needs Auto axes: build the mesh with "
            "mamba_ssm_core.make_mesh, or jax.make_mesh(..., axis_types=(AxisType.Auto,) * n)"
        )
    return out


def _size(mesh: Mesh, axes: tuple[str, ...]) -> int:
    return math.prod(int(mesh.shape[a]) for a in axes)


def param_shardings(
    params: Mapping[str, Any],
    mesh: Mesh,
    *,
    data_axis: AxisNames = "data",
    fsdp_axis: AxisNames = None,
    tensor_axis: AxisNames = None,
) -> dict[str, Any]:
    """NamedShardings for the LM's parameter pytree (arrays or ShapeDtypeStructs).

    Parameters are replicated over data_axis. tensor_axis splits the inner channels
    I of every mixer parameter that has them (in_proj's 2I rows, the conv, x_proj's
    and out_proj's inputs, dt_proj, A_log, D), so it must divide I. fsdp_axis splits
    each parameter's largest remaining axis that it divides (never the stacked-layer
    axis); a parameter with no such axis stays replicated over it. Returns a pytree
    of `params`' structure. Axis arguments: a mesh axis name, a tuple of them, or None.
    """
    op = "param_shardings"
    axes = _rule_axes(op, mesh, data_axis=data_axis, fsdp_axis=fsdp_axis, tensor_axis=tensor_axis)
    fsdp, tensor = axes["fsdp_axis"], axes["tensor_axis"]

    def one(path, leaf):
        try:
            spec = param_spec(
                dotted(path), tuple(leaf.shape), fsdp=fsdp, fsdp_size=_size(mesh, fsdp),
                tensor=tensor, tensor_size=_size(mesh, tensor),
            )
        except ValueError as e:
            raise ValueError(f"{op}: {e}") from None
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, params)


def optimizer_state_shardings(opt_state: Any, params: Mapping[str, Any], shardings: Any) -> Any:
    """NamedShardings for an optimiser state (e.g. optax's), from the parameters'.

    Each leaf that mirrors a parameter (the same dict-key path, as optax's moments
    do, and the same shape) gets that parameter's sharding from `shardings` (as
    returned by `param_shardings`); every other leaf (step counts, factored
    statistics) is replicated. Returns a pytree of `opt_state`'s structure.
    """
    op = "optimizer_state_shardings"
    by_path = {dotted(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    sharding_of = {dotted(p): s for p, s in jax.tree_util.tree_leaves_with_path(shardings)}
    if set(by_path) != set(sharding_of) or not sharding_of:
        raise ValueError(
            f"{op}: shardings must be param_shardings(params, ...) of these params; "
            f"paths differ: {sorted(set(by_path) ^ set(sharding_of))[:5]}"
        )
    mesh = next(iter(sharding_of.values())).mesh
    replicated = NamedSharding(mesh, P())

    def one(path, leaf):
        key = dotted(path)
        if key in by_path and tuple(getattr(leaf, "shape", ())) == by_path[key]:
            return sharding_of[key]
        return replicated

    return jax.tree_util.tree_map_with_path(one, opt_state)


def batch_sharding(
    mesh: Mesh,
    *,
    data_axis: AxisNames = "data",
    fsdp_axis: AxisNames = None,
    sequence_axis: AxisNames = None,
) -> NamedSharding:
    """NamedSharding for batches (batch, length, ...): the batch split over the data
    and FSDP axes together (FSDP is data-parallel in its activations), the length
    over sequence_axis if given."""
    axes = _rule_axes(
        "batch_sharding", mesh, data_axis=data_axis, fsdp_axis=fsdp_axis,
        sequence_axis=sequence_axis,
    )
    batch = _entry((*axes["data_axis"], *axes["fsdp_axis"]))
    return NamedSharding(mesh, P(batch, _entry(axes["sequence_axis"])))


def train_shardings(
    mesh: Mesh,
    params: Mapping[str, Any],
    opt_state: Any = None,
    *,
    data_axis: AxisNames = "data",
    fsdp_axis: AxisNames = None,
    tensor_axis: AxisNames = None,
) -> TrainShardings:
    """The shardings of a training step's parameters, optimiser state and token batches
    on `mesh` (see `param_shardings`, `optimizer_state_shardings`, `batch_sharding`).

    Use them as `jax.device_put` targets and as the step's `in_shardings`/`out_shardings`.
    """
    ps = param_shardings(
        params, mesh, data_axis=data_axis, fsdp_axis=fsdp_axis, tensor_axis=tensor_axis
    )
    os_ = None if opt_state is None else optimizer_state_shardings(opt_state, params, ps)
    return TrainShardings(ps, os_, batch_sharding(mesh, data_axis=data_axis, fsdp_axis=fsdp_axis))


# ---------------------------------------------------------------- sequence-parallel LM


@functools.lru_cache(maxsize=32)
def _sequence_parallel_fn(
    config: MambaConfig, mesh: Mesh, seq: tuple[str, ...], batch: tuple[str, ...],
    embeds: bool, has_mask: bool, has_cache: bool, impl: Any, dtype: Any, remat: bool,
):
    """The jitted shard_map of `model.forward` for one set of static settings.

    Only the sequence and batch axes are manual; the mesh's other axes stay with
    XLA's partitioner (parameters split over FSDP or tensor axes keep their layout).
    Jitted because shard_map with auto axes runs only under jit.
    """
    bs, ss = _entry(batch), _entry(seq)
    state_spec = P(None, bs, None, None)
    x_spec = P(bs, ss, None) if embeds else P(bs, ss)
    in_specs = [P(), x_spec]
    if has_mask:
        in_specs.append(P(bs, ss))
    if has_cache:
        in_specs.append(_model.MambaCache(state_spec, state_spec))
    out_specs = P(bs, ss, None)
    if has_cache:
        out_specs = (out_specs, _model.MambaCache(state_spec, state_spec))
    axis = seq[0] if len(seq) == 1 else seq

    def body(params, x, *rest):
        mask = rest[0] if has_mask else None
        cache = rest[-1] if has_cache else None
        ids, emb = (None, x) if embeds else (x, None)
        return _model.forward(params, config, ids, inputs_embeds=emb, cache=cache, mask=mask,
                              impl=impl, dtype=dtype, remat=remat, sequence_axis=axis)

    # check_vma=False: the scan implementations are single-device code (see
    # sharded_selective_scan); gradients of the replicated parameters are summed
    # over the manual axes by shard_map's transpose.
    manual = _with_unit_axes(mesh, frozenset((*seq, *batch)))
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=tuple(in_specs), out_specs=out_specs,
                                 axis_names=manual, check_vma=False))


def sequence_parallel_forward(
    params: Mapping[str, Any],
    config: MambaConfig,
    input_ids: Int[Array, "batch length"] | None = None,
    *,
    mesh: Mesh,
    sequence_axis: AxisNames,
    batch_axis: AxisNames = None,
    inputs_embeds: Float[Array, "batch length hidden"] | None = None,
    cache: _model.MambaCache | None = None,
    mask: Bool[Array, "batch length"] | Int[Array, "batch length"] | None = None,
    impl: str | ScanImplementation = "auto",
    dtype: Any = None,
    remat: bool = False,
) -> Float[Array, "batch length vocab"] | tuple[Float[Array, "batch length vocab"],
                                                 _model.MambaCache]:
    """`model.forward` with the sequence split over `sequence_axis` of `mesh`.

    Each device holds length / shards consecutive steps of every sequence (and of
    the activations of every layer); the parameters are replicated over the
    sequence axis. Logits, loss and gradients equal the unsplit forward's (up to
    float rounding); the scan costs about twice its single-device compute, the conv
    one `ppermute` of (batch, conv_kernel - 1, I) per layer.

    Args:
      params, config, input_ids / inputs_embeds, cache, mask, impl, dtype, remat:
        as for `model.forward` (global shapes). A cache enters the first shard and
        the returned one leaves the last; it is replicated over the sequence axis.
      mesh: a mesh with `AxisType.Auto` axes (see `make_mesh`).
      sequence_axis: mesh axis name(s) splitting the length, first major; the
        length must be divisible by their size, each shard at least
        conv_kernel - 1 steps long.
      batch_axis: mesh axis name(s) splitting the batch (None: left to XLA's
        partitioner, as are all other mesh axes, e.g. FSDP or tensor axes the
        parameters are laid out over by `param_shardings`).

    Returns logits (batch, length, vocab) float32 sharded P(batch_axis,
    sequence_axis, None), and with a cache, (logits, the updated cache).
    Call it under `jax.jit` or eagerly (it jits itself).
    """
    op = "sequence_parallel_forward"
    axes = _rule_axes(op, mesh, sequence_axis=sequence_axis, batch_axis=batch_axis)
    seq, batch = axes["sequence_axis"], axes["batch_axis"]
    if not seq:
        raise ValueError(f"{op}: sequence_axis must name one or more mesh axes, got None")
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError(f"{op}: give exactly one of input_ids and inputs_embeds")
    x = input_ids if inputs_embeds is None else inputs_embeds
    if x.ndim < 2:
        raise ValueError(f"{op}: {'input_ids' if inputs_embeds is None else 'inputs_embeds'} "
                         f"must have shape (batch, length, ...), got {tuple(x.shape)}")
    b, length = x.shape[:2]
    shards, batch_shards = _size(mesh, seq), _size(mesh, batch)
    if length % shards:
        raise ValueError(f"{op}: length ({length}) must be divisible by the {shards} shards of "
                         f"sequence_axis={sequence_axis!r}")
    k = config.conv_kernel
    if length // shards < k - 1:
        raise ValueError(f"{op}: each of the {shards} shards of sequence_axis={sequence_axis!r} "
                         f"must hold at least conv_kernel - 1 = {k - 1} steps, got length "
                         f"{length} / {shards} = {length // shards}")
    if b % batch_shards:
        raise ValueError(f"{op}: batch ({b}) must be divisible by the {batch_shards} shards of "
                         f"batch_axis={batch_axis!r}")
    if inputs_embeds is None:
        _model._check_ids(op, config, input_ids)  # on the host; inside, ids are traced
    if cache is not None and not isinstance(cache, _model.MambaCache):
        raise TypeError(f"{op}: cache must be a MambaCache (see init_cache), got "
                        f"{type(cache).__name__}")
    if mask is not None:
        mask = _model.as_bool_mask(mask)
    fn = _sequence_parallel_fn(
        config, mesh, seq, batch, inputs_embeds is not None, mask is not None,
        cache is not None, impl, None if dtype is None else jnp.dtype(dtype), bool(remat))
    rest = [a for a in (mask, cache) if a is not None]
    return fn(params, x, *rest)
