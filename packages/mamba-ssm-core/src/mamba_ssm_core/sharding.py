"""Running the selective scan on a device mesh, with JAX's own machinery.

`sharded_selective_scan` splits the op over named axes of a `jax.sharding.Mesh`
with `jax.shard_map`: batch and channel shards are independent scans; sequence
shards are chained by the affine map each applies to the state entering it
(see `_sharding_scan`). Any registered implementation runs inside, forward and
backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
from jax import Array
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Float, Int

from . import scan as _scan
from ._scan_common import ScanArgs, ScanImplementation, ScanSpec
from ._sharding_scan import ShardLayout, shard_body

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


def _axes(mesh: Mesh, arg: str, value: AxisNames) -> tuple[str, ...]:
    if value is None:
        return ()
    names = (value,) if isinstance(value, str) else tuple(value)
    for name in names:
        if not isinstance(name, str) or name not in mesh.axis_names:
            raise ValueError(
                f"{_OP}: {arg}={value!r} names no axis of the mesh; its axes are "
                f"{tuple(mesh.axis_names)}"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"{_OP}: {arg}={value!r} repeats a mesh axis")
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
    b, l, d = args.u.shape
    groups = args.B.shape[2]
    layout = ShardLayout(batch, channel, sequence, sizes, groups, "all")
    for arg, axes, what, size in (
        ("batch_axis", batch, "batch", b),
        ("sequence_axis", sequence, "length", l),
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
    b, l, d = args.u.shape
    g = args.B.shape[2]
    kc = layout.size(layout.channel)
    local = ScanSpec(
        batch=b // layout.size(layout.batch),
        length=l // layout.size(layout.sequence),
        dim=d // kc,
        state=args.A.shape[1],
        groups={"all": g, "split": g // kc, "pick": 1}[layout.group_mode],
        dtype=str(args.u.dtype),
        has_z=args.z is not None,
        has_segments=args.segment_ids is not None,
    )
    with _as_this_op():
        chosen = _scan._resolve(impl, local)

    specs = _specs(layout)
    names = [k for k, v in args._asdict().items() if v is not None]
    xs = [_place(getattr(args, k), mesh, specs[k]) for k in names]

    def body(*local_xs):
        given = dict(zip(names, local_xs, strict=True))
        local_args = ScanArgs(**{k: given.get(k) for k in ScanArgs._fields})
        return shard_body(
            local_args, impl=chosen, delta_softplus=bool(delta_softplus), layout=layout
        )

    y_spec = specs["u"]
    h_spec = specs["initial_state"]
    # check_vma=False: the per-shard implementation is ordinary single-device code
    # (Pallas kernels included), not written for varying-axis tracking.
    y, h = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=tuple(specs[k] for k in names),
        out_specs=(y_spec, h_spec),
        check_vma=False,
    )(*xs)
    return (y, h) if return_final_state else y
