"""Scheduled queues: naming, the in-memory message record, and the retry schedule."""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

from kumopy.config import QueueConfig
from kumopy.coordinator.spool import SpooledMeta

__all__ = [
    "Msg",
    "SchedQueue",
    "next_retry_delay",
    "queue_name",
    "site_for",
]


def queue_name(domain: str, tenant: str | None, campaign: str | None) -> str:
    """Name a scheduled queue `campaign:tenant@domain`, leaving out absent parts."""
    name = domain
    if tenant:
        name = f"{tenant}@{name}"
    if campaign:
        name = f"{campaign}:{name}"
    return name


def next_retry_delay(config: QueueConfig, attempt: int, rng: random.Random | None = None) -> float:
    """Return the delay before retry `attempt` (from 0): interval x 2^n, capped, with jitter."""
    delay = config.retry_interval * (2 ** min(attempt, 32))
    if config.max_retry_interval is not None:
        delay = min(delay, config.max_retry_interval)
    # A little jitter keeps a burst of deferrals from coming back as one burst.
    jitter: float = (rng or random).uniform(0.0, 0.05)
    return float(delay * (1.0 + jitter))


def site_for(config: QueueConfig) -> tuple[str, list[tuple[str, int]]] | None:
    """Return the site name and host list of a queue config, or None without mx_list."""
    if not config.mx_list:
        return None
    hosts = [(mx.host, mx.port if mx.port is not None else 25) for mx in config.mx_list]
    return "mx_list:" + ",".join(str(mx) for mx in config.mx_list), hosts


@dataclass(slots=True, eq=False)
class Msg:
    """A spooled message as the coordinator tracks it in memory."""

    handle: int
    msg_id: str
    env: SpooledMeta
    size: int
    attempts: int = 0
    due: float = 0.0
    data: bytes | memoryview | None = None
    """The body while cached in memory; None means read it from the spool when dispatched."""


@dataclass(slots=True, eq=False)
class SchedQueue:
    """One scheduled queue: its config from the policy and its messages that are due now."""

    name: str
    key: tuple[str, str | None, str | None]
    """(domain, tenant, campaign): what the policy is asked about this queue."""
    config: QueueConfig | None
    error: str | None = None
    """Why the queue cannot send (policy error); messages wait and retry meanwhile."""
    ready: deque[Msg] = field(default_factory=deque)
    delayed: int = 0
    """How many of this queue's messages wait in the due-time heap."""
