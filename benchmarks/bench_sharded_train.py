"""Sharded training step on 2 devices against 1: step time and peak memory per device.

    python benchmarks/bench_sharded_train.py --out /tmp/bench          # 2 GPUs
    XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \\
        python benchmarks/bench_sharded_train.py --tiny                # a check on the CPU

Each layout runs in its own process (peak_bytes_in_use only grows within a process):
mamba-train's own jitted step (`training._make_step` on one device, else
`training._make_sharded_step` on the (data, fsdp, tensor, seq) mesh: AdamW, bfloat16
compute over float32 parameters and optimizer state, every layer rematerialised,
the scan on each device's block) on random tokens of a Mamba LM (default: hidden
1024, 24 layers, state 16, vocab 50280, the mamba-370m width at half its depth).

Layouts, same global batch and length: `1` (one device), `data`, `fsdp`, `tensor`,
`seq` (2 devices each), then `long`: the sequence split over 2 devices at the longest
length (a multiple of 1024) whose predicted per-device peak, from the one-device
run's memory per token, stays under 70% of the device's memory, and `long1`: that
length on one device, which the prediction says does not fit (run to show it).

The driver process never initialises a backend (it would reserve device memory);
each child does. Per layout: compile (the first step, compilation included), the
median step time
over --steps timed steps after --warmup, tokens/s, and each device's
`memory_stats()["peak_bytes_in_use"]`. Rows are appended to --out/bench.jsonl as
they finish; the table is printed at the end. --budget stops starting new layouts
when the time left would not cover one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "packages", "mamba-ssm-core", "src"))

# name: (data, fsdp, tensor, seq) or None for one device
LAYOUTS = {
    "1": None,
    "data": (2, 1, 1, 1),
    "fsdp": (1, 2, 1, 1),
    "tensor": (1, 1, 2, 1),
    "seq": (1, 1, 1, 2),
    "long": (1, 1, 1, 2),
    "long1": None,
}
ORDER = ("1", "seq", "data", "fsdp", "tensor", "long", "long1")


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--state", type=int, default=16)
    p.add_argument("--vocab", type=int, default=50280)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--steps", type=int, default=8, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
    p.add_argument("--impl", default="auto")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--layouts", default=",".join(ORDER))
    p.add_argument("--budget", type=float, default=86400.0, help="seconds for the whole run")
    p.add_argument("--min-left", type=float, default=60.0,
                   help="do not start a layout with less time than this left")
    p.add_argument("--out", default=None, help="folder for bench.jsonl and child logs")
    p.add_argument("--tiny", action="store_true",
                   help="hidden 64, 2 layers, vocab 256, batch 4, length 256 (CPU check)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-length", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.tiny:
        a.hidden, a.layers, a.vocab, a.batch, a.length = 64, 2, 256, 4, 256
    return a


# ---------------------------------------------------------------- one layout (child)


def child(a) -> dict:
    import jax
    import numpy as np

    from mamba_ssm_core import init_params, training
    from mamba_ssm_core.config import MambaConfig

    name, mesh_sizes = a.child, LAYOUTS[a.child]
    length = a.child_length or a.length
    row = {"layout": name, "mesh": mesh_sizes, "batch": a.batch, "length": length,
           "devices": 1 if mesh_sizes is None else 2, "impl": a.impl, "dtype": a.dtype}
    config = MambaConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, state_size=a.state, num_hidden_layers=a.layers,
        expand=2, conv_kernel=4, time_step_rank=-(-a.hidden // 16), use_bias=False,
        use_conv_bias=True, layer_norm_epsilon=1e-5, residual_in_fp32=True,
        tie_word_embeddings=True)
    tc = training.TrainConfig(steps=1000, warmup_steps=10, batch_size=a.batch, seq_len=length,
                              compute_dtype=a.dtype, remat=True, impl=a.impl, mesh=mesh_sizes)
    step_config = training.TrainConfig(**{**tc.to_dict(), "mesh": None})
    optimizer = training.make_optimizer(tc)
    params = init_params(jax.random.key(0), config)
    row["params"] = sum(int(x.size) for x in jax.tree.leaves(params))
    tokens = np.random.default_rng(0).integers(0, a.vocab, (a.batch, length + 1), np.int32)
    if mesh_sizes is None:
        devices = jax.devices()[:1]
        step = training._make_step(config, step_config)
        opt_state = jax.jit(optimizer.init)(params)
        batch = jax.device_put(tokens, devices[0])
    else:
        mesh = training._mesh_for(config, tc)
        devices = list(mesh.devices.flat)
        step, sh = training._make_sharded_step(config, step_config, mesh)
        params = jax.device_put(params, sh.params)
        opt_state = jax.jit(optimizer.init, out_shardings=sh.opt_state)(params)
        batch = training._place_batch(tokens, sh.batch)
    row["device"] = devices[0].device_kind
    row["jax"] = jax.__version__

    t0 = time.perf_counter()
    params, opt_state, metrics = step(params, opt_state, batch)
    jax.block_until_ready((params, opt_state, metrics))
    row["compile_s"] = round(time.perf_counter() - t0, 1)
    for _ in range(a.warmup):
        params, opt_state, metrics = step(params, opt_state, batch)
    jax.block_until_ready((params, opt_state, metrics))
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        params, opt_state, metrics = step(params, opt_state, batch)
        jax.block_until_ready((params, opt_state, metrics))
        times.append(time.perf_counter() - t0)
    row["median_s"] = statistics.median(times)
    row["min_s"], row["max_s"] = min(times), max(times)
    row["tokens_per_s"] = a.batch * length / row["median_s"]
    row["loss"] = float(metrics["loss"])
    stats = [d.memory_stats() or {} for d in devices]
    row["peak_bytes"] = [s.get("peak_bytes_in_use") for s in stats]
    row["bytes_limit"] = [s.get("bytes_limit") for s in stats]
    return row


# ---------------------------------------------------------------- driver


def _gb(x) -> str:
    return "n/a" if x is None else f"{x / 2**30:.1f}"


def _long_length(a, one: dict) -> tuple[int | None, str]:
    """The length for `long` from the one-device run's memory: fixed (parameters and
    optimizer state, 16 bytes a parameter) plus a per-token slope."""
    peak, limit = one.get("peak_bytes", [None])[0], one.get("bytes_limit", [None])[0]
    if not peak or not limit:
        return None, "no memory statistics on this backend"
    fixed = 16 * one["params"]
    slope = max(peak - fixed, 1) / (one["batch"] * one["length"])
    step = 1024 if a.length >= 1024 else a.length
    best = None
    n = step
    while fixed + slope * a.batch * n / 2 <= 0.7 * limit:
        best = n
        n += step
    if best is None or best <= a.length:
        return None, "no longer length fits 2 devices under the prediction"
    need1 = fixed + slope * a.batch * best
    note = (f"predicted peak {_gb(fixed + slope * a.batch * best / 2)} GiB per device on 2, "
            f"{_gb(need1)} GiB on 1 (limit {_gb(limit)} GiB)")
    return best, note


def main(argv=None) -> int:
    a = _args(argv)
    if a.child:
        try:
            row = child(a)
        except Exception as e:  # noqa: BLE001 - reported as the row's error
            traceback.print_exc()
            msg = str(e).strip().splitlines()
            row = {"layout": a.child, "length": a.child_length or a.length,
                   "error": f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]}
        print("ROW " + json.dumps(row), flush=True)
        return 0

    start = time.monotonic()
    if a.out:
        os.makedirs(a.out, exist_ok=True)
    rows: dict[str, dict] = {}
    notes = []
    base = [sys.executable, os.path.abspath(__file__), "--hidden", str(a.hidden), "--layers",
            str(a.layers), "--state", str(a.state), "--vocab", str(a.vocab), "--batch",
            str(a.batch), "--length", str(a.length), "--steps", str(a.steps), "--warmup",
            str(a.warmup), "--impl", a.impl, "--dtype", a.dtype]
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    for name in [x for x in a.layouts.split(",") if x]:
        if name not in LAYOUTS:
            raise SystemExit(f"unknown layout {name!r}; known: {', '.join(LAYOUTS)}")
        left = a.budget - (time.monotonic() - start)
        if left < a.min_left:
            notes.append(f"{name}: not run ({left:.0f} s of the budget left)")
            print(notes[-1], flush=True)
            continue
        cmd = [*base, "--child", name]
        if name in ("long", "long1"):
            if name == "long1" and not rows.get("long", {}).get("length"):
                notes.append("long1: not run (no long run)")
                continue
            length = rows["long"]["length"] if name == "long1" else None
            if name == "long":
                if "1" not in rows or "error" in rows["1"]:
                    notes.append("long: not run (no one-device run to size it)")
                    continue
                length, why = _long_length(a, rows["1"])
                notes.append(f"long: length {length}: {why}")
                print(notes[-1], flush=True)
                if length is None:
                    continue
            cmd += ["--child-length", str(length)]
        t0 = time.monotonic()
        log_path = os.path.join(a.out, "children.log") if a.out else os.devnull
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                                  timeout=max(left - 5, 10))
            out = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            # (always bytes, text=True or not)
            out = b"".join(x for x in (e.stdout, e.stderr) if x).decode(errors="replace")
            out += "\nTIMEOUT"
        with open(log_path, "a") as f:
            f.write(f"==== {name}: {' '.join(cmd[1:])}\n{out}\n")
        found = [line[4:] for line in out.splitlines() if line.startswith("ROW ")]
        row = json.loads(found[-1]) if found else {
            "layout": name, "error": "no result: " + (out.strip().splitlines() or ["?"])[-1][:200]}
        row["wall_s"] = round(time.monotonic() - t0, 1)
        rows[name] = row
        print(json.dumps(row), flush=True)
        if a.out:
            with open(os.path.join(a.out, "bench.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")

    one = rows.get("1", {})
    print()
    print(f"Mamba LM hidden {a.hidden}, {a.layers} layers, state {a.state}, vocab {a.vocab}; "
          f"{a.dtype} compute, float32 params + AdamW, remat, impl {a.impl}; "
          f"global batch {a.batch}")
    print("| layout | devices | length | compile+1st step s | step ms (median) | tokens/s | "
          "vs 1 device | peak GiB per device |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        if "error" in r:
            print(f"| {name} | {r.get('devices', '')} | {r.get('length', '')} | – | "
                  f"failed: {r['error']} | – | – | – |")
            continue
        speed = ""
        if "median_s" in one and r["length"] == one["length"]:
            speed = f"{one['median_s'] / r['median_s']:.2f}×"
        peaks = " / ".join(_gb(x) for x in r["peak_bytes"])
        print(f"| {name} | {r['devices']} | {r['length']} | {r['compile_s']} | "
              f"{1e3 * r['median_s']:.1f} | {r['tokens_per_s']:,.0f} | {speed} | {peaks} |")
    for n in notes:
        print("note:", n)
    print(f"total {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
