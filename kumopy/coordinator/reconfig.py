"""What a reload changes in the sources in use: added, changed, retired and revived ones."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kumopy.config import EgressSource

__all__ = ["SourceChanges", "diff_sources"]


@dataclass(slots=True)
class SourceChanges:
    """Source indexes touched by a reload; an index is never reused for another name."""

    added: list[int] = field(default_factory=list)
    """New sources (appended): their workers start."""
    changed: list[int] = field(default_factory=list)
    """Address, EHLO name or another option changed: a new worker after the old one drains."""
    retired: list[int] = field(default_factory=list)
    """No pool sends from them any more: their workers drain and stop for good."""
    revived: list[int] = field(default_factory=list)
    """Retired by an earlier reload and back in a pool now."""

    def __bool__(self) -> bool:
        return bool(self.added or self.changed or self.retired or self.revived)

    def describe(self, sources: Sequence[EgressSource]) -> str:
        """Return a one-line summary for the log."""
        parts = []
        for what, indexes in (
            ("added", self.added),
            ("changed", self.changed),
            ("retired", self.retired),
            ("back", self.revived),
        ):
            if indexes:
                parts.append(f"{what}: {', '.join(sources[i].name for i in indexes)}")
        return "; ".join(parts) or "no source changed"


def diff_sources(
    current: list[EgressSource], retired: set[int], wanted: Sequence[EgressSource]
) -> tuple[SourceChanges, list[EgressSource]]:
    """Compare the running sources with those a new policy uses.

    Return the changes and the new list of sources by index (the running ones in place,
    changed definitions replacing theirs, new ones appended).
    """
    changes = SourceChanges()
    index = {s.name: i for i, s in enumerate(current)}
    after = list(current)
    wanted_names = {s.name for s in wanted}
    for source in wanted:
        i = index.get(source.name)
        if i is None:
            changes.added.append(len(after))
            after.append(source)
            continue
        if i in retired:
            changes.revived.append(i)
            if source != current[i]:
                changes.changed.append(i)
        elif source != current[i]:
            changes.changed.append(i)
        after[i] = source
    for i, source in enumerate(current):
        if source.name not in wanted_names and i not in retired:
            changes.retired.append(i)
    return changes, after
