"""Strict JAX settings for every test in the tree.

Eight virtual CPU devices so sharded code runs in tests (a (2, 2, 2) mesh);
strict dtype promotion and rank promotion that raises, so an accidental upcast
or broadcast fails.
jaxtyping + beartype checking of the packages is switched on by pytest's addopts
(`--jaxtyping-packages`, pyproject.toml).
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
