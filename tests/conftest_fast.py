"""The `fast_impl` fixture: every test of kumopy._fast runs once per twin (ids `c` and `py`)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from kumopy._fast import _queue_py, _select_py
from kumopy._fast._switch import extensions_disabled

__all__ = ["FastImpl", "extensions_disabled", "fast_impl", "no_extensions"]

no_extensions = extensions_disabled
"""The old name of `extensions_disabled`, still imported by tests/test_wire.py."""


@dataclass(frozen=True)
class FastImpl:
    """The classes of one twin, typed as the Python twin's so that mypy checks their use."""

    name: str
    """`c` or `py`."""
    SourceMask: type[_select_py.SourceMask]
    """The twin's SourceMask class."""
    SmoothSelector: type[_select_py.SmoothSelector]
    """The twin's SmoothSelector class."""
    DueQueue: type[_queue_py.DueQueue]
    """The twin's DueQueue class."""
    Ledger: type[_queue_py.Ledger]
    """The twin's Ledger class."""
    encode_data: Callable[[bytes | memoryview], bytes]
    """The twin's DATA encoder."""


def _load(name: str) -> FastImpl:
    # Import the twin's modules directly, bypassing the selector in kumopy._fast.
    select = importlib.import_module(f"kumopy._fast._select_{name}")
    queue = importlib.import_module(f"kumopy._fast._queue_{name}")
    wire = importlib.import_module(f"kumopy._fast._wire_{name}")
    return FastImpl(
        name,
        select.SourceMask,
        select.SmoothSelector,
        queue.DueQueue,
        queue.Ledger,
        wire.encode_data,
    )


@pytest.fixture(scope="session", params=["c", "py"], ids=["c", "py"])
def fast_impl(request: pytest.FixtureRequest) -> FastImpl:
    """Return the compiled or the pure-Python twin of kumopy._fast."""
    name: str = request.param
    if name == "c" and extensions_disabled():
        pytest.skip("KUMOPY_NO_EXTENSIONS is set: the compiled twin is not in use")
    return _load(name)
