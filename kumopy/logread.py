"""Read log segments, plain and zstd, in time order, filtered: the `kumopy logs` command."""

from __future__ import annotations

import argparse
import calendar
import io
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import orjson

from kumopy.units import duration_seconds

__all__ = [
    "COMPRESSED",
    "DEFAULT_LOG_DIR",
    "PLAIN",
    "Filter",
    "add_logs_arguments",
    "follow_records",
    "format_record",
    "parse_time",
    "read_records",
    "segment_lines",
    "segments",
]

DEFAULT_LOG_DIR = os.path.join("var", "log")
"""Where `kumopy run` writes its records unless --log-dir says otherwise."""
PLAIN = ".jsonl"
"""Suffix of a segment being written, or closed and not compressed (yet)."""
COMPRESSED = ".jsonl.zst"
"""Suffix of a closed segment compressed with zstd."""
_CHUNK = 1 << 20
"""Bytes read at a time: a segment is streamed, never loaded whole."""
_POLL = 0.25
"""Seconds --follow waits between looks at the directory when nothing new came."""


def parse_time(text: str, now: float | None = None) -> float:
    """Parse RFC 3339, unix seconds or a relative time ("-10m", "-2h30m") into unix seconds."""
    value = text.strip()
    if value.startswith("-"):
        return (time.time() if now is None else now) - duration_seconds(value[1:])
    try:
        return float(value)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: use RFC 3339 (2026-11-30T17:01:02Z), unix seconds "
            "or a relative time such as -10m"
        ) from None
    if moment.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone: add Z (UTC) or an offset like +02:00")
    return moment.timestamp()


def _segment_key(path: Path) -> tuple[str, str, int, str]:
    """Sort key: the segment's open time, then its process and number (YYYYmmdd-HHMMSS-PID-N)."""
    parts = path.name.split("-")
    if len(parts) >= 4 and parts[2].isdigit():
        return parts[0], parts[1], int(parts[2]), parts[3].split(".")[0].zfill(8)
    return path.name, "", 0, ""


def _stem(path: Path) -> str:
    """Return a segment's name without its suffix: the same for its plain and zstd forms."""
    return path.name.split(".")[0]


def _opened_at(path: Path) -> float | None:
    """Return when a segment was opened (to the second, from its name), or None."""
    parts = path.name.split("-")
    try:
        return float(calendar.timegm(time.strptime(f"{parts[0]}{parts[1]}", "%Y%m%d%H%M%S")))
    except (IndexError, ValueError):
        return None


def segments(directory: str | os.PathLike[str]) -> list[Path]:
    """Return the segments in time order; one compressed and plain both is read compressed."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found: dict[str, Path] = {}
    for name in names:
        if name.endswith(COMPRESSED):
            found[name.removesuffix(COMPRESSED)] = Path(directory, name)
        elif name.endswith(PLAIN):
            # A plain file beside its compressed twin is about to be unlinked: skip it.
            found.setdefault(name.removesuffix(PLAIN), Path(directory, name))
    return sorted(found.values(), key=_segment_key)


def _open_segment(path: Path) -> IO[bytes]:
    """Open a segment for streaming; a plain one compressed meanwhile is read compressed."""
    import zstandard  # only readers of compressed segments pay for the import

    try:
        raw = open(path, "rb")  # noqa: SIM115 (the caller closes it)
    except FileNotFoundError:
        if not path.name.endswith(PLAIN):
            raise
        path = path.with_name(path.name + ".zst")
        raw = open(path, "rb")  # noqa: SIM115
    if not path.name.endswith(COMPRESSED):
        return raw
    reader = zstandard.ZstdDecompressor().stream_reader(
        raw, read_size=_CHUNK, read_across_frames=True, closefd=True
    )
    return io.BufferedReader(reader, _CHUNK)


def segment_lines(path: Path) -> Iterator[bytes]:
    """Yield each complete line of a segment; a torn last line (a crash mid-write) is skipped."""
    with _open_segment(path) as fh:
        for line in fh:
            if line.endswith(b"\n"):
                yield line


@dataclass(slots=True)
class Filter:
    """Which records to show; None matches everything."""

    types: frozenset[str] | None = None
    source: str | None = None
    """egress_source name."""
    queue: str | None = None
    since: float | None = None
    until: float | None = None

    def __call__(self, rec: dict[str, Any]) -> bool:
        """Return True when the record passes every filter."""
        if self.types is not None and rec.get("type") not in self.types:
            return False
        if self.source is not None and rec.get("egress_source") != self.source:
            return False
        if self.queue is not None and rec.get("queue") != self.queue:
            return False
        if self.since is None and self.until is None:
            return True
        t = _record_time(rec, self.since, self.until)
        if self.since is not None and t < self.since:
            return False
        return self.until is None or t <= self.until


def _record_time(rec: dict[str, Any], *bounds: float | None) -> float:
    """Return the record's time: whole seconds, made exact only when a bound is that second."""
    whole = rec.get("timestamp")
    if not isinstance(whole, int):
        return 0.0
    if all(b is None or int(b) != whole for b in bounds):
        return float(whole)
    try:
        return datetime.fromisoformat(str(rec["event_time"])).timestamp()
    except (KeyError, ValueError):
        return float(whole)


def _decode(lines: Iterable[bytes], keep: Filter) -> Iterator[tuple[dict[str, Any], bytes]]:
    """Parse lines into records, yielding the ones the filter keeps (with their line)."""
    for line in lines:
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            print(f"kumopy logs: skipping a line that is not JSON: {line[:80]!r}", file=sys.stderr)
            continue
        if isinstance(rec, dict) and keep(rec):
            yield rec, line


def read_records(
    directory: str | os.PathLike[str], keep: Filter | None = None
) -> Iterator[tuple[dict[str, Any], bytes]]:
    """Yield (record, line) from every segment in time order, as the filter allows."""
    keep = keep or Filter()
    paths = segments(directory)
    for i, path in enumerate(paths):
        if keep.since is not None and i + 1 < len(paths):
            # Every record of this segment was written before the next one opened.
            opened = _opened_at(paths[i + 1])
            if opened is not None and opened + 1 <= keep.since:
                continue
        yield from _decode(segment_lines(path), keep)


def follow_records(
    directory: str | os.PathLike[str],
    keep: Filter | None = None,
    stop: Callable[[], bool] = lambda: False,
    poll: float = _POLL,
) -> Iterator[tuple[dict[str, Any], bytes]]:
    """Yield the records there are, then new ones as they are written, until stop()."""
    keep = keep or Filter()
    done: set[str] = set()
    while True:
        paths = [p for p in segments(directory) if _stem(p) not in done]
        if not paths:
            if stop():
                return
            time.sleep(poll)
            continue
        for path in paths[:-1]:  # closed: read whole
            yield from _decode(segment_lines(path), keep)
            done.add(_stem(path))
        last = paths[-1]
        yield from _tail(directory, last, keep, stop, poll)
        done.add(_stem(last))
        if stop():
            return


def _tail(
    directory: str | os.PathLike[str],
    path: Path,
    keep: Filter,
    stop: Callable[[], bool],
    poll: float,
) -> Iterator[tuple[dict[str, Any], bytes]]:
    """Read a segment as it grows, until a newer segment exists and this one is read out."""
    key = _segment_key(path)
    closed = False
    with _open_segment(path) as fh:  # an open plain file reads on when it is compressed away
        partial = b""
        while True:
            chunk = fh.read(_CHUNK)
            if chunk:
                lines = (partial + chunk).split(b"\n")
                partial = lines.pop()
                yield from _decode((line + b"\n" for line in lines if line), keep)
                continue
            if closed or stop():
                return
            # Rotation closes a segment before it opens the next: once a newer one exists,
            # one more read to the end gets this one's last records.
            closed = any(_segment_key(p) > key for p in segments(directory))
            if not closed:
                time.sleep(poll)


def format_record(rec: dict[str, Any]) -> str:
    """Return the one-line human form of a record."""
    response = rec.get("response") or {}
    enh = response.get("enhanced_code")
    code = f"{response.get('code', '')}" + (
        f" {enh['class']}.{enh['subject']}.{enh['detail']}" if isinstance(enh, dict) else ""
    )
    rcpt = rec.get("recipient")
    if isinstance(rcpt, list):
        rcpt = f"{rcpt[0]} (+{len(rcpt) - 1})" if rcpt else "-"
    when = rec.get("event_time") or str(rec.get("timestamp", ""))
    via = rec.get("egress_source") or "-"
    if rec.get("source_address"):
        via += f"({rec['source_address'].get('address')})"
    text = " ".join(str(response.get("content", "")).split())
    cls = rec.get("bounce_classification")
    tail = f" [{cls}]" if cls and cls != "Uncategorized" else ""
    return (
        f"{when} {rec.get('type', '?'):<16} {rec.get('queue') or '-'} "
        f"{rec.get('sender') or '<>'} -> {rcpt or '-'} via {via}: {code} {text}{tail}"
    )


def _cmd_logs(args: argparse.Namespace) -> int:
    try:
        keep = Filter(
            frozenset(args.type) if args.type else None,
            args.source,
            args.queue,
            parse_time(args.since) if args.since else None,
            parse_time(args.until) if args.until else None,
        )
    except ValueError as exc:
        print(f"kumopy logs: {exc}", file=sys.stderr)
        return 2
    if not os.path.isdir(args.dir):
        print(f"kumopy logs: {args.dir} is not a directory", file=sys.stderr)
        return 1
    found = follow_records(args.dir, keep) if args.follow else read_records(args.dir, keep)
    out = sys.stdout.buffer
    for rec, line in found:
        out.write(line if args.json else format_record(rec).encode() + b"\n")
        if args.follow:
            out.flush()
    out.flush()
    return 0


def add_logs_arguments(p: argparse.ArgumentParser) -> None:
    """Add the `logs` subcommand's arguments to its parser."""
    p.add_argument("dir", nargs="?", default=DEFAULT_LOG_DIR, help="log directory (of kumopy run)")
    p.add_argument(
        "--type", action="append", metavar="T", help="only records of this type (repeatable)"
    )
    p.add_argument("--source", help="only records of this egress source")
    p.add_argument("--queue", help="only records of this queue")
    times = "RFC 3339, unix seconds, or relative such as -10m"
    p.add_argument("--since", metavar="TIME", help=f"only records from TIME on ({times})")
    p.add_argument("--until", metavar="TIME", help=f"only records up to TIME ({times})")
    p.add_argument("--follow", "-f", action="store_true", help="wait for new records")
    p.add_argument("--json", action="store_true", help="print the JSON lines as written")
    p.set_defaults(func=_cmd_logs)
