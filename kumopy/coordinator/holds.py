"""Holds: suspensions and config overrides from operators and automation, kept in the spool."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

import msgpack

from kumopy.coordinator.queues import SchedQueue
from kumopy.coordinator.spool import SpoolStore
from kumopy.errors import ConfigError, SpoolError
from kumopy.paths import make_egress_path

__all__ = ["HOLD_KINDS", "QUEUE_KINDS", "Hold", "Holds", "describe_until"]

log = logging.getLogger(__name__)

QUEUE_KINDS = ("pool", "queue", "tenant", "campaign", "domain")
"""Holds that keep scheduled queues waiting (their messages stay spooled)."""
HOLD_KINDS = ("source", "path", *QUEUE_KINDS, "config")
"""source: out of selection; path: a source for a site or provider ("src>site"); config:
an egress path option overridden for a while ("src>site")."""


def describe_until(until: float) -> str:
    """Return "until resumed" or the UTC time a hold ends."""
    if math.isinf(until):
        return "until resumed"
    return "until " + time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(until))


@dataclass(frozen=True, slots=True)
class Hold:
    """One suspension or override: what it holds, until when, and why."""

    kind: str
    target: str
    until: float
    reason: str
    origin: str = "operator"
    """"operator", or the automation rule's file:line."""
    site: str | None = None
    """Limits a tenant or campaign hold to one site (automation holds what it saw)."""
    option: str | None = None
    value: Any = None
    """A config hold's egress path option and the value it takes meanwhile."""
    since: float = 0.0

    @property
    def key(self) -> str:
        """Return the hold's identity: a new hold with the same key replaces it."""
        scope = f"@{self.site}" if self.site else ""
        option = f"#{self.option}" if self.option else ""
        return f"{self.kind}:{self.target}{scope}{option}"

    def to_dict(self) -> dict[str, Any]:
        """Return a msgpack- and JSON-safe form (status, the spool, Redis)."""
        return asdict(self)

    def describe(self) -> str:
        """Return a one-line description for logs and status."""
        what = f"{self.kind} {self.target}" + (f" at {self.site}" if self.site else "")
        if self.option:
            what += f": {self.option} = {self.value!r}"
        return f"{what} {describe_until(self.until)} ({self.origin}): {self.reason}"


@runtime_checkable
class Sharer(Protocol):
    """Where holds are shared with other hosts (kumopy.coordinator.redis_limits)."""

    def share_hold(self, key: str, until: float, data: dict[str, Any]) -> None: ...
    def drop_hold(self, key: str) -> None: ...
    def shared_holds(self) -> dict[str, tuple[float, dict[str, Any]]]: ...


class Holds:
    """Every hold in force, persisted in the spool; changes bump `version` for the caches."""

    def __init__(
        self,
        spool: SpoolStore | None,
        on_change: Callable[[], None] | None = None,
        sharer: Sharer | None = None,
    ):
        self.spool = spool
        self.on_change = on_change or (lambda: None)
        self.sharer = sharer
        """Redis, when limits are shared across hosts: holds are shared there too."""
        self._seen_shared: set[str] = set()
        self.holds: dict[str, Hold] = {}
        self.version = 0
        self.queue_kinds = 0
        """How many holds keep queues waiting (0: the dispatcher skips the lookup)."""
        self.paths: dict[str, Hold] = {}
        """Path holds by "source>site" or "source>provider"."""

    def load(self, now: float) -> int:
        """Adopt the holds recorded in the spool that have not expired; return how many."""
        if self.spool is None:
            return 0
        for key, _until, body in self.spool.load_holds(now):
            try:
                hold = Hold(**msgpack.unpackb(body))
            except (ValueError, TypeError) as exc:
                log.error("hold %s in the spool is unreadable (%s); dropped", key, exc)
                continue
            self._put(hold)
            log.warning("hold restored: %s", hold.describe())
        self._changed()
        return len(self.holds)

    def add(self, hold: Hold) -> Hold:
        """Record a hold (replacing one with the same key); raise SpoolError if not saved."""
        if hold.kind not in HOLD_KINDS:
            raise ValueError(f"unknown hold kind {hold.kind!r}; one of {', '.join(HOLD_KINDS)}")
        if self.spool is not None:
            body = msgpack.packb(hold.to_dict())
            # inf is a valid REAL, but a finite horizon keeps the table sortable by until.
            self.spool.save_hold(hold.key, min(hold.until, 1e18), body)
        replaced = hold.key in self.holds
        if self.sharer is not None:
            self.sharer.share_hold(hold.key, hold.until, hold.to_dict())
        self._put(hold)
        log.warning("%s: %s", "hold renewed" if replaced else "hold starts", hold.describe())
        self._changed()
        return hold

    def remove(self, match: Callable[[Hold], bool], why: str) -> list[Hold]:
        """End the holds `match` selects; return them."""
        ended = [h for h in self.holds.values() if match(h)]
        for hold in ended:
            self._drop(hold)
            if self.sharer is not None and why != "expired":
                self.sharer.drop_hold(hold.key)
            log.warning("hold ends (%s): %s", why, hold.describe())
        if ended:
            self._changed()
        return ended

    def expire(self, now: float) -> list[Hold]:
        """End the holds whose time has come; return them."""
        return self.remove(lambda h: h.until <= now, "expired")

    def merge_shared(self, now: float) -> None:
        """Adopt holds other hosts put in Redis, and end those they resumed."""
        if self.sharer is None:
            return
        shared = self.sharer.shared_holds()
        changed = False
        for key, (until, data) in shared.items():
            if key in self.holds or until <= now:
                continue
            try:
                hold = Hold(**data)
            except TypeError:
                continue
            if self.spool is not None:
                with contextlib.suppress(SpoolError):
                    self.spool.save_hold(hold.key, min(hold.until, 1e18), msgpack.packb(data))
            self._put(hold)
            log.warning("hold shared by another host: %s", hold.describe())
            changed = True
        for key in self._seen_shared - set(shared):
            ended = self.holds.get(key)
            if ended is not None and ended.until > now:
                self._drop(ended)
                log.warning("hold ended on another host: %s", ended.describe())
                changed = True
        self._seen_shared = set(shared)
        if changed:
            self._changed()

    def _put(self, hold: Hold) -> None:
        self.holds[hold.key] = hold
        if hold.kind == "path":
            self.paths[hold.target] = hold

    def _drop(self, hold: Hold) -> None:
        self.holds.pop(hold.key, None)
        if hold.kind == "path" and self.paths.get(hold.target) is hold:
            del self.paths[hold.target]
        if self.spool is not None:
            try:
                self.spool.drop_hold(hold.key)
            except SpoolError as exc:
                # It expires by its time on the next load anyway; say so and carry on.
                log.error("%s", exc.message)

    def _changed(self) -> None:
        self.version += 1
        self.queue_kinds = sum(h.kind in QUEUE_KINDS for h in self.holds.values())
        self.on_change()

    # -- lookups (hot paths: cheap when there are no holds) -----------------------------------
    def queue_hold(self, q: SchedQueue, site: str | None) -> Hold | None:
        """Return the hold that keeps scheduled queue q waiting, if any."""
        if not self.queue_kinds:
            return None
        domain, tenant, campaign, routing = q.key
        for hold in self.holds.values():
            kind, target = hold.kind, hold.target
            if hold.site is not None and hold.site != site:
                continue
            if (
                (kind == "queue" and target == q.name)
                or (kind == "pool" and target == q.pool)
                or (kind == "tenant" and target == tenant)
                or (kind == "campaign" and target == campaign)
                or (kind == "domain" and target in (domain, routing))
            ):
                return hold
        return None

    def path_hold(self, source: str, site: str, provider: str | None) -> Hold | None:
        """Return the hold on source for site (or its provider), if any."""
        hold = self.paths.get(f"{source}>{site}")
        if hold is None and provider:
            hold = self.paths.get(f"{source}>{provider}")
        return hold

    def overrides(self, source: str, site: str, provider: str | None) -> dict[str, Any]:
        """Return the egress path options overridden for (source, site or provider)."""
        raw: dict[str, Any] = {}
        targets = {f"{source}>{site}", f"{source}>{provider}" if provider else ""}
        for hold in self.holds.values():
            if hold.kind == "config" and hold.target in targets and hold.option:
                raw[hold.option] = hold.value
        if not raw:
            return {}
        # Kept as written (msgpack-safe), validated where every path option is.
        try:
            return dict(make_egress_path(raw, "hold").values)
        except ConfigError as exc:
            log.error("a held config override is invalid and ignored: %s", exc)
            return {}

    def of_kind(self, kind: str) -> list[Hold]:
        """Return the holds of one kind."""
        return [h for h in self.holds.values() if h.kind == kind]

    def status(self) -> list[dict[str, Any]]:
        """Return every hold for status, soonest end first."""
        holds = sorted(self.holds.values(), key=lambda h: h.until)
        return [{**h.to_dict(), "until_text": describe_until(h.until)} for h in holds]
