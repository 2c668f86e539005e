"""`MambaModel` (the backbone) and `MambaLM` (the causal LM) over `mamba_ssm_core.model`.

Decoding state is explicit: `init_cache()` gives a zero `MambaCache` for one example,
a call with `cache=` returns (output, new cache), and `decode_step(token, cache)`
returns (logits, new cache). An unbatched cache has conv_state (layers, K-1, I) in
the compute dtype and ssm_state (layers, I, N) float32; vmap it with the batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import Array
from jaxtyping import Bool, Float, Int, PRNGKeyArray
from mamba_ssm_core import (
    GenerationOutput,
    MambaCache,
    MambaConfig,
    backbone,
    decode_step,
    forward,
    generate,
    init_cache,
    init_params,
    load_pretrained,
    save_pretrained,
)

from . import _containers as c
from ._block import ResidualBlock
from ._mixer import add_batch, drop_batch

# The unbatched cache puts the batch axis of the core's (layers, batch, ...) back at 1.
_CACHE_BATCH_AXIS = 1


def _batch_cache(cache: MambaCache | None) -> MambaCache | None:
    return add_batch(cache, _CACHE_BATCH_AXIS)


def _unbatch_cache(cache: MambaCache) -> MambaCache:
    return drop_batch(cache, _CACHE_BATCH_AXIS)


class MambaModel(eqx.Module):
    """The Mamba backbone: embedding, the residual blocks, the final RMSNorm.

    Takes one sequence of token ids; `jax.vmap` it over a batch. `layers` is one
    `ResidualBlock` whose arrays are stacked on a leading layer axis (the core runs
    them with `lax.scan`); `layer(i)` gives block i.
    """

    embeddings: eqx.nn.Embedding
    layers: ResidualBlock
    norm_f: eqx.nn.RMSNorm
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
        """key: a fresh, official initialisation (`mamba_ssm_core.params.init_params`,
        parameters in `dtype`, A_log, D and dt_proj.bias float32); or params: the core's
        {"backbone": ...} to hold as is. compute_dtype: what the model computes in, None
        for the embedding's dtype. impl: the selective-scan implementation."""
        params = c.key_or_params("MambaModel", key, params,
                                 lambda k: init_params(k, config, dtype=dtype))
        p = params["backbone"]
        H = config.hidden_size
        self.embeddings = c.embedding(p["embeddings"]["weight"], config.vocab_size, H)
        self.layers = ResidualBlock(config, params=p["layers"], compute_dtype=compute_dtype,
                                    impl=impl)
        self.norm_f = c.rms_norm(p["norm_f"]["weight"], H, config.layer_norm_epsilon)
        self.config = config
        self.compute_dtype = None if compute_dtype is None else jnp.dtype(compute_dtype)
        self.impl = impl

    def to_params(self) -> dict[str, Any]:
        """The parameters in the core's layout, {"backbone": ...} (layers stacked)."""
        return {"backbone": {
            "embeddings": {"weight": self.embeddings.weight},
            "layers": self.layers.to_params(),
            "norm_f": {"weight": self.norm_f.weight},
        }}

    def layer(self, i: int) -> ResidualBlock:
        """Block i, unstacked."""
        return jax.tree.map(lambda a: a[i], self.layers)

    def init_cache(self, dtype: Any = None) -> MambaCache:
        """A zero decoding cache for one sequence; `dtype` is the compute dtype (default:
        compute_dtype, else the embedding's dtype)."""
        dtype = dtype or self.compute_dtype or self.embeddings.weight.dtype
        return _unbatch_cache(init_cache(self.config, 1, dtype))

    def __call__(
        self,
        input_ids: Int[Array, " length"],
        *,
        cache: MambaCache | None = None,
        mask: Bool[Array, " length"] | Int[Array, " length"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "length hidden"] | tuple[Float[Array, "length hidden"], MambaCache]:
        """input_ids: (length,) in [0, vocab_size). cache: continue from it (prefill,
        chunked prefill, one-token steps) and return it updated. mask: (length,), nonzero
        for real tokens (left padding). Returns the normalised hidden states (length, H)
        in the compute dtype, and with a cache (hidden, new cache). key is unused."""
        del key
        out = backbone(self.to_params(), self.config, input_ids[None],
                       cache=_batch_cache(cache), mask=None if mask is None else mask[None],
                       impl=self.impl, dtype=self.compute_dtype)
        if cache is None:
            return out[0]
        hidden, new_cache = out
        return hidden[0], _unbatch_cache(new_cache)


class MambaLM(eqx.Module):
    """The Mamba causal language model: `MambaModel` and the LM head (the embedding
    matrix when config.tie_word_embeddings, else `lm_head`). Takes one sequence;
    `jax.vmap` it over a batch. Logits are float32."""

    backbone: MambaModel
    lm_head: eqx.nn.Linear | None

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
        """key: a fresh, official initialisation; or params: the core's full parameter
        pytree to hold as is. dtype, compute_dtype, impl: as for `MambaModel`."""
        params = c.key_or_params("MambaLM", key, params,
                                 lambda k: init_params(k, config, dtype=dtype))
        self.backbone = MambaModel(config, params={"backbone": params["backbone"]},
                                   compute_dtype=compute_dtype, impl=impl)
        self.lm_head = (None if config.tie_word_embeddings else
                        c.linear(params["lm_head"], config.hidden_size, config.vocab_size))

    @property
    def config(self) -> MambaConfig:
        return self.backbone.config

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        *,
        dtype: Any = None,
        compute_dtype: Any = None,
        impl: Any = "auto",
        **load_kwargs: Any,
    ) -> MambaLM:
        """Load a transformers or original state-spaces checkpoint (a folder or a hub repo
        id) with `mamba_ssm_core.checkpoint.load_pretrained`. dtype: the parameters' dtype
        (None keeps the stored one); load_kwargs (revision, cache_dir, ...) go to it."""
        config, params = load_pretrained(path_or_repo_id, dtype=dtype, **load_kwargs)
        return cls(config, params=params, compute_dtype=compute_dtype, impl=impl)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write config.json and model.safetensors in the transformers format."""
        save_pretrained(self.config, self.to_params(), path)

    def to_params(self) -> dict[str, Any]:
        """The parameters in the core's layout (`mamba_ssm_core.params`)."""
        params = self.backbone.to_params()
        if self.lm_head is not None:
            params["lm_head"] = c.linear_params(self.lm_head)
        return params

    def init_cache(self, dtype: Any = None) -> MambaCache:
        """A zero decoding cache for one sequence (see `MambaModel.init_cache`)."""
        return self.backbone.init_cache(dtype)

    def __call__(
        self,
        input_ids: Int[Array, " length"],
        *,
        cache: MambaCache | None = None,
        mask: Bool[Array, " length"] | Int[Array, " length"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "length vocab"] | tuple[Float[Array, "length vocab"], MambaCache]:
        """Logits (length, vocab_size) float32 for input_ids (length,); with a cache,
        (logits, new cache). mask: as for `MambaModel`. key is unused."""
        del key
        bb = self.backbone
        out = forward(self.to_params(), self.config, input_ids[None], cache=_batch_cache(cache),
                      mask=None if mask is None else mask[None], impl=bb.impl,
                      dtype=bb.compute_dtype)
        if cache is None:
            return out[0]
        logits, new_cache = out
        return logits[0], _unbatch_cache(new_cache)

    def decode_step(
        self, token: Int[Array, ""], cache: MambaCache
    ) -> tuple[Float[Array, " vocab"], MambaCache]:
        """One cached decoding step, O(1) in the length so far: token () -> (logits
        (vocab_size,) float32, the new cache)."""
        logits, new_cache = decode_step(self.to_params(), self.config, token[None],
                                        _batch_cache(cache), dtype=self.backbone.compute_dtype)
        return logits[0], _unbatch_cache(new_cache)

    def generate(
        self,
        input_ids: Int[Array, " length"] | Int[Array, "batch length"],
        *,
        max_new_tokens: int,
        key: PRNGKeyArray | None = None,
        mask: Bool[Array, "*batch length"] | Int[Array, "*batch length"] | None = None,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        callback: Callable[[int, Any, Any], Any] | None = None,
    ) -> GenerationOutput:
        """Continue a prompt with `mamba_ssm_core.generate` (prefill, then one compiled
        `lax.while_loop` of O(1) steps; see it for the sampling arguments).

        The loop is compiled over the batch, so besides one prompt (length,) this also
        takes a left-padded batch (batch, length) with its mask, rather than being vmapped.
        key: required unless temperature is 0 (greedy). Returns GenerationOutput(tokens
        (*batch, max_new_tokens) int32, lengths (*batch,), cache); for one prompt the cache
        is unbatched, as `init_cache` gives it, and continues with `decode_step`.
        """
        single = input_ids.ndim == 1
        ids = input_ids[None] if single else input_ids
        if mask is not None and single:
            mask = mask[None]
        bb = self.backbone
        out = generate(self.to_params(), self.config, ids, max_new_tokens=max_new_tokens,
                       key=key, mask=mask, temperature=temperature, top_k=top_k, top_p=top_p,
                       min_p=min_p, repetition_penalty=repetition_penalty,
                       eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                       callback=callback, dtype=bb.compute_dtype, impl=bb.impl)
        if not single:
            return out
        return GenerationOutput(out.tokens[0], out.lengths[0], _unbatch_cache(out.cache))
