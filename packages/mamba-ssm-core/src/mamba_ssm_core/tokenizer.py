"""A byte-level tokenizer: the 256 byte values of UTF-8 text, then a few special tokens.

Token ids 0..255 are the bytes themselves; the special tokens follow from 256 on.
It needs no vocabulary file and no download. A model trained with it carries the
tokenizer's description (`byte_tokenizer.json`) beside its checkpoint, and
`ByteTokenizer.load(directory)` reads it back; `ByteTokenizer.saved_in(directory)`
says whether a checkpoint folder has one.

Decoding is lossless for byte tokens; a sequence that ends inside a multi-byte
UTF-8 character decodes with replacement characters. For streaming, `decoder()`
returns an incremental decoder that holds back incomplete characters until their
last byte arrives.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import os
import pathlib
from collections.abc import Iterable
from typing import ClassVar

import numpy as np
from beartype import beartype
from jaxtyping import Int

NUM_BYTES = 256
_FORMAT = "mamba_ssm_core.ByteTokenizer"
_FORMAT_VERSION = 1


class StreamDecoder:
    """Turns token ids into text as they arrive, holding back partial UTF-8 characters.

    `feed(ids)` returns the text completed by those ids; `flush()` returns whatever is
    still held back (replacement characters for an incomplete tail).
    """

    def __init__(self, tokenizer: ByteTokenizer, *, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids: Iterable[int | np.integer] | int | np.integer) -> str:
        if isinstance(ids, (int, np.integer)):
            ids = [int(ids)]
        out = []
        for i in ids:
            i = int(i)
            if 0 <= i < NUM_BYTES:
                out.append(self._utf8.decode(bytes((i,))))
            else:
                out.append(self._utf8.decode(b"", final=True))
                if not self._skip:
                    out.append(self._tokenizer.id_to_special(i))
        return "".join(out)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, then `special_tokens` as 256, 257, ...

    The first special token ends a document (eos) and also starts one (bos), as in
    GPT-2; the second, if given, pads.
    """

    special_tokens: tuple[str, ...] = ("<|endoftext|>", "<|pad|>")

    FILENAME: ClassVar[str] = "byte_tokenizer.json"

    def __post_init__(self):
        if not self.special_tokens:
            raise ValueError("ByteTokenizer: special_tokens must name at least the eos token")
        if len(set(self.special_tokens)) != len(self.special_tokens):
            raise ValueError(
                f"ByteTokenizer: special_tokens must be distinct, got {self.special_tokens}"
            )

    @property
    def vocab_size(self) -> int:
        """Number of token ids: 256 bytes plus the special tokens."""
        return NUM_BYTES + len(self.special_tokens)

    @property
    def eos_token_id(self) -> int:
        return NUM_BYTES

    @property
    def bos_token_id(self) -> int:
        return NUM_BYTES

    @property
    def pad_token_id(self) -> int:
        return NUM_BYTES + 1 if len(self.special_tokens) > 1 else NUM_BYTES

    def id_to_special(self, token_id: int) -> str:
        """The text of special token `token_id`; ValueError for a byte or unknown id."""
        index = token_id - NUM_BYTES
        if not 0 <= index < len(self.special_tokens):
            raise ValueError(
                f"ByteTokenizer: token id {token_id} is no special token "
                f"(special ids are {NUM_BYTES}..{self.vocab_size - 1})"
            )
        return self.special_tokens[index]

    def encode(
        self, text: str | bytes, *, add_bos: bool = False, add_eos: bool = False
    ) -> Int[np.ndarray, " tokens"]:
        """Token ids of `text` (its UTF-8 bytes; bytes are taken as they are), int32."""
        if isinstance(text, str):
            text = text.encode("utf-8")
        ids = np.frombuffer(text, dtype=np.uint8).astype(np.int32)
        parts = [ids]
        if add_bos:
            parts.insert(0, np.array([self.bos_token_id], np.int32))
        if add_eos:
            parts.append(np.array([self.eos_token_id], np.int32))
        return np.concatenate(parts) if len(parts) > 1 else ids

    def decode(
        self, ids: Iterable[int | np.integer] | np.ndarray, *, skip_special_tokens: bool = True
    ) -> str:
        """Text of `ids`; invalid UTF-8 becomes U+FFFD. Special tokens are dropped
        unless skip_special_tokens is False, when their text is inserted."""
        decoder = StreamDecoder(self, skip_special_tokens=skip_special_tokens)
        ids = np.asarray(ids).reshape(-1).tolist()
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(
                    f"ByteTokenizer.decode: ids must lie in 0..{self.vocab_size - 1}, got {i}"
                )
        return decoder.feed(ids) + decoder.flush()

    def decoder(self, *, skip_special_tokens: bool = True) -> StreamDecoder:
        """An incremental decoder for streaming generation."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    @beartype
    def save(self, directory: str | os.PathLike) -> pathlib.Path:
        """Write `byte_tokenizer.json` into `directory` (created if missing); returns its path."""
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / self.FILENAME
        spec = {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "num_byte_tokens": NUM_BYTES,
            "special_tokens": {t: NUM_BYTES + i for i, t in enumerate(self.special_tokens)},
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "vocab_size": self.vocab_size,
        }
        path.write_text(json.dumps(spec, indent=2) + "\n")
        return path

    @staticmethod
    @beartype
    def saved_in(directory: str | os.PathLike) -> bool:
        """Whether `directory` holds a saved ByteTokenizer."""
        return (pathlib.Path(directory) / ByteTokenizer.FILENAME).is_file()

    @classmethod
    @beartype
    def load(cls, directory: str | os.PathLike) -> ByteTokenizer:
        """Read the tokenizer saved in `directory` by `save`."""
        path = pathlib.Path(directory) / cls.FILENAME
        if not path.is_file():
            raise FileNotFoundError(f"ByteTokenizer.load: no {cls.FILENAME} in {directory}")
        try:
            spec = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"ByteTokenizer.load: {path} is not valid JSON: {e}") from e
        if not isinstance(spec, dict) or spec.get("format") != _FORMAT:
            raise ValueError(f"ByteTokenizer.load: {path} is not a {_FORMAT} file")
        version, num_bytes = spec.get("format_version"), spec.get("num_byte_tokens")
        if version != _FORMAT_VERSION or num_bytes != NUM_BYTES:
            raise ValueError(
                f"ByteTokenizer.load: {path} has format_version {version} and "
                f"num_byte_tokens {num_bytes}; this library reads version "
                f"{_FORMAT_VERSION} with {NUM_BYTES} byte tokens"
            )
        specials = spec.get("special_tokens")
        if not isinstance(specials, dict) or sorted(specials.values()) != list(
            range(NUM_BYTES, NUM_BYTES + len(specials))
        ):
            raise ValueError(
                f"ByteTokenizer.load: special_tokens in {path} must map names to the ids "
                f"{NUM_BYTES}, {NUM_BYTES + 1}, ... without gaps, got {specials!r}"
            )
        return cls(tuple(sorted(specials, key=specials.__getitem__)))
