"""The Mamba LM on this CPU at the mamba-130m shape, against transformers' PyTorch model.

Random weights, hidden 768, 24 layers, state 16, vocab 50280 (tied). Measured in one
run, each case once per round, round after round, so that every ratio compares cases
that saw the same machine load; the table gives medians over the rounds and the load
average seen at each round:

* prefill of 1x1024 and 4x256 tokens (the prompt through every layer into a fresh
  cache, then the logits of the last position), tokens/s: ours with the scan that
  `generate` uses on CPUs ("recurrent"), with "auto" (the training default on CPUs,
  "chunked"), with "reference", and with a free scan (the recurrence replaced by
  zeros, its inputs still computed: what every implementation shares, so
  reference / free is the most any scan can gain over "reference");
  transformers with use_cache=True, logits_to_keep=1;
* batch-1 greedy decoding of 128 tokens after a 16-token prompt (`generate` but its
  compile: argument preparation, prefill and loop), tokens/s: ours with float32 and
  with bfloat16 weights (float32 arithmetic), transformers' `generate` in float32;
* the read bandwidth of this machine, the better of a jitted jnp.sum over 1 GiB of
  float32 and NumPy sums over its parts on every core at once, and from it the
  decoding floor: every weight read once per token;
* compile times: the prefill, the generation loop, and the forward at 2 and 48 layers.

`--profile` adds, per case, the compiled program's most expensive operations (XLA:CPU
thunk events from `jax.profiler`): the decoding step per token, the 4x256 prefill.

Run: `hatch run python benchmarks/bench_lm_cpu.py [--rounds N] [--no-torch] [--profile]`.
Prints Markdown for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import glob
import os
import platform
import re
import statistics
import tempfile
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mamba_ssm_core import MambaConfig, backbone, forward, init_cache, init_params, lm_head
from mamba_ssm_core._scan_common import ScanImplementation
from mamba_ssm_core.generation import _generate, prepare_generate
from mamba_ssm_core.params import flatten
from mamba_ssm_core.scan import register_implementation

CONFIG = MambaConfig(vocab_size=50280, hidden_size=768, state_size=16, num_hidden_layers=24,
                     expand=2, conv_kernel=4, time_step_rank=48, use_bias=False,
                     use_conv_bias=True, layer_norm_epsilon=1e-5, residual_in_fp32=True,
                     tie_word_embeddings=True, eos_token_id=(0,), pad_token_id=0)
PREFILL = [(1, 1024), (4, 256)]
IMPLS = ("recurrent", "auto", "reference", "free")
PROMPT, NEW = 16, 128
GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class FreeScan(ScanImplementation):
    """No recurrence: y and the state are zeros that depend on every input (through a
    sum of each), so the model around the scan, its projections included, is computed
    as with any implementation. (Computing the skip and gate here instead let XLA fuse
    the conv and its SiLU into them, recomputed, which cost more than the scan.)"""

    name = "bench-free"

    def __call__(self, args, *, delta_softplus):
        del delta_softplus
        b, _, d = args.u.shape
        dtype = args.compute_dtype
        used = sum(jnp.sum(x.astype(dtype)) for x in (args.u, args.delta, args.B, args.C, args.z))
        y = jnp.zeros(args.u.shape, dtype) * used
        return y.astype(args.u.dtype), jnp.zeros((b, d, args.A.shape[1]), dtype) * used


register_implementation(FreeScan())


@dataclasses.dataclass
class Case:
    name: str
    run: Callable[[], object]  # one measured run; blocks until done
    units: float  # tokens (or bytes) per run
    wall: list[float] = dataclasses.field(default_factory=list)
    cpu: list[float] = dataclasses.field(default_factory=list)
    profile: Callable[[], object] | None = None  # what --profile traces
    hlo: str = ""  # the compiled program, to name what the profile shows

    def once(self) -> None:
        c0, t0 = time.process_time(), time.perf_counter()
        self.run()
        self.wall.append(time.perf_counter() - t0)
        self.cpu.append(time.process_time() - c0)

    @property
    def rate(self) -> float:
        return self.units / statistics.median(self.wall)


def weight_bytes(params) -> int:
    # the tied embedding is read once per token, as the LM head; its lookup row is noise
    return sum(int(np.prod(v.shape)) * jnp.dtype(v.dtype).itemsize
               for v in flatten(params).values())


def prefill_case(params, ids, impl, compiles) -> Case:
    def run(params, ids):
        hidden, cache = backbone(params, CONFIG, ids, cache=init_cache(CONFIG, ids.shape[0]),
                                 impl="bench-free" if impl == "free" else impl)
        return lm_head(params, CONFIG, hidden[:, -1]), cache

    t0 = time.perf_counter()
    compiled = jax.jit(run).lower(params, ids).compile()
    b, l = ids.shape
    compiles[f"prefill {b}x{l} ({impl})"] = time.perf_counter() - t0
    go = lambda: jax.block_until_ready(compiled(params, ids))  # noqa: E731
    return Case(f"prefill {b}x{l}|ours {impl}", go, ids.size, profile=go,
                hlo=compiled.as_text())


def decode_case(params, prompt, label, compiles) -> Case:
    def prepare():
        return prepare_generate(params, CONFIG, prompt, max_new_tokens=NEW, temperature=0.0,
                                eos_token_id=(), dtype=jnp.float32)

    args, static = prepare()
    t0 = time.perf_counter()
    compiled = _generate.lower(*args, **static).compile()
    compiles[f"generate loop ({label} weights)"] = time.perf_counter() - t0

    def run():
        # what `generate` does but compile: its argument preparation (a fresh cache, which
        # the loop donates, and on CPUs the per-layer weight copies) and the loop
        out = compiled(*prepare()[0])
        assert int(np.asarray(out.lengths)[0]) == NEW

    return Case(f"decode|ours {label}", run, NEW, profile=run, hlo=compiled.as_text())


def bandwidth_cases() -> list[Case]:
    x = jnp.ones((GIB // 4,), jnp.float32)
    total = jax.jit(lambda x: jnp.sum(x))
    cores = os.cpu_count() or 1
    parts = np.array_split(np.ones(GIB // 4, np.float32), cores)

    def numpy_threads():
        # NumPy's sum releases the GIL: one thread per core, each reading its part
        threads = [threading.Thread(target=part.sum) for part in parts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    return [Case("bandwidth|jnp.sum", lambda: total(x).block_until_ready(), GIB),
            Case(f"bandwidth|np.sum on {cores} threads", numpy_threads, GIB)]


def torch_cases(rng) -> list[Case]:
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.MambaForCausalLM(transformers.MambaConfig(**CONFIG.to_hf_dict())).eval()
    cases = []
    for b, l in PREFILL:
        ids = torch.as_tensor(rng.integers(0, CONFIG.vocab_size, (b, l)))

        def run(ids=ids):
            with torch.no_grad():
                model(ids, use_cache=True, logits_to_keep=1)

        cases.append(Case(f"prefill {b}x{l}|transformers", run, b * l))
    ids = torch.as_tensor(rng.integers(0, CONFIG.vocab_size, (1, PROMPT)))

    def gen():
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                                 min_new_tokens=NEW, do_sample=False, pad_token_id=0)
        assert out.shape[1] == PROMPT + NEW

    cases.append(Case("decode|transformers", gen, NEW))
    return cases


def compile_forward(layers: int) -> float:
    config = dataclasses.replace(CONFIG, num_hidden_layers=layers)
    params = jax.eval_shape(lambda: init_params(jax.random.key(0), config))
    ids = jax.ShapeDtypeStruct((1, 64), jnp.int32)
    t0 = time.perf_counter()
    jax.jit(lambda p, i: forward(p, config, i)).lower(params, ids).compile()
    return time.perf_counter() - t0


def profile(case: Case, per: float, top: int = 10) -> list[str]:
    """The `top` kinds of operation (result shape, HLO opcode, the JAX operation they
    came from) of one traced run by total time (summed over threads: CPU time), in ms
    per `per` (tokens)."""
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            case.profile()
        data = jax.profiler.ProfileData.from_file(
            glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0])
    what = {}
    for line in case.hlo.splitlines():
        m = re.match(r"\s+(?:ROOT )?%(\S+) = (\S+?)(?:\{[^}]*\})? ([\w-]+)\(", line)
        # leaves only: a loop's or conditional's time is that of the operations inside
        if m and m.group(3) not in ("while", "conditional", "call"):
            source = re.search(r'op_name="([^"]*)"', line)
            what[m.group(1)] = (f"{m.group(2)} {m.group(3)}"
                                + (f" ({source.group(1).split('/')[-1]})" if source else ""))
    total: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in what:  # the compiled program's own operations
                    # one entry per kind (an unrolled loop repeats each operation)
                    total[what[event.name]] += event.duration_ns
                    count[what[event.name]] += 1
    return [f"{ns / 1e6 / per:.2f} ms ({count[k]}x) {k}" for k, ns in total.most_common(top)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-torch", action="store_true", help="skip transformers")
    p.add_argument("--profile", action="store_true",
                   help="also print each case's most expensive compiled operations")
    args = p.parse_args()
    if args.profile:  # before the first computation starts XLA's CPU backend
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_cpu_enable_xprof_traceme=true")
    loads = [os.getloadavg()[0]]
    rng = np.random.default_rng(0)
    params = init_params(jax.random.key(0), CONFIG)
    params_bf16 = init_params(jax.random.key(0), CONFIG, dtype=jnp.bfloat16)
    compiles: dict[str, float] = {}
    cases: list[Case] = []
    for b, l in PREFILL:
        ids = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (b, l)), jnp.int32)
        for impl in IMPLS:
            cases.append(prefill_case(params, ids, impl, compiles))
    prompt = rng.integers(0, CONFIG.vocab_size, (1, PROMPT)).astype(np.int32)
    cases.append(decode_case(params, prompt, "float32", compiles))
    cases.append(decode_case(params_bf16, prompt, "bfloat16", compiles))
    cases += bandwidth_cases()
    if not args.no_torch:
        cases += torch_cases(rng)
    compiles["forward, 2 layers"] = compile_forward(2)
    compiles["forward, 48 layers"] = compile_forward(48)

    for case in cases:  # warm-up
        case.run()
    for _ in range(args.rounds):
        loads.append(os.getloadavg()[0])
        for case in cases:
            case.once()
    loads.append(os.getloadavg()[0])

    by = {c.name: c for c in cases}
    rate = lambda name: by[name].rate  # noqa: E731
    probes = {c.name.split("|")[1]: c.rate for c in cases if c.name.startswith("bandwidth")}
    bw = max(probes.values())
    floors = {"float32": bw / weight_bytes(params), "bfloat16": bw / weight_bytes(params_bf16)}

    print(f"\n## Mamba LM on the CPU ({datetime.date.today()})\n")
    print(f"`benchmarks/bench_lm_cpu.py --rounds {args.rounds}`: {platform.machine()}, "
          f"{os.cpu_count()} cores, jax {jax.__version__}; mamba-130m shape (hidden 768, 24 "
          f"layers, state 16, vocab 50280), random weights; median of {args.rounds} rounds. "
          f"Load average (1 min) {loads[0]:.1f} before, {min(loads[1:-1]):.1f}-"
          f"{max(loads[1:-1]):.1f} during the rounds, {loads[-1]:.1f} after (the machine is "
          "shared).\n")
    print("| tokens/s | ours, recurrent (generate's) | ours, auto (chunked) | ours, reference "
          "| ours, free scan | transformers |")
    print("| --- | --- | --- | --- | --- | --- |")
    for b, l in PREFILL:
        row = [f"{rate(f'prefill {b}x{l}|ours {i}'):.0f}" for i in IMPLS]
        t = by.get(f"prefill {b}x{l}|transformers")
        row.append(f"{t.rate:.0f}" if t else "-")
        print(f"| prefill {b}x{l} | " + " | ".join(row) + " |")
    t = by.get("decode|transformers")
    print(f"| decode 128 after 16, float32 weights | {rate('decode|ours float32'):.1f} "
          f"| | | | {f'{t.rate:.1f}' if t else '-'} |")
    print(f"| decode 128 after 16, bfloat16 weights | {rate('decode|ours bfloat16'):.1f} "
          "| | | | |")
    print("\nRead bandwidth " + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in probes.items())
          + f"; weights {weight_bytes(params) / 1e6:.0f} MB float32, "
          f"{weight_bytes(params_bf16) / 1e6:.0f} MB bfloat16; decoding floor at "
          f"{bw / 1e9:.1f} GB/s: " + ", ".join(f"{k} {v:.1f} tokens/s" for k, v in floors.items())
          + ".")
    print("Compile seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in compiles.items())
          + f"; 48-layer / 2-layer forward: "
          f"{compiles['forward, 48 layers'] / compiles['forward, 2 layers']:.2f}.")
    ratios = []
    for b, l in PREFILL:
        ours = rate(f"prefill {b}x{l}|ours recurrent")
        ref = rate(f"prefill {b}x{l}|ours reference")
        if f"prefill {b}x{l}|transformers" in by:
            ratios.append(f"prefill {b}x{l} {ours / rate(f'prefill {b}x{l}|transformers'):.1f}x "
                          "transformers")
        ratios.append(f"prefill {b}x{l} {ours / ref:.2f}x reference (a free scan: "
                      f"{rate(f'prefill {b}x{l}|ours free') / ref:.2f}x)")
    if "decode|transformers" in by:
        ratios.append(f"decode {rate('decode|ours float32') / rate('decode|transformers'):.1f}x "
                      "transformers")
    for name in ("float32", "bfloat16"):
        ratios.append(f"decode {name} {rate(f'decode|ours {name}') / floors[name]:.0%} of its "
                      "floor")
    print("Ratios: " + "; ".join(ratios) + ".")
    cpu_share = {c.name: statistics.median(c.cpu) / statistics.median(c.wall) for c in cases
                 if not c.name.endswith("transformers")}
    print("CPU seconds per wall second (ours; 2.0 would be both cores busy): "
          + ", ".join(f"{k.replace('|', ' ')} {v:.2f}" for k, v in cpu_share.items()) + ".")
    if args.profile:
        for name, per in (("decode|ours float32", NEW), ("decode|ours bfloat16", NEW),
                          ("prefill 4x256|ours recurrent", 1), ("prefill 4x256|ours reference", 1),
                          ("prefill 4x256|ours free", 1)):
            unit = "CPU ms per generated token" if per > 1 else "CPU ms per run"
            print(f"\nProfile, {name.replace('|', ' ')}, {unit}:\n")
            for row in profile(by[name], per):
                print(f"* {row}")


if __name__ == "__main__":
    main()
