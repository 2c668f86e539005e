"""The conformance suite every adapter (Equinox, Flax NNX, Keras) passes with the same tests.

An adapter's test module subclasses `MambaConformanceTests`, sets `adapter` and
implements the hooks below (see README.md in this directory). The hooks are
framework-neutral: arrays go in as jax arrays, anything array-like comes out,
and parameters cross the boundary in the core's layout (`mamba_ssm_core.params`).

Levels: "mixer" (one Mamba mixer), "block" (RMSNorm + mixer in the fused add-norm
form), "backbone" (embedding, layers, final norm) and "lm" (backbone + head). Their
core parameters, inputs and reference outputs:

    level     core params                        inputs                    outputs
    mixer     layer_params(p, 0)["mixer"]         x (b, l, H) float32       y (b, l, H)
    block     layer_params(p, 0)                  (hidden, residual)        (hidden, residual)
    backbone  {"backbone": p["backbone"]}         input_ids (b, l) int32    (b, l, H)
    lm        p                                   input_ids (b, l) int32    logits (b, l, V)

The reference is the core's `mixer`, `residual_block`, `backbone` and `forward`.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import pathlib
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import mamba_ssm_core as core
import numpy as np
import pytest
from mamba_ssm_core import MambaConfig, init_params, param_shapes
from mamba_ssm_core.params import flatten, unflatten

from tests.oracle import rel_err
from tests.random_inputs import normal, token_ids

Level = Literal["mixer", "block", "backbone", "lm"]
LEVELS: tuple[Level, ...] = ("mixer", "block", "backbone", "lm")
FLOAT_INPUT_LEVELS: tuple[Level, ...] = ("mixer", "block")

# Small enough for the whole suite to run in about a minute per adapter on two cores;
# every size differs from the others, so a transposed weight cannot keep its shape.
CONFIG = MambaConfig(
    vocab_size=64,
    hidden_size=16,
    state_size=6,
    num_hidden_layers=2,
    expand=2,
    conv_kernel=4,
    time_step_rank=3,
    use_bias=True,
    use_conv_bias=True,
    layer_norm_epsilon=1e-5,
    residual_in_fp32=True,
    tie_word_embeddings=True,
)
BATCH, LENGTH = 2, 8

# Tolerances (relative error, ‖out − ref‖ / ‖ref‖).
SAME_MATH = 1e-6  # the adapter calls the same core function
GRADS = 1e-5
DECODE = 1e-4  # recurrent steps against the parallel scan
TRANSFORMERS = 1e-4  # the bound against the PyTorch ground truth
# bfloat16 compute against the float32 reference: about 5e-3 for CONFIG.
BF16_VS_F32 = 2e-2
# against the core's own bfloat16 compute: tight enough that computing in float32
# instead (5e-3 away) fails, which matters for the LM, whose logits are float32 anyway.
BF16_VS_CORE_BF16 = 1e-3


@dataclasses.dataclass(frozen=True)
class ToyTask:
    """A toy sequence task for the drop-in test: predict the previous token.

    targets[:, t] = inputs[:, t - 1] (and 0 at t = 0): a causal mixer solves it through
    its convolution. The adapter builds an embedding (vocab_size, config.hidden_size),
    the Mamba mixer for `config`, and a linear head to vocab_size, then takes `steps`
    Adam steps with `learning_rate` on the mean token cross-entropy over all of
    (inputs, targets), seeded by `seed`.
    """

    config: MambaConfig
    vocab_size: int
    inputs: np.ndarray  # (examples, length) int32
    targets: np.ndarray  # (examples, length) int32
    steps: int
    learning_rate: float
    seed: int


def make_toy_task(seed: int = 0) -> ToyTask:
    vocab, examples, length = 12, 32, 16
    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, vocab, (examples, length)).astype(np.int32)
    targets = np.concatenate([np.zeros((examples, 1), np.int32), inputs[:, :-1]], axis=1)
    config = dataclasses.replace(CONFIG, vocab_size=vocab, hidden_size=32, num_hidden_layers=1)
    return ToyTask(config, vocab, inputs, targets, steps=40, learning_rate=1e-2, seed=seed)


# --- the core side -----------------------------------------------------------------------


def core_params(config: MambaConfig, seed: int = 0) -> dict[str, Any]:
    """A full LM parameter pytree (float32) drawn with NumPy (fast: no compilation), every
    leaf distinct, A_log and D away from their init values, dt in the usual range."""
    rng = np.random.default_rng(seed)
    flat = {}
    for path, shape in param_shapes(config).items():
        noise = rng.standard_normal(shape)
        if path.endswith("A_log"):
            N = shape[-1]
            value = np.log(np.arange(1, N + 1)) + 0.1 * noise
        elif path.endswith(("D", "norm.weight", "norm_f.weight")):
            value = 1.0 + 0.1 * noise
        elif path.endswith("dt_proj.bias"):
            dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), shape))
            value = np.log(np.expm1(dt))  # inverse softplus
        elif path.endswith("embeddings.weight"):
            value = 0.5 * noise
        elif path.endswith("bias"):
            value = 0.1 * noise
        else:  # (out, in) or (I, 1, K) weights: U(±1/sqrt(fan_in)), as PyTorch's default
            bound = 1 / math.sqrt(shape[-1] * (shape[-2] if path.endswith("conv1d.weight")
                                              else 1))
            value = rng.uniform(-bound, bound, shape)
        flat[path] = jnp.asarray(value, jnp.float32)
    return unflatten(flat)


def params_at(level: Level, params: dict[str, Any]) -> Any:
    """The core parameters of `level`, taken from a full LM parameter pytree."""
    if level == "mixer":
        return core.layer_params(params, 0)["mixer"]
    if level == "block":
        return core.layer_params(params, 0)
    if level == "backbone":
        return {"backbone": params["backbone"]}
    return params


def make_inputs(level: Level, config: MambaConfig, seed: int = 0) -> Any:
    """Batched inputs of `level`: float32 activations or int32 token ids, fresh random
    values drawn with NumPy (jax.random would compile a program per shape)."""
    shape = (BATCH, LENGTH, config.hidden_size)
    if level == "mixer":
        return normal(100 + seed, shape)
    if level == "block":
        return normal(100 + seed, shape, shape)
    return token_ids(100 + seed, (BATCH, LENGTH), config.vocab_size)


def core_apply(level: Level, config: MambaConfig, params: Any, inputs: Any,
               dtype: Any = None) -> Any:
    """The core's output for `level` (the reference); `dtype` is the compute dtype."""
    if level == "mixer":
        x = inputs if dtype is None else inputs.astype(dtype)
        return core.mixer(params, config, x)[0]
    if level == "block":
        hidden, residual = inputs
        hidden = hidden if dtype is None else hidden.astype(dtype)
        out, residual, _ = core.residual_block(params, config, hidden, residual)
        return out, residual
    if level == "backbone":
        return core.backbone(params, config, inputs, dtype=dtype)
    return core.forward(params, config, inputs, dtype=dtype)


# The core's side of the suite is the same for every adapter: CONFIG's parameters, the
# inputs, and the core's outputs and gradients on them. Each is computed once per process
# (the same eager calls as before) and shared by every test and every adapter class
# instead of once per test: most of the suite's time is XLA compiling these tiny programs.
_SHARED: dict[tuple[Any, ...], Any] = {}


def _shared(key: tuple[Any, ...], make: Callable[[], Any]) -> Any:
    if key not in _SHARED:
        _SHARED[key] = make()
    return _SHARED[key]


def suite_params() -> dict[str, Any]:
    """`core_params(CONFIG)`, the parameters every test of the suite uses (immutable
    arrays: tests must not change the dicts)."""
    return _shared(("params",), lambda: core_params(CONFIG))


def _suite_level(level: Level, lm_params: Any) -> Any:
    if lm_params is not suite_params():
        raise ValueError("the shared core references are for suite_params() only")
    return params_at(level, lm_params)


def core_reference(level: Level, lm_params: Any, seed: int = 0, dtype: Any = None) -> Any:
    """`core_apply(level, CONFIG, params_at(level, lm_params), make_inputs(level, CONFIG,
    seed), dtype)` for lm_params = suite_params(), computed once."""
    def make() -> Any:
        return core_apply(level, CONFIG, _suite_level(level, lm_params),
                          make_inputs(level, CONFIG, seed), dtype=dtype)

    return _shared(("apply", level, seed, None if dtype is None else jnp.dtype(dtype).name),
                   make)


def core_reference_grads(level: Level, lm_params: Any) -> tuple[Any, Any, Any]:
    """For lm_params = suite_params(), computed once: (cotangent, d params, d inputs or
    None) of sum(core_apply(...) * cotangent) on make_inputs(level, CONFIG), the
    cotangent fresh normal values of the output's shapes."""
    def make() -> tuple[Any, Any, Any]:
        params = _suite_level(level, lm_params)
        inputs = make_inputs(level, CONFIG)
        # the output's shapes only: no need to run (and compile) the forward for them
        out = jax.eval_shape(lambda p, x: core_apply(level, CONFIG, p, x), params, inputs)
        rng = np.random.default_rng(7)
        cot = jax.tree.map(
            lambda o: jnp.asarray(rng.standard_normal(o.shape).astype(np.float32)), out)

        def loss(p, x):
            y = core_apply(level, CONFIG, p, x)
            return sum(jnp.sum(a.astype(jnp.float32) * c)
                       for a, c in zip(jax.tree.leaves(y), jax.tree.leaves(cot), strict=True))

        if level in FLOAT_INPUT_LEVELS:
            d_params, d_inputs = jax.grad(loss, argnums=(0, 1))(params, inputs)
            return cot, d_params, d_inputs
        return cot, jax.grad(loss)(params, inputs), None

    return _shared(("grads", level), make)


def untied_case() -> tuple[MambaConfig, dict[str, Any], Any, Any, Any]:
    """CONFIG untied, its parameters (seed 3), lm inputs, and the core's logits and
    backbone output on them; computed once."""
    def make() -> tuple[MambaConfig, dict[str, Any], Any, Any, Any]:
        config = dataclasses.replace(CONFIG, tie_word_embeddings=False)
        params = core_params(config, seed=3)
        ids = make_inputs("lm", config)
        return (config, params, ids, core.forward(params, config, ids),
                core.backbone(params, config, ids))

    return _shared(("untied",), make)


def is_float_array(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


# --- comparisons -------------------------------------------------------------------------


def _leaves(tree: Any) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_trees_equal(got: Any, want: Any, what: str) -> None:
    """Same structure, dtypes, shapes and values, bit for bit."""
    assert jax.tree.structure(got) == jax.tree.structure(want), (
        f"{what}: structure {jax.tree.structure(got)} != {jax.tree.structure(want)}")
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), _leaves(want), strict=True):
        g = np.asarray(g)
        name = jax.tree_util.keystr(path)
        assert g.dtype == w.dtype, f"{what}{name}: dtype {g.dtype} != {w.dtype}"
        assert g.shape == w.shape, f"{what}{name}: shape {g.shape} != {w.shape}"
        assert np.array_equal(g, w), f"{what}{name}: values differ"


def assert_trees_close(got: Any, want: Any, tol: float, what: str) -> None:
    """Same structure and shapes, every leaf within relative error `tol`."""
    assert jax.tree.structure(got) == jax.tree.structure(want), (
        f"{what}: structure {jax.tree.structure(got)} != {jax.tree.structure(want)}")
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), _leaves(want), strict=True):
        err = rel_err(np.asarray(g, np.float64), w)
        assert err <= tol, f"{what}{jax.tree_util.keystr(path)}: relative error {err:.3g} > {tol}"


# --- the guard ---------------------------------------------------------------------------


def _has_xfail_with_reason(fn: Callable) -> bool:
    marks = getattr(fn, "pytestmark", [])
    return any(m.name == "xfail" and m.kwargs.get("reason") for m in marks)


def overridden_without_reason(cls: type) -> list[str]:
    """The shared tests that `cls` deletes, or overrides without an xfail giving a reason."""
    problems = []
    for name in sorted(n for n in dir(MambaConformanceTests) if n.startswith("test_")):
        shared = getattr(MambaConformanceTests, name)
        mine = getattr(cls, name, None)
        if not callable(mine):
            problems.append(f"{name}: deleted (not a test function)")
        elif mine is not shared and not _has_xfail_with_reason(mine):
            problems.append(f"{name}: overridden without @pytest.mark.xfail(reason=...)")
    return problems


# --- the suite ---------------------------------------------------------------------------


class MambaConformanceTests(abc.ABC):
    """Subclass as `Test<Framework>Conformance`, set `adapter` and implement the hooks.

    An "object" below is whatever the adapter builds for a level: a module, a layer,
    a model. Inputs and outputs are as in the module docstring's table, batched;
    outputs may be any array type that `np.asarray` takes.
    """

    adapter: ClassVar[str]

    # --- hooks -------------------------------------------------------------------------

    @abc.abstractmethod
    def from_core(self, level: Level, config: MambaConfig, params: Any, *,
                  compute_dtype: Any = None) -> Any:
        """Build the adapter's object for `level` holding exactly `params` (core layout).

        compute_dtype: None for the core's default (the input's dtype for mixer and block,
        the embedding's for backbone and lm: float32 here), or e.g. jnp.bfloat16 to compute
        in bfloat16 with the parameters kept as given (float32).
        """

    @abc.abstractmethod
    def to_core(self, level: Level, obj: Any) -> Any:
        """The object's parameters in the core's layout for `level` (dtypes as stored)."""

    @abc.abstractmethod
    def init(self, level: Level, config: MambaConfig, *, seed: int) -> Any:
        """A freshly initialised object, built the framework's own way (its RNG, its
        constructor), with float32 parameters."""

    @abc.abstractmethod
    def apply(self, level: Level, obj: Any, inputs: Any) -> Any:
        """The object's output on batched `inputs`, called the framework's usual way."""

    @abc.abstractmethod
    def apply_jit(self, level: Level, obj: Any, inputs: Any) -> Any:
        """As `apply`, but through the framework's own jit (eqx.filter_jit, nnx.jit, a
        compiled Keras function)."""

    @abc.abstractmethod
    def grads(self, level: Level, obj: Any, inputs: Any, cotangent: Any) -> tuple[Any, Any]:
        """Gradients of sum(output * cotangent) (summed over every output leaf, in float32)
        through the framework's own autodiff (and jit, where it has one).

        Returns (d/d inputs, or None for integer inputs; d/d parameters in the core's
        layout for `level`).
        """

    @abc.abstractmethod
    def decode(self, lm: Any, input_ids: Any, *, prefill: int) -> Any:
        """Logits (batch, length, vocab) from the adapter's cached decoding: one call on
        input_ids[:, :prefill] that returns a cache, then one cached step per remaining
        token, the logits of all calls concatenated along the length."""

    @abc.abstractmethod
    def from_pretrained(self, path: pathlib.Path) -> Any:
        """The adapter's causal LM loaded from a transformers checkpoint directory."""

    @abc.abstractmethod
    def save(self, level: Level, obj: Any, directory: pathlib.Path) -> None:
        """Save the object in the framework's native format under `directory` (exists)."""

    @abc.abstractmethod
    def load(self, level: Level, config: MambaConfig, directory: pathlib.Path) -> Any:
        """Load what `save` wrote, given the config it was built with."""

    @abc.abstractmethod
    def train_toy(self, task: ToyTask) -> Sequence[float]:
        """Train a small model written the framework's usual way (embedding, the Mamba
        mixer, a linear head) on `task`; return the loss at each of task.steps steps."""

    # --- fixtures ----------------------------------------------------------------------

    @pytest.fixture(scope="class")
    @classmethod
    def lm_params(cls) -> dict[str, Any]:
        return suite_params()

    # --- shared outputs ----------------------------------------------------------------

    def _eager_output(self, level: Level, lm_params: Any) -> Any:
        """self.apply(level, self.from_core(level, CONFIG, params_at(level, lm_params)),
        make_inputs(level, CONFIG)): the tests of outputs, jit and loading all compare with
        it, so it is computed once per adapter (each eager call compiles anew)."""
        def make() -> Any:
            obj = self.from_core(level, CONFIG, _suite_level(level, lm_params))
            return self.apply(level, obj, make_inputs(level, CONFIG))

        return _shared((type(self).__qualname__, "eager", level), make)

    # --- the guard ---------------------------------------------------------------------

    def test_no_overrides_DO_NOT_OVERRIDE(self) -> None:  # noqa: N802
        """A subclass may not delete or override a shared test, except behind
        @pytest.mark.xfail(reason=...) that says why."""
        problems = overridden_without_reason(type(self))
        assert not problems, "shared conformance tests weakened:\n  " + "\n  ".join(problems)

    # --- conversion and forward --------------------------------------------------------

    @pytest.mark.parametrize("level", LEVELS)
    def test_conversion_round_trip_is_exact(self, level: Level, lm_params) -> None:
        params = params_at(level, lm_params)
        obj = self.from_core(level, CONFIG, params)
        assert_trees_equal(self.to_core(level, obj), params, f"{level} params")

    def test_untied_lm_head_round_trip_and_outputs(self) -> None:
        """An untied head: the LM and its backbone alone."""
        config, params, ids, want_logits, want_hidden = untied_case()
        assert "lm_head" in params
        obj = self.from_core("lm", config, params)
        assert_trees_equal(self.to_core("lm", obj), params, "untied lm params")
        assert_trees_close(self.apply("lm", obj, ids), want_logits, SAME_MATH,
                           "untied lm logits")
        # the backbone of an untied model holds no head
        bb = self.from_core("backbone", config, params_at("backbone", params))
        assert_trees_equal(self.to_core("backbone", bb), params_at("backbone", params),
                           "untied backbone params")
        assert_trees_close(self.apply("backbone", bb, ids), want_hidden, SAME_MATH,
                           "untied backbone output")

    @pytest.mark.parametrize("level", LEVELS)
    def test_outputs_equal_core_forward(self, level: Level, lm_params) -> None:
        got = self._eager_output(level, lm_params)
        want = core_reference(level, lm_params)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert np.asarray(g).dtype == np.asarray(w).dtype, f"{level}: output dtype"
        assert_trees_close(got, want, SAME_MATH, f"{level} output")

    # --- the PyTorch ground truth ------------------------------------------------------

    @pytest.mark.torch
    @pytest.mark.parametrize("variant", ["small", "odd"])
    def test_from_pretrained_matches_transformers(self, variant: str) -> None:
        """"odd" is untied, with biases, expand 3, conv width 3 and 3 layers."""
        from tests.hf_checkpoints import cached_checkpoint, hf_logits

        path, torch_model = cached_checkpoint(variant)
        ids = np.random.default_rng(0).integers(0, torch_model.config.vocab_size, (2, 11))
        lm = self.from_pretrained(pathlib.Path(path))
        got = self.apply("lm", lm, jnp.asarray(ids, jnp.int32))
        assert np.asarray(got).dtype == np.float32
        err = rel_err(got, hf_logits(torch_model, ids))
        assert err <= TRANSFORMERS, f"logits differ from transformers: relative error {err:.3g}"

    # --- autodiff, jit -----------------------------------------------------------------

    # Not "backbone": every adapter's LM holds its backbone object, whose parameters are
    # the LM's backbone.* leaves, so [lm] checks the backbone's gradients (and their
    # conversion to the core layout) too, as the head's; each level's adapter gradient
    # is a compile of several seconds per adapter.
    @pytest.mark.parametrize("level", ("mixer", "block", "lm"))
    def test_gradients_equal_core(self, level: Level, lm_params) -> None:
        params = params_at(level, lm_params)
        inputs = make_inputs(level, CONFIG)
        # the core's gradients of sum(output * cot), cot fresh normal values
        cot, want_params, want_inputs = core_reference_grads(level, lm_params)
        obj = self.from_core(level, CONFIG, params)
        d_inputs, d_params = self.grads(level, obj, inputs, cot)
        if level in FLOAT_INPUT_LEVELS:
            assert_trees_close(d_inputs, want_inputs, GRADS, f"{level} d/d inputs")
        else:
            assert d_inputs is None, f"{level}: integer inputs have no gradient"
        assert_trees_close(d_params, want_params, GRADS, f"{level} d/d params")

    @pytest.mark.parametrize("level", LEVELS)
    def test_framework_jit_equals_eager(self, level: Level, lm_params) -> None:
        params = params_at(level, lm_params)
        obj = self.from_core(level, CONFIG, params)
        inputs = make_inputs(level, CONFIG)
        eager = self._eager_output(level, lm_params)  # self.apply on an object built as obj
        assert_trees_close(self.apply_jit(level, obj, inputs), eager, SAME_MATH, f"{level} jit")
        # new values of the same shapes: nothing of the first inputs is baked in
        inputs2 = make_inputs(level, CONFIG, seed=1)
        assert_trees_close(self.apply_jit(level, obj, inputs2),
                           core_reference(level, lm_params, seed=1), SAME_MATH,
                           f"{level} jit, second call")

    # --- decoding ----------------------------------------------------------------------

    # A one-token prefill (the cached call's one-step path) and a 5-token one (the
    # parallel scan from a cache), each followed by two cached steps: the second continues
    # a step's cache, and after the 5-token prefill the steps shift prefill tokens out of
    # the conv state (conv_kernel 4). Each eager step compiles anew (up to a second), so
    # the ids stop there rather than at LENGTH.
    @pytest.mark.parametrize("prefill, length", [(1, 3), (5, 7)])
    def test_cached_decoding_equals_full_forward(self, prefill: int, length: int,
                                                 lm_params) -> None:
        lm = self.from_core("lm", CONFIG, lm_params)
        ids = make_inputs("lm", CONFIG)[:, :length]
        got = self.decode(lm, ids, prefill=prefill)
        assert np.asarray(got).shape == (BATCH, length, CONFIG.vocab_size)
        # the core's full forward (which the adapter's equals, test_outputs_equal_core_forward)
        # of all LENGTH ids; causal, so its first `length` positions are those of `ids`
        want = np.asarray(core_reference("lm", lm_params))[:, :length]
        assert_trees_close(got, want, DECODE, f"prefill {prefill} + steps")

    # --- dtypes ------------------------------------------------------------------------

    @pytest.mark.parametrize("level", LEVELS)
    def test_bfloat16_compute_with_float32_params(self, level: Level, lm_params) -> None:
        params = params_at(level, lm_params)
        inputs = make_inputs(level, CONFIG)
        obj = self.from_core(level, CONFIG, params, compute_dtype=jnp.bfloat16)
        assert_trees_equal(self.to_core(level, obj), params, f"{level} params kept float32")
        got = self.apply(level, obj, inputs)
        want_bf16 = core_reference(level, lm_params, dtype=jnp.bfloat16)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want_bf16), strict=True):
            assert np.asarray(g).dtype == np.asarray(w).dtype, (
                f"{level}: output dtype {np.asarray(g).dtype}, the core gives "
                f"{np.asarray(w).dtype}")
        assert_trees_close(got, want_bf16, BF16_VS_CORE_BF16, f"{level} vs core bf16")
        assert_trees_close(got, core_reference(level, lm_params), BF16_VS_F32,
                           f"{level} bf16 vs float32")

    # --- initialisation ----------------------------------------------------------------

    @pytest.mark.parametrize("level", LEVELS)
    def test_fresh_init_follows_the_official_init(self, level: Level) -> None:
        got = self.to_core(level, self.init(level, CONFIG, seed=0))
        want = params_at(level, init_params(jax.random.key(0), CONFIG))
        shapes = lambda t: jax.tree.map(lambda a: (np.shape(a), np.asarray(a).dtype), t)  # noqa: E731
        assert shapes(got) == shapes(want), f"{level}: layout differs from init_params"
        flat = {k: np.asarray(v) for k, v in flatten(got).items()}
        N, H = CONFIG.state_size, CONFIG.hidden_size
        for path, v in flat.items():
            if path.endswith("A_log"):
                expect = np.broadcast_to(np.log(np.arange(1, N + 1, dtype=np.float32)), v.shape)
                np.testing.assert_allclose(v, expect, rtol=1e-6, err_msg=path)
            elif path.endswith("D"):
                np.testing.assert_array_equal(v, np.ones_like(v), err_msg=path)
            elif path.endswith("dt_proj.bias"):
                dt = np.logaddexp(0.0, v.astype(np.float64))  # softplus
                lo, hi = CONFIG.time_step_min, CONFIG.time_step_max
                assert dt.min() >= lo * (1 - 1e-4) and dt.max() <= hi * (1 + 1e-4), (
                    f"{path}: softplus(bias) in [{dt.min():.3g}, {dt.max():.3g}], "
                    f"not in [{lo}, {hi}]")
                assert np.ptp(dt) > 0.1 * (hi - lo), f"{path}: dt is not spread over the range"
            elif path.endswith("in_proj.weight"):
                bound = 1 / math.sqrt(H)
                assert np.abs(v).max() <= bound and v.std() > 0.3 * bound, (
                    f"{path}: not U(±1/sqrt(hidden))")
        other = flatten(self.to_core(level, self.init(level, CONFIG, seed=1)))
        in_proj = [p for p in flat if p.endswith("in_proj.weight")]
        assert in_proj and not np.array_equal(flat[in_proj[0]], np.asarray(other[in_proj[0]])), (
            f"{level}: seeds 0 and 1 give the same weights")

    # --- native serialisation ----------------------------------------------------------

    @pytest.mark.parametrize("level", LEVELS)
    def test_save_and_load_native_format(self, level: Level, lm_params,
                                         tmp_path: pathlib.Path) -> None:
        params = params_at(level, lm_params)
        obj = self.from_core(level, CONFIG, params)
        self.save(level, obj, tmp_path)
        assert any(tmp_path.iterdir()), "save wrote nothing"
        loaded = self.load(level, CONFIG, tmp_path)
        assert_trees_equal(self.to_core(level, loaded), params, f"{level} loaded params")
        # the saved object's output: self.apply on an object built as obj was
        assert_trees_equal(self.apply(level, loaded, make_inputs(level, CONFIG)),
                           self._eager_output(level, lm_params), f"{level} outputs after loading")

    # --- drop-in use -------------------------------------------------------------------

    def test_drop_in_training_lowers_the_loss(self) -> None:
        task = make_toy_task()
        losses = [float(x) for x in self.train_toy(task)]
        assert len(losses) == task.steps, f"{len(losses)} losses for {task.steps} steps"
        assert all(math.isfinite(x) for x in losses), f"non-finite loss: {losses}"
        assert losses[0] > 0.8 * math.log(task.vocab_size), (
            f"first loss {losses[0]:.3f} is not that of an untrained model "
            f"(log vocab = {math.log(task.vocab_size):.3f})")
        assert losses[-1] < 0.5 * losses[0], (
            f"loss went from {losses[0]:.3f} to {losses[-1]:.3f} in {task.steps} steps")
