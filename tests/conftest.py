"""Shared fixtures: both _fast twins, work directories, processes stopped by PID."""

from __future__ import annotations

pytest_plugins = ["tests.conftest_fast", "tests.conftest_procs"]
