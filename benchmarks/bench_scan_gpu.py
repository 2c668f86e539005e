"""Selective scan on a GPU: every registered implementation that takes the call, timed.

    python benchmarks/bench_scan_gpu.py                       # the issue-7 table
    python benchmarks/bench_scan_gpu.py --impls pallas_triton,chunked --lengths 2048
    python benchmarks/bench_scan_gpu.py --sweep --no-table    # pallas_triton configurations
    python benchmarks/bench_scan_gpu.py --e2e                 # also the mamba-130m figures

In one run it measures the device's copy bandwidth (bytes read plus written, a
2 GiB float32 buffer read and written once), then for each implementation, dim,
length and dtype times, as medians after warm-up (host clock around batches of
back-to-back calls, each batch synchronised):

- fwd: `selective_scan(u, delta, A, B, C, D, z=z, delta_bias=..., delta_softplus=True)`;
- fwd+bwd: `jax.vjp` of that call pulled back with a random cotangent (all eight
  gradients);
- the minimum bytes each must move, (4E + 2S)·s forward and (11E + 6S)·s forward
  plus backward with E = batch·dim·length, S = batch·state·length and s bytes an
  element, and the fraction of the measured bandwidth that time achieves;
- the fwd+bwd executable's memory in all (arguments + outputs + temporaries, from
  XLA's `memory_analysis()`).

Implementations come from the registry (`implementations()`); one that refuses a
call (its `unsupported` reason) or runs out of memory is listed with the reason.
The official CUDA kernel's figures (mamba-ssm 2.3.2 on the H100, KERNELS.md) are
printed beside ours at dim 2048. Every result is also appended as a JSON line to
--out/bench.jsonl as soon as it is measured, so a run cut short keeps its data.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import mamba_ssm_core as m
from mamba_ssm_core import _pallas_triton as pt

# Official selective_scan_fn (mamba-ssm 2.3.2, sm_90) on the H100, batch 8, dim 2048,
# state 16, softplus, D and z: (length, dtype) -> (fwd ms, fwd+bwd ms). KERNELS.md.
OFFICIAL = {
    (2048, "bfloat16"): (0.594, 3.008),
    (2048, "float32"): (1.166, 3.872),
    (8192, "bfloat16"): (2.669, 12.378),
    (8192, "float32"): (5.029, 15.973),
}
OFFICIAL_PEAK_GB = {(8192, "float32"): 4.9}
# Tried first so their rows lead each table; the rest of the registry follows.
PREFERRED = ("pallas_triton", "chunked", "associative", "reference")
START = time.monotonic()


def log(*a):
    print(*a, flush=True)


class Recorder:
    def __init__(self, out_dir: str | None):
        self.path = os.path.join(out_dir, "bench.jsonl") if out_dir else None
        self.rows: list[dict] = []

    def add(self, **row):
        self.rows.append(row)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def time_call(fn, args, budget_s: float = 1.0) -> tuple[float, int]:
    """Median seconds per call after warm-up; returns (median, calls timed).

    Calls run back to back in batches of about 0.25 s, one synchronisation a batch.
    Each batch starts on an idle GPU that waits for the host to dispatch the first
    call, about 0.7 ms for the pallas_triton forward+backward executable (H100 trace,
    2026-11-23): batches of a few calls added a third of that to a 3 ms call."""
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    est = time.perf_counter() - t0
    inner = max(1, min(500, int(0.25 / max(est, 1e-6))))
    reps = max(3, min(15, int(budget_s / max(est * inner, 1e-6))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / inner)
        del out
    return statistics.median(times), reps * inner


def copy_bandwidth() -> float:
    """Bytes read plus written per second for a 2 GiB float32 buffer, median of runs."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal(1 << 20), jnp.float32)
    x = jnp.tile(x, 1 << 9)  # 2**29 elements, 2 GiB
    f = jax.jit(lambda x: x * 1.5)
    t, _ = time_call(f, (x,), 2.0)
    nbytes = 2 * x.size * x.dtype.itemsize
    del x
    return nbytes / t


def make_inputs(key, b, l, d, n, dtype):
    ks = jax.random.split(key, 9)
    f32 = jnp.float32
    u = jax.random.normal(ks[0], (b, l, d), f32).astype(dtype)
    delta = (0.5 * jax.random.normal(ks[1], (b, l, d), f32)).astype(dtype)
    A = -jnp.exp(jax.random.uniform(ks[2], (d, n), f32, 0.0, float(np.log(16.0))))
    B = jax.random.normal(ks[3], (b, l, n), f32).astype(dtype)
    C = jax.random.normal(ks[4], (b, l, n), f32).astype(dtype)
    D = jax.random.normal(ks[5], (d,), f32)
    z = jax.random.normal(ks[6], (b, l, d), f32).astype(dtype)
    dt0 = jnp.exp(jax.random.uniform(ks[7], (d,), f32, float(np.log(1e-3)), float(np.log(1e-1))))
    bias = jnp.log(jnp.expm1(dt0))  # Mamba's dt initialisation
    dy = jax.random.normal(ks[8], (b, l, d), f32).astype(dtype)
    return (u, delta, A, B, C, D, z, bias), dy


def fwd_fn(impl):
    def f(u, delta, A, B, C, D, z, bias):
        return m.selective_scan(u, delta, A, B, C, D, z=z, delta_bias=bias,
                                delta_softplus=True, impl=impl)
    return jax.jit(f)


def fwd_bwd_fn(impl):
    f = fwd_fn(impl)

    def fb(args, dy):
        y, vjp = jax.vjp(f, *args)
        return y, vjp(dy)
    return jax.jit(fb)


def min_bytes(b, l, d, n, itemsize):
    E, S = b * d * l, b * n * l
    return (4 * E + 2 * S) * itemsize, (11 * E + 6 * S) * itemsize


def impl_label(impl) -> str:
    return impl if isinstance(impl, str) else repr(impl)


def measure(impl, args, dy, *, do_fwd=True, do_bwd=True, budget_s=1.0):
    """{'fwd_ms', 'fb_ms', 'peak_gb', 'y'} or {'error': reason}."""
    res = {}
    try:
        if do_fwd:
            f = fwd_fn(impl)
            y = f(*args)
            res["y"] = y
            res["fwd_ms"] = 1e3 * time_call(f, args, budget_s)[0]
        if do_bwd:
            fb = fwd_bwd_fn(impl)
            compiled = fb.lower(args, dy).compile()
            ma = compiled.memory_analysis()
            if ma is not None:
                res["peak_gb"] = 1e-9 * (ma.argument_size_in_bytes + ma.output_size_in_bytes
                                         + ma.temp_size_in_bytes - ma.alias_size_in_bytes)
            res["fb_ms"] = 1e3 * time_call(compiled, (args, dy), budget_s)[0]
    except ValueError as e:  # the registry's "cannot take this call"
        res["error"] = str(e).split("\n")[0]
    except Exception as e:  # noqa: BLE001 - OOM and compiler failures are results here
        msg = str(e).split("\n")[0]
        res["error"] = ("out of memory: " if "RESOURCE_EXHAUSTED" in msg or "memory" in msg.lower()
                        else "") + f"{type(e).__name__}: {msg[:300]}"
    gc.collect()
    return res


def bwd_launches(impl, b, length, d, n, dtype) -> int | None:
    """How many sequential launches pallas_triton's backward makes for this shape (on
    this machine: the launches hold at most what its GPU runs at once)."""
    impl = m.PallasTritonScan() if isinstance(impl, str) else impl
    s = m.ScanSpec(batch=b, length=length, dim=d, state=n, groups=1, dtype=dtype, has_z=True,
                   has_segments=False)
    try:
        cfg = impl.kernel_config(s, softplus=True, has_D=True, has_bias=True, has_h0=False)
        # groups=1: the channel blocks of the one group
        return len(pt._bwd_launch_items(cfg, b * cfg.bwd_blocks_per_group))
    except (AttributeError, TypeError, ValueError):  # an older kernel without the option
        return None


def rel_err(a, b) -> float:
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def run_table(ns, rec: Recorder, bw: float, triton_impl=None):
    names = [n for n in PREFERRED if n in m.implementations()]
    names += [n for n in m.implementations() if n not in names]
    if ns.impls:
        want = ns.impls.split(",")
        names = [n for n in names if n in want]
    b, n = ns.batch, ns.state
    # dim 2048 first: the shapes with the official kernel's figures
    for d in map(int, ns.dims.split(",")):
        for dtype in ns.dtypes.split(","):
            for l in map(int, ns.lengths.split(",")):
                args, dy = make_inputs(jax.random.key(l + d), b, l, d, n, jnp.dtype(dtype))
                fb_bytes = min_bytes(b, l, d, n, jnp.dtype(dtype).itemsize)
                ref_y = None
                for name in names:
                    left = ns.budget - (time.monotonic() - START)
                    if left < 20:
                        log(f"SKIP {name} d={d} l={l} {dtype}: time budget spent")
                        rec.add(kind="table", impl=name, dim=d, length=l, dtype=dtype,
                                error="time budget spent")
                        continue
                    # the sequential reference is slow: one timed batch is plenty
                    impl = triton_impl if (name == "pallas_triton" and triton_impl) else name
                    r = measure(impl, args, dy, budget_s=0.3 if name == "reference" else 0.6)
                    row = dict(kind="table", impl=name, batch=b, dim=d, length=l, state=n,
                               dtype=dtype, fwd_bytes=fb_bytes[0], fb_bytes=fb_bytes[1])
                    if impl is not name:
                        row["config"] = repr(impl)
                    if name == "pallas_triton":
                        row["bwd_launches"] = bwd_launches(impl, b, l, d, n, dtype)
                    for k in ("fwd_ms", "fb_ms", "peak_gb", "error"):
                        if k in r:
                            row[k] = r[k]
                    if "fwd_ms" in r:
                        row["fwd_bw_frac"] = fb_bytes[0] / (r["fwd_ms"] * 1e-3) / bw
                    if "fb_ms" in r:
                        row["fb_bw_frac"] = fb_bytes[1] / (r["fb_ms"] * 1e-3) / bw
                    if "y" in r:
                        if ref_y is None:
                            ref_y = r["y"]
                        else:
                            row["y_rel_err_vs_first"] = rel_err(r["y"], ref_y)
                    rec.add(**row)
                    log(json.dumps(row))
                    del r
                del args, dy, ref_y
                gc.collect()


SWEEP_FWD = [
    dict(block_d=32, num_warps=1, unroll=8),
    dict(block_d=32, num_warps=1, unroll=8, prefetch=False),
    dict(block_d=16, num_warps=1, unroll=8),
    dict(block_d=8, num_warps=1, unroll=8),
    dict(block_d=8, num_warps=1, unroll=16),
    dict(block_d=4, num_warps=1, unroll=16),
    dict(block_d=32, num_warps=4, unroll=8),
]
SWEEP_BWD = [
    dict(bwd_block_d=32, bwd_num_warps=1, bwd_unroll=4),
    dict(bwd_block_d=32, bwd_num_warps=4, bwd_unroll=4, bwd_prefetch=True),
    dict(bwd_block_d=32, bwd_num_warps=2, bwd_unroll=4, bwd_prefetch=True),
    dict(bwd_block_d=64, bwd_num_warps=8, bwd_unroll=4, bwd_prefetch=True),
    dict(bwd_block_d=16, bwd_num_warps=1, bwd_unroll=4, bwd_prefetch=True),
    dict(bwd_block_d=8, bwd_num_warps=1, bwd_unroll=8, bwd_prefetch=True),
]


def run_sweep(ns, rec: Recorder, bw: float):
    """Time pallas_triton configurations; returns the fastest forward and backward settings."""
    b, n, l, d = ns.batch, ns.state, 2048, 2048
    best = {"fwd": ({}, float("inf")), "bwd": ({}, float("inf"))}
    for dtype in ns.sweep_dtypes.split(","):
        args, dy = make_inputs(jax.random.key(7), b, l, d, n, jnp.dtype(dtype))
        nbytes = min_bytes(b, l, d, n, jnp.dtype(dtype).itemsize)
        base = measure(m.PallasTritonScan(), args, dy, do_bwd=False, budget_s=0.3)
        sweep = {"fwd": SWEEP_FWD, "bwd": SWEEP_BWD}
        if ns.sweep_json:
            with open(ns.sweep_json) as f:
                sweep = json.load(f)
        for kind, configs in sweep.items():
            for kw in configs:
                if ns.budget - (time.monotonic() - START) < 60:
                    log("SKIP sweep: time budget spent")
                    break
                impl = m.PallasTritonScan(**kw)
                r = measure(impl, args, dy, do_fwd=kind == "fwd", do_bwd=kind == "bwd",
                            budget_s=0.5)
                row = dict(kind=f"sweep_{kind}", config=kw, dtype=dtype, length=l, dim=d)
                for k in ("fwd_ms", "fb_ms", "peak_gb", "error"):
                    if k in r:
                        row[k] = r[k]
                if "fwd_ms" in r:
                    row["fwd_bw_frac"] = nbytes[0] / (r["fwd_ms"] * 1e-3) / bw
                if "y" in r and "y" in base:
                    row["y_rel_err_vs_default"] = rel_err(r["y"], base["y"])
                rec.add(**row)
                log(json.dumps(row))
                t = r.get("fwd_ms" if kind == "fwd" else "fb_ms", float("inf"))
                ok = kind == "bwd" or row.get("y_rel_err_vs_default", 1.0) < 1e-2
                if ok and t < best[kind][1]:
                    best[kind] = (kw, t)
        del args, dy, base
        gc.collect()
    return {**best["fwd"][0], **best["bwd"][0]}


MAMBA_130M = dict(vocab_size=50280, hidden_size=768, state_size=16, num_hidden_layers=24,
                  expand=2, conv_kernel=4, time_step_rank=48, use_bias=False, use_conv_bias=True,
                  layer_norm_epsilon=1e-5, residual_in_fp32=True, tie_word_embeddings=True)


def run_e2e(ns, rec: Recorder, *, sizes=MAMBA_130M, prefill_len=2048, prompt_len=128,
            new_tokens=256):
    """mamba-130m shape in bf16, batch 1: prefill of `prefill_len` tokens, and greedy
    decoding of `new_tokens` after a `prompt_len` prompt in one jitted loop
    (`forward` with a cache for the prompt, then `decode_step` in a `lax.fori_loop`)."""
    try:
        from mamba_ssm_core import MambaConfig, decode_step, forward, init_cache, init_params
    except ImportError as e:
        log(f"e2e: skipped, the functional LM is not available ({e})")
        rec.add(kind="e2e", error=f"functional LM not available: {e}")
        return
    cfg = MambaConfig(**sizes)
    bf = jnp.bfloat16
    params = init_params(jax.random.key(0), cfg, dtype=bf)
    ids = jax.random.randint(jax.random.key(1), (1, prefill_len), 0, cfg.vocab_size, jnp.int32)
    prompt = ids[:, :prompt_len]
    impls = ["pallas_triton"]
    for impl in impls:
        row = dict(kind="e2e", impl=impl, model="mamba-130m shape (random weights)", dtype="bfloat16")
        try:
            prefill = jax.jit(lambda p, x, impl=impl: forward(p, cfg, x, impl=impl))
            t, _ = time_call(prefill, (params, ids), 1.0)
            row.update(prefill_tokens=prefill_len, prefill_ms=1e3 * t, prefill_tok_s=prefill_len / t)

            def generate(p, prompt, steps, impl=impl):
                logits, cache = forward(p, cfg, prompt, cache=init_cache(cfg, 1, bf), impl=impl)
                tok = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

                def body(i, carry):
                    tok, cache, out = carry
                    logits, cache = decode_step(p, cfg, tok, cache)
                    tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
                    return tok, cache, out.at[:, i].set(tok)

                out = jnp.zeros((1, max(steps, 1)), jnp.int32)
                # the first token too, so that steps=0 still runs the prompt
                return tok, jax.lax.fori_loop(0, steps, body, (tok, cache, out))[2]

            gen = jax.jit(generate, static_argnums=(2,))
            t_all, _ = time_call(lambda p, x: gen(p, x, new_tokens), (params, prompt), 2.0)
            t_prompt, _ = time_call(lambda p, x: gen(p, x, 0), (params, prompt), 1.0)
            t_dec = t_all - t_prompt
            row.update(prompt_tokens=prompt_len, new_tokens=new_tokens,
                       generate_ms=1e3 * t_all, prompt_ms=1e3 * t_prompt,
                       decode_ms_per_token=1e3 * t_dec / new_tokens,
                       decode_tok_s=new_tokens / t_dec, vs_transformers_33_tok_s=new_tokens / t_dec / 33)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        rec.add(**row)
        log(json.dumps(row))


def fmt_table(rows, bw) -> str:
    out = [
        "| impl | dim | length | dtype | fwd ms | fwd % of bw | fwd+bwd ms | fwd+bwd % of bw "
        "| fwd+bwd memory GB | vs official fwd / fwd+bwd | vs reference fwd / fwd+bwd |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ref = {(r["dim"], r["length"], r["dtype"]): r for r in rows if r["impl"] == "reference"}
    for r in rows:
        key = (r["dim"], r["length"], r["dtype"])
        if "error" in r and "fwd_ms" not in r:
            out.append(f"| {r['impl']} | {key[0]} | {key[1]} | {key[2]} | {r['error'][:80]} "
                       "| | | | | | |")
            continue
        f = lambda k, fmt="{:.3f}": fmt.format(r[k]) if k in r else "-"  # noqa: E731
        pct = lambda k: f"{100 * r[k]:.0f}%" if k in r else "-"  # noqa: E731
        off = OFFICIAL.get((key[1], key[2])) if key[0] == 2048 else None
        vs_off = "-"
        if off and "fwd_ms" in r:
            vs_off = f"{off[0] / r['fwd_ms']:.2f}x / " + (
                f"{off[1] / r['fb_ms']:.2f}x" if "fb_ms" in r else "-")
        rr = ref.get(key, {})
        vs_ref = "-"
        if "fwd_ms" in rr and "fwd_ms" in r:
            vs_ref = f"{rr['fwd_ms'] / r['fwd_ms']:.1f}x / " + (
                f"{rr['fb_ms'] / r['fb_ms']:.1f}x" if "fb_ms" in rr and "fb_ms" in r else "-")
        out.append(
            f"| {r['impl']} | {key[0]} | {key[1]} | {key[2]} | {f('fwd_ms')} | {pct('fwd_bw_frac')} "
            f"| {f('fb_ms')} | {pct('fb_bw_frac')} | {f('peak_gb', '{:.2f}')} | {vs_off} | {vs_ref} |"
        )
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--impls", default="", help="comma-separated registry names (default: all)")
    p.add_argument("--dims", default="2048,5120")
    p.add_argument("--lengths", default="2048,8192")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--state", type=int, default=16)
    p.add_argument("--sweep", action="store_true", help="time pallas_triton configurations")
    p.add_argument("--sweep-dtypes", default="bfloat16")
    p.add_argument("--sweep-json", default="",
                   help='a JSON file {"fwd": [configs], "bwd": [configs]} replacing the built-in lists')
    p.add_argument("--tune", action="store_true",
                   help="time pallas_triton in the table with the sweep's fastest settings")
    p.add_argument("--no-table", action="store_true")
    p.add_argument("--e2e", action="store_true", help="mamba-130m prefill and decode figures")
    p.add_argument("--out", default=os.environ.get("OUT", ""), help="folder for bench.jsonl")
    p.add_argument("--budget", type=float, default=1e9, help="stop starting cases after this (s)")
    ns = p.parse_args(argv)
    dev = jax.devices()[0]
    header = (f"date {datetime.date.today()}, device {dev.device_kind}, jax {jax.__version__}, "
              f"batch {ns.batch}, state {ns.state}, softplus + delta_bias + D + z")
    log(header)
    rec = Recorder(ns.out or None)
    bw = copy_bandwidth()
    log(f"copy bandwidth (read + write): {bw / 1e12:.2f} TB/s")
    rec.add(kind="bandwidth", bytes_per_s=bw, device=dev.device_kind, jax=jax.__version__,
            date=str(datetime.date.today()))
    tuned = None
    if ns.sweep:
        try:
            tuned = run_sweep(ns, rec, bw)
            log(f"fastest configuration: PallasTritonScan(**{tuned})")
            rec.add(kind="tuned", config=tuned)
        except Exception:  # noqa: BLE001 - keep what was measured
            traceback.print_exc()
    if ns.e2e and ns.budget - (time.monotonic() - START) < 30:
        log("SKIP e2e: time budget spent")
    elif ns.e2e:
        try:
            run_e2e(ns, rec)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
    if not ns.no_table:
        try:
            run_table(ns, rec, bw, m.PallasTritonScan(**tuned) if tuned and ns.tune else None)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
    log("\n" + header + f"; copy bandwidth {bw / 1e12:.2f} TB/s")
    sweep = [r for r in rec.rows if r["kind"].startswith("sweep")]
    log("\n".join(f"tuned: {r['config']}" for r in rec.rows if r["kind"] == "tuned"))
    for r in sweep:
        log(f"{r['kind']} {r['dtype']} {r['config']}: "
            + (f"fwd {r['fwd_ms']:.3f} ms " if "fwd_ms" in r else "")
            + (f"fwd+bwd {r['fb_ms']:.3f} ms " if "fb_ms" in r else "")
            + (f"err {r['y_rel_err_vs_default']:.1e} " if "y_rel_err_vs_default" in r else "")
            + r.get("error", "")[:200])
    table = [r for r in rec.rows if r["kind"] == "table"]
    if table:
        text = fmt_table(table, bw)
        log(text)
        if ns.out:
            with open(os.path.join(ns.out, "tables.md"), "w") as f:
                f.write(header + "\n\n" + text + "\n")
    for r in rec.rows:
        if r["kind"] == "e2e":
            log(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
