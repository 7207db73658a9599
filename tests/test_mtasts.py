"""kumopy.mtasts: policy and TXT parsing, RFC 8461 matching, fetches from a real HTTPS server."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import dns.resolver
import pytest
import trustme

from kumopy.errors import StsError
from kumopy.harness import wait_for
from kumopy.mtasts import (
    MAX_BODY,
    StsFetcher,
    StsPolicy,
    filter_hosts,
    parse_policy,
    parse_txt,
)

T = TypeVar("T")
DOMAIN = "example.test"
HOST = "mta-sts.example.test"
POLICY = (
    "version: STSv1\nmode: enforce\nmx: mx1.example.test\nmx: *.mx.example.net\nmax_age: 86400\n"
)


def run(factory: Callable[[], Awaitable[T]]) -> T:
    """Run one coroutine on a fresh asyncio loop."""

    async def main() -> T:
        return await factory()

    return asyncio.run(main())


# -- parsing ------------------------------------------------------------------------------------


def test_parse_policy_valid() -> None:
    p = parse_policy(POLICY, "abc", 5.0)
    assert p == StsPolicy("enforce", ("mx1.example.test", "*.mx.example.net"), 86400, "abc", 5.0)


def test_parse_policy_crlf_unknown_keys_and_case() -> None:
    text = (
        "version: STSv1\r\nmode:testing\r\nfuture_key: whatever\r\n"
        "mx: MX.Example.COM.\r\nmax_age:0\r\n"
    )
    p = parse_policy(text)
    assert (p.mode, p.mx, p.max_age) == ("testing", ("mx.example.com",), 0)


def test_parse_policy_mode_none_needs_no_mx() -> None:
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 31557600").mx == ()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("mode: enforce\nmx: a.example\nmax_age: 1\n", "version is missing"),
        ("version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 1\n", "'STSv2', not 'STSv1'"),
        ("version: STSv1\nmx: a.example\nmax_age: 1\n", "mode is missing"),
        ("version: STSv1\nmode: Enforce\nmx: a.example\nmax_age: 1\n", "mode is 'Enforce'"),
        ("version: STSv1\nmode: enforce\nmx: a.example\n", "max_age is missing"),
        ("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 31557601\n", "'31557601'"),
        ("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -1\n", "not an integer 0.."),
        ("version: STSv1\nmode: enforce\nmax_age: 60\n", "no mx pattern but mode 'enforce'"),
        ("version: STSv1\nmode: testing\nmax_age: 60\n", "no mx pattern but mode 'testing'"),
        ("version: STSv1\nmode: enforce\nmx: a.*.example\nmax_age: 60\n", "bad mx pattern"),
        ("version: STSv1\nmode: enforce\nmx: mx..example\nmax_age: 60\n", "bad mx pattern"),
        ("version: STSv1\nmode: enforce\nmx: -mx.example\nmax_age: 60\n", "bad mx pattern"),
        ("version: STSv1\n<html>\n", "line 2 is not 'key: value'"),
    ],
)
def test_parse_policy_errors(text: str, problem: str) -> None:
    with pytest.raises(StsError, match="policy") as info:
        parse_policy(text)
    assert problem in str(info.value)
    assert info.value.stage == "parse" and not info.value.transient


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        ([], None),
        (["v=spf1 -all", "something else"], None),
        (["v=STSv1; id=20160831085700Z;"], "20160831085700Z"),
        (["v=spf1 -all", "v=STSv1;id=abc123"], "abc123"),
        (["v=STSv1; ext=1; id=X"], "X"),
        (["v=STSv1; id=1", "v=STSv1; id=2"], None),  # several records: no policy
        (["v=STSv1; id=bad-id"], None),
        (["v=STSv1; id=" + "a" * 33], None),
        (["v=STSv1; id="], None),
        (["v=STSv1"], None),
        (["v=STSv10; id=1"], None),
        (["x v=STSv1; id=1"], None),
    ],
)
def test_parse_txt(records: list[str], expected: str | None) -> None:
    assert parse_txt(records) == expected


# RFC 8461 section 4.1: one wildcard label, case-insensitive, trailing dot ignored.
MATCHES = [
    ("mx1.example.com", "mx1.example.com", True),
    ("mx1.example.com", "MX1.Example.Com.", True),
    ("mx1.example.com", "mx2.example.com", False),
    ("mx1.example.com", "a.mx1.example.com", False),
    ("*.example.net", "mx.example.net", True),
    ("*.example.net", "MX.EXAMPLE.NET.", True),
    ("*.example.net", "a.b.example.net", False),
    ("*.example.net", "example.net", False),
    ("*.example.net", ".example.net", False),
    ("*.example.net", "*.example.net", False),
    ("*.example.net", "mx.example.network", False),
    ("*.example.net", "mxexample.net", False),
]


@pytest.mark.parametrize(("pattern", "host", "expected"), MATCHES)
def test_matches(pattern: str, host: str, expected: bool) -> None:
    assert StsPolicy("enforce", (pattern,), 60).matches(host) is expected


def test_filter_hosts() -> None:
    hosts = ["mx1.example.test", "evil.example.org", "a.mx.example.net"]
    enforce = parse_policy(POLICY)
    allowed, dropped, note = filter_hosts(enforce, hosts)
    assert (allowed, dropped) == (["mx1.example.test", "a.mx.example.net"], ["evil.example.org"])
    assert "drops evil.example.org" in note
    assert filter_hosts(enforce, ["evil.example.org"]).description.endswith("no MX host is left")
    testing = StsPolicy("testing", enforce.mx, 60)
    result = filter_hosts(testing, hosts)
    assert result.allowed == hosts and result.dropped == [] and "would drop" in result.description
    assert filter_hosts(StsPolicy("none", (), 60), hosts) == (hosts, [], "")
    assert filter_hosts(None, hosts) == (hosts, [], "")
    assert filter_hosts(enforce, hosts[:1]) == (hosts[:1], [], "")


def test_error_to_dict() -> None:
    d = StsError("boom", "tls").to_dict()
    assert d == {"type": "StsError", "code": "mta_sts", "message": "boom", "transient": True,
                 "stage": "tls"}  # fmt: skip


# -- a real HTTPS server ------------------------------------------------------------------------


class PolicyServer:
    """An HTTPS/1.1 server on 127.0.0.1 in threads, answering GETs as the test sets it up."""

    def __init__(self, cert: trustme.LeafCert) -> None:
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(self.ctx)
        self.status = 200
        self.body = POLICY.encode()
        self.headers: dict[str, str] = {"Content-Type": "text/plain"}
        self.framing = "length"  # or "chunked", "close"
        self.stall: str | None = None  # "tls" or "response": wait for `release` first
        self.release = threading.Event()
        self.requests: list[tuple[str, str | None]] = []
        self.errors: list[BaseException] = []
        self.httpd = _Server(self)
        self.port: int = self.httpd.server_address[1]
        # A short poll interval keeps shutdown() quick.
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, args=(0.05,), name="policy-server"
        )

    def stop(self) -> None:
        """Release stalled handlers, stop serving and join every thread."""
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()  # joins handler threads (block_on_close)
        self.thread.join()


class _Server(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True

    def __init__(self, owner: PolicyServer) -> None:
        self.owner = owner
        super().__init__(("127.0.0.1", 0), _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        # TLS per connection, in the handler thread, so one slow client blocks nobody.
        if self.owner.stall == "tls":
            self.owner.release.wait(30)
        conn = self.owner.ctx.wrap_socket(request, server_side=True)
        try:
            _Handler(conn, client_address, self)
            conn.unwrap()  # a clean TLS close (close_notify) ends close-delimited bodies
        finally:
            conn.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        exc = sys.exception()
        if exc is not None:
            self.owner.errors.append(exc)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def do_GET(self) -> None:
        srv = self.server.owner
        srv.requests.append((self.path, self.headers.get("Host")))
        if srv.stall == "response":
            srv.release.wait(30)
        self.send_response(srv.status)
        for name, value in srv.headers.items():
            self.send_header(name, value)
        if srv.framing == "length":
            self.send_header("Content-Length", str(len(srv.body)))
        elif srv.framing == "chunked":
            self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        if srv.framing == "chunked":
            for i in range(0, len(srv.body), 1000):
                piece = srv.body[i : i + 1000]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.wfile.write(srv.body)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def start_server(ca: trustme.CA) -> Iterator[Callable[..., PolicyServer]]:
    """Start policy servers (certificate for HOST from the test CA unless told); stop them all."""
    servers: list[PolicyServer] = []

    def start(cert: trustme.LeafCert | None = None) -> PolicyServer:
        server = PolicyServer(cert or ca.issue_cert(HOST))
        servers.append(server)
        server.thread.start()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def server(start_server: Callable[..., PolicyServer]) -> PolicyServer:
    return start_server()


class Dns:
    """Stub lookups: TXT records and addresses per name, with counts."""

    def __init__(self) -> None:
        self.txt: dict[str, list[str]] = {f"_mta-sts.{DOMAIN}": ["v=STSv1; id=one"]}
        self.addresses: dict[str, list[str]] = {HOST: ["127.0.0.1"]}
        self.txt_error: Exception | None = None
        self.txt_calls = 0

    async def lookup_txt(self, name: str) -> list[str]:
        self.txt_calls += 1
        if self.txt_error is not None:
            raise self.txt_error
        return self.txt[name]  # KeyError: no such record

    async def resolve(self, name: str) -> list[str]:
        return self.addresses[name]

    def set_id(self, policy_id: str) -> None:
        self.txt[f"_mta-sts.{DOMAIN}"] = [f"v=STSv1; id={policy_id}"]


class Clock:
    """A settable clock for cache expiry."""

    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def dns_stub() -> Dns:
    return Dns()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def fetcher_for(
    server: PolicyServer, dns_stub: Dns, ca_file: str, clock: Clock, **kwargs: Any
) -> StsFetcher:
    kwargs.setdefault("timeout", 10.0)
    return StsFetcher(
        dns_stub.resolve, dns_stub.lookup_txt, https_port=server.port, ca_file=ca_file,
        now=clock, **kwargs,
    )  # fmt: skip


@pytest.fixture
def fetcher(server: PolicyServer, dns_stub: Dns, ca_file: str, clock: Clock) -> StsFetcher:
    return fetcher_for(server, dns_stub, ca_file, clock)


def fetch_error(fetcher: StsFetcher, domain: str = DOMAIN) -> StsError:
    with pytest.raises(StsError) as info:
        run(lambda: fetcher.policy(domain))
    assert info.value.transient
    return info.value


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
def test_fetch_and_cache(
    server: PolicyServer, fetcher: StsFetcher, dns_stub: Dns, framing: str
) -> None:
    server.framing = framing

    async def twice() -> tuple[StsPolicy | None, StsPolicy | None]:
        return await fetcher.policy(DOMAIN), await fetcher.policy("Example.TEST.")

    first, second = run(twice)
    assert first is not None and first is second
    assert (first.mode, first.policy_id, first.fetched) == ("enforce", "one", 1_000_000.0)
    assert first.matches("a.mx.example.net") and not first.matches("mx2.example.test")
    assert server.requests == [("/.well-known/mta-sts.txt", f"{HOST}:{server.port}")]
    assert dns_stub.txt_calls == 2  # the TXT record is checked every time
    assert server.errors == []


def test_concurrent_calls_share_one_fetch(server: PolicyServer, fetcher: StsFetcher) -> None:
    async def many() -> list[StsPolicy | None]:
        return await asyncio.gather(*(fetcher.policy(DOMAIN) for _ in range(5)))

    results = run(many)
    assert results[0] is not None and all(r is results[0] for r in results)
    assert len(server.requests) == 1


def test_one_caller_cancelled_others_still_served(
    server: PolicyServer, fetcher: StsFetcher
) -> None:
    server.stall = "response"

    async def main() -> StsPolicy | None:
        first = asyncio.create_task(fetcher.policy(DOMAIN))
        second = asyncio.create_task(fetcher.policy(DOMAIN))
        await asyncio.get_running_loop().run_in_executor(
            None, wait_for, lambda: server.requests, 10, "the policy request"
        )
        first.cancel()
        server.release.set()
        with pytest.raises(asyncio.CancelledError):
            await first
        return await second

    assert run(main) is not None and len(server.requests) == 1


def test_id_change_refetches(server: PolicyServer, fetcher: StsFetcher, dns_stub: Dns) -> None:
    first = run(lambda: fetcher.policy(DOMAIN))
    dns_stub.set_id("two")
    server.body = POLICY.replace("enforce", "testing").encode()
    second = run(lambda: fetcher.policy(DOMAIN))
    assert first is not None and second is not None
    assert (first.policy_id, first.mode, second.policy_id, second.mode) == (
        "one", "enforce", "two", "testing",
    )  # fmt: skip
    assert len(server.requests) == 2


def test_max_age_expiry_refetches(server: PolicyServer, fetcher: StsFetcher, clock: Clock) -> None:
    run(lambda: fetcher.policy(DOMAIN))
    clock.t += 86399
    run(lambda: fetcher.policy(DOMAIN))
    assert len(server.requests) == 1
    clock.t += 1
    assert fetcher.cached(DOMAIN) is None
    policy = run(lambda: fetcher.policy(DOMAIN))
    assert len(server.requests) == 2 and policy is not None and policy.fetched == clock.t


def test_no_record_means_no_policy_but_cache_survives(
    server: PolicyServer, fetcher: StsFetcher, dns_stub: Dns, clock: Clock
) -> None:
    assert run(lambda: fetcher.policy("other.test")) is None  # no TXT record at all
    cached = run(lambda: fetcher.policy(DOMAIN))
    for records in ([], ["v=STSv1; id=1", "v=STSv1; id=2"], ["v=STSv1; id=b@d"]):
        dns_stub.txt[f"_mta-sts.{DOMAIN}"] = records
        assert run(lambda: fetcher.policy(DOMAIN)) is cached
    dns_stub.txt_error = dns.resolver.NXDOMAIN()  # type: ignore[no-untyped-call]
    assert run(lambda: fetcher.policy(DOMAIN)) is cached
    # A failed lookup, not an absent record: the cached policy still applies.
    dns_stub.txt_error = dns.resolver.LifetimeTimeout()  # type: ignore[no-untyped-call]
    assert run(lambda: fetcher.policy(DOMAIN)) is cached
    clock.t += 86400
    assert "TXT lookup of _mta-sts.example.test failed" in str(fetch_error(fetcher))
    dns_stub.txt_error = None
    assert run(lambda: fetcher.policy(DOMAIN)) is None  # record gone, cache expired
    assert len(server.requests) == 1


def test_wrong_name_certificate(
    start_server: Callable[..., PolicyServer], ca: trustme.CA, dns_stub: Dns, ca_file: str,
    clock: Clock,
) -> None:  # fmt: skip
    server = start_server(ca.issue_cert("other.example.test"))
    err = fetch_error(fetcher_for(server, dns_stub, ca_file, clock))
    assert err.stage == "tls"
    assert "TLS verification failed" in str(err) and "Hostname mismatch" in str(err)
    assert server.requests == []


def test_unknown_ca(
    start_server: Callable[..., PolicyServer], dns_stub: Dns, ca_file: str, clock: Clock
) -> None:
    server = start_server(trustme.CA().issue_cert(HOST))
    err = fetch_error(fetcher_for(server, dns_stub, ca_file, clock))
    assert err.stage == "tls" and "TLS verification failed" in str(err)
    assert "unable to get local issuer certificate" in str(err)


def test_http_404(server: PolicyServer, fetcher: StsFetcher) -> None:
    server.status, server.body = 404, b"not here"
    err = fetch_error(fetcher)
    assert err.stage == "http" and "HTTP 404 Not Found" in str(err)


def test_redirect_not_followed(server: PolicyServer, fetcher: StsFetcher) -> None:
    server.status, server.body = 301, b""
    server.headers["Location"] = f"https://{HOST}:{server.port}/elsewhere"
    err = fetch_error(fetcher)
    assert err.stage == "http" and "HTTP 301" in str(err) and "not followed" in str(err)
    assert "/elsewhere" in str(err) and len(server.requests) == 1


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
def test_body_over_64k(server: PolicyServer, fetcher: StsFetcher, framing: str) -> None:
    server.framing = framing
    server.body = POLICY.encode() + b"# padding\n" * (MAX_BODY // 10)
    err = fetch_error(fetcher)
    assert err.stage == "http" and "over the 65536-byte limit" in str(err)


def test_body_at_64k_is_fine(server: PolicyServer, fetcher: StsFetcher) -> None:
    server.framing = "chunked"
    server.body = POLICY.encode().ljust(MAX_BODY, b"\n")
    assert run(lambda: fetcher.policy(DOMAIN)) is not None


@pytest.mark.parametrize("stall", ["tls", "response"])
def test_slow_server_times_out(
    server: PolicyServer, dns_stub: Dns, ca_file: str, clock: Clock, stall: str
) -> None:
    server.stall = stall
    fetcher = fetcher_for(server, dns_stub, ca_file, clock, timeout=0.5)
    err = fetch_error(fetcher)
    assert err.stage == "timeout" and "timed out" in str(err)
    assert ("TLS handshake" if stall == "tls" else "reading the response headers") in str(err)


def test_bad_policy_is_a_parse_error(server: PolicyServer, fetcher: StsFetcher) -> None:
    server.body = b"version: STSv1\nmode: enforce\nmax_age: 60\n"
    err = fetch_error(fetcher)
    assert err.stage == "parse" and "no mx pattern" in str(err) and HOST in str(err)


def test_failure_keeps_fresh_cached_policy(
    server: PolicyServer, fetcher: StsFetcher, dns_stub: Dns, clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    cached = run(lambda: fetcher.policy(DOMAIN))
    dns_stub.set_id("two")
    server.status = 500
    with caplog.at_level(logging.WARNING, "kumopy.mtasts"):
        assert run(lambda: fetcher.policy(DOMAIN)) is cached
    assert "HTTP 500" in caplog.text and "keeping the cached policy" in caplog.text
    clock.t += 86400  # expired: the failure now shows
    assert fetch_error(fetcher).stage == "http"
    assert len(server.requests) == 3


def test_policy_or_none_logs(
    server: PolicyServer, fetcher: StsFetcher, caplog: pytest.LogCaptureFixture
) -> None:
    server.status = 503
    with caplog.at_level(logging.WARNING, "kumopy.mtasts"):
        assert run(lambda: fetcher.policy_or_none(DOMAIN)) is None
    assert "no policy applied" in caplog.text and "HTTP 503" in caplog.text


def test_first_working_address_is_used(
    server: PolicyServer, fetcher: StsFetcher, dns_stub: Dns, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 127.0.0.2 is loopback too but nothing listens there; a name is skipped, never resolved.
    dns_stub.addresses[HOST] = [HOST, "127.0.0.2", "127.0.0.1"]
    real = socket.getaddrinfo

    def numeric_only(host: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and not host.replace(".", "").isdigit():
            raise AssertionError(f"system resolver asked for {host!r}")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", numeric_only)
    assert run(lambda: fetcher.policy(DOMAIN)) is not None
    assert len(server.requests) == 1


def test_connect_and_dns_failures(
    server: PolicyServer, fetcher: StsFetcher, dns_stub: Dns, clock: Clock
) -> None:
    dns_stub.addresses[HOST] = ["127.0.0.2"]
    err = fetch_error(fetcher)
    assert err.stage == "connect" and "127.0.0.2 port" in str(err) and "connect failed" in str(err)
    dns_stub.addresses[HOST] = []
    clock.t += 60  # past retry_after
    assert fetch_error(fetcher).stage == "dns"
    del dns_stub.addresses[HOST]
    clock.t += 60
    err = fetch_error(fetcher)
    assert err.stage == "dns" and f"resolving {HOST} failed" in str(err)


def test_failed_fetch_is_not_repeated_at_once(
    server: PolicyServer, fetcher: StsFetcher, dns_stub: Dns, clock: Clock
) -> None:
    server.status = 500
    assert "HTTP 500" in str(fetch_error(fetcher))
    clock.t += 59
    err = fetch_error(fetcher)
    assert "HTTP 500" in str(err) and "next try in 1s" in str(err)
    assert len(server.requests) == 1
    dns_stub.set_id("two")  # a new id is worth trying at once
    fetch_error(fetcher)
    assert len(server.requests) == 2
    server.status = 200
    clock.t += 60
    assert run(lambda: fetcher.policy(DOMAIN)) is not None
    assert len(server.requests) == 3


def test_slow_dns_counts_against_the_timeout(
    server: PolicyServer, dns_stub: Dns, ca_file: str, clock: Clock
) -> None:
    async def never(name: str) -> list[str]:
        await asyncio.Event().wait()
        return []

    fetcher = StsFetcher(
        never, dns_stub.lookup_txt, https_port=server.port, ca_file=ca_file, timeout=0.2, now=clock
    )
    err = fetch_error(fetcher)
    assert err.stage == "dns" and f"resolving {HOST} timed out after 0.2s" in str(err)


def test_constructor_validation(dns_stub: Dns, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="https_port"):
        StsFetcher(dns_stub.resolve, dns_stub.lookup_txt, https_port=0)
    with pytest.raises(ValueError, match="timeout"):
        StsFetcher(dns_stub.resolve, dns_stub.lookup_txt, timeout=0)
    with pytest.raises(ValueError, match="retry_after"):
        StsFetcher(dns_stub.resolve, dns_stub.lookup_txt, retry_after=-1)
    with pytest.raises(StsError, match="cannot load CA file"):
        StsFetcher(dns_stub.resolve, dns_stub.lookup_txt, ca_file=str(tmp_path / "missing.pem"))
