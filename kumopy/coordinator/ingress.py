"""Ingress: decode inject requests, spool accepted messages with group commit, then answer."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kumopy.coordinator.core import Core, new_msg_id
from kumopy.coordinator.spool import SpooledMeta
from kumopy.errors import (
    InjectionError,
    KumoError,
    LogUnavailableError,
    ProtocolError,
    ShuttingDownError,
    SpoolError,
)
from kumopy.ipc.framing import decode_header, error_reply, ok_reply
from kumopy.ipc.inject import INJECT, PING, STATUS, InboundMessage, Limits, parse_inject
from kumopy.smtp.wire import domain_of

__all__ = ["Ingress", "split_by_domain"]

log = logging.getLogger(__name__)

_GIVEN_CHARS = 320
"""A refused message's sender or recipient is cut to this length in its Rejection record."""
_GIVEN_RECIPIENTS = 100
"""A Rejection record names at most this many recipients of the refused message."""


def split_by_domain(recipients: list[str]) -> dict[str, list[str]]:
    """Group recipients by domain: each group becomes its own spooled message and queue."""
    groups: dict[str, list[str]] = {}
    for rcpt in recipients:
        groups.setdefault(domain_of(rcpt), []).append(rcpt)
    return groups


@dataclass(slots=True)
class _Request:
    """One inject request waiting for the group commit before it is answered."""

    envelope: list[Any]
    req: Any
    results: list[dict[str, Any] | None] = field(default_factory=list)
    new: list[tuple[int, list[tuple[str, SpooledMeta]], InboundMessage]] = field(
        default_factory=list
    )
    """(result slot, its spooled messages, the message as injected) for each new message."""
    dups: list[tuple[int, _Request, int]] = field(default_factory=list)
    """(result slot, request, slot) of messages whose id an earlier message of this batch has."""


@dataclass(slots=True)
class _Batch:
    """Everything one group commit covers."""

    requests: list[_Request] = field(default_factory=list)
    rows: list[tuple[str, SpooledMeta, float, bytes | memoryview]] = field(default_factory=list)
    client_rows: list[tuple[str, str, float]] = field(default_factory=list)
    first_of: dict[str, tuple[_Request, int]] = field(default_factory=dict)
    """Client id -> the request and slot of its first message in this batch."""


class Ingress:
    """Turn raw ROUTER frames into spooled messages and uniform replies."""

    def __init__(
        self, core: Core, limits: Limits, status: Callable[[dict[str, Any]], dict[str, Any]]
    ) -> None:
        self.core = core
        self.status = status
        self.limits = limits
        self.refusing: str | None = None
        """Set while the coordinator is stopping: every request gets this transient error."""
        self.accepted = 0
        self.rejected = 0

    def handle_batch(self, requests: list[list[Any]]) -> list[list[Any]]:
        """Process several ROUTER requests with one spool commit; return the reply frames."""
        replies: list[list[Any]] = []
        batch = _Batch()
        now = time.time()
        for frames in requests:
            envelope, body = _split_envelope(frames)
            req: Any = None
            header: Any = None
            try:
                if not body:
                    raise ProtocolError("empty request: a header frame is required")
                header = decode_header(body[0].buffer if hasattr(body[0], "buffer") else body[0])
                req = header.get("req")
                reply = self._request(header, body, envelope, batch, now)
            except KumoError as exc:
                self.rejected += 1
                reply = error_reply(req, exc)
                self._log_refused(header, exc, now)
            except Exception as exc:
                # A bug must not take the coordinator down, nor the other requests with it.
                log.exception("request refused after an internal error")
                self.rejected += 1
                reply = error_reply(req, f"internal error: {type(exc).__name__}: {exc}")
                self._log_refused(header, KumoError(f"internal error: {exc}"), now)
            if reply is not None:
                frames.clear()  # a refused body is freed now, not when the batch ends
                replies.append([*envelope, reply])
        if batch.requests:
            self._commit(batch, now)
            replies.extend(self._answers(batch))
        return replies

    def _request(
        self,
        header: dict[str, Any],
        body: list[Any],
        envelope: list[Any],
        batch: _Batch,
        now: float,
    ) -> bytes | None:
        """Answer a control request at once, or add an inject request to the batch (None)."""
        kind = header["kind"]
        req = header.get("req")
        if kind == PING:
            return ok_reply(req, {"pong": True})
        if kind == STATUS:
            return ok_reply(req, self.status(header))
        if kind != INJECT:
            raise ProtocolError(f"unknown request kind {kind!r}")
        refusal = self._refusal()
        if refusal is not None:
            raise refusal
        parsed = parse_inject(header, body, self.limits)
        groups = [
            split_by_domain(item.recipients) if isinstance(item, InboundMessage) else {}
            for item in parsed
        ]
        expansion = sum(len(g) for g in groups)
        if expansion > self.limits.max_expansion:
            raise ProtocolError(
                f"request expands to {expansion} spooled messages (one per message and "
                f"recipient domain), more than the limit of {self.limits.max_expansion}; "
                "send it in smaller requests"
            )
        request = _Request(envelope, req)
        for item, group in zip(parsed, groups, strict=True):
            slot = len(request.results)
            request.results.append(None)
            if isinstance(item, InjectionError):
                self.rejected += 1
                request.results[slot] = {"ok": False, "error": item.to_dict()}
                self.core.outcomes.rejection(item, *_given(_items_of(header)[slot]), now)
                continue
            cid = item.client_id
            if cid is not None:
                first = batch.first_of.get(cid)
                if first is not None:
                    # Its fate is the first one's: known only once the commit is done.
                    request.dups.append((slot, *first))
                    continue
                known = self.core.spool.lookup_client_ids([cid]).get(cid)
                if known is not None:
                    request.results[slot] = {"ok": True, "id": known, "duplicate": True}
                    continue
                batch.first_of[cid] = (request, slot)
            msgs = self._envelopes(item, group, now)
            if cid is not None:
                batch.client_rows.append((cid, msgs[0][0], now))
            for msg_id, env in msgs:
                batch.rows.append((msg_id, env, now, item.data))
            request.new.append((slot, msgs, item))
        batch.requests.append(request)
        return None

    def _log_refused(self, header: Any, error: KumoError, now: float) -> None:
        """Write the Rejection records of a refused request: one per message it names."""
        if isinstance(header, dict) and header.get("kind") in (PING, STATUS):
            return  # not an injection
        items = _items_of(header)
        if not items:
            self.core.outcomes.rejection(error, None, None, now)
        for item in items:
            self.core.outcomes.rejection(error, *_given(item), now)

    def _refusal(self) -> KumoError | None:
        """Return why no message can be taken now, or None."""
        if self.refusing:
            return ShuttingDownError(self.refusing)
        failing = self.core.logs.failing
        if failing is not None:
            return LogUnavailableError(
                f"log records cannot be written ({failing}); injection resumes by itself "
                "when they can"
            )
        return None

    def _commit(self, batch: _Batch, now: float) -> None:
        """Spool the batch in one durable commit, then hand its messages to the queues."""
        error: KumoError | None = None
        if batch.rows:
            try:
                self.core.spool.check_space(sum(len(r[3]) for r in batch.rows))
                self.core.spool.insert_batch(batch.rows, batch.client_rows)
            except SpoolError as exc:
                error = exc
                log.error("refusing %d messages: %s", len(batch.rows), exc.message)
        for request in batch.requests:
            for slot, msgs, item in request.new:
                if error is not None:
                    self.rejected += 1
                    request.results[slot] = {"ok": False, "error": error.to_dict()}
                    self.core.outcomes.rejection(
                        error, item.sender, item.recipients, now, len(item.data), item.meta
                    )
                    continue
                # Past the commit nothing may fail the message: it is durable, and must be
                # answered so. A bug here leaves it in the spool for the next start.
                try:
                    for msg_id, env in msgs:
                        self.core.enqueue(msg_id, env, len(item.data), now, data=item.data)
                except Exception:
                    log.exception("spooled message %s could not be queued", msgs[0][0])
                self.accepted += 1
                res: dict[str, Any] = {"ok": True, "id": msgs[0][0]}
                if len(msgs) > 1:
                    res["ids"] = [msg_id for msg_id, _ in msgs]
                request.results[slot] = res

    def _answers(self, batch: _Batch) -> list[list[Any]]:
        """Build each request's reply, resolving in-batch duplicates to their first's fate."""
        replies = []
        for request in batch.requests:
            for slot, first, first_slot in request.dups:
                outcome = first.results[first_slot]
                assert outcome is not None
                if outcome.get("ok"):
                    request.results[slot] = {"ok": True, "id": outcome["id"], "duplicate": True}
                else:
                    self.rejected += 1
                    request.results[slot] = outcome
            replies.append(
                [*request.envelope, ok_reply(request.req, {"messages": request.results})]
            )
        return replies

    def _envelopes(
        self, item: InboundMessage, groups: dict[str, list[str]], now: float
    ) -> list[tuple[str, SpooledMeta]]:
        """Return the spool id and envelope of each spooled message one injected one becomes."""
        meta = item.meta
        out = []
        for domain, rcpts in groups.items():
            queue = self.core.queue_name_for(domain, meta)
            out.append((new_msg_id(), SpooledMeta(item.sender, rcpts, meta, queue, now)))
        return out


def _items_of(header: Any) -> list[Any]:
    """Return the messages an inject request names, as given (parse_inject's reading)."""
    if not isinstance(header, dict):
        return []
    items = header.get("messages")
    if items is None and "message" in header:
        items = [header["message"]]
    return items if isinstance(items, list) else []


def _given(item: Any) -> tuple[str | None, list[str] | None]:
    """Return the sender and recipients a refused message names, where they are strings."""
    if not isinstance(item, dict):
        return None, None
    sender = item.get("sender")
    rcpts = item.get("recipients")
    recipients = None
    if isinstance(rcpts, list) and rcpts:
        recipients = [r[:_GIVEN_CHARS] for r in rcpts[:_GIVEN_RECIPIENTS] if isinstance(r, str)]
    return (sender[:_GIVEN_CHARS] if isinstance(sender, str) else None), recipients or None


def _split_envelope(frames: list[Any]) -> tuple[list[Any], list[Any]]:
    """Split ROUTER frames into the routing envelope and the body (REQ and DEALER peers)."""
    # ROUTER prepends the peer identity; a REQ peer adds an empty delimiter after it.
    if len(frames) >= 3 and len(frames[1]) == 0:
        return frames[:2], frames[2:]
    if len(frames) == 2 and len(frames[1]) == 0:
        # One empty frame: from a DEALER it is an empty request, from a REQ an empty body.
        return frames[:1], []
    return frames[:1], frames[1:]
