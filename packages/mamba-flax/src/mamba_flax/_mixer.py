"""`MambaMixer`: one Mamba mixer as a Flax NNX module over `mamba_ssm_core.mixer`."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import Array
from jaxtyping import Bool, Float, Int
from mamba_ssm_core import (
    MambaConfig,
    MixerState,
    ScanImplementation,
    init_cache,
    init_layer_params,
    mixer,
)

from . import _config, _convert

MaskLike = (Bool[Array, "*batch length"] | Int[Array, "*batch length"]
            | Bool[np.ndarray, "*batch length"] | Int[np.ndarray, "*batch length"])


def batch_shape_of(batch_shape: int | tuple[int, ...]) -> tuple[int, ...]:
    return (batch_shape,) if isinstance(batch_shape, int) else tuple(batch_shape)


def flat_batch(x: Any, trailing: int, what: str, op: str) -> tuple[Any, tuple[int, ...]]:
    """x (*batch, *trailing axes) -> (x as (prod(batch), *trailing), batch)."""
    if x.ndim < trailing:
        raise ValueError(f"{op}: {what} must have at least {trailing} axes, got shape "
                         f"{tuple(x.shape)}")
    lead = tuple(x.shape[: x.ndim - trailing])
    return x.reshape((-1, *x.shape[x.ndim - trailing:])), lead


def zero_state(config: MambaConfig, batch_shape: tuple[int, ...], dtype: Any) -> MixerState:
    """A zero MixerState with leading axes `batch_shape` (the core's `init_cache`, one layer)."""
    one = dataclasses.replace(config, num_hidden_layers=1)
    cache = init_cache(one, max(1, int(np.prod(batch_shape, dtype=np.int64))), dtype)
    return MixerState(cache.conv_state[0].reshape(*batch_shape, *cache.conv_state.shape[2:]),
                      cache.ssm_state[0].reshape(*batch_shape, *cache.ssm_state.shape[2:]))


def read_state(module: Any, lead: tuple[int, ...], layers: int | None, op: str) -> MixerState:
    """The module's nnx.Cache decoding state, flattened to the core's batch axis.

    layers: None for one mixer ((*batch, ...) caches), else the size of the leading layer
    axis ((layers, *batch, ...) caches)."""
    if module.conv_state is None or module.ssm_state is None:
        raise ValueError(f"{op}: decoding needs a cache; call init_cache(batch_shape) first")
    conv, ssm = module.conv_state[...], module.ssm_state[...]
    skip = 0 if layers is None else 1
    have = tuple(conv.shape[skip:conv.ndim - 2])
    if have != lead:
        raise ValueError(f"{op}: the cache was made for batch shape {have} (init_cache), but "
                         f"the input has batch shape {lead}")
    pre = () if layers is None else (layers,)
    return MixerState(conv.reshape(*pre, -1, *conv.shape[-2:]),
                      ssm.reshape(*pre, -1, *ssm.shape[-2:]))


def layer_inputs(
    module: Any, holder: Any, x: Any, mask: Any, decode: bool | None, what: str, op: str
) -> tuple[Array, Array | None, MixerState | None]:
    """The inputs of the core's mixer or residual_block for `module` (a mixer or block):
    x in the compute dtype with its leading axes flattened, the mask to match, and the
    nnx.Cache state of `holder` (the mixer) when decoding (default: module.decode)."""
    decode = module.decode if decode is None else decode
    if module.dtype is not None:
        x = x.astype(module.dtype)
    flat, lead = flat_batch(x, 2, what, op)
    m = None if mask is None else jnp.asarray(mask).reshape(flat.shape[:2])
    return flat, m, read_state(holder, lead, None, op) if decode else None


def write_state(module: Any, conv: Array, ssm: Array) -> None:
    """Store a new state (flattened batch) in the module's nnx.Cache variables."""
    module.conv_state[...] = conv.reshape(module.conv_state.shape)
    module.ssm_state[...] = ssm.reshape(module.ssm_state.shape)


class MambaMixer(_config.LayerModule):
    """One Mamba mixer: in_proj, causal depthwise conv + SiLU, the selective scan gated by
    SiLU(z), out_proj. Channels-last, any leading batch axes: (*batch, length, H).

    Parameters live in Flax layers named as the core names them: in_proj, x_proj, dt_proj,
    out_proj (`nnx.Linear`, kernel (in, out)), conv1d (`nnx.Conv`, depthwise and causal,
    kernel (K, 1, I)), A_log (I, N), D (I,) (`nnx.Param`). The math is
    `mamba_ssm_core.mixer`. Decoding state: conv_state (*batch, K-1, I) and ssm_state
    (*batch, I, N) float32, `nnx.Cache` variables made by `init_cache`.
    """

    _options = _config.MIXER_OPTIONS

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
        """hidden_size H; state_size N; expand (I = expand * H); conv_kernel K;
        time_step_rank R (None: ceil(H / 16)); use_bias (in_proj, out_proj); use_conv_bias.
        time_step_*: the official dt initialisation (see `mamba_ssm_core.MambaConfig`).
        num_layers: the depth of the model this mixer is initialised for (out_proj starts
        divided by sqrt(num_layers), the official rescale; 1 for none).
        dtype: the compute dtype (None: the input's). param_dtype: the storage dtype of a
        fresh initialisation; A_log, D and dt_proj.bias are float32 whatever it is.
        impl: the selective-scan implementation (`mamba_ssm_core.selective_scan`).
        decode: whether calls continue from the nnx.Cache state by default.
        rngs: draws the official initialisation (`mamba_ssm_core.init_layer_params`)."""
        config = _config.layer_config(
            hidden_size, num_layers=num_layers, state_size=state_size, expand=expand,
            conv_kernel=conv_kernel, time_step_rank=time_step_rank, use_bias=use_bias,
            use_conv_bias=use_conv_bias, time_step_min=time_step_min,
            time_step_max=time_step_max, time_step_floor=time_step_floor,
            time_step_scale=time_step_scale, time_step_init_scheme=time_step_init_scheme)
        p = init_layer_params(rngs.params(), config, dtype=param_dtype)["mixer"]
        H, I, N, K, R = (config.hidden_size, config.intermediate_size, config.state_size,  # noqa: E741
                         config.conv_kernel, config.time_step_rank)
        g = _convert.given
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        def linear(name: str, n_in: int, n_out: int) -> nnx.Linear:
            q = p[name]
            return nnx.Linear(
                n_in, n_out, use_bias="bias" in q, kernel_init=g(q["weight"].T),
                **({"bias_init": g(q["bias"])} if "bias" in q else {}), **common)

        self.in_proj = linear("in_proj", H, 2 * I)
        conv = p["conv1d"]
        self.conv1d = nnx.Conv(
            I, I, K, padding=((K - 1, 0),), feature_group_count=I, use_bias=use_conv_bias,
            kernel_init=g(jnp.swapaxes(conv["weight"], 0, 2)),
            **({"bias_init": g(conv["bias"])} if use_conv_bias else {}), **common)
        self.x_proj = linear("x_proj", I, R + 2 * N)
        self.dt_proj = linear("dt_proj", R, I)
        self.A_log = nnx.Param(p["A_log"])
        self.D = nnx.Param(p["D"])
        self.out_proj = linear("out_proj", I, H)
        self.conv_state: nnx.Cache | None = nnx.data(None)
        self.ssm_state: nnx.Cache | None = nnx.data(None)
        self.config = config
        self.dtype = None if dtype is None else jnp.dtype(dtype)
        self.param_dtype = jnp.dtype(param_dtype)
        self.impl = impl
        self.decode = decode

    def init_cache(self, batch_shape: int | tuple[int, ...] = (), dtype: Any = None) -> None:
        """Make zero nnx.Cache decoding state for inputs with leading axes `batch_shape`:
        conv_state (*batch, K-1, I) in `dtype` (default: the compute dtype, else the
        storage dtype), ssm_state (*batch, I, N) float32."""
        state = zero_state(self.config, batch_shape_of(batch_shape),
                           dtype or self.dtype or self.param_dtype)
        self.conv_state = nnx.Cache(state.conv)
        self.ssm_state = nnx.Cache(state.ssm)

    def __call__(
        self,
        x: Float[Array, "*batch length hidden"],
        *,
        mask: MaskLike | None = None,
        decode: bool | None = None,
    ) -> Float[Array, "*batch length hidden"]:
        """x: (*batch, length, H). mask: (*batch, length), nonzero on real tokens (left
        padding). decode (default: the module's): continue from the nnx.Cache state and
        update it (any length; one token takes the O(1) recurrent update).

        Returns y (*batch, length, H) in the compute dtype."""
        flat, m, state = layer_inputs(self, self, x, mask, decode, "x", "MambaMixer")
        y, new = mixer(self.to_params(), self.config, flat, state=state, mask=m, impl=self.impl)
        if new is not None:
            write_state(self, new.conv, new.ssm)
        return y.reshape(x.shape)
