"""Parameters of the Mamba LM: a plain nested dict of arrays, and their initialisation.

Names and per-layer shapes follow the transformers checkpoint keys and keep the
PyTorch layouts (a Linear weight is (out, in)); the layers are stacked on a
leading axis of size L, so `backbone.layers.mixer.in_proj.weight` holds every
layer's `backbone.layers.{i}.mixer.in_proj.weight`. With H = hidden_size,
I = intermediate_size, N = state_size, K = conv_kernel, R = time_step_rank,
V = vocab_size:

    {"backbone": {
        "embeddings": {"weight": (V, H)},
        "layers": {
            "norm": {"weight": (L, H)},
            "mixer": {
                "in_proj": {"weight": (L, 2I, H), "bias": (L, 2I) if use_bias},
                "conv1d": {"weight": (L, I, 1, K), "bias": (L, I) if use_conv_bias},
                "x_proj": {"weight": (L, R + 2N, I)},
                "dt_proj": {"weight": (L, I, R), "bias": (L, I)},
                "A_log": (L, I, N),
                "D": (L, I),
                "out_proj": {"weight": (L, H, I), "bias": (L, H) if use_bias},
            },
        },
        "norm_f": {"weight": (H,)},
     },
     "lm_head": {"weight": (V, H)}}          # only when tie_word_embeddings is False

in_proj's output is [x, z] (the first I rows feed the conv, the last I the gate);
x_proj's output is [dt (R), B (N), C (N)]. A = -exp(A_log). `A_log`, `D` and
`dt_proj.bias` are the "SSM parameters", kept in float32 when the rest is bfloat16.

One layer's parameters, {"norm": ..., "mixer": ...} without the leading L axis, are
what `init_layer_params` draws, `layer_shapes` describes and
`mamba_ssm_core.layer_params` takes out of a model. Paths are dotted
("mixer.in_proj.weight"); `flatten` and `unflatten` convert between the nested dict
and {dotted path: leaf}.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Collection, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from beartype import beartype
from jax import Array

from .config import MambaConfig

__all__ = [
    "SSM_PARAM_PATHS",
    "ParamsError",
    "abstract_params",
    "cast_params",
    "check_params",
    "check_shapes",
    "flatten",
    "init_layer_params",
    "init_params",
    "is_ssm_param",
    "layer_shapes",
    "param_shapes",
    "unflatten",
]

# Paths (dotted, relative to one layer's "mixer") of the parameters kept in float32.
SSM_PARAM_PATHS = ("A_log", "D", "dt_proj.bias")


class ParamsError(ValueError):
    """A parameter pytree that does not fit the config; lists every problem at once."""


def layer_shapes(config: MambaConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of one layer's parameters (unstacked), by dotted path under `layers`:
    {"norm.weight": (H,), "mixer.in_proj.weight": (2I, H), ...}."""
    H, I, N = config.hidden_size, config.intermediate_size, config.state_size
    K, R = config.conv_kernel, config.time_step_rank
    shapes = {
        "norm.weight": (H,),
        "mixer.in_proj.weight": (2 * I, H),
        "mixer.conv1d.weight": (I, 1, K),
        "mixer.x_proj.weight": (R + 2 * N, I),
        "mixer.dt_proj.weight": (I, R),
        "mixer.dt_proj.bias": (I,),
        "mixer.A_log": (I, N),
        "mixer.D": (I,),
        "mixer.out_proj.weight": (H, I),
    }
    if config.use_bias:
        shapes["mixer.in_proj.bias"] = (2 * I,)
        shapes["mixer.out_proj.bias"] = (H,)
    if config.use_conv_bias:
        shapes["mixer.conv1d.bias"] = (I,)
    return shapes


def param_shapes(config: MambaConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of every parameter (layers stacked), by dotted path, e.g.
    "backbone.layers.mixer.in_proj.weight": (L, 2I, H)."""
    L, H, V = config.num_hidden_layers, config.hidden_size, config.vocab_size
    shapes = {"backbone.embeddings.weight": (V, H)}
    for path, shape in layer_shapes(config).items():
        shapes[f"backbone.layers.{path}"] = (L, *shape)
    shapes["backbone.norm_f.weight"] = (H,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, H)
    return shapes


def is_ssm_param(path: str) -> bool:
    """True for the dotted path of A_log, D or dt_proj.bias at any level: a whole model's
    ("backbone.layers.mixer.D"), one layer's ("mixer.D") or one mixer's ("D")."""
    return any(path == p or path.endswith("." + p) for p in SSM_PARAM_PATHS)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {dotted path: leaf}."""
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, Mapping):
            flat.update(flatten(v, path + "."))
        else:
            flat[path] = v
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{dotted path: leaf} -> nested dict."""
    tree: dict[str, Any] = {}
    for path, v in flat.items():
        *parents, leaf = path.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


@beartype
def abstract_params(
    config: MambaConfig, dtype: Any = jnp.float32, *, ssm_dtype: Any = jnp.float32
) -> dict[str, Any]:
    """The parameter pytree as `jax.ShapeDtypeStruct`s (for eval_shape-style building).

    Every leaf has `dtype` except A_log, D and dt_proj.bias, which have `ssm_dtype`.
    """
    return unflatten({
        p: jax.ShapeDtypeStruct(s, ssm_dtype if is_ssm_param(p) else dtype)
        for p, s in param_shapes(config).items()
    })


def check_shapes(
    params: Any,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    where: str = "params",
    optional: Collection[str] = (),
) -> None:
    """Raise ParamsError listing every missing, unexpected, misshapen or non-float leaf.

    params: a nested dict of arrays. shapes: the expected shape of every leaf, by dotted
    path (e.g. `param_shapes(config)`, `layer_shapes(config)`). optional: paths of
    `shapes` that may be left out (they are checked when present). where: names the
    pytree in the message.
    """
    if not isinstance(params, Mapping):
        raise ParamsError(f"{where}: expected a nested dict of arrays, got {type(params).__name__}")
    got = flatten(params)
    problems = []
    for p in sorted(set(shapes) - set(got) - set(optional)):
        problems.append(f"missing {p}: expected shape {tuple(shapes[p])}")
    for p in sorted(set(got) - set(shapes)):
        problems.append(f"unexpected {p}: shape {tuple(np.shape(got[p]))}")
    for p in sorted(set(got) & set(shapes)):
        shape = tuple(np.shape(got[p]))
        if shape != tuple(shapes[p]):
            problems.append(f"shape mismatch {p}: expected {tuple(shapes[p])}, got {shape}")
        elif not jnp.issubdtype(jnp.result_type(got[p]), jnp.floating):
            problems.append(f"dtype {p}: expected a floating dtype, got {jnp.result_type(got[p])}")
    if problems:
        raise ParamsError(f"{where} do not fit ({len(problems)} problems):\n  "
                          + "\n  ".join(problems))


def check_params(
    params: Any, config: MambaConfig, *, head: bool = True, where: str = "params"
) -> None:
    """Raise ParamsError listing every missing, unexpected, misshapen or non-float leaf
    of a whole model's `params` (layout: the module docstring).

    head: False for what only the backbone reads, {"backbone": ...}: an untied config's
    lm_head may then be left out (it is still checked when present).
    """
    optional = () if head else ("lm_head.weight",)
    check_shapes(params, param_shapes(config), where=where, optional=optional)


def _uniform(key: Array, shape: tuple[int, ...], bound: float) -> Array:
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _init_layer(key: Array, config: MambaConfig) -> dict[str, Array]:
    """One layer's parameters in float32, by dotted path (see `init_params`)."""
    H, I, N = config.hidden_size, config.intermediate_size, config.state_size
    K, R, L = config.conv_kernel, config.time_step_rank, config.num_hidden_layers
    k = dict(zip(("in", "conv", "conv_b", "x", "dt_w", "dt_b", "out"),
                 jax.random.split(key, 7), strict=True))
    # PyTorch's default Linear/Conv1d init, kaiming_uniform(a=sqrt(5)): U(±1/sqrt(fan_in)).
    p = {
        "norm.weight": jnp.ones((H,), jnp.float32),
        "mixer.in_proj.weight": _uniform(k["in"], (2 * I, H), 1 / math.sqrt(H)),
        "mixer.conv1d.weight": _uniform(k["conv"], (I, 1, K), 1 / math.sqrt(K)),
        "mixer.x_proj.weight": _uniform(k["x"], (R + 2 * N, I), 1 / math.sqrt(I)),
    }
    dt_std = R**-0.5 * config.time_step_scale
    if config.time_step_init_scheme == "constant":
        p["mixer.dt_proj.weight"] = jnp.full((I, R), dt_std, jnp.float32)
    else:
        p["mixer.dt_proj.weight"] = _uniform(k["dt_w"], (I, R), dt_std)
    # dt log-uniform in [dt_min, dt_max], floored; the bias is its inverse softplus,
    # so that softplus(dt_proj.bias) starts in that range.
    lo, hi = math.log(config.time_step_min), math.log(config.time_step_max)
    dt = jnp.exp(jax.random.uniform(k["dt_b"], (I,), jnp.float32) * (hi - lo) + lo)
    dt = jnp.maximum(dt, config.time_step_floor)
    p["mixer.dt_proj.bias"] = dt + jnp.log(-jnp.expm1(-dt))
    # S4D-real: A[d, n] = -(n + 1).
    p["mixer.A_log"] = jnp.broadcast_to(jnp.log(jnp.arange(1, N + 1, dtype=jnp.float32)), (I, N))
    p["mixer.D"] = jnp.ones((I,), jnp.float32)
    out = _uniform(k["out"], (H, I), 1 / math.sqrt(I))
    if config.rescale_prenorm_residual:
        out = out / math.sqrt(L)  # GPT-2 scheme, one residual per layer
    p["mixer.out_proj.weight"] = out
    if config.use_bias:
        p["mixer.in_proj.bias"] = jnp.zeros((2 * I,), jnp.float32)
        p["mixer.out_proj.bias"] = jnp.zeros((H,), jnp.float32)
    if config.use_conv_bias:
        # The original zeroes only nn.Linear biases; the conv keeps PyTorch's default.
        p["mixer.conv1d.bias"] = _uniform(k["conv_b"], (I,), 1 / math.sqrt(K))
    return p


@beartype
def init_params(
    key: Array,
    config: MambaConfig,
    *,
    dtype: Any = jnp.float32,
    ssm_dtype: Any = jnp.float32,
    embedding_std: float = 0.02,
) -> dict[str, Any]:
    """Fresh parameters with the official (state-spaces `MambaLMHeadModel`) initialisation.

    Linear and conv weights: PyTorch's default U(±1/sqrt(fan_in)); out_proj then
    divided by sqrt(L) when config.rescale_prenorm_residual (always, in the original
    format). dt_proj.weight: U(±scale/sqrt(R)) ("random") or scale/sqrt(R)
    ("constant"); dt_proj.bias: the inverse softplus of a log-uniform dt in
    [time_step_min, time_step_max], floored at time_step_floor. A_log = log(1..N)
    (S4D-real), D = 1, norms 1, Linear biases 0, the conv bias PyTorch's default
    U(±1/sqrt(K)) (the original leaves it), the embedding N(0, embedding_std²), an
    untied lm_head U(±1/sqrt(H)).

    key: a PRNG key. Leaves are `dtype` except A_log, D and dt_proj.bias (`ssm_dtype`);
    all are drawn in float32 and then cast. Layout: see the module docstring. Layer i
    is `init_layer_params(layer_keys[i], config)` with
    `layer_keys = jax.random.split(jax.random.split(key, 3)[1], L)`.
    """
    flat = _init_flat(key, config, jnp.dtype(dtype), jnp.dtype(ssm_dtype), float(embedding_std))
    return unflatten(flat)


@beartype
def init_layer_params(
    key: Array,
    config: MambaConfig,
    *,
    dtype: Any = jnp.float32,
    ssm_dtype: Any = jnp.float32,
) -> dict[str, Any]:
    """One layer's fresh parameters, {"norm": {"weight"}, "mixer": {...}} unstacked
    (shapes: `layer_shapes(config)`), drawn as `init_params` draws each of its layers,
    for a layer of a config.num_hidden_layers-layer model (out_proj divided by
    sqrt(num_hidden_layers) when config.rescale_prenorm_residual). Nothing else of the
    model is drawn: a standalone mixer or block needs no vocabulary
    (`MambaConfig.for_mixer`).

    key: a PRNG key. Leaves are `dtype` except A_log, D and dt_proj.bias (`ssm_dtype`).
    """
    return unflatten(_init_layer_flat(key, config, jnp.dtype(dtype), jnp.dtype(ssm_dtype)))


def _cast_flat(flat: Mapping[str, Array], dtype: Any, ssm_dtype: Any) -> dict[str, Array]:
    return {p: v.astype(ssm_dtype if is_ssm_param(p) else dtype) for p, v in flat.items()}


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _init_layer_flat(key, config, dtype, ssm_dtype) -> dict[str, Array]:
    return _cast_flat(_init_layer(key, config), dtype, ssm_dtype)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _init_flat(key, config, dtype, ssm_dtype, embedding_std) -> dict[str, Array]:
    k_emb, k_layers, k_head = jax.random.split(key, 3)
    layer_keys = jax.random.split(k_layers, config.num_hidden_layers)
    layers = jax.vmap(lambda k: _init_layer(k, config))(layer_keys)
    V, H = config.vocab_size, config.hidden_size
    flat = {"backbone.embeddings.weight":
            embedding_std * jax.random.normal(k_emb, (V, H), jnp.float32)}
    flat.update({f"backbone.layers.{p}": v for p, v in layers.items()})
    flat["backbone.norm_f.weight"] = jnp.ones((H,), jnp.float32)
    if not config.tie_word_embeddings:
        flat["lm_head.weight"] = _uniform(k_head, (V, H), 1 / math.sqrt(H))
    return _cast_flat(flat, dtype, ssm_dtype)


@beartype
def cast_params(
    params: Mapping[str, Any], dtype: Any, *, ssm_dtype: Any = jnp.float32
) -> dict[str, Any]:
    """`params` with every leaf cast to `dtype`, except A_log, D, dt_proj.bias (`ssm_dtype`)."""
    return unflatten({
        p: jnp.asarray(v).astype(ssm_dtype if is_ssm_param(p) else dtype)
        for p, v in flatten(params).items()
    })
