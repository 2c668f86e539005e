"""The keyword options of `MambaMixer` and `ResidualBlock` <-> `MambaConfig`.

Their options are `MambaConfig` fields (`MambaConfig.for_mixer` has the defaults),
except the depth: `num_layers`, the number of layers of the model the layer is
initialised for (out_proj starts divided by its square root; 1 for no rescale).
"""

from __future__ import annotations

from typing import Any, ClassVar

from mamba_ssm_core import MambaConfig

from ._convert import CoreModule

# num_layers stands for rescale_prenorm_residual and num_hidden_layers together.
MIXER_OPTIONS = tuple(f for f in MambaConfig.MIXER_FIELDS if f != "rescale_prenorm_residual")
BLOCK_OPTIONS = (*MIXER_OPTIONS, "layer_norm_epsilon", "residual_in_fp32")


def layer_config(hidden_size: int, *, num_layers: int, **options: Any) -> MambaConfig:
    """The config of one layer of `hidden_size` (options: BLOCK_OPTIONS, time_step_rank
    None for ceil(hidden_size / 16)), initialised for a `num_layers`-layer model."""
    return MambaConfig.for_mixer(hidden_size, num_hidden_layers=num_layers, **options)


def layer_options(config: MambaConfig, names: tuple[str, ...]) -> dict[str, Any]:
    """The keyword options `names` and num_layers that rebuild `config`'s layers."""
    options = {k: getattr(config, k) for k in names}
    options["num_layers"] = config.num_hidden_layers if config.rescale_prenorm_residual else 1
    return options


class LayerModule(CoreModule):
    """Base of the modules built from sizes (hidden_size positional, `_options` keyword)
    rather than from a `MambaConfig`."""

    _options: ClassVar[tuple[str, ...]] = MIXER_OPTIONS

    @classmethod
    def _sizes(cls, config: MambaConfig) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """hidden_size and the `_options` of `config`'s layers (initialised for its depth)."""
        return (config.hidden_size,), layer_options(config, cls._options)
