"""Delivery log records: JSON lines in KumoMTA's shape, written so that a log failure loses none."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import orjson

__all__ = ["LogWriter", "enhanced_code_dict", "response_dict"]

log = logging.getLogger(__name__)

_FLUSH_AT = 256 * 1024
"""Buffered bytes that trigger a write even before the next outcome commit."""
_REPORT_EVERY = 60.0
"""Seconds between reminders while records cannot be written."""


def enhanced_code_dict(enhanced: str | None) -> dict[str, int] | None:
    """Split "4.2.1" into KumoMTA's {class, subject, detail} form."""
    if not enhanced:
        return None
    try:
        cls, subject, detail = (int(p) for p in enhanced.split("."))
    except ValueError:
        return None
    return {"class": cls, "subject": subject, "detail": detail}


def response_dict(
    code: int, enhanced: str | None, content: str, command: str | None
) -> dict[str, Any]:
    """Build the `response` field of a record."""
    return {
        "code": code,
        "enhanced_code": enhanced_code_dict(enhanced),
        "content": content,
        "command": command,
    }


class LogWriter:
    """Append records to JSON-lines segments; a segment ends when it passes `max_bytes`.

    Records wait in memory until flush(). A write that fails (a full or vanished file system)
    never raises: the records stay buffered, `failing` says why, and the next flush() or
    check() tries again, so the caller can record outcomes in the spool regardless.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None,
        nodeid: str | None = None,
        max_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        self.nodeid = nodeid or socket.gethostname()
        self.directory = Path(directory) if directory is not None else None
        self.max_bytes = max_bytes
        self.path: Path | None = None
        self.counts: dict[str, int] = {}
        self.failing: str | None = None
        """Why records cannot be written right now; None while all is well."""
        self.failing_since: float | None = None
        self._fd = -1
        self._written = 0
        self._segment = 0
        self._buf = bytearray()
        # The first `_head` bytes of the buffer already reached the current file: a write cut
        # short mid-record resumes there, or rewrites the record whole in a new segment.
        self._head = 0
        self._reported = 0.0
        if self.directory is not None:
            self._open()

    # -- writing -----------------------------------------------------------------------------
    def write(self, record: dict[str, Any]) -> None:
        """Buffer one record; it reaches the file with the next flush()."""
        kind = record["type"]
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if self.directory is None:
            return
        record.setdefault("nodeid", self.nodeid)
        # orjson: about ten times faster than json.dumps, which showed in profiles.
        self._buf += orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
        if self._written + len(self._buf) >= self.max_bytes:
            # Rotate on a record boundary: what is buffered goes to this segment first.
            if self.flush() and self._fd >= 0:
                self._close_fd()
                self._open()
        elif len(self._buf) >= _FLUSH_AT and self.failing is None:
            self.flush()

    def flush(self) -> bool:
        """Write buffered records to the file; return False (keeping them) when that fails."""
        if not self._buf or self.directory is None:
            return self.failing is None
        if self._fd >= 0 and self._deleted():
            # Someone removed the segment or its directory: records written to it now would
            # vanish with the descriptor. Start a new segment where it belongs.
            log.error("log segment %s was deleted; starting a new one", self.path)
            self._close_fd()
            self._head = 0  # a torn record went with the deleted file: write it whole
        if self._fd < 0 and not self._open():
            return False
        view = memoryview(self._buf)
        start = pos = self._head
        try:
            while pos < len(view):
                pos += os.write(self._fd, view[pos:])
        except OSError as exc:
            view.release()
            self._written += pos - start
            cut = self._buf.rfind(b"\n", 0, pos) + 1
            del self._buf[:cut]
            self._head = pos - cut
            self._fail(f"cannot write log records to {self.path}: {exc.strerror or exc}")
            return False
        view.release()
        self._written += pos - start
        self._buf.clear()
        self._head = 0
        self._recovered()
        return True

    def check(self) -> None:
        """Notice a deleted segment and retry records that could not be written (periodic)."""
        if self._buf:
            self.flush()
        elif self._fd >= 0 and self._deleted():
            log.error("log segment %s was deleted; starting a new one", self.path)
            self._close_fd()
            self._open()

    def _deleted(self) -> bool:
        try:
            return os.fstat(self._fd).st_nlink == 0
        except OSError:
            return True

    @property
    def buffered(self) -> int:
        """Return how many bytes of records wait in memory for the file."""
        return len(self._buf)

    @property
    def unwritten(self) -> int:
        """Return how many records wait in memory for the file."""
        return self._buf.count(b"\n")

    def keep_unwritten(self, path: Path) -> None:
        """Save records that could not be written to `path` (at a stop), for the next start."""
        if not self._buf:
            return
        count = self.unwritten
        try:
            with open(path, "wb") as fh:
                fh.write(self._buf)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            log.critical("%d log records could neither be written nor kept (%s)", count, exc)
            return
        self._buf.clear()
        self._head = 0
        log.error("kept %d unwritten log records in %s for the next start", count, path)

    def restore_unwritten(self, path: Path) -> None:
        """Write first the records an earlier run kept in `path`, and remove the file."""
        if not path.exists():
            return
        data = path.read_bytes()
        self._buf[:0] = data
        self._head = 0
        if self.flush():
            path.unlink()
            log.warning("wrote %d log records kept from the last run", data.count(b"\n"))

    def close(self) -> None:
        """Flush and close the file (records that cannot be written stay for keep_unwritten)."""
        self.flush()
        self._close_fd()

    # -- files -------------------------------------------------------------------------------
    def _open(self) -> bool:
        """Open the next segment, creating the directory again if it vanished."""
        assert self.directory is not None
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        self._segment += 1
        self.path = self.directory / f"{stamp}-{os.getpid()}-{self._segment:04d}.jsonl"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
            self._fd = os.open(self.path, flags, 0o640)
        except OSError as exc:
            self._fail(f"cannot open log segment {self.path}: {exc.strerror or exc}")
            return False
        self._written = 0
        self._head = 0
        return True

    def _close_fd(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1

    def _fail(self, why: str) -> None:
        now = time.monotonic()
        if self.failing is None:
            self.failing_since = time.time()
            log.error("%s; %d records kept in memory, injection refused", why, self.unwritten)
            self._reported = now
        elif now - self._reported >= _REPORT_EVERY:
            log.error("still failing: %s; %d records kept in memory", why, self.unwritten)
            self._reported = now
        self.failing = why

    def _recovered(self) -> None:
        if self.failing is not None:
            log.warning("log records are written again (%s)", self.path)
            self.failing = None
            self.failing_since = None

    def state(self) -> dict[str, Any]:
        """Return what status and metrics show about the log."""
        return {
            "segment": str(self.path) if self.path else None,
            "failing": self.failing,
            "failing_since": self.failing_since,
            "unwritten_records": self.unwritten,
            "unwritten_bytes": len(self._buf),
        }
