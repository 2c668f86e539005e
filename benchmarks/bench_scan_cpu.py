"""Selective scan on the CPU: time and peak memory of every implementation.

    hatch run bench-scan            # the issue-2 table: batch 2, length 4096, dim 1536, state 16
    hatch run bench-scan --impl chunked:128:sequential:4 --impl reference --repeats 3

What it measures, per case (float32, with D, z, delta_bias and softplus, as in Mamba):

- fwd: `jax.jit` of
  `selective_scan(u, delta, A, B, C, D, z=z, delta_bias=..., delta_softplus=True)`;
- fwd+bwd: `jax.jit` of `jax.vjp` of that call pulled back with a random cotangent,
  returning the gradients of all eight inputs;
- times: medians over --repeats rounds, as wall clock and as process CPU time (all
  threads). All cases are timed in one process, interleaved (each round runs every
  case once, in a shuffled order, after one untimed forward of that case), so a
  machine shared with other work slows every case alike; on such a machine the CPU
  time is the steadier measure of the work;
- XLA peak: for the fwd+bwd executable, argument + output + temporary bytes from
  `jax.jit(f).lower(...).compile().memory_analysis()` (XLA's own buffer plan);
- RSS peak: measured in a fresh process per case: the peak resident memory during
  the first fwd+bwd run (VmHWM, reset through /proc/self/clear_refs after compiling
  and after `malloc_trim` returned freed memory), minus the resident memory just
  before, plus the bytes of the inputs already resident: comparable with XLA's figure;
- I/O: bytes of the fwd+bwd function's arguments (the inputs and the cotangent) and
  results (the gradients); the ratio columns divide the peaks by it.

A case is a registered implementation's name, "auto", or
`chunked:<chunk_size>[:<inner>[:<unroll>]]` for a chunked configuration.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import random
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


def _problem(batch: int, length: int, dim: int, state: int):
    """Random inputs, a cotangent, and the fwd and fwd+bwd functions of a case."""
    import jax
    import jax.numpy as jnp

    import mamba_ssm_core as m

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

    def functions(case: str):
        impl = _impl_of(case)

        def scan(u, delta, A, B, C, D, z, delta_bias):
            return m.selective_scan(u, delta, A, B, C, D, z=z, delta_bias=delta_bias,
                                    delta_softplus=True, impl=impl)

        def fwd_bwd(inputs, dy):
            _, pull = jax.vjp(scan, *inputs)
            return pull(dy)

        fwd = jax.jit(scan).lower(*inputs).compile()
        train = jax.jit(fwd_bwd).lower(inputs, dy).compile()
        return fwd, train, fwd_bwd

    return inputs, dy, functions


def _nbytes(tree) -> int:
    import jax
    import numpy as np

    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def memory_worker(case: str, batch: int, length: int, dim: int, state: int) -> dict:
    import jax

    import mamba_ssm_core as m

    inputs, dy, functions = _problem(batch, length, dim, state)
    _, train, fwd_bwd = functions(case)
    mem = train.memory_analysis()
    xla_peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
    io_bytes = _nbytes((inputs, dy)) + _nbytes(jax.eval_shape(fwd_bwd, inputs, dy))

    # Memory freed by compilation goes back to the OS first, so that the run cannot
    # hide its allocations in pages that are resident already.
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    rss_peak = None
    if _reset_peak_rss():
        before = _status_kib("VmRSS")
        out = train(inputs, dy)
        jax.block_until_ready(out)
        rss_peak = (_status_kib("VmHWM") - before) * 1024 + _nbytes((inputs, dy))
        del out

    u, delta, A, B, C, D, z, db = inputs
    spec = m.ScanSpec.of(m.ScanArgs(u, delta, A, B[:, :, None], C[:, :, None], D, z, db,
                                    None, None))
    return {
        "case": case,
        "impl": m.auto_implementation(spec)[0] if case == "auto" else repr(_impl_of(case)),
        "xla_peak": xla_peak,
        "rss_peak": rss_peak,
        "io": io_bytes,
    }


def time_worker(cases: list[str], batch: int, length: int, dim: int, state: int,
                repeats: int) -> dict:
    import jax

    inputs, dy, functions = _problem(batch, length, dim, state)
    compiled = {}
    for case in cases:
        fwd, train, _ = functions(case)
        jax.block_until_ready(fwd(*inputs))  # warm-up
        jax.block_until_ready(train(inputs, dy))
        compiled[case] = (fwd, train)
    samples = {case: {"fwd_s": [], "fwd_cpu": [], "fwd_bwd_s": [], "fwd_bwd_cpu": []}
               for case in cases}
    order = random.Random(0)
    for _ in range(repeats):
        for case in order.sample(cases, len(cases)):
            fwd, train = compiled[case]
            # Untimed: whatever the previous case left behind (a freed 12 GB, cold
            # caches) is paid here, not by this case's timings.
            jax.block_until_ready(fwd(*inputs))
            for key, fn, args in (("fwd", fwd, inputs), ("fwd_bwd", train, (inputs, dy))):
                t0, c0 = time.perf_counter(), time.process_time()
                jax.block_until_ready(fn(*args))
                samples[case][key + "_s"].append(time.perf_counter() - t0)
                samples[case][key + "_cpu"].append(time.process_time() - c0)
    return {case: {k: statistics.median(v) for k, v in s.items()} for case, s in samples.items()}


def _run_worker(args: list[str]) -> dict | None:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"worker {args} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--dim", type=int, default=1536)
    p.add_argument("--state", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--impl", action="append", help="case to run (repeatable); default: "
                   + ", ".join(DEFAULT_CASES))
    p.add_argument("--memory-worker", help=argparse.SUPPRESS)
    p.add_argument("--time-worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    shape = (a.batch, a.length, a.dim, a.state)
    if a.memory_worker:
        print(json.dumps(memory_worker(a.memory_worker, *shape)))
        return
    if a.time_worker:
        print(json.dumps(time_worker(a.time_worker.split(","), *shape, a.repeats)))
        return

    import jax

    cases = a.impl or list(DEFAULT_CASES)
    sizes = ["--batch", str(a.batch), "--length", str(a.length), "--dim", str(a.dim),
             "--state", str(a.state)]
    print(f"selective scan, CPU, jax {jax.__version__}, {platform.machine()}, "
          f"{os.cpu_count()} cores")
    print(f"batch {a.batch}, length {a.length}, dim {a.dim}, state {a.state}, float32, "
          f"with D, z, delta_bias, softplus; medians of {a.repeats} interleaved rounds")
    print()
    load_start = os.getloadavg()
    memory = {c: _run_worker(["--memory-worker", c, *sizes]) for c in cases}
    times = _run_worker(["--time-worker", ",".join(cases), "--repeats", str(a.repeats), *sizes])
    if times is None:
        sys.exit("timing failed")
    ok = [c for c in cases if memory[c] is not None]
    best = {k: min(times[c][k] for c in cases) for k in times[cases[0]]}
    mib = lambda b: "n/a" if b is None else f"{b / 2**20:,.0f}"  # noqa: E731
    ms = lambda c, k: f"{times[c][k] * 1e3:,.1f} ({times[c][k] / best[k]:.2f}x)"  # noqa: E731
    print("| impl | fwd ms | fwd CPU ms | fwd+bwd ms | fwd+bwd CPU ms | XLA peak MiB "
          "| RSS peak MiB | I/O MiB | XLA peak / I/O | RSS peak / I/O |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for c in ok:
        r = memory[c]
        rss_ratio = "n/a" if r["rss_peak"] is None else f"{r['rss_peak'] / r['io']:.2f}"
        print(f"| {c} | {ms(c, 'fwd_s')} | {ms(c, 'fwd_cpu')} | {ms(c, 'fwd_bwd_s')} "
              f"| {ms(c, 'fwd_bwd_cpu')} | {mib(r['xla_peak'])} | {mib(r['rss_peak'])} "
              f"| {mib(r['io'])} | {r['xla_peak'] / r['io']:.2f} | {rss_ratio} |")
    print()
    print("(Nx): over the fastest case in that column.")
    for c in ok:
        print(f"{c}: {memory[c]['impl']}")
    print(f"load average at start {load_start}, at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
