"""Real receivers end to end: MX from DNS, STARTTLS by the path's enable_tls, MTA-STS, SMTPUTF8.

A coordinator and its workers route through a FakeDNS to aiosmtpd peers listening on their own
loopback addresses, whose certificates (from a test CA) name the MX hosts.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import trustme

from kumopy.client import Client, Message
from kumopy.fakedns import FakeDNS
from kumopy.harness import Proc, wait_for
from kumopy.inject import make_body
from tests.conftest_procs import Cluster, MakePolicy
from tests.smtp_peer import Peer, peers_on_one_port
from tests.test_mtasts import PolicyServer

pytestmark = pytest.mark.integration

POLICY = """
import os
PORT = int(os.environ["TEST_PORT"])
CA = os.environ["TEST_CA"]
TLS = os.environ.get("TEST_TLS", "Opportunistic")
PER_CONNECTION = int(os.environ.get("TEST_PER_CONNECTION", "1024"))

kumo.dns.configure_resolver(name_servers=[os.environ["TEST_DNS"]], timeout="2s")
if "TEST_STS_PORT" in os.environ:
    kumo.configure_mta_sts(https_port=int(os.environ["TEST_STS_PORT"]), ca_file=CA)

@kumo.on("init")
def init():
    kumo.define_egress_source(name="a", source_address="127.0.0.2", ehlo_domain="a.mta.test")
    kumo.define_egress_pool(name="p", entries=[{"name": "a"}])

@kumo.on("get_queue_config")
def qc(domain, tenant, campaign, routing_domain):
    # No mx_list: the routing domain's MX records are looked up. Retries an hour away, so a
    # test sees the first attempt's outcome only.
    return kumo.make_queue_config(egress_pool="p", retry_interval=3600, max_age=86400)

@kumo.on("get_egress_path_config")
def path(routing_domain, egress_source, site_name):
    return kumo.make_egress_path(
        smtp_port=PORT, prohibited_hosts=[], tls_ca_file=CA, enable_tls=TLS,
        max_deliveries_per_connection=PER_CONNECTION,
    )
"""
"""One source (127.0.0.2), queues routed by DNS ($TEST_DNS) to port $TEST_PORT, peers verified
against $TEST_CA, TLS mode $TEST_TLS, $TEST_PER_CONNECTION messages a connection; MTA-STS
fetched from port $TEST_STS_PORT when set."""

TLS_FIELDS = ("tls_protocol_version", "tls_cipher", "tls_peer_subject_name")
E_441 = {"class": 4, "subject": 4, "detail": 1}
"""4.4.1, the enhanced code of the worker's own 451 when no host of a site could be used."""

MX1, MX1_IP = "mx1.tls.test", "127.0.0.21"
STS_MX1, STS_MX1_IP = "mx1.sts.test", "127.0.0.31"
STS_MX2, STS_MX2_IP = "mx2.sts.test", "127.0.0.32"
STS_HOST = "mta-sts.sts.test"
STS_POLICY = "version: STSv1\nmode: {mode}\nmx: mx2.sts.test\nmax_age: 86400\n"
UTF8_MX, UTF8_MX_IP = "mx1.utf8.test", "127.0.0.41"


@dataclass(frozen=True)
class Pki:
    """A test CA, its PEM file, and server contexts for names it certifies."""

    ca: trustme.CA
    ca_file: str

    def server(self, *names: str) -> ssl.SSLContext:
        """Return a server context whose certificate names `names` (CN the first)."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert(*names, common_name=names[0]).configure_cert(ctx)
        return ctx


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca = trustme.CA()
    path = tmp_path_factory.mktemp("pki") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return Pki(ca, str(path))


@pytest.fixture
def dns() -> Iterator[FakeDNS]:
    """A DNS server for the test's zone: tls.test's one MX host at MX1_IP."""
    with FakeDNS() as server:
        server.add("tls.test", "MX", f"10 {MX1}.")
        server.add(MX1, "A", MX1_IP)
        yield server


Start = Callable[..., Proc]


@pytest.fixture
def start(cluster: Cluster, make_policy: MakePolicy, dns: FakeDNS, pki: Pki) -> Start:
    """Start a coordinator on POLICY sending to `port`; keywords become TEST_* variables."""

    def run(port: int, **env: object) -> Proc:
        variables = {f"TEST_{k.upper()}": str(v) for k, v in env.items()}
        variables |= {"TEST_DNS": dns.address, "TEST_PORT": str(port), "TEST_CA": pki.ca_file}
        return cluster.coordinator(make_policy(POLICY), env=variables)

    return run


def inject(coord: Proc, *rcpts: str) -> None:
    """Inject one message per recipient; fail unless each is accepted."""
    msgs = [
        Message("s@src.test", [r], make_body("s@src.test", "x", 400, i))
        for i, r in enumerate(rcpts)
    ]
    with Client(coord.info["endpoint"]) as client:
        results = client.send_batch(msgs)
    assert all(r.ok for r in results), [str(r.error) for r in results]


def outcome(cluster: Cluster, coord: Proc, rcpt: str, timeout: float = 30.0) -> dict[str, Any]:
    """Wait for the first record after Reception for `rcpt` and return it."""

    def find() -> dict[str, Any] | None:
        return next(
            (
                r
                for r in cluster.records(coord)
                if r["type"] != "Reception" and r["recipient"] == rcpt
            ),
            None,
        )

    found: dict[str, Any] = wait_for(find, timeout, f"an outcome for {rcpt}")
    return found


def kinds(cluster: Cluster, coord: Proc, rcpt: str) -> list[str]:
    """Return the types of `rcpt`'s records so far, Reception included."""
    return [r["type"] for r in cluster.records(coord) if r["recipient"] == rcpt]


def messages_kept(coord: Proc) -> int:
    """Return how many messages the coordinator holds."""
    with Client(coord.info["endpoint"]) as client:
        count: int = client.request("status")["messages"]
    return count


def assert_verified_tls(rec: dict[str, Any], name: str) -> None:
    """Check a record says the session was over TLS with `name`'s certificate."""
    assert rec["tls_protocol_version"] in ("TLSv1.2", "TLSv1.3"), rec
    assert rec["tls_cipher"], rec
    assert rec["tls_peer_subject_name"] == name, rec


# -- STARTTLS by enable_tls ------------------------------------------------------------------


def test_opportunistic_delivers_over_tls_to_the_mx_host(
    start: Start, cluster: Cluster, pki: Pki
) -> None:
    with Peer(pki.server(MX1), host=MX1_IP, hostname=MX1) as peer:
        coord = start(peer.port)
        inject(coord, "r0@tls.test")
        rec = outcome(cluster, coord, "r0@tls.test")
        assert rec["type"] == "Delivery", rec
        assert rec["peer_address"] == {"name": MX1, "addr": MX1_IP}
        assert_verified_tls(rec, MX1)
        assert "mta_sts" not in rec
        (seen,) = peer.received
        assert seen.tls and seen.rcpt_tos == ["r0@tls.test"] and seen.mail_from == "s@src.test"
        assert peer.handler.starttls == 1


def test_required_against_a_server_without_starttls_waits(start: Start, cluster: Cluster) -> None:
    with Peer(host=MX1_IP, hostname=MX1) as peer:
        coord = start(peer.port, tls="Required")
        inject(coord, "r0@tls.test")
        rec = outcome(cluster, coord, "r0@tls.test")
        assert rec["type"] == "TransientFailure", rec
        assert (rec["response"]["code"], rec["response"]["enhanced_code"]) == (451, E_441)
        assert "does not offer STARTTLS and the TLS mode is Required" in rec["response"]["content"]
        assert rec["peer_address"] == {"name": MX1, "addr": MX1_IP}
        assert not any(k in rec for k in TLS_FIELDS)
        assert not peer.handler.mails and not peer.received
        assert messages_kept(coord) == 1


def test_bad_certificate_opportunistic_goes_in_clear_and_remembers(
    start: Start, cluster: Cluster, pki: Pki
) -> None:
    # The certificate names another host. One message per connection, so the second message
    # needs a connection of its own: it must go in clear without another handshake.
    with Peer(pki.server("other.tls.test"), host=MX1_IP, hostname=MX1) as peer:
        coord = start(peer.port, per_connection=1)
        inject(coord, "r0@tls.test")
        first = outcome(cluster, coord, "r0@tls.test")
        assert first["type"] == "Delivery", first
        assert not any(k in first for k in TLS_FIELDS), first
        assert [s.tls for s in peer.received] == [False]
        assert (peer.handler.starttls, peer.handler.connections) == (1, 2)

        inject(coord, "r1@tls.test")
        second = outcome(cluster, coord, "r1@tls.test")
        assert second["type"] == "Delivery", second
        assert not any(k in second for k in TLS_FIELDS), second
        assert [s.tls for s in peer.received] == [False, False]
        assert (peer.handler.starttls, peer.handler.connections) == (1, 3)


def test_bad_certificate_required_waits_naming_the_failure(
    start: Start, cluster: Cluster, pki: Pki
) -> None:
    with Peer(pki.server("other.tls.test"), host=MX1_IP, hostname=MX1) as peer:
        coord = start(peer.port, tls="Required")
        inject(coord, "r0@tls.test")
        rec = outcome(cluster, coord, "r0@tls.test")
        assert rec["type"] == "TransientFailure", rec
        assert (rec["response"]["code"], rec["response"]["enhanced_code"]) == (451, E_441)
        assert "certificate verify failed: Hostname mismatch" in rec["response"]["content"]
        assert not any(k in rec for k in TLS_FIELDS)
        assert peer.handler.starttls >= 1 and not peer.handler.mails
        assert messages_kept(coord) == 1


def test_opportunistic_insecure_takes_a_bad_certificate(
    start: Start, cluster: Cluster, pki: Pki
) -> None:
    with Peer(pki.server("other.tls.test"), host=MX1_IP, hostname=MX1) as peer:
        coord = start(peer.port, tls="OpportunisticInsecure")
        inject(coord, "r0@tls.test")
        rec = outcome(cluster, coord, "r0@tls.test")
        assert rec["type"] == "Delivery", rec
        assert_verified_tls(rec, "other.tls.test")  # reported, although nothing was checked
        assert [s.tls for s in peer.received] == [True] and peer.handler.connections == 1


def test_required_passes_over_an_mx_whose_certificate_fails(
    start: Start, cluster: Cluster, dns: FakeDNS, pki: Pki
) -> None:
    dns.add("tls.test", "MX", "20 mx2.tls.test.")
    dns.add("mx2.tls.test", "A", "127.0.0.22")
    makers = [
        lambda port: Peer(pki.server("other.tls.test"), host=MX1_IP, port=port, hostname=MX1),
        lambda port: Peer(pki.server("mx2.tls.test"), host="127.0.0.22", port=port),
    ]
    with peers_on_one_port(makers) as (mx1, mx2):
        coord = start(mx1.port, tls="Required")
        inject(coord, "r0@tls.test")
        rec = outcome(cluster, coord, "r0@tls.test")
        assert rec["type"] == "Delivery", rec
        assert rec["peer_address"] == {"name": "mx2.tls.test", "addr": "127.0.0.22"}
        assert_verified_tls(rec, "mx2.tls.test")
        assert mx1.handler.starttls == 1 and not mx1.handler.mails
        assert [s.tls for s in mx2.received] == [True]


@pytest.mark.parametrize("mode", ["Opportunistic", "Disabled"])
def test_server_requiring_tls(start: Start, cluster: Cluster, pki: Pki, mode: str) -> None:
    with Peer(pki.server(MX1), host=MX1_IP, hostname=MX1, require_starttls=True) as peer:
        coord = start(peer.port, tls=mode)
        inject(coord, "r0@tls.test")
        rec = outcome(cluster, coord, "r0@tls.test")
        if mode == "Opportunistic":
            assert rec["type"] == "Delivery", rec
            assert_verified_tls(rec, MX1)
            assert [s.tls for s in peer.received] == [True]
            return
        # 530 "Must issue a STARTTLS command first" is about this sender's choice, not the
        # recipient: retried later, never bounced.
        assert rec["type"] == "TransientFailure", rec
        assert rec["response"]["code"] == 451
        assert rec["response"]["enhanced_code"] == {"class": 4, "subject": 7, "detail": 0}
        assert "530" in rec["response"]["content"]
        assert peer.handler.starttls == 0 and not peer.received
        assert messages_kept(coord) == 1
        assert "Bounce" not in kinds(cluster, coord, "r0@tls.test")


# -- MTA-STS ---------------------------------------------------------------------------------


@pytest.fixture
def sts_zone(dns: FakeDNS) -> FakeDNS:
    """sts.test: MX 10 mx1.sts.test, MX 20 mx2.sts.test, and an MTA-STS policy (id 1)."""
    dns.add("sts.test", "MX", f"10 {STS_MX1}.")
    dns.add("sts.test", "MX", f"20 {STS_MX2}.")
    dns.add(STS_MX1, "A", STS_MX1_IP)
    dns.add(STS_MX2, "A", STS_MX2_IP)
    dns.add("_mta-sts.sts.test", "TXT", '"v=STSv1; id=1"')
    dns.add(STS_HOST, "A", "127.0.0.1")
    return dns


@pytest.fixture
def policy_server(pki: Pki) -> Iterator[PolicyServer]:
    """An HTTPS server for mta-sts.sts.test (its body set by the test)."""
    server = PolicyServer(pki.ca.issue_cert(STS_HOST))
    server.thread.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def sts_peers(pki: Pki) -> Iterator[list[Peer]]:
    """TLS peers for mx1.sts.test and mx2.sts.test on one port, good certificates."""
    makers = [
        lambda port, name=name, ip=ip: Peer(pki.server(name), host=ip, port=port, hostname=name)
        for name, ip in ((STS_MX1, STS_MX1_IP), (STS_MX2, STS_MX2_IP))
    ]
    with peers_on_one_port(makers) as peers:
        yield peers


def test_mta_sts_enforce_sends_only_to_policy_hosts_over_verified_tls(
    start: Start,
    cluster: Cluster,
    sts_zone: FakeDNS,
    policy_server: PolicyServer,
    sts_peers: list[Peer],
) -> None:
    policy_server.body = STS_POLICY.format(mode="enforce").encode()
    mx1, mx2 = sts_peers
    coord = start(mx1.port, sts_port=policy_server.port)
    rcpts = [f"r{i}@sts.test" for i in range(5)]
    inject(coord, *rcpts)
    for rcpt in rcpts:
        rec = outcome(cluster, coord, rcpt)
        assert rec["type"] == "Delivery", rec
        assert rec["peer_address"] == {"name": STS_MX2, "addr": STS_MX2_IP}
        assert_verified_tls(rec, STS_MX2)
        assert "mta_sts" not in rec
    assert sorted(r for s in mx2.received for r in s.rcpt_tos) == sorted(rcpts)
    assert all(s.tls for s in mx2.received)
    assert mx1.handler.connections == 0 and not mx1.received
    assert [p for p, _ in policy_server.requests] == ["/.well-known/mta-sts.txt"]
    assert (policy_server.requests[0][1] or "").split(":")[0] == STS_HOST


def test_mta_sts_enforce_never_falls_back_to_clear(
    start: Start,
    cluster: Cluster,
    pki: Pki,
    sts_zone: FakeDNS,
    policy_server: PolicyServer,
) -> None:
    # mx2 (the only host the policy allows) presents a certificate for another name: under
    # enforce the message waits; it goes neither in clear nor to mx1.
    policy_server.body = STS_POLICY.format(mode="enforce").encode()
    makers = [
        lambda port: Peer(pki.server(STS_MX1), host=STS_MX1_IP, port=port, hostname=STS_MX1),
        lambda port: Peer(pki.server("other.sts.test"), host=STS_MX2_IP, port=port),
    ]
    with peers_on_one_port(makers) as (mx1, mx2):
        coord = start(mx1.port, sts_port=policy_server.port)
        inject(coord, "r0@sts.test")
        rec = outcome(cluster, coord, "r0@sts.test")
        assert rec["type"] == "TransientFailure", rec
        assert "certificate verify failed: Hostname mismatch" in rec["response"]["content"]
        assert mx2.handler.starttls >= 1 and not mx2.handler.mails
        assert mx1.handler.connections == 0
        assert messages_kept(coord) == 1


def test_mta_sts_testing_delivers_to_the_preferred_mx_and_reports(
    start: Start,
    cluster: Cluster,
    sts_zone: FakeDNS,
    policy_server: PolicyServer,
    sts_peers: list[Peer],
) -> None:
    policy_server.body = STS_POLICY.format(mode="testing").encode()
    mx1, mx2 = sts_peers
    coord = start(mx1.port, sts_port=policy_server.port)
    rcpts = [f"r{i}@sts.test" for i in range(3)]
    inject(coord, *rcpts)
    for rcpt in rcpts:
        rec = outcome(cluster, coord, rcpt)
        assert rec["type"] == "Delivery", rec
        assert rec["peer_address"] == {"name": STS_MX1, "addr": STS_MX1_IP}
        assert_verified_tls(rec, STS_MX1)
        assert rec["mta_sts"] == (
            f"testing mode, would have failed: MX host {STS_MX1} is not in the policy ({STS_MX2})"
        )
    assert sorted(r for s in mx1.received for r in s.rcpt_tos) == sorted(rcpts)
    assert mx2.handler.connections == 0


def test_mta_sts_enforce_without_an_allowed_mx_waits(
    start: Start,
    cluster: Cluster,
    sts_zone: FakeDNS,
    policy_server: PolicyServer,
    sts_peers: list[Peer],
) -> None:
    policy_server.body = STS_POLICY.format(mode="enforce").replace(STS_MX2, "mx9.sts.test").encode()
    mx1, mx2 = sts_peers
    coord = start(mx1.port, sts_port=policy_server.port)
    inject(coord, "r0@sts.test")
    rec = outcome(cluster, coord, "r0@sts.test")
    assert rec["type"] == "TransientFailure", rec
    assert rec["response"]["enhanced_code"] == {"class": 4, "subject": 4, "detail": 4}
    assert "not in the MTA-STS policy" in rec["response"]["content"]
    assert mx1.handler.connections == mx2.handler.connections == 0
    assert messages_kept(coord) == 1


def test_mta_sts_testing_reports_a_failed_handshake_too(
    start: Start,
    cluster: Cluster,
    pki: Pki,
    sts_zone: FakeDNS,
    policy_server: PolicyServer,
) -> None:
    # Testing mode enforces nothing: mx1's bad certificate means clear text (Opportunistic),
    # and the record says both things enforce mode would have refused.
    policy_server.body = STS_POLICY.format(mode="testing").encode()
    makers = [
        lambda port: Peer(pki.server("other.sts.test"), host=STS_MX1_IP, port=port),
        lambda port: Peer(pki.server(STS_MX2), host=STS_MX2_IP, port=port, hostname=STS_MX2),
    ]
    with peers_on_one_port(makers) as (mx1, mx2):
        coord = start(mx1.port, sts_port=policy_server.port)
        inject(coord, "r0@sts.test")
        rec = outcome(cluster, coord, "r0@sts.test")
        assert rec["type"] == "Delivery", rec
        assert rec["peer_address"] == {"name": STS_MX1, "addr": STS_MX1_IP}
        assert not any(k in rec for k in TLS_FIELDS)
        assert rec["mta_sts"] == (
            "testing mode, would have failed: "
            f"MX host {STS_MX1} is not in the policy ({STS_MX2}); "
            "the session was not over verified TLS"
        )
        assert [s.tls for s in mx1.received] == [False] and mx2.handler.connections == 0


def test_mta_sts_enforce_for_an_internationalised_domain(
    start: Start,
    cluster: Cluster,
    pki: Pki,
    sts_zone: FakeDNS,
    sts_peers: list[Peer],
) -> None:
    # bücher.test (xn--bcher-kva.test) publishes the same enforce policy as sts.test. The
    # recipient's local part is ASCII, so the A-label goes on the wire without SMTPUTF8.
    idn = "xn--bcher-kva.test"
    sts_zone.add(idn, "MX", f"10 {STS_MX1}.")
    sts_zone.add(idn, "MX", f"20 {STS_MX2}.")
    sts_zone.add(f"_mta-sts.{idn}", "TXT", '"v=STSv1; id=1"')
    sts_zone.add(f"mta-sts.{idn}", "A", "127.0.0.1")
    server = PolicyServer(pki.ca.issue_cert(f"mta-sts.{idn}"))
    server.body = STS_POLICY.format(mode="enforce").encode()
    server.thread.start()
    try:
        mx1, mx2 = sts_peers
        coord = start(mx1.port, sts_port=server.port)
        inject(coord, "r0@bücher.test")
        rec = outcome(cluster, coord, "r0@bücher.test", timeout=10)
        assert rec["type"] == "Delivery", rec
        assert [p for p, _ in server.requests] == ["/.well-known/mta-sts.txt"]
        assert rec["peer_address"] == {"name": STS_MX2, "addr": STS_MX2_IP}
        assert_verified_tls(rec, STS_MX2)
        assert mx1.handler.connections == 0
        assert [s.rcpt_tos for s in mx2.received] == [[f"r0@{idn}"]]
    finally:
        server.stop()


def test_mta_sts_testing_report_belongs_to_its_domain(
    start: Start,
    cluster: Cluster,
    sts_zone: FakeDNS,
    policy_server: PolicyServer,
    sts_peers: list[Peer],
) -> None:
    # plain.test shares sts.test's MX hosts (so its site) but publishes no MTA-STS policy.
    sts_zone.add("plain.test", "MX", f"10 {STS_MX1}.")
    sts_zone.add("plain.test", "MX", f"20 {STS_MX2}.")
    policy_server.body = STS_POLICY.format(mode="testing").encode()
    mx1, _ = sts_peers
    coord = start(mx1.port, sts_port=policy_server.port)
    # Both domains resolved (and the policy fetched) first, then their mail goes together.
    inject(coord, "w@sts.test", "w@plain.test")
    for rcpt in ("w@sts.test", "w@plain.test"):
        assert outcome(cluster, coord, rcpt)["type"] == "Delivery"
    rcpts = [f"r{i}@{d}" for i in range(5) for d in ("sts.test", "plain.test")]
    inject(coord, *rcpts)
    reports = {rcpt: outcome(cluster, coord, rcpt).get("mta_sts") for rcpt in rcpts}
    wrong = {
        rcpt: report
        for rcpt, report in reports.items()
        if (report is None) == rcpt.endswith("@sts.test")
    }
    assert not wrong, wrong


# -- SMTPUTF8 --------------------------------------------------------------------------------


@pytest.mark.parametrize("smtputf8", [True, False], ids=["offered", "not-offered"])
def test_utf8_recipient(start: Start, cluster: Cluster, dns: FakeDNS, smtputf8: bool) -> None:
    dns.add("utf8.test", "MX", f"10 {UTF8_MX}.")
    dns.add(UTF8_MX, "A", UTF8_MX_IP)
    rcpt = "jörg@utf8.test"
    with Peer(host=UTF8_MX_IP, hostname=UTF8_MX, smtputf8=smtputf8) as peer:
        coord = start(peer.port)
        inject(coord, rcpt)
        rec = outcome(cluster, coord, rcpt)
        if smtputf8:
            assert rec["type"] == "Delivery", rec
            (seen,) = peer.received
            assert seen.rcpt_tos == [rcpt] and "SMTPUTF8" in seen.options
            return
        assert rec["type"] == "Bounce", rec
        assert rec["response"]["code"] == 553
        assert rec["response"]["enhanced_code"] == {"class": 5, "subject": 6, "detail": 7}
        assert not peer.received and not peer.handler.rcpts
        wait_for(lambda: messages_kept(coord) == 0, 10, "the bounced message to be dropped")


# -- DNS answers that expire at once ---------------------------------------------------------


@pytest.mark.parametrize("case", ["mx-ttl-0", "nxdomain-negative-ttl-0"])
def test_answers_with_ttl_0_are_used(
    start: Start, cluster: Cluster, dns: FakeDNS, case: str
) -> None:
    # TTL 0 is legal (RFC 2181 8): the answer still serves the mail that waited for it,
    # rather than sending the queue back to DNS again and again.
    if case == "mx-ttl-0":
        domain, expected = "ttl0.test", "Delivery"
        dns.add(domain, "MX", f"10 {MX1}.", ttl=0)
    else:
        domain, expected = "nx.test", "Bounce"
        dns.soa_minimum = 0  # NXDOMAIN, negatively cached for 0 s (RFC 2308)
    with Peer(host=MX1_IP, hostname=MX1) as peer:
        coord = start(peer.port)
        inject(coord, f"r0@{domain}")
        rec = outcome(cluster, coord, f"r0@{domain}")
        queries = dns.count(domain, "MX")
        assert rec["type"] == expected, rec
        assert queries < 20, f"{queries} MX queries for one message"
        assert len(peer.received) == (expected == "Delivery")
