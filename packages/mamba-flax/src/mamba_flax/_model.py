"""`MambaModel` (the backbone) and `MambaLM` (the causal LM) over `mamba_ssm_core.model`.

The layers are one `ResidualBlock` whose variables carry a leading layer axis, made with
`nnx.split_rngs` + `nnx.vmap`; the forward is the core's `backbone`, one `lax.scan` over
that axis, so the compiled program does not grow with depth.

Decoding state lives where `nnx.MultiHeadAttention` keeps it: `nnx.Cache` variables,
here the stacked mixer's conv_state (layers, *batch, K-1, I) and ssm_state
(layers, *batch, I, N), made by `init_cache(batch_shape)` and updated by calls with
`decode=True` and by `decode_step`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import Array
from jaxtyping import Float, Int
from mamba_ssm_core import (
    GenerationOutput,
    MambaCache,
    MambaConfig,
    ScanImplementation,
    backbone,
    decode_step,
    forward,
    generate,
    init_params,
    load_pretrained,
    save_pretrained,
)

from . import _convert
from ._block import ResidualBlock
from ._mixer import (
    MaskLike,
    batch_shape_of,
    flat_batch,
    read_state,
    write_state,
    zero_state,
)

_Ids = Int[Array, "*batch length"] | Int[np.ndarray, "*batch length"]
_Embeds = Float[Array, "*batch length hidden"]


def _stacked_blocks(config: MambaConfig, layers: Mapping[str, Any], *, dtype: Any, impl: Any,
                    decode: bool) -> ResidualBlock:
    """One ResidualBlock holding the core's stacked layer dict: its skeleton is made
    abstractly with nnx.split_rngs + nnx.vmap over the layers, then filled by path."""
    param_dtype = _convert.storage_dtype(layers)

    @nnx.split_rngs(splits=config.num_hidden_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs: nnx.Rngs) -> ResidualBlock:
        return ResidualBlock.from_config(config, dtype=dtype, param_dtype=param_dtype,
                                         impl=impl, decode=decode, rngs=rngs)

    abstract = nnx.eval_shape(lambda: make(nnx.Rngs(0)))
    return _convert.fill(abstract, layers, "", "MambaModel.layers")


class MambaModel(_convert.CoreModule):
    """The Mamba backbone: embeddings (`nnx.Embed`, (V, H)), the residual blocks
    (`layers`, one `ResidualBlock` stacked on a leading layer axis), norm_f
    (`nnx.RMSNorm`). Token ids (*batch, length) -> hidden states (*batch, length, H).
    """

    _core_prefix = "backbone."

    def __init__(
        self,
        config: MambaConfig,
        *,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        impl: str | ScanImplementation = "auto",
        decode: bool = False,
        rngs: nnx.Rngs,
    ):
        """config: the model's sizes (`MambaConfig`, e.g. from `MambaConfig.from_json_file`).
        dtype: the compute dtype (None: the embedding's). param_dtype: the storage dtype
        (A_log, D, dt_proj.bias stay float32). impl: the selective-scan implementation.
        decode: whether calls continue from the nnx.Cache state by default.
        rngs: draws the official initialisation (`mamba_ssm_core.init_params`)."""
        p = init_params(rngs.params(), config, dtype=param_dtype)["backbone"]
        H, V = config.hidden_size, config.vocab_size
        g = _convert.given
        self.embeddings = nnx.Embed(V, H, dtype=dtype, param_dtype=param_dtype,
                                    embedding_init=g(p["embeddings"]["weight"]), rngs=rngs)
        self.layers = _stacked_blocks(config, p["layers"], dtype=dtype, impl=impl,
                                      decode=decode)
        self.norm_f = nnx.RMSNorm(H, epsilon=config.layer_norm_epsilon, dtype=dtype,
                                  param_dtype=param_dtype, scale_init=g(p["norm_f"]["weight"]),
                                  rngs=rngs)
        self.config = config
        self.dtype = None if dtype is None else jnp.dtype(dtype)
        self.impl = impl
        self.decode = decode

    def layer(self, i: int) -> ResidualBlock:
        """Block i, unstacked (a new module holding slices of the parameters)."""
        graphdef, state = nnx.split(self.layers)
        return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))

    def compute_dtype(self) -> Any:
        """The dtype the model computes in: dtype, else the embedding's."""
        return self.dtype or jnp.dtype(self.embeddings.embedding.dtype)

    def init_cache(self, batch_shape: int | tuple[int, ...] = (), dtype: Any = None) -> None:
        """Make zero nnx.Cache decoding state for inputs with leading axes `batch_shape`:
        every layer's conv_state (layers, *batch, K-1, I) in `dtype` (default: the compute
        dtype) and ssm_state (layers, *batch, I, N) float32, on the stacked mixer."""
        batch = batch_shape_of(batch_shape)
        state = zero_state(self.config, batch, dtype or self.compute_dtype())
        L = self.config.num_hidden_layers
        mixer = self.layers.mixer
        mixer.conv_state = nnx.Cache(jnp.broadcast_to(state.conv, (L, *state.conv.shape)))
        mixer.ssm_state = nnx.Cache(jnp.broadcast_to(state.ssm, (L, *state.ssm.shape)))

    def _read_cache(self, lead: tuple[int, ...], op: str) -> MambaCache:
        """The nnx.Cache state as the core's MambaCache (batch flattened)."""
        state = read_state(self.layers.mixer, lead, self.config.num_hidden_layers, op)
        return MambaCache(state.conv, state.ssm)

    def _write_cache(self, cache: MambaCache) -> None:
        write_state(self.layers.mixer, cache.conv_state, cache.ssm_state)

    def __call__(
        self,
        input_ids: _Ids | None = None,
        *,
        inputs_embeds: _Embeds | None = None,
        mask: MaskLike | None = None,
        decode: bool | None = None,
    ) -> Float[Array, "*batch length hidden"]:
        """input_ids: (*batch, length) in [0, vocab_size), or inputs_embeds
        (*batch, length, H). mask: (*batch, length), nonzero on real tokens (left padding).
        decode (default: the module's): continue from the nnx.Cache state and update it
        (prefill, chunked prefill, one-token steps).

        Returns the normalised hidden states (*batch, length, H) in the compute dtype."""
        hidden, _ = _run(self, backbone, self.config, self.to_params(), input_ids, inputs_embeds,
                         mask, decode)
        return hidden


def _run(model: MambaModel, fn: Callable, config: MambaConfig, params: Any, input_ids: Any,
         inputs_embeds: Any, mask: Any, decode: bool | None) -> tuple[Array, tuple[int, ...]]:
    """fn (the core's backbone or forward) on flattened leading axes, with the nnx.Cache
    state when decoding; returns (output with the leading axes restored, the leading axes)."""
    op = type(model).__name__
    decode = model.decode if decode is None else decode
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError(f"{op}: give exactly one of input_ids and inputs_embeds")
    if input_ids is not None:
        ids, lead = flat_batch(jnp.asarray(input_ids), 1, "input_ids", op)
        embeds = None
        length = ids.shape[1]
    else:
        ids = None
        embeds, lead = flat_batch(inputs_embeds, 2, "inputs_embeds", op)
        length = embeds.shape[1]
    m = None if mask is None else jnp.asarray(mask).reshape(-1, length)
    cache = model._read_cache(lead, op) if decode else None
    out = fn(params, config, ids, inputs_embeds=embeds, cache=cache, mask=m, impl=model.impl,
             dtype=model.dtype)
    if cache is not None:
        out, new_cache = out
        model._write_cache(new_cache)
    return out.reshape(*lead, *out.shape[1:]), lead


class MambaLM(_convert.CoreModule):
    """The Mamba causal language model: `backbone` (`MambaModel`) and `lm_head`
    (`nnx.Linear` (H, V) without bias; None when config.tie_word_embeddings, the embedding
    matrix is the head). Token ids (*batch, length) -> float32 logits (*batch, length, V).
    """

    def __init__(
        self,
        config: MambaConfig,
        *,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        impl: str | ScanImplementation = "auto",
        decode: bool = False,
        rngs: nnx.Rngs,
    ):
        """Arguments as for `MambaModel`. A fresh model holds exactly
        `mamba_ssm_core.init_params(rngs.params(), config, dtype=param_dtype)`."""
        params = init_params(rngs.params(), config, dtype=param_dtype)
        self.backbone = MambaModel.from_params(config, {"backbone": params["backbone"]},
                                               dtype=dtype, impl=impl, decode=decode)
        if config.tie_word_embeddings:
            self.lm_head: nnx.Linear | None = nnx.data(None)
        else:
            self.lm_head = nnx.Linear(
                config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype,
                param_dtype=param_dtype, kernel_init=_convert.given(params["lm_head"]["weight"].T),
                rngs=rngs)
        self.config = config

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        *,
        dtype: Any = None,
        param_dtype: Any = None,
        impl: str | ScanImplementation = "auto",
        decode: bool = False,
        **load_kwargs: Any,
    ) -> MambaLM:
        """Load a transformers or original state-spaces checkpoint (a folder or a hub repo
        id) with `mamba_ssm_core.load_pretrained`, then `from_params` (no random numbers
        drawn). dtype: the compute dtype; param_dtype: the storage dtype (None keeps the
        stored one; A_log, D, dt_proj.bias stay float32); load_kwargs (revision,
        cache_dir, ...) go to load_pretrained."""
        config, params = load_pretrained(path_or_repo_id, dtype=param_dtype, **load_kwargs)
        return cls.from_params(config, params, dtype=dtype, impl=impl, decode=decode)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write config.json and model.safetensors in the transformers format
        (`mamba_ssm_core.save_pretrained`)."""
        save_pretrained(self.config, self.to_params(), path)

    def set_view(self, decode: bool | None = None) -> None:
        """For `nnx.view`: decode, whether calls continue from the cache by default."""
        if decode is not None:
            self.backbone.decode = decode

    def init_cache(self, batch_shape: int | tuple[int, ...] = (), dtype: Any = None) -> None:
        """Make zero nnx.Cache decoding state (see `MambaModel.init_cache`)."""
        self.backbone.init_cache(batch_shape, dtype)

    def __call__(
        self,
        input_ids: _Ids | None = None,
        *,
        inputs_embeds: _Embeds | None = None,
        mask: MaskLike | None = None,
        decode: bool | None = None,
    ) -> Float[Array, "*batch length vocab"]:
        """Logits (*batch, length, vocab_size) float32 for input_ids (*batch, length) (or
        inputs_embeds (*batch, length, H)). mask, decode: as for `MambaModel`."""
        logits, _ = _run(self.backbone, forward, self.config, self.to_params(), input_ids,
                         inputs_embeds, mask, decode)
        return logits

    def decode_step(
        self, token: Int[Array, "*batch"] | Int[np.ndarray, "*batch"]
    ) -> Float[Array, "*batch vocab"]:
        """One cached step, O(1) in the length so far: token (*batch,) -> logits
        (*batch, vocab_size) float32; the nnx.Cache state moves on by one token."""
        tok, lead = flat_batch(jnp.asarray(token)[..., None], 1, "token", "MambaLM.decode_step")
        bb = self.backbone
        logits, cache = decode_step(self.to_params(), self.config, tok[:, 0],
                                    bb._read_cache(lead, "MambaLM.decode_step"), dtype=bb.dtype)
        bb._write_cache(cache)
        return logits.reshape(*lead, -1)

    def generate(
        self,
        input_ids: Int[Array, "*batch length"] | Int[np.ndarray, "*batch length"],
        *,
        max_new_tokens: int,
        key: Array | None = None,
        mask: MaskLike | None = None,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        callback: Callable[[int, Any, Any], Any] | None = None,
        impl: str | ScanImplementation | None = None,
    ) -> GenerationOutput:
        """Continue prompts with `mamba_ssm_core.generate`: prefill, then one compiled
        `lax.while_loop` of O(1) steps (see it for the sampling arguments).

        input_ids: (*batch, length), left-padded with mask when the prompts differ in
        length. key: a PRNG key (e.g. `rngs.sample()`), required unless temperature is 0.
        impl: the prefill's scan (None: the core's choice for generation).
        Returns GenerationOutput(tokens (*batch, max_new_tokens) int32, lengths (*batch,),
        cache: the core's MambaCache (layers, *batch, ...), the state before the last
        token). The module's own nnx.Cache state is neither read nor changed."""
        ids, lead = flat_batch(jnp.asarray(input_ids), 1, "input_ids", "MambaLM.generate")
        m = None if mask is None else jnp.asarray(mask).reshape(ids.shape)
        out = generate(self.to_params(), self.config, ids, max_new_tokens=max_new_tokens,
                       key=key, mask=m, temperature=temperature, top_k=top_k, top_p=top_p,
                       min_p=min_p, repetition_penalty=repetition_penalty,
                       eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                       callback=callback, dtype=self.backbone.dtype, impl=impl)
        L = self.config.num_hidden_layers
        cache = MambaCache(*(a.reshape(L, *lead, *a.shape[2:]) for a in out.cache))
        return GenerationOutput(out.tokens.reshape(*lead, -1), out.lengths.reshape(lead), cache)
