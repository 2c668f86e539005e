"""Device time of one pallas_triton forward+backward call, from a profiler trace.

    python benchmarks/scan_gpu_kernel_times.py [--lengths 2048,8192] [--dtypes bfloat16,float32]

Batch 8, dim 2048, state 16 (bench_scan_gpu.py's inputs and forward+backward). After
warm-up, `calls` calls run under `jax.profiler.trace`; the GPU kernels' durations are
read back from the trace (`jax.profiler.ProfileData`) and summed per call, by kernel
name. That is the time the device spends on the call, without the host's dispatch of
it: the figure to compare with kernel timings taken with CUDA events.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import sys
import tempfile

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(__file__))
import bench_scan_gpu as bs  # noqa: E402
import mamba_ssm_core as m  # noqa: E402


def kernel_times(fn, args, calls: int) -> collections.Counter:
    """{kernel name: nanoseconds per call} over `calls` traced calls."""
    for _ in range(3):
        jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(calls):
                out = fn(*args)
            jax.block_until_ready(out)
        (path,) = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)
        data = jax.profiler.ProfileData.from_file(path)
    total = collections.Counter()
    for plane in data.planes:
        if "GPU" not in plane.name:
            continue
        for line in plane.lines:
            if "stream" in line.name.lower():
                for ev in line.events:
                    total[ev.name] += ev.duration_ns / calls
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", default="2048,8192")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--calls", type=int, default=10)
    args = p.parse_args()
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; batch 8, dim 2048, state 16")
    print("| length | dtype | device ms per call | by kernel (ms per call) | "
          "host-timed ms |")
    print("|---|---|---|---|---|")
    for length in map(int, args.lengths.split(",")):
        for dtype in args.dtypes.split(","):
            inputs, dy = bs.make_inputs(jax.random.key(3), 8, length, 2048, 16,
                                        jnp.dtype(dtype))
            fb = bs.fwd_bwd_fn(m.PallasTritonScan()).lower(inputs, dy).compile()
            times = kernel_times(fb, (inputs, dy), args.calls)
            names = collections.Counter()
            for k, v in times.items():
                names[k.split("__")[0]] += v
            parts = ", ".join(f"{k} {v / 1e6:.3f}" for k, v in names.most_common(4))
            wall = bs.time_call(fb, (inputs, dy), 2.0)[0]
            print(f"| {length} | {dtype} | {sum(times.values()) / 1e6:.3f} | {parts} | "
                  f"{wall * 1e3:.3f} |", flush=True)


if __name__ == "__main__":
    main()
