"""`MambaResidualBlock`: RMSNorm + mixer, over `mamba_ssm_core.residual_block`."""

from __future__ import annotations

import typing
from typing import Any

import jax.numpy as jnp
import keras
from jax import Array
from jaxtyping import Float
from mamba_ssm_core import MambaConfig, MixerState, init_layer_params, layer_shapes, residual_block

from . import _config
from ._config import MaskLike
from ._mixer import MambaMixer
from ._weights import CoreWeights, fresh


@keras.saving.register_keras_serializable(package="mamba_keras")
class MambaResidualBlock(CoreWeights, keras.layers.Layer):
    """One Mamba block in the original's fused add-norm form (`mamba_ssm_core.residual_block`):
    residual = residual + hidden; hidden = mixer(RMSNorm(residual)).

    Call: (hidden, residual=None) -> (hidden, residual), each (batch, length, H).
    hidden is the previous block's mixer output (or the embeddings) and comes back in
    the compute dtype; residual is the residual stream so far (None before the first
    block) and comes back float32 when residual_in_fp32, else in the compute dtype.
    After the last block a model's output is RMSNorm_f(residual + hidden).
    `mask` (batch, length): true on real tokens.

    Arguments: those of `MambaMixer`, plus layer_norm_epsilon and residual_in_fp32.
    Weights: norm.weight (H,) and the sublayer `mixer`'s.
    """

    # Keras reads this signature with inspect.getfullargspec, which a type-checking
    # wrapper (jaxtyping's import hook) would hide.
    @typing.no_type_check
    def __init__(
        self,
        hidden_size: int,
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
        num_hidden_layers: int = 1,
        impl: str = "auto",
        seed: int | None = None,
        **kwargs: Any,
    ):
        # The inputs are cast here, not by Keras: a float32 residual must stay float32
        # under a mixed-precision policy.
        super().__init__(**{**kwargs, "autocast": False})
        self._config = _config.layer_config(**_config.pick(locals(), _config.BLOCK_ARGS))
        _config.set_args(self, self._config, _config.BLOCK_ARGS)
        self.impl = _config.check_impl(impl)
        self.seed = seed
        self.supports_masking = True
        self._init_core_weights()
        self.mixer = MambaMixer.from_mamba_config(
            self._config, impl=impl, dtype=self.dtype_policy, name="mixer")

    @classmethod
    def from_mamba_config(cls, config: MambaConfig, **kwargs: Any) -> MambaResidualBlock:
        """A block with the sizes of `config`; kwargs as for the constructor."""
        return cls(**_config.config_fields(config, _config.BLOCK_ARGS), **kwargs)

    @property
    def mamba_config(self) -> MambaConfig:
        """The `MambaConfig` the core is called with (`MambaConfig.for_mixer`: no vocabulary)."""
        return self._config

    def _expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return layer_shapes(self._config)

    def _build_input_shape(self) -> tuple[Any, ...]:
        return (None, None, self.hidden_size)

    def _core_tree(self, get: Any, stack: Any = None) -> dict[str, Any]:
        return {"norm": {"weight": get(self._core_vars["norm.weight"])},
                "mixer": self.mixer._core_tree(get)}

    def build(self, hidden_shape: Any) -> None:
        source = self._take_pending() or fresh(init_layer_params, self._config, self.seed)
        self._add_core_weight("norm.weight", source)
        self.mixer._set_pending(source.sub(lambda p: p["mixer"]))
        self.mixer.build(hidden_shape)

    def _residual_dtype(self) -> str:
        return "float32" if self.residual_in_fp32 else self.compute_dtype

    def _cast(self, hidden: Any, residual: Any) -> tuple[Any, Any]:
        hidden = jnp.asarray(hidden).astype(self.compute_dtype)
        if residual is not None:
            residual = jnp.asarray(residual).astype(self._residual_dtype())
        return hidden, residual

    def call(
        self,
        hidden: Float[Array, "batch length hidden"],
        residual: Float[Array, "batch length hidden"] | None = None,
        mask: MaskLike | None = None,
    ) -> tuple[Float[Array, "batch length hidden"], Float[Array, "batch length hidden"]]:
        hidden, residual = self._cast(hidden, residual)
        out, residual, _ = residual_block(self.to_params(), self._config, hidden, residual,
                                          mask=mask, impl=self.impl)
        return out, residual

    def call_with_state(
        self,
        hidden: Float[Array, "batch length hidden"],
        residual: Float[Array, "batch length hidden"] | None,
        state: MixerState,
        mask: MaskLike | None = None,
    ) -> tuple[Float[Array, "batch length hidden"], Float[Array, "batch length hidden"],
               MixerState]:
        """As `call`, continuing the mixer from `state` (see `MambaMixer.call_with_state`):
        returns (hidden, residual, the new state)."""
        self._ensure_built()
        hidden, residual = self._cast(hidden, residual)
        return residual_block(self.to_params(), self._config, hidden, residual, state=state,
                              mask=mask, impl=self.impl)

    def init_state(self, batch_size: int) -> MixerState:
        """A zero decoding state for the mixer (see `MambaMixer.init_state`)."""
        return self.mixer.init_state(batch_size)

    def compute_output_shape(self, hidden_shape: Any, residual_shape: Any = None) -> Any:
        return tuple(hidden_shape), tuple(hidden_shape)

    def compute_output_spec(self, hidden: Any, residual: Any = None, mask: Any = None) -> Any:
        shape, _ = self.compute_output_shape(hidden.shape)
        return (keras.KerasTensor(shape, dtype=self.compute_dtype),
                keras.KerasTensor(shape, dtype=self._residual_dtype()))

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({name: getattr(self, name) for name in _config.BLOCK_ARGS})
        config.update({"impl": self.impl, "seed": self.seed})
        return config
