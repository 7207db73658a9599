"""Which twin of kumopy._fast is loaded, and whether each module imports cleanly on its own."""

from __future__ import annotations

import importlib.machinery
import inspect
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

import kumopy._fast
from kumopy._fast import _queue_py, _select_py, _wire_py
from tests.conftest_fast import FastImpl, extensions_disabled

ROOT = Path(__file__).resolve().parent.parent
FAST = ROOT / "kumopy" / "_fast"
COMPILED = ["_queue_c", "_select_c", "_wire_c"]
MODULES = [
    "kumopy._fast",
    "kumopy._fast._switch",
    "kumopy._fast._select_py",
    "kumopy._fast._queue_py",
    "kumopy._fast._wire_py",
    *(f"kumopy._fast.{m}" for m in COMPILED),
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


def built_file(module: str) -> Path:
    """Return the extension file of a compiled module in the source tree, or skip the test."""
    if extensions_disabled():
        pytest.skip("KUMOPY_NO_EXTENSIONS is set: the compiled twin may be absent")
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = FAST / f"{module}{suffix}"
        if path.exists():
            return path
    pytest.fail(f"{module} is not built")


def lay_out_fast(root: Path, compiled: Iterable[str] = (), broken: Iterable[str] = ()) -> Path:
    """Copy kumopy._fast's Python files and `compiled` modules under `root`; fake `broken` ones."""
    pkg = root / "kumopy" / "_fast"
    pkg.mkdir(parents=True)
    # An empty parent: kumopy._fast needs nothing from the rest of the package.
    (root / "kumopy" / "__init__.py").write_text("")
    for path in FAST.glob("*.py"):
        shutil.copy(path, pkg)
    for module in compiled:
        shutil.copy(built_file(module), pkg)
    for module in broken:
        suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
        (pkg / f"{module}{suffix}").write_bytes(b"not a shared object\n")
    return root


def import_fast(root: Path) -> subprocess.CompletedProcess[str]:
    """Import the copy of kumopy._fast under `root` in a fresh interpreter."""
    env = {k: v for k, v in os.environ.items() if k not in ("KUMOPY_NO_EXTENSIONS", "PYTHONPATH")}
    env["PYTHONPATH"] = str(root)
    code = "import kumopy._fast as f; print(f.IMPLEMENTATION, f.SourceMask.__module__, f.__file__)"
    # -S keeps the editable install of the real package out of the way.
    args = [sys.executable, "-S", "-W", "error", "-c", code]
    return subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=60)


def test_default_build_is_compiled() -> None:
    # Fails when an install silently skipped building the extensions.
    if extensions_disabled():
        assert kumopy._fast.IMPLEMENTATION == "py"
    else:
        assert kumopy._fast.IMPLEMENTATION == "c", "kumopy._fast fell back to pure Python"
        assert kumopy._fast.SmoothSelector.__module__ == "kumopy._fast._select_c"
        assert kumopy._fast.DueQueue.__module__ == "kumopy._fast._queue_c"
        assert kumopy._fast.encode_data.__module__ == "kumopy._fast._wire_c"


@pytest.mark.parametrize(
    ("value", "disabled"), [("1", True), ("yes", True), ("0", False), ("", False), (None, False)]
)
def test_switch(value: str | None, disabled: bool) -> None:
    environ = {} if value is None else {"KUMOPY_NO_EXTENSIONS": value}
    assert extensions_disabled(environ) is disabled


@pytest.mark.integration
@pytest.mark.parametrize(("value", "expected"), [("1", "py"), ("yes", "py"), ("0", "c"), ("", "c")])
def test_environment_switch(value: str, expected: str) -> None:
    if expected == "c" and extensions_disabled():
        pytest.skip("KUMOPY_NO_EXTENSIONS is set: the compiled twin may be absent")
    code = (
        "import kumopy._fast as f; "
        "print(f.IMPLEMENTATION, f.SourceMask.__module__, f.Ledger.__module__)"
    )
    suffix = "_c" if expected == "c" else "_py"
    out = run_python(code, no_ext=value)
    assert out == f"{expected} kumopy._fast._select{suffix} kumopy._fast._queue{suffix}"


@pytest.mark.integration
def test_not_built_falls_back_to_python(tmp_path: Path) -> None:
    proc = import_fast(lay_out_fast(tmp_path))
    assert proc.returncode == 0, proc.stderr
    implementation, module, path = proc.stdout.split()
    assert (implementation, module) == ("py", "kumopy._fast._select_py")
    assert Path(path).is_relative_to(tmp_path)


@pytest.mark.integration
@pytest.mark.parametrize("module", COMPILED)
def test_broken_compiled_module_fails_loudly(tmp_path: Path, module: str) -> None:
    others = [m for m in COMPILED if m != module]
    proc = import_fast(lay_out_fast(tmp_path, compiled=others, broken=[module]))
    assert proc.returncode != 0
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("ImportError: "), proc.stderr
    assert f"compiled module kumopy._fast.{module} (" in error
    assert "build_ext --inplace" in error
    assert "KUMOPY_NO_EXTENSIONS=1" in error


@pytest.mark.integration
def test_partly_built_fails_loudly(tmp_path: Path) -> None:
    proc = import_fast(lay_out_fast(tmp_path, compiled=["_queue_c", "_wire_c"]))
    assert proc.returncode != 0
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("ImportError: "), proc.stderr
    assert "kumopy._fast._select_c (not built, but _queue_c, _wire_c are)" in error
    assert "KUMOPY_NO_EXTENSIONS=1" in error


@pytest.mark.integration
@pytest.mark.parametrize("module", MODULES)
def test_module_imports_alone_without_warnings(module: str) -> None:
    if module.endswith("_c") and extensions_disabled():
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


def test_selector_api_is_what_dispatch_uses() -> None:
    # The selector twins were cut back to what the coordinator calls; keep them there.
    assert public_names(_select_py.SmoothSelector) == {"pick", "sources", "weights"}
    assert public_names(_select_py.SourceMask) == {"get", "set", "__len__"}
