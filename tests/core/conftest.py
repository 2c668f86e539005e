"""Shared pieces of the core op tests: hypothesis profiles, random inputs, error checks.

Hypothesis runs the "core-ci" profile unless MAMBA_HYPOTHESIS_PROFILE names another
("core-thorough" draws many more shapes). The profiles are applied per test via
`CORE_SETTINGS`, never loaded globally, so other test directories keep theirs.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from jaxtyping import TypeCheckError
from mamba_ssm_core import init_params

settings.register_profile(
    "core-ci",
    max_examples=8,
    deadline=None,
    derandomize=True,  # the same shapes on every CI run: a failure reproduces
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "core-thorough",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
CORE_SETTINGS = settings.get_profile(os.environ.get("MAMBA_HYPOTHESIS_PROFILE", "core-ci"))


def scan_inputs(
    rng: np.random.Generator,
    batch: int,
    length: int,
    dim: int,
    state: int,
    groups: int | None = 1,
    *,
    D: bool = True,
    z: bool = True,
    delta_bias: bool = True,
    delta_softplus: bool = True,
    initial_state: bool = True,
    segments: bool = True,
) -> dict[str, np.ndarray | bool | None]:
    """Fresh float32 NumPy inputs of `selective_scan` as keyword arguments.

    groups=None gives ungrouped (batch, length, state) B and C. Without softplus,
    delta and its bias are drawn positive, as a real time step is. Segment ids
    change at random steps and sometimes return to an earlier id (still a reset).
    """
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    bc_shape = (batch, length, state) if groups is None else (batch, length, groups, state)
    if delta_softplus:
        delta = f32(batch, length, dim) - 1.0
        bias = 0.5 * f32(dim)
    else:
        delta = rng.uniform(0.05, 0.6, (batch, length, dim)).astype(np.float32)
        bias = rng.uniform(0.0, 0.2, (dim,)).astype(np.float32)
    seg = None
    if segments:
        changes = rng.random((batch, length)) < 0.15
        seg = (np.cumsum(changes, axis=1) % 3).astype(np.int32)
    return dict(
        u=f32(batch, length, dim),
        delta=delta,
        A=-np.exp(0.5 * f32(dim, state)),
        B=f32(*bc_shape),
        C=f32(*bc_shape),
        D=f32(dim) if D else None,
        z=f32(batch, length, dim) if z else None,
        delta_bias=bias if delta_bias else None,
        delta_softplus=delta_softplus,
        initial_state=f32(batch, dim, state) if initial_state else None,
        segment_ids=seg,
    )


@contextlib.contextmanager
def raises_about(exc: type[Exception], name: str):
    """Expect `exc` naming argument `name`, or jaxtyping's TypeCheckError about `name`.

    With the jaxtyping hook on (pytest's addopts), a shape or dtype that contradicts
    the annotations is refused by jaxtyping before the op's own checks run; its
    message names the parameter as "parameter 'name'". The op's own errors start
    with "<op>: " and name the argument as a word.
    """
    with pytest.raises((exc, TypeCheckError)) as info:
        yield info
    message = str(info.value)
    if isinstance(info.value, TypeCheckError):
        assert f"parameter '{name}'" in message, message
    else:
        assert re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", message), message


def unhooked(fn):
    """`fn` without the jaxtyping/beartype wrapper, so the op's own validation runs."""
    return inspect.unwrap(fn)


_init_params = jax.jit(init_params, static_argnums=1)


def init_params_at(seed: int, config):
    """init_params(jax.random.key(seed), config) as a test's input: one compiled program
    per config, not one per op (the tests of init_params itself call it directly)."""
    return _init_params(jax.random.key(seed), config)
