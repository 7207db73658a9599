"""Injector <-> coordinator: the inject, ping and status requests and their replies.

Each request is a msgpack header frame (`v`, `kind`, `req`, fields) plus, for inject, one raw
frame per message body; every reply is the uniform envelope of kumopy.ipc.framing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kumopy.errors import InjectionError, KumoError, ProtocolError, error_from_dict
from kumopy.ipc.framing import body_frame, decode_header, encode_header
from kumopy.smtp.wire import check_line_length, validate_address

__all__ = [
    "DEFAULT_ENDPOINT",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "INJECT",
    "PING",
    "RESERVED_META_PREFIX",
    "STATUS",
    "InboundMessage",
    "InjectResult",
    "Limits",
    "Message",
    "decode_inject_reply",
    "encode_inject",
    "encode_request",
    "parse_inject",
]

DEFAULT_ENDPOINT = "tcp://127.0.0.1:2025"
"""Where `kumopy run` listens and every client connects unless told otherwise."""

INJECT = "inject"
"""Spool messages: `messages` = [{sender, recipients, data (frame index or bytes), id, meta}]."""
PING = "ping"
"""Liveness: answered with {"pong": true}."""
STATUS = "status"
"""Counters: answered with the coordinator's status (`queues_limit`, `queues_offset` page it)."""

DEFAULT_MAX_MESSAGE_SIZE = 50 * 1024 * 1024
RESERVED_META_PREFIX = "kumopy_"
"""Meta keys kumopy sets itself (an operator's rebind); an injector may not."""
_META_SCALARS = (str, int, float, bool, type(None))


@dataclass(frozen=True, slots=True)
class Limits:
    """Size limits applied to every injected request."""

    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    """Largest message body accepted, in bytes."""
    max_recipients: int = 1000
    """Most recipients one message may carry."""
    max_batch: int = 10_000
    """Most messages one request may carry."""
    max_meta_keys: int = 64
    """Most meta keys one message may carry."""
    max_id_length: int = 200
    """Longest client-supplied de-duplication id."""
    max_expansion: int = 10_000
    """Most spooled messages one request may become (one per message and recipient domain)."""


@dataclass(slots=True)
class InboundMessage:
    """One injected message that passed validation."""

    sender: str
    recipients: list[str]
    data: bytes | memoryview
    client_id: str | None
    meta: dict[str, Any] = field(default_factory=dict)


def _check_meta(meta: Any, limits: Limits) -> dict[str, Any]:
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise InjectionError(f"meta must be a map, not {type(meta).__name__}")
    if len(meta) > limits.max_meta_keys:
        raise InjectionError(f"meta has {len(meta)} keys; at most {limits.max_meta_keys}")
    for key, value in meta.items():
        if not isinstance(key, str) or not key or len(key) > 128:
            raise InjectionError(f"meta key {key!r} must be a non-empty string of <= 128 chars")
        if key.startswith(RESERVED_META_PREFIX):
            raise InjectionError(f"meta key {key!r} is reserved (kumopy_* keys are kumopy's own)")
        if not isinstance(value, _META_SCALARS):
            raise InjectionError(f"meta[{key!r}] must be a string, number, boolean or nil")
        if isinstance(value, str) and len(value) > 4096:
            raise InjectionError(f"meta[{key!r}] is longer than 4096 characters")
    for key in ("tenant", "campaign"):
        value = meta.get(key)
        if value is not None and (not isinstance(value, str) or any(c in value for c in ":@")):
            raise InjectionError(f"meta[{key!r}] must be a string without ':' or '@'")
    return meta


def _parse_one(item: Any, frames: Sequence[Any], limits: Limits) -> InboundMessage:
    if not isinstance(item, dict):
        raise InjectionError(f"message must be a map, not {type(item).__name__}")
    sender = item.get("sender")
    if not isinstance(sender, str):
        raise InjectionError("sender is missing or not a string")
    validate_address(sender, allow_empty=True, where="sender")
    recipients = item.get("recipients")
    if not isinstance(recipients, list) or not recipients:
        raise InjectionError("recipients must be a non-empty list")
    if len(recipients) > limits.max_recipients:
        raise InjectionError(f"{len(recipients)} recipients; at most {limits.max_recipients}")
    for i, rcpt in enumerate(recipients):
        if not isinstance(rcpt, str):
            raise InjectionError(f"recipients[{i}] is not a string")
        validate_address(rcpt, where=f"recipients[{i}]")
    data_ref = item.get("data")
    data: bytes | memoryview
    if isinstance(data_ref, bytes):
        data = data_ref
    elif isinstance(data_ref, int) and not isinstance(data_ref, bool):
        try:
            frame = body_frame(frames, data_ref)
        except ProtocolError as exc:
            raise InjectionError(exc.message) from None
        data = frame.buffer if hasattr(frame, "buffer") else frame
    else:
        raise InjectionError("data must be bytes or the index of a body frame")
    if len(data) == 0:
        raise InjectionError("message data is empty")
    if len(data) > limits.max_message_size:
        raise InjectionError(
            f"message of {len(data)} bytes exceeds the {limits.max_message_size}-byte limit"
        )
    # Refused, not folded: folding would silently break the DKIM body hash of signed mail.
    check_line_length(data)
    client_id = item.get("id")
    if client_id is not None and (
        not isinstance(client_id, str) or not client_id or len(client_id) > limits.max_id_length
    ):
        raise InjectionError(f"id must be a non-empty string of <= {limits.max_id_length} chars")
    meta = _check_meta(item.get("meta"), limits)
    return InboundMessage(sender, list(recipients), data, client_id, meta)


def parse_inject(
    header: dict[str, Any], frames: Sequence[Any], limits: Limits
) -> list[InboundMessage | InjectionError]:
    """Validate an inject request: one outcome per message, in order."""
    items = header.get("messages")
    if items is None and "message" in header:
        items = [header["message"]]
    if not isinstance(items, list) or not items:
        raise ProtocolError("inject request needs a non-empty 'messages' list")
    if len(items) > limits.max_batch:
        raise ProtocolError(
            f"batch of {len(items)} messages exceeds the limit of {limits.max_batch}"
        )
    out: list[InboundMessage | InjectionError] = []
    for item in items:
        try:
            out.append(_parse_one(item, frames, limits))
        except InjectionError as exc:
            # Its traceback would keep this frame, and so every body frame, alive in a cycle
            # until the cycle collector runs: a refused giant body must be freed at once.
            exc.__traceback__ = None
            out.append(exc)
    return out


@dataclass(slots=True)
class Message:
    """One message to inject (the client's side of InboundMessage)."""

    sender: str
    recipients: list[str]
    data: bytes
    id: str | None = None
    """Client id: an injection retried with the same id is accepted only once."""
    tenant: str | None = None
    campaign: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class InjectResult:
    """The coordinator's answer for one message."""

    ok: bool
    id: str | None = None
    duplicate: bool = False
    error: KumoError | None = None

    @property
    def transient(self) -> bool:
        """Return True when a rejection may succeed if retried later (spool full, stopping)."""
        return self.error is not None and self.error.transient


def encode_request(kind: str, req: int, **fields: Any) -> bytes:
    """Pack a request without bodies (ping, status, and control requests)."""
    return encode_header(kind, req=req, **fields)


def encode_inject(req: int, messages: Iterable[Message]) -> list[Any]:
    """Frame an inject request: the header, then one body frame per message."""
    specs = []
    frames: list[Any] = [b""]
    for n, m in enumerate(messages, start=1):
        meta = dict(m.meta)
        if m.tenant is not None:
            meta["tenant"] = m.tenant
        if m.campaign is not None:
            meta["campaign"] = m.campaign
        spec: dict[str, Any] = {"sender": m.sender, "recipients": list(m.recipients), "data": n}
        if m.id is not None:
            spec["id"] = m.id
        if meta:
            spec["meta"] = meta
        specs.append(spec)
        frames.append(m.data)
    frames[0] = encode_header(INJECT, req=req, messages=specs)
    return frames


def decode_inject_reply(frame: bytes, count: int) -> list[InjectResult]:
    """Read the reply to an inject request of `count` messages: one result each, in order."""
    header = decode_header(frame)
    if not header.get("ok"):
        err = error_from_dict(header.get("error") or {})
        return [InjectResult(False, error=err) for _ in range(count)]
    out = []
    for item in header["result"]["messages"]:
        if item.get("ok"):
            out.append(InjectResult(True, item.get("id"), bool(item.get("duplicate"))))
        else:
            out.append(InjectResult(False, error=error_from_dict(item.get("error") or {})))
    if len(out) != count:
        raise ProtocolError(f"reply has {len(out)} results for {count} messages")
    return out
