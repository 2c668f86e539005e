"""`MambaCausalLM`: the backbone and the LM head, over `mamba_ssm_core.forward` and
`mamba_ssm_core.generate`."""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Callable, Sequence
from typing import Any

import jax
import keras
import numpy as np
from jax import Array
from jaxtyping import Float, Int
from mamba_ssm_core import (
    GenerationOutput,
    MambaCache,
    MambaConfig,
    decode_step,
    forward,
    generate,
    init_params,
    load_pretrained,
    param_shapes,
    save_pretrained,
)

from . import _config
from ._backbone import MambaBackbone
from ._config import IdsLike, MaskLike
from ._weights import CoreWeights, fresh, stack_arrays


@keras.saving.register_keras_serializable(package="mamba_keras")
class MambaCausalLM(CoreWeights, keras.Model):
    """The Mamba causal language model: a `MambaBackbone` and the LM head (the embedding
    matrix when tie_word_embeddings, else its own lm_head.weight (V, H)).

    Call: token_ids (batch, length) int -> logits (batch, length, vocab_size), float32
    whatever the dtype policy (the core computes them in the compute dtype with float32
    accumulation). padding_mask (batch, length): true on real tokens (left padding).
    Train it with `compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))`
    and `fit`.

    Decoding: `init_cache(batch_size)`, `call_with_cache(token_ids, cache)` (prefill),
    `decode_step(token, cache)` (O(1) per token), or `generate(...)`, the core's whole
    compiled loop. `from_pretrained` reads Hugging Face (transformers or state-spaces)
    checkpoints; `save_pretrained` writes the transformers format.

    Arguments: backbone; tie_word_embeddings; bos/eos/pad_token_id (generation
    defaults; eos_token_id one id or a list).
    """

    # Keras reads this signature with inspect.getfullargspec, which a type-checking
    # wrapper (jaxtyping's import hook) would hide.
    @typing.no_type_check
    def __init__(
        self,
        backbone: MambaBackbone,
        tie_word_embeddings: bool = True,
        bos_token_id: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if not isinstance(backbone, MambaBackbone):
            raise TypeError(f"MambaCausalLM: backbone must be a MambaBackbone, got "
                            f"{type(backbone).__name__}")
        self.backbone = backbone
        self.tie_word_embeddings = tie_word_embeddings
        self.bos_token_id = bos_token_id
        self.eos_token_id = (eos_token_id if eos_token_id is None or isinstance(eos_token_id, int)
                             else list(eos_token_id))
        self.pad_token_id = pad_token_id
        self._init_core_weights()
        eos = self.eos_token_id
        self._config = dataclasses.replace(
            backbone.mamba_config, tie_word_embeddings=tie_word_embeddings,
            bos_token_id=bos_token_id, pad_token_id=pad_token_id,
            eos_token_id=() if eos is None else (eos,) if isinstance(eos, int) else tuple(eos))

    # --- construction --------------------------------------------------------------------

    @classmethod
    def from_mamba_config(
        cls, config: MambaConfig, *, impl: str = "auto", seed: int | None = None,
        dtype: Any = None, name: str | None = None,
    ) -> MambaCausalLM:
        """An (unbuilt) LM for `config`: impl and seed go to the backbone, dtype (a Keras
        dtype policy or its name) to both."""
        backbone = MambaBackbone.from_mamba_config(config, impl=impl, seed=seed, dtype=dtype)
        return cls(backbone, tie_word_embeddings=config.tie_word_embeddings,
                   bos_token_id=config.bos_token_id,
                   eos_token_id=list(config.eos_token_id) or None,
                   pad_token_id=config.pad_token_id, dtype=dtype, name=name)

    @classmethod
    def from_pretrained(
        cls, path_or_repo_id: str | os.PathLike, *, dtype: Any = None, impl: str = "auto",
        **load_kwargs: Any,
    ) -> MambaCausalLM:
        """Load a transformers or original state-spaces checkpoint (a local folder or a hub
        repo id) with `mamba_ssm_core.load_pretrained`.

        dtype: a Keras dtype policy or its name ("float32", "bfloat16",
        "mixed_bfloat16"), default the global policy; the weights are loaded in its
        variable dtype (A_log, D, dt_proj.bias in float32). load_kwargs (revision,
        cache_dir, ...) go to the loader.
        """
        policy = keras.dtype_policies.get(dtype) if dtype is not None else (
            keras.config.dtype_policy())
        config, params = load_pretrained(path_or_repo_id, dtype=policy.variable_dtype,
                                         **load_kwargs)
        lm = cls.from_mamba_config(config, impl=impl, dtype=policy)
        lm.load_params(params)
        return lm

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write config.json and model.safetensors in the transformers format."""
        save_pretrained(self._config, self.to_params(), path)

    @property
    def mamba_config(self) -> MambaConfig:
        """The model's `MambaConfig`."""
        return self._config

    # --- weights -------------------------------------------------------------------------

    def _expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return param_shapes(self._config)

    def _build_input_shape(self) -> tuple[Any, ...]:
        return (None, None)

    def _core_tree(self, get: Any, stack: Any = stack_arrays) -> dict[str, Any]:
        params = self.backbone._core_tree(get, stack)
        if not self.tie_word_embeddings:
            params["lm_head"] = {"weight": get(self._core_vars["lm_head.weight"])}
        return params

    def build(self, input_shape: Any = None) -> None:
        source = self._take_pending()
        if not self.backbone.built:
            # the whole model at once, as the core initialises it
            source = source or fresh(init_params, self._config, self.backbone.seed)
            self.backbone._set_pending(source.sub(lambda p: {"backbone": p["backbone"]}))
            self.backbone.build(self._build_input_shape())
        if not self.tie_word_embeddings:
            # a built backbone was given: a fresh head alone
            source = source or fresh(
                init_params, dataclasses.replace(self._config, num_hidden_layers=1),
                self.backbone.seed)
            self._add_core_weight("lm_head.weight", source)

    # --- calls ---------------------------------------------------------------------------

    def call(
        self, token_ids: IdsLike, padding_mask: MaskLike | None = None
    ) -> Float[Array, "batch length vocab"]:
        return forward(self.to_params(), self._config, token_ids,
                       mask=padding_mask, impl=self.backbone.impl,
                       dtype=self.compute_dtype)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return (*tuple(input_shape), self._config.vocab_size)

    def compute_output_spec(self, token_ids: Any, padding_mask: Any = None) -> Any:
        # float32 logits under any policy, as the core computes them
        return keras.KerasTensor(self.compute_output_shape(token_ids.shape), dtype="float32")

    def init_cache(self, batch_size: int) -> MambaCache:
        """A zero decoding cache (see `MambaBackbone.init_cache`)."""
        return self.backbone.init_cache(batch_size)

    def call_with_cache(
        self, token_ids: IdsLike, cache: MambaCache, padding_mask: MaskLike | None = None
    ) -> tuple[Float[Array, "batch length vocab"], MambaCache]:
        """Logits for token_ids continuing from `cache`, and the updated cache (prefill,
        chunked prefill, or single steps)."""
        self._ensure_built()
        return forward(self.to_params(), self._config, token_ids, cache=cache,
                       mask=padding_mask, impl=self.backbone.impl,
                       dtype=self.compute_dtype)

    def decode_step(
        self, token: Int[Array, " batch"] | Int[np.ndarray, " batch"], cache: MambaCache
    ) -> tuple[Float[Array, "batch vocab"], MambaCache]:
        """One cached step, O(1) in the length so far: token (batch,) -> (logits
        (batch, vocab_size) float32, the new cache)."""
        self._ensure_built()
        return decode_step(self.to_params(), self._config, token, cache,
                           dtype=self.compute_dtype)

    def generate(
        self,
        token_ids: IdsLike,
        *,
        max_new_tokens: int,
        seed: int | Array | None = None,
        padding_mask: MaskLike | None = None,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        callback: Callable[[int, Any, Any], Any] | None = None,
    ) -> GenerationOutput:
        """Continue each prompt of token_ids (batch, length), left-padded with
        padding_mask when they differ in length, by up to max_new_tokens tokens with
        `mamba_ssm_core.generate` (the prefill, then one compiled loop of O(1) steps;
        see it for the sampling arguments). temperature 0 is greedy.

        seed: an int or a JAX PRNG key; None draws one from Python's `random` when
        sampling (reproducible after keras.utils.set_random_seed). eos_token_id and
        pad_token_id default to the model's.
        Returns GenerationOutput(tokens (batch, max_new_tokens) int32, lengths (batch,),
        the final cache).
        """
        self._ensure_built()
        if isinstance(seed, int):
            key = jax.random.key(seed)
        elif seed is None:
            key = None if temperature == 0 else jax.random.key(_config.draw_seed(None))
        else:
            key = seed
        impl = None if self.backbone.impl == "auto" else self.backbone.impl
        return generate(
            self.to_params(), self._config, token_ids, max_new_tokens=max_new_tokens, key=key,
            mask=padding_mask, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
            repetition_penalty=repetition_penalty, eos_token_id=eos_token_id,
            pad_token_id=pad_token_id, callback=callback, dtype=self.compute_dtype, impl=impl)

    # --- serialisation -------------------------------------------------------------------

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (self.eos_token_id if self.eos_token_id is None
                             or isinstance(self.eos_token_id, int) else list(self.eos_token_id)),
            "pad_token_id": self.pad_token_id,
        })
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MambaCausalLM:
        config = dict(config)
        if isinstance(config.get("backbone"), dict):
            config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        return cls(**config)
