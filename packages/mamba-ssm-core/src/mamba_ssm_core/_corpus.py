"""Training text for the byte-level models: a fixed list of files, split train/held-out.

The default corpus is the running Python's standard library source: every `*.py`
file under `sysconfig.get_paths()["stdlib"]` outside `site-packages`, sorted by its
relative POSIX path, so the list is the same on every machine with the same Python.
A user corpus is any list of files, directories (every regular file below, sorted)
or glob patterns.

Held-out split: with 20 files or more, a file is held out when the CRC-32 of its
relative name is 0 mod 20 (about 5% of the files; a file never straddles the
split). With fewer files, or where that rule leaves one side empty, the last 5% of
the concatenated bytes are held out instead.

Token streams: each file's bytes (ids 0..255) followed by the end-of-text token
(id 256), concatenated in list order, as uint16.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import pathlib
import sys
import sysconfig
import zlib
from collections.abc import Sequence

import numpy as np

from .tokenizer import NUM_BYTES

EOS_ID = NUM_BYTES
HELDOUT_MODULUS = 20
_CORPUS_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Files' bytes, concatenated, with their names and the split.

    data: uint8 bytes of all files in order; offsets: int64 (files + 1,), file i is
    data[offsets[i]:offsets[i + 1]]; names: each file's name relative to its root;
    heldout_from: files are split by name when -1, otherwise held-out text is
    data[heldout_from:] (byte split); heldout_files: bool (files,) for the name split;
    source: where the files came from, e.g. "python-3.11.7-stdlib".
    """

    data: np.ndarray
    offsets: np.ndarray
    names: tuple[str, ...]
    heldout_files: np.ndarray
    heldout_from: int
    source: str

    @property
    def num_bytes(self) -> int:
        return int(self.data.size)

    def fingerprint(self) -> str:
        """SHA-256 over the names, the bytes and the split: equal corpora, equal prints."""
        h = hashlib.sha256()
        h.update(f"v{_CORPUS_VERSION};{self.heldout_from};".encode())
        h.update("\0".join(self.names).encode())
        h.update(np.packbits(self.heldout_files).tobytes())
        h.update(self.data.tobytes())
        return h.hexdigest()

    def tokens(self, split: str) -> np.ndarray:
        """The token stream (uint16) of split "train" or "heldout"."""
        if split not in ("train", "heldout"):
            raise ValueError(f"Corpus.tokens: split must be 'train' or 'heldout', got {split!r}")
        n = len(self.names)
        if self.heldout_from < 0:
            want = self.heldout_files if split == "heldout" else ~self.heldout_files
            pieces = [
                (int(self.offsets[i]), int(self.offsets[i + 1])) for i in range(n) if want[i]
            ]
        else:
            # Every file before the cut goes to train (a straddling one cut short), every
            # file from the cut on to held-out (a straddling one from the cut).
            cut = self.heldout_from
            pieces = []
            for i in range(n):
                lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
                if split == "train" and lo < cut:
                    pieces.append((lo, min(hi, cut)))
                elif split == "heldout" and (lo >= cut or hi > cut):
                    pieces.append((max(lo, cut), hi))
        size = sum(hi - lo + 1 for lo, hi in pieces)
        out = np.empty(size, np.uint16)
        pos = 0
        for lo, hi in pieces:
            out[pos : pos + hi - lo] = self.data[lo:hi]
            out[pos + hi - lo] = EOS_ID
            pos += hi - lo + 1
        return out


def stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_source() -> str:
    v = sys.version_info
    return f"python-{v.major}.{v.minor}.{v.micro}-stdlib"


def stdlib_files() -> list[pathlib.Path]:
    """The default corpus: the standard library's `*.py` files, sorted by relative path."""
    root = stdlib_root()
    files = [
        p
        for p in root.rglob("*.py")
        if "site-packages" not in p.relative_to(root).parts and p.is_file()
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _expand(paths: Sequence[str | os.PathLike]) -> list[tuple[pathlib.Path, str]]:
    """(file, display name) for each file the user named, in order, without repeats."""
    out: list[tuple[pathlib.Path, str]] = []
    seen: set[pathlib.Path] = set()

    def add(p: pathlib.Path, name: str) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            out.append((p, name))

    for entry in paths:
        path = pathlib.Path(entry)
        if path.is_dir():
            for p in sorted(path.rglob("*"), key=lambda q: q.relative_to(path).as_posix()):
                if p.is_file():
                    add(p, (pathlib.Path(path.name) / p.relative_to(path)).as_posix())
        elif path.is_file():
            add(path, path.as_posix())
        else:
            matches = sorted(glob.glob(os.fspath(entry), recursive=True))
            files = [pathlib.Path(m) for m in matches if pathlib.Path(m).is_file()]
            if not files:
                raise FileNotFoundError(
                    f"corpus files: {os.fspath(entry)!r} is no file, directory or matching glob"
                )
            for p in files:
                add(p, p.as_posix())
    return out


def build_corpus(files: Sequence[str | os.PathLike] | None = None) -> Corpus:
    """Read a corpus: the standard library's source when `files` is None, else the files,
    directories and globs given (read as raw bytes)."""
    if files is None:
        root = stdlib_root()
        named = [(p, p.relative_to(root).as_posix()) for p in stdlib_files()]
        source = stdlib_source()
    else:
        if isinstance(files, (str, os.PathLike)):
            raise TypeError("build_corpus: files must be a list of paths, not one path")
        named = _expand(files)
        source = "user-files"
    if not named:
        raise ValueError(f"build_corpus: files {files!r} named no file")
    blobs = [p.read_bytes() for p, _ in named]
    names = tuple(n for _, n in named)
    offsets = np.zeros(len(blobs) + 1, np.int64)
    offsets[1:] = np.cumsum([len(b) for b in blobs])
    data = np.frombuffer(b"".join(blobs), np.uint8).copy()
    if data.size < 2:
        raise ValueError(f"build_corpus: files {files!r} hold {data.size} bytes; need at least 2")
    heldout = np.array(
        [zlib.crc32(n.encode()) % HELDOUT_MODULUS == 0 for n in names], dtype=bool
    )
    heldout_from = -1
    if len(names) < HELDOUT_MODULUS or heldout.all() or not heldout.any():
        heldout = np.zeros(len(names), bool)
        heldout_from = data.size - max(1, data.size // HELDOUT_MODULUS)
    return Corpus(data, offsets, names, heldout, heldout_from, source)


def save_corpus(corpus: Corpus, path: str | os.PathLike) -> None:
    """Write `corpus` to a compressed `.npz` file."""
    np.savez_compressed(
        path,
        data=corpus.data,
        offsets=corpus.offsets,
        names=np.array("\0".join(corpus.names)),
        heldout_files=corpus.heldout_files,
        heldout_from=np.int64(corpus.heldout_from),
        source=np.array(corpus.source),
        version=np.int64(_CORPUS_VERSION),
    )


def load_corpus(path: str | os.PathLike) -> Corpus:
    """Read a corpus written by `save_corpus`."""
    try:
        with np.load(path, allow_pickle=False) as z:
            version = int(z["version"])
            corpus = Corpus(
                data=z["data"],
                offsets=z["offsets"],
                names=tuple(str(z["names"]).split("\0")),
                heldout_files=z["heldout_files"],
                heldout_from=int(z["heldout_from"]),
                source=str(z["source"]),
            )
    except (KeyError, zlib.error, OSError, ValueError, AttributeError) as e:
        raise ValueError(f"load_corpus: {path} is not a corpus file: {e}") from e
    if version != _CORPUS_VERSION:
        raise ValueError(
            f"load_corpus: {path} has corpus version {version}, this library reads "
            f"{_CORPUS_VERSION}"
        )
    if corpus.data.dtype != np.uint8 or corpus.offsets[-1] != corpus.data.size:
        raise ValueError(f"load_corpus: {path} is inconsistent (offsets do not match the data)")
    return corpus
