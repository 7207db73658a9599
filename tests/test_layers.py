"""The package's layers: imports run one way, and every module is small with a one-line job."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "kumopy"

# Which packages a package must never import, anywhere in it (function bodies included).
FORBIDDEN = {
    "kumopy.ipc": ("kumopy.coordinator", "kumopy.worker"),
    "kumopy.worker": ("kumopy.coordinator",),
    "kumopy.smtp": ("kumopy.coordinator", "kumopy.worker"),
    "kumopy._fast": ("kumopy.coordinator", "kumopy.worker", "kumopy.ipc", "kumopy.smtp"),
}
MAX_LINES = 450


def module_name(path: Path) -> str:
    """Return the dotted name of a module file of the package."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Return every kumopy module a file imports, wherever the import statement is."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("kumopy"))
        elif (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and (node.module or "").startswith("kumopy")
        ):
            found.add(str(node.module))
    return found


def import_graph(packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Return module -> the modules it imports, for modules of the given packages."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        if name.startswith(packages):
            graph[name] = {m for m in imports_of(path) if m.startswith(packages)}
    return graph


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")


def test_imports_run_one_way() -> None:
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        for package, banned in FORBIDDEN.items():
            if name == package or name.startswith(package + "."):
                for target in imports_of(path):
                    if target.startswith(banned):
                        wrong.append(f"{name} imports {target}")
    assert not wrong, "imports that run the wrong way:\n" + "\n".join(wrong)


def test_the_import_walk_catches_a_wrong_way_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from kumopy.coordinator.arbiter import Arbiter\n")
    assert imports_of(bad) == {"kumopy.coordinator.arbiter"}


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_module_is_small_and_says_its_job_in_one_line(path: Path) -> None:
    text = path.read_text()
    lines = text.count("\n")
    assert lines <= MAX_LINES, f"{path.name} has {lines} lines (at most {MAX_LINES})"
    doc = ast.get_docstring(ast.parse(text), clean=False)
    assert doc, f"{path.name} has no module docstring"
    first = doc.splitlines()[0]
    assert first.strip() and first.endswith("."), f"{path.name}: first line {first!r}"


def test_each_pyx_is_small() -> None:
    for path in sorted(PACKAGE.rglob("*.pyx")):
        lines = path.read_text().count("\n")
        assert lines <= MAX_LINES, f"{path.name} has {lines} lines (at most {MAX_LINES})"


if __name__ == "__main__":  # print the graph for the README and notes
    for mod, deps in import_graph(
        ("kumopy.coordinator", "kumopy.worker", "kumopy.ipc", "kumopy.smtp")
    ).items():
        print(f"{mod} -> {', '.join(sorted(deps)) or '-'}")
