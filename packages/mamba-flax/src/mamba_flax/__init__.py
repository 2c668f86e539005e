"""Mamba as Flax NNX modules over the mamba-ssm-core functional model.

Sizes positional, options keyword-only, `rngs: nnx.Rngs` required, `dtype` (compute)
separate from `param_dtype` (storage), any leading batch axes, channels-last. The math is
the core's: each call reads the module's nnx.Param values in the core's layout and calls
`mamba_ssm_core` (mixer, residual_block, backbone, forward, decode_step, generate).
"""

from mamba_ssm_core import GenerationOutput as GenerationOutput
from mamba_ssm_core import MambaCache as MambaCache
from mamba_ssm_core import MambaConfig as MambaConfig
from mamba_ssm_core import ParamsError as ParamsError

from ._block import ResidualBlock as ResidualBlock
from ._mixer import MambaMixer as MambaMixer
from ._model import MambaLM as MambaLM
from ._model import MambaModel as MambaModel

__version__ = "0.1.0"

__all__ = [
    "GenerationOutput",
    "MambaCache",
    "MambaConfig",
    "MambaLM",
    "MambaMixer",
    "MambaModel",
    "ParamsError",
    "ResidualBlock",
]
