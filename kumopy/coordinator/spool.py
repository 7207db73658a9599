"""The durable spool: every accepted message lives here until its final outcome is recorded."""

from __future__ import annotations

import contextlib
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

from kumopy.errors import SpoolError, SpoolFullError

__all__ = ["SpoolRecord", "SpoolStore", "SpooledMeta", "fsync_dir"]

log = logging.getLogger(__name__)

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


class SpoolStore:
    """SQLite (WAL) spool with group commit: one fsync per batch of accepted messages."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        fsync: bool = True,
        min_free_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.quarantine_dir = self.directory / "quarantine"
        self.path = self.directory / "spool.db"
        self.fsync = fsync
        self.min_free_bytes = min_free_bytes
        fresh = not self.path.exists()
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            # FULL makes every commit fsync the WAL: the acknowledgement follows a real fsync.
            self.db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'OFF'}")
            self.db.execute("PRAGMA wal_autocheckpoint=4000")
            self.db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise SpoolError(f"cannot open spool {self.path}: {exc}") from None
        if fresh and fsync:
            fsync_dir(self.directory)
        self._sync_mode = "FULL" if fsync else "OFF"

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
            for msg_id, env, due, attempts in reschedules:
                blob = env.pack()
                row = self.db.execute("SELECT data FROM msg WHERE id = ?", (msg_id,)).fetchone()
                if row is None:
                    continue
                self.db.execute(
                    "UPDATE msg SET env = ?, due = ?, attempts = ?, crc = ? WHERE id = ?",
                    (blob, due, attempts, _crc(blob, row[0]), msg_id),
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

    def recover(self) -> Iterator[SpoolRecord]:
        """Yield every intact message; move torn or corrupt ones aside and report them."""
        bad: list[str] = []
        cur = self.db.execute("SELECT id, env, due, attempts, data, crc FROM msg ORDER BY id")
        for msg_id, env_blob, due, attempts, data, crc in cur:
            try:
                if _crc(env_blob, data) != crc:
                    raise ValueError("checksum mismatch")
                env = SpooledMeta.unpack(env_blob)
            except Exception as exc:
                self._quarantine(str(msg_id), env_blob, data, f"{type(exc).__name__}: {exc}")
                bad.append(msg_id)
                continue
            yield SpoolRecord(str(msg_id), env, float(due), int(attempts), len(data))
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
        """Checkpoint the WAL and close the database."""
        with contextlib.suppress(sqlite3.Error):
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.db.close()


def fsync_dir(path: Path) -> None:
    """Make a directory's entries durable (after creating or renaming files in it)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
