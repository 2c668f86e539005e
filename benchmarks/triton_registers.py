"""Registers, spills and waves of the pallas_triton kernels, found on the CPU (no GPU).

    pip install triton    # OpenAI Triton: its compiler, and the ptxas it bundles
    python benchmarks/triton_registers.py [--dims 2048,5120] [--batch 8] [--length 2048]
        [--state 16] [--dtype bfloat16] [--kw '{"bwd_unroll": 1}']

Lowers `pallas_triton`'s forward+backward for an abstract H100 with jax's own Pallas
lowering, compiles each kernel's Triton IR with the `triton` package for sm_90a, and
runs `ptxas -v` on the PTX. For each kernel it prints the registers a thread uses, the
bytes spilled, how many of its programs the registers let an SM hold (the kernels'
own rule, `_pallas_triton._programs_per_sm`: 1-warp programs of 169 to 255 registers
fit 8 an SM, as ncu showed for 195), and how many waves its grid takes on the
H100's 132 SMs, the backward's launches sized as `bwd_wave` sizes them there. Past
one wave the last programs wait for a free slot (measured at dim 5120 before
`bwd_wave`: 0.91 of a wave took 4.1 ms forward+backward, 1.06 waves 6.9, 1.21 waves
7.1).

On the H100 (jax 0.11.2, ncu, 2026-11-23) the forward used 166 registers and this script
(jax 0.10.2, triton 3.9.0) says 165; the backward 255 on both. One backward variant
(`bwd_prefetch=False`) used 255 there and 244 here: XLA compiles the same IR with its
own build of Triton, so the counts are close, not equal. Uses jax internals (the Triton
lowering), as a benchmark tool may.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest.mock

import jax
import jax.numpy as jnp
from jax._src.mesh import AbstractDevice
from jax._src.pallas.triton import lowering
from jax.sharding import AbstractMesh

sys.path.insert(0, os.path.dirname(__file__))
import bench_scan_gpu as bs  # noqa: E402

import mamba_ssm_core as m  # noqa: E402
from mamba_ssm_core import _pallas_triton as pt  # noqa: E402

H100_SMS = 132


def ptxas_path(triton) -> str:
    """The ptxas that reads the PTX version `triton` writes: its newest bundled one."""
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas-blackwell", "ptxas"):
        if os.path.exists(os.path.join(bin_dir, name)):
            return os.path.join(bin_dir, name)
    found = shutil.which("ptxas")
    if found is None:
        sys.exit("no ptxas: neither bundled with triton nor on the PATH")
    return found


def lowered_kernels(impl, batch, length, dim, state, dtype):
    """[(Triton IR text, grid)] of each distinct kernel in the forward+backward that
    bench_scan_gpu.py and triton_probe.py time (the same call, on abstract inputs)."""
    args, dy = jax.eval_shape(functools.partial(
        bs.make_inputs, b=batch, l=length, d=dim, n=state, dtype=dtype), jax.random.key(0))
    found = []
    original = lowering.lower_jaxpr_to_triton_module

    def capture(*a, **k):
        result = original(*a, **k)
        found.append((result.module.operation.get_asm(), tuple(result.grid)))
        return result

    mesh = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
        device_kind="NVIDIA H100", num_cores=H100_SMS, platform="cuda"))
    # `unsupported` refuses the CPU platform; lift it to reach the lowering.
    lift = unittest.mock.patch.object(pt.PallasTritonScan, "unsupported", lambda *a: None)
    with jax.sharding.use_abstract_mesh(mesh), lift, \
            unittest.mock.patch.object(lowering, "lower_jaxpr_to_triton_module", capture):
        bs.fwd_bwd_fn(impl).trace(args, dy).lower(lowering_platforms=("cuda",))
    unique = {}
    for text, grid in found:
        unique.setdefault(text, grid)
    return list(unique.items())


def usage(triton, ptxas, ttir: str, num_warps: int) -> dict:
    """Compile one kernel's Triton IR for sm_90a: its name, registers and spilled bytes."""
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ttir")
        with open(src, "w") as f:
            f.write(ttir)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": num_warps, "num_stages": 1})
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        res = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx, "-o", os.devnull],
                             capture_output=True, text=True, check=True)
    text = res.stdout + res.stderr
    name = re.search(r"\.entry\s+(\w+)", compiled.asm["ptx"]).group(1)
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spill = int(re.search(r"(\d+) bytes spill stores", text).group(1))
    return dict(kernel=name, regs=regs, spill_bytes=spill)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", default="2048,5120")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--state", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--kw", default="{}", help="PallasTritonScan keyword arguments (JSON)")
    ns = p.parse_args(argv)
    try:
        import triton
    except ImportError:
        sys.exit("needs the `triton` package (pip install triton; no GPU needed)")
    ptxas = ptxas_path(triton)
    kw = json.loads(ns.kw)
    impl = m.PallasTritonScan(**kw)
    print(f"pallas_triton {kw or 'defaults'}, batch {ns.batch}, length {ns.length}, "
          f"state {ns.state}, {ns.dtype}; sm_90a, triton {triton.__version__}")
    print("| dim | kernel | warps | registers | spilled B | programs/SM | grid | waves |")
    print("|---|---|---|---|---|---|---|---|")
    # as on the H100: the backward's launches hold what its 132 SMs run at once
    unittest.mock.patch.object(pt, "_gpu_sm_count", lambda: H100_SMS).start()
    for dim in (int(d) for d in ns.dims.split(",")):
        spec = m.ScanSpec(batch=ns.batch, length=ns.length, dim=dim, state=ns.state, groups=1,
                          dtype=ns.dtype, has_z=True, has_segments=False)
        cfg = impl.kernel_config(spec, softplus=True, has_D=True, has_bias=True, has_h0=False)
        seen = set()
        for ttir, grid in lowered_kernels(impl, ns.batch, ns.length, dim, ns.state,
                                          jnp.dtype(ns.dtype)):
            fwd = "selective_scan_fwd" in ttir
            warps = cfg.num_warps if fwd else cfg.bwd_num_warps
            u = usage(triton, ptxas, ttir, warps)
            per_sm = pt._programs_per_sm(u["regs"], warps)
            programs = math.prod(grid)
            # the backward's later launches are a second kernel: they take the sums so far
            label = u["kernel"] + (" (later launches)" if u["kernel"] in seen else "")
            seen.add(u["kernel"])
            print(f"| {dim} | {label} | {warps} | {u['regs']} | {u['spill_bytes']} | "
                  f"{per_sm} | {'x'.join(map(str, grid))} | "
                  f"{programs / (per_sm * H100_SMS):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
