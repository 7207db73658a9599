"""Limits shared through Redis: two limiters as two coordinators, a real redis-server, outages."""

from __future__ import annotations

import logging
import select
import signal
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kumopy.coordinator import redis_limits
from kumopy.coordinator.limits import Limiter
from kumopy.coordinator.redis_limits import RedisLimiter, make_limiter
from kumopy.errors import ConfigError
from kumopy.policy import load_policy
from kumopy.rates import parse_rate, parse_warmup
from kumopy.redis_config import mask_url
from tests.redis_server import REDIS_SERVER, RedisServer, free_port

needs_redis = pytest.mark.skipif(
    REDIS_SERVER is None, reason="redis-server is not installed (apt-get install redis-server)"
)
LINK_LOG = "kumopy.coordinator.redis_link"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """Give the module's shared-limit tests one redis-server (each test uses its own prefix)."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    srv = RedisServer(tmp_path_factory.mktemp("redis"))
    srv.start()
    try:
        yield srv
    finally:
        srv.kill()


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[RedisServer]:
    """Give one test a redis-server of its own, to kill and restart."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    srv = RedisServer(tmp_path)
    srv.start()
    try:
        yield srv
    finally:
        srv.kill()


MakeLimiter = Callable[..., RedisLimiter]


@pytest.fixture
def limiters() -> Iterator[MakeLimiter]:
    """Make RedisLimiters that are closed after the test."""
    made: list[RedisLimiter] = []

    def make(node: str, **options: Any) -> RedisLimiter:
        limiter = RedisLimiter(node, **options)
        made.append(limiter)
        return limiter

    yield make
    for limiter in made:
        limiter.close()


def pump(*limiters: RedisLimiter, timeout: float = 0.005) -> bool:
    """Wait for answers as the coordinator's loop does, and collect them."""
    fds = [fd for fd in (lim.fileno() for lim in limiters) if fd is not None]
    select.select(fds, [], [], timeout)
    return any([lim.collect() for lim in limiters])


def until(
    cond: Callable[[], bool], *limiters: RedisLimiter, what: str, limit: float = 15.0
) -> None:
    """Pump the limiters until cond() holds; fail after `limit` seconds."""
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        pump(*limiters, timeout=0.02)


def prefix() -> str:
    """Return a prefix of keys of their own for one test."""
    return "t" + uuid.uuid4().hex[:12]


def connected(*limiters: RedisLimiter) -> Callable[[], bool]:
    """Return a condition: every limiter says it is connected."""
    return lambda: all(lim.status()["connected"] for lim in limiters)


@pytest.mark.integration
def test_two_coordinators_never_exceed_one_rate(server: RedisServer, limiters: MakeLimiter) -> None:
    name = prefix()
    a, b = limiters(server.url, prefix=name), limiters(server.url, prefix=name)
    until(connected(a, b), a, b, what="both connected")
    rate = parse_rate("100/s")
    counts = [0, 0]
    start = time.monotonic()
    while time.monotonic() - start < 2.0:
        pump(a, b)
        for i, lim in enumerate((a, b)):
            while lim.rate("path:ip-1>gmail", rate, time.monotonic()) == 0.0:
                counts[i] += 1
    elapsed = time.monotonic() - start
    total = sum(counts)
    # A fresh key allows its burst at once, then the rate: together, never more.
    assert total <= rate.burst + rate.per_second * elapsed + 1, counts
    assert total >= 0.8 * rate.per_second * elapsed, counts  # and close to all of it
    assert min(counts) > 0, counts
    assert server.client().exists(f"kumopy:{name}:rate:path:ip-1>gmail")


@pytest.mark.integration
def test_two_coordinators_share_a_warmup_cap_per_window(
    server: RedisServer, limiters: MakeLimiter
) -> None:
    name = prefix()
    a, b = limiters(server.url, prefix=name), limiters(server.url, prefix=name)
    until(connected(a, b), a, b, what="both connected")
    warmup = parse_warmup({"start": time.time(), "daily": [50, 50, 50], "period": 2})
    counts = [[0, 0] for _ in range(3)]  # by window, by limiter
    used = None
    while (index := warmup.window(time.time())[0]) < 2:
        pump(a, b)
        waits = []
        for i, lim in enumerate((a, b)):
            while (wait := lim.cap("source:ip-1", warmup, now := time.time())) == 0.0:
                counts[warmup.window(now)[0]][i] += 1
            waits.append(wait)
        if index == 1 and used is None and min(waits) > 0.1:  # both told to wait for window 2
            used = (
                a.used("source:ip-1", warmup, time.time()),
                b.used("source:ip-1", warmup, time.time()),
            )
    assert [sum(window) for window in counts[:2]] == [50, 50], counts  # the cap, then reset
    assert all(min(window) > 0 for window in counts[:2]), counts
    assert used == (50, 50)


@pytest.mark.integration
def test_holds_are_shared(server: RedisServer, limiters: MakeLimiter) -> None:
    name = prefix()
    a = limiters(server.url, prefix=name, refresh=0.2)
    b = limiters(server.url, prefix=name, refresh=0.2)
    until(connected(a, b), a, b, what="both connected")
    until_at = time.time() + 60
    a.share_hold("source:ip-1", until_at, {"reason": "421 too many connections"})
    assert "source:ip-1" in a.shared_holds()  # at once where it was made
    until(lambda: "source:ip-1" in b.shared_holds(), a, b, what="the hold to reach b")
    seen_until, data = b.shared_holds()["source:ip-1"]
    assert seen_until == pytest.approx(until_at, abs=0.01)
    assert data == {"reason": "421 too many connections"}
    ttl = server.client().pttl(f"kumopy:{name}:holds:data")
    assert 0 < ttl <= 61_000  # gone from Redis by itself after the last hold
    b.share_hold("site:gmail", time.time() + 1.0, {})
    until(lambda: "site:gmail" in a.shared_holds(), a, b, what="b's short hold to reach a")
    until(lambda: "site:gmail" not in a.shared_holds(), a, b, what="the short hold to expire")
    a.drop_hold("source:ip-1")
    until(lambda: not b.shared_holds(), a, b, what="the dropped hold to leave b")


@pytest.mark.integration
def test_local_rates_are_not_shared(server: RedisServer, limiters: MakeLimiter) -> None:
    name = prefix()
    a, b = limiters(server.url, prefix=name), limiters(server.url, prefix=name)
    until(connected(a, b), a, b, what="both connected")
    rate = parse_rate("local:5/s")
    now = time.monotonic()
    for lim in (a, b):
        assert [lim.rate("path:x", rate, now) for _ in range(5)] == [0.0] * 5  # each its own
        assert lim.rate("path:x", rate, now) > 0
    assert server.client().keys(f"kumopy:{name}:*") == []


@pytest.mark.integration
def test_redis_lost_and_back(
    own_server: RedisServer, limiters: MakeLimiter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LINK_LOG)
    a, b = limiters(own_server.url), limiters(own_server.url)
    until(connected(a, b), a, b, what="both connected")
    rate = parse_rate("5/h")  # no refill during the test: the local bucket is exactly its burst
    until(lambda: a.rate("path:one", rate, time.monotonic()) == 0.0, a, what="a shared token")
    own_server.kill()

    def local_and_sending(lim: RedisLimiter) -> Callable[[], bool]:
        return lambda: lim.rate("path:two", rate, time.monotonic()) == 0.0

    for lim in (a, b):  # nothing stops: the first check after the loss already sends locally
        until(local_and_sending(lim), a, b, what="sending under local limits", limit=5.0)
    until(lambda: not any(lim.status()["connected"] for lim in (a, b)), a, b, what="both down")
    for lim in (a, b):
        status = lim.status()
        assert status["mode"] == "redis" and status["node"] == own_server.url
        assert status["error"] and status["failing_since"] is not None
        now = time.monotonic()  # the local bucket: its burst of 5 (one taken above), then waits
        assert [lim.rate("path:two", rate, now) for _ in range(4)] == [0.0] * 4
        assert lim.rate("path:two", rate, now) > 0
    lost = [r for r in caplog.records if "unreachable (" in r.getMessage()]
    assert [r.levelno for r in lost] == [logging.WARNING] * 2  # once for each limiter
    own_server.start()
    until(connected(a, b), a, b, what="both connected again")
    assert a.status()["error"] is None
    back = [r for r in caplog.records if "is back after" in r.getMessage()]
    assert len(back) == 2
    leased = a.status()["tokens_leased"]
    until(lambda: a.rate("path:three", rate, time.monotonic()) == 0.0, a, what="a lease again")
    assert a.status()["tokens_leased"] > leased
    assert own_server.client().exists("kumopy:rate:path:three")
    assert len([r for r in caplog.records if "unreachable (" in r.getMessage()]) == 2


@pytest.mark.integration
def test_a_hung_redis_times_out_and_checks_never_wait(
    own_server: RedisServer, limiters: MakeLimiter
) -> None:
    lim = limiters(own_server.url, timeout=0.3)
    until(connected(lim), lim, what="connected")
    assert own_server.proc is not None
    own_server.proc.send_signal(signal.SIGSTOP)  # accepts connections, answers nothing
    try:
        rate = parse_rate("5/h")
        slowest = 0.0
        deadline = time.monotonic() + 10
        while lim.status()["connected"] or lim.status()["error"] is None:
            assert time.monotonic() < deadline, "never noticed the hang"
            pump(lim)
            start = time.perf_counter()
            lim.rate("path:hung", rate, time.monotonic())
            slowest = max(slowest, time.perf_counter() - start)
        assert "Timeout" in lim.status()["error"]
        assert slowest < 0.01  # the check never waited on Redis (its timeout is 0.3 s)
        now = time.monotonic()
        assert [lim.rate("path:hung", rate, now) for _ in range(6)][-1] > 0  # local: 5, then no
    finally:
        own_server.proc.send_signal(signal.SIGCONT)
    until(connected(lim), lim, what="connected again")


# -- without a server -------------------------------------------------------------------------


def test_unreachable_from_the_start_sends_under_local_limits(
    limiters: MakeLimiter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LINK_LOG)
    port = free_port()  # nothing listens: refused at once
    lim = limiters(f"redis://user:s3cret@127.0.0.1:{port}/0", timeout=0.5)
    until(lambda: lim.status()["error"] is not None, lim, what="the refusal")
    status = lim.status()
    assert status["connected"] is False and status["node"].startswith("redis://user:***@")
    rate = parse_rate("3/h")
    now = time.monotonic()
    assert [lim.rate("path:x", rate, now) for _ in range(4)][-1] > 0  # the local bucket
    warmup = parse_warmup({"start": time.time() - 1, "daily": [2]})
    assert [lim.cap("source:x", warmup, time.time()) > 0 for _ in range(3)] == [False] * 2 + [True]
    assert lim.used("source:x", warmup, time.time()) == 2
    assert "s3cret" not in caplog.text and "s3cret" not in repr(status)
    assert len(caplog.records) == 1 and "unreachable" in caplog.records[0].getMessage()


def test_make_limiter_follows_the_policy() -> None:
    plain = make_limiter({})
    assert type(plain) is Limiter and plain.fileno() is None
    node = f"redis://127.0.0.1:{free_port()}"
    shared = make_limiter({"redis_throttles": {"node": node, "prefix": "east", "timeout": 0.5}})
    try:
        assert isinstance(shared, RedisLimiter) and shared.prefix == "kumopy:east:"
        assert isinstance(shared.fileno(), int)
    finally:
        shared.close()
    assert shared.fileno() is None


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
        ("redis://:hunter2@10.0.0.5:6379/1", "redis://:***@10.0.0.5:6379/1"),
        ("rediss://kumo:p%40ss@redis.example:6380", "rediss://kumo:***@redis.example:6380"),
        (
            "unix:///run/redis.sock?password=hunter2&db=2",
            "unix:///run/redis.sock?password=***&db=2",
        ),
        ("redis://[::1", "<a URL that cannot be parsed>"),
    ],
)
def test_passwords_are_masked(url: str, shown: str) -> None:
    assert mask_url(url) == shown


def policy(tmp_path: Path, body: str) -> Path:
    """Write a policy file and return its path."""
    path = tmp_path / "policy.py"
    path.write_text("from kumopy import kumo\n" + textwrap.dedent(body))
    return path


@pytest.mark.parametrize(
    ("call", "settings"),
    [
        ('node="redis://127.0.0.1:6379"', {"node": "redis://127.0.0.1:6379", "prefix": None}),
        (
            '{"node": "unix:///run/redis.sock", "prefix": "east", "timeout": "250ms"}',
            {"node": "unix:///run/redis.sock", "prefix": "east", "timeout": 0.25},
        ),
        ('node="rediss://u:pw@r.example:6380/2", timeout=2', {"timeout": 2.0}),
    ],
)
def test_configure_redis_throttles(tmp_path: Path, call: str, settings: dict[str, Any]) -> None:
    loaded = load_policy(policy(tmp_path, f"kumo.configure_redis_throttles({call})\n"))
    got = loaded.settings["redis_throttles"]
    assert {k: got[k] for k in settings} == settings
    assert got["timeout"] > 0


@pytest.mark.parametrize(
    ("call", "problem"),
    [
        ('node="http://127.0.0.1:6379"', "must be a URL like"),
        ('node="redis://:hunter2@"', "names no host"),
        ('node="redis://127.0.0.1:99999"', "out of range"),
        ('node="unix://"', "names no socket path"),
        ('node="redis://h/zero"', "the database 'zero' must be a number"),
        ('node=["redis://a", "redis://b"]', "one URL (kumopy uses one Redis node), not a list"),
        ("node=6379", "not an integer"),
        ("", "node must be a URL like"),
        ('node="redis://h", cluster=True', "unknown option 'cluster'"),
        ('node="redis://h", prefix="a b"', "prefix must be a name"),
        ('node="redis://h", timeout="0s"', "timeout must be longer than zero"),
    ],
)
def test_configure_redis_throttles_says_what_is_wrong(
    tmp_path: Path, call: str, problem: str
) -> None:
    path = policy(tmp_path, f"\nkumo.configure_redis_throttles({call})\n")
    with pytest.raises(ConfigError) as exc:
        load_policy(path)
    text = str(exc.value)
    assert f"{path}:3: configure_redis_throttles" in text and problem in text
    assert "hunter2" not in text


# -- the loop's side, with answers made up -------------------------------------------------------


class FakeLink:
    """Stands in for RedisLink: keeps requests, hands out answers a test puts in."""

    def __init__(self, node: str, prefix: str, timeout: float, refresh: float) -> None:
        self.shown = mask_url(node)
        self.requests: list[tuple[Any, ...]] = []
        self.answers: list[tuple[Any, ...]] = []

    def submit(self, request: tuple[Any, ...]) -> None:
        self.requests.append(request)

    def fileno(self) -> int:
        return 0

    def take(self) -> list[tuple[Any, ...]]:
        out, self.answers = self.answers, []
        return out

    def close(self) -> None:
        pass


@pytest.fixture
def faked(monkeypatch: pytest.MonkeyPatch) -> tuple[RedisLimiter, FakeLink]:
    """Return a RedisLimiter whose Redis side is a FakeLink."""
    monkeypatch.setattr(redis_limits, "RedisLink", FakeLink)
    lim = RedisLimiter("redis://127.0.0.1:1")
    link = lim._link
    assert isinstance(link, FakeLink)
    return lim, link


def test_leased_tokens_are_dropped_when_unused(faked: tuple[RedisLimiter, FakeLink]) -> None:
    lim, link = faked
    rate = parse_rate("100/s")
    assert lim.rate("k", rate, 100.0) == pytest.approx(0.02)  # asked; wait for the answer
    assert lim.rate("k", rate, 100.001) == pytest.approx(0.02)  # one request in flight
    assert [r[:5] for r in link.requests] == [("rate", "k", 10_000.0, 100, 10)]
    link.answers.append(("rate", "k", 10, 0.0, 100.0))
    assert lim.collect() is True
    assert [lim.rate("k", rate, 100.5) for _ in range(3)] == [0.0] * 3
    assert lim.rate("k", rate, 101.01) == pytest.approx(0.02)  # a second on: dropped, ask again
    assert lim.status()["tokens_dropped"] == 7 and len(link.requests) == 2
    link.answers.append(("rate", "k", 0, 0.25, 101.01))
    assert lim.collect() is False
    assert lim.rate("k", rate, 101.11) == pytest.approx(0.15)  # Redis said when


def test_an_outage_goes_on_from_the_shared_count(faked: tuple[RedisLimiter, FakeLink]) -> None:
    lim, link = faked
    warmup = parse_warmup({"start": 0, "daily": [50], "period": 1000})
    lim.cap("source:a", warmup, 10.0)
    link.answers.append(("cap", "source:a", 0, 1, 45, 10.0, 1000.0))  # 44 sent by others
    lim.collect()
    assert lim.cap("source:a", warmup, 11.0) == 0.0 and lim.used("source:a", warmup, 11.0) == 45
    link.answers.append(("state", False, "ConnectionError: gone", 12.0))
    assert lim.collect() is True
    sent = [lim.cap("source:a", warmup, 13.0) for _ in range(6)]
    assert sent == [0.0] * 5 + [pytest.approx(987.0)]  # the 5 left of 50, then the window's end
    link.answers.append(("state", True, None, None))
    assert lim.collect() is True
    assert link.requests[-1][:4] == ("add", "source:a", 0, 5)  # told to everyone
    assert lim.status()["connected"] is True and lim.status()["error"] is None


def test_no_cap_past_the_warmup_asks_nothing(faked: tuple[RedisLimiter, FakeLink]) -> None:
    lim, link = faked
    warmup = parse_warmup({"start": 0, "daily": [50], "period": 1000})
    assert [lim.cap("source:a", warmup, 5000.0) for _ in range(3)] == [0.0] * 3
    assert lim.used("source:a", warmup, 5001.0) == 3 and link.requests == []
    assert lim.status()["leases"]["cap"] == 0 and lim.status()["tokens_dropped"] == 0
    assert lim.cap("source:b", warmup, -5.0) == pytest.approx(5.0)  # not begun: held
    assert link.requests == []


def test_counts_of_an_outage_are_told_once(faked: tuple[RedisLimiter, FakeLink]) -> None:
    lim, link = faked
    warmup = parse_warmup({"start": 0, "daily": [50, 50], "period": 1000})
    for connected_now in (False, True, False, True):  # two outages
        link.answers.append(("state", connected_now, None if connected_now else "down", 1.0))
        lim.collect()
        if not connected_now:
            assert lim.cap("source:new", warmup, 1500.0) == 0.0  # first seen while down
    adds = [r[:4] for r in link.requests if r[0] == "add"]
    assert adds == [("add", "source:new", 1, 1), ("add", "source:new", 1, 1)]  # one each time
