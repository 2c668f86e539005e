"""The Mamba (Mamba-1) language-model configuration, read from either checkpoint family.

`MambaConfig` is frozen and hashable, so it can be a static argument of `jax.jit`.
Its field names are those of the transformers format (`model_type: mamba`), which
is also what `save_pretrained` writes.

Two `config.json` families are read:

* transformers (`MambaForCausalLM`): hidden_size, state_size, num_hidden_layers,
  expand, conv_kernel, time_step_rank, use_bias, use_conv_bias, layer_norm_epsilon,
  residual_in_fp32, vocab_size, ... Every architecture key must be in the file: the
  transformers class defaults (32 layers, vocab 50280, ...) match no released
  checkpoint, so a missing one is an error rather than a guess. Only
  `tie_word_embeddings`, which older transformers versions left out when it had
  its default, defaults to True, and the initialisation-only keys (time_step_min,
  ...) default to the official values.
* the original state-spaces format (`MambaLMHeadModel`): d_model, n_layer,
  vocab_size, ssm_cfg, rms_norm, residual_in_fp32, fused_add_norm,
  pad_vocab_size_multiple, tie_embeddings. Keys the file leaves out take the
  defaults of the original `MambaConfig` and `Mamba` classes, as the original
  loader does; the vocabulary is padded to a multiple of pad_vocab_size_multiple.

Anything else is refused with a ValueError naming the key: Mamba-2 and hybrid
(attention or MLP) configs, LayerNorm instead of RMSNorm, another activation,
unknown keys.

`MambaConfig.for_mixer` builds the config of a standalone mixer or residual block
(no vocabulary) from sizes, with the original `Mamba` layer's defaults.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from beartype import beartype

_INIT_SCHEMES = ("random", "constant")

# Generic keys of transformers' PretrainedConfig (and what the hub adds) that say
# nothing about the architecture; they are accepted and ignored.
_HF_GENERIC_KEYS = frozenset({
    "_name_or_path", "_attn_implementation_autoset", "_commit_hash", "add_cross_attention",
    "architectures", "bad_words_ids", "begin_suppress_tokens", "chunk_size_feed_forward",
    "cross_attention_hidden_size", "decoder_start_token_id", "diversity_penalty", "do_sample",
    "dtype", "early_stopping", "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty",
    "finetuning_task", "forced_bos_token_id", "forced_eos_token_id", "id2label",
    "is_decoder", "is_encoder_decoder", "label2id", "length_penalty", "max_length",
    "min_length", "no_repeat_ngram_size", "num_beam_groups", "num_beams",
    "num_return_sequences", "output_attentions", "output_hidden_states", "output_scores",
    "prefix", "problem_type", "pruned_heads", "remove_invalid_values", "repetition_penalty",
    "return_dict", "return_dict_in_generate", "sep_token_id", "suppress_tokens",
    "task_specific_params", "temperature", "tf_legacy_loss", "tie_encoder_decoder",
    "tokenizer_class", "top_k", "top_p", "torch_dtype", "torchscript", "transformers_version",
    "typical_p", "use_bfloat16", "use_cache",
    # transformers' MambaConfig options that select a PyTorch code path, not the math.
    "use_mambapy", "use_associative_scan", "initializer_range",
})

# Architecture keys of the transformers format that must be in the file.
_HF_REQUIRED = (
    "vocab_size", "hidden_size", "state_size", "num_hidden_layers", "expand", "conv_kernel",
    "time_step_rank", "use_bias", "use_conv_bias", "layer_norm_epsilon", "residual_in_fp32",
)

# Original-format keys and the defaults of state-spaces' `MambaConfig`.
_ORIG_DEFAULTS: dict[str, Any] = {
    "ssm_cfg": {}, "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
    "pad_vocab_size_multiple": 8, "tie_embeddings": True, "d_intermediate": 0,
    "attn_layer_idx": [], "attn_cfg": {}, "norm_epsilon": 1e-5,
}
# `Mamba` (mamba_simple.py) constructor defaults for ssm_cfg.
_SSM_DEFAULTS: dict[str, Any] = {
    "d_state": 16, "d_conv": 4, "expand": 2, "dt_rank": "auto", "dt_min": 0.001,
    "dt_max": 0.1, "dt_init": "random", "dt_scale": 1.0, "dt_init_floor": 1e-4,
    "conv_bias": True, "bias": False, "use_fast_path": True, "layer": "Mamba1",
}
_MAMBA2_SSM_KEYS = frozenset({
    "headdim", "ngroups", "d_ssm", "chunk_size", "rmsnorm", "norm_before_gate", "A_init_range",
    "D_has_hdim", "dt_limit", "learnable_init_states", "activation",
})


class ConfigError(ValueError):
    """A config.json (or a MambaConfig) that this library cannot run, and why."""


def _err(source: str, msg: str) -> ConfigError:
    return ConfigError(f"{source}: {msg}")


def _int(source: str, key: str, v: Any, *, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int | float) or int(v) != v:
        raise _err(source, f"{key} must be an integer, got {v!r}")
    if v < minimum:
        raise _err(source, f"{key} must be >= {minimum}, got {v!r}")
    return int(v)


def _float(source: str, key: str, v: Any, *, positive: bool = True) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise _err(source, f"{key} must be a finite number, got {v!r}")
    if positive and v <= 0:
        raise _err(source, f"{key} must be > 0, got {v!r}")
    return float(v)


def _bool(source: str, key: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise _err(source, f"{key} must be true or false, got {v!r}")
    return v


def _auto_rank(hidden_size: int) -> int:
    """The original's dt_rank "auto": ceil(hidden_size / 16)."""
    return math.ceil(hidden_size / 16)


def _token_id(source: str, key: str, v: Any) -> int | None:
    if v is None:
        return None
    return _int(source, key, v, minimum=0)


def _token_ids(source: str, key: str, v: Any) -> tuple[int, ...]:
    if v is None:
        return ()
    if isinstance(v, list | tuple):
        return tuple(_int(source, key, t, minimum=0) for t in v)
    return (_int(source, key, v, minimum=0),)


@dataclasses.dataclass(frozen=True)
class MambaConfig:
    """Architecture of a Mamba-1 language model (field names of the transformers format).

    vocab_size: rows of the embedding and of the logits (after any padding).
    hidden_size (H), state_size (N), num_hidden_layers (L), expand (intermediate
    size I = expand * H), conv_kernel (K), time_step_rank (R): the sizes.
    use_bias: biases on in_proj and out_proj; use_conv_bias: bias on the conv.
    layer_norm_epsilon: RMSNorm epsilon. residual_in_fp32: carry the residual stream
    in float32 whatever the compute dtype. tie_word_embeddings: the LM head is the
    embedding matrix.

    time_step_min / max / floor / scale / init_scheme and rescale_prenorm_residual
    are used by `init_params` only. bos/eos/pad_token_id come from the file when it
    has them (eos_token_id is a tuple, possibly empty). pad_vocab_size_multiple is
    the original format's padding (1 when the file had none); vocab_size is
    already padded.

    MIXER_FIELDS and BLOCK_FIELDS name the fields, besides hidden_size and
    num_hidden_layers, that a standalone mixer or residual block reads (the keyword
    arguments of `for_mixer` that describe it).
    """

    MIXER_FIELDS: ClassVar[tuple[str, ...]] = (
        "state_size", "expand", "conv_kernel", "time_step_rank", "use_bias", "use_conv_bias",
        "time_step_min", "time_step_max", "time_step_floor", "time_step_scale",
        "time_step_init_scheme", "rescale_prenorm_residual",
    )
    BLOCK_FIELDS: ClassVar[tuple[str, ...]] = (
        *MIXER_FIELDS, "layer_norm_epsilon", "residual_in_fp32")

    vocab_size: int
    hidden_size: int
    state_size: int
    num_hidden_layers: int
    expand: int
    conv_kernel: int
    time_step_rank: int
    use_bias: bool
    use_conv_bias: bool
    layer_norm_epsilon: float
    residual_in_fp32: bool
    tie_word_embeddings: bool
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    time_step_scale: float = 1.0
    time_step_init_scheme: str = "random"
    rescale_prenorm_residual: bool = True
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    pad_vocab_size_multiple: int = 1

    def __post_init__(self):
        src = "MambaConfig"
        for key in ("vocab_size", "hidden_size", "state_size", "num_hidden_layers", "expand",
                    "conv_kernel", "time_step_rank", "pad_vocab_size_multiple"):
            _int(src, key, getattr(self, key))
        if self.conv_kernel < 2:
            raise _err(src, f"conv_kernel must be >= 2, got {self.conv_kernel}")
        for key in ("use_bias", "use_conv_bias", "residual_in_fp32", "tie_word_embeddings",
                    "rescale_prenorm_residual"):
            _bool(src, key, getattr(self, key))
        for key in ("layer_norm_epsilon", "time_step_min", "time_step_max", "time_step_floor",
                    "time_step_scale"):
            _float(src, key, getattr(self, key))
        if self.time_step_min > self.time_step_max:
            raise _err(src, f"time_step_min ({self.time_step_min}) exceeds time_step_max "
                            f"({self.time_step_max})")
        if self.time_step_init_scheme not in _INIT_SCHEMES:
            raise _err(src, f"time_step_init_scheme must be one of {_INIT_SCHEMES}, got "
                            f"{self.time_step_init_scheme!r}")
        if not isinstance(self.eos_token_id, tuple):
            raise _err(src, f"eos_token_id must be a tuple of ints, got {self.eos_token_id!r}")
        for key in ("bos_token_id", "pad_token_id"):
            _token_id(src, key, getattr(self, key))
        _token_ids(src, "eos_token_id", self.eos_token_id)

    @property
    def intermediate_size(self) -> int:
        """I = expand * hidden_size, the width of the mixer."""
        return self.expand * self.hidden_size

    @classmethod
    @beartype
    def for_mixer(
        cls,
        hidden_size: int,
        *,
        state_size: int = 16,
        expand: int = 2,
        conv_kernel: int = 4,
        time_step_rank: int | Literal["auto"] | None = "auto",
        use_bias: bool = False,
        use_conv_bias: bool = True,
        layer_norm_epsilon: float = 1e-5,
        residual_in_fp32: bool = True,
        num_hidden_layers: int = 1,
        rescale_prenorm_residual: bool = True,
        time_step_min: float = 0.001,
        time_step_max: float = 0.1,
        time_step_floor: float = 1e-4,
        time_step_scale: float = 1.0,
        time_step_init_scheme: str = "random",
    ) -> MambaConfig:
        """The config of a standalone mixer or residual block: no vocabulary (vocab_size
        1, tied, so no LM head), the defaults of the original `Mamba` layer
        (mamba_simple.py) and of `MambaConfig`'s RMSNorm.

        time_step_rank: an int, or "auto" / None for ceil(hidden_size / 16).
        num_hidden_layers: the depth of the model the layer is initialised for (out_proj
        starts divided by its square root when rescale_prenorm_residual); the other
        arguments are the fields of the same names. Raises ConfigError on a bad value.
        """
        rank = _auto_rank(hidden_size) if time_step_rank in ("auto", None) else time_step_rank
        return cls(
            vocab_size=1, hidden_size=hidden_size, state_size=state_size,
            num_hidden_layers=num_hidden_layers, expand=expand, conv_kernel=conv_kernel,
            time_step_rank=rank, use_bias=use_bias, use_conv_bias=use_conv_bias,
            layer_norm_epsilon=layer_norm_epsilon, residual_in_fp32=residual_in_fp32,
            tie_word_embeddings=True, time_step_min=time_step_min, time_step_max=time_step_max,
            time_step_floor=time_step_floor, time_step_scale=time_step_scale,
            time_step_init_scheme=time_step_init_scheme,
            rescale_prenorm_residual=rescale_prenorm_residual)

    @classmethod
    @beartype
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "config") -> MambaConfig:
        """Read a parsed config.json of either family (see the module docstring)."""
        if "model_type" in d or "hidden_size" in d:
            return _from_hf(dict(d), source)
        if "d_model" in d:
            return _from_original(dict(d), source)
        raise _err(source, "neither a transformers Mamba config (model_type, hidden_size) nor an "
                           "original state-spaces config (d_model, n_layer); keys: "
                           f"{sorted(d)}")

    @classmethod
    @beartype
    def from_json_file(cls, path: str | os.PathLike) -> MambaConfig:
        """Read `path` (a config.json of either family)."""
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(d).__name__}")
        return cls.from_dict(d, source=path)

    def to_hf_dict(self) -> dict[str, Any]:
        """The transformers `config.json` (model_type "mamba") for this config.

        rescale_prenorm_residual is written as false whatever its value (it only
        affects initialisation, and transformers would apply it to loaded weights).
        """
        eos: int | list[int] | None
        if not self.eos_token_id:
            eos = None
        elif len(self.eos_token_id) == 1:
            eos = self.eos_token_id[0]
        else:
            eos = list(self.eos_token_id)
        return {
            "architectures": ["MambaForCausalLM"],
            "model_type": "mamba",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "state_size": self.state_size,
            "num_hidden_layers": self.num_hidden_layers,
            "expand": self.expand,
            "intermediate_size": self.intermediate_size,
            "conv_kernel": self.conv_kernel,
            "time_step_rank": self.time_step_rank,
            "use_bias": self.use_bias,
            "use_conv_bias": self.use_conv_bias,
            "hidden_act": "silu",
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "residual_in_fp32": self.residual_in_fp32,
            "tie_word_embeddings": self.tie_word_embeddings,
            "time_step_min": self.time_step_min,
            "time_step_max": self.time_step_max,
            "time_step_floor": self.time_step_floor,
            "time_step_scale": self.time_step_scale,
            "time_step_init_scheme": self.time_step_init_scheme,
            # Always false: transformers' `_init_weights` divides out_proj by sqrt(L)
            # again after loading when this is true, so a checkpoint saved with it would
            # not load unchanged. It only affects initialisation.
            "rescale_prenorm_residual": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
        }


def _from_hf(d: dict[str, Any], src: str) -> MambaConfig:
    model_type = d.get("model_type", "mamba")
    if model_type != "mamba":
        hint = " (Mamba-2 is not supported; this library runs Mamba-1)" if "mamba2" in str(
            model_type).lower() else ""
        raise _err(src, f"model_type must be 'mamba', got {model_type!r}{hint}")
    missing = [k for k in _HF_REQUIRED if k not in d]
    if missing:
        raise _err(src, f"missing required keys {missing}; the transformers defaults match no "
                        "released checkpoint, so they are not assumed")
    known = set(_HF_REQUIRED) | {
        "model_type", "intermediate_size", "hidden_act", "tie_word_embeddings", "time_step_min",
        "time_step_max", "time_step_floor", "time_step_scale", "time_step_init_scheme",
        "rescale_prenorm_residual", "bos_token_id", "eos_token_id", "pad_token_id",
        # written by the conversion of the state-spaces checkpoints to this format
        "n_layer", "rms_norm", "fused_add_norm", "pad_vocab_size_multiple",
    }
    unknown = sorted(set(d) - known - _HF_GENERIC_KEYS)
    if unknown:
        raise _err(src, f"unknown keys {unknown}: not part of a Mamba-1 config this library "
                        "can run")
    if d.get("hidden_act", "silu") not in ("silu", "swish"):
        raise _err(src, f"hidden_act must be 'silu', got {d['hidden_act']!r}")
    if not d.get("rms_norm", True):
        raise _err(src, "rms_norm is false (LayerNorm): only RMSNorm models are supported")
    if "fused_add_norm" in d:
        _bool(src, "fused_add_norm", d["fused_add_norm"])  # a kernel choice, same math
    if "pad_vocab_size_multiple" in d:
        # transformers does not pad: vocab_size is already the number of rows.
        _int(src, "pad_vocab_size_multiple", d["pad_vocab_size_multiple"])
    hidden = _int(src, "hidden_size", d["hidden_size"])
    expand = _int(src, "expand", d["expand"])
    layers = _int(src, "num_hidden_layers", d["num_hidden_layers"])
    if "n_layer" in d and d["n_layer"] != layers:
        raise _err(src, f"n_layer ({d['n_layer']!r}) disagrees with num_hidden_layers ({layers})")
    if "intermediate_size" in d and d["intermediate_size"] != expand * hidden:
        raise _err(src, f"intermediate_size ({d['intermediate_size']!r}) is not expand * "
                        f"hidden_size = {expand} * {hidden}; transformers ignores the file value "
                        "and computes it, so such a checkpoint cannot be run as written")
    rank = d["time_step_rank"]
    rank = _auto_rank(hidden) if rank == "auto" else _int(src, "time_step_rank", rank)
    opt = lambda k, default: d[k] if k in d else default  # noqa: E731
    return MambaConfig(
        vocab_size=_int(src, "vocab_size", d["vocab_size"]),
        hidden_size=hidden,
        state_size=_int(src, "state_size", d["state_size"]),
        num_hidden_layers=layers,
        expand=expand,
        conv_kernel=_int(src, "conv_kernel", d["conv_kernel"], minimum=2),
        time_step_rank=rank,
        use_bias=_bool(src, "use_bias", d["use_bias"]),
        use_conv_bias=_bool(src, "use_conv_bias", d["use_conv_bias"]),
        layer_norm_epsilon=_float(src, "layer_norm_epsilon", d["layer_norm_epsilon"]),
        residual_in_fp32=_bool(src, "residual_in_fp32", d["residual_in_fp32"]),
        # PretrainedConfig's default, which transformers 4.x left out of the file
        tie_word_embeddings=_bool(src, "tie_word_embeddings", opt("tie_word_embeddings", True)),
        time_step_min=_float(src, "time_step_min", opt("time_step_min", 0.001)),
        time_step_max=_float(src, "time_step_max", opt("time_step_max", 0.1)),
        time_step_floor=_float(src, "time_step_floor", opt("time_step_floor", 1e-4)),
        time_step_scale=_float(src, "time_step_scale", opt("time_step_scale", 1.0)),
        time_step_init_scheme=_init_scheme(src, opt("time_step_init_scheme", "random")),
        rescale_prenorm_residual=_bool(
            src, "rescale_prenorm_residual", opt("rescale_prenorm_residual", True)),
        bos_token_id=_token_id(src, "bos_token_id", d.get("bos_token_id")),
        eos_token_id=_token_ids(src, "eos_token_id", d.get("eos_token_id")),
        pad_token_id=_token_id(src, "pad_token_id", d.get("pad_token_id")),
    )


def _init_scheme(src: str, v: Any) -> str:
    if v not in _INIT_SCHEMES:
        raise _err(src, f"time_step_init_scheme must be one of {_INIT_SCHEMES}, got {v!r}")
    return v


def _from_original(d: dict[str, Any], src: str) -> MambaConfig:
    missing = [k for k in ("d_model", "n_layer", "vocab_size") if k not in d]
    if missing:
        raise _err(src, f"missing required keys {missing}")
    unknown = sorted(set(d) - {"d_model", "n_layer", "vocab_size"} - set(_ORIG_DEFAULTS))
    if unknown:
        raise _err(src, f"unknown keys {unknown}: not part of a Mamba-1 config this library "
                        "can run")
    o = {**_ORIG_DEFAULTS, **d}
    if o["d_intermediate"]:
        raise _err(src, f"d_intermediate = {o['d_intermediate']!r}: MLP blocks between mixers "
                        "are not supported")
    if o["attn_layer_idx"] or o["attn_cfg"]:
        raise _err(src, "attn_layer_idx/attn_cfg given: hybrid attention models are not supported")
    if not _bool(src, "rms_norm", o["rms_norm"]):
        raise _err(src, "rms_norm is false (LayerNorm): only RMSNorm models are supported")
    _bool(src, "fused_add_norm", o["fused_add_norm"])  # a kernel choice, same math
    ssm = o["ssm_cfg"]
    if not isinstance(ssm, dict):
        raise _err(src, f"ssm_cfg must be an object, got {ssm!r}")
    if ssm.get("layer", "Mamba1") != "Mamba1" or _MAMBA2_SSM_KEYS & set(ssm):
        raise _err(src, f"ssm_cfg describes a Mamba-2 layer ({ssm}); only Mamba-1 is supported")
    unknown = sorted(set(ssm) - set(_SSM_DEFAULTS))
    if unknown:
        raise _err(src, f"unknown ssm_cfg keys {unknown}")
    s = {**_SSM_DEFAULTS, **ssm}
    _bool(src, "ssm_cfg.use_fast_path", s["use_fast_path"])
    hidden = _int(src, "d_model", o["d_model"])
    expand = _int(src, "ssm_cfg.expand", s["expand"])
    rank = s["dt_rank"]
    rank = _auto_rank(hidden) if rank == "auto" else _int(src, "ssm_cfg.dt_rank", rank)
    vocab = _int(src, "vocab_size", o["vocab_size"])
    multiple = _int(src, "pad_vocab_size_multiple", o["pad_vocab_size_multiple"])
    if vocab % multiple:
        vocab += multiple - vocab % multiple
    return MambaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        state_size=_int(src, "ssm_cfg.d_state", s["d_state"]),
        num_hidden_layers=_int(src, "n_layer", o["n_layer"]),
        expand=expand,
        conv_kernel=_int(src, "ssm_cfg.d_conv", s["d_conv"], minimum=2),
        time_step_rank=rank,
        use_bias=_bool(src, "ssm_cfg.bias", s["bias"]),
        use_conv_bias=_bool(src, "ssm_cfg.conv_bias", s["conv_bias"]),
        layer_norm_epsilon=_float(src, "norm_epsilon", o["norm_epsilon"]),
        residual_in_fp32=_bool(src, "residual_in_fp32", o["residual_in_fp32"]),
        tie_word_embeddings=_bool(src, "tie_embeddings", o["tie_embeddings"]),
        time_step_min=_float(src, "ssm_cfg.dt_min", s["dt_min"]),
        time_step_max=_float(src, "ssm_cfg.dt_max", s["dt_max"]),
        time_step_floor=_float(src, "ssm_cfg.dt_init_floor", s["dt_init_floor"]),
        time_step_scale=_float(src, "ssm_cfg.dt_scale", s["dt_scale"]),
        time_step_init_scheme=_init_scheme(src, s["dt_init"]),
        # the original `_init_weights` always rescales out_proj (rescale_prenorm_residual=True)
        rescale_prenorm_residual=True,
        pad_vocab_size_multiple=multiple,
    )
