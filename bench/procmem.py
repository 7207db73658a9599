"""A process's memory as the benchmarks report it: RSS, PSS, USS and RSS by kind."""

from __future__ import annotations

from pathlib import Path

__all__ = ["memory"]


def memory(pid: int) -> dict[str, int]:
    """Return rss, pss, uss (private clean + dirty) and rssanon/rssfile/rssshmem, in bytes."""
    fields: dict[str, int] = {}
    for name in ("smaps_rollup", "status"):
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            key, _, rest = line.partition(":")
            if rest.strip().endswith("kB"):
                fields[key] = int(rest.split()[0]) * 1024
    return {
        "rss": fields["Rss"],
        "pss": fields["Pss"],
        "uss": fields["Private_Clean"] + fields["Private_Dirty"],
        "rssanon": fields["RssAnon"],
        "rssfile": fields["RssFile"],
        "rssshmem": fields["RssShmem"],
    }
