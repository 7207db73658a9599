"""kumopy.dns, dns_cache and dns_thread against kumopy.fakedns on loopback, never the system DNS."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest
import zmq

from kumopy.dns import (
    MXResolver,
    Resolution,
    ResolverConfig,
    normalize_domain,
    parse_name_server,
)
from kumopy.dns_cache import TTLCache
from kumopy.dns_process import Lookup, ResolverProcess
from kumopy.errors import (
    BadDomainError,
    DNSUnavailableError,
    DomainNotFoundError,
    NoAddressError,
    NullMXError,
    ResolverConfigError,
)
from kumopy.fakedns import FakeDNS
from kumopy.harness import wait_for


class Clock:
    """A monotonic clock the test moves by hand, so TTLs expire without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake() -> Iterator[FakeDNS]:
    with FakeDNS() as server:
        yield server


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def resolver(fake: FakeDNS, clock: Clock) -> MXResolver:
    return MXResolver(ResolverConfig(name_servers=(fake.address,), timeout=2.0), clock=clock)


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A UDP port that is bound (so no ICMP refusal comes back) but never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def resolve(resolver: MXResolver, domain: str) -> Resolution:
    return asyncio.run(resolver.resolve(domain))


def two_mx(fake: FakeDNS, domain: str, ttl: int = 300) -> None:
    fake.add(domain, "MX", "10 mx1.shared.test.", ttl)
    fake.add(domain, "MX", "20 mx2.shared.test.", ttl)


# -- answers -----------------------------------------------------------------------------------


def test_hosts_come_by_preference_with_equal_preferences_together(
    fake: FakeDNS, resolver: MXResolver
) -> None:
    for text in (
        "30 c.example.test.",
        "10 b.example.test.",
        "20 d.example.test.",
        "10 a.example.test.",
    ):
        fake.add("example.test", "MX", text)
    for host, addr in (("a", "127.0.0.1"), ("b", "127.0.0.2"), ("c", "127.0.0.3"), ("d", "::4")):
        fake.add(f"{host}.example.test", "AAAA" if ":" in addr else "A", addr)
    fake.add("a.example.test", "AAAA", "::1")
    res = resolve(resolver, "example.test")
    assert res.error is None and not res.implicit
    assert [(h.name, h.preference) for h in res.hosts] == [
        ("a.example.test", 10),
        ("b.example.test", 10),
        ("d.example.test", 20),
        ("c.example.test", 30),
    ]
    assert res.hosts[0].addresses == ("127.0.0.1", "::1")  # both families of one host
    assert [[h.name for h in g] for g in res.groups()] == [
        ["a.example.test", "b.example.test"],
        ["d.example.test"],
        ["c.example.test"],
    ]
    assert res.families == frozenset({"ipv4", "ipv6"})
    # The site names the hosts in preference order, equal preferences joined by "|".
    assert res.site == "a.example.test|b.example.test,d.example.test,c.example.test"


def test_no_mx_record_means_the_domains_own_addresses(fake: FakeDNS, resolver: MXResolver) -> None:
    fake.add("implicit.test", "A", "127.0.0.7")
    fake.add("implicit.test", "AAAA", "::7")
    fake.add("implicit.test", "TXT", '"v=spf1 -all"')
    res = resolve(resolver, "implicit.test")
    assert res.error is None and res.implicit
    assert [(h.name, h.preference, h.addresses) for h in res.hosts] == [
        ("implicit.test", 0, ("127.0.0.7", "::7"))
    ]
    assert res.site == "implicit.test"
    assert fake.queries[("implicit.test.", "MX")] == 1  # NODATA, then A and AAAA


def test_no_mx_and_no_address_is_permanent(fake: FakeDNS, resolver: MXResolver) -> None:
    fake.add("textonly.test", "TXT", '"hello"')
    res = resolve(resolver, "textonly.test")
    assert isinstance(res.error, NoAddressError) and not res.error.transient
    assert str(res.error) == (
        "550 5.4.4 textonly.test has no MX record and no usable address (no A or AAAA record)"
    )


def test_null_mx_is_permanent(fake: FakeDNS, resolver: MXResolver) -> None:
    fake.add("null.test", "MX", "0 .")
    res = resolve(resolver, "null.test")
    assert isinstance(res.error, NullMXError) and not res.error.transient and not res.hosts
    assert str(res.error) == "556 5.1.10 null.test accepts no mail (RFC 7505 null MX)"
    assert (
        res.error.to_dict() | {"smtp_code": 556, "enhanced_code": "5.1.10"} == res.error.to_dict()
    )


def test_a_null_mx_next_to_real_ones_is_ignored(fake: FakeDNS, resolver: MXResolver) -> None:
    for text in ("0 .", "10 mx.mixed.test.", "20 mx.mixed.test."):
        fake.add("mixed.test", "MX", text)
    fake.add("mx.mixed.test", "A", "127.0.0.1")
    res = resolve(resolver, "mixed.test")
    assert [(h.name, h.preference) for h in res.hosts] == [("mx.mixed.test", 10)]
    assert res.notes == ("a null MX '0 .' next to real MX records was ignored",)


def test_nxdomain_is_permanent(fake: FakeDNS, resolver: MXResolver) -> None:
    res = resolve(resolver, "nowhere.test")
    assert isinstance(res.error, DomainNotFoundError) and not res.error.transient
    assert str(res.error).startswith("550 5.1.2 domain nowhere.test does not exist (NXDOMAIN")
    assert fake.address in str(res.error)


def test_servfail_is_transient_and_names_the_server(fake: FakeDNS, resolver: MXResolver) -> None:
    fake.set_rcode("broken.test", dns.rcode.SERVFAIL)
    res = resolve(resolver, "broken.test")
    assert isinstance(res.error, DNSUnavailableError) and res.error.transient
    assert str(res.error) == (
        f"451 4.4.3 cannot look up the MX records of broken.test: SERVFAIL from {fake.address}"
    )


def test_a_silent_server_times_out_quickly_and_transiently(silent_port: int) -> None:
    resolver = MXResolver(ResolverConfig(name_servers=(f"127.0.0.1:{silent_port}",), timeout=0.3))
    started = time.monotonic()
    res = resolve(resolver, "example.test")
    assert time.monotonic() - started < 2.0
    assert isinstance(res.error, DNSUnavailableError) and res.error.transient
    assert "timed out after 0.3s" in str(res.error)
    assert f"no answer in time from 127.0.0.1:{silent_port}" in str(res.error)
    problem = asyncio.run(resolver.check())
    assert problem is not None and problem.startswith("no DNS server answers (127.0.0.1:")


def test_an_mx_host_without_address_is_skipped(fake: FakeDNS, resolver: MXResolver) -> None:
    fake.add("partial.test", "MX", "10 ghost.partial.test.")
    fake.add("partial.test", "MX", "20 mx.partial.test.")
    fake.add("mx.partial.test", "A", "127.0.0.2")
    fake.add("ghost.partial.test", "TXT", '"no address here"')
    res = resolve(resolver, "partial.test")
    assert [h.name for h in res.hosts] == ["mx.partial.test"] and res.error is None
    assert res.notes == ("MX host ghost.partial.test skipped: no A or AAAA record",)
    assert res.site == "ghost.partial.test,mx.partial.test"  # the MX set, addresses or not


def test_no_mx_host_with_an_address_is_transient(fake: FakeDNS, resolver: MXResolver) -> None:
    fake.add("dangling.test", "MX", "10 gone.dangling.test.")
    res = resolve(resolver, "dangling.test")
    assert isinstance(res.error, NoAddressError) and res.error.transient
    assert str(res.error) == (
        "451 4.4.3 no MX host of dangling.test has an address: gone.dangling.test (NXDOMAIN)"
    )


def test_mx_host_behind_a_cname_is_followed(fake: FakeDNS, resolver: MXResolver) -> None:
    fake.add("alias.test", "MX", "10 mail.alias.test.")
    fake.add("mail.alias.test", "CNAME", "real.alias.test.")
    fake.add("real.alias.test", "A", "127.0.0.5")
    res = resolve(resolver, "alias.test")
    assert [(h.name, h.addresses) for h in res.hosts] == [("mail.alias.test", ("127.0.0.5",))]


def test_domains_with_the_same_mx_hosts_share_a_site_and_host_lookups(
    fake: FakeDNS, resolver: MXResolver
) -> None:
    two_mx(fake, "one.test")
    two_mx(fake, "two.test")
    fake.add("mx1.shared.test", "A", "127.0.0.1")
    fake.add("mx2.shared.test", "A", "127.0.0.2")

    async def both() -> list[Resolution]:
        return list(
            await asyncio.gather(resolver.resolve("one.test"), resolver.resolve("two.test"))
        )

    one, two = asyncio.run(both())
    assert one.site == two.site == "mx1.shared.test,mx2.shared.test"
    assert fake.queries[("mx1.shared.test.", "A")] == 1  # the second domain reused it


def test_a_unicode_domain_is_resolved_through_its_a_label(
    fake: FakeDNS, resolver: MXResolver
) -> None:
    fake.add("xn--bcher-kva.test", "MX", "10 mx.xn--bcher-kva.test.")
    fake.add("mx.xn--bcher-kva.test", "A", "127.0.0.8")
    res = resolve(resolver, "Bücher.TEST.")
    assert res.domain == "xn--bcher-kva.test" == normalize_domain("bücher.test")
    assert res.hosts[0].addresses == ("127.0.0.8",)
    bad = resolve(resolver, "a..b")
    assert isinstance(bad.error, BadDomainError) and not bad.error.transient
    assert isinstance(resolve(resolver, "xn--.bad-\u2003.test").error, BadDomainError)


def test_an_answer_too_big_for_udp_is_asked_again_over_tcp(
    fake: FakeDNS, resolver: MXResolver
) -> None:
    for i in range(30):
        fake.add("big.test", "MX", f"10 mx{i:02}-with-a-rather-long-name.big.test.")
        fake.add(f"mx{i:02}-with-a-rather-long-name.big.test", "A", f"127.0.1.{i}")
    res = resolve(resolver, "big.test")
    assert len(res.hosts) == 30 and res.error is None
    assert fake.queries[("big.test.", "MX")] == 2  # truncated over UDP, then whole over TCP


def test_a_slow_domain_does_not_delay_the_others(fake: FakeDNS, resolver: MXResolver) -> None:
    for i in range(50):
        fake.add(f"slow{i}.test", "A", "127.0.0.1")
        fake.set_delay(f"slow{i}.test", 0.2)
    fake.add("fast.test", "A", "127.0.0.2")

    async def race() -> tuple[Resolution, int, list[Resolution]]:
        slow = [asyncio.ensure_future(resolver.resolve(f"slow{i}.test")) for i in range(50)]
        fast = await resolver.resolve("fast.test")
        finished = sum(t.done() for t in slow)
        return fast, finished, list(await asyncio.gather(*slow))

    fast, finished_first, slow = asyncio.run(race())
    assert fast.error is None and finished_first == 0
    assert all(r.error is None and r.hosts for r in slow)


# -- caching -----------------------------------------------------------------------------------


def test_answers_are_cached_for_their_smallest_ttl(
    fake: FakeDNS, resolver: MXResolver, clock: Clock
) -> None:
    fake.add("ttl.test", "MX", "10 mx.ttl.test.", ttl=60)
    fake.add("mx.ttl.test", "A", "127.0.0.1", ttl=20)
    first = resolve(resolver, "ttl.test")
    assert first.expires == clock.now + 20
    assert resolve(resolver, "ttl.test") is first and resolver.cached("TTL.test") is first
    clock.now += 19
    resolve(resolver, "ttl.test")
    assert fake.queries[("ttl.test.", "MX")] == 1
    clock.now += 2
    assert resolver.cached("ttl.test") is None
    resolve(resolver, "ttl.test")
    assert fake.queries[("ttl.test.", "MX")] == 2
    assert fake.queries[("mx.ttl.test.", "A")] == 2


def test_negative_answers_are_cached_for_the_soa_minimum(
    fake: FakeDNS, resolver: MXResolver, clock: Clock
) -> None:
    fake.soa_minimum = 30
    fake.add("textonly.test", "TXT", '"hello"')
    for domain in ("missing.test", "textonly.test"):
        assert resolve(resolver, domain).expires == clock.now + 30
    clock.now += 29
    resolve(resolver, "missing.test")
    resolve(resolver, "textonly.test")
    assert fake.queries[("missing.test.", "MX")] == fake.queries[("textonly.test.", "MX")] == 1
    clock.now += 2
    resolve(resolver, "missing.test")
    resolve(resolver, "textonly.test")
    assert fake.queries[("missing.test.", "MX")] == fake.queries[("textonly.test.", "MX")] == 2


def test_transient_failures_are_cached_briefly(
    fake: FakeDNS, resolver: MXResolver, clock: Clock
) -> None:
    fake.set_rcode("flaky.test", dns.rcode.SERVFAIL)
    fake.add("flaky.test", "A", "127.0.0.1")
    assert resolve(resolver, "flaky.test").error is not None
    assert resolve(resolver, "flaky.test").error is not None
    assert fake.queries[("flaky.test.", "MX")] == 1
    fake.set_rcode("flaky.test", None)
    clock.now += resolver.config.failure_ttl + 0.1
    assert resolve(resolver, "flaky.test").hosts[0].addresses == ("127.0.0.1",)


def test_concurrent_lookups_of_a_domain_share_one_query(
    fake: FakeDNS, resolver: MXResolver
) -> None:
    two_mx(fake, "herd.test")
    fake.add("mx1.shared.test", "A", "127.0.0.1")
    fake.set_delay("herd.test", 0.1)

    async def herd() -> list[Resolution]:
        return list(await asyncio.gather(*(resolver.resolve("herd.test") for _ in range(20))))

    results = asyncio.run(herd())
    assert len({id(r) for r in results}) == 1
    assert fake.queries[("herd.test.", "MX")] == 1


def test_the_cache_evicts_the_oldest_entry_when_full(clock: Clock) -> None:
    cache: TTLCache[str, int] = TTLCache(clock, max_entries=2)
    cache.put("a", 1, clock.now + 10)
    cache.put("b", 2, clock.now + 10)
    cache.put("c", 3, clock.now + 10)
    cache.put("zero-ttl", 4, clock.now)
    assert (cache.get("a"), cache.get("b"), cache.get("c"), cache.get("zero-ttl")) == (
        None,
        2,
        3,
        None,
    )


# -- the resolver process ----------------------------------------------------------------------


@pytest.mark.integration
def test_the_resolver_process_answers_through_a_pollable_fd(fake: FakeDNS) -> None:
    two_mx(fake, "proc.test")
    fake.add("mx1.shared.test", "A", "127.0.0.1")
    fake.set_delay("proc.test", 0.05)
    config = ResolverConfig(name_servers=(fake.address,), timeout=2.0)
    poller = zmq.Poller()
    got: list[Lookup] = []
    resolver = ResolverProcess(config)
    try:
        poller.register(resolver.fileno(), zmq.POLLIN)
        started = time.monotonic()
        resolver.submit("proc.test", sts=True)
        resolver.submit("nothing.test")
        assert time.monotonic() - started < 0.05  # submit never waits for DNS

        def drained() -> bool:
            if poller.poll(50):
                got.extend(resolver.drain())
            return len(got) == 2

        wait_for(drained, 10, "two lookups from the resolver process")
        assert resolver.drain() == [] and resolver.is_alive()
        by_domain = {r.domain: r for r in got}
        assert by_domain["proc.test"].resolution.site == "mx1.shared.test,mx2.shared.test"
        assert by_domain["proc.test"].sts is None  # asked, and the domain publishes none
        assert isinstance(by_domain["nothing.test"].resolution.error, DomainNotFoundError)
        # A dead resolver is restarted, and what it had not answered is asked again.
        fake.set_delay("late.test", 0.5)
        fake.add("late.test", "A", "127.0.0.1")
        resolver.submit("late.test")
        assert resolver._proc is not None
        resolver._proc.kill()
        wait_for(
            lambda: [x for x in resolver.drain() if x.domain == "late.test"] or None,
            20,
            "a restart",
        )
    finally:
        resolver.close()
    assert not resolver.is_alive()


# -- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("::1", ("::1", 53)),
        ("[::1]", ("::1", 53)),
        ("[2001:db8::1]:5300", ("2001:db8::1", 5300)),
    ],
)
def test_name_servers_parse(entry: str, expected: tuple[str, int]) -> None:
    assert parse_name_server(entry) == expected


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("dns.example.test", "is not an IP address"),
        ("127.0.0.1:", "the port after ':' is missing"),
        ("127.0.0.1:99999", "port '99999' is not 1 to 65535"),
        ("127.0.0.1:x", "port 'x' is not 1 to 65535"),
        ("[::1", "write an IPv6 address and port as"),
        ("[::1]5353", "write an IPv6 address and port as"),
        ("", "is not an IP address"),
    ],
)
def test_bad_name_servers_are_named(entry: str, message: str) -> None:
    with pytest.raises(
        ValueError, match=re.escape(f"name server {entry!r}: ") + ".*" + re.escape(message)
    ):
        ResolverConfig(name_servers=(entry,))


def test_bad_timeouts_are_refused() -> None:
    with pytest.raises(ValueError, match="timeout must be a positive"):
        ResolverConfig(timeout=0)
    with pytest.raises(ValueError, match="attempts must be at least 1"):
        ResolverConfig(attempts=0)


def test_an_unusable_resolv_conf_says_so(tmp_path: Path) -> None:
    empty = tmp_path / "resolv.conf"
    empty.write_text("# no nameserver line\n")
    for path in (empty, tmp_path / "missing.conf"):
        with pytest.raises(ResolverConfigError, match=f"cannot use {path} for DNS"):
            MXResolver(ResolverConfig(resolv_conf=str(path)))
    listed = tmp_path / "listed.conf"
    listed.write_text("nameserver 192.0.2.53\n")
    resolver = MXResolver(ResolverConfig(resolv_conf=str(listed)))
    assert resolver.servers == f"192.0.2.53 (from {listed})"


# -- the fake server itself --------------------------------------------------------------------


def test_fakedns_serves_ipv6_and_stops_cleanly() -> None:
    try:
        server = FakeDNS("::1").start()
    except OSError:
        pytest.skip("no IPv6 loopback on this host")
    server.add("six.test", "AAAA", "::6")
    query = dns.message.make_query("six.test", "AAAA")
    answer = dns.query.udp(query, "::1", port=server.port, timeout=2)
    assert answer.answer[0][0].address == "::6" and server.address == f"[::1]:{server.port}"
    server.stop()
    server.stop()
    with pytest.raises((dns.exception.Timeout, OSError)):  # refused, or silent
        dns.query.udp(query, "::1", port=server.port, timeout=0.2)
