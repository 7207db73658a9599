"""Outcomes: results become log records, then spool updates (delivered, retried, expired)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from kumopy.config import EgressSource
from kumopy.coordinator.logs import LogWriter, response_dict
from kumopy.coordinator.queues import Msg, QueueBook, SchedQueue, next_retry_delay
from kumopy.coordinator.routes import Refusal
from kumopy.coordinator.sources import Assignment
from kumopy.coordinator.spool import SpooledMeta, SpoolStore
from kumopy.errors import SpoolError
from kumopy.ipc.jobs import DELIVERED, PERMANENT, JobResult

__all__ = ["Attempt", "Outcomes"]

log = logging.getLogger(__name__)

_SESSION_FACTS = ("tls_protocol_version", "tls_cipher", "tls_peer_subject_name", "mta_sts")
"""What a worker reports about the session that a record carries (KumoMTA's field names)."""


@dataclass(frozen=True, slots=True)
class Attempt:
    """Where one delivery attempt went, as its log records show it."""

    source: EgressSource
    pool: str
    site: str
    source_address: str | None
    """The local address the kernel bound (the source's configured one when unknown)."""
    peer: dict[str, str | None]


class Outcomes:
    """Log every outcome, then record it in the spool in batches (delete or reschedule)."""

    def __init__(
        self,
        book: QueueBook,
        spool: SpoolStore,
        logs: LogWriter,
        *,
        outcome_delay: float,
        problem_retry: float | None,
        max_pending: int,
    ) -> None:
        self.book = book
        self.spool = spool
        self.logs = logs
        self.outcome_delay = outcome_delay
        self.problem_retry = problem_retry
        self.max_pending = max_pending
        self._deletes: list[str] = []
        self._reschedules: list[tuple[str, SpooledMeta, float, int]] = []
        self._last_commit = 0.0
        self._retry_commit_at = 0.0
        self.failing: str | None = None
        """Why outcomes cannot be recorded in the spool right now."""

    # -- records -----------------------------------------------------------------------------
    def record(
        self,
        kind: str,
        msg: Msg,
        rcpt: str | list[str],
        now: float,
        response: dict[str, Any],
        attempts: int,
        attempt: Attempt | None = None,
        possible_duplicate: bool = False,
        facts: dict[str, object] | None = None,
    ) -> None:
        """Write one log record in KumoMTA's shape."""
        env = msg.env
        rec: dict[str, Any] = {
            "type": kind,
            "id": msg.msg_id,
            "sender": env.sender,
            "recipient": rcpt,
            "queue": env.queue,
            "site": attempt.site if attempt else "",
            "size": msg.size,
            "response": response,
            "peer_address": attempt.peer if attempt else None,
            "timestamp": int(now),
            "created": int(env.created),
            "num_attempts": attempts,
            "egress_pool": attempt.pool if attempt else None,
            "egress_source": attempt.source.name if attempt else None,
            "source_address": {"address": attempt.source_address} if attempt else None,
            "meta": env.meta,
        }
        if possible_duplicate:
            # The peer may have taken the message before the connection broke after the dot.
            rec["possible_duplicate"] = True
        if facts:
            rec.update({k: v for k, v in facts.items() if k in _SESSION_FACTS})
        self.logs.write(rec)

    def reception(self, msg: Msg, now: float) -> None:
        """Write the Reception record of a newly accepted message."""
        rcpts = msg.env.recipients
        response = response_dict(250, None, "accepted", None)
        self.record("Reception", msg, rcpts[0] if len(rcpts) == 1 else rcpts, now, response, 0)

    # -- results -----------------------------------------------------------------------------
    def apply(self, item: Assignment, source: EgressSource, result: JobResult, now: float) -> int:
        """Log a worker's result for a message, then finish or reschedule it; return deliveries."""
        msg = item.msg
        attempt = Attempt(
            source,
            item.pool,
            item.route.key,
            result.source_address or source.source_address,
            {"name": result.peer_name, "addr": result.peer_addr},
        )
        pending: list[str] = []
        delivered = 0
        for r in result.results:
            if r.status == DELIVERED:
                kind = "Delivery"
                delivered += 1
            elif r.status == PERMANENT:
                kind = "Bounce"
            else:
                kind = "TransientFailure"
                pending.append(r.recipient)
            self.record(
                kind,
                msg,
                r.recipient,
                now,
                response_dict(r.code, r.enhanced_code, r.text, r.command),
                msg.attempts + 1,
                attempt,
                result.possible_duplicate and kind == "TransientFailure",
                result.extra,
            )
        if pending:
            msg.env.recipients = pending
            self.retry_or_expire(item.queue, msg, now)
        else:
            self.finish(msg, now)
        return delivered

    def refuse_queue(self, q: SchedQueue, now: float, refusal: Refusal) -> None:
        """Defer (4xx) or bounce (5xx) every ready message of a queue that cannot send now."""
        response = response_dict(refusal.code, refusal.enhanced, refusal.text, None)
        kind = "TransientFailure" if refusal.transient else "Bounce"
        while q.ready:
            msg = q.ready.popleft()
            for rcpt in msg.env.recipients:
                self.record(kind, msg, rcpt, now, response, msg.attempts + 1)
            if refusal.transient:
                self.retry_or_expire(q, msg, now, problem=True)
            else:
                msg.attempts += 1
                self.finish(msg, now)

    def finish(self, msg: Msg, now: float) -> None:
        """Forget a message whose recipients all have their final outcome."""
        self.book.finish(msg, now)
        self._deletes.append(msg.msg_id)

    def retry_or_expire(self, q: SchedQueue, msg: Msg, now: float, problem: bool = False) -> None:
        """Count an attempt; reschedule the message, or expire it past max_age."""
        config = q.schedule
        if problem and self.problem_retry is not None:
            delay = self.problem_retry
        else:
            delay = next_retry_delay(config, msg.attempts)
        msg.attempts += 1
        if now + delay > msg.env.created + config.max_age:
            text = f"message expired: next attempt would pass max_age {config.max_age:.0f}s"
            response = response_dict(551, "5.4.7", text, None)
            for rcpt in msg.env.recipients:
                self.record("Expiration", msg, rcpt, now, response, msg.attempts)
            self.finish(msg, now)
            return
        msg.due = now + delay
        self.book.drop_body(msg)
        self.book.delay(q, msg)
        self._reschedules.append((msg.msg_id, msg.env, msg.due, msg.attempts))

    # -- the spool ---------------------------------------------------------------------------
    def pending(self) -> int:
        """Return how many outcomes wait for their spool commit."""
        return len(self._deletes) + len(self._reschedules)

    @property
    def backlogged(self) -> bool:
        """Return True when so many outcomes wait that no new delivery should start."""
        return self.pending() >= self.max_pending

    def commit(self, force: bool = False) -> None:
        """Write the log records, then record deletions and reschedules in one spool commit.

        The spool is updated whether or not the log could be written: the log keeps its
        records in memory until it can, and the spool's truth decides what is sent again.
        """
        pending = self.pending()
        if not pending:
            return
        now = time.monotonic()
        if not force and (
            now < self._retry_commit_at
            or (pending < 2000 and now - self._last_commit < self.outcome_delay)
        ):
            return
        self._last_commit = now
        self.logs.flush()
        deletes, self._deletes = self._deletes, []
        reschedules, self._reschedules = self._reschedules, []
        try:
            self.spool.apply_outcomes(deletes, reschedules)
        except SpoolError as exc:
            # Keep them for the next try: until recorded, a crash would only resend them.
            self._deletes = deletes + self._deletes
            self._reschedules = reschedules + self._reschedules
            self._retry_commit_at = now + 1.0
            if self.failing is None:
                log.error("cannot record %d outcomes in the spool, retrying: %s", pending, exc)
            self.failing = exc.message
            return
        if self.failing is not None:
            log.warning("outcomes are recorded in the spool again")
            self.failing = None
