"""Per-shard bodies of `sharded_selective_scan`, run inside `jax.shard_map`.

Batch and channel shards are independent scans. Sequence shards are chained
through the affine map each one applies to the state it receives: with the
time steps of shard s, the state leaving it is

    h_out = M_s * h_in + N_s,   M_s = exp(A * sum(delta)) (zero if the state resets
                                 inside or at the start of the shard),
                                 N_s = the shard's final state from zero,

per (batch, channel, state entry). Every shard gathers all (M, N), folds them in
order to get the state entering it, and reruns its local scan from that state.
The rerun is exact (no (batch, length, dim, state) correction tensor) and lets
any registered implementation, Pallas kernels included, do both passes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import Array

from ._scan_common import ScanArgs, ScanImplementation, keep_mask, prepare_delta


@dataclasses.dataclass(frozen=True)
class ShardLayout:
    """Static description of how the scan is split over the mesh.

    batch, channel, sequence: mesh axis names per logical axis (empty: not split);
    channel_shards: number of channel shards; groups: groups of B and C globally;
    group_mode: "all" (each shard sees every group it needs without slicing:
    groups == 1 or the channel axis is not split), "split" (the groups axis of
    B/C is split with the channels), or "pick" (several channel shards share one
    group; each picks its group from the replicated B/C).
    """

    batch: tuple[str, ...]
    channel: tuple[str, ...]
    sequence: tuple[str, ...]
    sizes: tuple[tuple[str, int], ...]
    groups: int
    group_mode: str

    def size(self, axes: tuple[str, ...]) -> int:
        sizes = dict(self.sizes)
        out = 1
        for a in axes:
            out *= sizes[a]
        return out

    def index(self, axes: tuple[str, ...]) -> Array:
        """This shard's linear index over `axes`, first axis major (as PartitionSpec splits)."""
        sizes = dict(self.sizes)
        idx = jnp.zeros((), jnp.int32)
        for a in axes:
            idx = idx * sizes[a] + jax.lax.axis_index(a)
        return idx


def _local_groups(B: Array, C: Array, layout: ShardLayout) -> tuple[Array, Array]:
    """Select this channel shard's group of B and C when shards share a group."""
    if layout.group_mode != "pick":
        return B, C
    shards_per_group = layout.size(layout.channel) // layout.groups
    g = layout.index(layout.channel) // shards_per_group
    return (jax.lax.dynamic_slice_in_dim(B, g, 1, axis=2),
            jax.lax.dynamic_slice_in_dim(C, g, 1, axis=2))


def _fold_incoming(h0: Array, M: Array, N: Array) -> tuple[Array, Array]:
    """States entering each shard: h_in[0] = h0, h_in[s+1] = M[s] * h_in[s] + N[s].

    h0: (b, d, n); M, N: (shards, b, d, n). Returns (shards, b, d, n) and the
    state leaving the last shard, (b, d, n).
    """

    def step(h, mn):
        m, n = mn
        return m * h + n, h

    h_last, h_in = jax.lax.scan(step, h0, (M, N))
    return h_in, h_last


def shard_body(
    args: ScanArgs,
    *,
    impl: ScanImplementation,
    delta_softplus: bool,
    layout: ShardLayout,
) -> tuple[Array, Array]:
    """One shard's part of the scan: (y (b, l, d) in u's dtype, final state (b, d, n)).

    `args` holds this shard's blocks (B and C grouped, groups of all channels when
    group_mode is "pick"). The final state is the same on every sequence shard.
    """
    B, C = _local_groups(args.B, args.C, layout)
    args = args._replace(B=B, C=C)
    if layout.size(layout.sequence) == 1:
        return impl(args, delta_softplus=delta_softplus)

    seq = layout.sequence
    shards = layout.size(seq)
    s = layout.index(seq)
    b, _, d = args.u.shape
    n = args.A.shape[1]

    # Pass 1: the shard's map. N is its final state from zero (y, D and z unused:
    # under jit the dead output is removed); M its total decay.
    _, N = impl(
        args._replace(D=None, z=None, initial_state=None), delta_softplus=delta_softplus
    )
    # In the state's dtype (float32, or float64 where the op computes in it).
    delta = prepare_delta(args.delta, args.delta_bias, delta_softplus).astype(N.dtype)
    M = jnp.exp(jnp.sum(delta, axis=1)[..., None] * args.A.astype(N.dtype)[None])

    # The state carried into this shard survives unless the segment id changes at the
    # shard's first step (compared with the previous shard's last id); it does not
    # reach the shard's end if the id changes anywhere inside.
    enters = jnp.ones((b,), bool)
    if args.segment_ids is not None:
        last_ids = jax.lax.all_gather(args.segment_ids[:, -1], seq, axis=0, tiled=False)
        prev_last = last_ids[jnp.maximum(s - 1, 0)]
        enters = (s == 0) | (prev_last == args.segment_ids[:, 0])
        passes = enters & jnp.all(keep_mask(args.segment_ids), axis=1)
        M = jnp.where(passes[:, None, None], M, 0.0)

    h0 = args.initial_state
    if h0 is None:
        h0 = jnp.zeros((b, d, n), N.dtype)
    M_all = jax.lax.all_gather(M, seq, axis=0, tiled=False)  # (shards, b, d, n)
    N_all = jax.lax.all_gather(N, seq, axis=0, tiled=False)
    h_in_all, _ = _fold_incoming(h0, M_all, N_all)
    h_in = jnp.where(enters[:, None, None], h_in_all[s], 0.0)

    # Pass 2: the local scan again from the true incoming state gives exact outputs.
    y, h_out = impl(args._replace(initial_state=h_in), delta_softplus=delta_softplus)
    # The final state is the last shard's; every sequence shard returns it (the
    # output is replicated over the sequence axis).
    h_final = jax.lax.psum(jnp.where(s == shards - 1, h_out, 0.0), seq)
    return y, h_final
