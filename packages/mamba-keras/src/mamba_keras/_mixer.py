"""`MambaMixer`: one Mamba mixer as a Keras layer over `mamba_ssm_core.mixer`."""

from __future__ import annotations

import typing
from typing import Any

import jax.numpy as jnp
import keras
from jax import Array
from jaxtyping import Float
from mamba_ssm_core import MambaConfig, MixerState, init_layer_params, layer_shapes, mixer

from . import _config
from ._config import MaskLike
from ._weights import CoreWeights, fresh


@keras.saving.register_keras_serializable(package="mamba_keras")
class MambaMixer(CoreWeights, keras.layers.Layer):
    """One Mamba mixer: in_proj, causal depthwise conv + SiLU, the selective scan gated
    by SiLU(z), out_proj (`mamba_ssm_core.mixer`, which holds all the math).

    Call: x (batch, length, hidden_size) -> (batch, length, hidden_size) in the compute
    dtype; `mask` (batch, length), true on real tokens (Keras masking; padded steps
    leave the SSM state unchanged), is passed through.

    Arguments are `MambaConfig`'s field names with the original Mamba's defaults:
    hidden_size (H), state_size (N), expand (I = expand * H), conv_kernel (K),
    time_step_rank (R; None for ceil(H / 16)), use_bias (in_proj, out_proj),
    use_conv_bias. Initialisation only: time_step_min/max/floor/scale/init_scheme,
    rescale_prenorm_residual and num_hidden_layers (the depth of the model the mixer
    sits in: out_proj starts divided by its square root). impl: the name of the
    selective-scan implementation. seed: an int for a reproducible initialisation;
    None draws one as Keras's initializers do (reproducible after
    keras.utils.set_random_seed).

    Weights, named and laid out as the core's parameters: in_proj.weight (2I, H),
    conv1d.weight (I, 1, K), x_proj.weight (R + 2N, I), dt_proj.weight (I, R),
    dt_proj.bias (I,), A_log (I, N), D (I,), out_proj.weight (H, I), and the biases.
    A_log, D and dt_proj.bias are float32 whatever the dtype policy.
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
        super().__init__(**kwargs)
        self._config = _config.layer_config(**_config.pick(locals(), _config.MIXER_ARGS))
        _config.set_args(self, self._config, _config.MIXER_ARGS)
        self.impl = _config.check_impl(impl)
        self.seed = seed
        self.supports_masking = True
        self._init_core_weights()

    @classmethod
    def from_mamba_config(cls, config: MambaConfig, **kwargs: Any) -> MambaMixer:
        """A mixer with the sizes of `config`; kwargs (impl, seed, name, dtype, ...) as
        for the constructor."""
        return cls(**_config.config_fields(config, _config.MIXER_ARGS), **kwargs)

    @property
    def mamba_config(self) -> MambaConfig:
        """The `MambaConfig` the core is called with (`MambaConfig.for_mixer`: no vocabulary)."""
        return self._config

    def _expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {p[len("mixer."):]: s for p, s in layer_shapes(self._config).items()
                if p.startswith("mixer.")}

    def _build_input_shape(self) -> tuple[Any, ...]:
        return (None, None, self.hidden_size)

    def build(self, input_shape: Any) -> None:
        source = self._take_pending() or fresh(init_layer_params, self._config, self.seed).sub(
            lambda p: p["mixer"])
        for path in self._expected_shapes():  # a fixed order: .keras files store by index
            self._add_core_weight(path, source)

    def call(
        self, inputs: Float[Array, "batch length hidden"], mask: MaskLike | None = None
    ) -> Float[Array, "batch length hidden"]:
        y, _ = mixer(self.to_params(), self._config, inputs, mask=mask,
                     impl=self.impl)
        return y

    def call_with_state(
        self,
        inputs: Float[Array, "batch length hidden"],
        state: MixerState,
        mask: MaskLike | None = None,
    ) -> tuple[Float[Array, "batch length hidden"], MixerState]:
        """Continue from `state` (from `init_state` or a previous call): returns (y, the
        state after the last step). One step is the O(1) recurrent update."""
        self._ensure_built()
        inputs = jnp.asarray(inputs).astype(self.compute_dtype)
        return mixer(self.to_params(), self._config, inputs, state=state,
                     mask=mask, impl=self.impl)

    def init_state(self, batch_size: int) -> MixerState:
        """A zero decoding state: conv (batch, K-1, I) in the compute dtype, ssm
        (batch, I, N) float32."""
        I, N, K = (self._config.intermediate_size,  # noqa: E741
                   self.state_size, self.conv_kernel)
        return MixerState(jnp.zeros((batch_size, K - 1, I), self.compute_dtype),
                          jnp.zeros((batch_size, I, N), jnp.float32))

    def compute_output_shape(self, input_shape: Any) -> Any:
        return tuple(input_shape)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({name: getattr(self, name) for name in _config.MIXER_ARGS})
        config.update({"impl": self.impl, "seed": self.seed})
        return config

