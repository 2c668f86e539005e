"""load_pretrained / save_pretrained: both formats, sharding, dtypes, errors, the hub cache."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mamba_ssm_core import (
    CheckpointError,
    MambaConfig,
    forward,
    init_params,
    load_pretrained,
    save_pretrained,
)
from mamba_ssm_core.params import flatten

TINY = MambaConfig(vocab_size=40, hidden_size=12, state_size=3, num_hidden_layers=2, expand=2,
                   conv_kernel=4, time_step_rank=2, use_bias=True, use_conv_bias=True,
                   layer_norm_epsilon=1e-5, residual_in_fp32=True, tie_word_embeddings=False,
                   eos_token_id=(1,))
# What a saved TINY reads back as: rescale_prenorm_residual (initialisation only) is
# saved false, see MambaConfig.to_hf_dict.
TINY_SAVED = dataclasses.replace(TINY, rescale_prenorm_residual=False)


def _assert_same_params(a, b):
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype, k
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


@pytest.fixture
def saved(tmp_path):
    params = init_params(jax.random.key(0), TINY)
    save_pretrained(TINY, params, tmp_path / "ckpt")
    return tmp_path / "ckpt", params


# ---------------------------------------------------------------------------- round trips


def test_save_then_load_is_exact(saved):
    path, params = saved
    config, loaded = load_pretrained(path)
    assert config == TINY_SAVED
    _assert_same_params(loaded, params)
    keys = set(load_file(path / "model.safetensors"))
    assert "backbone.layers.1.mixer.in_proj.weight" in keys and "lm_head.weight" in keys
    assert json.loads((path / "config.json").read_text())["model_type"] == "mamba"


def test_bfloat16_loading_keeps_the_ssm_parameters_in_float32(saved):
    path, params = saved
    _, bf16 = load_pretrained(path, dtype=jnp.bfloat16)
    for k, v in flatten(bf16).items():
        ssm = k.endswith(("A_log", ".D", "dt_proj.bias"))
        assert v.dtype == (jnp.float32 if ssm else jnp.bfloat16), k
        if ssm:
            np.testing.assert_array_equal(v, flatten(params)[k])
    _, all_bf16 = load_pretrained(path, dtype=jnp.bfloat16, keep_ssm_params_float32=False)
    assert {v.dtype for v in flatten(all_bf16).values()} == {jnp.dtype(jnp.bfloat16)}
    # a bfloat16 checkpoint (ssm parameters float32 in it) reads back as stored
    save_pretrained(TINY, bf16, path.parent / "bf16")
    _, again = load_pretrained(path.parent / "bf16")
    _assert_same_params(again, bf16)
    with pytest.raises(TypeError, match="dtype must be a floating dtype"):
        load_pretrained(path, dtype=jnp.int32)


def test_sharded_safetensors_with_index(saved):
    path, params = saved
    tensors = load_file(path / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    out = path.parent / "sharded"
    out.mkdir()
    shutil.copy(path / "config.json", out / "config.json")
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, out / shard, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: s for s, ks in shards.items() for k in ks}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    _, loaded = load_pretrained(out)
    _assert_same_params(loaded, params)
    os.remove(out / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match="shard 'model-00002-of-00002.safetensors' is missing"):
        load_pretrained(out)


# ---------------------------------------------------------------------------- errors


def test_missing_unexpected_and_misshapen_keys_in_one_error(saved):
    path, _ = saved
    tensors = load_file(path / "model.safetensors")
    del tensors["backbone.layers.1.mixer.D"]
    tensors["backbone.layers.2.mixer.D"] = np.ones(24, np.float32)
    tensors["backbone.extra.weight"] = np.ones(3, np.float32)
    tensors["backbone.layers.0.mixer.x_proj.weight"] = np.ones((24, 8), np.float32)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_pretrained(path)
    msg = str(info.value)
    assert "4 problems" in msg and "model.safetensors" in msg
    assert "missing backbone.layers.1.mixer.D: expected shape (24,)" in msg
    assert "unexpected backbone.layers.2.mixer.D: shape (24,) (the config has 2 layers)" in msg
    assert "unexpected backbone.extra.weight: shape (3,)" in msg
    assert ("shape mismatch backbone.layers.0.mixer.x_proj.weight: expected (8, 24), "
            "got (24, 8)") in msg


def test_untied_config_needs_an_lm_head(saved):
    path, _ = saved
    tensors = load_file(path / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing lm_head.weight: expected shape \(40, 12\)"):
        load_pretrained(path)


def test_tied_head_must_equal_the_embedding(tmp_path):
    config = dataclasses.replace(TINY, tie_word_embeddings=True)
    save_pretrained(config, init_params(jax.random.key(1), config), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["backbone.embeddings.weight"].copy()
    save_file(tensors, tmp_path / "model.safetensors")
    load_pretrained(tmp_path)  # a tied copy, as the original checkpoints carry, is fine
    tensors["lm_head.weight"][0, 0] += 1
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="lm_head.weight differs from the embedding"):
        load_pretrained(tmp_path)


def test_truncated_or_corrupt_files_are_named(saved):
    path, _ = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors: not a readable safetensors"):
        load_pretrained(path)
    (path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"model.safetensors: not a readable safetensors"):
        load_pretrained(path)


def test_folder_problems(tmp_path, saved):
    path, _ = saved
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pretrained(tmp_path)
    other = tmp_path / "pickled"
    other.mkdir()
    shutil.copy(path / "config.json", other / "config.json")
    (other / "model.pt").write_bytes(b"not read")  # nothing but the listed names is opened
    with pytest.raises(CheckpointError, match="no weights in this folder"):
        load_pretrained(other)
    with pytest.raises(CheckpointError, match="is a file"):
        load_pretrained(path / "config.json")
    with pytest.raises(CheckpointError, match="no such folder"):
        load_pretrained(str(tmp_path / "missing" / "folder"))


def test_bin_without_torch_names_the_extra(saved, monkeypatch):
    path, _ = saved
    os.remove(path / "model.safetensors")
    (path / "pytorch_model.bin").write_bytes(b"PK")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(CheckpointError, match=r"needs PyTorch.*mamba-ssm-core\[torch\]"):
        load_pretrained(path)


# ---------------------------------------------------------------------------- the hub


def test_hub_offline_and_not_cached_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE is set and its config.json is "
                                              "not in the local cache"):
        load_pretrained("state-spaces/mamba-130m", cache_dir=tmp_path)


def test_hub_offline_reads_the_cache(tmp_path, monkeypatch, saved):
    path, params = saved
    # The huggingface_hub cache layout: refs/main names a snapshot folder.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--someone--tiny-mamba"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(path, repo / "snapshots" / commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config, loaded = load_pretrained("someone/tiny-mamba", cache_dir=tmp_path)
    assert config == TINY_SAVED
    _assert_same_params(loaded, params)


# ---------------------------------------------------------------------------- PyTorch


@pytest.mark.torch
@pytest.mark.parametrize("variant", ["small", "odd"])
def test_transformers_checkpoint_loads_the_exact_weights(variant):
    from tests.hf_checkpoints import cached_checkpoint

    path, model = cached_checkpoint(variant)
    config, params = load_pretrained(path)
    flat = flatten(params)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    for key, value in state.items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if key.startswith("backbone.layers."):
            _, _, i, rest = key.split(".", 3)
            got = flat[f"backbone.layers.{rest}"][int(i)]
        else:
            got = flat[key]
        np.testing.assert_array_equal(np.asarray(got), value, err_msg=key)


@pytest.mark.torch
@pytest.mark.parametrize("variant", ["small", "odd"])
def test_original_format_loads_identical_params(variant, tmp_path):
    from tests.hf_checkpoints import cached_checkpoint, save_original_format

    path, model = cached_checkpoint(variant)
    config, params = load_pretrained(path)
    # The small model's 96 rows are written as the original does: vocab_size 90,
    # padded to a multiple of 8 on load. The odd one's 93 rows (not a multiple of 8)
    # as 93 with no padding.
    unpadded, multiple = (93, 1) if variant == "odd" else (90, 8)
    save_original_format(model, tmp_path, vocab_size=unpadded, pad_vocab_size_multiple=multiple)
    assert not (tmp_path / "model.safetensors").exists()
    original_config, original_params = load_pretrained(tmp_path)
    _assert_same_params(original_params, params)
    assert original_config.vocab_size == config.vocab_size
    for field in ("hidden_size", "state_size", "num_hidden_layers", "expand", "conv_kernel",
                  "time_step_rank", "use_bias", "use_conv_bias", "residual_in_fp32",
                  "tie_word_embeddings"):
        assert getattr(original_config, field) == getattr(config, field), field


@pytest.mark.torch
def test_bin_is_read_with_weights_only(tmp_path, saved):
    import torch

    path, _ = saved
    os.remove(path / "model.safetensors")

    class Payload:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"backbone.embeddings.weight": Payload()}, path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: cannot read this PyTorch checkpoint"):
        load_pretrained(path)
    (path / "pytorch_model.bin").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: cannot read"):
        load_pretrained(path)


@pytest.mark.torch
@pytest.mark.parametrize("tied", [True, False])
def test_transformers_loads_what_we_save(tmp_path, tied):
    import torch
    from transformers import MambaForCausalLM

    from tests.hf_checkpoints import hf_logits

    config = dataclasses.replace(TINY, tie_word_embeddings=tied, num_hidden_layers=3)
    params = init_params(jax.random.key(2), config)
    # perturb so that every parameter matters (init has zero biases, unit norms, ...)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    params = jax.tree.unflatten(tree, leaves)
    save_pretrained(config, params, tmp_path)
    model = MambaForCausalLM.from_pretrained(tmp_path).eval()
    assert model.config.tie_word_embeddings == tied
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 9))
    ours = np.asarray(jax.jit(lambda p, i: forward(p, config, i))(params, ids))
    theirs = hf_logits(model, ids)
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-5)
    # and the weights arrived unchanged
    emb = model.backbone.embeddings.weight.detach().numpy()
    np.testing.assert_array_equal(emb, np.asarray(params["backbone"]["embeddings"]["weight"]))
    if not tied:
        assert not torch.equal(model.lm_head.weight, model.backbone.embeddings.weight)
