"""The selective scan (Mamba-1's S6 recurrence), channels-last, behind one function.

For each batch b, channel d and state entry n, with delta already biased and
softplus'd:

    h[t] = exp(delta[t] * A[d, n]) * h[t-1] + delta[t] * u[t] * B[t, n]
    y[t] = sum_n C[t, n] * h[t] + D[d] * u[t],     then y * silu(z[t]) if z is given

Several implementations compute this; they register themselves here and are
picked by name, by a configuration object, or by `impl="auto"`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array
from jaxtyping import Float, Int

from . import _checks
from ._pallas_mosaic import PallasMosaicScan
from ._pallas_triton import PallasTritonScan
from ._scan_associative import AssociativeScan
from ._pallas_tpu import PallasTpuScan
from ._scan_chunked import ChunkedScan
from ._scan_common import ScanArgs, ScanImplementation, ScanSpec, compute_dtype
from ._scan_reference import ReferenceScan

_OP = "selective_scan"

# name -> default configuration
_REGISTRY: dict[str, ScanImplementation] = {}
# platform -> {name: priority}; `auto` tries the highest priority first
_AUTO_PRIORITY: dict[str, dict[str, int]] = {}


def register_implementation(
    impl: ScanImplementation, *, auto_platforms: dict[str, int] | None = None
) -> None:
    """Register `impl` under `impl.name` as its default configuration.

    auto_platforms maps a JAX platform ("cpu", "gpu", "tpu") to a priority;
    `impl="auto"` tries the platform's implementations from the highest priority down
    and takes the first whose `unsupported(...)` returns None.
    """
    if not impl.name:
        raise ValueError("register_implementation: impl.name must be a non-empty string")
    _REGISTRY[impl.name] = impl
    for platform, priority in (auto_platforms or {}).items():
        _AUTO_PRIORITY.setdefault(platform, {})[impl.name] = priority


def implementations() -> tuple[str, ...]:
    """Names of the registered implementations."""
    return tuple(_REGISTRY)


def _platform() -> str:
    return jax.default_backend()


def auto_implementation(spec: ScanSpec, platform: str | None = None) -> tuple[str, str]:
    """Which implementation `impl="auto"` picks for `spec` on `platform`, and why.

    Returns (name, reason); the reason lists every implementation passed over.
    """
    platform = platform or _platform()
    skipped = []
    prio = _AUTO_PRIORITY.get(platform, {})
    for name in [*sorted(prio, key=lambda n: -prio[n]), "chunked"]:
        why_not = _REGISTRY[name].unsupported(spec, platform)
        if why_not is None:
            reason = f"highest-priority implementation for platform {platform!r}"
            if skipped:
                reason += " that takes this call; passed over: " + "; ".join(skipped)
            return name, reason
        skipped.append(f"{name}: {why_not}")
    raise AssertionError("chunked takes every call")  # unreachable: chunked has no limits


# impl is typed `object` on purpose: the check below gives the clear TypeError, which a
# type-checked annotation would pre-empt with a generic one.
def _resolve(impl: object, spec: ScanSpec) -> ScanImplementation:
    if isinstance(impl, ScanImplementation):
        chosen = impl
    elif isinstance(impl, str):
        if impl == "auto":
            return _REGISTRY[auto_implementation(spec)[0]]
        if impl not in _REGISTRY:
            raise ValueError(
                f"{_OP}: unknown impl {impl!r}; registered: {', '.join(['auto', *_REGISTRY])}"
            )
        chosen = _REGISTRY[impl]
    else:
        raise TypeError(
            f"{_OP}: impl must be a name or a ScanImplementation, got {type(impl).__name__}"
        )
    why_not = chosen.unsupported(spec, _platform())
    if why_not is not None:
        raise ValueError(f"{_OP}: impl {chosen.name!r} cannot take this call: {why_not}")
    return chosen


def _validate(u, delta, A, B, C, D, z, delta_bias, initial_state, segment_ids) -> ScanArgs:
    op = _OP
    for name, x in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        _checks.check_float(op, name, x)
    _checks.check_rank(op, "u", u, (3,), "(batch, length, dim)")
    batch, length, dim = u.shape
    if length < 1:
        raise ValueError(f"{op}: u must have length >= 1 (axis 1), got shape {tuple(u.shape)}")
    _checks.check_shape(op, "delta", delta, (batch, length, dim), "(batch, length, dim)")
    _checks.check_same_dtype(op, ("u", "delta", "z"), (u, delta, z))
    _checks.check_rank(op, "A", A, (2,), "(dim, state)")
    _checks.check_shape(op, "A", A, (dim, None), "(dim, state)")
    state = A.shape[1]
    for name, x in (("B", B), ("C", C)):
        _checks.check_rank(
            op, name, x, (3, 4), "(batch, length, state) or (batch, length, groups, state)"
        )
    if B.ndim != C.ndim:
        raise ValueError(
            f"{op}: B and C must both be grouped or both ungrouped, got shapes "
            f"{tuple(B.shape)} and {tuple(C.shape)}"
        )
    if B.ndim == 3:
        B, C = B[:, :, None, :], C[:, :, None, :]
    groups = B.shape[2]
    if groups < 1:
        raise ValueError(f"{op}: B and C must have at least one group, got shape {tuple(B.shape)}")
    for name, x in (("B", B), ("C", C)):
        _checks.check_shape(
            op, name, x, (batch, length, groups, state), "(batch, length, groups, state)"
        )
    if dim % groups:
        raise ValueError(f"{op}: dim ({dim}) must be divisible by the groups of B and C ({groups})")
    for name, x in (("D", D), ("delta_bias", delta_bias)):
        if x is not None:
            _checks.check_float(op, name, x)
            _checks.check_shape(op, name, x, (dim,), "(dim,)")
    if z is not None:
        _checks.check_float(op, "z", z)
        _checks.check_shape(op, "z", z, (batch, length, dim), "(batch, length, dim)")
    if initial_state is not None:
        # The state's dtype is the arithmetic's: float32, float64 only for float64 inputs.
        dtype = compute_dtype(u, delta, A, B, C, D, z, delta_bias)
        _checks.check_dtype(op, "initial_state", initial_state, dtype)
        _checks.check_shape(
            op, "initial_state", initial_state, (batch, dim, state), "(batch, dim, state)"
        )
    if segment_ids is not None:
        _checks.check_int(op, "segment_ids", segment_ids)
        _checks.check_shape(op, "segment_ids", segment_ids, (batch, length), "(batch, length)")
    return ScanArgs(u, delta, A, B, C, D, z, delta_bias, initial_state, segment_ids)


def selective_scan(
    u: Float[Array, "batch length dim"],
    delta: Float[Array, "batch length dim"],
    A: Float[Array, "dim state"],
    B: Float[Array, "batch length *groups state"],
    C: Float[Array, "batch length *groups state"],
    D: Float[Array, " dim"] | None = None,
    *,
    z: Float[Array, "batch length dim"] | None = None,
    delta_bias: Float[Array, " dim"] | None = None,
    delta_softplus: bool = False,
    initial_state: Float[Array, "batch dim state"] | None = None,
    return_final_state: bool = False,
    segment_ids: Int[Array, "batch length"] | None = None,
    impl: str | ScanImplementation = "auto",
) -> Float[Array, "batch length dim"] | tuple[
    Float[Array, "batch length dim"], Float[Array, "batch dim state"]
]:
    """The selective scan of Mamba-1, channels-last.

    Args:
      u: input, (batch, length, dim).
      delta: time steps before bias and softplus, (batch, length, dim), u's dtype.
      A: state matrix (diagonal per channel, real), (dim, state); negative in Mamba.
      B, C: input and output projections, (batch, length, state), or grouped
        (batch, length, groups, state) with dim divisible by groups; channel d
        uses group d // (dim // groups).
      D: skip connection, (dim,), or None.
      z: gate, (batch, length, dim), u's dtype; the output is multiplied by silu(z).
      delta_bias: added to delta before the softplus, (dim,).
      delta_softplus: apply softplus (identity above 20, as the official kernels do).
      initial_state: state before the first step, (batch, dim, state), float32 (float64
        when an input is float64). With segment_ids it applies to each row's first
        segment only.
      return_final_state: also return the state after the last step.
      segment_ids: (batch, length) integers for packed sequences; the state restarts
        from zero wherever the id changes from one step to the next.
      impl: "auto", a registered name (see `implementations()`), or a configuration
        such as `ChunkedScan(chunk_size=128)`.

    Returns:
      y, (batch, length, dim) in u's dtype, and with return_final_state the final
      state, (batch, dim, state) float32. All arithmetic is float32, or float64 when
      an input is float64 (never rounded down silently).
    """
    args = _validate(u, delta, A, B, C, D, z, delta_bias, initial_state, segment_ids)
    chosen = _resolve(impl, ScanSpec.of(args))
    y, h = chosen(args, delta_softplus=bool(delta_softplus))
    return (y, h) if return_final_state else y


# CPU: chunked first, by benchmarks/RESULTS.md (issue 2): the fastest forward+backward,
# forward on par with reference, and training memory a small multiple of the
# inputs where reference saves every step's state and associative (b, l, d, n) tensors.
register_implementation(ReferenceScan(), auto_platforms={"cpu": 1})
register_implementation(AssociativeScan())
register_implementation(ChunkedScan(), auto_platforms={"cpu": 10, "gpu": 0, "tpu": 0})
register_implementation(PallasTpuScan(), auto_platforms={"tpu": 10})
register_implementation(PallasTritonScan(), auto_platforms={"gpu": 10})
register_implementation(PallasMosaicScan(), auto_platforms={"gpu": 20})
