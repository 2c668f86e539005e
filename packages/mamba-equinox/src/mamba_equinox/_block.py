"""`ResidualBlock`: RMSNorm + mixer, over `mamba_ssm_core.model.residual_block`."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax.numpy as jnp
from jax import Array
from jaxtyping import Float, PRNGKeyArray
from mamba_ssm_core import MambaConfig, MixerState, init_layer_params, residual_block

from . import _containers as c
from ._mixer import MambaMixer, add_batch, drop_batch


class ResidualBlock(eqx.Module):
    """One Mamba block in the fused add-norm form of the original:
    residual = residual + hidden; hidden = mixer(RMSNorm(residual)).

    Takes one example; `jax.vmap` it over a batch. Fields: norm (eqx.nn.RMSNorm),
    mixer (`MambaMixer`). In `MambaModel` the blocks are stacked: one ResidualBlock
    whose arrays carry a leading layer axis.
    """

    norm: eqx.nn.RMSNorm
    mixer: MambaMixer
    config: MambaConfig = eqx.field(static=True)

    def __init__(
        self,
        config: MambaConfig,
        *,
        key: PRNGKeyArray | None = None,
        params: dict[str, Any] | None = None,
        dtype: Any = jnp.float32,
        compute_dtype: Any = None,
        impl: Any = "auto",
    ):
        """key: a fresh, official initialisation (`mamba_ssm_core.init_layer_params`); or
        params: the core's layer dict {"norm", "mixer"} to hold as is (possibly stacked on
        a leading layer axis). dtype, compute_dtype, impl: as for `MambaMixer`."""
        params = c.key_or_params("ResidualBlock", key, params,
                                 lambda k: init_layer_params(k, config, dtype=dtype))
        self.norm = c.rms_norm(params["norm"]["weight"], config.hidden_size,
                               config.layer_norm_epsilon)
        self.mixer = MambaMixer(config, params=params["mixer"], compute_dtype=compute_dtype,
                                impl=impl)
        self.config = config

    def to_params(self) -> dict[str, Any]:
        """The parameters in the core's layout (one layer's {"norm", "mixer"})."""
        return {"norm": {"weight": self.norm.weight}, "mixer": self.mixer.to_params()}

    def init_state(self, dtype: Any = None) -> MixerState:
        """A zero decoding state for one example (see `MambaMixer.init_state`)."""
        return self.mixer.init_state(dtype)

    def __call__(
        self,
        hidden: Float[Array, "length hidden"],
        residual: Float[Array, "length hidden"] | None = None,
        *,
        state: MixerState | None = None,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Array, Array] | tuple[Array, Array, MixerState]:
        """hidden: the previous block's mixer output (or the embeddings), (length, H);
        residual: the residual stream so far (float32 when config.residual_in_fp32), or
        None before the first block. Returns (mixer output in the compute dtype, the
        updated residual), and with `state` also the new state. key is unused."""
        del key
        if self.mixer.compute_dtype is not None:
            hidden = hidden.astype(self.mixer.compute_dtype)
        out, residual, new_state = residual_block(
            self.to_params(), self.config, hidden[None], add_batch(residual),
            state=add_batch(state), impl=self.mixer.impl)
        if state is None:
            return out[0], residual[0]
        return out[0], residual[0], drop_batch(new_state)
