"""`MambaBackbone`: embedding, residual blocks, final RMSNorm, over `mamba_ssm_core.backbone`."""

from __future__ import annotations

import typing
from typing import Any

import jax
import keras
from jax import Array
from jaxtyping import Float
from mamba_ssm_core import (
    MambaCache,
    MambaConfig,
    backbone,
    init_cache,
    init_params,
    param_shapes,
)

from . import _config
from ._block import MambaResidualBlock
from ._config import IdsLike, MaskLike
from ._weights import CoreWeights, fresh, stack_arrays


@keras.saving.register_keras_serializable(package="mamba_keras")
class MambaBackbone(CoreWeights, keras.Model):
    """The Mamba backbone (`mamba_ssm_core.backbone`): token embedding, the residual
    blocks, the final RMSNorm. Holds no LM head (see `MambaCausalLM`).

    Call: token_ids (batch, length) int -> hidden states (batch, length, H) in the
    compute dtype. padding_mask (batch, length), true on real tokens, is for left
    padding: padded steps leave the state unchanged.

    Arguments: vocab_size, hidden_size, num_hidden_layers, then those of
    `MambaResidualBlock` with the original Mamba's defaults. seed: an int for a
    reproducible initialisation (the core's `init_params`); None draws one as Keras's
    initializers do.

    Weights: embeddings.weight (V, H), norm_f.weight (H,), and `residual_blocks`, a list
    of `MambaResidualBlock` layers (`residual_block_{i}`). The core runs the blocks as
    one `lax.scan` over their weights stacked on a leading axis.
    """

    # Keras reads this signature with inspect.getfullargspec, which a type-checking
    # wrapper (jaxtyping's import hook) would hide.
    @typing.no_type_check
    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        num_hidden_layers: int,
        state_size: int = 16,
        expand: int = 2,
        conv_kernel: int = 4,
        time_step_rank: int | None = None,
        use_bias: bool = False,
        use_conv_bias: bool = True,
        layer_norm_epsilon: float = 1e-5,
        residual_in_fp32: bool = True,
        time_step_min: float = 0.001,
        time_step_max: float = 0.1,
        time_step_floor: float = 1e-4,
        time_step_scale: float = 1.0,
        time_step_init_scheme: str = "random",
        rescale_prenorm_residual: bool = True,
        impl: str = "auto",
        seed: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        # Tied: the backbone holds no head (MambaCausalLM adds one when untied).
        self._config = _config.layer_config(**_config.pick(locals(), _config.BACKBONE_ARGS))
        _config.set_args(self, self._config, _config.BACKBONE_ARGS)
        self.impl = _config.check_impl(impl)
        self.seed = seed
        self._init_core_weights()
        self.residual_blocks = [
            MambaResidualBlock.from_mamba_config(
                self._config, impl=impl, dtype=self.dtype_policy, name=f"residual_block_{i}")
            for i in range(num_hidden_layers)
        ]

    @classmethod
    def from_mamba_config(cls, config: MambaConfig, **kwargs: Any) -> MambaBackbone:
        """A backbone with the sizes of `config`; kwargs as for the constructor."""
        return cls(**_config.config_fields(config, _config.BACKBONE_ARGS), **kwargs)

    @property
    def mamba_config(self) -> MambaConfig:
        """The `MambaConfig` the core is called with (tied: the backbone has no head)."""
        return self._config

    def _expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {p: s for p, s in param_shapes(self._config).items() if p.startswith("backbone.")}

    def _build_input_shape(self) -> tuple[Any, ...]:
        return (None, None)

    def _core_tree(self, get: Any, stack: Any = stack_arrays) -> dict[str, Any]:
        blocks = [block._core_tree(get) for block in self.residual_blocks]
        return {"backbone": {
            "embeddings": {"weight": get(self._core_vars["embeddings.weight"])},
            # the core's layout: every block's weights stacked on a leading layer axis
            "layers": jax.tree.map(stack, *blocks),
            "norm_f": {"weight": get(self._core_vars["norm_f.weight"])},
        }}

    def build(self, input_shape: Any = None) -> None:
        source = self._take_pending() or fresh(init_params, self._config, self.seed)
        self._add_core_weight("embeddings.weight", source, "backbone.embeddings.weight")
        for i, block in enumerate(self.residual_blocks):
            block._set_pending(source.sub(
                lambda p, i=i: jax.tree.map(lambda a: a[i], p["backbone"]["layers"])))
            block.build((None, None, self.hidden_size))
        self._add_core_weight("norm_f.weight", source, "backbone.norm_f.weight")

    def call(
        self, token_ids: IdsLike, padding_mask: MaskLike | None = None
    ) -> Float[Array, "batch length hidden"]:
        return backbone(self.to_params(), self._config, token_ids,
                        mask=padding_mask, impl=self.impl,
                        dtype=self.compute_dtype)

    def call_with_cache(
        self, token_ids: IdsLike, cache: MambaCache, padding_mask: MaskLike | None = None
    ) -> tuple[Float[Array, "batch length hidden"], MambaCache]:
        """Continue from `cache` (from `init_cache` or a previous call): returns (hidden
        states, the updated cache). Many tokens run the parallel scan from the cached
        state (prefill), one token the O(1) recurrent update."""
        self._ensure_built()
        return backbone(self.to_params(), self._config, token_ids, cache=cache,
                        mask=padding_mask, impl=self.impl,
                        dtype=self.compute_dtype)

    def init_cache(self, batch_size: int) -> MambaCache:
        """A zero decoding cache: conv_state (layers, batch, K-1, I) in the compute dtype,
        ssm_state (layers, batch, I, N) float32."""
        return init_cache(self._config, batch_size, self.compute_dtype)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return (*tuple(input_shape), self.hidden_size)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({name: getattr(self, name) for name in _config.BACKBONE_ARGS})
        config.update({"impl": self.impl, "seed": self.seed})
        return config

