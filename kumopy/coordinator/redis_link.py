"""The Redis side of shared limits: one thread, one connection, atomic scripts, answers by pipe."""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import queue
import random
import threading
import time
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.exceptions import NoScriptError
from redis.retry import Retry

from kumopy.redis_config import mask_url

__all__ = ["Answer", "RedisLink", "Request"]

log = logging.getLogger(__name__)

Request = tuple[Any, ...]
"""("rate", key, interval_us, burst, want, asked), ("cap", key, index, cap, want, ttl_ms, asked,
end), ("add", key, index, n, ttl_ms), ("hold", seq, key, until, data) with until None to drop."""
Answer = tuple[Any, ...]
"""("rate", key, granted, retry_s, asked), ("cap", key, index, granted, count, asked, end),
("fail", kind, key, asked, refused), ("state", connected, error, since),
("holds", snapshot, seq)."""

# GCRA in integer microseconds of the server's clock (TIME), so that hosts whose clocks
# disagree still share one schedule. Grants up to ARGV[3] tokens; when none, the wait.
_RATE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or 0)
if tat < now then tat = now end
local grant = math.min(tonumber(ARGV[3]), math.floor((now + burst * interval - tat) / interval))
if grant < 1 then
  return {0, math.ceil(tat + interval - burst * interval - now)}
end
tat = math.ceil(tat + grant * interval)
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
return {grant, 0}
"""

# Count up to the cap, never past it: grants min(want, cap - used) and returns the new count.
_CAP_LUA = """
local used = tonumber(redis.call('GET', KEYS[1]) or 0)
local grant = math.min(tonumber(ARGV[1]), tonumber(ARGV[2]) - used)
if grant > 0 then used = redis.call('INCRBY', KEYS[1], grant) else grant = 0 end
if used > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return {grant, used}
"""

# Holds: a hash of JSON values and a sorted set by expiry; both keys expire with the last hold.
_HOLD_SET_LUA = """
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], last[2])
redis.call('PEXPIREAT', KEYS[2], last[2])
return 1
"""
_HOLD_DROP_LUA = """
redis.call('ZREM', KEYS[1], ARGV[1])
return redis.call('HDEL', KEYS[2], ARGV[1])
"""
_HOLDS_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for i = 1, #gone do redis.call('HDEL', KEYS[2], gone[i]) end
if #gone > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now) end
return redis.call('HGETALL', KEYS[2])
"""

_BACKOFF_MIN = 0.1
_BACKOFF_MAX = 5.0
_REMIND = 60.0
"""Seconds between reminders that Redis is still unreachable (the first failure logs at once)."""
_UNCAPPED = 2**50
_FAILURES = (redis.RedisError, OSError)


class RedisLink:
    """Run every Redis command in one thread; submit() never blocks, answers come by fileno()."""

    def __init__(self, node: str, prefix: str, timeout: float, refresh: float = 1.0) -> None:
        self.node = node
        self.shown = mask_url(node)
        self.prefix = prefix
        self.refresh = refresh
        parts = urlsplit(node)
        secret = parts.password or parse_qs(parts.query).get("password", [""])[0]
        self._secret = unquote(secret) if secret else None
        # redis-py would retry on its own; a retry here only delays the fall-back to local limits.
        self.client = redis.Redis.from_url(
            node,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
            client_name="kumopy",
        )
        self._rate = self.client.register_script(_RATE_LUA)
        self._cap = self.client.register_script(_CAP_LUA)
        self._hold_set = self.client.register_script(_HOLD_SET_LUA)
        self._hold_drop = self.client.register_script(_HOLD_DROP_LUA)
        self._holds = self.client.register_script(_HOLDS_LUA)
        self._requests: queue.SimpleQueue[Request | None] = queue.SimpleQueue()
        self._answers: collections.deque[Answer] = collections.deque()
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        self._connected = False
        self._since: float | None = None
        self._error: str | None = None
        self._reminded = 0.0
        self._refused_at = 0.0
        self._pending_holds: dict[str, tuple[int, Request]] = {}
        """Hold writes not in Redis yet (kept while it is unreachable), by hold key."""
        self._applied = 0
        """The last hold write done (the loop keeps later ones over the snapshot it gets)."""
        self._sent: tuple[Any, int] | None = None
        self._thread = threading.Thread(target=self._run, name="kumopy-redis", daemon=True)
        self._thread.start()

    # -- the coordinator's side ---------------------------------------------------------------

    def submit(self, request: Request) -> None:
        """Queue a request for the thread (never blocks)."""
        self._requests.put(request)

    def fileno(self) -> int:
        """Return the descriptor that becomes readable when take() has answers."""
        return self._rfd

    def take(self) -> list[Answer]:
        """Return the answers that arrived (never blocks)."""
        # Empty the pipe first: an answer added after this still leaves a byte to wake on.
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._rfd, 4096):
                pass
        out = []
        answers = self._answers
        while answers:
            out.append(answers.popleft())
        return out

    def close(self) -> None:
        """Stop the thread, close the connection and the pipe (idempotent)."""
        if self._thread.is_alive():
            self._requests.put(None)
            self._thread.join(timeout=10.0)
        with contextlib.suppress(Exception):
            self.client.close()
        if self._thread.is_alive():
            return  # stuck in a call: leave the pipe open, so its write never hits a reused fd
        for fd in (self._rfd, self._wfd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._rfd = self._wfd = -1

    # -- the thread -----------------------------------------------------------------------------

    def _answer(self, answer: Answer) -> None:
        self._answers.append(answer)
        with contextlib.suppress(BlockingIOError, OSError):  # full: a wake-up is pending anyway
            os.write(self._wfd, b"!")

    def _run(self) -> None:
        backoff = _BACKOFF_MIN
        retry_at = 0.0
        refresh_at = 0.0
        while True:
            now = time.monotonic()
            wake = refresh_at if self._connected else retry_at
            try:
                first = self._requests.get(timeout=max(0.0, wake - now))
            except queue.Empty:
                first = ()
            batch = [first]
            with contextlib.suppress(queue.Empty):
                while len(batch) < 4096:
                    batch.append(self._requests.get_nowait())
            if None in batch:
                return
            work = [r for r in batch if r]
            try:
                if not self._connected:
                    if time.monotonic() < retry_at:
                        self._unreachable(work)
                        continue
                    self.client.ping()
                    self._up()
                    backoff = _BACKOFF_MIN
                self._execute(work)
                work = []  # answered: a failure below must not answer them again
                if time.monotonic() >= refresh_at:
                    self._refresh()
                    refresh_at = time.monotonic() + self.refresh
            except _FAILURES as exc:
                self._down(exc, work)
                retry_at = time.monotonic() + backoff * random.uniform(0.8, 1.2)
                backoff = min(backoff * 2, _BACKOFF_MAX)
            except Exception as exc:  # a bug must not stop the limits: fall back, log, go on
                log.exception("Redis throttles: unexpected failure")
                self._down(exc, work)
                retry_at = time.monotonic() + _BACKOFF_MAX

    def _unreachable(self, work: list[Request]) -> None:
        """Answer requests at once while Redis is down; keep hold writes for later."""
        for request in work:
            self._fail(request)

    def _fail(self, request: Request, refused: bool = False) -> None:
        kind = request[0]
        if kind == "hold":
            self._pending_holds[request[2]] = (request[1], request)
        elif kind in ("rate", "cap"):
            asked = request[5 if kind == "rate" else 6]
            self._answer(("fail", kind, request[1], asked, refused))

    def _error_text(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}"
        return text.replace(self._secret, "***") if self._secret else text

    def _down(self, exc: BaseException, work: list[Request]) -> None:
        with contextlib.suppress(Exception):
            self.client.connection_pool.disconnect()
        error = self._error_text(exc)
        now = time.time()
        if self._connected or self._since is None:
            self._since = self._reminded = now
            log.warning(
                "Redis throttles: %s unreachable (%s); sending under local limits until it is back",
                self.shown,
                error,
            )
        elif now - self._reminded >= _REMIND:
            self._reminded = now
            log.warning(
                "Redis throttles: %s still unreachable after %.0fs (%s); local limits apply",
                self.shown,
                now - self._since,
                error,
            )
        if self._connected or error != self._error:  # a new fact for status, not every retry
            self._answer(("state", False, error, self._since))
        self._connected = False
        self._error = error
        for request in work:
            self._fail(request)

    def _up(self) -> None:
        if self._since is not None:
            log.warning(
                "Redis throttles: %s is back after %.0fs; limits are shared again",
                self.shown,
                time.time() - self._since,
            )
        else:
            log.info("Redis throttles: connected to %s", self.shown)
        self._connected = True
        self._since = self._error = None
        self._answer(("state", True, None, None))
        self._execute([request for _, request in sorted(self._pending_holds.values())])
        self._pending_holds.clear()  # after: if that failed, they are written next time

    def _execute(self, work: list[Request], load: bool = True) -> None:
        """Run a batch of requests in one pipeline (one round trip) and answer each."""
        if not work:
            return
        pipe = self.client.pipeline(transaction=False)
        for request in work:
            script, keys, args = self._command(request)
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        results = pipe.execute(raise_on_error=False)
        unknown = [r for r, x in zip(work, results, strict=True) if isinstance(x, NoScriptError)]
        if unknown and load:  # a restarted Redis forgot the scripts: load them, run those again
            for script in (self._rate, self._cap, self._hold_set, self._hold_drop):
                script.sha = self.client.script_load(script.script)
            self._execute(unknown, load=False)
        for request, result in zip(work, results, strict=True):
            kind = request[0]
            if isinstance(result, Exception):
                if not (load and isinstance(result, NoScriptError)):
                    self._refused(request, result)
            elif kind == "rate":
                granted, retry_us = result
                self._answer(("rate", request[1], int(granted), retry_us / 1e6, request[5]))
            elif kind == "cap":
                granted, count = result
                answer = ("cap", request[1], request[2], int(granted), int(count), *request[6:])
                self._answer(answer)
            elif kind == "hold":
                self._applied = max(self._applied, request[1])

    def _command(self, request: Request) -> tuple[Script, list[str], list[Any]]:
        """Return the script, keys and arguments that carry out one request."""
        p = self.prefix
        kind = request[0]
        if kind == "rate":
            _, key, interval, burst, want, _ = request
            return self._rate, [f"{p}rate:{key}"], [interval, burst, want]
        if kind == "cap":
            _, key, index, cap, want, ttl, _, _ = request
            return self._cap, [f"{p}cap:{key}:{index}"], [want, cap, ttl]
        if kind == "add":
            _, key, index, n, ttl = request
            return self._cap, [f"{p}cap:{key}:{index}"], [n, _UNCAPPED, ttl]
        _, _, key, until, data = request
        keys = [f"{p}holds:expiry", f"{p}holds:data"]
        if until is None:
            return self._hold_drop, keys, [key]
        value = json.dumps([until, data], default=str)
        return self._hold_set, keys, [key, int(until * 1000), value]

    def _refused(self, request: Request, exc: Exception) -> None:
        """Redis answered one command with an error (OOM, READONLY, WRONGTYPE): that one fails."""
        if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
            raise exc
        if time.time() - self._refused_at >= _REMIND:
            self._refused_at = time.time()
            log.warning(
                "Redis throttles: %s refused a %s request (%s); that key uses local limits",
                self.shown,
                request[0],
                self._error_text(exc),
            )
        if request[0] == "hold":  # dropped: Redis would refuse it again
            self._applied = max(self._applied, request[1])
        elif request[0] in ("rate", "cap"):
            self._fail(request, refused=True)

    def _refresh(self) -> None:
        """Read the shared holds (expired ones are removed by the script) and pass them on."""
        p = self.prefix
        try:
            flat = self._holds(keys=[f"{p}holds:expiry", f"{p}holds:data"])
        except redis.ResponseError as exc:  # e.g. WRONGTYPE: the holds stay as they were
            self._refused(("holds", 0), exc)
            return
        snapshot: dict[str, tuple[float, dict[str, Any]]] = {}
        for key, value in zip(flat[::2], flat[1::2], strict=True):
            with contextlib.suppress(ValueError, TypeError):
                until, data = json.loads(value)
                snapshot[key] = (float(until), data if isinstance(data, dict) else {})
        if (snapshot, self._applied) != self._sent:
            self._sent = (snapshot, self._applied)
            self._answer(("holds", snapshot, self._applied))
