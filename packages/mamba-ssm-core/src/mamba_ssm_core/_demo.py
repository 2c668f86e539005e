"""A short demo of the selective-scan op: every implementation on one random input.

Run with `python -m mamba_ssm_core._demo`.
"""

import time

import jax
import jax.numpy as jnp

from . import ScanSpec, implementations, selective_scan
from .scan import _REGISTRY


def main() -> None:
    keys = jax.random.split(jax.random.key(0), 6)
    batch, length, dim, state = 2, 512, 256, 16
    u = jax.random.normal(keys[0], (batch, length, dim))
    delta = jax.random.normal(keys[1], (batch, length, dim))
    A = -jnp.exp(jax.random.normal(keys[2], (dim, state)))
    B = jax.random.normal(keys[3], (batch, length, state))
    C = jax.random.normal(keys[4], (batch, length, state))
    D = jnp.ones((dim,))
    print(f"selective_scan on {jax.default_backend()}: batch {batch}, length {length}, "
          f"dim {dim}, state {state}, float32")
    spec = ScanSpec(batch, length, dim, state, 1, "float32", False, False)
    ref = None
    for name in implementations():
        why_not = _REGISTRY[name].unsupported(spec, jax.default_backend())
        if why_not is not None:
            print(f"  {name:12s} not run here: {why_not}")
            continue
        fn = jax.jit(lambda *a, name=name: selective_scan(*a, delta_softplus=True, impl=name))
        y = fn(u, delta, A, B, C, D).block_until_ready()
        t0 = time.perf_counter()
        y = fn(u, delta, A, B, C, D).block_until_ready()
        ms = (time.perf_counter() - t0) * 1e3
        ref = y if ref is None else ref
        err = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
        print(f"  {name:12s} {ms:8.2f} ms   rel. err vs the first: {err:.1e}")


if __name__ == "__main__":
    main()
