"""The unit of work the coordinator sends a worker, and the result the worker sends back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DELIVERED",
    "PERMANENT",
    "TRANSIENT",
    "Job",
    "JobResult",
    "RecipientResult",
    "SiteSpec",
]

DELIVERED = "delivered"
TRANSIENT = "transient"
PERMANENT = "permanent"


@dataclass(slots=True)
class Job:
    """One message to deliver from this worker's source to one site."""

    job_id: int
    """Coordinator-assigned handle, echoed in the result."""
    msg_id: str
    """The spool id of the message (for logs only)."""
    sender: str
    """Envelope sender; empty string for the null reverse path."""
    recipients: list[str]
    """Recipients not yet delivered, all of one site."""
    data: bytes | memoryview
    """The message exactly as injected (RFC 5322 bytes, any line endings)."""
    site: str
    """The worker's site for it (the ready queue source->site); a SITE message described it."""


@dataclass(slots=True)
class SiteSpec:
    """How this worker's source reaches one site: its hosts and the path config."""

    name: str
    hosts: list[tuple[str, str | None, int, int]]
    """(host name, address or None to resolve, port, MX preference) in order of preference;
    equal preferences are tried in random order per connection."""
    config: dict[str, Any] = field(default_factory=dict)
    """The egress path config as EgressPath.to_wire() gives it (limits, TLS, timeouts)."""
    sts_testing: tuple[str, ...] | None = None
    """MTA-STS testing mode: the patterns a host should match; a miss is reported only."""


@dataclass(slots=True)
class RecipientResult:
    """The outcome of one recipient of a job."""

    recipient: str
    status: str
    """DELIVERED, TRANSIENT or PERMANENT."""
    code: int
    """SMTP reply code; a synthesized 4xx when no reply was received."""
    enhanced_code: str | None
    text: str
    command: str | None
    """The SMTP command the reply answered (e.g. "RCPT TO"), None when synthesized."""


@dataclass(slots=True)
class JobResult:
    """Every recipient's outcome for one job, and where the attempt went."""

    job_id: int
    results: list[RecipientResult]
    peer_name: str | None = None
    """Destination host as named in the host list."""
    peer_addr: str | None = None
    """Destination IP address actually connected to."""
    source_address: str | None = None
    """Local IP address the connection was bound to (as the kernel reports it)."""
    possible_duplicate: bool = False
    """True when the outcome after the final dot was not seen (timeout or loss)."""
    extra: dict[str, object] = field(default_factory=dict)
