"""Correctness and timing of the Pallas Mosaic GPU scan on a Hopper GPU (the device machine).

    python benchmarks/bench_pallas_mosaic.py --check --variants --sizes 2048 --dims 2048

--check: forward against the float64 oracle and every gradient against the reference VJP,
at a moderate odd-length shape. --variants: forward time of several kernel configurations.
Then forward and forward+backward times of the default configuration at batch 8, state 16,
softplus, D and z, for each length, dim and dtype asked, with the copy-bandwidth floor
measured in the same run. Prints a table last; --out writes the rows as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from mamba_ssm_core import selective_scan
from mamba_ssm_core._pallas_mosaic import PallasMosaicScan

OFFICIAL_MS = {  # official CUDA kernel on this H100 model (shared/KERNELS.md): (fwd, fwd+bwd)
    (2048, 2048, "bfloat16"): (0.594, 3.008), (2048, 2048, "float32"): (1.166, 3.872),
    (8192, 2048, "bfloat16"): (2.669, 12.378), (8192, 2048, "float32"): (5.029, 15.973),
}
OUT = None


def emit(row):
    print(json.dumps(row), flush=True)
    if OUT:
        with open(OUT, "a") as f:
            f.write(json.dumps(row) + "\n")


def timeit(fn, *args, reps=7, inner=10):
    """Median over `reps` of the mean time of `inner` back-to-back calls, in ms."""
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / inner * 1e3)
    return statistics.median(times)


def copy_bandwidth():
    """Read+write bytes per second of a large device-to-device copy."""
    x = jnp.ones((1 << 29,), jnp.float32)  # 2 GiB
    f = jax.jit(lambda x: x + 1.0)
    ms = timeit(f, x, reps=5, inner=5)
    return 2 * x.size * 4 / (ms * 1e-3)


def inputs(rng, b, length, d, n, dtype, *, groups=None, segments=False):
    f, l_ = np.float32, length
    gshape = (b, l_, n) if groups is None else (b, l_, groups, n)
    x = dict(
        u=rng.standard_normal((b, l_, d)).astype(f),
        delta=(0.5 * rng.standard_normal((b, l_, d))).astype(f),
        A=-np.exp(rng.uniform(0.0, np.log(16.0), (d, n))).astype(f),
        B=rng.standard_normal(gshape).astype(f),
        C=rng.standard_normal(gshape).astype(f),
        D=rng.standard_normal((d,)).astype(f),
        z=rng.standard_normal((b, l_, d)).astype(f),
        delta_bias=np.log(np.expm1(np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), d)))).astype(f),
        initial_state=rng.standard_normal((b, d, n)).astype(f),
    )
    for k in ("u", "delta", "z", "B", "C"):
        x[k] = np.asarray(jnp.asarray(x[k], dtype).astype(jnp.float32))
    seg = np.cumsum(rng.random((b, l_)) < 0.01, axis=1).astype(np.int32) if segments else None
    return x, seg


NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def make_fn(impl, dtype, seg):
    segj = None if seg is None else jnp.asarray(seg)

    def f(u, delta, A, B, C, D, z, bias, h0):
        return selective_scan(u.astype(dtype), delta.astype(dtype), A, B.astype(dtype),
                              C.astype(dtype), D, z=z.astype(dtype), delta_bias=bias,
                              delta_softplus=True, initial_state=h0, segment_ids=segj,
                              return_final_state=True, impl=impl)

    return f


def rel(a, b):
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def check(impl):
    sys.path.insert(0, ".")
    from tests import oracle

    for dtype in ("float32", "bfloat16"):
        rng = np.random.default_rng(7)
        x, seg = inputs(rng, 2, 1001, 512, 16, dtype, groups=2, segments=True)
        xs = [jnp.asarray(x[k]) for k in NAMES]
        f = make_fn(impl, dtype, seg)
        t0 = time.perf_counter()
        y, h = jax.jit(f)(*xs)
        jax.block_until_ready(y)
        t_fwd = time.perf_counter() - t0
        yr, hr = oracle.selective_scan(
            *(x[k] for k in ("u", "delta", "A", "B", "C", "D")), z=x["z"],
            delta_bias=x["delta_bias"], delta_softplus=True, initial_state=x["initial_state"],
            segment_ids=seg)
        row = dict(kind="check", dtype=dtype, y=rel(y, yr), h=rel(h, hr), lower_fwd_s=t_fwd)
        dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32).astype(y.dtype)
        dh = jnp.asarray(rng.standard_normal(h.shape), jnp.float32)
        t0 = time.perf_counter()
        fb = jax.jit(lambda *v, f=f, dy=dy, dh=dh: jax.vjp(f, *v)[1]((dy, dh)))
        gk = fb(*xs)
        jax.block_until_ready(gk)
        row["lower_bwd_s"] = time.perf_counter() - t0
        fr = make_fn("reference", dtype, seg)
        with jax.numpy_rank_promotion("allow"):
            gr = jax.jit(lambda *v, fr=fr, dy=dy, dh=dh: jax.vjp(fr, *v)[1]((dy, dh)))(*xs)
        for k, a, b in zip(NAMES, gk, gr, strict=True):
            row["d" + k] = rel(a, b)
        gk2 = fb(*xs)
        row["deterministic"] = all(
            bool(jnp.array_equal(a, b)) for a, b in zip(gk, gk2, strict=True))
        emit(row)


def bench(impl, label, length, d, dtype, *, backward):
    rng = np.random.default_rng(0)
    l_ = length
    x, _ = inputs(rng, 8, l_, d, 16, dtype)
    xs = [jnp.asarray(x[k]).astype(dtype) if k in ("u", "delta", "z", "B", "C")
          else jnp.asarray(x[k]) for k in NAMES]
    f = make_fn(impl, dtype, None)
    row = dict(kind="time", impl=label, length=l_, dim=d, dtype=dtype)
    t0 = time.perf_counter()
    fwd = jax.jit(f)
    row["fwd_ms"] = timeit(fwd, *xs)
    row["first_s"] = time.perf_counter() - t0
    s = jnp.dtype(dtype).itemsize
    E, S = 8 * l_ * d, 8 * 16 * l_
    row["fwd_floor_ms"] = (4 * E + 2 * S) * s / BW * 1e3
    if backward:
        y, h = fwd(*xs)
        dy = jnp.ones_like(y)
        dh = jnp.ones_like(h)
        fb = jax.jit(lambda *v, f=f, dy=dy, dh=dh: jax.vjp(f, *v)[1]((dy, dh)))
        row["fwdbwd_ms"] = timeit(fb, *xs, reps=5, inner=5)
        row["fwdbwd_floor_ms"] = (11 * E + 6 * S) * s / BW * 1e3
    off = OFFICIAL_MS.get((l_, d, dtype))
    if off:
        row["official_fwd_ms"], row["official_fwdbwd_ms"] = off
    emit(row)
    return row


def main():
    global OUT, BW
    p = argparse.ArgumentParser()
    p.add_argument("--check", action="store_true")
    p.add_argument("--variants", default="", help="dtypes to time the variants in")
    p.add_argument("--sizes", default="2048")
    p.add_argument("--dims", default="2048")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    OUT = a.out
    print(jax.__version__, jax.devices()[0].device_kind, flush=True)
    BW = copy_bandwidth()
    emit(dict(kind="bandwidth", bytes_per_s=BW))
    impl = PallasMosaicScan()
    if a.check:
        check(impl)
    rows = []
    if a.variants:
        variants = {
            "c32s3u4": PallasMosaicScan(unroll=4),
            "c32s3u8": PallasMosaicScan(unroll=8),
            "c64s2u8": PallasMosaicScan(chunk=64, stages=2, unroll=8),
            "c64s3u8": PallasMosaicScan(chunk=64, stages=3, unroll=8),
            "c32s4u16": PallasMosaicScan(chunk=32, stages=4, unroll=16),
        }
        for dtype in a.variants.split(","):
            for label, v in variants.items():
                try:
                    rows.append(bench(v, label, 2048, 2048, dtype, backward=False))
                except Exception as e:  # keep timing the others; the error is reported
                    emit(dict(kind="error", impl=label, dtype=dtype, error=repr(e)[:400]))
    for length in map(int, a.sizes.split(",")):
        for d in map(int, a.dims.split(",")):
            for dtype in a.dtypes.split(","):
                rows.append(bench(impl, "default", length, d, dtype, backward=not a.no_backward))
    print("\n| impl | L | D | dtype | fwd ms | x official | % floor "
          "| fwd+bwd ms | x official | % floor |")
    for r in rows:
        of, ob = r.get("official_fwd_ms"), r.get("official_fwdbwd_ms")
        fb = r.get("fwdbwd_ms")
        print(f"| {r['impl']} | {r['length']} | {r['dim']} | {r['dtype']} | {r['fwd_ms']:.3f} | "
              f"{of / r['fwd_ms'] if of else float('nan'):.2f} | "
              f"{100 * r['fwd_floor_ms'] / r['fwd_ms']:.0f} | "
              f"{fb if fb else float('nan'):.3f} | "
              f"{ob / fb if (ob and fb) else float('nan'):.2f} | "
              f"{100 * r['fwdbwd_floor_ms'] / fb if fb else float('nan'):.0f} |")


if __name__ == "__main__":
    main()
