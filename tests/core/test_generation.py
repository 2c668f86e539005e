"""generate and the sampling rules: transformers' greedy tokens, padding, EOS, keys, streaming."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_ssm_core import MambaConfig, init_cache, init_params, load_pretrained
from mamba_ssm_core.generation import (
    Sampling,
    _generate,
    generate,
    prepare_generate,
    process_logits,
    sample_token,
)

TINY = MambaConfig(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=2, expand=2,
                   conv_kernel=4, time_step_rank=3, use_bias=False, use_conv_bias=True,
                   layer_norm_epsilon=1e-5, residual_in_fp32=True, tie_word_embeddings=False,
                   eos_token_id=(1,), pad_token_id=0)


@pytest.fixture(scope="module")
def tiny():
    params = init_params(jax.random.key(0), TINY)
    # larger out_proj and final norm: generations that do not just repeat the input
    params["backbone"]["layers"]["mixer"]["out_proj"]["weight"] *= 8.0
    params["backbone"]["norm_f"]["weight"] *= 4.0
    return TINY, params


def _left_pad(prompts, pad):
    n = max(len(p) for p in prompts)
    ids = np.full((len(prompts), n), pad, np.int32)
    mask = np.zeros((len(prompts), n), bool)
    for i, p in enumerate(prompts):
        ids[i, n - len(p):] = p
        mask[i, n - len(p):] = True
    return ids, mask


# ---------------------------------------------------------------------------- ground truth


@pytest.mark.torch
@pytest.mark.parametrize("variant", ["small", "odd"])
def test_greedy_32_tokens_are_transformers_tokens(variant):
    from tests.hf_checkpoints import cached_checkpoint, greedy_ids

    path, model = cached_checkpoint(variant)
    config, params = load_pretrained(path)
    prompt = np.array([[3, 17, 5, 40, 8, 9, 10], [4, 4, 60, 2, 33, 12, 1]])
    ref = greedy_ids(model, prompt, 32)
    out = generate(params, config, prompt, max_new_tokens=32, temperature=0.0, eos_token_id=())
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)
    assert np.asarray(out.lengths).tolist() == [32, 32]
    assert len(set(ref[0].tolist())) >= 12  # the oracle is not a copy machine


@pytest.mark.torch
def test_left_padded_batch_equals_each_prompt_alone():
    from tests.hf_checkpoints import cached_checkpoint, greedy_ids

    path, model = cached_checkpoint("odd")
    config, params = load_pretrained(path)
    prompts = [[5, 9, 13, 22], [40, 41, 7, 8, 3, 30, 31, 50, 6], [11, 12, 19, 4, 77, 2, 9]]
    ids, mask = _left_pad(prompts, pad=88)  # a pad id that is a real token: it must not leak
    out = generate(params, config, ids, mask=mask, max_new_tokens=12, temperature=0.0,
                   eos_token_id=())
    for i, p in enumerate(prompts):
        np.testing.assert_array_equal(np.asarray(out.tokens)[i], greedy_ids(model, [p], 12)[0])


# ---------------------------------------------------------------------------- the loop


def test_each_row_stops_at_its_eos(tiny):
    config, params = tiny
    prompt = np.array([[5, 6, 7], [9, 10, 11]], np.int32)
    free = np.asarray(generate(params, config, prompt, max_new_tokens=20, temperature=0.0,
                               eos_token_id=()).tokens)
    eos = int(free[0, 4])
    out = generate(params, config, prompt, max_new_tokens=20, temperature=0.0,
                   eos_token_id=eos, pad_token_id=63)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    for row in range(2):
        hits = np.nonzero(free[row] == eos)[0]
        n = int(hits[0]) + 1 if hits.size else 20
        assert lengths[row] == n
        np.testing.assert_array_equal(tokens[row, :n], free[row, :n])
        assert (tokens[row, n:] == 63).all()
    assert lengths[0] <= 5


def test_final_cache_continues_the_generation(tiny):
    config, params = tiny
    prompt = np.array([[5, 6, 7, 8]], np.int32)
    whole = generate(params, config, prompt, max_new_tokens=10, temperature=0.0, eos_token_id=())
    first = generate(params, config, prompt, max_new_tokens=6, temperature=0.0, eos_token_id=())
    # the returned cache has consumed every generated token but the last
    from mamba_ssm_core import decode_step

    step = jax.jit(lambda tok, cache: decode_step(params, config, tok, cache))
    cache, tok, rest = first.cache, first.tokens[:, -1], []
    for _ in range(4):
        logits, cache = step(tok, cache)
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        rest.append(int(tok[0]))
    np.testing.assert_array_equal(np.asarray(whole.tokens)[0, 6:], rest)


def test_unrolled_decoding_equals_the_layer_scan(tiny):
    # CPUs decode with the layers unrolled over per-layer weight copies; accelerators with
    # the scan over the stacked layers (layers=None): one generation, both ways
    config, params = tiny
    prompt = np.array([[5, 6, 7], [9, 10, 11]], np.int32)
    mask = np.array([[0, 1, 1], [1, 1, 1]], bool)

    def run(unrolled):
        args, static = prepare_generate(params, config, prompt, mask=mask, max_new_tokens=12,
                                        key=jax.random.key(3), top_k=20,
                                        repetition_penalty=1.3, eos_token_id=(1,))
        assert args[5] is not None  # this suite runs on CPUs
        return _generate(*args[:5], args[5] if unrolled else None, **static)

    unrolled, scanned = run(True), run(False)
    np.testing.assert_array_equal(unrolled.tokens, scanned.tokens)
    np.testing.assert_array_equal(unrolled.lengths, scanned.lengths)
    for a, b in zip(unrolled.cache, scanned.cache, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        assert a.shape == b.shape and a.dtype == b.dtype
    assert len(set(np.asarray(unrolled.tokens)[1].tolist())) >= 4  # not a constant stream


def test_large_layer_weights_decode_with_the_layer_scan(tiny, monkeypatch):
    # the per-layer copy doubles the layer weights' memory: past the cap, no copy is made
    from mamba_ssm_core import generation

    config, params = tiny
    prompt = np.array([[5, 6, 7]], np.int32)
    layer_bytes = sum(a.nbytes for a in jax.tree.leaves(params["backbone"]["layers"]))
    monkeypatch.setattr(generation, "_UNROLL_MAX_BYTES", layer_bytes)
    args, _ = prepare_generate(params, config, prompt, max_new_tokens=4, temperature=0.0)
    assert args[5] is not None
    monkeypatch.setattr(generation, "_UNROLL_MAX_BYTES", layer_bytes - 1)
    args, _ = prepare_generate(params, config, prompt, max_new_tokens=4, temperature=0.0)
    assert args[5] is None
    out = generate(params, config, prompt, max_new_tokens=6, temperature=0.0, eos_token_id=())
    monkeypatch.undo()
    ref = generate(params, config, prompt, max_new_tokens=6, temperature=0.0, eos_token_id=())
    np.testing.assert_array_equal(out.tokens, ref.tokens)


def test_sampling_is_deterministic_for_a_key(tiny):
    config, params = tiny
    prompt = np.array([[5, 6, 7], [9, 10, 11]], np.int32)
    run = lambda k: np.asarray(generate(params, config, prompt, max_new_tokens=16,  # noqa: E731
                                        key=jax.random.key(k), top_k=20, top_p=0.95, min_p=0.01,
                                        repetition_penalty=1.2, eos_token_id=()).tokens)
    a, b, c = run(1), run(1), run(2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_streaming_callback_sees_every_step_in_order(tiny):
    config, params = tiny
    seen = []
    out = generate(params, config, np.array([[5, 6, 7], [9, 10, 11]], np.int32),
                   max_new_tokens=9, temperature=0.0, eos_token_id=(),
                   callback=lambda step, toks, done: seen.append((step, toks.copy(), done.copy())))
    assert [s for s, _, _ in seen] == list(range(9))
    np.testing.assert_array_equal(np.stack([t for _, t, _ in seen], axis=1), out.tokens)
    assert all(isinstance(t, np.ndarray) for _, t, _ in seen)


def test_cache_buffers_are_donated(tiny):
    config, params = tiny
    ids = jnp.ones((1, 3), jnp.int32)
    lowered = _generate.lower(params, ids, jnp.ones((1, 3), bool), jax.random.key(0),
                              init_cache(config, 1), config=config, sampling=Sampling(0.0),
                              max_new_tokens=4, eos=(), pad=0, dtype=jnp.dtype(jnp.float32),
                              impl="auto", callback=None)
    text = lowered.as_text()
    assert text.count("tf.aliasing_output") == 2  # conv_state and ssm_state


def test_bad_arguments_are_refused(tiny):
    config, params = tiny
    prompt = np.array([[5, 6, 7]], np.int32)
    with pytest.raises(ValueError, match="key is required when sampling"):
        generate(params, config, prompt, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"rows \[0\] end in padding"):
        generate(params, config, prompt, mask=np.array([[1, 1, 0]]), max_new_tokens=2,
                 temperature=0.0)
    with pytest.raises(ValueError, match=r"rows \[0\] have padding after a real token"):
        generate(params, config, prompt, mask=np.array([[1, 0, 1]]), max_new_tokens=2,
                 temperature=0.0)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate(params, config, prompt, max_new_tokens=0, temperature=0.0)
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, vocab_size=64\)"):
        generate(params, config, np.array([[64]], np.int32), max_new_tokens=1, temperature=0.0)
    for bad, name in [(dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"),
                      (dict(min_p=1.5), "min_p"), (dict(repetition_penalty=0.0),
                                                   "repetition_penalty"), (dict(top_k=-1), "top_k")]:
        with pytest.raises(ValueError, match=name):
            Sampling(**bad)


# ---------------------------------------------------------------------------- sampling rules


@pytest.mark.torch
@pytest.mark.parametrize("sampling", [
    Sampling(temperature=0.7, repetition_penalty=1.3),
    Sampling(top_k=7),
    Sampling(temperature=1.5, top_p=0.6),
    Sampling(min_p=0.1),
    Sampling(temperature=0.8, top_k=12, top_p=0.9, min_p=0.05, repetition_penalty=1.1),
], ids=["temp+rep", "topk", "temp+topp", "minp", "all"])
def test_processing_matches_transformers(sampling):
    import torch
    from transformers import (
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 50)).astype(np.float32) * 3
    history = rng.integers(0, 50, (4, 6))
    seen = np.zeros((4, 50), bool)
    np.put_along_axis(seen, history, True, axis=1)
    procs = []
    if sampling.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty))
    if sampling.temperature != 1.0:
        procs.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_k:
        procs.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1.0:
        procs.append(TopPLogitsWarper(sampling.top_p))
    if sampling.min_p:
        procs.append(MinPLogitsWarper(sampling.min_p))
    ref = LogitsProcessorList(procs)(torch.as_tensor(history), torch.as_tensor(logits)).numpy()
    out = np.asarray(process_logits(jnp.asarray(logits), sampling, jnp.asarray(seen)))
    np.testing.assert_array_equal(np.isfinite(out), np.isfinite(ref))
    np.testing.assert_allclose(out[np.isfinite(out)], ref[np.isfinite(ref)], rtol=1e-6)


def test_samples_follow_the_processed_distribution():
    logits = jnp.asarray([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]], jnp.float32)
    sampling = Sampling(temperature=0.8, top_k=4)
    keys = jax.random.split(jax.random.key(0), 20000)
    draws = np.asarray(jax.vmap(lambda k: sample_token(k, logits, sampling))(keys))[:, 0]
    counts = np.bincount(draws, minlength=6) / draws.size
    want = np.asarray(jax.nn.softmax(process_logits(logits, sampling)))[0]
    assert counts[4:].sum() == 0  # outside the top 4
    np.testing.assert_allclose(counts, want, atol=0.015)
    greedy = sample_token(jax.random.key(0), logits, Sampling(temperature=0.0))
    assert int(greedy[0]) == 0
