"""Rates, caps and holds shared by several coordinators through Redis, local when it is away."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

from kumopy.coordinator.limits import Limiter
from kumopy.coordinator.redis_link import Answer, RedisLink
from kumopy.rates import Rate, Warmup, WindowCount

__all__ = ["RedisLimiter", "make_limiter"]

_LEASE = 0.1
"""Seconds of a rate leased at once: few round trips, little left over when demand stops."""
_LEASE_TTL = 1.0
"""Seconds leased rate tokens live: unused ones are dropped, never spent late."""
_ANSWER_WAIT = 0.02
"""The wait a check returns while Redis is asked (collect() wakes parked queues sooner)."""
_STALE = 5.0
"""Seconds after which a request with no answer is asked again."""
_LOCAL_AFTER_REFUSAL = 5.0
"""Seconds a key uses local limits after Redis refused its request (OOM, READONLY...)."""
_CAP_CHUNKS = 200
"""A cap is leased in chunks of 1/200th of it, so leftovers lost at a window's end are tiny."""
_FREE = 2**62
"""Tokens of a window without a cap (past the warm-up): spent on the fast path, never asked."""


class _Stash:
    """Tokens leased from Redis for one key, spent here without a round trip."""

    __slots__ = (
        "asked",
        "count",
        "free",
        "full",
        "index",
        "limit",
        "local_until",
        "retry_at",
        "size",
        "tokens",
        "until",
        "warmup",
    )

    def __init__(self) -> None:
        self.tokens = 0
        self.until = -math.inf
        """Tokens are spent only before this (the lease's end, or the cap window's end)."""
        self.asked: float | None = None
        """When the request in flight was made (None: none in flight)."""
        self.retry_at = -math.inf
        self.local_until = -math.inf
        self.size = 1
        """Tokens asked for at once."""
        self.index = -(2**62)
        """The cap window the tokens and count belong to."""
        self.count = 0
        """The shared count of that window, as Redis last told it (leases included)."""
        self.full = -(2**62)
        """A cap window Redis said is full."""
        self.free = False
        """The window has no cap: tokens are _FREE, counted here only."""
        self.limit = 0
        self.warmup: Warmup | None = None


class RedisLimiter(Limiter):
    """Limiter whose rates, caps and holds are shared through Redis; local while it is away.

    Checks never wait on Redis: tokens are leased ahead by a thread (RedisLink) and spent here.
    Poll fileno() and call collect(); when it returns True, offer parked queues again.
    """

    mode = "redis"

    def __init__(
        self, node: str, *, prefix: str | None = None, timeout: float = 1.0, refresh: float = 1.0
    ) -> None:
        super().__init__()
        self.prefix = f"kumopy:{prefix}:" if prefix else "kumopy:"
        self._link = RedisLink(node, self.prefix, timeout, refresh)
        self._rates: dict[str, _Stash] = {}
        self._caps: dict[str, _Stash] = {}
        self._synced: dict[str, tuple[int, int]] = {}
        """Per cap key, the window and how much of the local count Redis has been told."""
        self._up = True
        """As the thread last said; True until it says otherwise, so nothing is sent unshared."""
        self._connected = False
        self._error: str | None = None
        self._since: float | None = None
        self._granted = 0
        self._dropped = 0
        self._seq = 0
        self._holds: dict[str, tuple[float, dict[str, Any]]] = {}
        self._writes: list[tuple[int, str, tuple[float, dict[str, Any]] | None]] = []
        """Hold changes made here that the last snapshot may not show yet."""
        self._closed = False

    # -- checks, once per pick ------------------------------------------------------------

    def rate(self, key: str, rate: Rate, now: float) -> float:
        """Admit one event under `rate` for key, or return the seconds until one may fit."""
        stash = self._rates.get(key)
        if stash is not None and stash.tokens and now < stash.until:
            stash.tokens -= 1
            if not stash.tokens and stash.size > 1:
                self._ask_rate(key, rate, stash, now)  # demand is live: lease on ahead
            return 0.0
        return self._rate_miss(key, rate, now, stash)

    def _rate_miss(self, key: str, rate: Rate, now: float, stash: _Stash | None) -> float:
        if rate.local or not self._up:
            return super().rate(key, rate, now)
        if stash is None:
            stash = self._rates[key] = _Stash()
        elif stash.tokens:  # the lease ran out of time
            self._dropped += stash.tokens
            stash.tokens = 0
        if now < stash.local_until:
            return super().rate(key, rate, now)
        if stash.asked is not None and now - stash.asked < _STALE:
            return _ANSWER_WAIT
        if now < stash.retry_at:
            return stash.retry_at - now
        self._ask_rate(key, rate, stash, now)
        return _ANSWER_WAIT

    def _ask_rate(self, key: str, rate: Rate, stash: _Stash, now: float) -> None:
        stash.size = min(rate.burst, max(1, math.ceil(rate.per_second * _LEASE)))
        stash.asked = now
        interval = rate.period * 1e6 / rate.limit
        self._link.submit(("rate", key, interval, rate.burst, stash.size, now))

    def cap(self, key: str, warmup: Warmup, now: float) -> float:
        """Admit one event under warmup's cap for key, or return the seconds until it may."""
        stash = self._caps.get(key)
        if stash is not None and stash.tokens and now < stash.until and stash.warmup is warmup:
            stash.tokens -= 1
            if not stash.tokens and stash.size > 1:
                self._ask_cap(key, stash, now)
            return 0.0
        return self._cap_miss(key, warmup, now, stash)

    def _cap_miss(self, key: str, warmup: Warmup, now: float, stash: _Stash | None) -> float:
        if stash is None:
            stash = self._caps[key] = _Stash()
            stash.warmup = warmup
        if not self._up:
            return super().cap(key, warmup, now)  # counted here, told to Redis once it is back
        index, _, end = warmup.window(now)
        limit = warmup.cap(now)
        if stash.warmup is not warmup or stash.index != index:
            self._dropped += 0 if stash.free else stash.tokens
            stash.tokens, stash.index, stash.count, stash.warmup = 0, index, 0, warmup
            stash.until, stash.limit, stash.full = end, limit or 0, -(2**62)
            stash.free = limit is None
            if stash.free:  # past the schedule: every check of this window takes the fast path
                stash.tokens = _FREE - 1
                return 0.0
        if limit is None or limit == 0 or now < stash.local_until:
            return super().cap(key, warmup, now)  # not begun, or local for now
        if stash.full == index:
            return max(end - now, 0.001)
        if stash.asked is None or now - stash.asked >= _STALE:
            stash.size = max(1, limit // _CAP_CHUNKS)
            self._ask_cap(key, stash, now)
        return _ANSWER_WAIT

    def _ask_cap(self, key: str, stash: _Stash, now: float) -> None:
        stash.asked = now
        ttl = math.ceil((stash.until - now) * 1000) + 60_000  # past the window, then gone
        request = ("cap", key, stash.index, stash.limit, stash.size, ttl, now, stash.until)
        self._link.submit(request)

    def give_back(self, key: str, limit: Rate | Warmup) -> None:
        """Return a token taken for a pick that did not happen to the lease it came from."""
        stash = (self._rates if isinstance(limit, Rate) else self._caps).get(key)
        if isinstance(limit, Rate) and limit.local:
            super().give_back(key, limit)
        elif stash is not None and not stash.free and self._up:
            stash.tokens += 1  # leased from Redis: it stays this host's to spend
        else:
            super().give_back(key, limit)  # taken under the local fallback

    def used(self, key: str, warmup: Warmup, now: float) -> int:
        """Return the events counted for key in warmup's window now (all hosts, when shared)."""
        stash = self._caps.get(key)
        if stash is not None and stash.free and stash.warmup is warmup and now < stash.until:
            return _FREE - stash.tokens
        if (
            self._up
            and stash is not None
            and stash.warmup is warmup
            and stash.count
            and stash.index == warmup.window(now)[0]
        ):
            # Redis counts what it leased; what is still unspent here is not used yet.
            return max(stash.count - stash.tokens, 0)
        return super().used(key, warmup, now)

    # -- answers --------------------------------------------------------------------------

    def fileno(self) -> int | None:
        """Return the descriptor that becomes readable when collect() has answers."""
        return None if self._closed else self._link.fileno()

    def collect(self) -> bool:
        """Take the thread's answers; return True when some key may admit again."""
        wake = False
        for answer in self._link.take():
            wake = self._apply(answer) or wake
        return wake

    def _apply(self, answer: Answer) -> bool:
        kind = answer[0]
        if kind == "rate":
            _, key, granted, retry, asked = answer
            stash = self._rates.setdefault(key, _Stash())
            stash.asked = None
            if granted:
                self._dropped += stash.tokens
                stash.tokens, stash.until = granted, asked + _LEASE_TTL
                self._granted += granted
                return True
            stash.retry_at = asked + retry
            return False
        if kind == "cap":
            _, key, index, granted, count, _asked, end = answer
            stash = self._caps.setdefault(key, _Stash())
            stash.asked = None
            if stash.index != index:
                self._dropped += granted  # the window is over
                return False
            stash.count = count
            if granted:
                stash.tokens += granted
                stash.until = end
                self._granted += granted
                return True
            stash.full = index
            return False
        if kind == "fail":
            _, what, key, asked, refused = answer
            stash = (self._rates if what == "rate" else self._caps).setdefault(key, _Stash())
            stash.asked = None
            if refused:
                stash.local_until = asked + _LOCAL_AFTER_REFUSAL
            return True
        if kind == "state":
            return self._state(*answer[1:])
        _, snapshot, applied = answer
        self._writes = [w for w in self._writes if w[0] > applied]
        self._holds = dict(snapshot)
        self._overlay()
        return False

    def _state(self, connected: bool, error: str | None, since: float | None) -> bool:
        """Follow the connection: carry the shared counts into local ones and back."""
        self._connected, self._error, self._since = connected, error, since
        was, self._up = self._up, connected
        if connected == was:
            return False
        for key, stash in self._caps.items():
            count = self._counts.get(key)
            if not connected:
                stash.asked = None
                # Go on from the shared count, not from zero, under the local cap.
                if count is None:
                    count = self._counts[key] = WindowCount()
                if count.index < stash.index:
                    count.index, count.used = stash.index, 0
                if count.index == stash.index:
                    count.used = max(count.used, stash.count)
                    self._synced[key] = (count.index, count.used)
            elif count is not None and stash.warmup is not None:
                # What was sent during the outage counts for everyone once Redis is back.
                index, known = self._synced.get(key, (None, 0))
                owed = count.used - (known if index == count.index else 0)
                if owed > 0:
                    ttl = math.ceil(stash.warmup.period * 1000) + 60_000
                    self._link.submit(("add", key, count.index, owed, ttl))
                self._synced[key] = (count.index, count.used)
        if not connected:
            for stash in self._rates.values():
                stash.asked = None
        return True  # parked queues may go on, under local limits or leases again

    # -- holds (suspensions shared by every coordinator) ------------------------------------

    def share_hold(self, key: str, until: float, data: dict[str, Any]) -> None:
        """Hold key until `until` (unix time) for every coordinator; data says why."""
        self._write(key, (until, dict(data)))

    def drop_hold(self, key: str) -> None:
        """Lift a shared hold (for every coordinator)."""
        self._write(key, None)

    def _write(self, key: str, value: tuple[float, dict[str, Any]] | None) -> None:
        self._seq += 1
        self._writes.append((self._seq, key, value))
        self._overlay()
        until, data = value if value is not None else (None, None)
        self._link.submit(("hold", self._seq, key, until, data))

    def _overlay(self) -> None:
        """Show this coordinator's own changes before a snapshot from Redis shows them."""
        for _, key, value in self._writes:
            if value is None:
                self._holds.pop(key, None)
            else:
                self._holds[key] = value

    def shared_holds(self) -> dict[str, tuple[float, dict[str, Any]]]:
        """Return the holds in force (key -> (until, data)), as last read from Redis."""
        now = time.time()
        return {key: hold for key, hold in self._holds.items() if hold[0] > now}

    # -- upkeep -----------------------------------------------------------------------------

    def sweep(self, now: float) -> None:
        """Forget idle buckets and empty leases, so that memory follows the active keys."""
        if now - self._swept >= 60.0:
            idle = [k for k, s in self._rates.items() if not s.tokens and s.asked is None]
            for key in idle:
                del self._rates[key]
        super().sweep(now)

    def status(self) -> dict[str, Any]:
        """Return what status shows: the node, the connection, the leases and local fall-back."""
        local = super().status()
        del local["mode"]
        return {
            "mode": self.mode,
            "node": self._link.shown,
            "prefix": self.prefix,
            "connected": self._connected,
            "failing_since": self._since,
            "error": self._error,
            "leases": {
                "rate": sum(1 for s in self._rates.values() if s.tokens),
                "cap": sum(1 for s in self._caps.values() if s.tokens and not s.free),
            },
            "keys": {"rate": len(self._rates), "cap": len(self._caps)},
            "tokens_leased": self._granted,
            "tokens_dropped": self._dropped,
            "holds": len(self.shared_holds()),
            "local": local,
        }

    def close(self) -> None:
        """Stop the Redis thread; later checks use local limits (idempotent)."""
        self._closed = True
        self._up = False
        self._link.close()


def make_limiter(settings: Mapping[str, Any]) -> Limiter:
    """Return the limiter the policy asked for: Redis-shared, or local when none is set."""
    shared = settings.get("redis_throttles")
    if not shared:
        return Limiter()
    return RedisLimiter(shared["node"], prefix=shared.get("prefix"), timeout=shared["timeout"])
