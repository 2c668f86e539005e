"""The selective scan as Pallas Mosaic GPU kernels (Hopper and newer), forward and backward.

Layout: one CTA per (block of 128 channels, batch row), one channel per CUDA thread, the
channel's `state` entries in registers (optionally split over two warpgroups, each holding
half of them). The CTA walks the sequence in tiles of `chunk` tokens that the tensor memory
accelerator (TMA) copies into shared memory `stages` tiles ahead. Per token everything is
fused: delta bias and softplus, the discretisation (exp2 of A pre-scaled by log2 e), the
float32 recurrence, the contraction with C, the D skip and the z gate, with segment resets,
an initial state in and the final state out.

The backward kernel walks the tiles in reverse from the state saved at each tile's entry by
the forward: it recomputes the states inside the tile into shared memory, runs the adjoint
backwards over them, and sums dB and dC over the CTA's channels through a shared-memory
transpose (no atomics: XLA adds the channel blocks, so the result is deterministic).

Mosaic GPU's API changes between jax releases: the kernels are gated on the versions they
were run on (`VERIFIED_JAX`), and `unsupported` says why they are passed over elsewhere.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import Array, lax

from ._scan_common import ScanArgs, ScanImplementation, ScanSpec

# jax versions the kernels ran correctly on an H100 (the benchmark and the GPU tests).
VERIFIED_JAX = ("0.11.2",)
# Versions whose Mosaic GPU lowering the CPU test suite checks (not run on a GPU).
LOWERING_CHECKED_JAX = ("0.11.2", "0.12.0.1")

BLOCK_D = 128  # channels per CTA: one per thread of a warpgroup
SUPPORTED_STATES = (4, 8, 16, 32)  # 2 * state must divide 128 (backward dB/dC transpose)
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_F32 = jnp.float32
_SOFTPLUS_THRESHOLD = 20.0


def _mosaic():
    """The Pallas modules, imported lazily: importing them must not break CPU-only use."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return pl, plgpu


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static shape and options of one kernel call (hashable: the jit cache key)."""

    batch: int
    length: int  # true length; inputs are padded to num_tiles * chunk
    dim: int
    state: int
    groups: int
    dtype: str
    softplus: bool
    has_z: bool
    has_segments: bool
    chunk: int
    stages: int
    unroll: int
    splits: int  # warpgroups sharing one channel's states (1 or 2)
    bwd_chunk: int  # tokens per backward tile; the forward saves the state entering each
    bwd_stages: int = 2
    save_states: bool = False
    interpret: bool = False

    @property
    def num_tiles(self) -> int:
        return -(-self.length // self.chunk)

    @property
    def padded(self) -> int:
        return self.num_tiles * self.chunk

    @property
    def last_count(self) -> int:
        """Tokens of the last tile that are real (1 .. chunk)."""
        return self.length - (self.num_tiles - 1) * self.chunk

    @property
    def bwd_tiles(self) -> int:
        return -(-self.length // self.bwd_chunk)

    @property
    def bwd_last_count(self) -> int:
        return self.length - (self.bwd_tiles - 1) * self.bwd_chunk

    @property
    def block_per_group(self) -> int:
        return (self.dim // self.groups) // BLOCK_D


def _line(plgpu):
    return plgpu.Layout.WG_STRIDED((BLOCK_D,), vec_size=1)  # thread i holds channel i


def _vec(plgpu, ref) -> Array:
    return plgpu.load(ref, layout=_line(plgpu), optimized=False)


def _softplus(x: Array) -> Array:
    """softplus with the official threshold (identity above 20), in exp and log only.

    Mosaic GPU has no log1p: log(1 + e) loses e's digits when e is tiny, so below 1/32 the
    series e - e^2/2 + e^3/3 - e^4/4 (relative error under 1e-6) is used instead.
    """
    e = jnp.exp(jnp.minimum(x, _SOFTPLUS_THRESHOLD))
    series = e * (1.0 - e * (0.5 - e * (1.0 / 3.0 - e * 0.25)))
    lp = jnp.where(e < 1.0 / 32.0, series, jnp.log(1.0 + e))
    return jnp.where(x > _SOFTPLUS_THRESHOLD, x, lp)


def _sigmoid(x: Array) -> Array:
    return 1.0 / (1.0 + jnp.exp(-x))


def _compiler_params(plgpu, cfg: _Config):
    # No automatic barriers: each thread reads and writes only its own channel's column of
    # the shared tiles; the hazards across threads (refilling a tile slot, the dB/dC
    # transpose, the partial outputs of the second warpgroup) are fenced explicitly.
    # Lane semantics: every array's layout is given, so nothing needs the warpgroup
    # semantics' layout inference, which took minutes on these kernels and rejects the
    # strided shared-memory column reads of the backward's dB/dC transpose.
    return plgpu.CompilerParams(approx_math=True, unsafe_no_auto_barriers=True,
                                lowering_semantics=plgpu.LoweringSemantics.Lane)


def _interpret(plgpu, cfg: _Config):
    return plgpu.InterpretGPUParams() if cfg.interpret else None


# ---------------------------------------------------------------------------------------
# forward kernel
# ---------------------------------------------------------------------------------------


def _tile_names(cfg: _Config) -> list[str]:
    return ["dt", "u"] + (["z"] if cfg.has_z else [])


def _keep_tiles(keep: Array | None, cfg: _Config, chunk: int) -> tuple[Array | None, int]:
    """keep (batch, padded) -> (batch, padded // chunk, width): one row per tile, padded
    to at least 32 floats, since copies must move a multiple of 128 bytes."""
    width = max(chunk, 32)
    if keep is None:
        return None, width
    keep = keep.reshape(cfg.batch, cfg.padded // chunk, chunk)
    return jnp.pad(keep, [(0, 0), (0, 0), (0, width - chunk)], constant_values=1.0), width


@functools.partial(jax.jit, static_argnums=0)  # one Mosaic lowering per configuration
def _forward_call(cfg: _Config, dt, u, z, bm, cm, keep, bias, dskip, a2t, h0t):
    """dt, u, z: (batch, padded, dim); bm, cm: (batch, padded, groups, state) f32;
    keep: (batch, padded) f32; bias, dskip: (dim,) f32; a2t: (state, dim) f32 (A log2 e,
    transposed); h0t: (batch, state, dim) f32.

    Returns y (batch, length, dim) in u's dtype, the final state (batch, state, dim) f32 and,
    with cfg.save_states, the state entering every backward tile of cfg.bwd_chunk tokens
    (batch, bwd_tiles, state, dim) f32.
    """
    pl, plgpu = _mosaic()
    n_state, nt, chunk, stages, unroll = cfg.state, cfg.num_tiles, cfg.chunk, cfg.stages, cfg.unroll
    keep, keep_w = _keep_tiles(keep, cfg, chunk)
    splits = cfg.splits
    n_per = n_state // splits
    tiles = _tile_names(cfg)
    names = tiles + ["bm", "cm"] + (["keep"] if cfg.has_segments else [])
    names += ["bias", "dskip", "a2t", "h0t"]
    arrays = dict(dt=dt, u=u, z=z, bm=bm, cm=cm, keep=keep, bias=bias, dskip=dskip, a2t=a2t,
                  h0t=h0t)
    out_names = ["y", "final"] + (["states"] if cfg.save_states else [])
    out_types = [
        jax.ShapeDtypeStruct((cfg.batch, cfg.length, cfg.dim), u.dtype),
        jax.ShapeDtypeStruct((cfg.batch, n_state, cfg.dim), _F32),
    ]
    if cfg.save_states:
        out_types.append(jax.ShapeDtypeStruct((cfg.batch, cfg.bwd_tiles, n_state, cfg.dim), _F32))

    scratch = {k + "_s": plgpu.SMEM((stages, chunk, BLOCK_D), arrays[k].dtype) for k in tiles}
    scratch["bm_s"] = plgpu.SMEM((stages, chunk, n_state), _F32)
    scratch["cm_s"] = plgpu.SMEM((stages, chunk, n_state), _F32)
    if cfg.has_segments:
        scratch["keep_s"] = plgpu.SMEM((stages, keep_w), _F32)
    n_copies = len(tiles) + 2 + int(cfg.has_segments)
    scratch["bars"] = plgpu.Barrier(num_arrivals=n_copies, num_barriers=stages)
    if splits == 2:
        # The second warpgroup's partial outputs, double-buffered by tile, with a barrier
        # saying a buffer is full (second -> first warpgroup) and one saying it is free again.
        # Buffers 0 and 1: the second warpgroup's, by tile parity; 2: the first's own.
        scratch["ypart"] = plgpu.SMEM((3, chunk, BLOCK_D), _F32)
        scratch["full"] = plgpu.Barrier(num_arrivals=1, num_barriers=2)
        scratch["free"] = plgpu.Barrier(num_arrivals=1, num_barriers=2)

    def body(*refs_in, **scr):
        refs = dict(zip(names + out_names, refs_in, strict=True))
        refs.update(scr)
        bars = scr["bars"]
        di, b = lax.axis_index("d"), lax.axis_index("b")
        wg = lax.axis_index("wg") if splits == 2 else 0
        cols = pl.ds(di * BLOCK_D, BLOCK_D)
        grp = di // cfg.block_per_group

        def fetch(n, slot):
            rows = pl.ds(n * chunk, chunk)
            bar = bars.at[slot]
            for k in tiles:
                plgpu.copy_gmem_to_smem(refs[k].at[b, rows, cols], refs[k + "_s"].at[slot], bar)
            for k in ("bm", "cm"):
                plgpu.copy_gmem_to_smem(refs[k].at[b, rows, grp], refs[k + "_s"].at[slot], bar)
            if cfg.has_segments:
                plgpu.copy_gmem_to_smem(refs["keep"].at[b, n], refs["keep_s"].at[slot], bar)

        def prologue():
            for i in range(min(stages, nt)):
                fetch(i, i)

        if splits == 2:
            pl.when(wg == 0)(prologue)
        else:
            prologue()

        j0 = wg * n_per  # first state entry of this warpgroup
        bias_v = _vec(plgpu, refs["bias"].at[cols])
        dskip_v = _vec(plgpu, refs["dskip"].at[cols])
        a2 = [_vec(plgpu, refs["a2t"].at[j0 + j, cols]) for j in range(n_per)]
        h_init = tuple(_vec(plgpu, refs["h0t"].at[b, j0 + j, cols]) for j in range(n_per))
        owner = wg == 0  # the warpgroup that adds the skip, gates and writes y

        def token(n, slot, t, h):
            x = _vec(plgpu, refs["dt_s"].at[slot, t]).astype(_F32) + bias_v
            delta = _softplus(x) if cfg.softplus else x
            uu = _vec(plgpu, refs["u_s"].at[slot, t]).astype(_F32)
            du = delta * uu
            keep_t = refs["keep_s"][slot, t] if cfg.has_segments else None
            acc = [None, None]  # two partial sums: shorter dependency chains
            h = list(h)
            for j in range(n_per):
                dec = jnp.exp2(delta * a2[j])
                if keep_t is not None:
                    dec = dec * keep_t
                h[j] = dec * h[j] + du * refs["bm_s"][slot, t, j0 + j]
                term = h[j] * refs["cm_s"][slot, t, j0 + j]
                acc[j % 2] = term if acc[j % 2] is None else acc[j % 2] + term
            y = acc[0] if acc[1] is None else acc[0] + acc[1]
            if splits == 1:
                y = y + dskip_v * uu
                if cfg.has_z:
                    zz = _vec(plgpu, refs["z_s"].at[slot, t]).astype(_F32)
                    y = y * (zz * _sigmoid(zz))
                refs["y"][b, n * chunk + t, cols] = y.astype(refs["y"].dtype)
            else:
                # Each warpgroup parks its partial sum; the first adds them after the tile.
                refs["ypart"][jnp.where(owner, 2, lax.rem(n, 2)), t, :] = y

            return tuple(h)

        def finish_token(n, slot, t):
            """Second warpgroup's partial + own partial + skip, gated: y of token t (splits=2)."""
            y = _vec(plgpu, refs["ypart"].at[2, t])
            y = y + _vec(plgpu, refs["ypart"].at[lax.rem(n, 2), t])
            uu = _vec(plgpu, refs["u_s"].at[slot, t]).astype(_F32)
            y = y + dskip_v * uu
            if cfg.has_z:
                zz = _vec(plgpu, refs["z_s"].at[slot, t]).astype(_F32)
                y = y * (zz * _sigmoid(zz))
            refs["y"][b, n * chunk + t, cols] = y.astype(refs["y"].dtype)

        def run_tokens(n, slot, h, start, stop):
            """Tokens start .. stop - 1 of tile n (static bounds), `unroll` per loop step."""
            def group(i, h):
                for r in range(unroll):
                    h = token(n, slot, start + i * unroll + r, h)
                return h

            count = stop - start
            h = lax.fori_loop(0, count // unroll, group, h)
            for t in range(start + count - count % unroll, stop):
                h = token(n, slot, t, h)
            return h

        def tile(n, h, count):
            slot = lax.rem(n, stages)
            if splits == 2:
                # The second warpgroup reuses its partial-output buffer of tile n - 2 only
                # once the first has consumed it.
                @pl.when(jnp.logical_and(jnp.logical_not(owner), n >= 2))
                def _():
                    plgpu.barrier_wait(scr["free"].at[lax.rem(n, 2)])

            plgpu.barrier_wait(bars.at[slot])
            if cfg.save_states:  # the state entering every backward tile
                per = chunk // cfg.bwd_chunk
                for sub in range(-(-count // cfg.bwd_chunk)):
                    for j in range(n_per):
                        refs["states"][b, n * per + sub, j0 + j, cols] = h[j]
                    start = sub * cfg.bwd_chunk
                    h = run_tokens(n, slot, h, start, min(start + cfg.bwd_chunk, count))
            else:
                h = run_tokens(n, slot, h, 0, count)
            if splits == 2:
                @pl.when(jnp.logical_not(owner))
                def _():
                    plgpu.barrier_arrive(scr["full"].at[lax.rem(n, 2)])

                @pl.when(owner)
                def _():
                    plgpu.barrier_wait(scr["full"].at[lax.rem(n, 2)])

                    def group(i, c):
                        for r in range(unroll):
                            finish_token(n, slot, i * unroll + r)
                        return c

                    lax.fori_loop(0, count // unroll, group, 0)
                    for t in range(count - count % unroll, count):
                        finish_token(n, slot, t)
                    # (Not for the last two tiles: nobody waits for those buffers.)
                    @pl.when(n + 2 < nt)
                    def _():
                        plgpu.barrier_arrive(scr["free"].at[lax.rem(n, 2)])

                    # Both warpgroups are done with this slot: refill it with tile n + stages.
                    plgpu.commit_smem()

                    @pl.when(n + stages < nt)
                    def _():
                        fetch(n + stages, slot)
            else:
                # Every thread is done with this slot: refill it with tile n + stages.
                plgpu.commit_smem()

                @pl.when(n + stages < nt)
                def _():
                    fetch(n + stages, slot)

            return h

        h = lax.fori_loop(0, nt - 1, lambda n, h: tile(n, h, chunk), h_init)
        h = tile(nt - 1, h, cfg.last_count)
        for j in range(n_per):
            refs["final"][b, j0 + j, cols] = h[j]

    kwargs = {}
    if splits == 2:
        kwargs = dict(num_threads=2, thread_name="wg")
    call = plgpu.kernel(
        body,
        out_type=tuple(out_types),
        scratch_types=scratch,
        grid=(cfg.dim // BLOCK_D, cfg.batch),
        grid_names=("d", "b"),
        compiler_params=_compiler_params(plgpu, cfg),
        interpret=_interpret(plgpu, cfg),
        **kwargs,
    )
    return call(*(arrays[k] for k in names))


# ---------------------------------------------------------------------------------------
# backward kernel
# ---------------------------------------------------------------------------------------


def _reduce_tokens_of(state: int) -> int:
    """Tokens whose 2 * state dB/dC products fill the 128 rows of the transpose buffer."""
    return BLOCK_D // (2 * state)


def _reduce_tokens(cfg: _Config) -> int:
    return _reduce_tokens_of(cfg.state)


@functools.partial(jax.jit, static_argnums=0)  # one Mosaic lowering per configuration
def _backward_call(cfg: _Config, dt, u, z, dout, bm, cm, keep, bias, dskip, a2t, states, gfin):
    """The adjoint of `_forward_call` (same padded inputs), walking bwd tiles in reverse.

    dout: (batch, padded, dim) in u's dtype; states: the forward's saved tile-entry states;
    gfin: (batch, state, dim) f32, the cotangent of the final state.

    Returns ddt, du, dz (batch, length, dim) in u's dtype (dz None without z); dbc
    (batch, dim / 128, padded * 2 * state) f32: per channel block and token, the block's sum
    of the dC terms then of the dB terms; and per batch row, f32: dA (batch, state, dim),
    dD (batch, dim), dbias (batch, dim), dh0 (batch, state, dim).
    """
    pl, plgpu = _mosaic()
    n_state, stages, chunk = cfg.state, cfg.bwd_stages, cfg.bwd_chunk
    nt = cfg.bwd_tiles
    keep, keep_w = _keep_tiles(keep, cfg, chunk)
    width = 2 * n_state
    group = _reduce_tokens(cfg)
    nblk = cfg.dim // BLOCK_D
    tiles = _tile_names(cfg) + ["do"]
    names = tiles + ["bm", "cm"] + (["keep"] if cfg.has_segments else [])
    names += ["bias", "dskip", "a2t", "states", "gfin"]
    arrays = dict(dt=dt, u=u, z=z, do=dout, bm=bm, cm=cm, keep=keep, bias=bias, dskip=dskip,
                  a2t=a2t, states=states, gfin=gfin)
    big = jax.ShapeDtypeStruct((cfg.batch, cfg.length, cfg.dim), u.dtype)
    row = jax.ShapeDtypeStruct((cfg.batch, cfg.dim), _F32)
    mat = jax.ShapeDtypeStruct((cfg.batch, n_state, cfg.dim), _F32)
    out_names = ["ddt", "du"] + (["dz"] if cfg.has_z else []) + ["dbc", "da", "dd", "dbias", "dh0"]
    out_types = [big, big] + ([big] if cfg.has_z else []) + [
        jax.ShapeDtypeStruct((cfg.batch, nblk, cfg.padded * width), _F32), mat, row, row, mat]

    scratch = {k + "_s": plgpu.SMEM((stages, chunk, BLOCK_D), arrays[k].dtype) for k in tiles}
    scratch["bm_s"] = plgpu.SMEM((stages, chunk, n_state), _F32)
    scratch["cm_s"] = plgpu.SMEM((stages, chunk, n_state), _F32)
    if cfg.has_segments:
        scratch["keep_s"] = plgpu.SMEM((stages, keep_w), _F32)
    n_copies = len(tiles) + 2 + int(cfg.has_segments)
    scratch["bars"] = plgpu.Barrier(num_arrivals=n_copies, num_barriers=stages)
    # The state entering every pair of tokens of the tile, and every token's delta.
    scratch["hist"] = plgpu.SMEM((chunk // 2, n_state, BLOCK_D), _F32)
    scratch["hdelta"] = plgpu.SMEM((chunk, BLOCK_D), _F32)
    # dB/dC transpose: row = product of a token, column = channel; the odd pitch keeps both
    # the row writes and the column reads free of bank conflicts.
    scratch["red"] = plgpu.SMEM((BLOCK_D, BLOCK_D + 1), _F32)

    def body(*refs_in, **scr):
        refs = dict(zip(names + out_names, refs_in, strict=True))
        refs.update(scr)
        bars, hist, hdelta, red = scr["bars"], scr["hist"], scr["hdelta"], scr["red"]
        di, b = lax.axis_index("d"), lax.axis_index("b")
        cols = pl.ds(di * BLOCK_D, BLOCK_D)
        grp = di // cfg.block_per_group

        def fetch(i, slot):  # step i of the reverse walk: tile nt - 1 - i
            rows = pl.ds((nt - 1 - i) * chunk, chunk)
            bar = bars.at[slot]
            for k in tiles:
                plgpu.copy_gmem_to_smem(refs[k].at[b, rows, cols], refs[k + "_s"].at[slot], bar)
            for k in ("bm", "cm"):
                plgpu.copy_gmem_to_smem(refs[k].at[b, rows, grp], refs[k + "_s"].at[slot], bar)
            if cfg.has_segments:
                plgpu.copy_gmem_to_smem(
                    refs["keep"].at[b, nt - 1 - i], refs["keep_s"].at[slot], bar)

        for i in range(min(stages, nt)):
            fetch(i, i)
        bias_v = _vec(plgpu, refs["bias"].at[cols])
        dskip_v = _vec(plgpu, refs["dskip"].at[cols])
        a2 = [_vec(plgpu, refs["a2t"].at[j, cols]) for j in range(n_state)]
        zero = bias_v * 0.0

        def tile_step(i, carry, count):
            n = nt - 1 - i
            slot = lax.rem(i, stages)
            plgpu.barrier_wait(bars.at[slot])
            tl = {k: refs[k + "_s"].at[slot] for k in tiles}
            bm_s, cm_s = refs["bm_s"].at[slot], refs["cm_s"].at[slot]

            def keep_of(t):
                return refs["keep_s"][slot, t] if cfg.has_segments else None

            def decays(delta, t):
                keep_t = keep_of(t)
                out = []
                for j in range(n_state):
                    d = jnp.exp2(delta * a2[j])
                    out.append(d * keep_t if keep_t is not None else d)
                return out

            def advance(h, dec, du, t):
                return [dec[j] * h[j] + du * bm_s[t, j] for j in range(n_state)]

            # Pass 1, forward over the tile: the state entering every pair, every delta.
            def fwd_token(t, h):
                x = _vec(plgpu, tl["dt"].at[t]).astype(_F32) + bias_v
                delta = _softplus(x) if cfg.softplus else x
                hdelta[t, :] = delta
                du = delta * _vec(plgpu, tl["u"].at[t]).astype(_F32)
                return advance(h, decays(delta, t), du, t)

            def fwd_pair(k, h):
                h = list(h)
                for j in range(n_state):
                    hist[k, j, :] = h[j]
                h = fwd_token(2 * k, h)
                return tuple(fwd_token(2 * k + 1, h))

            h = tuple(_vec(plgpu, refs["states"].at[b, n, j, cols]) for j in range(n_state))
            h = lax.fori_loop(0, count // 2, fwd_pair, h)
            if count % 2:
                for j in range(n_state):
                    hist[count // 2, j, :] = h[j]
                # (Nothing reads the state after the tile's last token.)
                x = _vec(plgpu, tl["dt"].at[count - 1]).astype(_F32) + bias_v
                hdelta[count - 1, :] = _softplus(x) if cfg.softplus else x

            # Pass 2, backward over the tile, a pair at a time from its entering state.
            def back_token(t, hp, dec, carry):
                g, da, dd, db = carry
                g, da = list(g), list(da)
                x = _vec(plgpu, tl["dt"].at[t]).astype(_F32) + bias_v
                delta = _vec(plgpu, hdelta.at[t])
                uu = _vec(plgpu, tl["u"].at[t]).astype(_F32)
                du = delta * uu
                dout_t = _vec(plgpu, tl["do"].at[t]).astype(_F32)
                if cfg.has_z:
                    zz = _vec(plgpu, tl["z"].at[t]).astype(_F32)
                    sz = _sigmoid(zz)
                    dy = dout_t * (zz * sz)
                    ys = dskip_v * uu
                else:
                    dy = dout_t
                base = lax.rem(t, group) * width
                ddu = zero
                dda = zero
                for j in range(n_state):
                    cj, bj = cm_s[t, j], bm_s[t, j]
                    ht = dec[j] * hp[j] + du * bj
                    if cfg.has_z:
                        ys = ys + ht * cj
                    red[base + j, pl.ds(0, BLOCK_D)] = dy * ht
                    gj = g[j] + dy * cj
                    red[base + n_state + j, pl.ds(0, BLOCK_D)] = gj * du
                    ddu = ddu + gj * bj
                    g[j] = gj * dec[j]
                    gad = g[j] * hp[j]  # cotangent of the decay, times the decay
                    da[j] = da[j] + gad * delta
                    dda = dda + gad * a2[j]
                tok = n * chunk + t
                if cfg.has_z:
                    dz = dout_t * ys * (sz * (1.0 + zz * (1.0 - sz)))
                    refs["dz"][b, tok, cols] = dz.astype(refs["dz"].dtype)
                ddelta = dda * _LN2 + ddu * uu
                if cfg.softplus:
                    ddelta = ddelta * jnp.where(x > _SOFTPLUS_THRESHOLD, 1.0, _sigmoid(x))
                refs["ddt"][b, tok, cols] = ddelta.astype(refs["ddt"].dtype)
                refs["du"][b, tok, cols] = (ddu * delta + dy * dskip_v).astype(refs["du"].dtype)
                return tuple(g), tuple(da), dd + dy * uu, db + ddelta

            def back_pair(k, carry, second):
                """Tokens 2k + 1 (if `second`) then 2k, from the state entering 2k."""
                hp = [_vec(plgpu, hist.at[k, j]) for j in range(n_state)]
                t0 = 2 * k
                d0 = _vec(plgpu, hdelta.at[t0])
                dec0 = decays(d0, t0)
                if second:
                    h0 = advance(hp, dec0, d0 * _vec(plgpu, tl["u"].at[t0]).astype(_F32), t0)
                    dec1 = decays(_vec(plgpu, hdelta.at[t0 + 1]), t0 + 1)
                    carry = back_token(t0 + 1, h0, dec1, carry)
                return back_token(t0, hp, dec0, carry)

            def flush(q):
                """Sum the transpose buffer's rows (tokens q*group ..) over the channels."""
                plgpu.commit_smem()
                acc = [None, None]
                for c in range(BLOCK_D):
                    v = _vec(plgpu, red.at[:, c])  # column c: a stride of BLOCK_D + 1
                    acc[c % 2] = v if acc[c % 2] is None else acc[c % 2] + v
                start = (n * chunk + q * group) * width
                refs["dbc"][b, di, pl.ds(start, BLOCK_D)] = acc[0] + acc[1]
                plgpu.commit_smem()  # every thread is done reading before the next writes

            def back_group(q, carry, ntok):
                """Tokens q*group + ntok - 1 down to q*group (ntok static)."""
                for p in reversed(range(-(-ntok // 2))):
                    second = 2 * p + 1 < ntok
                    carry = back_pair(q * (group // 2) + p, carry, second)
                flush(q)
                return carry

            full, rest = divmod(count, group)
            if rest:
                carry = back_group(full, carry, rest)
            carry = lax.fori_loop(
                0, full, lambda r, c: back_group(full - 1 - r, c, group), carry)

            plgpu.commit_smem()  # every thread is done with this slot: refill it

            @pl.when(i + stages < nt)
            def _():
                fetch(i + stages, slot)

            return carry

        g0 = tuple(_vec(plgpu, refs["gfin"].at[b, j, cols]) for j in range(n_state))
        carry = (g0, tuple(zero for _ in range(n_state)), zero, zero)
        carry = tile_step(0, carry, cfg.bwd_last_count)
        carry = lax.fori_loop(1, nt, lambda i, c: tile_step(i, c, chunk), carry)
        g, da, dd, db = carry
        for j in range(n_state):
            refs["dh0"][b, j, cols] = g[j]
            refs["da"][b, j, cols] = da[j]
        refs["dd"][b, cols] = dd
        refs["dbias"][b, cols] = db

    call = plgpu.kernel(
        body,
        out_type=tuple(out_types),
        scratch_types=scratch,
        grid=(nblk, cfg.batch),
        grid_names=("d", "b"),
        compiler_params=_compiler_params(plgpu, cfg),
        interpret=_interpret(plgpu, cfg),
    )
    outs = list(call(*(arrays[k] for k in names)))
    ddt, du = outs[0], outs[1]
    dz = outs[2] if cfg.has_z else None
    return (ddt, du, dz, *outs[-5:])


# ---------------------------------------------------------------------------------------
# the op: input preparation and custom VJP
# ---------------------------------------------------------------------------------------


def _prepare(cfg: _Config, u, delta, A, B, C, D, z, bias, h0, keep):
    """Pad along time to whole tiles and lay the inputs out as the kernels take them."""
    pad = cfg.padded - cfg.length

    def tpad(x, value=0.0):
        if x is None or pad == 0:
            return x
        widths = [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)
        return jnp.pad(x, widths, constant_values=value)

    dim, n = cfg.dim, cfg.state
    return dict(
        dt=tpad(delta),
        u=tpad(u),
        z=tpad(z),
        bm=tpad(B.astype(_F32)),
        cm=tpad(C.astype(_F32)),
        keep=None if keep is None else tpad(keep, 1.0),
        bias=jnp.zeros((dim,), _F32) if bias is None else bias.astype(_F32),
        dskip=jnp.zeros((dim,), _F32) if D is None else D.astype(_F32),
        a2t=(A.astype(_F32) * _LOG2E).T,
        h0t=jnp.zeros((cfg.batch, n, dim), _F32) if h0 is None else jnp.swapaxes(h0, 1, 2),
    )


_FWD_ORDER = ("dt", "u", "z", "bm", "cm", "keep", "bias", "dskip", "a2t", "h0t")


def _forward(cfg: _Config, u, delta, A, B, C, D, z, bias, h0, keep):
    prep = _prepare(cfg, u, delta, A, B, C, D, z, bias, h0, keep)
    return _forward_call(cfg, *(prep[k] for k in _FWD_ORDER))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(cfg: _Config, u, delta, A, B, C, D, z, bias, h0, keep):
    y, final = _forward(cfg, u, delta, A, B, C, D, z, bias, h0, keep)[:2]
    return y, jnp.swapaxes(final, 1, 2)


def _scan_fwd(cfg: _Config, u, delta, A, B, C, D, z, bias, h0, keep):
    y, final, states = _forward(
        dataclasses.replace(cfg, save_states=True), u, delta, A, B, C, D, z, bias, h0, keep)
    return (y, jnp.swapaxes(final, 1, 2)), (u, delta, A, B, C, D, z, bias, h0, keep, states)


def _scan_bwd(cfg: _Config, res, cts):
    u, delta, A, B, C, D, z, bias, h0, keep, states = res
    dy, dfinal = cts
    prep = _prepare(cfg, u, delta, A, B, C, D, z, bias, h0, keep)
    pad = cfg.padded - cfg.length
    dout = jnp.pad(dy, [(0, 0), (0, pad), (0, 0)]) if pad else dy
    ddt, du, dz, dbc, da, dd, db, dh0 = _backward_call(
        cfg, prep["dt"], prep["u"], prep["z"], dout.astype(u.dtype), prep["bm"], prep["cm"],
        prep["keep"], prep["bias"], prep["dskip"], prep["a2t"], states,
        jnp.swapaxes(dfinal.astype(_F32), 1, 2))
    n, g = cfg.state, cfg.groups
    nblk = cfg.dim // BLOCK_D
    # Channel blocks -> groups (each group's blocks are contiguous), in a fixed order.
    dbc = dbc.reshape(cfg.batch, g, nblk // g, cfg.padded, 2, n)[:, :, :, : cfg.length]
    dbc = jnp.moveaxis(jnp.sum(dbc, axis=2), 1, 3)  # (batch, length, 2, groups, state)
    return (
        du,
        ddt,
        jnp.sum(da, axis=0).T.astype(A.dtype),
        dbc[:, :, 1].astype(B.dtype),
        dbc[:, :, 0].astype(C.dtype),
        None if D is None else jnp.sum(dd, axis=0).astype(D.dtype),
        dz,
        None if bias is None else jnp.sum(db, axis=0).astype(bias.dtype),
        None if h0 is None else jnp.swapaxes(dh0, 1, 2).astype(h0.dtype),
        None if keep is None else jnp.zeros_like(keep),
    )


_scan.defvjp(_scan_fwd, _scan_bwd)


# ---------------------------------------------------------------------------------------
# the registered implementation
# ---------------------------------------------------------------------------------------

_DTYPES = ("float32", "bfloat16")  # the ones run on the H100
_SMEM_LIMIT = 227 * 1024 - 1024  # H100 per-block opt-in maximum, less room for barriers


def _smem_forward(cfg: _Config) -> int:
    s = jnp.dtype(cfg.dtype).itemsize
    ntiles = len(_tile_names(cfg))
    per_stage = ntiles * cfg.chunk * BLOCK_D * s + 2 * cfg.chunk * cfg.state * 4
    per_stage += 4 * max(cfg.chunk, 32) if cfg.has_segments else 0
    extra = 3 * cfg.chunk * BLOCK_D * 4 if cfg.splits == 2 else 0
    return cfg.stages * per_stage + extra


def _smem_backward(cfg: _Config) -> int:
    s = jnp.dtype(cfg.dtype).itemsize
    bc, ntiles = cfg.bwd_chunk, len(_tile_names(cfg)) + 1
    per_stage = ntiles * bc * BLOCK_D * s + 2 * bc * cfg.state * 4
    per_stage += 4 * max(bc, 32) if cfg.has_segments else 0
    hist = (bc // 2) * cfg.state * BLOCK_D * 4 + bc * BLOCK_D * 4
    return cfg.bwd_stages * per_stage + hist + BLOCK_D * (BLOCK_D + 1) * 4


def _fit(cfg: _Config) -> _Config | None:
    """Shrink pipelining depth, then tiles, until both kernels fit in shared memory."""
    while _smem_forward(cfg) > _SMEM_LIMIT:
        if cfg.stages > 2:
            cfg = dataclasses.replace(cfg, stages=cfg.stages - 1)
        elif cfg.chunk > cfg.bwd_chunk:
            cfg = dataclasses.replace(cfg, chunk=cfg.chunk // 2)
        else:
            return None
    while _smem_backward(cfg) > _SMEM_LIMIT:
        smaller = cfg.bwd_chunk // 2
        if smaller >= 2 and smaller % 2 == 0 and smaller % _reduce_tokens(cfg) == 0:
            cfg = dataclasses.replace(cfg, bwd_chunk=smaller)
        elif cfg.bwd_stages > 1:
            cfg = dataclasses.replace(cfg, bwd_stages=1)
        else:
            return None
    return cfg


def _device_reason() -> str | None:
    """Why this process's GPU cannot run the kernels (None if it can)."""
    try:
        devices = jax.devices("gpu")
    except RuntimeError:
        return "no GPU visible to jax"
    dev = devices[0]
    cc = str(getattr(dev, "compute_capability", ""))
    if not cc.startswith("9."):
        return (f"{dev.device_kind} (compute capability {cc or 'unknown'}) is not a Hopper GPU, "
                "the only architecture the kernels were verified on")
    return None


@dataclasses.dataclass(frozen=True)
class PallasMosaicScan(ScanImplementation):
    """Pallas Mosaic GPU kernels, forward and backward (Hopper; jax in `VERIFIED_JAX`).

    chunk: tokens per forward tile; stages: tiles in flight; unroll: tokens per loop step;
    splits: warpgroups per CTA sharing a channel's states (1 or 2); bwd_chunk: tokens per
    backward tile (the forward saves the state entering each); interpret: run the kernels
    in Mosaic GPU's CPU interpreter (tests; slow).
    """

    name = "pallas_mosaic"
    chunk: int = 32
    stages: int = 3
    unroll: int = 8  # 0.275 ms against 0.292 ms with 4 (H100, bf16, batch 8, dim 2048, length 2048)
    splits: int = 1
    bwd_chunk: int = 16
    interpret: bool = False

    def __post_init__(self):
        if self.splits not in (1, 2):
            raise ValueError(f"PallasMosaicScan: splits must be 1 or 2, got {self.splits}")
        for field in ("chunk", "stages", "unroll", "bwd_chunk"):
            if getattr(self, field) < 1:
                raise ValueError(
                    f"PallasMosaicScan: {field} must be >= 1, got {getattr(self, field)}")
        if self.chunk % self.bwd_chunk or self.bwd_chunk % 2:
            raise ValueError(
                f"PallasMosaicScan: bwd_chunk ({self.bwd_chunk}) must be even and divide "
                f"chunk ({self.chunk})")

    def unsupported(self, spec: ScanSpec, platform: str) -> str | None:
        if not self.interpret:
            if platform != "gpu":
                return f"needs a CUDA GPU (platform is {platform!r})"
            if jax.__version__ not in VERIFIED_JAX:
                return (f"jax {jax.__version__}: Mosaic GPU's API changes between releases and "
                        f"the kernels were verified on jax {', '.join(VERIFIED_JAX)} only")
            why = _device_reason()
            if why is not None:
                return why
        if spec.dim % BLOCK_D:
            return f"dim {spec.dim} is not a multiple of {BLOCK_D}"
        if (spec.dim // spec.groups) % BLOCK_D:
            return f"channels per B/C group ({spec.dim // spec.groups}) not a multiple of {BLOCK_D}"
        if spec.state not in SUPPORTED_STATES:
            return f"state {spec.state} not in {SUPPORTED_STATES}"
        if self.bwd_chunk % _reduce_tokens_of(spec.state):
            group = _reduce_tokens_of(spec.state)
            return (f"bwd_chunk {self.bwd_chunk} is not a multiple of {group}, the tokens "
                    f"whose dB/dC terms the backward sums at once at state {spec.state}")
        if spec.state % self.splits:
            return f"state {spec.state} does not split over {self.splits} warpgroups"
        if spec.dtype not in _DTYPES:
            return f"dtype {spec.dtype} (takes {', '.join(_DTYPES)})"
        if _fit(self._config(spec, delta_softplus=True)) is None:
            return "the tiles do not fit in shared memory; lower chunk, stages or bwd_chunk"
        return None

    def config(self, spec: ScanSpec, *, delta_softplus: bool) -> _Config:
        """The static kernel configuration of a call, shrunk to fit in shared memory."""
        cfg = _fit(self._config(spec, delta_softplus=delta_softplus))
        if cfg is None:
            raise ValueError(f"{self.name}: the tiles do not fit in shared memory ({spec})")
        return cfg

    def _config(self, spec: ScanSpec, *, delta_softplus: bool) -> _Config:
        return _Config(
            batch=spec.batch, length=spec.length, dim=spec.dim, state=spec.state,
            groups=spec.groups, dtype=spec.dtype, softplus=delta_softplus, has_z=spec.has_z,
            has_segments=spec.has_segments, chunk=self.chunk, stages=self.stages,
            unroll=self.unroll, splits=self.splits, bwd_chunk=self.bwd_chunk,
            interpret=self.interpret)

    def __call__(self, args: ScanArgs, *, delta_softplus: bool) -> tuple[Array, Array]:
        if args.compute_dtype != jnp.float32:
            # The kernels compute in float32; a float64 input must not be rounded silently.
            raise ValueError(f"{self.name}: computes in float32, but an input is "
                             f"{args.compute_dtype}; use impl='reference' or 'chunked'")
        cfg = self.config(ScanSpec.of(args), delta_softplus=delta_softplus)
        keep = None
        if args.segment_ids is not None:
            same = args.segment_ids[:, 1:] == args.segment_ids[:, :-1]
            keep = jnp.concatenate([jnp.ones_like(same[:, :1]), same], axis=1).astype(_F32)
        return _scan(cfg, args.u, args.delta, args.A, args.B, args.C, args.D, args.z,
                     args.delta_bias, args.initial_state, keep)
