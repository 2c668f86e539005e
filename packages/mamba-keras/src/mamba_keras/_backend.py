"""Keras 3 with the JAX backend, or a clear error naming KERAS_BACKEND."""

from __future__ import annotations

import os

_HOW = ("set the environment variable KERAS_BACKEND=jax before Keras is first imported "
        "(e.g. os.environ['KERAS_BACKEND'] = 'jax' at the top of your program)")

try:
    import keras
except ImportError as err:  # the configured backend's framework is missing
    raise ImportError(
        f"mamba_keras runs on Keras 3's JAX backend, but `import keras` failed with "
        f"KERAS_BACKEND={os.environ.get('KERAS_BACKEND')!r}: {err}. To use mamba_keras, "
        f"{_HOW}.") from err

if keras.backend.backend() != "jax":
    raise ImportError(
        f"mamba_keras runs on Keras 3's JAX backend only (the math is mamba_ssm_core's JAX "
        f"code), but Keras is using the {keras.backend.backend()!r} backend "
        f"(KERAS_BACKEND={os.environ.get('KERAS_BACKEND')!r}). To use mamba_keras, {_HOW}.")
