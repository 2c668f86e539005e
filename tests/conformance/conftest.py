"""Adapter selection for the conformance suite (see README.md in this directory).

MAMBA_ADAPTERS picks the adapters; each adapter's tests live in test_<name>.py. Modules
of adapters that were not picked are not imported (their framework may not be
installed in this environment). Unset, empty or unknown values stop the run with a
usage error naming the problem.
"""

from __future__ import annotations

import os
import pathlib

import pytest

from tests.conformance.selection import (
    ENV_VAR,
    KNOWN_ADAPTERS,
    SelectionError,
    select_adapters,
)

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]

_SELECTED = pytest.StashKey[tuple[str, ...]]()


def selected_adapters(config: pytest.Config) -> tuple[str, ...]:
    """The adapters MAMBA_ADAPTERS names, checked once per run."""
    if _SELECTED not in config.stash:
        try:
            names = select_adapters(os.environ.get(ENV_VAR), ROOT / "packages")
        except SelectionError as err:
            raise pytest.UsageError(str(err)) from None
        no_module = [n for n in names if not (HERE / f"test_{n}.py").is_file()]
        if no_module:
            raise pytest.UsageError(
                f"{ENV_VAR} selects {no_module}, but tests/conformance has no "
                f"{[f'test_{n}.py' for n in no_module]} subclassing the suite"
            )
        config.stash[_SELECTED] = names
    return config.stash[_SELECTED]


def _adapter_of(path: pathlib.Path) -> str | None:
    for name in KNOWN_ADAPTERS:
        if path.name == f"test_{name}.py" and path.parent == HERE:
            return name
    return None


def pytest_configure(config: pytest.Config) -> None:
    # Fails the run at start-up whenever this directory is collected.
    selected_adapters(config)


def pytest_ignore_collect(collection_path: pathlib.Path, config: pytest.Config) -> bool | None:
    adapter = _adapter_of(collection_path)
    if adapter is None:
        return None
    return adapter not in selected_adapters(config)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A module named explicitly on the command line skips pytest_ignore_collect.
    selected = selected_adapters(config)
    keep, drop = [], []
    for item in items:
        adapter = _adapter_of(pathlib.Path(item.path))
        (drop if adapter is not None and adapter not in selected else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
