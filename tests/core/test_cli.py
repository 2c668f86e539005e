"""mamba-sample: a local checkpoint with its own tokenizer, streaming, seeds, errors."""

from __future__ import annotations

import re
import shutil
import subprocess

import jax
import pytest

from mamba_ssm_core import ByteTokenizer, MambaConfig, init_params, save_pretrained
from mamba_ssm_core._cli import NEOX_TOKENIZER, main, tokenizer_source

BYTES = ByteTokenizer()


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    """A random byte-level model with its ByteTokenizer beside it."""
    config = MambaConfig(vocab_size=BYTES.vocab_size, hidden_size=16, state_size=4,
                         num_hidden_layers=2, expand=2, conv_kernel=4, time_step_rank=2,
                         use_bias=False, use_conv_bias=True, layer_norm_epsilon=1e-5,
                         residual_in_fp32=True, tie_word_embeddings=False,
                         eos_token_id=(BYTES.eos_token_id,), pad_token_id=BYTES.pad_token_id)
    params = init_params(jax.random.key(0), config)
    path = tmp_path_factory.mktemp("byte-model")
    save_pretrained(config, params, path)
    BYTES.save(path)
    return str(path)


def _samples(text):
    """[(generated text, n tokens)] from the sampler's output."""
    return [(m.group(1), int(m.group(2))) for m in
            re.finditer(r"(?s)hello(.*?)\n\[(\d+) tokens in [\d.]+ s: [\d.]+ tokens/s", text)]


def test_samples_with_the_checkpoint_tokenizer(byte_model, capsys):
    assert tokenizer_source(byte_model) == ("byte", byte_model)
    assert main(["--model", byte_model, "--prompt", "hello", "--gen-len", "12",
                 "--temperature", "0", "--no-eos"]) == 0
    out = capsys.readouterr().out
    [(text, n)] = _samples(out)
    assert n == 12 and "compiled in" in out and "float32" in out


def test_stream_prints_what_the_batch_run_prints(byte_model, capsys):
    argv = ["--model", byte_model, "--prompt", "hello", "--gen-len", "10", "--top-k", "20",
            "--temperature", "0.9", "--seed", "3", "--no-eos"]
    main(argv)
    plain = _samples(capsys.readouterr().out)
    main([*argv, "--stream"])
    streamed = _samples(capsys.readouterr().out)
    assert plain == streamed and len(plain) == 1


def test_seed_iterations_are_reproducible(byte_model, capsys):
    argv = ["--model", byte_model, "--prompt", "hello", "--gen-len", "16", "--seed", "5",
            "--top-p", "0.95", "--no-eos", "--bf16"]
    main([*argv, "--seed-iters", "2"])
    out = capsys.readouterr().out
    assert "[seed 5]" in out and "[seed 6]" in out and "bfloat16" in out
    two = _samples(out)
    main(argv)
    one = _samples(capsys.readouterr().out)
    assert len(two) == 2 and two[0] == one[0] and two[0] != two[1]


def test_bad_invocations_exit_with_a_message(byte_model, tmp_path):
    with pytest.raises(SystemExit, match="--gen-len must be >= 1"):
        main(["--model", byte_model, "--gen-len", "0"])
    with pytest.raises(SystemExit, match="no config.json"):
        main(["--model", str(tmp_path), "--gen-len", "2"])


def test_tokenizer_choice():
    assert tokenizer_source("state-spaces/mamba-130m") == ("hf", "state-spaces/mamba-130m")
    assert tokenizer_source("/nonexistent", "some/tokenizer") == ("hf", "some/tokenizer")


def test_original_checkpoint_folder_uses_the_neox_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text('{"d_model": 8, "n_layer": 1, "vocab_size": 16}')
    assert tokenizer_source(str(tmp_path)) == ("hf", NEOX_TOKENIZER)


def test_console_script_is_installed():
    exe = shutil.which("mamba-sample")
    assert exe is not None
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--seed-iters" in result.stdout


@pytest.mark.torch
def test_transformers_tokenizer_from_the_folder(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<eos>", "<unk>", "hello", "world", "mamba", "snake", "the", "a", "is", "fast"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", unk_token="<unk>")
    config = MambaConfig(vocab_size=len(words), hidden_size=8, state_size=2, num_hidden_layers=1,
                         expand=2, conv_kernel=4, time_step_rank=1, use_bias=False,
                         use_conv_bias=True, layer_norm_epsilon=1e-5, residual_in_fp32=True,
                         tie_word_embeddings=True)
    save_pretrained(config, init_params(jax.random.key(1), config), tmp_path)
    tok.save_pretrained(tmp_path)
    assert tokenizer_source(str(tmp_path)) == ("hf", str(tmp_path))
    main(["--model", str(tmp_path), "--prompt", "hello mamba", "--gen-len", "6",
          "--temperature", "0", "--no-eos", "--stream"])
    out = capsys.readouterr().out
    m = re.search(r"hello mamba(.*)\n\[6 tokens", out, re.S)
    assert m is not None
    assert set(m.group(1).split()) <= set(words)
