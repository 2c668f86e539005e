"""`ResidualBlock`: RMSNorm + mixer, over `mamba_ssm_core.residual_block`."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx
from jax import Array
from jaxtyping import Float
from mamba_ssm_core import ScanImplementation, residual_block

from . import _config
from ._mixer import MambaMixer, MaskLike, layer_inputs, write_state


class ResidualBlock(_config.LayerModule):
    """One Mamba block in the original's fused add-norm form:
    residual = residual + hidden; hidden = mixer(RMSNorm(residual)).

    Attributes: norm (`nnx.RMSNorm`, scale (H,)), mixer (`MambaMixer`). Channels-last,
    any leading batch axes. In `MambaModel` the blocks are one ResidualBlock whose
    variables carry a leading layer axis (made with `nnx.vmap`), which `nnx.scan` can run.
    """

    _options = _config.BLOCK_OPTIONS

    def __init__(
        self,
        hidden_size: int,
        *,
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
        num_layers: int = 1,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        impl: str | ScanImplementation = "auto",
        decode: bool = False,
        rngs: nnx.Rngs,
    ):
        """Sizes and options as for `MambaMixer`, plus layer_norm_epsilon (the RMSNorm's)
        and residual_in_fp32 (carry the residual stream in float32). The norm starts at
        ones, the official initialisation."""
        self.config = _config.layer_config(
            hidden_size, num_layers=num_layers, state_size=state_size, expand=expand,
            conv_kernel=conv_kernel, time_step_rank=time_step_rank, use_bias=use_bias,
            use_conv_bias=use_conv_bias, layer_norm_epsilon=layer_norm_epsilon,
            residual_in_fp32=residual_in_fp32, time_step_min=time_step_min,
            time_step_max=time_step_max, time_step_floor=time_step_floor,
            time_step_scale=time_step_scale, time_step_init_scheme=time_step_init_scheme)
        self.norm = nnx.RMSNorm(hidden_size, epsilon=layer_norm_epsilon, dtype=dtype,
                                param_dtype=param_dtype, rngs=rngs)
        self.mixer = MambaMixer.from_config(self.config, dtype=dtype, param_dtype=param_dtype,
                                            impl=impl, decode=decode, rngs=rngs)
        self.dtype = None if dtype is None else jnp.dtype(dtype)
        self.impl = impl
        self.decode = decode

    def init_cache(self, batch_shape: int | tuple[int, ...] = (), dtype: Any = None) -> None:
        """Make the mixer's zero nnx.Cache decoding state (see `MambaMixer.init_cache`)."""
        self.mixer.init_cache(batch_shape, dtype)

    def __call__(
        self,
        hidden: Float[Array, "*batch length hidden"],
        residual: Float[Array, "*batch length hidden"] | None = None,
        *,
        mask: MaskLike | None = None,
        decode: bool | None = None,
    ) -> tuple[Float[Array, "*batch length hidden"], Float[Array, "*batch length hidden"]]:
        """hidden: the previous block's mixer output (or the embeddings), (*batch, length, H);
        residual: the residual stream so far (float32 when residual_in_fp32), or None before
        the first block. mask, decode: as for `MambaMixer` (the state is the mixer's).

        Returns (mixer output in the compute dtype, the updated residual). After the last
        block, the model's output is RMSNorm_f(residual + hidden)."""
        flat, m, state = layer_inputs(self, self.mixer, hidden, mask, decode, "hidden",
                                      "ResidualBlock")
        res = None if residual is None else residual.reshape(flat.shape)
        out, res, new = residual_block(self.to_params(), self.config, flat, res, state=state,
                                       mask=m, impl=self.impl)
        if new is not None:
            write_state(self.mixer, new.conv, new.ssm)
        return out.reshape(hidden.shape), res.reshape(hidden.shape)
