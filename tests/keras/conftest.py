"""mamba-keras runs on Keras's JAX backend; Keras reads KERAS_BACKEND at its first import.

hatch sets it for every environment; this covers a bare `pytest tests/keras`.
"""

import os

import pytest

os.environ.setdefault("KERAS_BACKEND", "jax")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Keras's .keras writer calls np.array on its variables without NumPy 2's copy keyword.
    mark = pytest.mark.filterwarnings(
        "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.path).startswith(here):
            item.add_marker(mark)
