"""The `MambaConfig` of a mixer or block built from sizes, and back; fresh layer parameters."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from mamba_ssm_core import MambaConfig, init_params, layer_params

# Keyword options of MambaMixer (and ResidualBlock) that are MambaConfig fields, with the
# official defaults (state-spaces `Mamba`).
MIXER_DEFAULTS: dict[str, Any] = {
    "state_size": 16,
    "expand": 2,
    "conv_kernel": 4,
    "time_step_rank": None,  # ceil(hidden_size / 16), the official "auto"
    "use_bias": False,
    "use_conv_bias": True,
    "time_step_min": 0.001,
    "time_step_max": 0.1,
    "time_step_floor": 1e-4,
    "time_step_scale": 1.0,
    "time_step_init_scheme": "random",
}
BLOCK_DEFAULTS: dict[str, Any] = {
    **MIXER_DEFAULTS,
    "layer_norm_epsilon": 1e-5,
    "residual_in_fp32": True,
}


def layer_config(hidden_size: int, *, num_layers: int, **options: Any) -> MambaConfig:
    """The config of one layer of `hidden_size` (options: BLOCK_DEFAULTS' keys), initialised
    for a model of `num_layers` layers (out_proj divided by sqrt(num_layers))."""
    o = {**BLOCK_DEFAULTS, **options}
    if o["time_step_rank"] is None:
        o["time_step_rank"] = math.ceil(hidden_size / 16)
    return MambaConfig(vocab_size=1, hidden_size=hidden_size, num_hidden_layers=num_layers,
                       tie_word_embeddings=True, rescale_prenorm_residual=True, **o)


def layer_options(config: MambaConfig, keys: dict[str, Any]) -> dict[str, Any]:
    """The keyword options (the keys of `keys`) and num_layers that rebuild `config`'s layer."""
    options = {k: getattr(config, k) for k in keys}
    options["num_layers"] = config.num_hidden_layers if config.rescale_prenorm_residual else 1
    return options


def fresh_layer(config: MambaConfig, key: Any, dtype: Any) -> dict[str, Any]:
    """One layer's parameters {"norm", "mixer"} with the official initialisation
    (`mamba_ssm_core.init_params`) of a layer in a config.num_hidden_layers-layer model."""
    # init_params draws a whole model; a one-token vocabulary keeps its embedding negligible.
    small = dataclasses.replace(config, vocab_size=1)
    return layer_params(init_params(key, small, dtype=dtype), 0)
