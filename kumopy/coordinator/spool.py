"""The durable spool: every accepted message lives here until its final outcome is recorded."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import sqlite3
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from kumopy.coordinator.spool_salvage import (
    finish_interrupted,
    fsync_dir,
    is_corrupt,
    quarantine_file,
    salvage,
)
from kumopy.errors import SpoolError, SpoolFullError, SpoolLockedError

__all__ = ["PAGE_SIZE", "SpoolRecord", "SpoolStore", "SpooledMeta", "fsync_dir"]

log = logging.getLogger(__name__)

PAGE_SIZE = 16384
"""SQLite page size of a new spool. At 4 KiB a 2 KB message took a page of its own (4.1 KB on
disk and in the WAL per message); 16 KiB packs seven, which cuts inserts by 40 % and in-order
deletes by half (bench/spool_pages.py). Outcomes in random order write more per page; 32 KiB
made that worse again. An existing spool keeps the page size it was made with."""

_SCHEMA = """
-- A rowid table: SQLite's WITHOUT ROWID layout is slower for rows this large (measured).
CREATE TABLE IF NOT EXISTS msg (
    id TEXT PRIMARY KEY,
    env BLOB NOT NULL,
    due REAL NOT NULL,
    attempts INTEGER NOT NULL,
    crc INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS injid (
    client_id TEXT PRIMARY KEY,
    msg_id TEXT NOT NULL,
    ts REAL NOT NULL
) WITHOUT ROWID;
-- Suspensions and overrides (operators, automation) that must outlive a restart.
CREATE TABLE IF NOT EXISTS hold (
    key TEXT PRIMARY KEY,
    until REAL NOT NULL,
    body BLOB NOT NULL
) WITHOUT ROWID;
"""


@dataclass(slots=True)
class SpooledMeta:
    """The envelope of a spooled message (everything but the body and schedule)."""

    sender: str
    recipients: list[str]
    meta: dict[str, Any]
    queue: str
    created: float

    def pack(self) -> bytes:
        """Serialise for the spool's `env` column."""
        packed: bytes = msgpack.packb(
            [self.sender, self.recipients, self.meta, self.queue, self.created], use_bin_type=True
        )
        return packed

    @classmethod
    def unpack(cls, blob: bytes) -> SpooledMeta:
        """Read back what pack() wrote."""
        sender, rcpts, meta, queue, created = msgpack.unpackb(blob, raw=False)
        if not rcpts:
            raise ValueError("envelope has no recipients")
        return cls(str(sender), [str(r) for r in rcpts], dict(meta), str(queue), float(created))


@dataclass(slots=True)
class SpoolRecord:
    """One message as recovered from the spool at start-up (body left on disk)."""

    msg_id: str
    env: SpooledMeta
    due: float
    attempts: int
    size: int


def _crc(env: bytes, data: bytes | memoryview) -> int:
    # The checksum covers the envelope and the body so a torn or bit-flipped row is caught on
    # recovery instead of being half-delivered.
    return zlib.crc32(data, zlib.crc32(env)) & 0xFFFFFFFF


def _lock(directory: Path) -> int:
    """Take the directory's exclusive lock (held while the fd stays open); return the fd."""
    path = directory / "lock"
    try:
        # os.open() fds are not inherited by exec'd children (PEP 446): workers never hold it.
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise SpoolError(f"cannot open the spool lock {path}: {exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
            raise SpoolLockedError(
                f"spool {directory} is in use by another kumopy run (pid {holder}); "
                "stop it or give another --spool"
            ) from None
        raise SpoolError(f"cannot lock the spool {path}: {exc}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class SpoolStore:
    """SQLite (WAL) spool with group commit: one fsync per batch of accepted messages."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        fsync: bool = True,
        min_free_bytes: int = 64 * 1024 * 1024,
        start_empty: bool = False,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.quarantine_dir = self.directory / "quarantine"
        self.path = self.directory / "spool.db"
        self.fsync = fsync
        self.min_free_bytes = min_free_bytes
        self.start_empty = start_empty
        self.salvage: dict[str, Any] | None = None
        """The salvage report when a damaged spool.db was replaced at start-up, else None."""
        self._lock_fd = _lock(self.directory)
        try:
            finish_interrupted(self.path, self.quarantine_dir, fsync=fsync)
            self._set_aside_empty()
            fresh = not self.path.exists()
            try:
                self.db = self._connect()
            except sqlite3.DatabaseError as exc:
                if not is_corrupt(exc):
                    raise SpoolError(f"cannot open spool {self.path}: {exc}") from None
                self._salvage(str(exc))
                self.db = self._connect_salvaged()
            if fresh and fsync:
                fsync_dir(self.directory)
        except BaseException:
            os.close(self._lock_fd)
            raise

    def _set_aside_empty(self) -> None:
        # SQLite treats a 0-byte file as a new database, but a spool that existed was at least
        # one page: a 0-byte one was truncated, and starting on it would lose every message.
        if not self.path.exists() or self.path.stat().st_size:
            return
        if not self.start_empty:
            raise SpoolError(
                f"spool file {self.path} is empty (0 bytes): messages may have been lost. "
                "Pass --start-empty to move it to quarantine and start with an empty spool"
            )
        moved = quarantine_file(self.path, self.quarantine_dir, "-empty", fsync=self.fsync)
        log.warning("spool file %s was empty (0 bytes); moved it to %s", self.path, moved)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            # Only a new database takes it (it must come before WAL mode is set).
            db.execute(f"PRAGMA page_size={int(PAGE_SIZE)}")
            db.execute("PRAGMA journal_mode=WAL")
            # FULL makes every commit fsync the WAL: the acknowledgement follows a real fsync.
            db.execute(f"PRAGMA synchronous={'FULL' if self.fsync else 'OFF'}")
            db.execute("PRAGMA wal_autocheckpoint=4000")
            db.create_function("kumopy_crc", 2, _crc, deterministic=True)
            db.executescript(_SCHEMA)
        except BaseException:
            db.close()  # the file may be moved to quarantine next
            raise
        self._sync_mode = "FULL" if self.fsync else "OFF"
        return db

    def _connect_salvaged(self) -> sqlite3.Connection:
        try:
            return self._connect()
        except sqlite3.DatabaseError as exc:
            raise SpoolError(f"cannot open the salvaged spool {self.path}: {exc}") from None

    def _salvage(self, reason: str) -> None:
        try:
            self.salvage = salvage(
                self.path,
                _SCHEMA,
                reason=reason,
                fsync=self.fsync,
                start_empty=self.start_empty,
                page_size=PAGE_SIZE,
            )
        except SpoolError:
            raise
        except (sqlite3.Error, OSError) as exc:
            raise SpoolError(f"cannot salvage the damaged spool {self.path}: {exc}") from None

    def _sync(self, mode: str) -> None:
        # Acknowledged messages are committed with FULL (the WAL is fsynced before COMMIT
        # returns); outcomes use NORMAL, whose WAL frames become durable with the next FULL
        # commit or checkpoint. A process crash loses neither; a power loss can only replay an
        # outcome (a possible duplicate), never lose an accepted message.
        if self.fsync and mode != self._sync_mode:
            self.db.execute(f"PRAGMA synchronous={mode}")
            self._sync_mode = mode

    # -- space -------------------------------------------------------------------------------
    def free_bytes(self) -> int:
        """Return bytes available to this process on the spool's file system."""
        st = os.statvfs(self.directory)
        return st.f_bavail * st.f_frsize

    def check_space(self, incoming: int = 0) -> None:
        """Raise SpoolFullError when accepting `incoming` bytes would pass the free minimum."""
        free = self.free_bytes()
        if free - incoming < self.min_free_bytes:
            raise SpoolFullError(
                f"spool {self.directory} has {free // (1024 * 1024)} MiB free, below the "
                f"{self.min_free_bytes // (1024 * 1024)} MiB minimum; try again later"
            )

    # -- writes ------------------------------------------------------------------------------
    def insert_batch(
        self,
        rows: Sequence[tuple[str, SpooledMeta, float, bytes | memoryview]],
        client_ids: Sequence[tuple[str, str, float]] = (),
    ) -> None:
        """Store messages (id, env, due, data) and their client ids in one durable commit."""
        params = []
        for msg_id, env, due, data in rows:
            blob = env.pack()
            params.append((msg_id, blob, due, 0, data, _crc(blob, data)))
        try:
            self._sync("FULL")
            self.db.execute("BEGIN")
            self.db.executemany(
                "INSERT INTO msg (id, env, due, attempts, data, crc) VALUES (?,?,?,?,?,?)", params
            )
            if client_ids:
                self.db.executemany(
                    "INSERT OR IGNORE INTO injid (client_id, msg_id, ts) VALUES (?,?,?)",
                    client_ids,
                )
            self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            if "full" in str(exc).lower():
                raise SpoolFullError(f"spool {self.directory} is full: {exc}") from None
            raise SpoolError(f"spool write failed: {exc}") from None

    def apply_outcomes(
        self,
        deletes: Sequence[str],
        reschedules: Sequence[tuple[str, SpooledMeta, float, int]],
    ) -> None:
        """Remove finished messages and rewrite rescheduled ones, in one commit."""
        if not deletes and not reschedules:
            return
        try:
            self._sync("NORMAL")
            self.db.execute("BEGIN")
            if deletes:
                self.db.executemany("DELETE FROM msg WHERE id = ?", [(d,) for d in deletes])
            if reschedules:
                # One statement per message, not a SELECT of the body and then an UPDATE: the
                # checksum is computed inside it. A message already gone updates nothing.
                self.db.executemany(
                    "UPDATE msg SET env = ?1, due = ?2, attempts = ?3, crc = kumopy_crc(?1, data)"
                    " WHERE id = ?4",
                    [
                        (env.pack(), due, attempts, msg_id)
                        for msg_id, env, due, attempts in reschedules
                    ],
                )
            self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            raise SpoolError(f"spool update failed: {exc}") from None

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.db.execute("ROLLBACK")

    # -- reads -------------------------------------------------------------------------------
    def load_data(self, msg_id: str) -> bytes | None:
        """Return a message body, or None when the message is gone."""
        try:
            row = self.db.execute("SELECT data FROM msg WHERE id = ?", (msg_id,)).fetchone()
        except sqlite3.Error as exc:
            raise SpoolError(f"cannot read message {msg_id} from the spool: {exc}") from None
        return None if row is None else bytes(row[0])

    def lookup_client_ids(self, client_ids: Sequence[str]) -> dict[str, str]:
        """Return the spool id already assigned to each known client id."""
        found: dict[str, str] = {}
        for cid in client_ids:
            row = self.db.execute("SELECT msg_id FROM injid WHERE client_id = ?", (cid,)).fetchone()
            if row is not None:
                found[cid] = row[0]
        return found

    def prune_client_ids(self, older_than: float) -> int:
        """Forget de-duplication ids recorded before `older_than` (unix time)."""
        try:
            cur = self.db.execute("DELETE FROM injid WHERE ts < ?", (older_than,))
        except sqlite3.Error as exc:
            log.warning("cannot prune de-duplication ids: %s", exc)
            return 0
        return cur.rowcount

    # -- holds -------------------------------------------------------------------------------
    def save_hold(self, key: str, until: float, body: bytes) -> None:
        """Record (or replace) a hold durably; raise SpoolError when that fails."""
        try:
            self._sync("FULL")
            self.db.execute(
                "INSERT OR REPLACE INTO hold (key, until, body) VALUES (?, ?, ?)",
                (key, until, body),
            )
        except sqlite3.Error as exc:
            raise SpoolError(f"cannot record hold {key!r} in the spool: {exc}") from None

    def drop_hold(self, key: str) -> None:
        """Forget a hold; raise SpoolError when that fails."""
        try:
            self.db.execute("DELETE FROM hold WHERE key = ?", (key,))
        except sqlite3.Error as exc:
            raise SpoolError(f"cannot remove hold {key!r} from the spool: {exc}") from None

    def load_holds(self, now: float) -> list[tuple[str, float, bytes]]:
        """Return the holds that have not expired by `now`, forgetting the others."""
        try:
            self.db.execute("DELETE FROM hold WHERE until <= ?", (now,))
            rows = self.db.execute("SELECT key, until, body FROM hold").fetchall()
        except sqlite3.Error as exc:
            raise SpoolError(f"cannot read holds from the spool: {exc}") from None
        return [(str(k), float(u), bytes(b)) for k, u, b in rows]

    def recover(self) -> Iterator[SpoolRecord]:
        """Yield every intact message; move torn or corrupt ones aside and report them."""
        bad: list[str] = []
        last: Any = None
        for salvaged in (False, True):
            query = "SELECT id, env, due, attempts, data, crc FROM msg"
            try:
                # After a salvage, carry on past the last id already yielded (same order).
                cur = (
                    self.db.execute(f"{query} ORDER BY id")
                    if last is None
                    else self.db.execute(f"{query} WHERE id > ? ORDER BY id", (last,))
                )
                for msg_id, env_blob, due, attempts, data, crc in cur:
                    last = msg_id
                    try:
                        if _crc(env_blob, data) != crc:
                            raise ValueError("checksum mismatch")
                        env = SpooledMeta.unpack(env_blob)
                    except Exception as exc:
                        reason = f"{type(exc).__name__}: {exc}"
                        self._quarantine(str(msg_id), env_blob, data, reason)
                        bad.append(msg_id)
                        continue
                    yield SpoolRecord(str(msg_id), env, float(due), int(attempts), len(data))
                break
            except sqlite3.DatabaseError as exc:
                if salvaged or not is_corrupt(exc):
                    raise SpoolError(f"cannot read spool {self.path}: {exc}") from None
                self.db.close()
                self._salvage(str(exc))
                self.db = self._connect_salvaged()
        if bad:
            self.db.execute("BEGIN")
            self.db.executemany("DELETE FROM msg WHERE id = ?", [(b,) for b in bad])
            self.db.execute("COMMIT")

    def _quarantine(self, msg_id: str, env_blob: Any, data: Any, reason: str) -> None:
        self.quarantine_dir.mkdir(exist_ok=True)
        safe = "".join(c for c in msg_id if c.isalnum() or c in "-_") or "unnamed"
        base = self.quarantine_dir / safe
        Path(f"{base}.eml").write_bytes(bytes(data) if data is not None else b"")
        info = {"id": msg_id, "reason": reason, "env_hex": bytes(env_blob or b"").hex()}
        Path(f"{base}.json").write_text(json.dumps(info))
        if self.fsync:
            fsync_dir(self.quarantine_dir)
        log.error("spool entry %s is corrupt (%s); moved aside to %s.eml", msg_id, reason, base)

    def count(self) -> int:
        """Return how many messages the spool holds."""
        return int(self.db.execute("SELECT count(*) FROM msg").fetchone()[0])

    def close(self) -> None:
        """Checkpoint the WAL, close the database and release the directory lock."""
        with contextlib.suppress(sqlite3.Error):
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.db.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing our only descriptor releases the flock
            self._lock_fd = -1
