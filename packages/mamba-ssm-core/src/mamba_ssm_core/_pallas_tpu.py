"""The selective scan as a Pallas Mosaic TPU kernel, forward and backward.

Layout. Channels sit on the 128 lanes and time on the sublanes: u, delta, z and
y stay (batch, length, dim); the state of one dim tile is an (N, dim tile)
float32 VMEM scratch; A is passed as (N, dim), and B, C as (batch, groups, N,
length) so that one time step's N values form a column that broadcasts across
the lanes. Each time step pulls its column out of a 128-step lane chunk with a
masked lane reduction (no dynamic lane slicing on TPU).

Grid (batch, dim tiles, length tiles), the length axis "arbitrary" (sequential)
and carrying the state in scratch; the final state is an output block whose
index map ignores the length axis. Delta bias and softplus, the z gate, the D
skip, the initial and final state and segment resets are fused.

Backward. The forward saves the state entering each length tile (batch,
length tiles, N, dim): small next to the inputs. The backward kernel walks the
length tiles in reverse (index maps use `tiles - 1 - l`); within a tile it runs
the recurrence forward once from the saved state, keeping the state entering
each sub-chunk, then walks the sub-chunks in reverse, recomputing the
sub-chunk's states into scratch and stepping the adjoint back through them. The
parameter gradients (dA, dD, d delta_bias) come out per (batch, dim tile) block
and dB, dC per (batch, dim tile), and are summed outside the kernel.

Tiles (see `tile_sizes`): length tiles are multiples of 128 (time is on the
lanes of B and C), dim tiles multiples of 128 that divide the per-group channel
count after it is padded to a multiple of 128. The wrapper pads time (padded
steps are made the identity map inside the kernel) and channels (zeros).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import Array
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ._scan_common import SOFTPLUS_THRESHOLD, ScanArgs, ScanImplementation, ScanSpec, keep_mask

_LANES = 128
_SUBLANES = 8
# Batch and dim tiles are independent; the length axis carries the state, so it
# must run in order on one core. Tests swap this to show the interpreter catches it.
_DIMENSION_SEMANTICS = ("parallel", "parallel", "arbitrary")
# Scoped VMEM requested from Mosaic. By the estimate in `tile_sizes` the table's tiles
# need about 6 MiB per kernel at N=16 in float32 (under v5e's 16 MiB default) before
# Mosaic's own temporaries; the limit leaves room for those and for larger explicit
# tiles, and stays under the 64 MiB of a v7x core. Not measured: no TPU was available.
_VMEM_LIMIT_BYTES = 48 * 1024 * 1024


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _largest_lane_divisor(n: int, cap: int) -> int:
    """Largest multiple of 128 that divides n (itself a multiple of 128) and is <= cap."""
    best = _LANES
    for t in range(_LANES, min(n, cap) + 1, _LANES):
        if n % t == 0:
            best = t
    return best


def tile_sizes(length: int, state: int, group_channels: int) -> tuple[int, int, int, int]:
    """The default tiles for a shape: (time tile, forward dim tile, backward dim tile, sub-chunk).

    group_channels is dim // groups. Up to N = 32 the table keeps the (N, dim
    tile) float32 state at 8 vregs in the forward and 4 in the backward, which
    holds several such values per step (a TPU core has 64 vregs of 8 x 128
    words); larger N gets the narrowest dim tile. The sub-chunk length keeps the
    backward's (sub-chunk + 1, N, dim tile) state scratch near 0.5 MiB:

        state N   forward dim tile   backward dim tile   sub-chunk
        <= 16     512                256                 32
        <= 32     256                128                 32
        <= 64     128                128                 16
        >  64     128                128                 8

    Dim tiles are capped to the largest multiple of 128 dividing the group's
    channels padded to 128. Time tile: 128 for length <= 128 or N > 64, else
    256. VMEM at N=16, float32, length tile 256: the forward holds 11 (256, 512)
    blocks (u, delta, z, y double-buffered; 3 scratch), 5.5 MiB; the backward 20
    (256, 256) blocks (u, delta, z, dy in, du, d delta, dz out, double-buffered; 6
    scratch), 5 MiB, plus 0.7 MiB of sub-chunk states.
    """
    if state <= 16:
        fwd_td, bwd_td, sub = 512, 256, 32
    elif state <= 32:
        fwd_td, bwd_td, sub = 256, 128, 32
    elif state <= 64:
        fwd_td, bwd_td, sub = 128, 128, 16
    else:
        fwd_td, bwd_td, sub = 128, 128, 8
    cpg_p = _round_up(group_channels, _LANES)
    tl = 128 if (length <= 128 or state > 64) else 256
    return tl, _largest_lane_divisor(cpg_p, fwd_td), _largest_lane_divisor(cpg_p, bwd_td), sub


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static description of one kernel call: shapes, tiles and which inputs are present."""

    batch: int
    length: int
    dim: int
    state: int
    groups: int
    time_tile: int
    dim_tile: int
    bwd_dim_tile: int
    sub_chunk: int
    softplus: bool
    has_d: bool
    has_z: bool
    has_bias: bool
    has_h0: bool
    has_keep: bool
    interpret: Any

    @property
    def group_channels(self) -> int:
        return self.dim // self.groups

    @property
    def group_channels_padded(self) -> int:
        return _round_up(self.group_channels, _LANES)

    @property
    def padded_dim(self) -> int:
        return self.groups * self.group_channels_padded

    @property
    def padded_length(self) -> int:
        return _round_up(self.length, self.time_tile)

    @property
    def time_tiles(self) -> int:
        return self.padded_length // self.time_tile


# ----------------------------------------------------------------------------
# Layout helpers (outside the kernels)


def _pad_channels(x: Array, plan: _Plan) -> Array:
    """(..., dim) -> (..., padded dim): each group's channels zero-padded to a multiple of 128."""
    pad = plan.group_channels_padded - plan.group_channels
    if pad == 0:
        return x
    lead = x.shape[:-1]
    x = x.reshape(*lead, plan.groups, plan.group_channels)
    x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, 0), (0, pad)])
    return x.reshape(*lead, plan.padded_dim)


def _unpad_channels(x: Array, plan: _Plan) -> Array:
    if plan.group_channels_padded == plan.group_channels:
        return x
    lead = x.shape[:-1]
    x = x.reshape(*lead, plan.groups, plan.group_channels_padded)[..., : plan.group_channels]
    return x.reshape(*lead, plan.dim)


def _pad_time(x: Array, plan: _Plan, axis: int) -> Array:
    pad = plan.padded_length - plan.length
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _seq(x: Array, plan: _Plan) -> Array:
    """(batch, length, dim) -> (batch, padded length, padded dim)."""
    return _pad_time(_pad_channels(x, plan), plan, 1)


def _unseq(x: Array, plan: _Plan) -> Array:
    return _unpad_channels(x[:, : plan.length], plan)


def _bc_layout(x: Array, plan: _Plan) -> Array:
    """B or C (batch, length, groups, N) -> (batch, groups, N, padded length)."""
    return _pad_time(jnp.transpose(x, (0, 2, 3, 1)), plan, 3)


def _param_row(x: Array | None, plan: _Plan) -> Array | None:
    """D or delta_bias (dim,) -> (1, padded dim) float32."""
    if x is None:
        return None
    return _pad_channels(x.astype(jnp.float32), plan)[None, :]


def _state_layout(h: Array, plan: _Plan) -> Array:
    """(batch, dim, N) -> (batch, N, padded dim) float32: dim on the lanes."""
    return _pad_channels(jnp.swapaxes(h.astype(jnp.float32), 1, 2), plan)


def _keep_layout(segment_keep: Array, plan: _Plan) -> Array:
    """(batch, length) bool -> (batch, 1, padded length) float32; padded steps keep the state."""
    keep = segment_keep.astype(jnp.float32)[:, None, :]
    pad = plan.padded_length - plan.length
    if pad == 0:
        return keep
    return jnp.pad(keep, ((0, 0), (0, 0), (0, pad)), constant_values=1.0)


# ----------------------------------------------------------------------------
# In-kernel helpers. Shapes: rows (1, TD), states (N, TD), columns (N, 1).


def _lane_iota() -> Array:
    return jax.lax.broadcasted_iota(jnp.int32, (1, _LANES), 1)


def _sublane_iota() -> Array:
    return jax.lax.broadcasted_iota(jnp.int32, (_SUBLANES, 1), 0)


def _column(chunk: Array, lane: Array, i) -> Array:
    """Column i of an (R, 128) chunk as (R, 1).

    A masked lane reduction: Mosaic cannot slice lanes at a dynamic offset.
    """
    return jnp.sum(jnp.where(lane == i, chunk, 0.0), axis=1, keepdims=True)


def _softplus(x: Array) -> Array:
    return jnp.where(
        x > SOFTPLUS_THRESHOLD, x, jnp.log1p(jnp.exp(jnp.minimum(x, SOFTPLUS_THRESHOLD)))
    )


def _sigmoid(x: Array) -> Array:
    return 1.0 / (1.0 + jnp.exp(-x))


def _tile_delta(delta_ref, bias_ref, plan: _Plan, tile) -> tuple[Array, Array]:
    """(raw delta + bias, the step delta) of length tile `tile`, each (TL, TD) float32.

    Padded time steps get delta 0, which makes them the identity map (decay 1,
    input 0) so the final state and its gradient pass through unchanged.
    """
    x = delta_ref[...].astype(jnp.float32)
    if bias_ref is not None:
        x = x + bias_ref[...]
    dt = _softplus(x) if plan.softplus else x
    if plan.padded_length != plan.length:
        dt = jnp.where(_valid_steps(plan, tile, x.shape), dt, 0.0)
    return x, dt


def _valid_steps(plan: _Plan, tile, shape) -> Array:
    """(TL, TD) bool: which rows of length tile `tile` are real steps, not padding."""
    t = tile * plan.time_tile + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    return t < plan.length


def _unpack(refs, names: list[tuple[str, bool]]) -> dict[str, Any]:
    """Name the kernel's positional refs; absent optional inputs map to None."""
    out, it = {}, iter(refs)
    for name, present in names:
        out[name] = next(it) if present else None
    rest = list(it)
    assert not rest, f"{len(rest)} refs left over"  # a wiring bug, caught at trace time
    return out


def _fwd_ref_names(plan: _Plan, save_states: bool) -> list[tuple[str, bool]]:
    return [
        ("u", True), ("delta", True), ("a", True), ("b", True), ("c", True),
        ("d", plan.has_d), ("z", plan.has_z), ("bias", plan.has_bias), ("h0", plan.has_h0),
        ("keep", plan.has_keep),
        ("y", True), ("h_last", True), ("h_tiles", save_states),
        ("h", True), ("dt", True), ("dtu", True), ("ys", True),
    ]  # fmt: skip


def _forward_kernel(*refs, plan: _Plan, save_states: bool):
    r = _unpack(refs, _fwd_ref_names(plan, save_states))
    tl = plan.time_tile
    step = pl.program_id(2)

    @pl.when(step == 0)
    def _():
        r["h"][...] = r["h0"][...] if plan.has_h0 else jnp.zeros(r["h"].shape, jnp.float32)

    if save_states:
        r["h_tiles"][...] = r["h"][...]

    _, dt = _tile_delta(r["delta"], r["bias"], plan, step)
    r["dt"][...] = dt
    r["dtu"][...] = dt * r["u"][...].astype(jnp.float32)

    a = r["a"][...]
    lane, sub = _lane_iota(), _sublane_iota()
    width = r["dt"].shape[1]

    def lane_chunk(ci, h):
        off = pl.multiple_of(ci * _LANES, _LANES)
        b_chunk = r["b"][:, pl.ds(off, _LANES)].astype(jnp.float32)
        c_chunk = r["c"][:, pl.ds(off, _LANES)].astype(jnp.float32)
        k_chunk = r["keep"][:, pl.ds(off, _LANES)] if plan.has_keep else None

        def group(g, h):
            row0 = pl.multiple_of(off + g * _SUBLANES, _SUBLANES)
            dt8 = r["dt"][pl.ds(row0, _SUBLANES), :]
            dtu8 = r["dtu"][pl.ds(row0, _SUBLANES), :]
            y8 = jnp.zeros((_SUBLANES, width), jnp.float32)
            for s in range(_SUBLANES):
                i = g * _SUBLANES + s
                decay = jnp.exp(dt8[s : s + 1] * a)
                if k_chunk is not None:
                    decay = jnp.where(_column(k_chunk, lane, i) > 0.5, decay, 0.0)
                h = decay * h + _column(b_chunk, lane, i) * dtu8[s : s + 1]
                y_row = jnp.sum(h * _column(c_chunk, lane, i), axis=0, keepdims=True)
                y8 = jnp.where(sub == s, y_row, y8)
            r["ys"][pl.ds(row0, _SUBLANES), :] = y8
            return h

        return jax.lax.fori_loop(0, _LANES // _SUBLANES, group, h)

    h = jax.lax.fori_loop(0, tl // _LANES, lane_chunk, r["h"][...])
    r["h"][...] = h

    y = r["ys"][...]
    if plan.has_d:
        y = y + r["u"][...].astype(jnp.float32) * r["d"][...]
    if plan.has_z:
        z = r["z"][...].astype(jnp.float32)
        y = y * (z * _sigmoid(z))
    r["y"][...] = y.astype(r["y"].dtype)

    @pl.when(step == plan.time_tiles - 1)
    def _():
        r["h_last"][...] = h


def _bwd_ref_names(plan: _Plan) -> list[tuple[str, bool]]:
    return [
        ("u", True), ("delta", True), ("a", True), ("b", True), ("c", True),
        ("d", plan.has_d), ("z", plan.has_z), ("bias", plan.has_bias),
        ("keep", plan.has_keep), ("h_tiles", True), ("dy", True), ("dh_last", True),
        ("du", True), ("ddelta", True), ("dz", plan.has_z), ("db", True), ("dc", True),
        ("da", True), ("dd", plan.has_d), ("dbias", plan.has_bias), ("dh0", True),
        ("dh", True), ("da_acc", True), ("dd_acc", plan.has_d), ("dbias_acc", plan.has_bias),
        ("dt", True), ("dtu", True), ("dyp", True), ("ys", plan.has_z),
        ("ddtu", True), ("ddec", True), ("ck", True), ("hs", True),
    ]  # fmt: skip


def _backward_kernel(*refs, plan: _Plan):
    r = _unpack(refs, _bwd_ref_names(plan))
    tl, k = plan.time_tile, plan.sub_chunk
    step = pl.program_id(2)
    tile = plan.time_tiles - 1 - step  # the backward walks the length tiles in reverse
    width = r["dt"].shape[1]
    lane, sub = _lane_iota(), _sublane_iota()
    a = r["a"][...]

    @pl.when(step == 0)  # the last length tile: start from the final state's cotangent
    def _():
        r["dh"][...] = r["dh_last"][...]
        r["da_acc"][...] = jnp.zeros(r["da_acc"].shape, jnp.float32)
        if plan.has_d:
            r["dd_acc"][...] = jnp.zeros(r["dd_acc"].shape, jnp.float32)
        if plan.has_bias:
            r["dbias_acc"][...] = jnp.zeros(r["dbias_acc"].shape, jnp.float32)

    x, dt = _tile_delta(r["delta"], r["bias"], plan, tile)
    u = r["u"][...].astype(jnp.float32)
    r["dt"][...] = dt
    r["dtu"][...] = dt * u
    dy = r["dy"][...].astype(jnp.float32)
    if plan.has_z:
        z = r["z"][...].astype(jnp.float32)
        sig_z = _sigmoid(z)
        r["dyp"][...] = dy * (z * sig_z)
    else:
        r["dyp"][...] = dy
    r["db"][...] = jnp.zeros(r["db"].shape, jnp.float32)
    r["dc"][...] = jnp.zeros(r["dc"].shape, jnp.float32)

    def chunk_inputs(t0):
        """B, C, keep of the 128-step lane chunk holding tile step t0, and t0's lane in it."""
        base = pl.multiple_of((t0 // _LANES) * _LANES, _LANES)
        b_chunk = r["b"][:, pl.ds(base, _LANES)].astype(jnp.float32)
        c_chunk = r["c"][:, pl.ds(base, _LANES)].astype(jnp.float32)
        k_chunk = r["keep"][:, pl.ds(base, _LANES)] if plan.has_keep else None
        return base, t0 - base, b_chunk, c_chunk, k_chunk

    def forward_step(h, dt_row, dtu_row, b_col, k_col):
        decay = jnp.exp(dt_row * a)
        if k_col is not None:
            decay = jnp.where(k_col > 0.5, decay, 0.0)
        return decay * h + b_col * dtu_row

    def forward_subchunk(t0, h, on_state):
        """Run steps t0 .. t0+k-1 from h and return the last state.

        on_state(j, h_j, C chunk, lane of step j) sees each new state; what it returns
        for the steps of an 8-row group (y rows, or None) is stored to the y scratch.
        """
        _, lane0, b_chunk, c_chunk, k_chunk = chunk_inputs(t0)

        def group(g, h):
            row0 = pl.multiple_of(t0 + g * _SUBLANES, _SUBLANES)
            dt8 = r["dt"][pl.ds(row0, _SUBLANES), :]
            dtu8 = r["dtu"][pl.ds(row0, _SUBLANES), :]
            rows = []
            for s in range(_SUBLANES):
                i = lane0 + g * _SUBLANES + s
                k_col = None if k_chunk is None else _column(k_chunk, lane, i)
                b_col = _column(b_chunk, lane, i)
                h = forward_step(h, dt8[s : s + 1], dtu8[s : s + 1], b_col, k_col)
                rows.append(on_state(g * _SUBLANES + s, h, c_chunk, i))
            if plan.has_z and rows[0] is not None:
                y8 = jnp.zeros((_SUBLANES, width), jnp.float32)
                for s, y_row in enumerate(rows):
                    y8 = jnp.where(sub == s, y_row, y8)
                r["ys"][pl.ds(row0, _SUBLANES), :] = y8
            return h

        return jax.lax.fori_loop(0, k // _SUBLANES, group, h)

    # Pass 1: from the state entering the tile, keep each sub-chunk's entry state
    # and (for the z gate's gradient) the scan output y without skip.
    def save_y(j, h, c_chunk, i):
        del j
        return jnp.sum(h * _column(c_chunk, lane, i), axis=0, keepdims=True) if plan.has_z else None

    def pass1(sc, h):
        r["ck"][sc] = h
        return forward_subchunk(pl.multiple_of(sc * k, k), h, save_y)

    jax.lax.fori_loop(0, tl // k, pass1, r["h_tiles"][...])

    # Pass 2: sub-chunks in reverse; recompute their states, then step the adjoint back.
    def keep_state(j, h, c_chunk, i):
        del c_chunk, i
        r["hs"][j + 1] = h
        return None

    def pass2(rev, carry):
        dh, da = carry
        sc = tl // k - 1 - rev
        t0 = pl.multiple_of(sc * k, k)
        r["hs"][0] = r["ck"][sc]
        forward_subchunk(t0, r["ck"][sc], keep_state)
        base, lane0, b_chunk, c_chunk, k_chunk = chunk_inputs(t0)

        def group(rg, carry):
            dh, da, h_cur, db_acc, dc_acc = carry
            g = k // _SUBLANES - 1 - rg
            row0 = pl.multiple_of(t0 + g * _SUBLANES, _SUBLANES)
            dt8 = r["dt"][pl.ds(row0, _SUBLANES), :]
            dtu8 = r["dtu"][pl.ds(row0, _SUBLANES), :]
            dyp8 = r["dyp"][pl.ds(row0, _SUBLANES), :]
            ddtu8 = jnp.zeros((_SUBLANES, width), jnp.float32)
            ddec8 = jnp.zeros((_SUBLANES, width), jnp.float32)
            for s in reversed(range(_SUBLANES)):
                j = g * _SUBLANES + s  # step within the sub-chunk; hs[j + 1] is its state
                i = lane0 + j
                h_prev = r["hs"][j]
                dt_row, dtu_row, dyp_row = dt8[s : s + 1], dtu8[s : s + 1], dyp8[s : s + 1]
                b_col, c_col = _column(b_chunk, lane, i), _column(c_chunk, lane, i)
                dh = dh + c_col * dyp_row
                lane_sum = lambda x: jnp.sum(x, axis=1, keepdims=True)  # noqa: E731
                dc_acc = jnp.where(lane == i, lane_sum(h_cur * dyp_row), dc_acc)
                db_acc = jnp.where(lane == i, lane_sum(dh * dtu_row), db_acc)
                ddtu8 = jnp.where(sub == s, jnp.sum(dh * b_col, axis=0, keepdims=True), ddtu8)
                decay = jnp.exp(dt_row * a)
                if k_chunk is not None:
                    decay = jnp.where(_column(k_chunk, lane, i) > 0.5, decay, 0.0)
                g_decay = dh * h_prev * decay
                ddec8 = jnp.where(sub == s, jnp.sum(g_decay * a, axis=0, keepdims=True), ddec8)
                da = da + g_decay * dt_row
                dh = dh * decay
                h_cur = h_prev
            r["ddtu"][pl.ds(row0, _SUBLANES), :] = ddtu8
            r["ddec"][pl.ds(row0, _SUBLANES), :] = ddec8
            return dh, da, h_cur, db_acc, dc_acc

        zeros = jnp.zeros((a.shape[0], _LANES), jnp.float32)
        dh, da, _, db_acc, dc_acc = jax.lax.fori_loop(
            0, k // _SUBLANES, group, (dh, da, r["hs"][k], zeros, zeros)
        )
        # Sub-chunks of one lane chunk fill disjoint lanes of it.
        cols = pl.ds(base, _LANES)
        r["db"][:, cols] = r["db"][:, cols] + db_acc
        r["dc"][:, cols] = r["dc"][:, cols] + dc_acc
        return dh, da

    dh, da = jax.lax.fori_loop(
        0, tl // k, pass2, (r["dh"][...], jnp.zeros(a.shape, jnp.float32))
    )
    r["dh"][...] = dh
    r["da_acc"][...] = r["da_acc"][...] + da

    # Whole-tile epilogue: the gradients of the fused elementwise parts.
    ddtu = r["ddtu"][...]
    ddelta = r["ddec"][...] + ddtu * u
    if plan.softplus:
        ddelta = ddelta * jnp.where(x > SOFTPLUS_THRESHOLD, 1.0, _sigmoid(x))
    if plan.padded_length != plan.length:
        ddelta = jnp.where(_valid_steps(plan, tile, ddelta.shape), ddelta, 0.0)
    r["ddelta"][...] = ddelta.astype(r["ddelta"].dtype)
    dyp = r["dyp"][...]
    du = ddtu * r["dt"][...]
    if plan.has_d:
        du = du + dyp * r["d"][...]
        r["dd_acc"][...] = r["dd_acc"][...] + jnp.sum(dyp * u, axis=0, keepdims=True)
    r["du"][...] = du.astype(r["du"].dtype)
    if plan.has_bias:
        r["dbias_acc"][...] = r["dbias_acc"][...] + jnp.sum(ddelta, axis=0, keepdims=True)
    if plan.has_z:
        y_pre = r["ys"][...]
        if plan.has_d:
            y_pre = y_pre + u * r["d"][...]
        dsilu = sig_z * (1.0 + z * (1.0 - sig_z))
        r["dz"][...] = (dy * y_pre * dsilu).astype(r["dz"].dtype)

    @pl.when(step == plan.time_tiles - 1)  # the first length tile: write the block's sums
    def _():
        r["dh0"][...] = dh
        r["da"][...] = r["da_acc"][...]
        if plan.has_d:
            r["dd"][...] = r["dd_acc"][...]
        if plan.has_bias:
            r["dbias"][...] = r["dbias_acc"][...]


# ----------------------------------------------------------------------------
# pallas_call builders


def _compiler_params():
    return pltpu.CompilerParams(
        dimension_semantics=_DIMENSION_SEMANTICS, vmem_limit_bytes=_VMEM_LIMIT_BYTES
    )


def _specs(plan: _Plan, dim_tile: int, reverse: bool):
    """BlockSpecs over the grid (batch, dim tiles, length tiles), length reversed or not."""
    tl, n = plan.time_tile, plan.state
    last = plan.time_tiles - 1
    tiles_per_group = plan.group_channels_padded // dim_tile
    t = (lambda s: last - s) if reverse else (lambda s: s)
    return dict(
        seq=pl.BlockSpec((None, tl, dim_tile), lambda i, j, s: (i, t(s), j)),
        bc=pl.BlockSpec((None, None, n, tl), lambda i, j, s: (i, j // tiles_per_group, 0, t(s))),
        bc_part=pl.BlockSpec((None, None, n, tl), lambda i, j, s: (i, j, 0, t(s))),
        a=pl.BlockSpec((n, dim_tile), lambda i, j, s: (0, j)),
        row=pl.BlockSpec((1, dim_tile), lambda i, j, s: (0, j)),
        keep=pl.BlockSpec((None, 1, tl), lambda i, j, s: (i, 0, t(s))),
        # Index maps that ignore the length axis keep one block resident across it.
        state=pl.BlockSpec((None, n, dim_tile), lambda i, j, s: (i, 0, j)),
        row_part=pl.BlockSpec((None, 1, dim_tile), lambda i, j, s: (i, 0, j)),
        tile_state=pl.BlockSpec((None, None, n, dim_tile), lambda i, j, s: (i, t(s), 0, j)),
    )


def _forward_call(plan: _Plan, save_states: bool, u, delta, a, b, c, d, z, bias, h0, keep):
    """Kernel-layout inputs -> (y, final state (batch, N, padded dim), tile-entry states)."""
    td, tl, n = plan.dim_tile, plan.time_tile, plan.state
    sp = _specs(plan, td, reverse=False)
    batch, lp, dp = u.shape
    inputs = [
        (u, sp["seq"]), (delta, sp["seq"]), (a, sp["a"]), (b, sp["bc"]), (c, sp["bc"]),
        (d, sp["row"]), (z, sp["seq"]), (bias, sp["row"]), (h0, sp["state"]), (keep, sp["keep"]),
    ]  # fmt: skip
    inputs = [(x, s) for x, s in inputs if x is not None]
    out_shape = [
        jax.ShapeDtypeStruct((batch, lp, dp), u.dtype),
        jax.ShapeDtypeStruct((batch, n, dp), jnp.float32),
    ]
    out_specs = [sp["seq"], sp["state"]]
    if save_states:
        out_shape.append(jax.ShapeDtypeStruct((batch, plan.time_tiles, n, dp), jnp.float32))
        out_specs.append(sp["tile_state"])
    f32 = jnp.float32
    outs = pl.pallas_call(
        functools.partial(_forward_kernel, plan=plan, save_states=save_states),
        grid=(batch, dp // td, plan.time_tiles),
        in_specs=[s for _, s in inputs],
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[
            pltpu.VMEM((n, td), f32),  # the state carried along the length axis
            pltpu.VMEM((tl, td), f32),  # step delta
            pltpu.VMEM((tl, td), f32),  # delta * u
            pltpu.VMEM((tl, td), f32),  # y before skip and gate
        ],
        compiler_params=_compiler_params(),
        interpret=plan.interpret,
        name="selective_scan_tpu_fwd",
    )(*[x for x, _ in inputs])
    return outs[0], outs[1], (outs[2] if save_states else None)


def _backward_call(plan: _Plan, u, delta, a, b, c, d, z, bias, keep, h_tiles, dy, dh_last):
    """Kernel-layout inputs and cotangents -> gradients; dA, dD, d bias, dB, dC per block."""
    td, tl, n, k = plan.bwd_dim_tile, plan.time_tile, plan.state, plan.sub_chunk
    sp = _specs(plan, td, reverse=True)
    batch, lp, dp = u.shape
    inputs = [
        (u, sp["seq"]), (delta, sp["seq"]), (a, sp["a"]), (b, sp["bc"]), (c, sp["bc"]),
        (d, sp["row"]), (z, sp["seq"]), (bias, sp["row"]), (keep, sp["keep"]),
        (h_tiles, sp["tile_state"]), (dy, sp["seq"]), (dh_last, sp["state"]),
    ]  # fmt: skip
    inputs = [(x, s) for x, s in inputs if x is not None]
    f32 = jnp.float32
    seq = lambda dtype: jax.ShapeDtypeStruct((batch, lp, dp), dtype)  # noqa: E731
    outputs = [
        (seq(u.dtype), sp["seq"]),
        (seq(delta.dtype), sp["seq"]),
        (seq(z.dtype) if plan.has_z else None, sp["seq"]),
        (jax.ShapeDtypeStruct((batch, dp // td, n, lp), f32), sp["bc_part"]),
        (jax.ShapeDtypeStruct((batch, dp // td, n, lp), f32), sp["bc_part"]),
        (jax.ShapeDtypeStruct((batch, n, dp), f32), sp["state"]),
        (jax.ShapeDtypeStruct((batch, 1, dp), f32) if plan.has_d else None, sp["row_part"]),
        (jax.ShapeDtypeStruct((batch, 1, dp), f32) if plan.has_bias else None, sp["row_part"]),
        (jax.ShapeDtypeStruct((batch, n, dp), f32), sp["state"]),
    ]
    present = [x is not None for x, _ in outputs]
    outputs = [(x, s) for x, s in outputs if x is not None]
    scratch = [
        pltpu.VMEM((n, td), f32),  # adjoint of the state, carried along the length axis
        pltpu.VMEM((n, td), f32),  # dA summed over length tiles
    ]
    scratch += [pltpu.VMEM((1, td), f32)] * (int(plan.has_d) + int(plan.has_bias))
    scratch += [
        pltpu.VMEM((tl, td), f32),  # step delta
        pltpu.VMEM((tl, td), f32),  # delta * u
        pltpu.VMEM((tl, td), f32),  # dy * silu(z)
    ]
    if plan.has_z:
        scratch.append(pltpu.VMEM((tl, td), f32))  # y before skip and gate
    scratch += [
        pltpu.VMEM((tl, td), f32),  # gradient of delta * u
        pltpu.VMEM((tl, td), f32),  # gradient of delta through the decay
        pltpu.VMEM((tl // k, n, td), f32),  # state entering each sub-chunk
        pltpu.VMEM((k + 1, n, td), f32),  # the states of one sub-chunk, and its entry state
    ]
    outs = pl.pallas_call(
        functools.partial(_backward_kernel, plan=plan),
        grid=(batch, dp // td, plan.time_tiles),
        in_specs=[s for _, s in inputs],
        out_specs=[s for _, s in outputs],
        out_shape=[x for x, _ in outputs],
        scratch_shapes=scratch,
        compiler_params=_compiler_params(),
        interpret=plan.interpret,
        name="selective_scan_tpu_bwd",
    )(*[x for x, _ in inputs])
    it = iter(outs)
    return tuple(next(it) if p else None for p in present)


# ----------------------------------------------------------------------------
# The differentiable op, in the user's layout


def _kernel_inputs(plan: _Plan, u, delta, A, B, C, D, z, bias, keep):
    return (
        _seq(u, plan),
        _seq(delta, plan),
        _pad_channels(A.astype(jnp.float32).T, plan),
        _bc_layout(B, plan),
        _bc_layout(C, plan),
        _param_row(D, plan),
        None if z is None else _seq(z, plan),
        _param_row(bias, plan),
        None if keep is None else _keep_layout(keep, plan),
    )


@functools.partial(jax.jit, static_argnums=(0, 1))
def _forward(plan: _Plan, save_states: bool, u, delta, A, B, C, D, z, bias, h0, keep):
    u_, delta_, a_, b_, c_, d_, z_, bias_, keep_ = _kernel_inputs(
        plan, u, delta, A, B, C, D, z, bias, keep
    )
    h0_ = None if h0 is None else _state_layout(h0, plan)
    y, h_last, h_tiles = _forward_call(
        plan, save_states, u_, delta_, a_, b_, c_, d_, z_, bias_, h0_, keep_
    )
    h_last = jnp.swapaxes(_unpad_channels(h_last, plan), 1, 2)
    return _unseq(y, plan), h_last, h_tiles


@functools.partial(jax.jit, static_argnums=(0,))
def _backward(plan: _Plan, res, dy, dh_last):
    u, delta, A, B, C, D, z, bias, h0, keep, h_tiles = res
    u_, delta_, a_, b_, c_, d_, z_, bias_, keep_ = _kernel_inputs(
        plan, u, delta, A, B, C, D, z, bias, keep
    )
    du, ddelta, dz, db, dc, da, dd, dbias, dh0 = _backward_call(
        plan, u_, delta_, a_, b_, c_, d_, z_, bias_, keep_, h_tiles,
        _seq(dy.astype(u.dtype), plan), _state_layout(dh_last, plan),
    )  # fmt: skip

    def group_sum(x, dtype):
        # (batch, dim tiles, N, padded length) -> (batch, length, groups, N): sum the dim
        # tiles of each group, as the forward broadcast each group over its channels.
        batch, tiles, n, lp = x.shape
        x = x.reshape(batch, plan.groups, tiles // plan.groups, n, lp).sum(axis=2)
        return jnp.transpose(x[..., : plan.length], (0, 3, 1, 2)).astype(dtype)

    row = lambda x, like: _unpad_channels(x.sum(axis=(0, 1)), plan).astype(like.dtype)  # noqa: E731
    return (
        _unseq(du, plan),
        _unseq(ddelta, plan),
        _unpad_channels(da.sum(axis=0), plan).T.astype(A.dtype),
        group_sum(db, B.dtype),
        group_sum(dc, C.dtype),
        None if D is None else row(dd, D),
        None if z is None else _unseq(dz, plan),
        None if bias is None else row(dbias, bias),
        None if h0 is None else jnp.swapaxes(_unpad_channels(dh0, plan), 1, 2),
        None,  # the segment mask is not differentiable
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(plan: _Plan, u, delta, A, B, C, D, z, bias, h0, keep):
    y, h_last, _ = _forward(plan, False, u, delta, A, B, C, D, z, bias, h0, keep)
    return y, h_last


def _scan_fwd(plan: _Plan, u, delta, A, B, C, D, z, bias, h0, keep):
    y, h_last, h_tiles = _forward(plan, True, u, delta, A, B, C, D, z, bias, h0, keep)
    return (y, h_last), (u, delta, A, B, C, D, z, bias, h0, keep, h_tiles)


def _scan_bwd(plan: _Plan, res, cotangents):
    dy, dh_last = cotangents
    return _backward(plan, res, dy, dh_last)


_scan.defvjp(_scan_fwd, _scan_bwd)


# ----------------------------------------------------------------------------
# The registered configuration


@dataclasses.dataclass(frozen=True)
class PallasTpuScan(ScanImplementation):
    """Pallas Mosaic TPU kernels, forward and backward (a `jax.custom_vjp`).

    Fields (None picks from `tile_sizes`'s table):
      time_tile: steps per length tile, a multiple of 128.
      dim_tile, backward_dim_tile: channels per tile in the forward and the
        backward kernel, multiples of 128 dividing dim // groups rounded up to 128.
      sub_chunk: steps recomputed at a time in the backward, a multiple of 8 dividing 128.
      interpret: False on TPU; True, or a `pltpu.InterpretParams`, runs the kernels
        in Pallas's TPU interpreter (any backend, slowly).
    """

    name = "pallas_tpu"
    time_tile: int | None = None
    dim_tile: int | None = None
    backward_dim_tile: int | None = None
    sub_chunk: int | None = None
    interpret: bool | pltpu.InterpretParams = False

    def __post_init__(self):
        for field in ("time_tile", "dim_tile", "backward_dim_tile"):
            v = getattr(self, field)
            if v is not None and (not isinstance(v, int) or v < _LANES or v % _LANES):
                raise ValueError(f"PallasTpuScan: {field} must be a multiple of 128, got {v!r}")
        k = self.sub_chunk
        bad = not isinstance(k, int) or k < _SUBLANES or _LANES % k or k % _SUBLANES
        if k is not None and bad:
            raise ValueError(
                f"PallasTpuScan: sub_chunk must be a multiple of 8 dividing 128, got {k!r}"
            )
        if not isinstance(self.interpret, (bool, pltpu.InterpretParams)):
            raise TypeError(
                "PallasTpuScan: interpret must be a bool or a pltpu.InterpretParams, got "
                f"{type(self.interpret).__name__}"
            )

    def unsupported(self, spec: ScanSpec, platform: str) -> str | None:
        if platform != "tpu" and self.interpret is False:
            return (
                f"a Mosaic TPU kernel, and the platform is {platform!r}; "
                "PallasTpuScan(interpret=True) runs it in the interpreter"
            )
        cpg_p = _round_up(spec.dim // spec.groups, _LANES)
        for field in ("dim_tile", "backward_dim_tile"):
            v = getattr(self, field)
            if v is not None and cpg_p % v:
                return (
                    f"{field}={v} does not divide the channels per group rounded up to "
                    f"128 ({cpg_p})"
                )
        return None

    def _plan(self, spec: ScanSpec, *, delta_softplus: bool, has_d: bool, has_bias: bool,
             has_h0: bool) -> _Plan:
        """The static kernel plan (tiles and present inputs) for one call."""
        tl, td, td_b, k = tile_sizes(spec.length, spec.state, spec.dim // spec.groups)
        return _Plan(
            batch=spec.batch, length=spec.length, dim=spec.dim, state=spec.state,
            groups=spec.groups, time_tile=self.time_tile or tl, dim_tile=self.dim_tile or td,
            bwd_dim_tile=self.backward_dim_tile or td_b, sub_chunk=self.sub_chunk or k,
            softplus=delta_softplus, has_d=has_d, has_z=spec.has_z, has_bias=has_bias,
            has_h0=has_h0, has_keep=spec.has_segments, interpret=self.interpret,
        )  # fmt: skip

    def __call__(self, args: ScanArgs, *, delta_softplus: bool) -> tuple[Array, Array]:
        plan = self._plan(
            ScanSpec.of(args),
            delta_softplus=delta_softplus,
            has_d=args.D is not None,
            has_bias=args.delta_bias is not None,
            has_h0=args.initial_state is not None,
        )
        keep = keep_mask(args.segment_ids)
        return _scan(
            plan, args.u, args.delta, args.A, args.B, args.C, args.D, args.z,
            args.delta_bias, args.initial_state, keep,
        )  # fmt: skip
