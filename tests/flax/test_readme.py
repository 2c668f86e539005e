"""The README examples of mamba-flax run as written, and do what they say."""

from __future__ import annotations

import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np

from tests.conformance.base import CONFIG, core_params
from tests.oracle import rel_err

README = pathlib.Path(__file__).resolve().parents[2] / "packages/mamba-flax/README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_three_examples():
    assert len(_python_blocks()) == 3


def test_drop_in_example_trains():
    namespace: dict = {}
    # optax mixes Python floats with int32 step counts: standard promotion, as users have
    with jax.numpy_dtype_promotion("standard"):
        exec(_python_blocks()[0], namespace)  # noqa: S102
    # 20 Adam steps on copying the current token, from log(16) = 2.77
    assert float(namespace["loss"]) < 0.5 * math.log(16)


def test_pretrained_example_decodes_like_the_full_forward(tmp_path):
    from mamba_flax import MambaLM

    MambaLM.from_params(CONFIG, core_params(CONFIG, seed=9)).save_pretrained(tmp_path / "in")
    namespace = {"path": tmp_path / "in", "out_dir": tmp_path / "out"}
    exec(_python_blocks()[1], namespace)  # noqa: S102
    lm, tokens = namespace["lm"], namespace["tokens"]
    assert namespace["logits"].shape == (1, 4, CONFIG.vocab_size)
    assert len(tokens) == 4 + 5
    # the last cached step has seen the prompt and the 5 tokens fed back
    full = lm(jnp.asarray([tokens], jnp.int32))[0, -1]
    assert rel_err(namespace["step_logits"][0], full) < 1e-4
    # generate's greedy tokens are those the hand-written loop fed back
    assert namespace["out"].tokens[0].tolist() == tokens[4:]
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_orbax_example_restores_the_same_model(tmp_path):
    from mamba_flax import MambaLM

    lm = MambaLM.from_params(CONFIG, core_params(CONFIG, seed=10))
    namespace = {"lm": lm, "ckpt_dir": tmp_path.resolve()}
    exec(_python_blocks()[2], namespace)  # noqa: S102
    restored = namespace["restored"]
    jax.tree.map(np.testing.assert_array_equal, restored.to_params(), lm.to_params())
    ids = jnp.asarray([[1, 2, 3]], jnp.int32)
    np.testing.assert_array_equal(restored(ids), lm(ids))
