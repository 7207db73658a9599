"""Fixtures for the hot-path benchmarks: the same `fast_impl` as the tests."""

from __future__ import annotations

from tests.conftest_fast import fast_impl

__all__ = ["fast_impl"]
