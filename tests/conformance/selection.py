"""Which adapters the conformance suite runs, from the MAMBA_ADAPTERS environment variable.

MAMBA_ADAPTERS is a comma-separated list of adapter names (`equinox,flax`) or `all`.
`all` means every known adapter whose package directory exists under packages/.
Unset, empty or unknown names are errors: a suite that silently runs nothing
would pass while testing nothing.
"""

from __future__ import annotations

import pathlib

ENV_VAR = "MAMBA_ADAPTERS"

# adapter name -> its package directory under packages/ (and test module test_<name>.py)
KNOWN_ADAPTERS: dict[str, str] = {
    "equinox": "mamba-equinox",
    "flax": "mamba-flax",
    "keras": "mamba-keras",
}


class SelectionError(ValueError):
    """MAMBA_ADAPTERS is unset, empty, or names an adapter that does not exist."""


def present_adapters(packages_dir: pathlib.Path) -> tuple[str, ...]:
    """Known adapters whose package directory exists under `packages_dir`, in a fixed order."""
    return tuple(
        name for name, package in KNOWN_ADAPTERS.items() if (packages_dir / package).is_dir()
    )


def select_adapters(value: str | None, packages_dir: pathlib.Path) -> tuple[str, ...]:
    """Parse a MAMBA_ADAPTERS value into adapter names; raise SelectionError if it is not valid."""
    known = ", ".join(KNOWN_ADAPTERS)
    names = [part.strip() for part in (value or "").split(",") if part.strip()]
    if not names:
        raise SelectionError(
            f"{ENV_VAR} is not set: the conformance suite needs an explicit choice of adapters. "
            f"Set it to 'all' or a comma-separated subset of: {known} "
            f"(hatch's environments set it; see tests/conformance/README.md)."
        )
    if "all" in names:
        if names != ["all"]:
            raise SelectionError(f"{ENV_VAR}={value!r}: 'all' cannot be combined with names")
        present = present_adapters(packages_dir)
        if not present:
            raise SelectionError(
                f"{ENV_VAR}=all, but no adapter package ({known}) exists under {packages_dir}"
            )
        return present
    unknown = [n for n in names if n not in KNOWN_ADAPTERS]
    if unknown:
        raise SelectionError(f"{ENV_VAR}={value!r}: unknown adapter(s) {unknown}; known: {known}")
    missing = [n for n in names if not (packages_dir / KNOWN_ADAPTERS[n]).is_dir()]
    if missing:
        raise SelectionError(
            f"{ENV_VAR}={value!r}: no package for {missing} under {packages_dir} "
            f"(expected {[KNOWN_ADAPTERS[n] for n in missing]})"
        )
    return tuple(dict.fromkeys(names))
