"""`mamba-sample`: sample text from a Mamba checkpoint on the command line.

    mamba-sample --model state-spaces/mamba-130m --prompt "Mamba is the" --gen-len 100 \
        --temperature 0.7 --top-k 40 --top-p 0.9 --seed 0 --seed-iters 3 --stream --bf16

--model is a local folder or a hub repo id (see `load_pretrained`); without it, the
model bundled with the package (a byte-level model trained by `mamba-train` on the
Python standard library, so no download is needed). The tokenizer is,
in this order: --tokenizer if given (a folder or hub id for transformers'
AutoTokenizer); the checkpoint folder's own `byte_tokenizer.json` (`ByteTokenizer`);
the folder's transformers tokenizer files (tokenizer.json, tokenizer_config.json);
EleutherAI/gpt-neox-20b, the tokenizer of the state-spaces models. Each sample prints
its compile time and its generation speed in tokens per second.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from beartype import beartype

NEOX_TOKENIZER = "EleutherAI/gpt-neox-20b"
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@runtime_checkable
class TextTokenizer(Protocol):
    """What the sampler needs from a tokenizer."""

    eos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def stream(self) -> StreamingDecoder: ...


@runtime_checkable
class StreamingDecoder(Protocol):
    def feed(self, ids: Sequence[int]) -> str: ...

    def flush(self) -> str: ...


class _ByteText:
    """`ByteTokenizer` (saved beside a checkpoint as byte_tokenizer.json)."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self.eos_token_id = tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).tolist()

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))

    def stream(self):
        return self._tok.decoder()


class _HFStream:
    """Streams a transformers tokenizer by decoding the whole continuation each time and
    printing what is new, holding back an incomplete character (U+FFFD at the end)."""

    def __init__(self, tokenizer):
        self._tok, self._ids, self._done = tokenizer, [], 0

    def feed(self, ids: Sequence[int]) -> str:
        self._ids.extend(int(i) for i in ids)
        text = self._tok.decode(self._ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        new, self._done = text[self._done:], len(text)
        return new

    def flush(self) -> str:
        text = self._tok.decode(self._ids, skip_special_tokens=True)
        new, self._done = text[self._done:], len(text)
        return new


class _HFText:
    """A transformers tokenizer (AutoTokenizer)."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self.eos_token_id = tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def stream(self):
        return _HFStream(self._tok)


def tokenizer_source(model: str, override: str | None = None) -> tuple[str, str]:
    """(kind, where) of the tokenizer for `model`: ("byte", folder) or ("hf", folder or id)."""
    from .tokenizer import ByteTokenizer

    if override:
        if os.path.isdir(override) and ByteTokenizer.saved_in(override):
            return "byte", override
        return "hf", override
    if os.path.isdir(model):
        if ByteTokenizer.saved_in(model):
            return "byte", model
        if any(os.path.isfile(os.path.join(model, f)) for f in _HF_TOKENIZER_FILES):
            return "hf", model
        return "hf", NEOX_TOKENIZER
    # a hub repo: its own tokenizer files if it has them (the -hf conversions do), else
    # the one the state-spaces checkpoints were trained with
    return "hf", model


def load_tokenizer(model: str, override: str | None = None) -> TextTokenizer:
    """The tokenizer for `model` (see the module docstring)."""
    kind, where = tokenizer_source(model, override)
    if kind == "byte":
        from .tokenizer import ByteTokenizer

        return _ByteText(ByteTokenizer.load(where))
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise SystemExit(f"mamba-sample: the tokenizer of {model} needs transformers; install "
                         "it with `pip install 'mamba-ssm-core[hf]'`") from e
    try:
        return _HFText(AutoTokenizer.from_pretrained(where))
    except (OSError, ValueError) as e:
        if where == model and not os.path.isdir(model):
            # a hub checkpoint without tokenizer files: the state-spaces models
            return _HFText(AutoTokenizer.from_pretrained(NEOX_TOKENIZER))
        raise SystemExit(f"mamba-sample: cannot load the tokenizer from {where}: {e}") from e


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mamba-sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="checkpoint folder or hub repo id (e.g. state-spaces/mamba-130m); "
                        "default: the bundled byte-level model (Python standard library)")
    p.add_argument("--prompt", default="Mamba is the", help="text to continue")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder or hub id (default: from the checkpoint, as above)")
    p.add_argument("--revision", default=None, help="hub branch, tag or commit")
    dtype = p.add_mutually_exclusive_group()
    dtype.add_argument("--bf16", action="store_true",
                       help="bfloat16 weights (A_log, D, dt bias and the SSM state stay float32; "
                            "the arithmetic is float32 on CPUs, bfloat16 elsewhere)")
    dtype.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    p.add_argument("--gen-len", "--gen_len", dest="gen_len", type=int, default=100,
                   help="tokens to generate")
    p.add_argument("--temperature", type=float, default=1.0, help="0 for greedy")
    p.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=0)
    p.add_argument("--top-p", "--top_p", dest="top_p", type=float, default=1.0)
    p.add_argument("--min-p", "--min_p", dest="min_p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", "--repetition_penalty", dest="repetition_penalty",
                   type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seed-iters", "--seed_iters", dest="seed_iters", type=int, default=1,
                   help="samples to draw, with seeds seed, seed+1, ...")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--no-eos", action="store_true", help="do not stop at the end-of-text token")
    return p


@beartype
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `mamba-sample`; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.model is None:
        from ._assets import bundled_model_dir

        try:
            args.model = str(bundled_model_dir())
        except FileNotFoundError as e:
            raise SystemExit(f"mamba-sample: {e}") from e
    if args.gen_len < 1:
        raise SystemExit("mamba-sample: --gen-len must be >= 1")
    if args.seed_iters < 1:
        raise SystemExit("mamba-sample: --seed-iters must be >= 1")

    import jax
    import jax.numpy as jnp
    import numpy as np

    from .checkpoint import CheckpointError, load_pretrained
    from .config import ConfigError
    from .generation import _generate, prepare_generate

    dtype = jnp.bfloat16 if args.bf16 or args.dtype == "bfloat16" else jnp.float32
    # bfloat16 weights halve the memory. On CPUs the arithmetic stays float32 (XLA's CPU
    # bfloat16 arithmetic is slow, and float32 is exact here) and XLA reads no bfloat16
    # matrix faster than a float32 one, so they decode at float32 speed (RESULTS.md)
    compute = jnp.float32 if jax.default_backend() == "cpu" else dtype
    try:
        config, params = load_pretrained(args.model, dtype=dtype, revision=args.revision)
    except (CheckpointError, ConfigError) as e:
        raise SystemExit(f"mamba-sample: {e}") from e
    tok = load_tokenizer(args.model, args.tokenizer)
    ids = tok.encode(args.prompt)
    if not ids:
        start = tok.eos_token_id if tok.eos_token_id is not None else config.bos_token_id
        if start is None:
            raise SystemExit("mamba-sample: the prompt is empty and the tokenizer has no "
                             "end-of-text token to start from")
        ids = [start]
    if args.no_eos:
        eos: Any = ()
    else:
        eos = tok.eos_token_id if tok.eos_token_id is not None else None
    prompt = np.asarray([ids], np.int32)
    out = sys.stdout
    current: dict[str, Any] = {}

    def stream(step, tokens, done):
        # one callback for every sample (so one compilation); it writes to the
        # current sample's decoder until that sample's row is done
        del step
        if not current["done"]:
            out.write(current["decoder"].feed([int(tokens[0])]))
            out.flush()
            current["done"] = bool(done[0])

    compiled = None
    for it in range(args.seed_iters):
        seed = args.seed + it
        current.update(decoder=tok.stream(), done=False)
        call_args, static = prepare_generate(
            params, config, prompt, max_new_tokens=args.gen_len, key=jax.random.key(seed),
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
            repetition_penalty=args.repetition_penalty, eos_token_id=eos,
            callback=stream if args.stream else None, dtype=compute)
        out.write(f"\n[seed {seed}] " if args.seed_iters > 1 else "\n")
        out.write(args.prompt)
        out.flush()
        compile_s = 0.0
        if compiled is None:
            # compiled ahead of time, so that the speed below is generation alone
            t0 = time.perf_counter()
            compiled = _generate.lower(*call_args, **static).compile()
            compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = compiled(*call_args)
        tokens = np.asarray(result.tokens)[0]
        seconds = time.perf_counter() - t0
        n = int(np.asarray(result.lengths)[0])
        if args.stream:
            out.write(current["decoder"].flush())
        else:
            out.write(tok.decode(tokens[:n].tolist()))
        rate = n / seconds if seconds > 0 else float("inf")
        note = f", compiled in {compile_s:.1f} s" if compile_s else ""
        out.write(f"\n[{n} tokens in {seconds:.2f} s: {rate:.1f} tokens/s "
                  f"({config.num_hidden_layers} layers, {jnp.dtype(dtype).name} weights, "
                  f"{jnp.dtype(compute).name} compute, {jax.default_backend()}){note}]\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
