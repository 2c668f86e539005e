"""Mamba as Equinox modules over the mamba-ssm-core functional model.

Every module takes one example and is `jax.vmap`-ed over a batch; the PRNG key is
keyword-only; the config and dtypes are static fields. The math is the core's:
each call converts the module's arrays to the core's parameter pytree (no copies)
and calls `mamba_ssm_core.model`.
"""

from mamba_ssm_core import GenerationOutput as GenerationOutput
from mamba_ssm_core import MambaCache as MambaCache
from mamba_ssm_core import MambaConfig as MambaConfig
from mamba_ssm_core import MixerState as MixerState

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
    "MixerState",
    "ResidualBlock",
]
