"""PartitionSpecs for the Mamba LM's parameter pytree (see `params`), by dotted path.

Tensor (channel) parallelism splits the inner channels I of every mixer parameter
that has them, so each device holds whole channels of in_proj, the conv, x_proj's
input, dt_proj, A_log, D and out_proj's input (Megatron's column/row split applied
to Mamba). FSDP then splits each parameter's largest remaining axis that divides
evenly (never the stacked-layer axis, which the model's `lax.scan` slices). The
residual stream, embeddings and norms are not split by the tensor axis.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from jax.sharding import PartitionSpec as P

_LAYERS = "backbone.layers."

# Axis (of one layer's parameter, unstacked) that holds the inner channels: I, or
# 2I for in_proj's [x, z] rows. Every other mixer parameter has no I axis.
CHANNEL_AXIS: Mapping[str, int] = {
    "mixer.in_proj.weight": 0,
    "mixer.in_proj.bias": 0,
    "mixer.conv1d.weight": 0,
    "mixer.conv1d.bias": 0,
    "mixer.x_proj.weight": 1,
    "mixer.dt_proj.weight": 0,
    "mixer.dt_proj.bias": 0,
    "mixer.A_log": 0,
    "mixer.D": 0,
    "mixer.out_proj.weight": 1,
}


def dotted(path: tuple[Any, ...]) -> str:
    """A pytree key path as the params module's dotted path ("backbone.layers.mixer.D").

    Only dict keys count, so a path inside an optimiser state (mu, nu, ...) reads
    the same as the parameter it mirrors.
    """
    return ".".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def _entry(axes: tuple[str, ...]) -> str | tuple[str, ...] | None:
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else axes


def param_spec(
    path: str,
    shape: tuple[int, ...],
    *,
    fsdp: tuple[str, ...],
    fsdp_size: int,
    tensor: tuple[str, ...],
    tensor_size: int,
) -> P:
    """The PartitionSpec of the parameter at dotted `path` with `shape`.

    Raises ValueError when the tensor axis does not divide the parameter's channels.
    """
    entries: list[Any] = [None] * len(shape)
    fixed: set[int] = set()
    if path.startswith(_LAYERS):
        fixed.add(0)  # the stacked-layer axis
        rest = path[len(_LAYERS):]
        if tensor and rest in CHANNEL_AXIS:
            axis = 1 + CHANNEL_AXIS[rest]
            if shape[axis] % tensor_size:
                raise ValueError(
                    f"tensor_axis={tensor} has {tensor_size} shards, which do not divide "
                    f"the {shape[axis]} channels of {path} (axis {axis} of shape {shape})"
                )
            entries[axis] = _entry(tensor)
            fixed.add(axis)
    if fsdp:
        free = [
            a for a in range(len(shape))
            if a not in fixed and shape[a] >= fsdp_size and shape[a] % fsdp_size == 0
        ]
        if free:
            # The largest axis saves the most memory; the first among equals.
            best = max(free, key=lambda a: (shape[a], -a))
            entries[best] = _entry(fsdp)
    return P(*entries)
