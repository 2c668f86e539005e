"""MambaConfig: both config.json families, refusals, and the transformers round trip."""

from __future__ import annotations

import dataclasses
import json

import pytest

from mamba_ssm_core import ConfigError, MambaConfig

# The released state-spaces/mamba-130m-hf config.json (transformers format).
HF_130M = {
    "architectures": ["MambaForCausalLM"], "bos_token_id": 0, "conv_kernel": 4,
    "eos_token_id": 0, "expand": 2, "fused_add_norm": True, "hidden_act": "silu",
    "hidden_size": 768, "initializer_range": 0.1, "intermediate_size": 1536,
    "layer_norm_epsilon": 1e-05, "model_type": "mamba", "n_layer": 24, "num_hidden_layers": 24,
    "pad_token_id": 0, "pad_vocab_size_multiple": 8, "rescale_prenorm_residual": False,
    "residual_in_fp32": True, "rms_norm": True, "state_size": 16, "time_step_floor": 0.0001,
    "time_step_init_scheme": "random", "time_step_max": 0.1, "time_step_min": 0.001,
    "time_step_rank": 48, "time_step_scale": 1.0, "torch_dtype": "float32",
    "transformers_version": "4.39.0.dev0", "use_bias": False, "use_cache": True,
    "use_conv_bias": True, "vocab_size": 50280,
}
# The released state-spaces/mamba-130m config.json (original format).
ORIG_130M = {
    "d_model": 768, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {}, "rms_norm": True,
    "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8,
}


def test_reads_the_transformers_format():
    c = MambaConfig.from_dict(HF_130M)
    assert (c.vocab_size, c.hidden_size, c.state_size, c.num_hidden_layers) == (50280, 768, 16, 24)
    assert (c.expand, c.intermediate_size, c.conv_kernel, c.time_step_rank) == (2, 1536, 4, 48)
    assert (c.use_bias, c.use_conv_bias, c.residual_in_fp32) == (False, True, True)
    assert c.tie_word_embeddings  # absent from 4.x files: PretrainedConfig's default
    assert c.layer_norm_epsilon == 1e-5
    assert c.rescale_prenorm_residual is False  # read from the file
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (0, (0,), 0)
    assert c.pad_vocab_size_multiple == 1  # transformers does not pad


def test_reads_the_original_format_and_pads_the_vocabulary():
    c = MambaConfig.from_dict(ORIG_130M)
    assert c.vocab_size == 50280 and c.pad_vocab_size_multiple == 8
    assert (c.hidden_size, c.num_hidden_layers, c.state_size, c.conv_kernel) == (768, 24, 16, 4)
    assert (c.expand, c.time_step_rank) == (2, 48)  # dt_rank "auto" = ceil(768 / 16)
    assert (c.use_bias, c.use_conv_bias, c.tie_word_embeddings) == (False, True, True)
    assert c.rescale_prenorm_residual is True
    assert c.eos_token_id == ()


def test_original_ssm_cfg_values_are_read():
    c = MambaConfig.from_dict({**ORIG_130M, "vocab_size": 61, "pad_vocab_size_multiple": 16,
                               "tie_embeddings": False, "ssm_cfg": {
                                   "d_state": 7, "d_conv": 3, "expand": 3, "dt_rank": 5,
                                   "bias": True, "conv_bias": False, "dt_min": 0.01,
                                   "dt_max": 0.2, "dt_init": "constant", "dt_scale": 2.0,
                                   "dt_init_floor": 1e-3}})
    assert (c.vocab_size, c.state_size, c.conv_kernel, c.expand) == (64, 7, 3, 3)
    assert (c.time_step_rank, c.use_bias, c.use_conv_bias, c.tie_word_embeddings) == (5, True, False, False)
    assert (c.time_step_min, c.time_step_max, c.time_step_init_scheme) == (0.01, 0.2, "constant")
    assert (c.time_step_scale, c.time_step_floor) == (2.0, 1e-3)


def test_auto_time_step_rank_in_the_transformers_format():
    c = MambaConfig.from_dict({**HF_130M, "hidden_size": 40, "intermediate_size": 80,
                               "time_step_rank": "auto"})
    assert c.time_step_rank == 3


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(model_type="mamba2"), "Mamba-2"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(rms_norm=False), "rms_norm"),
        (dict(intermediate_size=1000), "intermediate_size"),
        (dict(n_layer=12), "n_layer"),
        (dict(state_size=0), "state_size"),
        (dict(state_size=16.5), "state_size"),
        (dict(use_bias="no"), "use_bias"),
        (dict(conv_kernel=1), "conv_kernel"),
        (dict(time_step_init_scheme="zeros"), "time_step_init_scheme"),
        (dict(n_groups=8), "n_groups"),
        (dict(attention_layers=[1]), "attention_layers"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_transformers_format_refusals(change, match):
    with pytest.raises(ConfigError, match=match):
        MambaConfig.from_dict({**HF_130M, **change})


@pytest.mark.parametrize("key", ["hidden_size", "state_size", "num_hidden_layers", "vocab_size",
                                 "expand", "conv_kernel", "time_step_rank", "use_bias",
                                 "residual_in_fp32", "layer_norm_epsilon"])
def test_transformers_defaults_are_not_assumed(key):
    d = dict(HF_130M)
    del d[key]
    if key == "hidden_size":
        d.pop("intermediate_size")
    with pytest.raises(ConfigError, match=f"missing required keys.*{key}"):
        MambaConfig.from_dict(d)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(ssm_cfg={"layer": "Mamba2"}), "Mamba-2"),
        (dict(ssm_cfg={"headdim": 64}), "Mamba-2"),
        (dict(ssm_cfg={"d_sate": 16}), "d_sate"),
        (dict(d_intermediate=1024), "d_intermediate"),
        (dict(attn_layer_idx=[3]), "attn_layer_idx"),
        (dict(rms_norm=False), "rms_norm"),
        (dict(n_layers=3), "n_layers"),
        (dict(ssm_cfg={"dt_init": "zeros"}), "time_step_init_scheme"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_original_format_refusals(change, match):
    with pytest.raises(ConfigError, match=match):
        MambaConfig.from_dict({**ORIG_130M, **change})


def test_unrecognised_family_is_refused():
    with pytest.raises(ConfigError, match="neither a transformers"):
        MambaConfig.from_dict({"n_embd": 768})


def test_transformers_round_trip():
    c = MambaConfig.from_dict({**ORIG_130M, "vocab_size": 61})
    # rescale_prenorm_residual (initialisation only) is written false: transformers
    # would otherwise rescale the loaded out_proj weights.
    assert MambaConfig.from_dict(c.to_hf_dict()) == dataclasses.replace(
        c, pad_vocab_size_multiple=1, rescale_prenorm_residual=False)
    d = MambaConfig.from_dict(HF_130M)
    assert MambaConfig.from_dict(d.to_hf_dict()) == d


def test_frozen_and_hashable():
    c = MambaConfig.from_dict(HF_130M)
    assert hash(c) == hash(MambaConfig.from_dict(HF_130M))
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.hidden_size = 3  # type: ignore[misc]


def test_constructor_checks_values():
    c = MambaConfig.from_dict(HF_130M)
    with pytest.raises(ConfigError, match="hidden_size must be >= 1"):
        dataclasses.replace(c, hidden_size=0)
    with pytest.raises(ConfigError, match="time_step_min"):
        dataclasses.replace(c, time_step_min=0.5, time_step_max=0.1)
    with pytest.raises(ConfigError, match="eos_token_id"):
        dataclasses.replace(c, eos_token_id=(-1,))


def test_from_json_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(ORIG_130M))
    assert MambaConfig.from_json_file(path).vocab_size == 50280
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        MambaConfig.from_json_file(path)
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        MambaConfig.from_json_file(path)


@pytest.mark.torch
def test_transformers_reads_our_config_dict():
    import transformers

    c = MambaConfig.from_dict({**HF_130M, "num_hidden_layers": 3, "n_layer": 3, "use_bias": True,
                               "time_step_rank": 7, "tie_word_embeddings": False})
    t = transformers.MambaConfig(**c.to_hf_dict())
    for field in ("vocab_size", "hidden_size", "state_size", "num_hidden_layers", "expand",
                  "conv_kernel", "time_step_rank", "use_bias", "use_conv_bias",
                  "layer_norm_epsilon", "residual_in_fp32", "tie_word_embeddings",
                  "intermediate_size"):
        assert getattr(t, field) == getattr(c, field), field


def test_for_mixer_has_the_original_layer_defaults_and_no_vocabulary():
    c = MambaConfig.for_mixer(40)
    assert (c.hidden_size, c.state_size, c.expand, c.conv_kernel) == (40, 16, 2, 4)
    assert c.time_step_rank == 3  # "auto": ceil(40 / 16)
    assert (c.use_bias, c.use_conv_bias, c.residual_in_fp32) == (False, True, True)
    assert (c.vocab_size, c.tie_word_embeddings, c.num_hidden_layers) == (1, True, 1)
    assert c.layer_norm_epsilon == 1e-5 and c.rescale_prenorm_residual is True
    assert MambaConfig.for_mixer(40, time_step_rank=None) == c
    # the same "auto" rule as a config.json
    assert c.time_step_rank == MambaConfig.from_dict(
        {**ORIG_130M, "d_model": 40}).time_step_rank


def test_for_mixer_rebuilds_the_layers_of_any_config():
    full = MambaConfig.from_dict({**ORIG_130M, "ssm_cfg": {
        "d_state": 7, "d_conv": 3, "expand": 3, "dt_rank": 5, "bias": True, "conv_bias": False,
        "dt_min": 0.01, "dt_max": 0.2, "dt_init": "constant", "dt_scale": 2.0,
        "dt_init_floor": 1e-3}, "norm_epsilon": 1e-6, "residual_in_fp32": False})
    fields = {k: getattr(full, k) for k in MambaConfig.BLOCK_FIELDS}
    layer = MambaConfig.for_mixer(full.hidden_size, num_hidden_layers=full.num_hidden_layers,
                                  **fields)
    assert set(MambaConfig.MIXER_FIELDS) < set(MambaConfig.BLOCK_FIELDS)
    assert layer == dataclasses.replace(full, vocab_size=1, pad_vocab_size_multiple=1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(hidden_size=0), "hidden_size must be >= 1"),
        (dict(hidden_size=16, conv_kernel=1), "conv_kernel must be >= 2"),
        (dict(hidden_size=16, time_step_rank=0), "time_step_rank must be >= 1"),
        (dict(hidden_size=16, time_step_init_scheme="zeros"), "time_step_init_scheme"),
    ],
)
def test_for_mixer_refuses_bad_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MambaConfig.for_mixer(**kwargs)
