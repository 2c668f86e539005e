"""Can XLA:CPU read bfloat16 weights faster than float32 ones in a decoding loop?

The LM head of mamba-130m, (50280, 768), times a vector, inside a `lax.fori_loop` whose
weights pass through an optimisation barrier every iteration (as a decoding loop's
weights would if XLA could not hoist their conversion out of it), in the forms XLA
could run with float32 arithmetic on bfloat16 weights:

* float32 weights, one row (the float32 baseline);
* bfloat16 weights converted to float32 in the loop, then that dot;
* bfloat16 weights with the float32 vector split exactly into three bfloat16 rows
  (x = a + b + c), a bfloat16 x bfloat16 -> float32 dot of three rows, the rows summed:
  float32-exact products, float32 accumulation;
* bfloat16 weights converted, multiplied and summed along each row in one fused reduce
  (no dot, no converted copy of the weights);
* for scale: bfloat16 dots of 1 and 8 rows of a bfloat16 vector (not float32 arithmetic).

Each iteration's vector depends on the previous result, so nothing is hoisted. Rounds
run the cases in turn; the table gives medians, ms per iteration and GB/s of weight
bytes, next to a jitted jnp.sum over 1 GiB (the read bandwidth).

Run: `hatch run python benchmarks/bench_bf16_matvec_cpu.py [--rounds N]`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

V, H, STEPS = 50280, 768, 20
F32, BF16 = jnp.float32, jnp.bfloat16


def split3(x):
    """float32 x as three bfloat16 rows whose float32 sum is x exactly."""
    a = x.astype(BF16)
    r = x - a.astype(F32)
    b = r.astype(BF16)
    return jnp.stack([a, b, (r - b.astype(F32)).astype(BF16)])


FORMS = {
    "float32 weights, 1 row": lambda x, w: w @ x,
    "bfloat16 weights, converted in the loop, 1 row": lambda x, w: w.astype(F32) @ x,
    "bfloat16 weights, x split in 3 bfloat16 rows": lambda x, w: jnp.sum(
        jnp.einsum("mh,vh->mv", split3(x), w, preferred_element_type=F32), axis=0),
    "bfloat16 weights, fused convert-multiply-reduce, 1 row": lambda x, w: jnp.sum(
        w.astype(F32) * x[None, :], axis=1),
    "bfloat16 weights and x, 1 row (not float32)": lambda x, w: jnp.einsum(
        "h,vh->v", x.astype(BF16), w, preferred_element_type=F32),
    "bfloat16 weights and x, 8 rows (not float32)": lambda x, w: jnp.einsum(
        "mh,vh->mv", jnp.broadcast_to(x.astype(BF16), (8, H)), w,
        preferred_element_type=F32)[0],
}


def loop(form):
    def run(x, w):
        def body(_, carry):
            x, w = carry
            w = jax.lax.optimization_barrier(w)
            return x + 1e-6 * form(x, w)[:H], w

        return jax.lax.fori_loop(0, STEPS, body, (x, w))[0]

    return jax.jit(run)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    w32 = jax.random.normal(jax.random.key(0), (V, H), F32)
    weights = {F32: w32, BF16: w32.astype(BF16)}
    x = jax.random.normal(jax.random.key(1), (H,), F32)
    cases = {}
    for name, form in FORMS.items():
        w = weights[F32] if name.startswith("float32") else weights[BF16]
        exact = np.asarray(w, np.float64) @ np.asarray(x, np.float64)
        err = np.linalg.norm(np.asarray(jax.jit(form)(x, w)) - exact) / np.linalg.norm(exact)
        f = loop(form).lower(x, w).compile()
        cases[name] = (lambda f=f, w=w: f(x, w).block_until_ready(), w.nbytes, err, STEPS)
    big = jnp.ones((1024**3 // 4,), F32)
    total = jax.jit(jnp.sum)
    cases["jnp.sum over 1 GiB (the read bandwidth)"] = (
        lambda: total(big).block_until_ready(), big.nbytes, None, 1)
    loads = [os.getloadavg()[0]]
    times = {k: [] for k in cases}
    for run, *_ in cases.values():
        run()
    for _ in range(args.rounds):
        for k, (run, _, _, steps) in cases.items():
            t0 = time.perf_counter()
            run()
            times[k].append((time.perf_counter() - t0) / steps)
    loads.append(os.getloadavg()[0])
    print(f"\n`benchmarks/bench_bf16_matvec_cpu.py --rounds {args.rounds}`: jax {jax.__version__},"
          f" {os.cpu_count()} cores; ({V}, {H}) weights; medians of {args.rounds} rounds; load "
          f"average {loads[0]:.1f} before, {loads[1]:.1f} after.\n")
    print("| form | ms per matvec | GB/s of weights | rel. error vs float64 |")
    print("| --- | --- | --- | --- |")
    for k, (_, nbytes, err, _) in cases.items():
        m = statistics.median(times[k])
        e = "" if err is None else f"{err:.1e}"
        print(f"| {k} | {m * 1e3:.2f} | {nbytes / m / 1e9:.1f} | {e} |")


if __name__ == "__main__":
    main()
