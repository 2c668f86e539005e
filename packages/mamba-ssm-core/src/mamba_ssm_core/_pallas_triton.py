"""The selective scan as fused Pallas kernels on the Triton backend (Ampere and Hopper GPUs).

Forward: one program per (batch, block of `block_d` channels) walks the whole
sequence. Its state, (state, block_d) float32, stays in registers; each step
reads one row of u, delta, z, B and C, applies the delta bias and softplus,
discretises, updates the state, contracts it with C, adds the D skip, gates with
silu(z) and writes one row of y. The (batch, length, dim, state) tensor is
never written to device memory. With a backward to come, it also saves the
state entering each tile of `tile_l` steps.

Backward (behind `jax.custom_vjp`): the same programs walk the tiles in reverse.
Per tile they recompute the states at the start of each sub-tile of
`bwd_unroll` steps into a small per-program workspace, then walk the sub-tiles
in reverse, recomputing that sub-tile's states in registers and running the
adjoint recurrence. Parameter gradients leave each program as partial sums
(per batch row, per channel block) that XLA sums afterwards: no atomics, so the
result is deterministic. The dB and dC partial sums, (batch, channel blocks,
length, state) float32, are the backward's largest buffer; so the backward walks
`bwd_splits` ranges of tiles in turn, the last range first, carrying the state's
cotangent and the dA, dD and delta-bias sums between them, and each range's partial
sums are reduced before later launches allocate theirs (the arithmetic is the same
as in one launch, bit for bit). The work items (program slot, range) run in
launches of `bwd_wave` programs, what the GPU holds at once: where batch x channel
blocks is more than that (dim 5120, batch 8 on an H100: 1280 programs, 1056 at once),
one launch a range would end each range on a part-filled second wave; packed, each
launch takes the end of one range and the start of the next.
`backward="reference"` swaps in the VJP of the sequential `lax.scan` for checking.

Layouts inside the kernels: the state is (state, channels) with the channels
last. Triton picks the register layout from the kernel's 2D loads and stores:
a 2D load of A vectorises along the channels, which gives each thread 4 channels
by 4 state entries (sums over the state take 2 shuffle rounds, sums over the
channels 3, and each per-step row of channels goes through shared memory). The
forward assembles A row by row instead (`a_rows`): then each thread holds all
state entries of one channel and a step needs no shuffle and no shared memory
(measured on the H100 in benchmarks/RESULTS.md). The backward keeps the 2D
layout: in the row-by-row one its sums over the channels (dB, dC) take 5 shuffle
rounds, and a probe of it on the H100 was inconclusive.

Transcendentals and fused multiply-adds go through inline PTX on the GPU
(`fast_math`): jnp's exp2 and division lower to libdevice calls and its a * b + c
to two instructions, and both kernels are bound by the instructions they issue.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import Array
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from ._scan_common import (
    SOFTPLUS_THRESHOLD,
    ScanArgs,
    ScanImplementation,
    ScanSpec,
    keep_mask,
    prepare_delta,
)
from ._scan_reference import scan_steps

_LOG2E = math.log2(math.e)
_DTYPES = ("float32", "bfloat16", "float16")
MAX_STATE = 256
_BACKWARDS = ("kernel", "reference")
_F32 = jnp.float32


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _first_gpu():
    """The first GPU device, or None if there is none."""
    try:
        return jax.devices("gpu")[0]
    except (RuntimeError, IndexError):
        return None


def _gpu_sm_count() -> int | None:
    """Streaming multiprocessors of the first GPU, or None if there is no GPU."""
    count = getattr(_first_gpu(), "core_count", None)
    return None if count is None else int(count)


def _programs_per_sm(regs: int, warps: int) -> int:
    """Programs of `warps` warps using `regs` registers a thread that an SM holds at once.

    A warp takes its registers, in units of 256, from one of the SM's four
    16384-register quarters, one a warp scheduler (H100 and A100 alike): 1-warp
    programs of 169 to 255 registers fit 2 a quarter, 8 an SM (ncu showed it at 195).
    At most 64 warps and 32 programs an SM."""
    per_warp = -(-regs * 32 // 256) * 256
    warps_per_sm = min(4 * (16384 // per_warp), 64)
    return max(1, min(warps_per_sm // warps, 32))


def _backward_programs_per_sm(sub_tile_entries: int, warps: int) -> int:
    """Backward programs of `warps` warps an SM holds at once, by the state entries a
    thread holds for a sub-tile (its state entries x bwd_unroll).

    ptxas gives the default backward 255 registers a thread at every state size but 1
    (168 there; `benchmarks/triton_registers.py`, 2026-11-23; 255 agrees with ncu on
    the H100): 8 one-warp programs an SM, or 12 at 168."""
    return _programs_per_sm(168 if sub_tile_entries <= 8 else 255, warps)


def _cuda_compute_capability() -> tuple[int, int] | None:
    """(major, minor) of the first GPU, or None if it is no CUDA device."""
    try:
        major, minor = str(_first_gpu().compute_capability).split(".")[:2]
        return int(major), int(minor)
    except (AttributeError, ValueError):
        return None


@dataclasses.dataclass(frozen=True)
class _Kernel:
    """Everything static about one kernel launch; hashable, the custom_vjp's nondiff arg."""

    length: int  # true sequence length
    tile: int  # steps per saved state (forward tile)
    n_tiles: int
    unroll: int  # forward steps per unrolled sub-tile
    bwd_unroll: int  # backward steps per recomputed sub-tile
    state: int  # padded state size (a power of two)
    block_d: int
    bwd_block_d: int
    blocks_per_group: int  # channel blocks per group of B and C (forward)
    bwd_blocks_per_group: int
    num_warps: int
    bwd_num_warps: int
    num_stages: int
    softplus: bool
    has_z: bool
    has_D: bool
    has_bias: bool
    has_keep: bool
    has_h0: bool
    prefetch: bool  # forward: load the next sub-tile's rows before computing this one
    bwd_prefetch: bool
    keep_decay: bool  # backward: keep a sub-tile's decays in registers (else recompute)
    bwd_splits: int  # ranges of whole tiles the backward walks in turn (see _backward_impl)
    bwd_wave: int  # backward work items (program slot, range) a launch runs
    fill_unroll: int  # backward: steps a workspace-filling iteration walks
    backward: str
    fast_math: bool  # MUFU instructions for exp2, exp and reciprocals (see _asm)
    a_rows: bool  # forwards: A (and h0) row by row (see _load_2d)
    interpret: bool

    @property
    def masked(self) -> bool:
        """True when the tiles overrun the sequence: the overrun steps are masked out."""
        return self.n_tiles * self.tile != self.length


# ----------------------------------------------------------------------------
# Pieces shared by the kernel bodies. `t` is a traced int32 step index.
#
# Every sub-tile first loads all its rows, then computes, then stores: a load
# issued after a store cannot be moved above it (the refs may alias), so loads
# interleaved with the stores would cost one memory round trip per step. With
# `prefetch` the next sub-tile's rows are loaded before this one is computed and
# carried through the loop, which hides the round trip behind the arithmetic.


def _row(ref, t, cfg: _Kernel, clamp: bool = False):
    """Row t of a (length, ...) ref; past the end it reads the last row (masked by the caller)."""
    if cfg.masked or clamp:
        t = jnp.minimum(t, cfg.length - 1)
    return ref[t]


def _store_row(ref, t, val, cfg: _Kernel):
    if cfg.masked:
        valid = jnp.full(val.shape, t < cfg.length)
        plt.store(ref.at[jnp.minimum(t, cfg.length - 1)], val, mask=valid)
    else:
        ref[t] = val


def _load_rows(ins, t0, count: int, names, cfg: _Kernel, clamp: bool):
    """[{name: row t0 + k}] for k < count: every load of a sub-tile, issued together."""
    return [{n: _row(ins[n], t0 + k, cfg, clamp) for n in names if ins[n] is not None}
            for k in range(count)]


def _asm(op: str, x):
    """One PTX float32 instruction per element (`op` like "ex2.approx.ftz.f32").

    libdevice's exp2f/expf and IEEE division, what jnp lowers to, take 4 to 20
    instructions where one MUFU instruction does (about 2 ulp, denormals flushed to
    zero), and both kernels are bound by the instructions they issue. The
    interpreter has no inline assembly: there (and with fast_math off) jnp's
    functions stand in."""
    return plt.elementwise_inline_asm(
        f"{op} $0, $1;", args=[x], constraints="=f,f", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, x.dtype)],
    )[0]


def _exp2(x, cfg: _Kernel):
    if cfg.interpret or not cfg.fast_math:
        return jnp.exp2(x)
    return _asm("ex2.approx.ftz.f32", x)


def _exp(x, cfg: _Kernel):
    if cfg.interpret or not cfg.fast_math:
        return jnp.exp(x)
    return _exp2(x * _LOG2E, cfg)


def _sigmoid(x, cfg: _Kernel):
    if cfg.interpret or not cfg.fast_math:
        return 1.0 / (1.0 + jnp.exp(-x))
    return _asm("rcp.approx.ftz.f32", 1.0 + _exp(-x, cfg))


def _fma(a, b, c, cfg: _Kernel):
    """a * b + c as one fused multiply-add: the kernels' multiplies and adds reach
    ptxas unfused otherwise (two instructions)."""
    if cfg.interpret or not cfg.fast_math:
        return a * b + c
    shape = jnp.broadcast_shapes(a.shape, b.shape, c.shape)
    a, b, c = (jnp.broadcast_to(v, shape) for v in (a, b, c))
    return plt.elementwise_inline_asm(
        "fma.rn.f32 $0, $1, $2, $3;", args=[a, b, c], constraints="=f,f,f,f", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(shape, _F32)],
    )[0]


def _load_2d(ref, by_rows: bool):
    """A (state, block_d) ref as a value. by_rows: one (block_d,) load per state entry,
    assembled with selects, so that no 2D load sets the layout Triton gives the
    kernel's (state, block_d) arithmetic (a 2D load is vectorised along the channels,
    which splits the state over 4 lanes and puts every per-step row of channels
    through shared memory)."""
    if not by_rows:
        return ref[...]
    N, bd = ref.shape
    n_idx = jax.lax.broadcasted_iota(jnp.int32, (N, bd), 0)
    out = jnp.zeros((N, bd), ref.dtype)
    for n in range(N):
        out = jnp.where(n_idx == n, ref[n][None, :], out)
    return out


def _delta(row, bias, t, cfg: _Kernel):
    """(raw delta + bias, delta after softplus), (block_d,) float32 each.

    Past the end of the sequence delta is 0, which makes the step the identity map.
    """
    x = row["dt"].astype(_F32)
    if bias is not None:
        x = x + bias
    dt = x
    if cfg.softplus:
        dt = jnp.where(
            x > SOFTPLUS_THRESHOLD, x, jnp.log1p(_exp(jnp.minimum(x, SOFTPLUS_THRESHOLD), cfg))
        )
    if cfg.masked:
        dt = jnp.where(t < cfg.length, dt, 0.0)
    return x, dt


def _decay(dt, A2, row, t, cfg: _Kernel):
    """exp(delta * A) as exp2(delta * A * log2(e)), zeroed where the segment restarts."""
    dA = _exp2(dt[None, :] * A2, cfg)
    if cfg.has_keep:
        keep = row["keep"]
        if cfg.masked:
            keep = jnp.where(t < cfg.length, keep, 1)
        dA = dA * keep.astype(_F32)
    return dA


def _unpack(refs, names_flags):
    it = iter(refs)
    out = {name: (next(it) if flag else None) for name, flag in names_flags}
    rest = list(it)
    return out, rest


def _input_names(cfg: _Kernel):
    return (
        ("u", True),
        ("dt", True),
        ("z", cfg.has_z),
        ("A", True),
        ("B", True),
        ("C", True),
        ("D", cfg.has_D),
        ("bias", cfg.has_bias),
        ("keep", cfg.has_keep),
    )


def _barrier(cfg: _Kernel):
    # Orders the workspace's global-memory writes and reads between the program's
    # threads. The interpreter runs one program at a time and has no barrier rule.
    if not cfg.interpret:
        plt.debug_barrier()


# ----------------------------------------------------------------------------
# Forward kernel.


def _fwd_kernel(cfg: _Kernel, save: bool, *refs):
    ins, rest = _unpack(refs, (*_input_names(cfg), ("h0", cfg.has_h0)))
    y_ref, hlast_ref, *ck = rest
    ck_ref = ck[0] if save else None
    K = cfg.unroll
    a_rows = cfg.a_rows
    n_sub = cfg.tile // K
    names = ("u", "dt", "z", "B", "C", "keep")

    A2 = _load_2d(ins["A"], a_rows) * _LOG2E  # (state, bd) float32, pre-scaled for exp2
    D = ins["D"][...] if cfg.has_D else None
    bias = ins["bias"][...] if cfg.has_bias else None

    def load(s):
        return _load_rows(ins, s * K, K, names, cfg, clamp=cfg.prefetch)

    def compute(s, rows, h):
        ys = []
        for k, r in enumerate(rows):
            t = s * K + k
            _, dt = _delta(r, bias, t, cfg)
            u = r["u"].astype(_F32)
            dA = _decay(dt, A2, r, t, cfg)
            h = _fma(dA, h, (dt * u)[None, :] * r["B"].astype(_F32)[:, None], cfg)
            y = jnp.sum(h * r["C"].astype(_F32)[:, None], axis=0)
            if D is not None:
                y = y + D * u
            if cfg.has_z:
                z = r["z"].astype(_F32)
                y = y * (z * _sigmoid(z, cfg))
            ys.append(y)
        for k, y in enumerate(ys):
            _store_row(y_ref, s * K + k, y.astype(y_ref.dtype), cfg)
        return h

    def body(s, carry):
        if cfg.prefetch:
            h, rows = carry
            nxt = load(s + 1)
        else:
            h, rows = carry, load(s)
        h = compute(s, rows, h)
        return (h, nxt) if cfg.prefetch else h

    def tile_body(c, carry):
        if save:
            ck_ref[c] = carry[0] if cfg.prefetch else carry
        return jax.lax.fori_loop(c * n_sub, (c + 1) * n_sub, body, carry)

    # A loop over tiles around a loop over their sub-tiles, with or without saved
    # states. One flat loop over the sub-tiles (the state saved under a branch in it)
    # was 1.3x slower without saved states and, with A row by row, 1.7x slower with
    # them (forward+backward); why, we did not find out. H100 figures in
    # benchmarks/RESULTS.md.
    h = _load_2d(ins["h0"], a_rows) if cfg.has_h0 else jnp.zeros((cfg.state, cfg.block_d), _F32)
    init = (h, load(0)) if cfg.prefetch else h
    out = jax.lax.fori_loop(0, cfg.n_tiles, tile_body, init)
    hlast_ref[...] = out[0] if cfg.prefetch else out


def _in_specs(cfg: _Kernel, bd: int, bpg: int, names):
    """The forward's BlockSpecs over the grid (batch, channel block j) for the named inputs."""
    L, N = cfg.length, cfg.state
    seq = pl.BlockSpec((None, L, bd), lambda b, j: (b, 0, j))
    chan = pl.BlockSpec((bd,), lambda b, j: (j,))
    specs = {
        "u": seq,
        "dt": seq,
        "z": seq,
        "A": pl.BlockSpec((N, bd), lambda b, j: (0, j)),
        "B": pl.BlockSpec((None, L, None, N), lambda b, j: (b, 0, j // bpg, 0)),
        "C": pl.BlockSpec((None, L, None, N), lambda b, j: (b, 0, j // bpg, 0)),
        "D": chan,
        "bias": chan,
        "keep": pl.BlockSpec((None, L), lambda b, j: (b, 0)),
        "h0": pl.BlockSpec((None, N, bd), lambda b, j: (b, 0, j)),
    }
    return [specs[n] for n in names]


def _forward_impl(cfg: _Kernel, save: bool, u, dt, z, A, B, C, D, bias, keep, h0):
    batch, L, dp = u.shape
    N, bd = cfg.state, cfg.block_d
    given = dict(u=u, dt=dt, z=z, A=A, B=B, C=C, D=D, bias=bias, keep=keep, h0=h0)
    names = [n for n, flag in (*_input_names(cfg), ("h0", cfg.has_h0)) if flag]
    out_shape = [
        jax.ShapeDtypeStruct((batch, L, dp), u.dtype),
        jax.ShapeDtypeStruct((batch, N, dp), _F32),
    ]
    out_specs = [
        pl.BlockSpec((None, L, bd), lambda b, j: (b, 0, j)),
        pl.BlockSpec((None, N, bd), lambda b, j: (b, 0, j)),
    ]
    if save:
        out_shape.append(jax.ShapeDtypeStruct((batch, cfg.n_tiles, N, dp), _F32))
        out_specs.append(pl.BlockSpec((None, cfg.n_tiles, N, bd), lambda b, j: (b, 0, 0, j)))
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg, save),
        out_shape=out_shape,
        grid=(batch, dp // bd),
        in_specs=_in_specs(cfg, bd, cfg.blocks_per_group, names),
        out_specs=out_specs,
        compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=cfg.interpret,
        name="selective_scan_fwd",
    )(*[given[n] for n in names])
    return tuple(outs) if save else (*outs, None)


_forward = jax.jit(_forward_impl, static_argnums=(0, 1))


# ----------------------------------------------------------------------------
# Backward kernel.


def _bwd_input_names(cfg: _Kernel, chained: bool):
    return (
        *_input_names(cfg),
        ("ck", True),
        ("dy", True),
        ("base", True),
        # the sums carried between a program's ranges, updated in place (aliased)
        ("dhlast", True),
        ("accA", True),
        ("accD", cfg.has_D),
        ("accbias", cfg.has_bias),
        # the gradients so far (launches after the first), updated in place
        ("du_in", chained),
        ("ddt_in", chained),
        ("dz_in", chained and cfg.has_z),
    )


@dataclasses.dataclass(frozen=True)
class _View:
    """One program's slice of a whole-array ref, indexed by the free axis between `pre`
    and `post`: view[t] is ref[*pre, t, *post]. (Triton lowers one indexer per
    access, so a view cannot be a ref.at[...] that is indexed again.)"""

    ref: object
    pre: tuple
    post: tuple

    def __getitem__(self, t):
        return self.ref[(*self.pre, t, *self.post)]

    def __setitem__(self, t, val):
        self.ref[(*self.pre, t, *self.post)] = val

    @property
    def dtype(self):
        return self.ref.dtype

    @property
    def at(self):
        return _ViewAt(self)


@dataclasses.dataclass(frozen=True)
class _ViewAt:
    view: _View

    def __getitem__(self, t):
        v = self.view
        return v.ref.at[(*v.pre, t, *v.post)]


def _bwd_kernel(cfg: _Kernel, chained: bool, *refs):
    """One backward launch: program i takes work item q = base + i, which is tile range
    k = q // P (launch order: k = 0 is the last range in time) of program slot
    p = q % P = (batch row, channel block), P = batch x channel blocks. An item's
    earlier ranges are items q - P, q - 2P, ...; a launch holds at most P items, so
    those ran in earlier launches, which left the state's cotangent and the dA, dD and
    dbias sums in the aliased carry refs. dB and dC rows go to this program's slot of
    the launch's partial sums, indexed from the range's first step. Every other ref is
    the whole array, indexed here."""
    ins, rest = _unpack(refs, _bwd_input_names(cfg, chained))
    names = ("du", "ddt", "dz", "dA", "dB", "dC", "dh0", "ws", "dD", "dbias")
    flags = (True, True, cfg.has_z, True, True, True, True, True, cfg.has_D, cfg.has_bias)
    outs, _ = _unpack(rest, zip(names, flags, strict=True))
    batch, _, dp = ins["u"].shape
    nblk = dp // cfg.bwd_block_d
    P = batch * nblk
    per = -(-cfg.n_tiles // cfg.bwd_splits)  # tiles a range (the last in time may be shorter)
    q = ins["base"][0] + pl.program_id(0)

    @pl.when(q < cfg.bwd_splits * P)  # the last launch may have idle programs
    def _():
        k, p = jax.lax.div(q, P), jax.lax.rem(q, P)
        first = (cfg.bwd_splits - 1 - k) * per
        _bwd_item(cfg, ins, outs, b=jax.lax.div(p, nblk), j=jax.lax.rem(p, nblk), first=first,
                  tiles=jnp.minimum(per, cfg.n_tiles - first))


def _bwd_item(cfg: _Kernel, ins, outs, *, b, j, first, tiles):
    """The adjoint of tiles [first, first + tiles) of batch row b, channel block j."""
    K = cfg.bwd_unroll
    n_sub = cfg.tile // K
    n_all = tiles * n_sub
    s_end = (first + tiles) * n_sub  # one past the range's last sub-tile
    t_lo = first * cfg.tile
    bd = cfg.bwd_block_d
    ch = pl.ds(j * bd, bd)
    grp = jax.lax.div(j, cfg.bwd_blocks_per_group)
    fill_names = ("u", "dt", "B", "keep")
    all_names = ("u", "dt", "z", "dy", "B", "C", "keep")
    rows_in = {n: None if ins[n] is None else _View(ins[n], (b,), (ch,))
               for n in ("u", "dt", "z", "dy")}
    rows_in.update({n: _View(ins[n], (b,), (grp, slice(None))) for n in ("B", "C")})
    rows_in["keep"] = _View(ins["keep"], (b,), ()) if cfg.has_keep else None
    du_ref, ddt_ref = _View(outs["du"], (b,), (ch,)), _View(outs["ddt"], (b,), (ch,))
    dz_ref = _View(outs["dz"], (b,), (ch,)) if cfg.has_z else None
    ws_ref, dB_ref, dC_ref = outs["ws"], outs["dB"], outs["dC"]

    A2 = ins["A"][:, ch] * _LOG2E
    D = ins["D"][ch] if cfg.has_D else None
    bias = ins["bias"][ch] if cfg.has_bias else None

    def advance(r, t, h):
        """One forward step from h: (new state, decay, raw delta, delta, u)."""
        x, dt = _delta(r, bias, t, cfg)
        u = r["u"].astype(_F32)
        dA = _decay(dt, A2, r, t, cfg)
        h = _fma(dA, h, (dt * u)[None, :] * r["B"].astype(_F32)[:, None], cfg)
        return h, dA, x, dt, u

    def fill(c):
        """States entering each sub-tile of tile c, into this program's workspace.

        Walks `fill_unroll` steps (several sub-tiles) per iteration: it keeps no
        states, so its rows are cheap to hold and fewer round trips are exposed."""
        _barrier(cfg)  # the previous tile's reads of the workspace are done
        KF = cfg.fill_unroll
        per = KF // K  # sub-tiles per iteration

        def body(g, h):
            t0 = c * cfg.tile + g * KF
            rows = _load_rows(rows_in, t0, KF, fill_names, cfg, False)
            for k, r in enumerate(rows):
                if k % K == 0:
                    ws_ref[g * per + k // K] = h
                h = advance(r, t0 + k, h)[0]
            return h

        # The last iteration also advances through the tile's last sub-tile, which
        # the workspace does not need: K wasted steps a tile, for a simpler loop.
        jax.lax.fori_loop(0, cfg.tile // KF, body, ins["ck"][b, c, :, ch])
        _barrier(cfg)

    def back(r, t, h_prev, h, dA, x, dt, u, acc):
        """Adjoint of step t. acc: (gradient reaching h_t from later steps, dA, dD, dbias sums).

        Returns (acc, output rows)."""
        g_next, acc_A, acc_D, acc_bias = acc
        B = r["B"].astype(_F32)
        C = r["C"].astype(_F32)
        if dA is None:
            dA = _decay(dt, A2, r, t, cfg)
        dy = r["dy"].astype(_F32)
        out = {}
        if cfg.has_z:
            z = r["z"].astype(_F32)
            sig = _sigmoid(z, cfg)
            y_pre = jnp.sum(h * C[:, None], axis=0)
            if D is not None:
                y_pre = y_pre + D * u
            out["dz"] = dy * y_pre * sig * (1.0 + z * (1.0 - sig))
            dy = dy * z * sig
        if cfg.masked:
            dy = jnp.where(t < cfg.length, dy, 0.0)
        g = _fma(C[:, None], dy[None, :], g_next, cfg)  # total gradient of h_t
        gB = jnp.sum(g * B[:, None], axis=0)
        g_dA_h = g * dA * h_prev
        # d h_t / d delta = A dA h_{t-1} + u B, with A = A2 / log2(e)
        ddt = u * gB + jnp.sum(A2 * g_dA_h, axis=0) * (1.0 / _LOG2E)
        du = dt * gB
        if D is not None:
            du = du + D * dy
            acc_D = acc_D + dy * u
        acc_A = _fma(g_dA_h, dt[None, :], acc_A, cfg)
        if cfg.softplus:
            ddt = jnp.where(x > SOFTPLUS_THRESHOLD, ddt, ddt * _sigmoid(x, cfg))
        if cfg.has_bias:
            acc_bias = acc_bias + (jnp.where(t < cfg.length, ddt, 0.0) if cfg.masked else ddt)
        out["du"], out["ddt"] = du, ddt
        # Partial sums over this block's channels; rows past the end are sliced off outside.
        out["dB"] = jnp.sum(g * (dt * u)[None, :], axis=1)
        out["dC"] = jnp.sum(h * dy[None, :], axis=1)
        return (g * dA, acc_A, acc_D, acc_bias), out

    def load(s):
        return _load_rows(rows_in, s * K, K, all_names, cfg, cfg.bwd_prefetch)

    def body(i, carry):
        s = s_end - 1 - i  # sub-tiles in reverse
        m = jax.lax.rem(s, n_sub)
        if cfg.bwd_prefetch:
            acc, rows = carry
            nxt = load(jnp.maximum(s - 1, 0))
        else:
            acc, rows = carry, load(s)

        @pl.when(m == n_sub - 1)
        def _():
            fill(jax.lax.div(s, n_sub))

        # Recompute the sub-tile's states in registers (and its decays, if they fit).
        hs, saved = [ws_ref[m]], []
        for k, r in enumerate(rows):
            h, dA, x, dt, u = advance(r, s * K + k, hs[-1])
            hs.append(h)
            saved.append((dA if cfg.keep_decay else None, x, dt, u))
        outs = [None] * K
        for k in reversed(range(K)):
            acc, outs[k] = back(rows[k], s * K + k, hs[k], hs[k + 1], *saved[k], acc)
        for k, o in enumerate(outs):
            t = s * K + k
            _store_row(du_ref, t, o["du"].astype(du_ref.dtype), cfg)
            _store_row(ddt_ref, t, o["ddt"].astype(ddt_ref.dtype), cfg)
            if dz_ref is not None:
                _store_row(dz_ref, t, o["dz"].astype(dz_ref.dtype), cfg)
            dB_ref[t - t_lo] = o["dB"]
            dC_ref[t - t_lo] = o["dC"]
        return (acc, nxt) if cfg.bwd_prefetch else acc

    zeros_d = jnp.zeros((bd,), _F32)
    acc = (
        ins["dhlast"][b, :, ch],
        ins["accA"][b, :, ch],
        ins["accD"][b, ch] if cfg.has_D else zeros_d,
        ins["accbias"][b, ch] if cfg.has_bias else zeros_d,
    )
    out = jax.lax.fori_loop(0, n_all, body, (acc, load(s_end - 1)) if cfg.bwd_prefetch else acc)
    g, acc_A, acc_D, acc_bias = out[0] if cfg.bwd_prefetch else out
    outs["dh0"][b, :, ch] = g
    outs["dA"][b, :, ch] = acc_A
    if cfg.has_D:
        outs["dD"][b, ch] = acc_D
    if cfg.has_bias:
        outs["dbias"][b, ch] = acc_bias


def _bwd_launch(cfg: _Kernel, base: int, given: dict, carry: dict, prev: dict | None):
    """One backward launch of work items [base, base + cfg.bwd_wave) (see `_bwd_kernel`).

    carry: the state's cotangent and the dA, dD, dbias sums, (batch, ...) arrays that
    the launch updates in place; prev: the previous launch's du, ddt and dz, updated in
    place, or None for the first launch. Returns a dict of the outputs; dB and dC are
    the partial sums of the launch's items, (bwd_wave, range steps, state)."""
    batch, L, dp = given["u"].shape
    N, W = cfg.state, cfg.bwd_wave
    n_sub = cfg.tile // cfg.bwd_unroll
    Lr = -(-cfg.n_tiles // cfg.bwd_splits) * cfg.tile
    chained = prev is not None
    ins = dict(given, base=jnp.full((1,), base, jnp.int32), dhlast=carry["dh0"],
               accA=carry["dA"], accD=carry.get("dD"), accbias=carry.get("dbias"))
    if chained:
        ins.update(du_in=prev["du"], ddt_in=prev["ddt"], dz_in=prev.get("dz"))
    names = [n for n, f in _bwd_input_names(cfg, chained) if f]

    def whole(x):
        return pl.BlockSpec(x.shape, lambda i: (0,) * len(x.shape))

    def slot(shape):  # this program's slot of a (W, ...) buffer
        return pl.BlockSpec((None, *shape), lambda i: (i,) + (0,) * len(shape))

    u, dt, z = given["u"], given["dt"], given["z"]
    f32 = lambda x: jax.ShapeDtypeStruct(x.shape, _F32)  # noqa: E731
    out = [("du", jax.ShapeDtypeStruct(u.shape, u.dtype)),
           ("ddt", jax.ShapeDtypeStruct(dt.shape, dt.dtype))]
    if cfg.has_z:
        out.append(("dz", jax.ShapeDtypeStruct(z.shape, z.dtype)))
    out += [("dA", f32(carry["dA"])),
            ("dB", jax.ShapeDtypeStruct((W, Lr, N), _F32)),
            ("dC", jax.ShapeDtypeStruct((W, Lr, N), _F32)),
            ("dh0", f32(carry["dh0"])),
            ("ws", jax.ShapeDtypeStruct((W, n_sub, N, cfg.bwd_block_d), _F32))]
    if cfg.has_D:
        out.append(("dD", f32(carry["dD"])))
    if cfg.has_bias:
        out.append(("dbias", f32(carry["dbias"])))
    out_names = [o[0] for o in out]
    out_specs = [slot(o[1].shape[1:]) if o[0] in ("dB", "dC", "ws") else whole(o[1])
                 for o in out]
    # The carries always, and after the first launch the gradients so far, are updated
    # in place: a launch writes only its items' rows.
    pairs = {"dhlast": "dh0", "accA": "dA", "accD": "dD", "accbias": "dbias",
             "du_in": "du", "ddt_in": "ddt", "dz_in": "dz"}
    aliases = {names.index(i): out_names.index(o) for i, o in pairs.items() if i in names}
    res = pl.pallas_call(
        functools.partial(_bwd_kernel, cfg, chained),
        out_shape=[o[1] for o in out],
        grid=(W,),
        in_specs=[whole(ins[n]) for n in names],
        out_specs=out_specs,
        input_output_aliases=aliases,
        compiler_params=plt.CompilerParams(
            num_warps=cfg.bwd_num_warps, num_stages=cfg.num_stages
        ),
        interpret=cfg.interpret,
        name="selective_scan_bwd",
    )(*[ins[n] for n in names])
    return dict(zip(out_names, res, strict=True))


def _bwd_ranges(cfg: _Kernel) -> list[tuple[int, int]]:
    """(first tile, tiles) of each range of tiles, in launch order (the last range first).

    Ranges of ceil(n_tiles / bwd_splits) tiles; the last one in time may be shorter."""
    per = -(-cfg.n_tiles // cfg.bwd_splits)
    return [(f, min(per, cfg.n_tiles - f)) for f in reversed(range(0, cfg.n_tiles, per))]


def _bwd_launch_items(cfg: _Kernel, programs: int) -> list[tuple[int, int]]:
    """(first item, items) of each backward launch: the bwd_splits x programs work items
    (range k of program slot p is item k * programs + p) in launches of bwd_wave."""
    total = cfg.bwd_splits * programs
    return [(q, min(cfg.bwd_wave, total - q)) for q in range(0, total, cfg.bwd_wave)]


def _backward_impl(cfg: _Kernel, res, cts):
    u, dt, z, A, B, C, D, bias, keep, h0, ck = res
    dy, dhlast = cts
    batch, L, dp = u.shape
    N = cfg.state
    nblk = dp // cfg.bwd_block_d
    P = batch * nblk
    W = cfg.bwd_wave
    groups = B.shape[2]
    given = dict(u=u, dt=dt, z=z, A=A, B=B, C=C, D=D, bias=bias, keep=keep, ck=ck, dy=dy)
    zeros = jnp.zeros((batch, dp), _F32)
    carry = dict(dh0=dhlast, dA=jnp.zeros((batch, N, dp), _F32))
    if cfg.has_D:
        carry["dD"] = zeros
    if cfg.has_bias:
        carry["dbias"] = zeros

    def reduce_blocks(part, like):
        # (batch, nblk, Lr, N) -> (batch, Lr, groups, N): the channel blocks of each group
        # added one after another. An explicit chain rather than a reduce: XLA picks a
        # reduce's summation order from its shape, which differs between launches of
        # different lengths, and the result should not depend on bwd_splits.
        Lr = part.shape[2]
        part = part.reshape(batch, groups, nblk // groups, Lr, N)
        total = part[:, :, 0]
        for i in range(1, nblk // groups):
            total = total + part[:, :, i]
        return jnp.moveaxis(total, 1, 2).astype(like.dtype)

    def range_parts(k, steps, bufs):
        """Range k's partial sums, (batch, nblk, steps, N), from the launches holding them."""
        got = [buf[max(k * P - i * W, 0):min((k + 1) * P - i * W, W)]
               for i, buf in bufs.items() if i * W < (k + 1) * P and (i + 1) * W > k * P]
        return jnp.concatenate(got)[:, :steps].reshape(batch, nblk, steps, N)

    ranges = _bwd_ranges(cfg)
    launches = _bwd_launch_items(cfg, P)
    grads, bufs, pieces, k_next = None, {}, [], 0
    for i, (base, _) in enumerate(launches):
        g = _bwd_launch(cfg, base, given, carry, grads)
        carry = {n: g.pop(n) for n in ("dh0", "dA", "dD", "dbias") if n in g}
        grads = {n: g.pop(n) for n in ("du", "ddt", "dz") if n in g}
        bufs[i] = (g.pop("dB"), g.pop("dC"))
        done = []  # the ranges whose last item this launch ran
        while k_next < len(ranges) and (k_next + 1) * P <= base + W:
            steps = ranges[k_next][1] * cfg.tile
            done.append(tuple(
                reduce_blocks(range_parts(k_next, steps, {n: v[c] for n, v in bufs.items()}),
                              like)
                for c, like in ((0, B), (1, C))))
            k_next += 1
        bufs = {n: v for n, v in bufs.items() if (n + 1) * W > k_next * P}
        if done and i + 1 < len(launches):
            # The next launch takes the state's cotangent only once these ranges' partial
            # sums are reduced: their buffers are then free for the next launch's.
            done, carry["dh0"] = jax.lax.optimization_barrier((done, carry["dh0"]))
        pieces = done[::-1] + pieces
    dB = jnp.concatenate([p[0] for p in pieces], axis=1)[:, :L]
    dC = jnp.concatenate([p[1] for p in pieces], axis=1)[:, :L]
    return (
        grads["du"],
        grads["ddt"],
        grads["dz"] if cfg.has_z else None,
        carry["dA"].sum(axis=0),
        dB,
        dC,
        carry["dD"].sum(axis=0) if cfg.has_D else None,
        carry["dbias"].sum(axis=0) if cfg.has_bias else None,
        None,
        carry["dh0"] if cfg.has_h0 else None,
    )


_backward = jax.jit(_backward_impl, static_argnums=(0,))


# ----------------------------------------------------------------------------
# Pure-JAX twin on the kernel layouts: the `backward="reference"` VJP.


def _reference_core(cfg: _Kernel, u, dt, z, A, B, C, D, bias, keep, h0):
    """The sequential scan on the kernels' padded layouts: y (b, l, dp), final state (b, N, dp)."""
    batch, _, dp = u.shape
    delta = prepare_delta(dt, bias, cfg.softplus)
    h0 = jnp.zeros((batch, dp, cfg.state), _F32) if h0 is None else jnp.swapaxes(h0, 1, 2)
    uf = u.astype(_F32)
    y, h = scan_steps(h0, delta, uf, A.T, B, C, None if keep is None else keep.astype(bool))
    if D is not None:
        y = y + uf * D[None, None, :]  # explicit: the tree tests with rank promotion "raise"
    if z is not None:
        y = y * jax.nn.silu(z.astype(_F32))
    return y.astype(u.dtype), jnp.swapaxes(h, 1, 2)


# ----------------------------------------------------------------------------
# custom_vjp over the kernels.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(cfg: _Kernel, u, dt, z, A, B, C, D, bias, keep, h0):
    y, hlast, _ = _forward(cfg, False, u, dt, z, A, B, C, D, bias, keep, h0)
    return y, hlast


def _scan_fwd(cfg: _Kernel, u, dt, z, A, B, C, D, bias, keep, h0):
    if cfg.backward == "reference":
        y, hlast, _ = _forward(cfg, False, u, dt, z, A, B, C, D, bias, keep, h0)
        return (y, hlast), (u, dt, z, A, B, C, D, bias, keep, h0, None)
    y, hlast, ck = _forward(cfg, True, u, dt, z, A, B, C, D, bias, keep, h0)
    return (y, hlast), (u, dt, z, A, B, C, D, bias, keep, h0, ck)


def _scan_bwd(cfg: _Kernel, res, cts):
    if cfg.backward == "reference":
        u, dt, z, A, B, C, D, bias, keep, h0, _ = res
        _, vjp = jax.vjp(
            lambda u, dt, z, A, B, C, D, bias, h0: _reference_core(
                cfg, u, dt, z, A, B, C, D, bias, keep, h0
            ),
            u, dt, z, A, B, C, D, bias, h0,
        )
        du, ddt, dz, dA, dB, dC, dD, dbias, dh0 = vjp(cts)
        return du, ddt, dz, dA, dB, dC, dD, dbias, None, dh0
    return _backward(cfg, res, cts)


_scan.defvjp(_scan_fwd, _scan_bwd)


# ----------------------------------------------------------------------------
# The registered configuration.


def _pad_channels(x: Array | None, groups: int, dg: int, dgp: int) -> Array | None:
    """(..., dim) -> (..., groups * dgp): each group's dg channels padded with zeros to dgp."""
    if x is None or dg == dgp:
        return x
    lead = x.shape[:-1]
    x = x.reshape(*lead, groups, dg)
    x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, 0), (0, dgp - dg)])
    return x.reshape(*lead, groups * dgp)


def _unpad_channels(x: Array, groups: int, dg: int, dgp: int) -> Array:
    if dg == dgp:
        return x
    lead = x.shape[:-1]
    return x.reshape(*lead, groups, dgp)[..., :dg].reshape(*lead, groups * dg)


@dataclasses.dataclass(frozen=True)
class PallasTritonScan(ScanImplementation):
    """Fused Pallas kernels on the Triton backend: forward and backward (custom_vjp).

    block_d: channels per program (a power of two; capped at the group's channels).
    num_warps: warps per program; None picks from block_d and the state size.
    unroll: forward steps per sub-tile (loaded together, then computed unrolled);
      None: 8 while a thread holds at most 16 state entries (state 16 at the
      default block), else 4 or fewer.
    prefetch: load the next sub-tile while computing this one (forward).
    tile_l: steps per saved state; the backward recomputes inside each tile. None: 16
      where the backward's grid (batch x channel blocks) is at least `bwd_wave`, else
      32. With the backward in waves, 16-step tiles were 3.5-9.4% faster forward+backward
      at every shape measured on the H100 (most where the grid fills the GPU), but
      their saved states, (batch, tiles, state, dim) float32, take twice the memory: at
      state 16 as many bytes as u in float32. 32 keeps forward+backward at dim 2048,
      length 8192, fp32 within the official kernel's memory.
    bwd_block_d, bwd_num_warps, bwd_unroll, bwd_prefetch: the same for the backward
      kernel (None: picked from the forward's settings and the state size).
    bwd_fill_unroll: steps per iteration of the backward's state-recomputing walk.
    bwd_splits: ranges of whole tiles (at most one a tile) the backward walks in turn,
      one launch a range while the grid fits `bwd_wave`, so that the dB/dC partial
      sums of only one range (two where launches straddle ranges) exist at a time;
      None: enough ranges that one range's partial sums take at most a quarter of u's
      bytes, at most 16 (and no split while they are under 8 MiB in all).
    bwd_wave: the most backward programs (each one batch row and channel block over
      one range of tiles) a launch runs. Where batch x channel blocks is more, the
      backward runs those (program, range) items in launches of this many, in an order
      that keeps each program's ranges in turn, so that no launch ends on a part-filled
      second wave of programs. None: on a GPU, as many as its SMs hold at once (see
      `_backward_programs_per_sm`); elsewhere no limit.
    num_stages: Triton's software-pipelining depth.
    backward: "kernel", or "reference" for the VJP of the sequential `lax.scan`.
    fast_math: exp2, exp and reciprocals as single PTX approximations (ex2.approx,
      rcp.approx; 2 ulp, denormals flushed) instead of libdevice's, and explicit
      fused multiply-adds (GPU only).
    a_rows: the forward loads A and the initial state one state entry at a time (see
      `_load_2d`); None: while a thread holds at most 16 state entries.
    interpret: run the kernels in Pallas' interpreter (CPU; for tests).
    """

    name = "pallas_triton"
    # Defaults from the H100 sweeps (benchmarks/RESULTS.md): 32 channels a one-warp
    # program, 8-step forward sub-tiles at state 16 (4 or fewer at larger states) with
    # A row by row, 2-step backward sub-tiles with prefetch; the backward's walk that
    # refills each tile's sub-tile states 8 steps an iteration. A state saved every 32
    # steps, or 16 where the backward's programs fill the GPU at least once over
    # (`tile_l`).
    block_d: int = 32
    num_warps: int | None = None
    unroll: int | None = None
    prefetch: bool = True
    tile_l: int | None = None
    bwd_block_d: int | None = None
    bwd_num_warps: int | None = None
    bwd_unroll: int | None = None
    bwd_prefetch: bool | None = None
    bwd_fill_unroll: int = 8
    bwd_splits: int | None = None
    bwd_wave: int | None = None
    num_stages: int = 1
    backward: str = "kernel"
    fast_math: bool = True
    a_rows: bool | None = None
    interpret: bool = False

    def __post_init__(self):
        for field in ("block_d", "unroll", "tile_l", "bwd_block_d", "bwd_unroll",
                      "bwd_fill_unroll"):
            v = getattr(self, field)
            if v is not None and not _is_pow2(v):
                raise ValueError(f"PallasTritonScan: {field} must be a power of two, got {v}")
        for field in ("num_warps", "bwd_num_warps"):
            v = getattr(self, field)
            if v is not None and v not in (1, 2, 4, 8, 16):
                raise ValueError(f"PallasTritonScan: {field} must be 1, 2, 4, 8 or 16, got {v}")
        for field in ("bwd_splits", "bwd_wave"):
            v = getattr(self, field)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(
                    f"PallasTritonScan: {field} must be None or an int >= 1, got {v!r}"
                )
        if self.num_stages < 1:
            raise ValueError(f"PallasTritonScan: num_stages must be >= 1, got {self.num_stages}")
        for field in ("unroll", "bwd_unroll"):
            v = getattr(self, field)
            if v is not None and self.tile_l is not None and self.tile_l % v:
                raise ValueError(
                    f"PallasTritonScan: tile_l ({self.tile_l}) must be a multiple of {field} ({v})"
                )
        if self.backward not in _BACKWARDS:
            raise ValueError(
                f"PallasTritonScan: backward must be one of {_BACKWARDS}, got {self.backward!r}"
            )

    def unsupported(self, spec: ScanSpec, platform: str) -> str | None:
        if spec.state > MAX_STATE:
            return f"state size {spec.state} is over the kernels' limit of {MAX_STATE}"
        if spec.dtype not in _DTYPES:
            return f"dtype {spec.dtype} is not one of {', '.join(_DTYPES)}"
        if self.interpret:
            return None
        if platform != "gpu":
            return (
                f"needs a CUDA GPU (Triton backend); platform is {platform!r} "
                "(PallasTritonScan(interpret=True) runs it in the Pallas interpreter)"
            )
        cc = _cuda_compute_capability()
        if cc is None:
            return "the GPU is not a CUDA device"
        if cc < (8, 0):
            return f"needs compute capability 8.0 (Ampere) or newer, this GPU has {cc[0]}.{cc[1]}"
        return None

    def kernel_config(self, spec: ScanSpec, *, softplus: bool, has_D: bool, has_bias: bool,
                      has_h0: bool) -> _Kernel:
        """The static launch configuration for one call."""
        N = _next_pow2(spec.state)
        dg = spec.dim // spec.groups
        bd = min(self.block_d, _next_pow2(dg))
        bwd_bd = min(self.bwd_block_d or self.block_d, _next_pow2(dg))
        dgp = _round_up(dg, max(bd, bwd_bd))

        def warps(bd: int) -> int:
            # one channel per thread when the state is small; more warps (splitting the
            # state over them) when a thread would hold over 32 state entries
            return min(16, max(1, (N * bd) // (32 * 32)))

        # Registers for a backward sub-tile hold bwd_unroll + 1 states (and as many
        # decays when they fit), plus the rows of one or two sub-tiles: keep the
        # state entries a thread holds for the sub-tile near 32 (2 steps at state 16).
        bwd_warps = self.bwd_num_warps or warps(bwd_bd)
        per_thread = max(1, N * bwd_bd // (32 * bwd_warps))
        fwd_per_thread = max(1, N * bd // (32 * (self.num_warps or warps(bd))))
        # 8-step forward sub-tiles while a thread holds at most 16 state entries (H100:
        # 4-step ones 1.2x slower, 16-step ones 1.4x), 4 or fewer beyond that.
        unroll = self.unroll or (8 if fwd_per_thread <= 16
                                 else max(1, min(4, 64 // fwd_per_thread)))
        # A row by row while a thread holds at most 16 state entries (one channel a
        # thread; measured at state 16). Larger states keep Triton's 2D layout.
        a_rows = fwd_per_thread <= 16 if self.a_rows is None else self.a_rows
        bwd_unroll = self.bwd_unroll or max(1, min(unroll, 32 // per_thread))
        bwd_prefetch = (
            per_thread * bwd_unroll <= 32 if self.bwd_prefetch is None else self.bwd_prefetch
        )
        step = max(unroll, bwd_unroll)
        programs = spec.batch * spec.groups * dgp // bwd_bd  # backward programs a range
        wave = self.bwd_wave
        if wave is None and not self.interpret and (sms := _gpu_sm_count()) is not None:
            wave = sms * _backward_programs_per_sm(per_thread * bwd_unroll, bwd_warps)
        tile_l = self.tile_l or max(step, 16 if wave is not None and programs >= wave else 32)
        tile = min(tile_l, _round_up(spec.length, step))
        n_tiles = -(-spec.length // tile)
        splits = self.bwd_splits
        if splits is None:
            # The dB and dC partial sums, (batch, channel blocks, padded length, N)
            # float32 each: at dim 2048, 32-channel blocks and N = 16 as large as u in
            # float32. A quarter of u's bytes a launch keeps them small beside the
            # (batch, length, dim) tensors the backward must hold anyway. Each further
            # launch costs a few microseconds, and each is traced and lowered on its
            # own: hence the cap.
            dp = spec.groups * dgp
            partials = 2 * spec.batch * (dp // bwd_bd) * n_tiles * tile * N * 4
            u_bytes = spec.batch * spec.length * dp * jnp.dtype(spec.dtype).itemsize
            splits = 1 if partials <= 8 << 20 else min(16, -(-partials // max(1, u_bytes // 4)))
        splits = min(splits, n_tiles)
        splits = -(-n_tiles // -(-n_tiles // splits))  # ranges of equal tiles that makes
        wave = min(wave or programs, programs)
        return _Kernel(
            length=spec.length,
            tile=tile,
            n_tiles=n_tiles,
            unroll=unroll,
            bwd_unroll=bwd_unroll,
            state=N,
            block_d=bd,
            bwd_block_d=bwd_bd,
            blocks_per_group=dgp // bd,
            bwd_blocks_per_group=dgp // bwd_bd,
            num_warps=self.num_warps or warps(bd),
            bwd_num_warps=bwd_warps,
            num_stages=self.num_stages,
            softplus=softplus,
            has_z=spec.has_z,
            has_D=has_D,
            has_bias=has_bias,
            has_keep=spec.has_segments,
            has_h0=has_h0,
            prefetch=self.prefetch,
            bwd_prefetch=bwd_prefetch,
            keep_decay=per_thread * bwd_unroll <= 64,
            bwd_splits=splits,
            bwd_wave=wave,
            # a multiple of bwd_unroll that divides the tile, at most bwd_fill_unroll
            fill_unroll=max(f for f in range(bwd_unroll, tile + 1, bwd_unroll)
                            if tile % f == 0 and (f <= self.bwd_fill_unroll or f == bwd_unroll)),
            backward=self.backward,
            fast_math=self.fast_math,
            a_rows=a_rows,
            interpret=self.interpret,
        )

    def __call__(self, args: ScanArgs, *, delta_softplus: bool) -> tuple[Array, Array]:
        spec = ScanSpec.of(args)
        cfg = self.kernel_config(
            spec, softplus=delta_softplus, has_D=args.D is not None,
            has_bias=args.delta_bias is not None, has_h0=args.initial_state is not None,
        )
        g, n = spec.groups, spec.state
        dg = spec.dim // g
        dgp = cfg.blocks_per_group * cfg.block_d
        N = cfg.state
        pad = functools.partial(_pad_channels, groups=g, dg=dg, dgp=dgp)

        def pad_state(x):  # (..., n) -> (..., N)
            if x is None or n == N:
                return x
            return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, N - n)])

        f32 = lambda x: None if x is None else x.astype(_F32)
        h0 = args.initial_state
        keep = keep_mask(args.segment_ids)
        keep = None if keep is None else keep.astype(jnp.int32)
        y, hlast = _scan(
            cfg,
            pad(args.u),
            pad(args.delta),
            pad(args.z),
            pad_state(pad(f32(args.A).T).T).T,  # (dim, n) -> (N, dp)
            pad_state(args.B),
            pad_state(args.C),
            pad(f32(args.D)),
            pad(f32(args.delta_bias)),
            keep,
            None if h0 is None else pad(pad_state(h0).swapaxes(1, 2)),  # -> (b, N, dp)
        )
        y = _unpad_channels(y, g, dg, dgp)
        hlast = _unpad_channels(hlast, g, dg, dgp)[:, :n, :].swapaxes(1, 2)
        return y, hlast
