"""Constructor arguments of the layers <-> `mamba_ssm_core.MambaConfig`.

The layers take the core's field names as keyword arguments, with the defaults of
the original Mamba (`mamba_simple.Mamba`); `MambaConfig` has no defaults for its
architecture fields, so the sizes a layer does not use get neutral placeholders.
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Any

from mamba_ssm_core import MambaConfig

# The mixer's arguments (MambaConfig field names) and their defaults.
MIXER_DEFAULTS: dict[str, Any] = {
    "state_size": 16,
    "expand": 2,
    "conv_kernel": 4,
    "time_step_rank": None,  # None: ceil(hidden_size / 16), the official "auto"
    "use_bias": False,
    "use_conv_bias": True,
    # initialisation only
    "time_step_min": 0.001,
    "time_step_max": 0.1,
    "time_step_floor": 1e-4,
    "time_step_scale": 1.0,
    "time_step_init_scheme": "random",
    "rescale_prenorm_residual": True,
}
# What a residual block adds.
BLOCK_DEFAULTS: dict[str, Any] = {
    **MIXER_DEFAULTS,
    "layer_norm_epsilon": 1e-5,
    "residual_in_fp32": True,
}
# Placeholders for the MambaConfig fields a layer does not read.
_PLACEHOLDERS: dict[str, Any] = {
    "vocab_size": 1,
    "num_hidden_layers": 1,
    "layer_norm_epsilon": 1e-5,
    "residual_in_fp32": True,
    "tie_word_embeddings": True,
}


def time_step_rank(hidden_size: int, rank: int | None) -> int:
    """The time-step rank, with None for the official default ceil(hidden_size / 16)."""
    return math.ceil(hidden_size / 16) if rank is None else rank


def mamba_config(**fields: Any) -> MambaConfig:
    """A MambaConfig from layer arguments; fields a layer does not use get placeholders."""
    fields = {**_PLACEHOLDERS, **fields}
    fields["time_step_rank"] = time_step_rank(fields["hidden_size"], fields["time_step_rank"])
    return MambaConfig(**fields)


def config_fields(config: MambaConfig, names: Any) -> dict[str, Any]:
    """The given fields of `config`, as layer arguments."""
    return {name: getattr(config, name) for name in names}


def fields_of(config: MambaConfig) -> dict[str, Any]:
    """Every field of `config`."""
    return dataclasses.asdict(config)


def check_impl(impl: Any) -> str:
    """The scan implementation must be a name, so that get_config serialises it."""
    if not isinstance(impl, str):
        raise TypeError(
            f"impl must be the name of a selective-scan implementation (a str such as "
            f"'auto' or 'chunked'), got {type(impl).__name__}; register a configured "
            f"implementation under a name with mamba_ssm_core.register_implementation")
    return impl


def draw_seed(seed: int | None) -> int:
    """`seed`, or when it is None a fresh one from Python's `random`, as Keras's own
    initializers draw theirs (reproducible after keras.utils.set_random_seed; unlike
    Keras's seed generator, usable while Keras traces a model to build it)."""
    return random.randint(1, 10**9) if seed is None else seed
