"""Constructor arguments of the layers <-> `mamba_ssm_core.MambaConfig`.

The layers take the core's field names as arguments, with the defaults of the original
Mamba layer (`MambaConfig.for_mixer`'s); `time_step_rank=None` is its "auto". The
arrays they accept, and how they reach the core.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import numpy as np
from jax import Array
from jaxtyping import Bool, Int
from mamba_ssm_core import MambaConfig

# Each layer's constructor arguments that are MambaConfig fields, in get_config's order.
MIXER_ARGS = ("hidden_size", *MambaConfig.MIXER_FIELDS, "num_hidden_layers")
BLOCK_ARGS = (*MIXER_ARGS, "layer_norm_epsilon", "residual_in_fp32")
BACKBONE_ARGS = ("vocab_size", *BLOCK_ARGS)

IdsLike = Int[Array, "batch length"] | Int[np.ndarray, "batch length"]
MaskLike = (Bool[Array, "batch length"] | Int[Array, "batch length"]
            | Bool[np.ndarray, "batch length"] | Int[np.ndarray, "batch length"])


def pick(args: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """The constructor arguments `names` out of its `locals()` (Keras needs each layer's
    signature spelled out, so the config is built from it rather than from **kwargs)."""
    return {name: args[name] for name in names}


def layer_config(vocab_size: int = 1, **args: Any) -> MambaConfig:
    """The MambaConfig of a layer's constructor arguments (MambaConfig field names; a
    backbone's vocab_size, else a one-token vocabulary): tied, so it asks for no head."""
    return dataclasses.replace(MambaConfig.for_mixer(**args), vocab_size=vocab_size)


def set_args(layer: Any, config: MambaConfig, names: tuple[str, ...]) -> None:
    """Keep the constructor arguments `names` as attributes, as `config` resolved them
    (time_step_rank None: the int it stands for)."""
    for name in names:
        setattr(layer, name, getattr(config, name))


def config_fields(config: MambaConfig, names: Any) -> dict[str, Any]:
    """The given fields of `config`, as layer arguments."""
    return {name: getattr(config, name) for name in names}


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
