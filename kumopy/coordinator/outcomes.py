"""Outcomes: results become log records, then spool updates (delivered, retried, expired)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from kumopy.bounce_class import UNCATEGORIZED, BounceClassifier, default_classifier
from kumopy.config import EgressSource
from kumopy.coordinator.logs import LogWriter, response_dict, rfc3339
from kumopy.coordinator.queues import Msg, QueueBook, SchedQueue, next_retry_delay
from kumopy.coordinator.routes import Refusal
from kumopy.coordinator.sources import Assignment
from kumopy.coordinator.spool import SpooledMeta, SpoolStore
from kumopy.errors import KumoError, ProtocolError, ShuttingDownError, SpoolError
from kumopy.ipc.jobs import DELIVERED, PERMANENT, JobResult

__all__ = ["Attempt", "Outcomes", "rejection_response"]

log = logging.getLogger(__name__)

_SESSION_FACTS = ("tls_protocol_version", "tls_cipher", "tls_peer_subject_name", "mta_sts")
"""What a worker reports about the session that a record carries (KumoMTA's field names)."""
_UNCLASSIFIED = frozenset({"Delivery", "Reception"})
"""Record types that are not about a failure: always "Uncategorized", never scanned."""
REJECTIONS_PER_SECOND = 1000
"""Rejection records written per second at most: a hostile injector cannot flood the log."""


def rejection_response(error: KumoError) -> dict[str, Any]:
    """Return the `response` of a Rejection record: SMTP-like codes for kumopy's refusal."""
    if isinstance(error, ShuttingDownError):
        code, enhanced = 421, "4.3.2"  # system not accepting network messages
    elif error.transient:
        code, enhanced = 451, "4.3.0"
    elif isinstance(error, ProtocolError):
        code, enhanced = 554, "5.5.2"  # the request itself is malformed
    else:
        code, enhanced = 550, "5.6.0"
    return response_dict(code, enhanced, f"kumopy: {error.code}: {error.message}", None)


class _Budget:
    """At most `per_second` events in each second of the monotonic clock; count the rest."""

    __slots__ = ("per_second", "second", "suppressed", "total_suppressed", "used")

    def __init__(self, per_second: int) -> None:
        self.per_second = per_second
        self.second = 0
        self.used = 0
        self.suppressed = 0
        """Events refused in the current second, reported once it is over."""
        self.total_suppressed = 0

    def take(self, room: bool = True) -> bool:
        """Return True when one more event fits in this second (never when not `room`)."""
        second = int(time.monotonic())
        if second != self.second:
            self.report()
            self.second, self.used = second, 0
        if room and self.used < self.per_second:
            self.used += 1
            return True
        self.suppressed += 1
        self.total_suppressed += 1
        return False

    def report(self) -> None:
        """Log how many Rejection records the last second suppressed, if any."""
        if self.suppressed:
            log.warning(
                "%d Rejection records not written in one second (at most %d a second, or the "
                "log is failing)",
                self.suppressed,
                self.per_second,
            )
            self.suppressed = 0


@dataclass(frozen=True, slots=True)
class Attempt:
    """Where one delivery attempt went, as its log records show it."""

    source: EgressSource
    pool: str
    site: str
    source_address: str | None
    """The local address the kernel bound (the source's configured one when unknown)."""
    peer: dict[str, str | None]
    provider: str | None = None
    """The destination's provider (shaping), for `provider_name`."""


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
        self.doomed: dict[str, str] = {}
        """Messages an operator bounced during their attempt: id -> reason (bounce on return)."""
        self._last_commit = 0.0
        self._retry_commit_at = 0.0
        self.failing: str | None = None
        """Why outcomes cannot be recorded in the spool right now."""
        self.rejections = _Budget(REJECTIONS_PER_SECOND)
        self._policy: object = None
        self._classifier = default_classifier()
        # The last times formatted: one batch of results shares `now`, one of injections
        # shares `created`.
        self._event = (-1.0, "")
        self._created = (-1.0, "")

    # -- records -----------------------------------------------------------------------------
    @property
    def classifier(self) -> BounceClassifier:
        """Return the policy's bounce classifier (kumopy's rules alone when it has none)."""
        policy = self.book.policy
        if policy is not self._policy:  # a reload may bring other rules files
            self._policy = policy
            settings = getattr(policy, "settings", None) or {}
            self._classifier = settings.get("bounce_classifier") or default_classifier()
        return self._classifier

    def _base(
        self,
        msg: Msg | None,
        now: float,
        attempt: Attempt | None = None,
        facts: dict[str, object] | None = None,
        provider: str | None = None,
    ) -> dict[str, Any]:
        """Return the fields a message's records share; type, recipient and response are None."""
        # Built per record on the hot path: one branch per optional part, no repeated tests.
        if msg is not None:
            env = msg.env
            msg_id, sender, queue, size, meta, created = (
                msg.msg_id, env.sender, env.queue, msg.size, env.meta, env.created
            )  # fmt: skip
        else:
            msg_id, sender, queue, size, meta, created = None, None, None, 0, {}, now
        if attempt is not None:
            peer = attempt.peer
            site, pool, source = attempt.site, attempt.pool, attempt.source.name
            address: dict[str, str | None] | None = {"address": attempt.source_address}
            protocol = "ESMTP" if peer.get("addr") is not None else None
            provider = provider or attempt.provider
        else:
            peer, site, pool, source, address, protocol = None, "", None, None, None, None
        if self._event[0] != now:
            self._event = (now, rfc3339(now))
        if self._created[0] != created:
            self._created = (created, rfc3339(created))
        rec: dict[str, Any] = {
            "type": None,
            "id": msg_id,
            "sender": sender,
            "recipient": None,
            "queue": queue,
            "site": site,
            "size": size,
            "response": None,
            "peer_address": peer,
            "timestamp": int(now),
            "created": int(created),
            "num_attempts": 0,
            "egress_pool": pool,
            "egress_source": source,
            "source_address": address,
            "meta": meta,
            "event_time": self._event[1],
            "created_time": self._created[1],
            "bounce_classification": UNCATEGORIZED,
            "session_id": facts.get("session_id") if facts else None,
            "delivery_protocol": protocol,
            "reception_protocol": "ZMQ",
            "provider_name": provider,
            "feedback_report": None,
        }
        if facts and len(facts) > ("session_id" in facts):  # TLS, MTA-STS facts and others
            for key in _SESSION_FACTS:
                if key in facts:
                    rec[key] = facts[key]
        return rec

    def _finish_record(
        self, rec: dict[str, Any], kind: str, rcpt: Any, response: dict[str, Any], attempts: int
    ) -> None:
        """Fill in the per-recipient fields, classify, and write the record."""
        rec["type"] = kind
        rec["recipient"] = rcpt
        rec["response"] = response
        rec["num_attempts"] = attempts
        if kind not in _UNCLASSIFIED:
            code = response["code"]
            enh = response["enhanced_code"]
            enhanced = f"{enh['class']}.{enh['subject']}.{enh['detail']}" if enh else None
            rec["bounce_classification"] = self.classifier.classify(
                code, enhanced, response["content"]
            )
        self.logs.write(rec)

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
        provider: str | None = None,
    ) -> None:
        """Write one log record in KumoMTA's shape."""
        rec = self._base(msg, now, attempt, facts, provider)
        if possible_duplicate:
            # The peer may have taken the message before the connection broke after the dot.
            rec["possible_duplicate"] = True
        self._finish_record(rec, kind, rcpt, response, attempts)

    def reception(self, msg: Msg, now: float) -> None:
        """Write the Reception record of a newly accepted message."""
        rcpts = msg.env.recipients
        response = response_dict(250, None, "accepted", None)
        self.record("Reception", msg, rcpts[0] if len(rcpts) == 1 else rcpts, now, response, 0)

    def rejection(
        self,
        error: KumoError,
        sender: str | None,
        recipients: list[str] | None,
        now: float,
        size: int = 0,
        meta: dict[str, Any] | None = None,
    ) -> bool:
        """Write the Rejection record of a message refused at injection; False if suppressed.

        At most REJECTIONS_PER_SECOND are written a second, and none while the log fails
        (they would pile up in memory); the suppressed ones are counted and logged.
        """
        if not self.rejections.take(room=self.logs.failing is None):
            return False
        rec = self._base(None, now)
        rec["sender"] = sender
        rec["size"] = size
        rec["meta"] = meta or {}
        rcpt = recipients[0] if recipients is not None and len(recipients) == 1 else recipients
        self._finish_record(rec, "Rejection", rcpt, rejection_response(error), 0)
        return True

    def admin_bounce(self, msg: Msg, reason: str, now: float) -> None:
        """Write an AdminBounce record per recipient (the caller removes the message)."""
        response = response_dict(551, "5.0.0", f"kumopy: administrative bounce: {reason}", None)
        base = self._base(msg, now)
        rcpts = msg.env.recipients
        for i, rcpt in enumerate(rcpts):
            rec = base if i == len(rcpts) - 1 else base.copy()
            self._finish_record(rec, "AdminBounce", rcpt, response, msg.attempts)

    def admin_rebind(
        self, msg: Msg, old_queue: str, new_queue_or_pool: str, reason: str, now: float
    ) -> None:
        """Write the AdminRebind record of a message moved to another queue or pool."""
        text = f"kumopy: rebound from {old_queue} to {new_queue_or_pool}: {reason}"
        rec = self._base(msg, now)
        rec["queue"] = old_queue
        rcpts = msg.env.recipients
        rcpt = rcpts[0] if len(rcpts) == 1 else rcpts
        response = response_dict(250, "2.0.0", text, None)
        self._finish_record(rec, "AdminRebind", rcpt, response, msg.attempts)

    def delayed(self, msg: Msg, reason: str, now: float) -> None:
        """Write the Delayed record of a message held back by a throttle or a hold."""
        rcpts = msg.env.recipients
        rcpt = rcpts[0] if len(rcpts) == 1 else rcpts
        response = response_dict(451, "4.4.5", f"kumopy: delayed: {reason}", None)
        self._finish_record(self._base(msg, now), "Delayed", rcpt, response, msg.attempts)

    # -- results -----------------------------------------------------------------------------
    def apply(
        self,
        item: Assignment,
        source: EgressSource,
        result: JobResult,
        now: float,
        provider: str | None = None,
    ) -> int:
        """Log a worker's result for a message, then finish or reschedule it; return deliveries."""
        msg = item.msg
        attempt = Attempt(
            source,
            item.pool,
            item.route.key,
            result.source_address or source.source_address,
            {"name": result.peer_name, "addr": result.peer_addr},
            provider,
        )
        pending: list[str] = []
        delivered = 0
        # The message's fields are built once; each recipient's record is a copy of them.
        base = self._base(msg, now, attempt, result.extra)
        last = len(result.results) - 1
        for i, r in enumerate(result.results):
            if r.status == DELIVERED:
                kind = "Delivery"
                delivered += 1
            elif r.status == PERMANENT:
                kind = "Bounce"
            else:
                kind = "TransientFailure"
                pending.append(r.recipient)
            rec = base if i == last else base.copy()
            if result.possible_duplicate and kind == "TransientFailure":
                # The peer may have taken the message before the connection broke after the dot.
                rec["possible_duplicate"] = True
            response = response_dict(r.code, r.enhanced_code, r.text, r.command)
            self._finish_record(rec, kind, r.recipient, response, msg.attempts + 1)
        if pending:
            msg.env.recipients = pending
            self.retry_or_expire(item.queue, msg, now)
        else:
            self.finish(msg, now)
        return delivered

    def refuse_queue(
        self, q: SchedQueue, now: float, refusal: Refusal, provider: str | None = None
    ) -> None:
        """Defer (4xx) or bounce (5xx) every ready message of a queue that cannot send now."""
        response = response_dict(refusal.code, refusal.enhanced, refusal.text, None)
        kind = "TransientFailure" if refusal.transient else "Bounce"
        while q.ready:
            msg = q.ready.popleft()
            for rcpt in msg.env.recipients:
                self.record(kind, msg, rcpt, now, response, msg.attempts + 1, provider=provider)
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
        reason = self.doomed.pop(msg.msg_id, None) if self.doomed else None
        if reason is not None:  # an operator bounced it while its attempt was under way
            self.admin_bounce(msg, reason, now)
            self.finish(msg, now)
            return
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

    def rewrite(self, msg: Msg) -> None:
        """Record a message's new envelope (a rebind) with the next spool commit."""
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
        if self.rejections.suppressed and int(time.monotonic()) != self.rejections.second:
            self.rejections.report()
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
