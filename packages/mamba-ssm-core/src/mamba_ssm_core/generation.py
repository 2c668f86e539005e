"""Text generation: the whole decoding loop in one compiled program, and the sampling rules.

`generate(params, config, input_ids, max_new_tokens=..., key=...)` prefills the prompt
with the parallel scan (left-padded batches through `mask`), then decodes one token
per `lax.while_loop` iteration with the O(1) `decode_step`, the cache buffers donated
to the loop. On CPUs the decoding step runs its layers unrolled over per-layer copies
of the weights, made once per call for layer weights up to 2 GiB (see
`_decode_step_unrolled`): about 1.3x the tokens/s of the layer scan at the mamba-130m
shape, for one more copy of the layer weights in memory while generating and a longer
compile. Each row stops at its first EOS (later positions hold pad_token_id); the loop
ends when every row has stopped or max_new_tokens are out. Sampling is greedy
(temperature 0) or from the processed distribution, and deterministic for a given key.

Logit processing, in the order transformers applies it: repetition penalty over the
tokens seen so far (prompt included; logit / penalty where positive, * penalty where
negative), temperature, top-k, top-p (the smallest set of most likely tokens whose
probability reaches top_p), min-p (drop tokens below min_p times the top probability).
`process_logits` and `sample_token` expose these for custom loops.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from beartype import beartype
from jax import Array
from jax.experimental import io_callback
from jaxtyping import Bool, Float, Int, jaxtyped

from ._scan_common import ScanImplementation
from .config import MambaConfig
from .model import (
    MambaCache,
    MixerState,
    _check_ids,
    _embed,
    _final_norm,
    as_bool_mask,
    backbone,
    decode_step,
    init_cache,
    lm_head,
    residual_block,
)
from .params import check_params

Params = dict[str, Any]
StreamCallback = Callable[[int, np.ndarray, np.ndarray], Any]


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to pick each token. temperature 0 is greedy (argmax after the repetition
    penalty); top_k 0, top_p 1, min_p 0 and repetition_penalty 1 switch those off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"Sampling: temperature must be >= 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"Sampling: top_k must be an int >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"Sampling: top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"Sampling: min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"Sampling: repetition_penalty must be > 0, got "
                             f"{self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def process_logits(
    logits: Float[Array, "batch vocab"],
    sampling: Sampling,
    seen: Bool[Array, "batch vocab"] | None = None,
) -> Float[Array, "batch vocab"]:
    """Apply the repetition penalty (over `seen`), temperature, top-k, top-p and min-p.

    logits: (batch, vocab) float32. Removed tokens get -inf. With temperature 0 only
    the repetition penalty is applied (greedy picks the argmax of the result).
    """
    logits = logits.astype(jnp.float32)
    neg_inf = jnp.asarray(-jnp.inf, jnp.float32)
    if sampling.repetition_penalty != 1.0 and seen is not None:
        p = jnp.asarray(sampling.repetition_penalty, jnp.float32)
        penalised = jnp.where(logits > 0, logits / p, logits * p)
        logits = jnp.where(seen, penalised, logits)
    if sampling.greedy:
        return logits
    if sampling.temperature != 1.0:
        logits = logits / jnp.asarray(sampling.temperature, jnp.float32)
    vocab = logits.shape[-1]
    if 0 < sampling.top_k < vocab:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if sampling.top_p < 1.0:
        ordered = -jnp.sort(-logits, axis=-1)  # descending
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
        keep = before < sampling.top_p  # always keeps the first
        threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, neg_inf, logits)
    if sampling.min_p > 0.0:
        probs = jax.nn.softmax(logits, axis=-1)
        top = jnp.max(probs, axis=-1, keepdims=True)
        logits = jnp.where(probs < sampling.min_p * top, neg_inf, logits)
    return logits


def sample_token(
    key: Array,
    logits: Float[Array, "batch vocab"],
    sampling: Sampling,
    seen: Bool[Array, "batch vocab"] | None = None,
) -> Int[Array, " batch"]:
    """One token per row (int32): argmax when greedy, else a draw from the processed logits."""
    logits = process_logits(logits, sampling, seen)
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


class GenerationOutput(NamedTuple):
    """tokens (batch, max_new_tokens) int32, pad_token_id after a row's EOS; lengths
    (batch,) int32, the tokens each row generated, its EOS included; cache, the state
    after each row's prompt and every token it generated but its last (feed that one
    to `decode_step` to continue)."""

    tokens: Int[Array, "batch new"]
    lengths: Int[Array, " batch"]
    cache: MambaCache


def _is_eos(tok: Array, eos: tuple[int, ...]) -> Array:
    hit = jnp.zeros(tok.shape, bool)
    for e in eos:
        hit = hit | (tok == e)
    return hit


def _mark_seen(seen: Array, tok: Array) -> Array:
    return seen.at[jnp.arange(tok.shape[0]), tok].set(True)


# The largest layer weights (bytes) that generate copies per layer for the unrolled CPU
# decoding step: the copy doubles their memory while generating (2 GiB: mamba-370m in
# float32 and smaller).
_UNROLL_MAX_BYTES = 2 << 30


@functools.partial(jax.jit, static_argnums=1)
def _unstack_layers(layers: Params, num_layers: int) -> tuple[Params, ...]:
    """The stacked layer parameters as one dict per layer, every leaf its own buffer."""
    return tuple(jax.tree.map(lambda a, i=i: a[i], layers) for i in range(num_layers))


def _decode_step_unrolled(params, layers, config, token, states, *, mask, dtype, impl):
    """`decode_step` with the layer loop unrolled over per-layer parameter buffers.

    XLA:CPU's dot cannot read a layer's slice of a stacked weight in place, so inside
    the layer scan it copies the slice before every dot: at the mamba-130m shape the
    copies took longer than the dots. Here every layer's dots read their own buffers.
    layers: `_unstack_layers` of the stacked layers; states: one `MixerState` per layer.
    The arithmetic is `decode_step`'s, op for op. Returns (logits (batch, vocab)
    float32, the new states).
    """
    hidden = _embed(params, token[:, None], dtype)
    residual, new = None, []
    for layer, state in zip(layers, states, strict=True):
        hidden, residual, state = residual_block(layer, config, hidden, residual, state=state,
                                                 mask=mask[:, None], impl=impl)
        new.append(state)
    logits = lm_head(params, config, _final_norm(params, config, hidden, residual)[:, 0])
    return logits, tuple(new)


@functools.partial(
    jax.jit,
    static_argnames=("config", "sampling", "max_new_tokens", "eos", "pad", "dtype", "impl",
                     "callback"),
    donate_argnames=("cache",),
)
def _generate(params, input_ids, mask, key, cache, layers=None, *, config, sampling,
              max_new_tokens, eos, pad, dtype, impl, callback):
    # layers: None (decode with the scan over the stacked layers) or `_unstack_layers`
    # of them (decode with the layers unrolled; see `_decode_step_unrolled`)
    batch = input_ids.shape[0]
    hidden, cache = backbone(params, config, input_ids, cache=cache, mask=mask, impl=impl,
                             dtype=dtype)
    logits = lm_head(params, config, hidden[:, -1])
    if sampling.repetition_penalty != 1.0:
        rows = jnp.broadcast_to(jnp.arange(batch)[:, None], input_ids.shape)
        seen = jnp.zeros((batch, config.vocab_size), bool).at[rows, input_ids].max(mask)
    else:
        seen = None

    def emit(i, tok, done, lengths, tokens, seen):
        tok = jnp.where(done, jnp.asarray(pad, jnp.int32), tok)
        lengths = lengths + (~done).astype(jnp.int32)
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, tok, i, axis=1)
        done = done | _is_eos(tok, eos)
        if seen is not None:
            seen = _mark_seen(seen, tok)
        if callback is not None:
            io_callback(lambda i, t, d: callback(int(i), np.asarray(t), np.asarray(d)), None,
                        i, tok, done, ordered=True)
        return tok, done, lengths, tokens, seen

    key, sub = jax.random.split(key)
    tok = sample_token(sub, logits, sampling, seen)
    tokens = jnp.full((batch, max_new_tokens), pad, jnp.int32)
    state = emit(0, tok, jnp.zeros((batch,), bool), jnp.zeros((batch,), jnp.int32), tokens, seen)

    def cond(carry):
        i, _, done, *_ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, tok, done, lengths, tokens, seen, cache, key = carry
        # finished rows keep their state: the cache stays each row's true state
        if layers is None:
            logits, cache = decode_step(params, config, tok, cache, mask=~done, dtype=dtype,
                                        impl=impl)
        else:
            logits, cache = _decode_step_unrolled(params, layers, config, tok, cache,
                                                  mask=~done, dtype=dtype, impl=impl)
        key, sub = jax.random.split(key)
        new = sample_token(sub, logits, sampling, seen)
        tok, done, lengths, tokens, seen = emit(i, new, done, lengths, tokens, seen)
        return i + 1, tok, done, lengths, tokens, seen, cache, key

    if layers is not None:
        # carried per layer, so that no step slices or restacks the states
        cache = tuple(MixerState(c, s) for c, s in zip(cache.conv_state, cache.ssm_state,
                                                        strict=True))
    tok, done, lengths, tokens, seen = state
    carry = (jnp.asarray(1, jnp.int32), tok, done, lengths, tokens, seen, cache, key)
    _, _, _, lengths, tokens, _, cache, _ = jax.lax.while_loop(cond, body, carry)
    if layers is not None:
        cache = MambaCache(jnp.stack([s.conv for s in cache]), jnp.stack([s.ssm for s in cache]))
    return GenerationOutput(tokens, lengths, cache)


def _check_left_padding(mask: np.ndarray) -> None:
    m = mask != 0
    if not m[:, -1].all():
        rows = np.nonzero(~m[:, -1])[0].tolist()
        raise ValueError(f"generate: mask must be left padding (each row's last position "
                         f"real); rows {rows} end in padding")
    # left padding: once a row is real it stays real
    if (np.diff(m.astype(np.int8), axis=1) < 0).any():
        rows = np.nonzero((np.diff(m.astype(np.int8), axis=1) < 0).any(axis=1))[0].tolist()
        raise ValueError(f"generate: mask must be left padding (zeros, then ones); rows {rows} "
                         "have padding after a real token")


_MaskLike = (Bool[Array, "batch length"] | Int[Array, "batch length"]
             | Bool[np.ndarray, "batch length"] | Int[np.ndarray, "batch length"])


@jaxtyped(typechecker=beartype)
def prepare_generate(
    params: Params,
    config: MambaConfig,
    input_ids: Int[Array, "batch length"] | Int[np.ndarray, "batch length"],
    *,
    max_new_tokens: int,
    key: Array | None = None,
    mask: _MaskLike | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    callback: StreamCallback | None = None,
    dtype: Any = None,
    impl: str | ScanImplementation | None = None,
) -> tuple[tuple, dict[str, Any]]:
    """Check the arguments of `generate` (documented there) and return (args, static)
    with `_generate(*args, **static)` the generation; `_generate.lower(*args,
    **static).compile()` compiles it ahead of time (the sampler and the benchmark time
    it that way)."""
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    sampling = Sampling(float(temperature), int(top_k), float(top_p), float(min_p),
                        float(repetition_penalty))
    check_params(params, config)
    _check_ids("generate", config, input_ids)
    batch, length = np.shape(input_ids)
    if length == 0:
        raise ValueError("generate: the prompts are empty (length 0)")
    if key is None:
        if not sampling.greedy:
            raise ValueError("generate: key is required when sampling (temperature > 0); "
                             "pass e.g. key=jax.random.key(0), or temperature=0 for greedy")
        key = jax.random.key(0)
    elif not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    if mask is None:
        mask = np.ones((batch, length), bool)
    elif not isinstance(mask, jax.core.Tracer):
        _check_left_padding(np.asarray(mask))
    mask = as_bool_mask(mask)
    if eos_token_id is None:
        eos = config.eos_token_id
    elif isinstance(eos_token_id, int):
        eos = (eos_token_id,)
    else:
        eos = tuple(int(e) for e in eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (config.pad_token_id or 0)
    cd = jnp.dtype(dtype) if dtype is not None else jnp.result_type(
        params["backbone"]["embeddings"]["weight"])
    cpu = jax.default_backend() == "cpu"
    if impl is None:
        # nothing here is differentiated: the fastest forward, not the training default
        impl = "recurrent" if cpu else "auto"
    # On CPUs the decoding steps read per-layer copies of the layer weights (made here,
    # once per call: one more copy of them in memory while generating), see
    # `_decode_step_unrolled`, unless that copy would pass _UNROLL_MAX_BYTES; accelerators
    # read the stacked weights in place.
    layer_bytes = sum(a.nbytes for a in jax.tree.leaves(params["backbone"]["layers"]))
    unroll = cpu and layer_bytes <= _UNROLL_MAX_BYTES
    layers = (_unstack_layers(params["backbone"]["layers"], config.num_hidden_layers)
              if unroll else None)
    args = (params, jnp.asarray(input_ids, jnp.int32), mask, key, init_cache(config, batch, cd),
            layers)
    static = dict(config=config, sampling=sampling, max_new_tokens=int(max_new_tokens), eos=eos,
                  pad=int(pad), dtype=cd, impl=impl, callback=callback)
    return args, static


def generate(
    params: Params,
    config: MambaConfig,
    input_ids: Int[Array, "batch length"] | Int[np.ndarray, "batch length"],
    **options: Any,
) -> GenerationOutput:
    """Continue each prompt by up to max_new_tokens tokens.

    input_ids: (batch, length) prompts, left-padded to one length when they differ,
    with mask (batch, length) nonzero on the real tokens; every row then decodes from
    exactly the state its unpadded prompt gives. The keyword-only options are those of
    `prepare_generate`, which checks them: max_new_tokens (required); key, a PRNG key,
    required unless temperature is 0 (greedy); mask; the sampling settings temperature,
    top_k, top_p, min_p, repetition_penalty (see `Sampling`); eos_token_id, one id or
    several (default config.eos_token_id; () for none), after which a row stops;
    pad_token_id, which fills a row after its EOS (default config.pad_token_id, else
    0); callback, called as callback(step, tokens (batch,), done (batch,)) with NumPy
    arrays after each step, in order, from inside the compiled loop (streaming);
    dtype, the compute dtype (default the embedding's); impl, the scan for the prefill
    and the decoding steps (see `decode_step`), None for the fastest forward:
    "recurrent" on CPUs, else "auto".

    Returns GenerationOutput(tokens (batch, max_new_tokens) int32, lengths (batch,),
    the final cache). The cache buffers are donated to the compiled loop, which is
    cached per (config, shapes, sampling settings, callback).
    """
    args, static = prepare_generate(params, config, input_ids, **options)
    return _generate(*args, **static)
