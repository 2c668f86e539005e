"""Quick pallas_triton configuration probe for iterating on the H100 (issue 7).

    python benchmarks/triton_probe.py configs.json      # time each config, check it
    python benchmarks/triton_probe.py --ncu ['{kw}' [dim]]  # one fwd+bwd call per dtype, for ncu

configs.json: a list of {"fwd": bool, "bwd": bool, "dtypes": [...], "kw": {...}}
(PallasTritonScan keyword arguments). Batch 8 (or "batch"), length 2048 (or "length"),
dim 2048 (or "dim"), state 16 (or "state"), softplus + delta bias + D + z, the inputs of
bench_scan_gpu.py. Each config's y and gradients are compared with the default
configuration's (relative error), so a fast but wrong variant shows. bench_scan_gpu.py
makes the reported table.
triton_registers.py reports the kernels' registers and waves (on the CPU).
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(__file__))
import bench_scan_gpu as bs  # noqa: E402

import mamba_ssm_core as m  # noqa: E402


def main(argv):
    if argv and argv[0] == "--ncu":
        kw = json.loads(argv[1]) if len(argv) > 1 else {}
        dim = int(argv[2]) if len(argv) > 2 else 2048
        for dtype in ("bfloat16", "float32"):
            args, dy = bs.make_inputs(jax.random.key(1), 8, 2048, dim, 16, jnp.dtype(dtype))
            fb = bs.fwd_bwd_fn(m.PallasTritonScan(**kw))
            for _ in range(1):
                jax.block_until_ready(fb(args, dy))
        return 0
    with open(argv[0]) as f:
        configs = json.load(f)
    cache = {}
    base = {}
    for c in configs:
        length, dim, batch = c.get("length", 2048), c.get("dim", 2048), c.get("batch", 8)
        state = c.get("state", 16)
        for dtype in c.get("dtypes", ["bfloat16"]):
            key = (dtype, length, dim, batch, state)
            if key not in cache:
                cache[key] = bs.make_inputs(jax.random.key(3), batch, length, dim, state,
                                            jnp.dtype(dtype))
                ref = bs.fwd_bwd_fn(m.PallasTritonScan())(*cache[key])
                base[key] = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), ref)
            args, dy = cache[key]
            row = dict(kw=c["kw"], dtype=dtype, length=length, dim=dim, batch=batch, state=state)
            try:
                impl = m.PallasTritonScan(**c["kw"])
                if c.get("fwd", True):
                    row["fwd_ms"] = round(1e3 * bs.time_call(bs.fwd_fn(impl), args, 0.4)[0], 4)
                if c.get("bwd", True):
                    fb = bs.fwd_bwd_fn(impl)
                    compiled = fb.lower(args, dy).compile()
                    ma = compiled.memory_analysis()
                    row["peak_gb"] = round(1e-9 * (ma.argument_size_in_bytes
                                                   + ma.output_size_in_bytes
                                                   + ma.temp_size_in_bytes
                                                   - ma.alias_size_in_bytes), 3)
                    row["fb_ms"] = round(1e3 * bs.time_call(compiled, (args, dy), 0.6)[0], 4)
                    y, grads = compiled(args, dy)
                    by, bg = base[key]
                    row["err_y"] = bs.rel_err(y, by)
                    each = [bs.rel_err(a, b) for a, b in zip(grads, bg, strict=True)]
                    row["err_g"] = max(each)
                    row["err_g_each"] = each  # u, delta, A, B, C, D, z, delta_bias
            except Exception as e:  # noqa: BLE001 - a failing variant is a result here
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
