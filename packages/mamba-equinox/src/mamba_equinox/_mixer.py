"""`MambaMixer`: one Mamba mixer as an Equinox module over `mamba_ssm_core.model.mixer`."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import Array
from jaxtyping import Float, PRNGKeyArray
from mamba_ssm_core import MambaConfig, MixerState, init_layer_params, mixer

from . import _containers as c


def add_batch(tree: Any, axis: int = 0) -> Any:
    """The core's batched layout of one example's state or cache: a unit axis at `axis`."""
    return None if tree is None else jax.tree.map(lambda a: jnp.expand_dims(a, axis), tree)


def drop_batch(tree: Any, axis: int = 0) -> Any:
    """One example's state or cache from the core's batch of one."""
    return jax.tree.map(lambda a: jnp.squeeze(a, axis), tree)


class MambaMixer(eqx.Module):
    """One Mamba mixer: in_proj, causal depthwise conv + SiLU, the selective scan gated by
    SiLU(z), out_proj. Takes one example; `jax.vmap` it over a batch.

    Fields are the core's parameter names (`mamba_ssm_core.params`): in_proj, conv1d,
    x_proj, dt_proj (Equinox layers), A_log (I, N), D (I,). config, compute_dtype and
    impl are static.
    """

    in_proj: eqx.nn.Linear
    conv1d: eqx.nn.Conv1d
    x_proj: eqx.nn.Linear
    dt_proj: eqx.nn.Linear
    A_log: Float[Array, "*layers intermediate state"]
    D: Float[Array, "*layers intermediate"]
    out_proj: eqx.nn.Linear
    config: MambaConfig = eqx.field(static=True)
    compute_dtype: Any = eqx.field(static=True)
    impl: Any = eqx.field(static=True)

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
        """config: the sizes (hidden_size H, intermediate_size I, state_size N, conv_kernel K,
        time_step_rank R, use_bias, use_conv_bias) and the time-step init range.
        key: for a fresh, official initialisation (parameters in `dtype`, A_log, D and
        dt_proj.bias float32). params: instead of key, the core's mixer dict to hold as is.
        compute_dtype: the dtype the mixer computes in (inputs are cast to it); None keeps
        the input's dtype. impl: the selective-scan implementation (see
        `mamba_ssm_core.selective_scan`)."""
        params = c.key_or_params(
            "MambaMixer", key, params,
            lambda k: init_layer_params(k, config, dtype=dtype)["mixer"])
        H, I, N, K, R = (config.hidden_size, config.intermediate_size, config.state_size,  # noqa: E741
                         config.conv_kernel, config.time_step_rank)
        self.in_proj = c.linear(params["in_proj"], H, 2 * I)
        self.conv1d = c.conv1d(params["conv1d"], I, K)
        self.x_proj = c.linear(params["x_proj"], I, R + 2 * N)
        self.dt_proj = c.linear(params["dt_proj"], R, I)
        self.A_log = params["A_log"]
        self.D = params["D"]
        self.out_proj = c.linear(params["out_proj"], I, H)
        self.config = config
        self.compute_dtype = None if compute_dtype is None else jnp.dtype(compute_dtype)
        self.impl = impl

    def to_params(self) -> dict[str, Any]:
        """The parameters in the core's layout (`mamba_ssm_core.params`, one layer's "mixer")."""
        return {
            "in_proj": c.linear_params(self.in_proj),
            "conv1d": c.conv1d_params(self.conv1d),
            "x_proj": c.linear_params(self.x_proj),
            "dt_proj": c.linear_params(self.dt_proj),
            "A_log": self.A_log,
            "D": self.D,
            "out_proj": c.linear_params(self.out_proj),
        }

    def init_state(self, dtype: Any = None) -> MixerState:
        """A zero decoding state for one example: conv (K-1, I) in `dtype` (default: the
        compute dtype, else float32), ssm (I, N) float32."""
        dtype = dtype or self.compute_dtype or jnp.float32
        I, N, K = (self.config.intermediate_size,  # noqa: E741
                   self.config.state_size, self.config.conv_kernel)
        return MixerState(jnp.zeros((K - 1, I), dtype), jnp.zeros((I, N), jnp.float32))

    def __call__(
        self,
        x: Float[Array, "length hidden"],
        *,
        state: MixerState | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "length hidden"] | tuple[Float[Array, "length hidden"], MixerState]:
        """x: (length, H). Returns y (length, H) in the compute dtype; with `state` (from
        `init_state` or a previous call), (y, the state after the last step). One step
        with a state is the O(1) recurrent update. key is unused (no dropout)."""
        del key
        if self.compute_dtype is not None:
            x = x.astype(self.compute_dtype)
        y, new_state = mixer(self.to_params(), self.config, x[None], state=add_batch(state),
                             impl=self.impl)
        if state is None:
            return y[0]
        return y[0], drop_batch(new_state)
