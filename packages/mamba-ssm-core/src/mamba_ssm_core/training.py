"""Training a causal Mamba language model: optimizer, loss, evaluation and the training loop.

`train(model_config, config, output_dir, corpus=...)` runs the whole recipe:

* optax AdamW (b1 0.9, b2 0.95) with linear warm-up and cosine decay, no weight decay on
  A_log, D, biases and norm weights (`weight_decay_mask`, by parameter name as in the
  transformers checkpoint keys), and gradient clipping by global norm;
* the compute dtype float32 or bfloat16 over float32 parameters, each layer
  rematerialised in the backward pass (`model.forward(..., remat=True)`);
* batches of random windows of the training token stream, a pure function of
  (seed, step), so a resumed run draws the same batches as an uninterrupted one;
* a progress line with the loss and tokens/s, held-out bits per byte every
  `eval_every` steps, and a JSON-lines log;
* checkpoints written with `save_pretrained` (transformers and every adapter load
  them), the byte tokenizer beside them, and the optimizer state and step, from which
  training resumes bit-identically;
* with `TrainConfig.mesh = (data, fsdp, tensor)` or `(data, fsdp, tensor, seq)`, the
  step on a device mesh (`sharding.make_mesh`, axes "data", "fsdp", "tensor", "seq"):
  parameters and optimizer state laid out by `sharding.train_shardings`, each batch
  split over data x fsdp, and `jax.jit` with those in/out shardings (XLA's
  partitioner does the rest, but the selective scan runs on each device's block,
  `sharding.ShardedScan`); a seq axis splits every window's length
  (`sharding.sequence_parallel_forward`), so a window longer than one device's
  memory trains.
  Batches are placed with `jax.make_array_from_process_local_data`, checkpoints
  gathered to the host and written by process 0, so the loop is written for
  several hosts after `jax.distributed.initialize()` (with output_dir on a shared
  filesystem); that has not been run here, only one process with 8 virtual CPU
  devices.

The corpus (see `build_corpus`) defaults to the running Python's standard library.
`byte_lm_config` gives a model config for the byte tokenizer. Lower-level pieces for
custom loops: `make_optimizer`, `lm_loss`, `evaluate_bits_per_byte`, `sample_batch`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from beartype import beartype
from jax import Array
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Float, Int, Integer
from safetensors.numpy import load_file, save_file

from ._corpus import Corpus, build_corpus, load_corpus, save_corpus
from .checkpoint import load_pretrained, save_pretrained
from .config import MambaConfig
from .model import forward
from .params import abstract_params, cast_params, check_params, flatten, init_params, unflatten
from ._scan_common import ScanImplementation
from .sharding import (
    AxisNames,
    ShardedScan,
    TrainShardings,
    make_mesh,
    sequence_parallel_forward,
    train_shardings,
)
from .tokenizer import ByteTokenizer

__all__ = [
    "Corpus",
    "TrainConfig",
    "TrainResult",
    "architecture",
    "build_corpus",
    "byte_lm_config",
    "evaluate_bits_per_byte",
    "has_checkpoint",
    "learning_rate_schedule",
    "lm_loss",
    "load_corpus",
    "make_optimizer",
    "sample_batch",
    "save_corpus",
    "saved_train_config",
    "train",
    "weight_decay_mask",
]

Params = dict[str, Any]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_STATE_FILE = "trainer_state.json"
_OPT_FILE = "optimizer.safetensors"
_LOG_FILE = "train_log.jsonl"
_STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one training run.

    steps: optimizer steps in the whole run (the cosine decay ends there).
    batch_size, seq_len: each step sees batch_size windows of seq_len + 1 tokens
      (seq_len predictions each).
    learning_rate: the peak, reached linearly after warmup_steps, then cosine decay to
      min_learning_rate at `steps`.
    weight_decay: AdamW's decoupled decay, on every parameter but A_log, D, biases and
      norms. adam_b1, adam_b2, adam_eps: AdamW's moments. grad_clip_norm: clip the
      global gradient norm to this (0 turns clipping off).
    compute_dtype: "float32" or "bfloat16" (parameters and optimizer state stay
      float32; the scan runs in float32 either way). remat: recompute each layer's
      activations in the backward pass instead of storing them.
    eval_every: held-out evaluation every this many steps (0: only at the end);
      eval_tokens: the held-out slice, its first eval_tokens predicted tokens.
    save_every: checkpoint every this many steps (and always at the end);
      log_every: log line and progress every this many steps.
    seed: parameter initialisation and batch sampling. impl: selective-scan
      implementation ("auto" or a registered name).
    time_limit_s: stop early, with a checkpoint, once this many seconds have passed.
    mesh: None (one device, the default) or (data, fsdp, tensor) or (data, fsdp,
      tensor, seq) sizes of a device mesh whose product is the number of devices
      (`jax.device_count()`): the batch splits over data x fsdp (so their product
      must divide batch_size), FSDP splits each parameter and its optimizer
      moments, tensor splits the mixer's inner channels (it must divide the model's
      intermediate_size), seq splits each window's length (it must divide seq_len,
      each shard at least conv_kernel - 1 long; see
      `sharding.sequence_parallel_forward`). See `sharding.train_shardings`. A run
      may resume with another mesh (or none);
      the layout changes only the floating-point summation order, so such a
      continuation agrees with an uninterrupted run to rounding, not bit for bit.
    """

    steps: int = 2000
    batch_size: int = 16
    seq_len: int = 512
    learning_rate: float = 2e-3
    min_learning_rate: float = 1e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip_norm: float = 1.0
    compute_dtype: str = "float32"
    remat: bool = True
    eval_every: int = 200
    eval_tokens: int = 65536
    save_every: int = 500
    log_every: int = 10
    seed: int = 0
    impl: str = "auto"
    time_limit_s: float | None = None
    mesh: tuple[int, ...] | None = None

    # Fields that may differ between a run and its resumption without changing the math
    # (mesh: only the floating-point summation order).
    RESUMABLE_CHANGES = ("eval_every", "eval_tokens", "save_every", "log_every", "time_limit_s",
                         "mesh")
    MESH_AXES = ("data", "fsdp", "tensor", "seq")  # the first three, or all four

    def __post_init__(self):
        def need(ok: bool, field: str, what: str):
            if not ok:
                got = getattr(self, field)
                raise ValueError(f"TrainConfig: {field} must be {what}, got {got!r}")

        for f in ("steps", "batch_size", "seq_len", "log_every"):
            v = getattr(self, f)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f, "an integer >= 1")
        for f in ("warmup_steps", "eval_every", "eval_tokens", "save_every", "seed"):
            v = getattr(self, f)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 0, f, "an integer >= 0")
        need(self.warmup_steps < self.steps, "warmup_steps", f"< steps ({self.steps})")
        for f in ("learning_rate", "adam_eps"):
            need(math.isfinite(getattr(self, f)) and getattr(self, f) > 0, f, "a number > 0")
        for f in ("min_learning_rate", "weight_decay", "grad_clip_norm"):
            need(math.isfinite(getattr(self, f)) and getattr(self, f) >= 0, f, "a number >= 0")
        need(self.min_learning_rate <= self.learning_rate, "min_learning_rate",
             f"<= learning_rate ({self.learning_rate})")
        for f in ("adam_b1", "adam_b2"):
            need(0 <= getattr(self, f) < 1, f, "in [0, 1)")
        need(self.compute_dtype in _DTYPES, "compute_dtype", f"one of {sorted(_DTYPES)}")
        need(isinstance(self.remat, bool), "remat", "True or False")
        need(isinstance(self.impl, str) and bool(self.impl), "impl", "a scan implementation name")
        need(self.time_limit_s is None or self.time_limit_s > 0, "time_limit_s", "None or > 0")
        if self.mesh is not None:
            m = self.mesh
            need(isinstance(m, (tuple, list)) and len(m) in (3, 4)
                 and all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in m),
                 "mesh", "None or three or four integers >= 1 (data, fsdp, tensor[, seq])")
            object.__setattr__(self, "mesh", tuple(m))
            need(self.batch_size % (m[0] * m[1]) == 0, "batch_size",
                 f"divisible by the mesh's data x fsdp = {m[0]} x {m[1]} = {m[0] * m[1]} "
                 f"batch shards (mesh={tuple(m)})")
            if len(m) == 4:
                need(self.seq_len % m[3] == 0, "seq_len",
                     f"divisible by the mesh's seq = {m[3]} sequence shards (mesh={tuple(m)})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"TrainConfig.from_dict: unknown fields {unknown}")
        d = dict(d)
        if isinstance(d.get("mesh"), list):  # JSON has no tuples
            d["mesh"] = tuple(d["mesh"])
        return cls(**d)


class TrainResult(NamedTuple):
    """What `train` returns: the final float32 parameters, the optimizer state, the
    step reached (less than config.steps when time_limit_s stopped the run), and the
    log records (dicts, as in train_log.jsonl)."""

    params: Params
    opt_state: Any
    step: int
    log: list[dict[str, Any]]


def byte_lm_config(
    *,
    hidden_size: int = 256,
    num_hidden_layers: int = 6,
    state_size: int = 16,
    expand: int = 2,
    conv_kernel: int = 4,
    tokenizer: ByteTokenizer | None = None,
    pad_vocab_to_multiple_of: int = 8,
) -> MambaConfig:
    """A Mamba config for the byte tokenizer: its vocabulary padded to a multiple of
    `pad_vocab_to_multiple_of` (vocab_size holds the padded size), tied embeddings, no
    linear biases, a conv bias, RMSNorm eps 1e-5, float32 residual and time_step_rank
    ceil(hidden_size / 16), as the original models."""
    tokenizer = tokenizer or ByteTokenizer()
    m = pad_vocab_to_multiple_of
    vocab = -(-tokenizer.vocab_size // m) * m
    return MambaConfig(
        vocab_size=vocab,
        hidden_size=hidden_size,
        state_size=state_size,
        num_hidden_layers=num_hidden_layers,
        expand=expand,
        conv_kernel=conv_kernel,
        time_step_rank=math.ceil(hidden_size / 16),
        use_bias=False,
        use_conv_bias=True,
        layer_norm_epsilon=1e-5,
        residual_in_fp32=True,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=(tokenizer.eos_token_id,),
        pad_token_id=tokenizer.pad_token_id,
    )


# MambaConfig fields read by init_params only: a checkpoint need not keep them.
_INIT_ONLY = ("time_step_min", "time_step_max", "time_step_floor", "time_step_scale",
              "time_step_init_scheme", "rescale_prenorm_residual")


def architecture(config: MambaConfig) -> dict[str, Any]:
    """The fields of `config` that a checkpoint fixes (all but the initialisation-only ones),
    as a transformers config dict: two configs with equal architectures run the same
    parameters identically."""
    return {k: v for k, v in config.to_hf_dict().items() if k not in _INIT_ONLY}


def _decays(path: str) -> bool:
    parts = path.split(".")
    if parts[-1] in ("A_log", "D", "bias"):
        return False
    return not any("norm" in p for p in parts[:-1])


def weight_decay_mask(params: Mapping[str, Any]) -> dict[str, Any]:
    """A pytree of bools like `params`: True where AdamW applies weight decay.

    False for A_log, D, every bias (dt_proj, conv1d, in/out_proj) and the RMSNorm
    weights (`...norm.weight`, `norm_f.weight`), by the transformers key names, as in
    the original Mamba training; True for the embedding and the projection weights.
    """
    return unflatten({p: _decays(p) for p in flatten(params)})


def _standard_promotion(fn: Callable) -> Callable:
    """`fn` run under JAX's standard dtype promotion: optax mixes Python floats with
    int32 step counts, which strict promotion (as in this repository's tests) refuses."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.numpy_dtype_promotion("standard"):
            return fn(*args, **kwargs)

    return wrapped


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    """Linear warm-up from 0 to learning_rate over warmup_steps, then cosine decay to
    min_learning_rate at `steps`."""
    return _standard_promotion(optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=config.steps,
        end_value=config.min_learning_rate,
    ))


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Gradient clipping by global norm, then AdamW with `learning_rate_schedule` and
    `weight_decay_mask`."""
    parts = []
    if config.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    parts.append(optax.adamw(
        learning_rate_schedule(config),
        b1=config.adam_b1,
        b2=config.adam_b2,
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
        mask=weight_decay_mask,
    ))
    tx = optax.chain(*parts)
    return optax.GradientTransformation(_standard_promotion(tx.init),
                                        _standard_promotion(tx.update))


def _logits(
    params: Params, model_config: MambaConfig, input_ids: Array, *, dtype: Any, remat: bool,
    impl: str | ScanImplementation, mesh: Mesh | None, sequence_axis: AxisNames,
) -> Array:
    """`model.forward`'s logits, or `sequence_parallel_forward`'s with a sequence axis."""
    if sequence_axis is None:
        return forward(params, model_config, input_ids, dtype=dtype, remat=remat, impl=impl)
    if mesh is None:
        raise ValueError(f"lm_loss: sequence_axis={sequence_axis!r} needs the mesh it names")
    return sequence_parallel_forward(params, model_config, input_ids, mesh=mesh,
                                     sequence_axis=sequence_axis, dtype=dtype, remat=remat,
                                     impl=impl)


def lm_loss(
    params: Params,
    model_config: MambaConfig,
    tokens: Int[Array, "batch length_plus_1"],
    *,
    weights: Float[Array, "batch length"] | None = None,
    dtype: Any = jnp.float32,
    remat: bool = False,
    impl: str | ScanImplementation = "auto",
    mesh: Mesh | None = None,
    sequence_axis: AxisNames = None,
) -> Float[Array, ""]:
    """Mean next-token cross-entropy (nats) of windows `tokens` (batch, length + 1):
    inputs tokens[:, :-1], targets tokens[:, 1:]. weights (batch, length), if given,
    weigh each target (a weighted mean; 0 leaves a target out). dtype: the compute dtype.
    remat: recompute each layer in the backward pass. sequence_axis: an axis (or axes)
    of `mesh` that splits the length (`sharding.sequence_parallel_forward`)."""
    logits = _logits(params, model_config, tokens[:, :-1], dtype=dtype, remat=remat, impl=impl,
                     mesh=mesh, sequence_axis=sequence_axis)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    if weights is None:
        return jnp.mean(nll)
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


@functools.partial(jax.jit,
                   static_argnames=("model_config", "dtype", "impl", "mesh", "sequence_axis"))
def _eval_sum(params, tokens, weights, *, model_config, dtype, impl, mesh, sequence_axis):
    logits = _logits(params, model_config, tokens[:, :-1], dtype=dtype, remat=False, impl=impl,
                     mesh=mesh, sequence_axis=sequence_axis)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    return jnp.sum(nll * weights)


def evaluate_bits_per_byte(
    params: Params,
    model_config: MambaConfig,
    tokens: Integer[np.ndarray, " n"],
    *,
    seq_len: int = 512,
    batch_size: int = 16,
    dtype: Any = jnp.float32,
    impl: str | ScanImplementation = "auto",
    batch_sharding: NamedSharding | None = None,
    sequence_axis: AxisNames = None,
) -> float:
    """Bits per byte of the token stream `tokens` (n,): every token but the first is
    predicted once, from the tokens before it in its window.

    The stream is cut into windows of seq_len + 1 tokens that overlap by one (as the
    training windows: the first prediction of a window has one token of context).
    The end-of-text separators between files count as bytes: bits per byte is the
    summed negative log2-likelihood over the n - 1 predicted tokens, divided by n - 1.
    batch_sharding: where each batch of windows goes (e.g. `train_shardings(...).batch`,
    with params placed on the same mesh); its batch shards must divide batch_size.
    sequence_axis: an axis (or axes) of batch_sharding's mesh that splits each window
    (`sharding.sequence_parallel_forward`); its size must divide seq_len.
    """
    tokens = np.asarray(tokens).astype(np.int32)
    n = tokens.size
    if n < 2:
        raise ValueError(f"evaluate_bits_per_byte: tokens must hold at least 2 tokens, got {n}")
    if seq_len < 1 or batch_size < 1:
        raise ValueError("evaluate_bits_per_byte: seq_len and batch_size must be >= 1, got "
                         f"{seq_len} and {batch_size}")
    rows = -(-(n - 1) // seq_len)
    rows_padded = -(-rows // batch_size) * batch_size
    stream = np.zeros(rows_padded * seq_len + 1, np.int32)
    stream[:n] = tokens
    weights = np.zeros(rows_padded * seq_len, np.float32)
    weights[: n - 1] = 1.0
    idx = np.arange(rows_padded)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    windows, w = stream[idx], weights.reshape(rows_padded, seq_len)
    if sequence_axis is not None and batch_sharding is None:
        raise ValueError(f"evaluate_bits_per_byte: sequence_axis={sequence_axis!r} needs a "
                         "batch_sharding on the mesh that has it")
    mesh = None if sequence_axis is None else batch_sharding.mesh
    if batch_sharding is None:
        place = jnp.asarray
    else:
        shards = _batch_shards(batch_sharding)
        if batch_size % shards:
            raise ValueError(f"evaluate_bits_per_byte: batch_size ({batch_size}) must be divisible "
                             f"by the {shards} batch shards of batch_sharding")

        def place(x):
            return _place_batch(x, batch_sharding)
    total = 0.0
    for lo in range(0, rows_padded, batch_size):
        s = _eval_sum(params, place(windows[lo : lo + batch_size]),
                      place(w[lo : lo + batch_size]), model_config=model_config,
                      dtype=jnp.dtype(dtype), impl=impl, mesh=mesh, sequence_axis=sequence_axis)
        total += float(s)
    return total / (n - 1) / math.log(2)


def sample_batch(
    tokens: Integer[np.ndarray, " n"], step: int, *, batch_size: int, seq_len: int, seed: int = 0
) -> Int[np.ndarray, "batch length_plus_1"]:
    """The training batch of `step`: batch_size windows of seq_len + 1 tokens at uniformly
    random offsets of the stream, int32. A pure function of (seed, step)."""
    n = np.size(tokens)
    if n < seq_len + 1:
        raise ValueError(f"sample_batch: the token stream ({n} tokens) is shorter than one "
                         f"window of seq_len + 1 = {seq_len + 1}")
    rng = np.random.default_rng((seed, step))
    starts = rng.integers(0, n - seq_len, size=batch_size)
    return np.asarray(tokens)[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)


def _global_norm(tree: Any) -> Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def _step_fn(model_config: MambaConfig, config: TrainConfig, mesh: Mesh | None = None) -> Callable:
    """One optimizer step: (params, opt_state, tokens) -> (params, opt_state, metrics)."""
    dtype = _DTYPES[config.compute_dtype]
    optimizer = make_optimizer(config)
    impl = config.impl if mesh is None else _mesh_impl(mesh, config.impl)
    sequence_axis = None if mesh is None else _sequence_axis(mesh)

    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(lm_loss)(
            params, model_config, tokens, dtype=dtype, remat=config.remat, impl=impl,
            mesh=mesh, sequence_axis=sequence_axis)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "grad_norm": _global_norm(grads)}

    return step


@functools.lru_cache(maxsize=8)
def _make_step(model_config: MambaConfig, config: TrainConfig):
    """The jitted training step; cached, so a resumed run in the same process reuses it."""
    step = _step_fn(model_config, config)
    donate = () if jax.default_backend() == "cpu" else (0, 1)
    return jax.jit(step, donate_argnums=donate)


# ---------------------------------------------------------------- on a mesh


def _mesh_names(config: TrainConfig) -> tuple[str, ...]:
    return TrainConfig.MESH_AXES[: len(config.mesh)]


def _sequence_axis(mesh: Mesh) -> str | None:
    """The mesh's "seq" axis if it splits anything."""
    return "seq" if mesh.shape.get("seq", 1) > 1 else None


def _mesh_impl(mesh: Mesh, impl: str) -> str | ScanImplementation:
    """The scan run on each device's block of the batch (data x fsdp) and channels
    (tensor): XLA's partitioner would gather a Pallas kernel's inputs onto every device."""
    split = [a for a in ("data", "fsdp", "tensor") if mesh.shape.get(a, 1) > 1]
    if not split:
        return impl
    batch = tuple(a for a in split if a != "tensor")
    return ShardedScan(mesh, batch_axis=batch or None,
                       channel_axis="tensor" if "tensor" in split else None, inner=impl)


def _mesh_for(model_config: MambaConfig, config: TrainConfig) -> Mesh:
    """The (data, fsdp, tensor[, seq]) mesh of config.mesh over every process's devices,
    after checking that it fits the devices and the model."""
    names = _mesh_names(config)
    sizes = dict(zip(names, config.mesh, strict=True))
    n = jax.device_count()
    if math.prod(config.mesh) != n:
        raise ValueError(
            f"train: mesh={config.mesh} ({', '.join(names)}) makes {math.prod(config.mesh)} "
            f"shards, but there are {n} {jax.default_backend()} devices; the sizes' product "
            "must equal the device count")
    inner = model_config.intermediate_size
    if inner % sizes["tensor"]:
        raise ValueError(
            f"train: mesh={config.mesh} has tensor size {sizes['tensor']}, which does not divide "
            f"the model's {inner} inner channels (intermediate_size = expand x hidden_size)")
    seq, k = sizes.get("seq", 1), model_config.conv_kernel
    if seq > 1 and config.seq_len // seq < k - 1:
        raise ValueError(
            f"train: mesh={config.mesh} splits seq_len {config.seq_len} into {seq} shards of "
            f"{config.seq_len // seq} steps, fewer than the conv's conv_kernel - 1 = {k - 1}")
    return make_mesh(sizes)


def _batch_shards(sharding: NamedSharding) -> int:
    entry = sharding.spec[0] if len(sharding.spec) else None
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    return math.prod(int(sharding.mesh.shape[a]) for a in names)


def _place_batch(batch: np.ndarray, sharding: NamedSharding) -> Array:
    """The global batch `batch` (identical in every process, as `sample_batch` is a pure
    function of (seed, step)) as an array split by `sharding`: each process hands
    `jax.make_array_from_process_local_data` the rows its own devices hold."""
    shape = batch.shape
    spans = sorted({idx[0].indices(shape[0])[:2]
                    for idx in sharding.addressable_devices_indices_map(shape).values()})
    rows = np.concatenate([batch[lo:hi] for lo, hi in spans])
    return jax.make_array_from_process_local_data(sharding, rows, shape)


def _place(tree: Any, shardings: Any) -> Any:
    """A pytree whose every process holds the whole value (parameters, optimizer state)
    placed with `shardings`."""
    return jax.tree.map(
        lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x), np.shape(x)),
        tree, shardings)


def _to_host(tree: Any) -> Any:
    """A pytree of (possibly sharded, possibly multi-process) arrays as numpy arrays."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


@functools.lru_cache(maxsize=8)
def _make_sharded_step(model_config: MambaConfig, config: TrainConfig,
                       mesh: Mesh) -> tuple[Callable, TrainShardings]:
    """The training step jitted over `mesh`, with the shardings of its inputs; cached
    like `_make_step`."""
    optimizer = make_optimizer(config)
    shapes = abstract_params(model_config)
    # An axis of size 1 splits nothing; leaving it out lets FSDP take the largest axis.
    axes = {f"{a}_axis": a if mesh.shape[a] > 1 else None for a in ("data", "fsdp", "tensor")}
    sh = train_shardings(mesh, shapes, jax.eval_shape(optimizer.init, shapes), **axes)
    # The batch is placed whole along the length (seq_len + 1 tokens); the forward's
    # shard_map splits the inputs' seq_len steps over the seq axis.
    step = _step_fn(model_config, config, mesh)
    donate = () if jax.default_backend() == "cpu" else (0, 1)
    replicated = NamedSharding(mesh, P())
    jitted = jax.jit(step, in_shardings=(sh.params, sh.opt_state, sh.batch),
                     out_shardings=(sh.params, sh.opt_state, replicated), donate_argnums=donate)
    return jitted, sh


# ---------------------------------------------------------------- checkpoints


def _tree_to_arrays(tree: Any) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def _arrays_to_tree(arrays: Mapping[str, np.ndarray], template: Any, where: str) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    names = [jax.tree_util.keystr(k) for k, _ in leaves]
    missing, unexpected = sorted(set(names) - set(arrays)), sorted(set(arrays) - set(names))
    if missing or unexpected:
        raise ValueError(f"{where}: the saved optimizer state does not fit this optimizer; "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    out = []
    for name, (_, t) in zip(names, leaves, strict=True):
        a = arrays[name]
        if a.shape != np.shape(t) or a.dtype != np.dtype(jnp.result_type(t)):
            raise ValueError(f"{where}: optimizer leaf {name} is {a.dtype}{list(a.shape)}, "
                             f"expected {jnp.result_type(t)}{list(np.shape(t))}")
        out.append(jnp.asarray(a))
    return jax.tree_util.tree_unflatten(treedef, out)


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_log(path: pathlib.Path, records: Sequence[Mapping[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def _save_checkpoint(out: pathlib.Path, params, opt_state, step: int, model_config,
                     config: TrainConfig, tokenizer: ByteTokenizer, corpus_fp: str,
                     records: Sequence[Mapping[str, Any]]) -> None:
    """Write the model (save_pretrained), tokenizer, optimizer state and trainer state
    into `out`; each file is written beside and moved into place, trainer_state.json
    last, holding the hashes of the others."""
    incoming = out / ".incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    save_pretrained(model_config, params, incoming)
    tokenizer.save(incoming)
    save_file(_tree_to_arrays(opt_state), incoming / _OPT_FILE)
    names = sorted(p.name for p in incoming.iterdir() if p.is_file())
    hashes = {name: _sha256(incoming / name) for name in names}
    for name in names:
        os.replace(incoming / name, out / name)
    incoming.rmdir()
    _write_log(out / _LOG_FILE, records)
    state = {
        "version": _STATE_VERSION,
        "step": step,
        "train_config": config.to_dict(),
        "corpus_fingerprint": corpus_fp,
        "files": hashes,
    }
    tmp = out / (_STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, out / _STATE_FILE)


def _load_checkpoint(out: pathlib.Path, model_config: MambaConfig, config: TrainConfig,
                     optimizer, corpus_fp: str):
    where = f"train: resuming from {out}"
    state = json.loads((out / _STATE_FILE).read_text())
    if state.get("version") != _STATE_VERSION:
        raise ValueError(f"{where}: {_STATE_FILE} has version {state.get('version')}, "
                         f"expected {_STATE_VERSION}")
    for name, digest in state["files"].items():
        if not (out / name).is_file() or _sha256(out / name) != digest:
            raise ValueError(f"{where}: {name} does not match {_STATE_FILE} (a checkpoint "
                             "write was interrupted or the file was changed)")
    saved = TrainConfig.from_dict(state["train_config"])
    diff = [f.name for f in dataclasses.fields(TrainConfig)
            if f.name not in TrainConfig.RESUMABLE_CHANGES
            and getattr(saved, f.name) != getattr(config, f.name)]
    if diff:
        raise ValueError(f"{where}: the checkpoint was trained with other settings for {diff} "
                         f"({', '.join(f'{d}={getattr(saved, d)!r}' for d in diff)}); pass the "
                         "same, or resume=False to start over")
    if state["corpus_fingerprint"] != corpus_fp:
        raise ValueError(f"{where}: the checkpoint was trained on another corpus (fingerprint "
                         "differs); pass the same corpus, or resume=False to start over")
    saved_model = MambaConfig.from_json_file(out / "config.json")
    if architecture(saved_model) != architecture(model_config):
        raise ValueError(f"{where}: the checkpoint's model config differs from model_config:\n"
                         f"  saved: {saved_model}\n  given: {model_config}")
    _, params = load_pretrained(out)
    params = cast_params(params, jnp.float32)
    opt_state = _arrays_to_tree(load_file(out / _OPT_FILE), optimizer.init(params), where)
    records = []
    if (out / _LOG_FILE).is_file():
        records = [json.loads(line) for line in (out / _LOG_FILE).read_text().splitlines()
                   if line.strip()]
    return params, opt_state, int(state["step"]), [r for r in records if r["step"] <= state["step"]]


def has_checkpoint(output_dir: str | os.PathLike) -> bool:
    """Whether `output_dir` holds a training checkpoint that `train` would resume from."""
    return (pathlib.Path(output_dir) / _STATE_FILE).is_file()


def saved_train_config(output_dir: str | os.PathLike) -> TrainConfig:
    """The TrainConfig of the checkpoint in `output_dir`."""
    state = json.loads((pathlib.Path(output_dir) / _STATE_FILE).read_text())
    return TrainConfig.from_dict(state["train_config"])


# ---------------------------------------------------------------- progress


class _Progress:
    """One status line on a terminal (redrawn in place), else a line per log step."""

    def __init__(self, total: int, enabled: bool, stream=None):
        self.total, self.enabled = total, enabled
        self.stream = stream or sys.stderr
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()

    def show(self, text: str, step: int) -> None:
        if not self.enabled:
            return
        width = 24
        filled = int(width * step / self.total)
        bar = f"[{'#' * filled}{'.' * (width - filled)}] {step}/{self.total}"
        if self.tty:
            self.stream.write(f"\r{bar} {text}\x1b[K")
        else:
            self.stream.write(f"{bar} {text}\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        if self.enabled:
            self.stream.write(("\r\x1b[K" if self.tty else "") + text + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _fmt_rate(x: float) -> str:
    if not math.isfinite(x):
        return "-"  # no timed step yet (the first one compiles)
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k"


# ---------------------------------------------------------------- the loop


def _as_corpus(corpus) -> Corpus:
    if corpus is None:
        return build_corpus()
    if isinstance(corpus, Corpus):
        return corpus
    if isinstance(corpus, (str, os.PathLike)):
        path = pathlib.Path(corpus)
        if path.suffix == ".npz":
            return load_corpus(path)
        return build_corpus([path])
    return build_corpus(list(corpus))


@beartype
def train(
    model_config: MambaConfig,
    config: TrainConfig,
    output_dir: str | os.PathLike,
    *,
    corpus: Corpus | str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    params: Mapping[str, Any] | None = None,
    resume: bool = True,
    tokenizer: ByteTokenizer | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    on_log: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train a causal Mamba LM on a byte-tokenized corpus, checkpointing into `output_dir`.

    model_config: the architecture (e.g. `byte_lm_config()`); its vocabulary must hold
      the tokenizer's. config: the hyperparameters (`TrainConfig`).
    output_dir: receives config.json + model.safetensors (`save_pretrained`),
      byte_tokenizer.json, optimizer.safetensors, trainer_state.json and
      train_log.jsonl every config.save_every steps and at the end.
    corpus: a `Corpus`, a `.npz` written by `save_corpus`, files / directories / globs
      (see `build_corpus`), or None for the Python standard library.
    params: initial parameters (cast to float32); default `init_params` with config.seed.
    resume: continue from the checkpoint in output_dir if there is one (same settings
      and corpus required); the result is bit-identical to an uninterrupted run on the
      same mesh (config.mesh may change on resumption; see `TrainConfig`).
    stop_after: end this call after that step (with a checkpoint) although the run's
      schedule goes on to config.steps; a later call resumes it.
    progress: draw the progress line on stderr. on_log: called with every log record.

    With config.mesh the step runs on a (data, fsdp, tensor[, seq]) device mesh (see
    `TrainConfig`) and the returned params and opt_state are sharded over it; several
    processes (after `jax.distributed.initialize()`) each run this same call, process 0
    prints and writes the checkpoint; that case has not been run in this repository.

    Returns a `TrainResult`.
    """
    out = pathlib.Path(output_dir)
    tokenizer = tokenizer or ByteTokenizer()
    if stop_after is not None and stop_after < 1:
        raise ValueError(f"train: stop_after must be None or >= 1, got {stop_after}")
    if model_config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"train: model_config.vocab_size ({model_config.vocab_size}) is smaller "
                         f"than the tokenizer's vocabulary ({tokenizer.vocab_size})")
    mesh = None if config.mesh is None else _mesh_for(model_config, config)
    corpus = _as_corpus(corpus)
    corpus_fp = corpus.fingerprint()
    train_tokens = corpus.tokens("train")
    heldout = corpus.tokens("heldout")[: config.eval_tokens + 1]
    if train_tokens.size < config.seq_len + 1:
        raise ValueError(f"train: the corpus's training split has {train_tokens.size} tokens, "
                         f"fewer than one window of seq_len + 1 = {config.seq_len + 1}")
    optimizer = make_optimizer(config)
    compute_dtype = _DTYPES[config.compute_dtype]

    if resume and has_checkpoint(out):
        params, opt_state, step, records = _load_checkpoint(
            out, model_config, config, optimizer, corpus_fp)
        resumed = True
    else:
        if params is None:
            params = init_params(jax.random.key(config.seed), model_config)
        check_params(params, model_config, where="train: params")
        params = cast_params(params, jnp.float32)
        opt_state = optimizer.init(params)
        step, records, resumed = 0, [], False
    lead = jax.process_index() == 0  # the process that prints and writes
    out.mkdir(parents=True, exist_ok=True)
    if lead:
        tokenizer.save(out)
    # The step is built from the settings that change the math only, so that it is
    # reused when a run resumes in the same process.
    step_config = dataclasses.replace(
        config, **{f: getattr(TrainConfig(), f) for f in TrainConfig.RESUMABLE_CHANGES})
    if mesh is None:
        step_fn = _make_step(model_config, step_config)
        place_batch = jnp.asarray
        eval_kw: dict[str, Any] = {"impl": config.impl}
    else:
        step_fn, sh = _make_sharded_step(model_config, step_config, mesh)
        params, opt_state = _place(params, sh.params), _place(opt_state, sh.opt_state)

        def place_batch(batch):
            return _place_batch(batch, sh.batch)
        eval_kw = {"batch_sharding": sh.batch,
                   "batch_size": math.lcm(16, config.mesh[0] * config.mesh[1]),
                   "sequence_axis": _sequence_axis(mesh), "impl": _mesh_impl(mesh, config.impl)}

    bar = _Progress(config.steps, progress and lead)

    def emit(record: dict[str, Any]) -> None:
        records.append(record)
        if on_log is not None:
            on_log(record)

    def run_eval() -> None:
        if heldout.size < 2 or config.eval_tokens == 0:
            return
        t0 = time.perf_counter()
        bpb = evaluate_bits_per_byte(params, model_config, heldout, seq_len=config.seq_len,
                                     dtype=compute_dtype, **eval_kw)
        emit({"step": step, "eval_bpb": bpb, "eval_tokens": int(heldout.size - 1),
              "eval_s": round(time.perf_counter() - t0, 3)})
        bar.note(f"step {step}: held-out {bpb:.4f} bits/byte")

    n_params = sum(int(np.size(x)) for x in jax.tree.leaves(params))
    where = (f"{jax.default_backend()}" if mesh is None else
             f"{jax.device_count()} {jax.default_backend()} devices, mesh "
             + " x ".join(f"{a} {k}" for a, k in zip(_mesh_names(config), config.mesh,
                                                     strict=True)))
    bar.note(f"{'resuming at step ' + str(step) if resumed else 'training'}: {n_params:,} "
             f"parameters, {train_tokens.size:,} training tokens ({corpus.source}), "
             f"{where}, {config.compute_dtype} compute")
    if step == 0 and config.eval_every:
        run_eval()

    start = time.perf_counter()
    tick, tick_step = start, step
    first_step = step
    tokens_per_step = config.batch_size * config.seq_len
    end = config.steps if stop_after is None else min(config.steps, stop_after)
    while step < end:
        batch = sample_batch(train_tokens, step, batch_size=config.batch_size,
                             seq_len=config.seq_len, seed=config.seed)
        params, opt_state, metrics = step_fn(params, opt_state, place_batch(batch))
        step += 1
        if step == first_step + 1:
            # The first step compiles; throughput is measured from its end.
            jax.block_until_ready(metrics)
            tick = time.perf_counter()
        out_of_time = (config.time_limit_s is not None
                       and time.perf_counter() - start > config.time_limit_s)
        last = step == end or out_of_time
        if step % config.log_every == 0 or last:
            loss = float(metrics["loss"])
            now = time.perf_counter()
            timed = step - tick_step - (1 if tick_step == first_step else 0)
            rate = tokens_per_step * timed / max(now - tick, 1e-9) if timed else float("nan")
            emit({"step": step, "loss": loss, "lr": float(learning_rate_schedule(config)(step - 1)),
                  "grad_norm": float(metrics["grad_norm"]), "tokens_per_s": round(rate, 1),
                  "elapsed_s": round(now - start, 3)})
            bar.show(f"loss {loss:.4f} ({loss / math.log(2):.3f} bits/byte) | "
                     f"{_fmt_rate(rate)} tok/s", step)
            tick, tick_step = now, step
        paused = False
        if config.eval_every and (step % config.eval_every == 0 or last):
            run_eval()
            paused = True
        elif last and not config.eval_every:
            run_eval()
            paused = True
        if last or (config.save_every and step % config.save_every == 0):
            if mesh is None:
                _save_checkpoint(out, params, opt_state, step, model_config, config, tokenizer,
                                 corpus_fp, records)
            else:
                # Every process joins the gather; process 0 writes.
                host_params, host_opt = _to_host((params, opt_state))
                if lead:
                    _save_checkpoint(out, host_params, host_opt, step, model_config, config,
                                     tokenizer, corpus_fp, records)
            paused = True
        if paused:
            # Evaluation and saving do not count towards the training throughput.
            tick, tick_step = time.perf_counter(), step
        if out_of_time:
            bar.note(f"time limit of {config.time_limit_s:g} s reached at step {step}; "
                     "checkpoint saved, run again to continue")
            break
    bar.close()
    return TrainResult(params, opt_state, step, records)
