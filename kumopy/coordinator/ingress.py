"""Ingress: decode inject requests, spool accepted messages with group commit, then answer."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kumopy.coordinator.core import QueueCore, new_msg_id
from kumopy.coordinator.queues import Msg
from kumopy.coordinator.spool import SpooledMeta
from kumopy.errors import (
    InjectionError,
    KumoError,
    ProtocolError,
    ShuttingDownError,
    SpoolError,
)
from kumopy.ipc.framing import decode_header, error_reply, ok_reply
from kumopy.ipc.messages import InboundMessage, Limits, parse_inject
from kumopy.smtp.wire import domain_of

__all__ = ["Ingress", "split_by_domain"]

log = logging.getLogger(__name__)


def split_by_domain(recipients: list[str]) -> dict[str, list[str]]:
    """Group recipients by domain: each group becomes its own spooled message and queue."""
    groups: dict[str, list[str]] = {}
    for rcpt in recipients:
        groups.setdefault(domain_of(rcpt), []).append(rcpt)
    return groups


@dataclass(slots=True)
class _Pending:
    """One request waiting for the group commit before it is answered."""

    envelope: list[Any]
    req: Any
    results: list[dict[str, Any] | None] = field(default_factory=list)
    new: list[tuple[int, list[Msg], InboundMessage]] = field(default_factory=list)


class Ingress:
    """Turn raw ROUTER frames into spooled messages and uniform replies."""

    def __init__(
        self, core: QueueCore, limits: Limits, status: Callable[[], dict[str, Any]]
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
        pending: list[_Pending] = []
        rows: list[tuple[str, SpooledMeta, float, bytes | memoryview]] = []
        client_rows: list[tuple[str, str, float]] = []
        seen_ids: dict[str, str] = {}
        now = time.time()
        for frames in requests:
            envelope, body = _split_envelope(frames)
            if not body:
                continue  # nothing to answer: a frame without a header
            req: Any = None
            try:
                header = decode_header(body[0].buffer if hasattr(body[0], "buffer") else body[0])
                req = header.get("req")
                kind = header["kind"]
                if kind == "ping":
                    replies.append([*envelope, ok_reply(req, {"pong": True})])
                    continue
                if kind == "status":
                    replies.append([*envelope, ok_reply(req, self.status())])
                    continue
                if kind != "inject":
                    raise ProtocolError(f"unknown request kind {kind!r}")
                if self.refusing:
                    raise ShuttingDownError(self.refusing)
                parsed = parse_inject(header, body, self.limits)
            except KumoError as exc:
                self.rejected += 1
                replies.append([*envelope, error_reply(req, exc)])
                continue
            p = _Pending(envelope, req)
            for item in parsed:
                if isinstance(item, InjectionError):
                    self.rejected += 1
                    p.results.append({"ok": False, "error": item.to_dict()})
                    continue
                cid = item.client_id
                if cid is not None:
                    dup = seen_ids.get(cid) or self.core.spool.lookup_client_ids([cid]).get(cid)
                    if dup is not None:
                        p.results.append({"ok": True, "id": dup, "duplicate": True})
                        continue
                msgs = self._to_msgs(item, now)
                if cid is not None:
                    seen_ids[cid] = msgs[0].msg_id
                    client_rows.append((cid, msgs[0].msg_id, now))
                for m in msgs:
                    rows.append((m.msg_id, m.env, m.due, item.data))
                p.new.append((len(p.results), msgs, item))
                p.results.append(None)
            pending.append(p)
        if not pending:
            return replies
        commit_error: KumoError | None = None
        if rows:
            try:
                self.core.spool.check_space(sum(len(r[3]) for r in rows))
                self.core.spool.insert_batch(rows, client_rows)
            except SpoolError as exc:
                commit_error = exc
                log.error("refusing %d messages: %s", len(rows), exc.message)
        for p in pending:
            for slot, msgs, item in p.new:
                if commit_error is not None:
                    self.rejected += 1
                    p.results[slot] = {"ok": False, "error": commit_error.to_dict()}
                    continue
                for m in msgs:
                    self.core.cache_body(m, item.data)
                    self.core.record_reception(m, now)
                    self.core.add(m, now)
                self.accepted += 1
                res: dict[str, Any] = {"ok": True, "id": msgs[0].msg_id}
                if len(msgs) > 1:
                    res["ids"] = [m.msg_id for m in msgs]
                p.results[slot] = res
            replies.append([*p.envelope, ok_reply(p.req, {"messages": p.results})])
        return replies

    def _to_msgs(self, item: InboundMessage, now: float) -> list[Msg]:
        meta = item.meta
        tenant = meta.get("tenant")
        campaign = meta.get("campaign")
        out = []
        for domain, rcpts in split_by_domain(item.recipients).items():
            q = self.core.queue_for(domain, tenant, campaign)
            env = SpooledMeta(item.sender, rcpts, meta, q.name, now)
            out.append(Msg(self.core.new_handle(), new_msg_id(), env, len(item.data), 0, now))
        return out


def _split_envelope(frames: list[Any]) -> tuple[list[Any], list[Any]]:
    """Split ROUTER frames into the routing envelope and the body (REQ and DEALER peers)."""
    # ROUTER prepends the peer identity; a REQ peer adds an empty delimiter after it.
    if len(frames) >= 2 and len(frames[1]) == 0:
        return frames[:2], frames[2:]
    return frames[:1], frames[1:]
