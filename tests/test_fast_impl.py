"""Which twin of kumopy._fast is loaded, and whether each module imports cleanly on its own."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

import kumopy._fast
from kumopy._fast import _queue_py, _select_py, _wire_py
from tests.conftest_fast import FastImpl, no_extensions

ROOT = Path(__file__).resolve().parent.parent
MODULES = [
    "kumopy._fast",
    "kumopy._fast._select_py",
    "kumopy._fast._queue_py",
    "kumopy._fast._wire_py",
    "kumopy._fast._select_c",
    "kumopy._fast._queue_c",
    "kumopy._fast._wire_c",
]


def run_python(code: str, *, no_ext: str | None = None, warn_error: bool = True) -> str:
    """Run `code` in a fresh interpreter at the repository root; return its stdout."""
    env = dict(os.environ)
    env.pop("KUMOPY_NO_EXTENSIONS", None)
    if no_ext is not None:
        env["KUMOPY_NO_EXTENSIONS"] = no_ext
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    args = [sys.executable, *(["-W", "error"] if warn_error else []), "-c", code]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_default_build_is_compiled() -> None:
    # Fails when an install silently skipped building the extensions.
    if no_extensions():
        assert kumopy._fast.IMPLEMENTATION == "py"
    else:
        assert kumopy._fast.IMPLEMENTATION == "c", "kumopy._fast fell back to pure Python"
        assert kumopy._fast.SmoothSelector.__module__ == "kumopy._fast._select_c"
        assert kumopy._fast.DueQueue.__module__ == "kumopy._fast._queue_c"
        assert kumopy._fast.encode_data.__module__ == "kumopy._fast._wire_c"


@pytest.mark.parametrize(("value", "expected"), [("1", "py"), ("yes", "py"), ("0", "c"), ("", "c")])
def test_environment_switch(value: str, expected: str) -> None:
    if expected == "c" and no_extensions():
        pytest.skip("KUMOPY_NO_EXTENSIONS is set: the compiled twin may be absent")
    code = (
        "import kumopy._fast as f; "
        "print(f.IMPLEMENTATION, f.SourceMask.__module__, f.Ledger.__module__)"
    )
    suffix = "_c" if expected == "c" else "_py"
    out = run_python(code, no_ext=value)
    assert out == f"{expected} kumopy._fast._select{suffix} kumopy._fast._queue{suffix}"


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_alone_without_warnings(module: str) -> None:
    if module.endswith("_c") and no_extensions():
        pytest.skip("KUMOPY_NO_EXTENSIONS is set: the compiled twin may be absent")
    out = run_python(f"import {module} as m; print(sorted(m.__all__))")
    assert out.startswith("[")


def public_names(cls: type) -> set[str]:
    """Return the public attribute names of a class, plus __len__ when it has one."""
    names = {n for n in dir(cls) if not n.startswith("_")}
    return names | ({"__len__"} if hasattr(cls, "__len__") else set())


def test_twins_mirror_each_other(fast_impl: FastImpl) -> None:
    specs = {
        "SourceMask": _select_py.SourceMask,
        "SmoothSelector": _select_py.SmoothSelector,
        "DueQueue": _queue_py.DueQueue,
        "Ledger": _queue_py.Ledger,
    }
    for name, spec in specs.items():
        twin = getattr(fast_impl, name)
        assert twin.__name__ == name
        assert public_names(twin) == public_names(spec), name
        assert inspect.getdoc(twin) == inspect.getdoc(spec), name
        for attr in public_names(spec):
            assert inspect.getdoc(getattr(twin, attr)) == inspect.getdoc(getattr(spec, attr)), (
                f"{name}.{attr}"
            )
    assert inspect.getdoc(fast_impl.encode_data) == inspect.getdoc(_wire_py.encode_data)
    assert fast_impl.encode_data.__name__ == "encode_data"
    assert set(_select_py.__all__) | set(_queue_py.__all__) | set(_wire_py.__all__) < set(
        kumopy._fast.__all__
    )
