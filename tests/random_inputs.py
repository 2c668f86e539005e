"""Fresh random test inputs drawn with NumPy: jax.random would compile a sampler per
shape, and compiling is most of the suite's time."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def normal(seed: int, *shapes):
    """Standard-normal float32 arrays of `shapes`, drawn in order from one generator:
    one array for one shape, else a tuple."""
    rng = np.random.default_rng(seed)
    out = tuple(jnp.asarray(rng.standard_normal(s).astype(np.float32)) for s in shapes)
    return out[0] if len(out) == 1 else out


def token_ids(seed: int, shape, vocab_size: int, low: int = 0):
    """int32 token ids uniform in [low, vocab_size)."""
    ids = np.random.default_rng(seed).integers(low, vocab_size, shape)
    return jnp.asarray(ids.astype(np.int32))
