"""Sequence parallelism of the mixer, run inside `jax.shard_map` with the length split.

Shard s of S holds steps [s * l, (s + 1) * l) of every sequence. Two things cross
shard boundaries in a Mamba mixer:

* the causal conv looks K - 1 inputs back: each shard receives the previous shard's
  last K - 1 conv inputs (a halo, one `ppermute` of (batch, K - 1, I)); the first
  shard takes the cached conv state, or zeros;
* the selective scan's state: `_sharding_scan.shard_body` chains the shards through
  the affine map each applies to its incoming state (gather, fold, rerun), with any
  registered implementation inside.

The states leaving the whole sequence (for a cache) are the last shard's; they are
handed to every shard, as the cache is replicated over the sequence axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array

from . import scan as _scan
from ._scan_common import ScanImplementation, ScanSpec
from ._sharding_scan import ShardLayout, shard_body

AxisNames = str | tuple[str, ...]


class SequenceAxes:
    """Bound mesh axes that split the sequence: names (first major) and sizes."""

    def __init__(self, names: tuple[str, ...], sizes: tuple[int, ...]):
        self.names, self.sizes = names, sizes
        self.layout = ShardLayout((), (), names, tuple(zip(names, sizes, strict=True)), 1, "all")

    @property
    def shards(self) -> int:
        return self.layout.size(self.names)

    def index(self) -> Array:
        """This shard's position along the sequence, 0 ... shards - 1."""
        return self.layout.index(self.names)


def bind(op: str, sequence_axis: object) -> SequenceAxes | None:
    """The sequence axes of the enclosing `shard_map`, or None when they split nothing.

    Raises ValueError when a name is not a manual axis of the enclosing shard_map.
    """
    names = (sequence_axis,) if isinstance(sequence_axis, str) else sequence_axis
    if (not isinstance(names, tuple) or not names
            or not all(isinstance(n, str) for n in names)):
        raise TypeError(f"{op}: sequence_axis must be a mesh axis name or a tuple of them, "
                        f"got {sequence_axis!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"{op}: sequence_axis={sequence_axis!r} repeats a mesh axis")
    sizes = []
    for name in names:
        try:
            sizes.append(int(jax.lax.axis_size(name)))
        except NameError:
            raise ValueError(
                f"{op}: sequence_axis={sequence_axis!r}: {name!r} is not a manual mesh axis "
                "here; call it inside jax.shard_map over a mesh with that axis, the "
                "inputs' length split over it (or use sharding.sequence_parallel_forward)"
            ) from None
    seq = SequenceAxes(tuple(names), tuple(sizes))
    return seq if seq.shards > 1 else None


def conv_halo(x: Array, width_minus_1: int, first: Array | None, seq: SequenceAxes) -> Array:
    """The K - 1 conv inputs before this shard's x (batch, l, I): the previous shard's
    last ones, `first` (or zeros) on shard 0. Needs l >= K - 1."""
    b, _, d = x.shape
    if first is None:
        first = jnp.zeros((b, width_minus_1, d), x.dtype)
    if width_minus_1 == 0:
        return first
    tail = x[:, x.shape[1] - width_minus_1:]
    # ppermute leaves zeros on the shard nothing is sent to (shard 0).
    prev = jax.lax.ppermute(tail, seq.names, [(i, i + 1) for i in range(seq.shards - 1)])
    return jnp.where(seq.index() == 0, first, prev)


def from_last_shard(x: Array, seq: SequenceAxes) -> Array:
    """The last shard's `x` on every shard (a sum with zeros from the others: exact)."""
    return jax.lax.psum(jnp.where(seq.index() == seq.shards - 1, x, jnp.zeros((), x.dtype)),
                        seq.names)


def selective_scan(
    u, delta, A, B, C, D, *, z, delta_bias, delta_softplus: bool, initial_state,
    impl: str | ScanImplementation, seq: SequenceAxes,
) -> tuple[Array, Array]:
    """`scan.selective_scan` of this shard's block, chained over the sequence shards.

    Returns (y (batch, l, dim), the state after the whole sequence (batch, dim, state),
    the same on every shard). The implementation is chosen for the per-shard shapes.
    """
    args = _scan._validate(u, delta, A, B, C, D, z, delta_bias, initial_state, None)
    chosen = _scan._resolve(impl, ScanSpec.of(args))
    return shard_body(args, impl=chosen, delta_softplus=delta_softplus, layout=seq.layout)
