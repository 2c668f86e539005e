"""Strict JAX settings for every test in the tree.

Eight virtual CPU devices so sharded code runs in tests (a (2, 2, 2) mesh);
strict dtype promotion and rank promotion that raises, so an accidental upcast
or broadcast fails.

jaxtyping + beartype checking of the packages is switched on by pytest's addopts
(`--jaxtyping-packages`, pyproject.toml).

XLA:CPU's backend (LLVM) optimisation at level 0: nearly all of the suite's time is
compiling small programs that then run once on tiny inputs, and level 0 compiles them
about twice as fast. The HLO, and so every check, is the same; values differ from the
default level's by float32 rounding only. Set XLA_FLAGS=--xla_backend_optimization_level=2
to run the suite as users' programs compile. The one long-running evaluation (the
bundled model's recorded bits per byte) runs in a child process at the default level.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()

import jax  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
