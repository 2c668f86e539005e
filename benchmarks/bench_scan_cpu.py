"""Selective scan on the CPU: time and peak memory of every implementation.

    hatch run bench-scan                      # the issue-2 table (batch 2, length 4096, dim 1536, state 16)
    hatch run bench-scan --impl chunked:128:sequential:4 --impl associative

Each case runs in a fresh subprocess so that compilation, caches and other cases
cannot inflate its memory. Per case it prints, as medians over --repeats runs of
the jitted function:

- fwd: `selective_scan(u, delta, A, B, C, D, z=z, delta_bias=..., delta_softplus=True)`;
- fwd+bwd: `jax.vjp` of that call pulled back with a random cotangent, returning
  the gradients of all eight inputs;
- times as wall clock and as process CPU time (all threads): on a shared machine
  the CPU time is the steadier measure of the work, the wall clock what a user waits;
- XLA peak: for the fwd+bwd executable, argument + output + temporary bytes from
  `jax.jit(f).lower(...).compile().memory_analysis()` (XLA's own buffer plan);
- RSS peak: the process's measured peak resident memory during the first fwd+bwd
  run (VmHWM, reset through /proc/self/clear_refs after compiling and after
  `malloc_trim` returns freed memory), minus the resident memory just before, plus
  the bytes of the inputs already resident, so it is comparable with the XLA figure;
- I/O: bytes of the fwd+bwd function's arguments (inputs and cotangent) and
  results (gradients); the ratio columns divide the peaks by it.

A case is `name` for a registered implementation, or
`chunked:<chunk_size>:<inner>[:<unroll>]` for a chunked configuration.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

DEFAULT_CASES = ("reference", "associative", "chunked", "auto")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _impl_of(case: str):
    import mamba_ssm_core as m

    if case.startswith("chunked:"):
        parts = case.split(":")[1:]
        kwargs = {"chunk_size": int(parts[0])}
        if len(parts) > 1:
            kwargs["inner"] = parts[1]
        if len(parts) > 2:
            kwargs["unroll"] = int(parts[2])
        return m.ChunkedScan(**kwargs)
    return case


def _median_times(fn, args, repeats: int) -> tuple[float, float]:
    """Median wall-clock and median process CPU seconds of one call (after a warm-up)."""
    import jax

    jax.block_until_ready(fn(*args))  # compile and warm up
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(*args))
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def worker(case: str, batch: int, length: int, dim: int, state: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import mamba_ssm_core as m

    impl = _impl_of(case)
    keys = jax.random.split(jax.random.key(0), 9)
    f32 = jnp.float32
    inputs = (
        jax.random.normal(keys[0], (batch, length, dim), f32),  # u
        jax.random.normal(keys[1], (batch, length, dim), f32) - 1.0,  # delta
        -jnp.exp(jax.random.normal(keys[2], (dim, state), f32)),  # A
        jax.random.normal(keys[3], (batch, length, state), f32),  # B
        jax.random.normal(keys[4], (batch, length, state), f32),  # C
        jax.random.normal(keys[5], (dim,), f32),  # D
        jax.random.normal(keys[6], (batch, length, dim), f32),  # z
        jax.random.normal(keys[7], (dim,), f32),  # delta_bias
    )
    dy = jax.random.normal(keys[8], (batch, length, dim), f32)
    jax.block_until_ready((inputs, dy))

    def scan(u, delta, A, B, C, D, z, delta_bias):
        return m.selective_scan(
            u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=True, impl=impl
        )

    def fwd_bwd(inputs, dy):
        _, pull = jax.vjp(scan, *inputs)
        return pull(dy)

    fwd = jax.jit(scan)
    train = jax.jit(fwd_bwd)
    compiled = train.lower(inputs, dy).compile()
    mem = compiled.memory_analysis()
    nbytes = lambda tree: sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))
    io_bytes = nbytes((inputs, dy)) + nbytes(jax.eval_shape(fwd_bwd, inputs, dy))
    xla_peak = (
        mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
        - mem.alias_size_in_bytes
    )

    # Peak RSS of the first fwd+bwd run on already-resident inputs, after compilation.
    # Memory freed by compilation goes back to the OS first (malloc_trim), so the run
    # cannot hide its allocations in pages that are resident already.
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    rss_peak = None
    if _reset_peak_rss():
        before = _status_kib("VmRSS")
        out = compiled(inputs, dy)
        jax.block_until_ready(out)
        rss_peak = (_status_kib("VmHWM") - before) * 1024 + nbytes((inputs, dy))
        del out

    fwd_s, fwd_cpu = _median_times(fwd, inputs, repeats)
    fwd_bwd_s, fwd_bwd_cpu = _median_times(compiled, (inputs, dy), repeats)
    return {
        "case": case,
        "impl": m.auto_implementation(_spec(inputs))[0] if case == "auto" else repr(impl),
        "fwd_s": fwd_s,
        "fwd_cpu": fwd_cpu,
        "fwd_bwd_s": fwd_bwd_s,
        "fwd_bwd_cpu": fwd_bwd_cpu,
        "xla_peak": xla_peak,
        "rss_peak": rss_peak,
        "io": io_bytes,
    }


def _spec(inputs):
    import mamba_ssm_core as m

    u, delta, A, B, C, D, z, db = inputs
    return m.ScanSpec.of(m.ScanArgs(u, delta, A, B[:, :, None], C[:, :, None], D, z, db, None, None))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--dim", type=int, default=1536)
    p.add_argument("--state", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--impl", action="append", help="case to run (repeatable); default: all registered CPU ones")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    shape = (a.batch, a.length, a.dim, a.state)
    if a.worker:
        print(json.dumps(worker(a.worker, *shape, a.repeats)))
        return

    import jax

    cases = a.impl or list(DEFAULT_CASES)
    print(f"selective scan, CPU, jax {jax.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores")
    print(f"batch {a.batch}, length {a.length}, dim {a.dim}, state {a.state}, float32, "
          f"with D, z, delta_bias, softplus; medians of {a.repeats} runs, each case in a fresh process")
    print()
    load_start = os.getloadavg()
    rows = []
    for case in cases:
        cmd = [sys.executable, __file__, "--worker", case, "--batch", str(a.batch),
               "--length", str(a.length), "--dim", str(a.dim), "--state", str(a.state),
               "--repeats", str(a.repeats)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{case}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            rows.append(None)
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    ok = [r for r in rows if r]
    best = {k: min(r[k] for r in ok) for k in ("fwd_s", "fwd_cpu", "fwd_bwd_s", "fwd_bwd_cpu")}
    mib = lambda b: "n/a" if b is None else f"{b / 2**20:,.0f}"
    ms = lambda r, k: f"{r[k] * 1e3:,.0f} ({r[k] / best[k]:.2f}x)"
    print("| impl | fwd ms | fwd CPU ms | fwd+bwd ms | fwd+bwd CPU ms | XLA peak MiB "
          "| RSS peak MiB | I/O MiB | XLA peak / I/O | RSS peak / I/O |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in ok:
        rss_ratio = "n/a" if r["rss_peak"] is None else f"{r['rss_peak'] / r['io']:.2f}"
        print(f"| {r['case']} | {ms(r, 'fwd_s')} | {ms(r, 'fwd_cpu')} | {ms(r, 'fwd_bwd_s')} "
              f"| {ms(r, 'fwd_bwd_cpu')} | {mib(r['xla_peak'])} | {mib(r['rss_peak'])} "
              f"| {mib(r['io'])} | {r['xla_peak'] / r['io']:.2f} | {rss_ratio} |")
    print()
    print("(Nx): time over the fastest implementation's in that column.")
    for r in ok:
        print(f"{r['case']}: {r['impl']}")
    print(f"load average at start {load_start}, at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
