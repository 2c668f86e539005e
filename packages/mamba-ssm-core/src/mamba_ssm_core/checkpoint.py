"""Loading and saving checkpoints: transformers' and the original state-spaces format.

`load_pretrained(path_or_repo_id)` reads a local folder, or a hub repo through
huggingface_hub (HF_HUB_OFFLINE and the local cache honoured), holding a config.json
of either family (see `config`) and one of, in this order of preference:

    model.safetensors.index.json + its shards,  model.safetensors,  pytorch_model.bin

`pytorch_model.bin` (the original checkpoints) is read by `torch.load(...,
weights_only=True)`, so it needs PyTorch (the `torch` extra); nothing else is ever
unpickled. Keys map one to one onto the parameter pytree (`params`), layer i of a
stacked leaf being `backbone.layers.{i}....`; both `backbone.embedding.weight`
(original) and `backbone.embeddings.weight` (transformers) are read. A tied model
needs no `lm_head.weight` (the original saves one, equal to the embedding).

`save_pretrained(config, params, path)` writes config.json and model.safetensors in
the transformers format, which `transformers.MambaForCausalLM.from_pretrained` loads.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from beartype import beartype

from .config import ConfigError, MambaConfig
from .params import (
    check_params,
    flatten,
    is_ssm_param,
    layer_shapes,
    param_shapes,
    unflatten,
)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS = "model.safetensors"
TORCH_BIN = "pytorch_model.bin"
WEIGHT_FILES = (SAFETENSORS_INDEX, SAFETENSORS, TORCH_BIN)

_LAYER_KEY = re.compile(r"^backbone\.layers\.(\d+)\.(.+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit its config; says which file or keys."""


# ----------------------------------------------------------------------------- files


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _looks_like_repo_id(s: str) -> bool:
    return re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", s) is not None and not s.startswith((".", "~"))


def resolve_checkpoint(
    path_or_repo_id: str | os.PathLike, *, revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[str, str]:
    """(path of config.json, path of the first weight file found), local or from the hub.

    The weight file is the first of WEIGHT_FILES present (for the hub: present in the
    repo, or in the cache when offline). Raises CheckpointError naming what is missing.
    """
    p = os.path.expanduser(os.fspath(path_or_repo_id))
    if os.path.isdir(p):
        config = os.path.join(p, "config.json")
        if not os.path.isfile(config):
            raise CheckpointError(f"{p}: no config.json in this folder")
        for name in WEIGHT_FILES:
            if os.path.isfile(os.path.join(p, name)):
                return config, os.path.join(p, name)
        raise CheckpointError(f"{p}: no weights in this folder (looked for {', '.join(WEIGHT_FILES)})")
    if os.path.exists(p):
        raise CheckpointError(f"{p} is a file; give the folder that holds config.json and the weights")
    if not _looks_like_repo_id(p):
        raise CheckpointError(f"{p}: no such folder, and not a hub repo id (owner/name)")
    return _resolve_hub(p, revision, cache_dir)


def _resolve_hub(repo_id: str, revision, cache_dir) -> tuple[str, str]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = _hub_offline()
    where = f"hub repo {repo_id!r}" + (f" at revision {revision!r}" if revision else "")

    def fetch(name: str) -> str:
        return hf_hub_download(repo_id, name, revision=revision, cache_dir=cache_dir,
                               local_files_only=offline)

    try:
        config = fetch("config.json")
    except LocalEntryNotFoundError as e:
        if offline:
            raise CheckpointError(
                f"{where}: HF_HUB_OFFLINE is set and its config.json is not in the local "
                f"cache ({cache_dir or 'the default huggingface cache'}); download it once "
                "online or give a local folder") from e
        raise CheckpointError(f"{where}: could not download config.json and it is not in the "
                              f"local cache ({e})") from e
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise CheckpointError(f"{where}: {e}") from e
    except EntryNotFoundError as e:
        raise CheckpointError(f"{where}: the repo has no config.json") from e
    reasons = []
    for name in WEIGHT_FILES:
        try:
            return config, fetch(name)
        except EntryNotFoundError as e:  # includes LocalEntryNotFoundError (not cached)
            reasons.append(f"{name}: {type(e).__name__}")
    state = ("HF_HUB_OFFLINE is set and none of them is in the local cache" if offline
             else "none of them could be found")
    raise CheckpointError(f"{where}: no weights; looked for {', '.join(WEIGHT_FILES)}, {state} "
                          f"({'; '.join(reasons)})")


class _TensorSource:
    """Lazy access to the tensors of one checkpoint: names, shapes, then values."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], get: Callable[[str], np.ndarray]):
        self.shapes = shapes
        self.get = get


def _open_safetensors(paths: list[str]) -> _TensorSource:
    from safetensors import SafetensorError, safe_open

    handles: dict[str, Any] = {}
    owner: dict[str, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for path in paths:
        try:
            f = safe_open(path, framework="numpy")
            for k in f.keys():
                shapes[k] = tuple(f.get_slice(k).get_shape())
                owner[k] = path
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or "
                                  f"corrupt?): {e}") from e
        handles[path] = f

    def get(k: str) -> np.ndarray:
        try:
            return handles[owner[k]].get_tensor(k)
        except Exception as e:  # noqa: BLE001 -- any failure here means a bad file
            raise CheckpointError(f"{owner[k]}: cannot read tensor {k!r}: {e}") from e

    return _TensorSource(shapes, get)


def _open_index(index_path: str) -> _TensorSource:
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a valid safetensors index ({e})") from e
    folder = os.path.dirname(index_path)
    shards = sorted(set(weight_map.values()))
    paths = []
    for shard in shards:
        path = os.path.join(folder, shard)
        if not os.path.isfile(path):
            raise CheckpointError(f"{index_path}: shard {shard!r} is missing")
        paths.append(path)
    source = _open_safetensors(paths)
    listed = set(weight_map)
    if listed != set(source.shapes):
        raise CheckpointError(
            f"{index_path}: the index and the shards disagree: listed but not in a shard "
            f"{sorted(listed - set(source.shapes))}, in a shard but not listed "
            f"{sorted(set(source.shapes) - listed)}")
    return source


def _hub_shards(index_path: str, fetch: Callable[[str], str]) -> None:
    """Download (or find in the cache) the shards an index names, next to it."""
    with open(index_path, encoding="utf-8") as f:
        shards = sorted(set(json.load(f).get("weight_map", {}).values()))
    for shard in shards:
        fetch(shard)


def _open_torch_bin(path: str) -> _TensorSource:
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(
            f"{path}: reading pytorch_model.bin needs PyTorch; install it with "
            "`pip install 'mamba-ssm-core[torch]'` (or convert the checkpoint to safetensors)"
        ) from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- torch raises many types for bad files
        raise CheckpointError(f"{path}: cannot read this PyTorch checkpoint (truncated or "
                              f"corrupt, or not a plain state dict): {type(e).__name__}: {e}") from e
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors")

    def get(k: str) -> np.ndarray:
        t = state[k].detach().contiguous()
        if t.dtype == torch.bfloat16:
            # numpy has no bfloat16: move the bits, then view them as ml_dtypes' bfloat16.
            return t.view(torch.int16).numpy().view(jnp.bfloat16)
        return t.numpy()

    return _TensorSource({k: tuple(v.shape) for k, v in state.items()}, get)


def _open_weights(weights_path: str, fetch: Callable[[str], str] | None = None) -> _TensorSource:
    name = os.path.basename(weights_path)
    if name == SAFETENSORS_INDEX:
        if fetch is not None:
            _hub_shards(weights_path, fetch)
        return _open_index(weights_path)
    if name == SAFETENSORS:
        return _open_safetensors([weights_path])
    if name == TORCH_BIN:
        return _open_torch_bin(weights_path)
    raise CheckpointError(f"{weights_path}: unsupported weight file (expected one of "
                          f"{', '.join(WEIGHT_FILES)})")


# ----------------------------------------------------------------------------- mapping


def _target(key: str) -> tuple[str, int | None] | None:
    """Checkpoint key -> (dotted path in the pytree, layer index or None), or None if unknown."""
    if key in ("backbone.embedding.weight", "backbone.embeddings.weight"):
        return "backbone.embeddings.weight", None
    if key in ("backbone.norm_f.weight", "lm_head.weight"):
        return key, None
    m = _LAYER_KEY.match(key)
    if m:
        return f"backbone.layers.{m.group(2)}", int(m.group(1))
    return None


def _map_keys(config: MambaConfig, source: _TensorSource, where: str):
    """Check every key and shape against the config; raise one error listing all problems.

    Returns ({pytree path: checkpoint key} for unstacked leaves,
             {pytree path: [checkpoint key per layer]} for stacked ones,
             the checkpoint key of a tied lm_head to verify, or None).
    """
    L = config.num_hidden_layers
    per_layer = layer_shapes(config)
    expected_flat = {p: s for p, s in param_shapes(config).items()
                     if not p.startswith("backbone.layers.")}
    problems: list[str] = []
    single: dict[str, str] = {}
    stacked: dict[str, list[str | None]] = {f"backbone.layers.{p}": [None] * L for p in per_layer}
    tied_head = None
    for key in sorted(source.shapes):
        shape = source.shapes[key]
        t = _target(key)
        if t is None:
            problems.append(f"unexpected {key}: shape {shape}")
            continue
        path, layer = t
        if layer is None:
            if key == "lm_head.weight" and config.tie_word_embeddings:
                want = (config.vocab_size, config.hidden_size)
                if shape != want:
                    problems.append(f"shape mismatch {key}: expected {want} (tied to the "
                                    f"embedding), got {shape}")
                tied_head = key
                continue
            if path not in expected_flat:
                problems.append(f"unexpected {key}: shape {shape}")
                continue
            if path in single:
                problems.append(f"duplicate {key}: {single[path]} is the same parameter")
                continue
            single[path] = key
            if shape != expected_flat[path]:
                problems.append(f"shape mismatch {key}: expected {expected_flat[path]}, got {shape}")
            continue
        rel = path[len("backbone.layers."):]
        if rel not in per_layer or layer >= L:
            why = f" (the config has {L} layers)" if rel in per_layer else ""
            problems.append(f"unexpected {key}: shape {shape}{why}")
            continue
        stacked[path][layer] = key
        if shape != per_layer[rel]:
            problems.append(f"shape mismatch {key}: expected {per_layer[rel]}, got {shape}")
    for path, shape in expected_flat.items():
        if path not in single:
            name = path
            if path == "backbone.embeddings.weight":
                name = "backbone.embeddings.weight (or backbone.embedding.weight)"
            problems.append(f"missing {name}: expected shape {shape}")
    for path, keys in stacked.items():
        rel = path[len("backbone.layers."):]
        for i, k in enumerate(keys):
            if k is None:
                problems.append(f"missing backbone.layers.{i}.{rel}: expected shape {per_layer[rel]}")
    if problems:
        raise CheckpointError(f"{where}: the checkpoint does not fit its config "
                              f"({len(problems)} problems):\n  " + "\n  ".join(sorted(problems)))
    return single, stacked, tied_head


def _convert(path: str, arr: np.ndarray, key: str, dtype, keep_ssm_f32: bool, where: str):
    if not np.issubdtype(arr.dtype, np.floating) and arr.dtype != np.dtype(jnp.bfloat16):
        raise CheckpointError(f"{where}: {key} has dtype {arr.dtype}, expected a float dtype")
    if is_ssm_param(path) and keep_ssm_f32:
        target = np.promote_types(arr.dtype, np.float32)
    elif dtype is not None:
        target = np.dtype(dtype)
    else:
        target = arr.dtype
    return arr.astype(target, copy=False)


@beartype
def load_pretrained(
    path_or_repo_id: str | os.PathLike,
    *,
    dtype: Any = None,
    revision: str | None = None,
    keep_ssm_params_float32: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[MambaConfig, dict[str, Any]]:
    """Read a checkpoint: (config, params).

    path_or_repo_id: a local folder, or a hub repo id ("state-spaces/mamba-130m") read
    through huggingface_hub (HF_HUB_OFFLINE honoured; cache_dir defaults to its cache).
    dtype: the parameters' dtype (e.g. jnp.bfloat16); None keeps the stored dtype.
    A_log, D and dt_proj.bias are float32 (at least) unless keep_ssm_params_float32 is
    False. revision: a hub branch, tag or commit.

    Raises CheckpointError naming the file for unreadable files, and one error listing
    every missing key, unexpected key and shape mismatch (expected and actual shapes).
    """
    if dtype is not None and not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
        raise TypeError(f"load_pretrained: dtype must be a floating dtype or None, got {dtype!r}")
    config_path, weights_path = resolve_checkpoint(path_or_repo_id, revision=revision,
                                                   cache_dir=cache_dir)
    try:
        config = MambaConfig.from_json_file(config_path)
    except ConfigError:
        raise
    except OSError as e:
        raise CheckpointError(f"{config_path}: cannot read ({e})") from e
    fetch = None
    if os.path.basename(weights_path) == SAFETENSORS_INDEX and not os.path.isdir(
            os.path.expanduser(os.fspath(path_or_repo_id))):
        from huggingface_hub import hf_hub_download

        def fetch(name: str) -> str:
            return hf_hub_download(os.fspath(path_or_repo_id), name, revision=revision,
                                   cache_dir=cache_dir, local_files_only=_hub_offline())
    source = _open_weights(weights_path, fetch)
    single, stacked, tied_head = _map_keys(config, source, weights_path)

    flat: dict[str, Any] = {}
    for path, key in single.items():
        flat[path] = jnp.asarray(_convert(path, source.get(key), key, dtype,
                                          keep_ssm_params_float32, weights_path))
    for path, keys in stacked.items():
        arrays = [_convert(path, source.get(k), k, dtype, keep_ssm_params_float32, weights_path)
                  for k in keys]
        dtypes = {a.dtype for a in arrays}
        if len(dtypes) > 1:
            raise CheckpointError(f"{weights_path}: the layers store {path} in different dtypes "
                                  f"({sorted(map(str, dtypes))}); pass dtype= to choose one")
        flat[path] = jnp.asarray(np.stack(arrays))
    if tied_head is not None:
        head = source.get(tied_head)
        emb = source.get(single["backbone.embeddings.weight"])
        if not np.array_equal(head, emb):
            raise CheckpointError(f"{weights_path}: the config ties the embeddings but "
                                  "lm_head.weight differs from the embedding matrix")
    return config, unflatten(flat)


@beartype
def save_pretrained(config: MambaConfig, params: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write config.json and model.safetensors (transformers format) into folder `path`.

    Stacked leaves are written per layer as `backbone.layers.{i}....`; dtypes are kept
    as they are (so A_log, D, dt_proj.bias stay float32 in a bfloat16 model).
    """
    from safetensors.numpy import save_file

    check_params(params, config)
    folder = os.fspath(path)
    os.makedirs(folder, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for p, v in flatten(params).items():
        arr = np.asarray(v)
        if p.startswith("backbone.layers."):
            rel = p[len("backbone.layers."):]
            for i in range(config.num_hidden_layers):
                tensors[f"backbone.layers.{i}.{rel}"] = np.ascontiguousarray(arr[i])
        else:
            tensors[p] = np.ascontiguousarray(arr)
    save_file(tensors, os.path.join(folder, SAFETENSORS), metadata={"format": "pt"})
    hf = config.to_hf_dict()
    hf["dtype"] = str(np.asarray(params["backbone"]["embeddings"]["weight"]).dtype)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
        f.write("\n")
