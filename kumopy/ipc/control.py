"""Operator <-> coordinator: the control requests on their own socket, validated for both sides.

The kinds are status, queues, suspend, resume, bounce, rebind, reload and ping. A request is
one msgpack header frame (`v`, `kind`, `req`, fields); the reply is the uniform envelope of
kumopy.ipc.framing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kumopy.errors import ProtocolError
from kumopy.units import duration_seconds

__all__ = [
    "BOUNCE",
    "CONTROL_KINDS",
    "PING",
    "QUEUES",
    "REBIND",
    "RELOAD",
    "RESUME",
    "SELECTORS",
    "STATUS",
    "SUSPEND",
    "Selection",
    "default_control_endpoint",
    "parse_selection",
]

PING = "ping"
"""Liveness: {"pong": true}."""
STATUS = "status"
"""The coordinator's counters (`queues_limit`, `queues_offset` page the queue list)."""
QUEUES = "queues"
"""A summary per scheduled queue and per source x site."""
SUSPEND = "suspend"
"""Hold a selection (one selector field) for `duration` seconds (none: until resumed)."""
RESUME = "resume"
"""End the holds of a selection."""
BOUNCE = "bounce"
"""Remove the selected messages with an AdminBounce record each (`dry_run`: count only)."""
REBIND = "rebind"
"""Move the selected queued messages to pool `to_pool`, with an AdminRebind record each."""
RELOAD = "reload"
"""Load the policy again; answered with the errors when it is refused."""
CONTROL_KINDS = (PING, STATUS, QUEUES, SUSPEND, RESUME, BOUNCE, REBIND, RELOAD)

SELECTORS = ("source", "pool", "queue", "tenant", "campaign", "domain")
"""What a suspend, resume, bounce or rebind names: exactly one of these fields."""
_MAX_REASON = 1000
_MAX_NAME = 1024


def default_control_endpoint(spool_dir: str | Path) -> str:
    """Return the control endpoint `kumopy run` and every verb agree on for a spool."""
    return f"ipc://{Path(spool_dir).resolve() / 'control.sock'}"


@dataclass(frozen=True, slots=True)
class Selection:
    """What an operator request acts on, and how."""

    selector: str
    """One of SELECTORS."""
    value: str
    until_seconds: float
    """Duration of a suspension (inf: until resumed)."""
    reason: str


def _text(header: dict[str, Any], key: str, limit: int, default: str | None = None) -> str:
    value = header.get(key, default)
    if not isinstance(value, str) or not value.strip():
        raise ProtocolError(f"{key!r} must be a non-empty string, not {value!r}")
    if len(value) > limit or any(c in value for c in "\r\n\0"):
        raise ProtocolError(f"{key!r} must be one line of at most {limit} characters")
    return value.strip()


def parse_selection(header: dict[str, Any], *, reason_needed: bool = False) -> Selection:
    """Read the one selector, the duration and the reason of a request; raise ProtocolError."""
    given = [key for key in SELECTORS if header.get(key) is not None]
    if len(given) != 1:
        names = ", ".join(f"--{s}" for s in SELECTORS)
        raise ProtocolError(f"name exactly one of {names} (got {len(given)})")
    selector = given[0]
    value = _text(header, selector, _MAX_NAME)
    if selector == "domain":
        value = value.lower()
    duration = header.get("duration")
    if duration is None:
        seconds = math.inf
    else:
        try:
            seconds = duration_seconds(duration)
        except ValueError as exc:
            raise ProtocolError(f"duration: {exc}") from None
        if seconds <= 0:
            raise ProtocolError("duration must be longer than zero")
    default = None if reason_needed else "operator request"
    reason = _text(header, "reason", _MAX_REASON, default)
    return Selection(selector, value, seconds, reason)
