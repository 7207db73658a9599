"""Read KumoMTA's sources TOML files ([source."x"] and [pool."p"."x"] tables) as they are."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field

from kumopy.config import EntryDefinition, PoolDefinition, SourceDefinition
from kumopy.errors import ConfigIssue
from kumopy.toml_lines import key_lines, syntax_error

__all__ = ["SourcesFile", "SourcesMerger", "parse_sources_text", "read_sources_file"]


@dataclass(slots=True)
class SourcesFile:
    """The raw definitions found in one sources file, and its problems."""

    path: str
    """The file as named by the operator."""
    sources: list[SourceDefinition] = field(default_factory=list)
    """One per [source."name"] table, in file order."""
    pools: list[PoolDefinition] = field(default_factory=list)
    """One per [pool."name"] table, in file order."""
    issues: list[ConfigIssue] = field(default_factory=list)
    """Problems with the file itself (unreadable, bad TOML, misplaced tables)."""


class _Locator:
    """Turn a key path into `file:line`, falling back to the nearest enclosing table."""

    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.lines = key_lines(text)

    def __call__(self, *keys: str) -> str:
        for end in range(len(keys), 0, -1):
            number = self.lines.get(keys[:end])
            if number is not None:
                return f"{self.path}:{number}"
        return self.path


def _kind(value: object) -> str:
    """Return how a TOML value's type is named in messages."""
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    return names.get(type(value), "an array" if isinstance(value, list) else "a value")


def _read_source(
    result: SourcesFile, where: _Locator, name: str, table: object
) -> SourceDefinition | None:
    """Turn one [source."name"] table into a definition."""
    obj = f'source "{name}"'
    if not isinstance(table, dict):
        problem = f'must be a table: write [source."{name}"] followed by its options'
        result.issues.append(ConfigIssue(where("source", name), obj, "", problem))
        return None
    options = dict(table)
    given = options.pop("name", name)
    if given != name:
        problem = f"{given!r} differs from the table's name; leave it out"
        result.issues.append(ConfigIssue(where("source", name, "name"), obj, "name", problem))
    option_where = {key: where("source", name, key) for key in options}
    return SourceDefinition(name, options, where("source", name), option_where)


def _read_pool(result: SourcesFile, where: _Locator, name: str, table: object) -> None:
    """Turn one [pool."name"] table and its entry tables into a definition."""
    obj = f'pool "{name}"'
    if not isinstance(table, dict):
        problem = f'must be a table: write [pool."{name}"] and one [pool."{name}"."source"] each'
        result.issues.append(ConfigIssue(where("pool", name), obj, "", problem))
        return
    entries: list[EntryDefinition] = []
    for source, entry in table.items():
        label = f'entry "{source}"'
        entry_where = where("pool", name, source)
        if not isinstance(entry, dict):
            problem = (
                f'must be a table, not {_kind(entry)}: write [pool."{name}"."{source}"] '
                "followed by an optional weight = N"
            )
            result.issues.append(ConfigIssue(entry_where, obj, label, problem))
            continue
        for key in entry:
            if key != "weight":
                problem = "unknown option; a pool entry table takes only weight"
                key_where = where("pool", name, source, key)
                result.issues.append(ConfigIssue(key_where, obj, f"{label}.{key}", problem))
        value = {"name": source, "weight": entry.get("weight")}
        entries.append(EntryDefinition(value, label, entry_where))
    result.pools.append(PoolDefinition(name, entries, where("pool", name)))


def parse_sources_text(text: str, path: str = "<sources>") -> SourcesFile:
    """Parse the text of a sources file; problems go to the result's issues, nothing raises."""
    result = SourcesFile(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line, problem = syntax_error(exc, path)
        result.issues.append(ConfigIssue(line, "sources file", "", problem))
        return result
    where = _Locator(path, text)
    for key, value in data.items():
        if key not in ("source", "pool") or not isinstance(value, dict):
            problem = 'a sources file holds only [source."name"] and [pool."name"."source"] tables'
            result.issues.append(ConfigIssue(where(key), f"key {key!r}", "", problem))
            continue
        for name, table in value.items():
            if key == "pool":
                _read_pool(result, where, name, table)
                continue
            source = _read_source(result, where, name, table)
            if source is not None:
                result.sources.append(source)
    return result


def read_sources_file(path: str | os.PathLike[str]) -> SourcesFile:
    """Read one sources file; a missing or unreadable file becomes an issue, not an exception."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as handle:
            text = handle.read().decode("utf-8")
    except FileNotFoundError:
        problem = "file not found"
    except UnicodeDecodeError as exc:
        problem = f"not UTF-8 text (byte {exc.start})"
    except OSError as exc:
        problem = f"cannot read: {exc.strerror or exc}"
    else:
        return parse_sources_text(text, name)
    return SourcesFile(name, issues=[ConfigIssue(name, "sources file", "", problem)])


class SourcesMerger:
    """Merge sources files in order: a later file overrides options and weights of earlier ones."""

    def __init__(self) -> None:
        self._sources: dict[str, SourceDefinition] = {}
        self._pools: dict[str, PoolDefinition] = {}

    def add(self, file: SourcesFile) -> tuple[list[SourceDefinition], list[PoolDefinition]]:
        """Merge a file in; return the definitions whose names are new, in file order."""
        new_sources: list[SourceDefinition] = []
        for source in file.sources:
            assert isinstance(source.name, str)
            known = self._sources.get(source.name)
            if known is None:
                self._sources[source.name] = source
                new_sources.append(source)
                continue
            known.options.update(source.options)
            known.option_where.update(source.option_where)
        new_pools: list[PoolDefinition] = []
        for pool in file.pools:
            assert isinstance(pool.name, str)
            known_pool = self._pools.get(pool.name)
            if known_pool is None:
                self._pools[pool.name] = pool
                new_pools.append(pool)
                continue
            index = {entry.label: i for i, entry in enumerate(known_pool.entries)}
            for entry in pool.entries:
                if entry.label in index:
                    known_pool.entries[index[entry.label]] = entry
                else:
                    known_pool.entries.append(entry)
        return new_sources, new_pools
