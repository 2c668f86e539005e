"""Files shipped inside the package: the bundled byte-level model.

`mamba-bytes-stdlib/` is a small Mamba LM trained with `mamba-train` on the Python
standard library's source (see benchmarks/RESULTS.md, "Bundled byte-level model"):
config.json + model.safetensors (transformers format), byte_tokenizer.json, and
training_summary.json with the training command and its held-out bits per byte.
"""

from __future__ import annotations

import pathlib

BUNDLED_MODEL_NAME = "mamba-bytes-stdlib"


def bundled_model_dir() -> pathlib.Path:
    """The folder of the bundled model; FileNotFoundError if the install lacks it."""
    path = pathlib.Path(__file__).resolve().parent / BUNDLED_MODEL_NAME
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"the bundled model is missing from this installation (expected {path}); "
            "pass --model with a checkpoint folder or hub id instead"
        )
    return path
