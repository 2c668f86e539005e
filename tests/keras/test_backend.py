"""Importing mamba_keras with a Keras backend other than JAX is a clear error."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("backend", ["numpy", "tensorflow"])
def test_other_backend_names_keras_backend(backend):
    env = {**os.environ, "KERAS_BACKEND": backend}
    proc = subprocess.run([sys.executable, "-c", "import mamba_keras"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: mamba_keras runs on Keras 3's JAX backend"), last
    assert f"KERAS_BACKEND={backend!r}" in last and "KERAS_BACKEND=jax" in last, last
