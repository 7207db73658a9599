"""Delivery log records: JSON lines in KumoMTA's shape, written so that a log failure loses none."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import zmq
import zstandard

from kumopy.logread import PLAIN

__all__ = [
    "LogWriter",
    "compress_segment",
    "enhanced_code_dict",
    "response_dict",
    "rfc3339",
]

log = logging.getLogger(__name__)

_PARTIAL = ".zst.tmp"
"""Appended to a plain segment's name while it is being compressed."""
_FLUSH_AT = 256 * 1024
"""Buffered bytes that trigger a write even before the next outcome commit."""
_REPORT_EVERY = 60.0
"""Seconds between reminders while records cannot be written."""
_ZSTD_LEVEL = 3
"""zstd's default level: records shrink 10x or more, at hundreds of MB/s per core."""
_CLOSE_WAIT = 60.0
"""Seconds close() waits for the last segments' compression; the next start finishes it."""
_SECONDS: dict[int, str] = {}
"""RFC 3339 text of recent whole seconds: records of one second share the formatting."""
_ENHANCED: dict[str, dict[str, int] | None] = {}
"""Split enhanced codes by their text: a few distinct codes make most records."""


def rfc3339(t: float) -> str:
    """Format a unix time as RFC 3339 UTC with microseconds ("2026-11-30T17:01:02.123456Z")."""
    sec, frac = divmod(t, 1.0)
    whole = int(sec)
    prefix = _SECONDS.get(whole)
    if prefix is None:
        if len(_SECONDS) >= 64:
            _SECONDS.clear()
        prefix = _SECONDS[whole] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    return f"{prefix}.{min(int(frac * 1_000_000), 999_999):06d}Z"


def enhanced_code_dict(enhanced: str | None) -> dict[str, int] | None:
    """Split "4.2.1" into KumoMTA's {class, subject, detail} form (shared: do not modify)."""
    if not enhanced:
        return None
    if enhanced in _ENHANCED:
        return _ENHANCED[enhanced]
    try:
        cls, subject, detail = (int(p) for p in enhanced.split("."))
    except ValueError:
        split = None
    else:
        split = {"class": cls, "subject": subject, "detail": detail}
    if len(_ENHANCED) >= 1024:  # peers choose the codes: keep the cache bounded
        _ENHANCED.clear()
    _ENHANCED[enhanced] = split
    return split


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


def compress_segment(path: Path) -> Path | None:
    """Compress a closed segment to NAME.jsonl.zst (via .tmp, fsync, rename), then unlink it.

    Return the compressed file, or None when it could not be made (the plain one stays).
    """
    target = path.with_name(path.name + ".zst")
    tmp = path.with_name(path.name + _PARTIAL)
    try:
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            size = os.fstat(src.fileno()).st_size
            compressor = zstandard.ZstdCompressor(level=_ZSTD_LEVEL, write_checksum=True)
            compressor.copy_stream(src, dst, size=size, read_size=1 << 20, write_size=1 << 20)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, target)
        # The rename must be durable before the only other copy goes.
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        path.unlink()
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, FileNotFoundError) and not path.exists():
            return None  # removed meanwhile (by an operator or log rotation): nothing to keep
        log.warning("cannot compress log segment %s, leaving it plain: %s", path, exc)
        return None
    return target


def _closed_segments(directory: Path, current: Path | None) -> list[Path]:
    """Return plain segments no live process writes (a crash left them), removing stale .tmp."""
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    me = os.getpid()
    found = []
    for name in names:
        if not name.endswith((PLAIN, PLAIN + _PARTIAL)):
            continue
        path = directory / name
        if path == current or _writer_alive(name, me):
            continue
        if name.endswith(_PARTIAL):
            with contextlib.suppress(OSError):
                path.unlink()
        elif (directory / (name + ".zst")).exists():
            # Compressed and renamed, then the process died before unlinking the plain file.
            with contextlib.suppress(OSError):
                path.unlink()
        else:
            found.append(path)
    return found


def _writer_alive(name: str, me: int) -> bool:
    """Return True when the segment's name gives the pid of another process that runs."""
    parts = name.split("-")
    if len(parts) < 4 or not parts[2].isdigit():
        return False
    pid = int(parts[2])
    if pid == me:
        return False  # this process's own segments are closed unless current (pid reuse)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, as another user
    return True


class _Compressor:
    """Compress closed segments one after another in a thread, off the coordinator's loop."""

    def __init__(self) -> None:
        self._todo: queue.SimpleQueue[Path | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, path: Path) -> None:
        """Queue a closed segment for compression (never blocks)."""
        if self._thread is None or not self._thread.is_alive():
            # zstd and file I/O release the GIL: the loop keeps running meanwhile.
            self._thread = threading.Thread(target=self._run, name="kumopy-log-zstd", daemon=True)
            self._thread.start()
        self._todo.put(path)

    def _run(self) -> None:
        while (path := self._todo.get()) is not None:
            try:
                compress_segment(path)
            except Exception:
                log.exception("compressing log segment %s failed", path)

    def close(self, timeout: float) -> bool:
        """Finish the queued segments within timeout; return False if some are left."""
        if self._thread is None:
            return True
        self._todo.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()


class LogWriter:
    """Append records to JSON-lines segments; a segment ends when it passes `max_bytes`.

    Records wait in memory until flush(). A write that fails (a full or vanished file system)
    never raises: the records stay buffered, `failing` says why, and the next flush() or
    check() tries again, so the caller can record outcomes in the spool regardless.
    With `compress`, closed segments are compressed with zstd in a thread.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None,
        nodeid: str | None = None,
        max_bytes: int = 256 * 1024 * 1024,
        compress: bool = False,
    ) -> None:
        self.nodeid = nodeid or socket.gethostname()
        self.directory = Path(directory) if directory is not None else None
        self.max_bytes = max_bytes
        self.path: Path | None = None
        self.counts: dict[str, int] = {}
        self.publisher: zmq.Socket[bytes] | None = None
        """A PUB socket that gets every record as [type, JSON] when it is written (optional)."""
        self.publish_errors = 0
        self._topics: dict[str, bytes] = {}
        self._compressor = _Compressor() if compress and directory is not None else None
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
            if self._compressor is not None:
                for path in _closed_segments(self.directory, self.path):
                    self._compressor.submit(path)

    # -- writing -----------------------------------------------------------------------------
    def write(self, record: dict[str, Any]) -> None:
        """Buffer one record; it reaches the file with the next flush()."""
        kind = record["type"]
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if self.directory is None and self.publisher is None:
            return
        record.setdefault("nodeid", self.nodeid)
        # orjson: about ten times faster than json.dumps, which showed in profiles.
        line = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
        if self.publisher is not None:
            self._publish(kind, line)
        if self.directory is None:
            return
        self._buf += line
        if self._written + len(self._buf) >= self.max_bytes:
            # Rotate on a record boundary: what is buffered goes to this segment first.
            if self.flush() and self._fd >= 0:
                self._close_fd()
                if self._compressor is not None and self.path is not None:
                    self._compressor.submit(self.path)
                self._open()
        elif len(self._buf) >= _FLUSH_AT and self.failing is None:
            self.flush()

    def _publish(self, kind: str, line: bytes) -> None:
        """Send [type, JSON] on the PUB socket; never blocks: past its SNDHWM, PUB drops."""
        topic = self._topics.get(kind)
        if topic is None:
            topic = self._topics[kind] = kind.encode()
        assert self.publisher is not None
        try:
            self.publisher.send_multipart((topic, line[:-1]), zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            self.publish_errors += 1
            if self.publish_errors == 1 or self.publish_errors % 100_000 == 0:
                log.warning("cannot publish log records (%d so far): %s", self.publish_errors, exc)

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
        """Flush and close the file (records that cannot be written stay for keep_unwritten).

        The last segment is compressed before this returns, within a bounded wait.
        """
        self.flush()
        was_open = self._fd >= 0
        self._close_fd()
        if self._compressor is None:
            return
        if was_open and self.path is not None and not self._buf:
            self._compressor.submit(self.path)
        if not self._compressor.close(_CLOSE_WAIT):
            log.warning("log segments are still being compressed; the next start finishes it")

    # -- files -------------------------------------------------------------------------------
    def _open(self) -> bool:
        """Open the next segment, creating the directory again if it vanished."""
        assert self.directory is not None
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        self._segment += 1
        self.path = self.directory / f"{stamp}-{os.getpid()}-{self._segment:04d}{PLAIN}"
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
