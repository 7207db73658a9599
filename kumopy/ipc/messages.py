"""The message kinds kumopy exchanges over ZeroMQ, with their validation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kumopy.errors import InjectionError, ProtocolError
from kumopy.ipc.framing import body_frame, encode_header
from kumopy.ipc.jobs import Job, JobResult, RecipientResult
from kumopy.smtp.wire import check_line_length, validate_address

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "InboundMessage",
    "Limits",
    "decode_jobs",
    "decode_results",
    "encode_jobs",
    "encode_results",
    "parse_inject",
]

DEFAULT_MAX_MESSAGE_SIZE = 50 * 1024 * 1024
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


def encode_jobs(jobs: Sequence[Job]) -> list[Any]:
    """Frame a batch of jobs for a worker: header then one body frame per job."""
    specs = []
    frames: list[Any] = [b""]
    for n, job in enumerate(jobs, start=1):
        specs.append([job.job_id, job.msg_id, job.sender, job.recipients, job.hosts, job.site, n])
        frames.append(job.data)
    frames[0] = encode_header("deliver", jobs=specs)
    return frames


def decode_jobs(header: dict[str, Any], frames: Sequence[Any]) -> list[Job]:
    """Rebuild the jobs of a deliver message (the coordinator is trusted; shape is checked)."""
    jobs = []
    try:
        for job_id, msg_id, sender, rcpts, hosts, site, idx in header["jobs"]:
            frame = body_frame(frames, idx)
            data = frame.buffer if hasattr(frame, "buffer") else frame
            jobs.append(
                Job(job_id, msg_id, sender, list(rcpts), data, [(h, p) for h, p in hosts], site)
            )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed deliver message: {exc}") from None
    return jobs


def encode_results(results: Sequence[JobResult]) -> bytes:
    """Pack a batch of job results for the coordinator."""
    rows = []
    for r in results:
        rcpts = [
            [x.recipient, x.status, x.code, x.enhanced_code, x.text, x.command] for x in r.results
        ]
        row = [r.job_id, rcpts, r.peer_name, r.peer_addr, r.source_address, r.possible_duplicate]
        if r.extra:
            row.append(r.extra)
        rows.append(row)
    return encode_header("results", results=rows)


def decode_results(header: dict[str, Any]) -> list[JobResult]:
    """Rebuild a batch of job results sent by encode_results()."""
    out = []
    try:
        for row in header["results"]:
            job_id, rcpts, peer_name, peer_addr, source_address, dup, *rest = row
            extra = rest[0] if rest and isinstance(rest[0], dict) else {}
            out.append(
                JobResult(
                    job_id,
                    [RecipientResult(*x) for x in rcpts],
                    peer_name,
                    peer_addr,
                    source_address,
                    bool(dup),
                    extra,
                )
            )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed results message: {exc}") from None
    return out
