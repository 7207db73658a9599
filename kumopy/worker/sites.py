"""A worker's sites: ready queue and path config of each, and when a new connection may open."""

from __future__ import annotations

import asyncio
import time
from collections import deque

from kumopy.ipc.jobs import DELIVERED, PERMANENT, TRANSIENT, Job, SiteSpec
from kumopy.rates import TokenBucket, parse_rate
from kumopy.smtp.protocol import Timeouts

__all__ = ["HANDOFF_DELAY", "JOBS_PER_CONNECTION", "Admission", "Site"]

HANDOFF_DELAY = 0.05
"""Seconds a job queued behind busy connections waits before an idle connection takes it."""

JOBS_PER_CONNECTION = 8
"""Queued jobs that justify one more connection (up to connection_limit)."""


class Site:
    """The ready queue, connection pool and path config of one destination site."""

    __slots__ = (
        "batch",
        "busy",
        "connecting",
        "counts",
        "ehlo",
        "handoff",
        "limit",
        "max_deliveries",
        "name",
        "open",
        "opened",
        "provider",
        "provider_limit",
        "queue",
        "rate",
        "spec",
        "timeouts",
        "waiters",
        "woken",
    )

    def __init__(self, spec: SiteSpec, default_ehlo: str) -> None:
        self.name = spec.name
        self.queue: deque[Job] = deque()
        self.waiters: deque[asyncio.Future[Job | None]] = deque()
        """Idle connections waiting for a job; submit() hands the job straight to one."""
        self.open = 0
        self.connecting = 0
        self.busy = 0
        self.opened = 0
        self.counts = {DELIVERED: 0, TRANSIENT: 0, PERMANENT: 0}
        self.rate: TokenBucket | None = None
        self.handoff: asyncio.TimerHandle | None = None
        """A pending hand-over of queued jobs to idle connections (HANDOFF_DELAY)."""
        self.woken: asyncio.TimerHandle | None = None
        """A pending retry of a connection that max_connection_rate held back."""
        self.configure(spec, default_ehlo)

    def configure(self, spec: SiteSpec, default_ehlo: str) -> None:
        """Adopt a (new) description; open connections keep theirs until they close."""
        c = spec.config
        self.spec = spec
        self.limit = int(c.get("connection_limit", 32))
        self.max_deliveries = int(c.get("max_deliveries_per_connection", 1024))
        self.batch = int(c.get("max_recipients_per_batch", 100))
        self.timeouts = Timeouts.from_dict(c.get("timeouts") or {})
        self.ehlo = str(c.get("ehlo_domain") or default_ehlo)
        self.provider: str | None = c.get("provider_name")
        limit = c.get("provider_connection_limit")
        self.provider_limit = int(limit) if limit else None
        text = c.get("max_connection_rate")
        if not text:
            self.rate = None
        elif self.rate is None or self.rate.rate.text != text:
            # Validated by the coordinator; a bucket starts full, as KumoMTA's throttles do.
            self.rate = TokenBucket(parse_rate(text), time.monotonic())

    def wants_connection(self) -> bool:
        """Return True when more jobs wait than the open and opening connections will take."""
        conns = self.open + self.connecting
        if conns >= self.limit:
            return False
        # One connection per JOBS_PER_CONNECTION queued jobs, not one per job: a batch of 64
        # jobs opens 8 sessions, not connection_limit of them at once; a queue that keeps
        # growing (a slow receiver) opens more, up to the limit.
        return len(self.queue) > conns * JOBS_PER_CONNECTION or (conns == 0 and bool(self.queue))


class Admission:
    """Decide whether a site may open a connection now: its rate and its provider's limit."""

    def __init__(self) -> None:
        self.by_provider: dict[str, int] = {}
        """Open and opening connections per provider (provider_connection_limit)."""
        self.held = 0
        """Connections held back by max_connection_rate so far (stats)."""

    def wait(self, site: Site) -> float | None:
        """Return 0.0 to connect now, seconds to wait for the rate, or None (provider full)."""
        provider, limit = site.provider, site.provider_limit
        if provider and limit is not None and self.by_provider.get(provider, 0) >= limit:
            return None  # a connection of the provider closing frees a place
        if site.rate is not None:
            wait = site.rate.take(time.monotonic())
            if wait > 0.0:
                self.held += 1
                return wait
        return 0.0

    def opening(self, site: Site) -> None:
        """Count a connection the site starts opening."""
        if site.provider:
            self.by_provider[site.provider] = self.by_provider.get(site.provider, 0) + 1

    def closed(self, site: Site) -> None:
        """Count a connection of the site gone (or never opened)."""
        if site.provider:
            left = self.by_provider.get(site.provider, 0) - 1
            if left > 0:
                self.by_provider[site.provider] = left
            else:
                self.by_provider.pop(site.provider, None)
