"""The README examples of mamba-keras run as written, and do what they say."""

from __future__ import annotations

import dataclasses
import pathlib
import re

import jax
import mamba_ssm_core as core
import numpy as np

from tests.conformance.base import CONFIG, core_params
from tests.keras.layer_test import keras_numpy_semantics
from tests.oracle import rel_err

README = pathlib.Path(__file__).resolve().parents[2] / "packages/mamba-keras/README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_both_examples():
    assert len(_python_blocks()) == 2


def test_examples_train_and_decode(tmp_path):
    params = core_params(CONFIG, seed=9)
    core.save_pretrained(CONFIG, params, tmp_path / "in")
    namespace: dict = {"path": tmp_path / "in", "out_dir": tmp_path / "out"}
    with keras_numpy_semantics():
        exec(_python_blocks()[0], namespace)  # noqa: S102
    losses = namespace["history"].history["loss"]
    # 8 epochs of 4 Adam steps on the previous token, from log(16) = 2.77
    assert losses[-1] < 0.5 * np.log(16), losses

    exec(_python_blocks()[1], namespace)  # noqa: S102
    prompts, out = namespace["prompts"], namespace["out"]
    assert namespace["logits"].shape == (2, 4, CONFIG.vocab_size)
    # the config as the checkpoint holds it (save_pretrained writes the init-only
    # rescale_prenorm_residual as false): the program the README's generate compiled
    saved = dataclasses.replace(CONFIG, rescale_prenorm_residual=False)
    want = core.generate(params, saved, prompts, max_new_tokens=5, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(namespace["tokens"]), np.asarray(want.tokens))
    # the cached step after the prompt and the first generated token is the full forward's
    seq = np.concatenate([prompts, np.asarray(out.tokens[:, :1])], axis=1)
    full = core.forward(params, CONFIG, jax.numpy.asarray(seq))[:, -1]
    assert rel_err(namespace["step_logits"], full) < 1e-4
    assert (tmp_path / "out" / "model.safetensors").is_file()
