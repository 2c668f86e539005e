"""The Mamba language model as pure functions over the parameter pytree of `params`.

Levels, each usable on its own (adapters wrap these and add no math):

    mixer(layer["mixer"], config, x, state=, mask=)        one Mamba mixer
    residual_block(layer, config, hidden, residual, ...)   RMSNorm + mixer, pre-norm residual
    backbone(params, config, input_ids, cache=, ...)       embedding, all layers, final norm
    lm_head(params, config, hidden)                        logits, float32
    forward(params, config, input_ids, cache=, ...)        backbone + lm_head
    decode_step(params, config, token, cache)              one token, O(1) in the length so far

Layers are stacked on axis 0 and run with `lax.scan`, so the compiled program does
not grow with depth; `layer_params(params, i)` gives one layer's dict.

Dtypes. `dtype` (the compute dtype, default: the embedding's dtype) is what the
matmuls, the conv and the activations use; weights are cast to it where used, so
float32 parameters can run in bfloat16. A_log, D and dt_proj.bias enter the scan in
float32 whatever `dtype`, the scan arithmetic and the SSM state are float32, the
residual stream is float32 when config.residual_in_fp32, and logits are float32.

Cache (`MambaCache`): per layer, the last K-1 conv inputs (layers, batch, K-1, I) in
the compute dtype and the SSM state (layers, batch, I, N) float32. A forward with a
cache of several tokens runs the parallel scan from the cached state (prefill, or
chunked prefill on a warm cache); of one token, an O(1) step: the decoding ops
(`causal_conv1d_update`, `selective_state_update`) with impl "auto", a length-1 scan
with any other impl ("recurrent" is the faster on CPUs; `generate` takes it there).

Masks. `mask` (batch, length), nonzero for real tokens, is for left padding: a padded
position feeds zeros to the conv and has time step 0, so the SSM state passes it
unchanged. On a fresh cache every row then ends in exactly the state it would have
without its padding. (On a warm cache, the conv window of the first real tokens
after padding would see zeros instead of the cached inputs.) In a one-token step a
masked row keeps its whole state, conv window included.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from beartype import beartype
from jax import Array
from jaxtyping import Bool, Float, Int, jaxtyped

from . import _checks
from . import _sequence_parallel as _sp
from ._scan_common import ScanImplementation
from ._scan_recurrent import RecurrentScan as RecurrentScan  # registers "recurrent"
from .config import MambaConfig
from .conv import causal_conv1d, causal_conv1d_update
from .params import ParamsError, check_params
from .scan import selective_scan
from .state_update import selective_state_update

Params = dict[str, Any]
Impl = str | ScanImplementation
SequenceAxis = str | tuple[str, ...] | None
_IntLike = Int[Array, "..."] | Int[np.ndarray, "..."]
# A (batch, length) mask: bool or integer (nonzero = real token), jax or NumPy.
_MaskLike = Bool[Array, "batch length"] | Bool[np.ndarray, "batch length"] | _IntLike

# Time-step pre-activation given to padded positions: softplus of it is exactly 0.0
# in float32 and bfloat16, so the decay is exp(0) = 1 and the input term is 0.
_MASKED_DT = -(2.0**14)


class MixerState(NamedTuple):
    """One mixer's decoding state: conv (batch, K-1, I) in the compute dtype, ssm
    (batch, I, N) float32."""

    conv: Float[Array, "batch width_minus_1 intermediate"]
    ssm: Float[Array, "batch intermediate state"]


class MambaCache(NamedTuple):
    """Every layer's decoding state, stacked: conv_state (layers, batch, K-1, I) in the
    compute dtype, ssm_state (layers, batch, I, N) float32."""

    conv_state: Float[Array, "layers batch width_minus_1 intermediate"]
    ssm_state: Float[Array, "layers batch intermediate state"]


def init_cache(config: MambaConfig, batch: int, dtype: Any = jnp.float32) -> MambaCache:
    """A zero cache for `batch` rows; `dtype` is the compute dtype (of the conv state)."""
    if batch < 1:
        raise ValueError(f"init_cache: batch must be >= 1, got {batch}")
    L, I, N, K = (config.num_hidden_layers, config.intermediate_size, config.state_size,
                  config.conv_kernel)
    return MambaCache(jnp.zeros((L, batch, K - 1, I), dtype), jnp.zeros((L, batch, I, N), jnp.float32))


def layer_params(params: Params, i: int) -> Params:
    """Layer `i`'s parameters, {"norm": ..., "mixer": ...}, unstacked."""
    return jax.tree.map(lambda a: a[i], params["backbone"]["layers"])


def rms_norm(
    x: Float[Array, "*batch hidden"], weight: Float[Array, " hidden"], eps: float
) -> Float[Array, "*batch hidden"]:
    """x / sqrt(mean(x²) + eps) * weight, computed and returned in float32."""
    x = x.astype(jnp.float32)
    var = jnp.mean(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(var + eps) * _lead(weight.astype(jnp.float32), x.ndim)


def _lead(v: Array, ndim: int) -> Array:
    """v with leading unit axes up to rank `ndim` (rank promotion is explicit here)."""
    return v.reshape((1,) * (ndim - v.ndim) + v.shape)


def as_bool_mask(mask) -> Array:
    """A (batch, length) mask of any int or bool dtype as bool (nonzero = real token)."""
    m = jnp.asarray(mask)
    return m if m.dtype == jnp.bool_ else m != jnp.zeros((), m.dtype)


def _linear(x: Array, p: dict[str, Array]) -> Array:
    """x @ weight.T (+ bias) in x's dtype; weight is (out, in) as in PyTorch."""
    y = jnp.einsum("...i,oi->...o", x, p["weight"].astype(x.dtype))
    if "bias" in p:
        y = y + _lead(p["bias"].astype(x.dtype), y.ndim)
    return y


def _check_mixer_inputs(op, config, x, state, mask):
    _checks.check_float(op, "x", x)
    _checks.check_rank(op, "x", x, (3,), "(batch, length, hidden)")
    b, _, h = x.shape
    if h != config.hidden_size:
        raise ValueError(f"{op}: x must have shape (batch, length, hidden={config.hidden_size}), "
                         f"got {tuple(x.shape)}")
    if mask is not None:
        _checks.check_shape(op, "mask", mask, x.shape[:2], "(batch, length)")
    if state is not None:
        I, N, K = config.intermediate_size, config.state_size, config.conv_kernel
        if not isinstance(state, MixerState):
            raise TypeError(f"{op}: state must be a MixerState, got {type(state).__name__}")
        _checks.check_shape(op, "state.conv", state.conv, (b, K - 1, I),
                            "(batch, conv_kernel - 1, intermediate)")
        _checks.check_dtype(op, "state.conv", state.conv, x.dtype)
        _checks.check_shape(op, "state.ssm", state.ssm, (b, I, N), "(batch, intermediate, state)")
        _checks.check_dtype(op, "state.ssm", state.ssm, jnp.float32)


def mixer(
    params: Params,
    config: MambaConfig,
    x: Float[Array, "batch length hidden"],
    *,
    state: MixerState | None = None,
    mask: _MaskLike | None = None,
    impl: Impl = "auto",
    sequence_axis: SequenceAxis = None,
) -> tuple[Float[Array, "batch length hidden"], MixerState | None]:
    """One Mamba mixer (in_proj, causal conv + SiLU, selective scan gated by SiLU(z), out_proj).

    params: one layer's "mixer" dict, unstacked (see `params`). x: (batch, length, H),
    whose dtype is the compute dtype. state: the layer's `MixerState` to continue from,
    or None to start from zeros. mask: (batch, length), nonzero for real tokens (see
    the module docstring). impl: the selective-scan implementation. One token with a
    state and impl "auto" takes the decoding ops (`causal_conv1d_update`,
    `selective_state_update`); any other impl runs the conv and the scan of length 1
    with it (on CPUs "recurrent" is the faster of the two; `generate` uses it).
    sequence_axis: inside `jax.shard_map`, the manual mesh axis (or tuple of axes,
    first major) over which the length is split; x, mask and y are then this shard's
    block (its length at least conv_kernel - 1), and `state` and the returned state
    belong to the whole sequence (the same on every shard). The conv takes the
    previous shard's last conv_kernel - 1 inputs (a `ppermute` halo) and the scan
    chains the shards (see `sharding.sharded_selective_scan`), so the outputs are
    the unsplit call's. See `sharding.sequence_parallel_forward` for the whole LM.

    Returns (y (batch, length, H) in x's dtype, the new MixerState when `state` was
    given, else None).
    """
    op = "mixer"
    _check_mixer_inputs(op, config, x, state, mask)
    seq = None if sequence_axis is None else _sp.bind(op, sequence_axis)
    K = config.conv_kernel
    if seq is not None and x.shape[1] < K - 1:
        raise ValueError(
            f"{op}: each sequence shard must hold at least conv_kernel - 1 = {K - 1} steps, "
            f"got {x.shape[1]} ({seq.shards} shards over sequence_axis={sequence_axis!r})")
    total_length = x.shape[1] * (1 if seq is None else seq.shards)
    cd = x.dtype
    I, N, R = config.intermediate_size, config.state_size, config.time_step_rank
    keep = None if mask is None else as_bool_mask(mask)[..., None]

    xz = _linear(x, params["in_proj"])
    xs, z = xz[..., :I], xz[..., I:]
    if keep is not None:
        xs = jnp.where(keep, xs, jnp.zeros((), cd))
    conv_w = params["conv1d"]["weight"][:, 0, :]
    conv_b = params["conv1d"].get("bias")
    A = -jnp.exp(params["A_log"].astype(jnp.float32))
    D = params["D"]
    dt_bias = params["dt_proj"]["bias"]

    def project(u):
        x_dbl = jnp.einsum("...i,oi->...o", u, params["x_proj"]["weight"].astype(cd))
        dt, B, C = x_dbl[..., :R], x_dbl[..., R:R + N], x_dbl[..., R + N:]
        return jnp.einsum("...r,ir->...i", dt, params["dt_proj"]["weight"].astype(cd)), B, C

    if seq is not None:
        prev = _sp.conv_halo(xs, K - 1, None if state is None else state.conv, seq)
        u, conv_state = causal_conv1d(xs, conv_w, conv_b, activation="silu",
                                      initial_state=prev, return_final_state=True)
        conv_state = _sp.from_last_shard(conv_state, seq)
        dt, B, C = project(u)
        if keep is not None:
            dt = jnp.where(keep, dt, jnp.asarray(_MASKED_DT, cd))
        y, ssm_state = _sp.selective_scan(
            u, dt, A, B, C, D, z=z, delta_bias=dt_bias, delta_softplus=True,
            initial_state=None if state is None else state.ssm, impl=impl, seq=seq)
    elif state is not None and x.shape[1] == 1 and isinstance(impl, str) and impl == "auto":
        u, conv_state = causal_conv1d_update(state.conv, xs[:, 0], conv_w, conv_b,
                                             activation="silu")
        dt, B, C = project(u)
        y, ssm_state = selective_state_update(state.ssm, u, dt, A, B, C, D, z=z[:, 0],
                                              dt_bias=dt_bias, dt_softplus=True)
        y = y[:, None]
    else:
        u, conv_state = causal_conv1d(
            xs, conv_w, conv_b, activation="silu",
            initial_state=None if state is None else state.conv, return_final_state=True)
        dt, B, C = project(u)
        if keep is not None:
            dt = jnp.where(keep, dt, jnp.asarray(_MASKED_DT, cd))
        y, ssm_state = selective_scan(
            u, dt, A, B, C, D, z=z, delta_bias=dt_bias, delta_softplus=True,
            initial_state=None if state is None else state.ssm, return_final_state=True,
            impl=impl)
    if state is not None and keep is not None and total_length == 1:
        # a masked decoding step leaves the row's state exactly as it was (the conv
        # window too, which the general path would shift); keep is (batch, 1, 1)
        conv_state = jnp.where(keep, conv_state, state.conv)
        ssm_state = jnp.where(keep, ssm_state, state.ssm)
    out = _linear(y, params["out_proj"])
    return out, (None if state is None else MixerState(conv_state, ssm_state))


def residual_block(
    params: Params,
    config: MambaConfig,
    hidden: Float[Array, "batch length hidden"],
    residual: Float[Array, "batch length hidden"] | None = None,
    *,
    state: MixerState | None = None,
    mask: _MaskLike | None = None,
    impl: Impl = "auto",
    sequence_axis: SequenceAxis = None,
) -> tuple[Float[Array, "batch length hidden"], Float[Array, "batch length hidden"],
           MixerState | None]:
    """One block in the original's fused add-norm form: residual += hidden;
    hidden = mixer(RMSNorm(residual)).

    params: one layer's dict {"norm", "mixer"}, unstacked. hidden: the previous
    block's mixer output (or the embeddings), in the compute dtype. residual: the
    residual stream so far, float32 when config.residual_in_fp32, or None before the
    first block. Returns (mixer output in hidden's dtype, the updated residual, the
    new MixerState or None). After the last block, the model's output is
    RMSNorm_f(residual + hidden). sequence_axis: see `mixer`.
    """
    rd = jnp.float32 if config.residual_in_fp32 else hidden.dtype
    residual = hidden.astype(rd) if residual is None else residual + hidden.astype(rd)
    normed = rms_norm(residual, params["norm"]["weight"], config.layer_norm_epsilon)
    out, new_state = mixer(params["mixer"], config, normed.astype(hidden.dtype), state=state,
                           mask=mask, impl=impl, sequence_axis=sequence_axis)
    return out, residual, new_state


def _check_cache(op: str, config: MambaConfig, cache: Any, batch: int, dtype) -> None:
    if not isinstance(cache, MambaCache):
        raise TypeError(f"{op}: cache must be a MambaCache (see init_cache), got "
                        f"{type(cache).__name__}")
    L, I, N, K = (config.num_hidden_layers, config.intermediate_size, config.state_size,
                  config.conv_kernel)
    for name, x, want, layout in (
        ("conv_state", cache.conv_state, (L, batch, K - 1, I),
         "(layers, batch, conv_kernel - 1, intermediate)"),
        ("ssm_state", cache.ssm_state, (L, batch, I, N), "(layers, batch, intermediate, state)"),
    ):
        if tuple(x.shape) != want:
            raise ValueError(f"{op}: cache.{name} must have shape {layout} = {want} for this "
                             f"config and batch {batch}, got {tuple(x.shape)}")
    _checks.check_dtype(op, "cache.ssm_state", cache.ssm_state, jnp.float32)
    if jnp.result_type(cache.conv_state) != jnp.dtype(dtype):
        raise TypeError(f"{op}: cache.conv_state has dtype {jnp.result_type(cache.conv_state)} "
                        f"but the compute dtype is {jnp.dtype(dtype)}; make the cache with "
                        f"init_cache(config, batch, {jnp.dtype(dtype).name})")


def _check_ids(op: str, config: MambaConfig, input_ids) -> None:
    _checks.check_int(op, "input_ids", input_ids)
    _checks.check_rank(op, "input_ids", input_ids, (2,), "(batch, length)")
    if not isinstance(input_ids, jax.core.Tracer) and np.size(input_ids):
        # To host first: np.min on a jax Array calls its .min(), which an enclosing
        # trace would stage out (a closed-over concrete array is still concrete here).
        ids = np.asarray(input_ids)
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= config.vocab_size:
            raise ValueError(f"{op}: input_ids must lie in [0, vocab_size={config.vocab_size}), "
                             f"got values in [{lo}, {hi}]")


def _compute_dtype(params: Params, dtype) -> Any:
    if dtype is not None:
        if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
            raise TypeError(f"dtype must be a floating dtype, got {jnp.dtype(dtype)}")
        return jnp.dtype(dtype)
    return jnp.result_type(params["backbone"]["embeddings"]["weight"])


def _embed(params: Params, input_ids: Any, dtype: Any) -> Array:
    """The token embeddings (..., H) of integer ids (...), in `dtype` (no range check)."""
    return jnp.take(params["backbone"]["embeddings"]["weight"], jnp.asarray(input_ids),
                    axis=0).astype(dtype)


def _final_norm(params: Params, config: MambaConfig, hidden: Array, residual: Array) -> Array:
    """The backbone's output after its last block: RMSNorm_f(residual + hidden), in
    hidden's dtype (the residual's dtype is the stream's, see `residual_block`)."""
    residual = residual + hidden.astype(residual.dtype)
    return rms_norm(residual, params["backbone"]["norm_f"]["weight"],
                    config.layer_norm_epsilon).astype(hidden.dtype)


def backbone(
    params: Params,
    config: MambaConfig,
    input_ids: Int[Array, "batch length"] | Int[np.ndarray, "batch length"] | None = None,
    *,
    inputs_embeds: Float[Array, "batch length hidden"] | None = None,
    cache: MambaCache | None = None,
    mask: _MaskLike | None = None,
    impl: Impl = "auto",
    dtype: Any = None,
    remat: bool = False,
    sequence_axis: SequenceAxis = None,
) -> Float[Array, "batch length hidden"] | tuple[Float[Array, "batch length hidden"], MambaCache]:
    """Embedding, every layer (a `lax.scan` over the stacked layers), final RMSNorm.

    input_ids: (batch, length) integers in [0, vocab_size), or inputs_embeds
    (batch, length, H) instead. cache: a `MambaCache` to continue from (its conv
    state in the compute dtype). mask: (batch, length), nonzero for real tokens (left
    padding). dtype: the compute dtype, default the embedding's dtype. remat: recompute
    each layer's activations in the backward pass (`jax.checkpoint` around the layer
    body) instead of storing them: training memory of one layer's activations plus
    each layer's input. sequence_axis: inside `jax.shard_map`, the manual mesh axis
    (or axes) over which the length is split (see `mixer`); the inputs and the output
    are this shard's block, the cache the whole sequence's.

    Returns the normalised hidden states (batch, length, H) in the compute dtype, and
    with a cache, (hidden, the updated cache).
    """
    op = "backbone"
    check_params(params, config, head=False)  # the backbone never reads lm_head
    cd = _compute_dtype(params, dtype)
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError(f"{op}: give exactly one of input_ids and inputs_embeds")
    if inputs_embeds is None:
        _check_ids(op, config, input_ids)
        hidden = _embed(params, input_ids, cd)
    else:
        _checks.check_float(op, "inputs_embeds", inputs_embeds)
        _checks.check_rank(op, "inputs_embeds", inputs_embeds, (3,), "(batch, length, hidden)")
        _checks.check_shape(op, "inputs_embeds", inputs_embeds,
                            (None, None, config.hidden_size), "(batch, length, hidden)")
        hidden = inputs_embeds.astype(cd)
    batch, length = hidden.shape[:2]
    if length == 0:
        raise ValueError(f"{op}: the input has length 0")
    if mask is not None:
        _checks.check_shape(op, "mask", mask, (batch, length), "(batch, length)")
        mask = as_bool_mask(mask)
    if cache is not None:
        _check_cache(op, config, cache, batch, cd)
    rd = jnp.float32 if config.residual_in_fp32 else cd

    def body(carry, xs):
        hidden, residual = carry
        layer, layer_state = xs
        state = None if layer_state is None else MixerState(*layer_state)
        hidden, residual, new_state = residual_block(
            layer, config, hidden, residual, state=state, mask=mask, impl=impl,
            sequence_axis=sequence_axis)
        return (hidden, residual), (None if new_state is None else tuple(new_state))

    if remat:
        body = jax.checkpoint(body)

    # residual starts at 0: 0 + embeddings is exact, so every layer shares one body.
    init = (hidden, jnp.zeros(hidden.shape, rd))
    states = None if cache is None else (cache.conv_state, cache.ssm_state)
    (hidden, residual), new_states = jax.lax.scan(
        body, init, (params["backbone"]["layers"], states))
    out = _final_norm(params, config, hidden, residual)
    if cache is None:
        return out
    return out, MambaCache(*new_states)


def lm_head(
    params: Params, config: MambaConfig, hidden: Float[Array, "*batch hidden"]
) -> Float[Array, "*batch vocab"]:
    """Logits (..., vocab_size) float32 from final hidden states (..., H), computed in
    hidden's dtype with float32 accumulation; the embedding matrix when tied."""
    if config.tie_word_embeddings:
        w = params["backbone"]["embeddings"]["weight"]
    else:
        w = params.get("lm_head", {}).get("weight")
        want = (config.vocab_size, config.hidden_size)
        if w is None or tuple(w.shape) != want:
            got = "missing" if w is None else f"shape {tuple(w.shape)}"
            raise ParamsError(f"lm_head: config.tie_word_embeddings is False, so params needs "
                              f"lm_head.weight of shape (vocab, hidden) = {want}; it is {got}")
    return jnp.einsum("...h,vh->...v", hidden, w.astype(hidden.dtype),
                      preferred_element_type=jnp.float32)


def forward(
    params: Params,
    config: MambaConfig,
    input_ids: Int[Array, "batch length"] | Int[np.ndarray, "batch length"] | None = None,
    *,
    inputs_embeds: Float[Array, "batch length hidden"] | None = None,
    cache: MambaCache | None = None,
    mask: _MaskLike | None = None,
    impl: Impl = "auto",
    dtype: Any = None,
    remat: bool = False,
    sequence_axis: SequenceAxis = None,
) -> Float[Array, "batch length vocab"] | tuple[Float[Array, "batch length vocab"], MambaCache]:
    """The language model: logits (batch, length, vocab_size) float32, and with a cache,
    (logits, the updated cache). Arguments as for `backbone`."""
    out = backbone(params, config, input_ids, inputs_embeds=inputs_embeds, cache=cache,
                   mask=mask, impl=impl, dtype=dtype, remat=remat, sequence_axis=sequence_axis)
    if cache is None:
        return lm_head(params, config, out)
    hidden, new_cache = out
    return lm_head(params, config, hidden), new_cache


def decode_step(
    params: Params,
    config: MambaConfig,
    token: Int[Array, " batch"] | Int[np.ndarray, " batch"],
    cache: MambaCache,
    *,
    mask: Bool[Array, " batch"] | Bool[np.ndarray, " batch"] | None = None,
    dtype: Any = None,
    impl: Impl = "auto",
) -> tuple[Float[Array, "batch vocab"], MambaCache]:
    """One decoding step: token (batch,) -> (logits (batch, vocab_size) float32, new cache).

    O(1) in the length so far: the conv window and the SSM state advance by one step
    (with the decoding ops for impl "auto", else a length-1 scan with `impl`, see
    `mixer`). Rows where `mask` (batch,) is False keep their state unchanged.
    """
    _checks.check_rank("decode_step", "token", token, (1,), "(batch,)")
    logits, cache = forward(params, config, jnp.asarray(token)[:, None], cache=cache,
                            mask=None if mask is None else mask[:, None], dtype=dtype,
                            impl=impl)
    return logits[:, 0], cache


# Checked with beartype + jaxtyping at every call (not only under the test hook):
# these take user input.
backbone = jaxtyped(typechecker=beartype)(backbone)
forward = jaxtyped(typechecker=beartype)(forward)
decode_step = jaxtyped(typechecker=beartype)(decode_step)
