"""Mamba as Keras 3 layers and models over the mamba-ssm-core functional model.

Needs Keras's JAX backend (KERAS_BACKEND=jax); importing this package with another
backend raises an ImportError that says so. The math is `mamba_ssm_core`'s: each
layer keeps its weights under the core's parameter names and layouts and calls the
core's functions with them.
"""

from mamba_ssm_core import GenerationOutput as GenerationOutput
from mamba_ssm_core import MambaCache as MambaCache
from mamba_ssm_core import MambaConfig as MambaConfig
from mamba_ssm_core import MixerState as MixerState

from . import _backend  # noqa: F401  (raises unless Keras runs on JAX)
from ._backbone import MambaBackbone as MambaBackbone
from ._block import MambaResidualBlock as MambaResidualBlock
from ._causal_lm import MambaCausalLM as MambaCausalLM
from ._mixer import MambaMixer as MambaMixer

__version__ = "0.1.0"

__all__ = [
    "GenerationOutput",
    "MambaBackbone",
    "MambaCache",
    "MambaCausalLM",
    "MambaConfig",
    "MambaMixer",
    "MambaResidualBlock",
    "MixerState",
]
