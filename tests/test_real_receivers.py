"""Sending to real receivers: MX lookups (kumopy.fakedns on loopback), sites, paths, families.

Every test runs a FakeDNS in this process and a real coordinator whose policy points its resolver
at it; the MX hosts are sinks on 127.0.0.x addresses sharing one port, which the egress path
config names as its smtp_port.
"""

from __future__ import annotations

import json
import socket
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import dns.rcode
import pytest

from kumopy.client import Client, Message
from kumopy.fakedns import FakeDNS
from kumopy.harness import Proc, SinkRecords, wait_for
from kumopy.inject import make_body
from tests.conftest_procs import Cluster, MakePolicy

pytestmark = pytest.mark.integration

MX1, MX2, DEAD = "127.0.0.11", "127.0.0.12", "127.0.0.13"
"""Two live sinks, and an address where nothing listens (connections are refused)."""

POLICY = """
import json
import os

PORT = int(os.environ["TEST_SMTP_PORT"])
NOTES = os.environ["TEST_NOTES"]
SOURCES = json.loads(os.environ["TEST_SOURCES"])
POOLS = json.loads(os.environ["TEST_POOLS"])
MX_LISTS = json.loads(os.environ["TEST_MX_LISTS"])
PATHS = json.loads(os.environ["TEST_PATHS"])

kumo.dns.configure_resolver(name_servers=[os.environ["TEST_DNS"]],
                            timeout=os.environ["TEST_DNS_TIMEOUT"])


def note(*words):
    with open(NOTES, "a") as fh:
        fh.write(json.dumps(words) + "\\n")


@kumo.on("init")
def init():
    for name, address in SOURCES.items():
        kumo.define_egress_source(name=name, source_address=address,
                                  ehlo_domain=name + ".mta.test")
    for name, entries in POOLS.items():
        kumo.define_egress_pool(name=name,
                                entries=[{"name": s, "weight": w} for s, w in entries])


@kumo.on("get_queue_config")
def qc(domain, tenant, campaign, routing_domain):
    note("queue", domain, tenant, campaign, routing_domain)
    # Retries an hour away: a test sees each message's first attempt only.
    return kumo.make_queue_config(egress_pool="p", mx_list=MX_LISTS.get(domain),
                                  retry_interval="1h", max_age="1d")


@kumo.on("get_egress_path_config")
def path(routing_domain, egress_source, site_name):
    note("path", routing_domain, egress_source, site_name)
    options = {"smtp_port": PORT, **PATHS.get("*", {}), **PATHS.get(egress_source, {})}
    return kumo.make_egress_path(**options)
"""
"""One policy for every test, set by environment: sources {name: address}, pools {name:
[[source, weight], ...]} (every queue uses pool `p`), mx_list by domain, and path options for
every source ("*") and per source. Each get_queue_config and get_egress_path_config call is
noted as a JSON line in $TEST_NOTES."""

OPEN: dict[str, dict[str, Any]] = {"*": {"prohibited_hosts": []}}
"""Path options that let mail go to the 127.x sinks."""

TWO_V4 = {"a": "127.0.0.2", "b": "127.0.0.3"}
PAIR = {"p": [["a", 1], ["b", 1]]}


class Rig:
    """One coordinator on POLICY, and what its policy handlers noted."""

    def __init__(self, cluster: Cluster, coord: Proc, notes: Path) -> None:
        self.cluster = cluster
        self.coord = coord
        self.notes_path = notes

    @property
    def endpoint(self) -> str:
        """Return the coordinator's ingress endpoint."""
        return str(self.coord.info["endpoint"])

    def notes(self, event: str) -> list[list[Any]]:
        """Return the arguments of every call of one policy event, in order."""
        if not self.notes_path.exists():
            return []
        lines = [json.loads(line) for line in self.notes_path.read_text().splitlines() if line]
        return [line[1:] for line in lines if line[0] == event]

    def records(self) -> list[dict[str, Any]]:
        """Return every log record so far."""
        return self.cluster.records(self.coord)

    def inject(self, rcpts: Sequence[str], *, meta: dict[str, Any] | None = None) -> list[str]:
        """Inject one message to each recipient; fail unless all are accepted."""
        msgs = [
            Message(
                "s@src.test",
                [rcpt],
                make_body("s@src.test", rcpt, 300, i),
                meta=dict(meta or {}),
            )
            for i, rcpt in enumerate(rcpts)
        ]
        with Client(self.endpoint) as client:
            results = client.send_batch(msgs)
        assert all(r.ok for r in results), [str(r.error) for r in results if not r.ok][:3]
        return list(rcpts)

    def outcomes(self, rcpts: Sequence[str], timeout: float = 30.0) -> dict[str, dict[str, Any]]:
        """Wait for every recipient's first record after Reception; return them by recipient."""
        want = set(rcpts)

        def found() -> dict[str, dict[str, Any]] | None:
            out: dict[str, dict[str, Any]] = {}
            for r in self.records():
                if r["type"] != "Reception" and r["recipient"] in want:
                    out.setdefault(r["recipient"], r)
            return out if len(out) == len(want) else None

        got: dict[str, dict[str, Any]] = wait_for(found, timeout, f"outcomes of {sorted(want)}")
        return got

    def after_reception(self, rcpt: str) -> list[dict[str, Any]]:
        """Return every record of one recipient after its Reception."""
        return [r for r in self.records() if r["type"] != "Reception" and r["recipient"] == rcpt]

    def status(self) -> dict[str, Any]:
        """Return the coordinator's status."""
        with Client(self.endpoint) as client:
            status: dict[str, Any] = client.request("status")
        return status


@pytest.fixture
def fake() -> Iterator[FakeDNS]:
    """A DNS server on loopback that this process scripts."""
    with FakeDNS() as server:
        yield server


def sinks(
    cluster: Cluster, *hosts: str, extra: tuple[str, ...] = ()
) -> tuple[int, dict[str, SinkRecords]]:
    """Start one sink on each address, all on one free port; return it and their records."""
    first, records = cluster.sink(name=f"sink-{hosts[0]}", host=hosts[0], extra=extra)
    port = int(first.info["port"])
    out = {hosts[0]: records}
    for host in hosts[1:]:
        # The sink's last --listen wins: the same port on another loopback address.
        listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        _, out[host] = cluster.sink(
            name=f"sink-{host}", host=host, extra=("--listen", listen, *extra)
        )
    return port, out


def boot(
    cluster: Cluster,
    make_policy: MakePolicy,
    dns_address: str,
    port: int,
    *,
    name: str = "coord",
    sources: dict[str, str] | None = None,
    pools: dict[str, list[list[Any]]] | None = None,
    paths: dict[str, dict[str, Any]] | None = None,
    mx_lists: dict[str, list[str]] | None = None,
    dns_timeout: str = "1s",
) -> Rig:
    """Start a coordinator on POLICY resolving through `dns_address`."""
    notes = cluster.tmp / f"{name}-notes.jsonl"
    env = {
        "TEST_DNS": dns_address,
        "TEST_DNS_TIMEOUT": dns_timeout,
        "TEST_SMTP_PORT": str(port),
        "TEST_NOTES": str(notes),
        "TEST_SOURCES": json.dumps(sources or TWO_V4),
        "TEST_POOLS": json.dumps(pools or PAIR),
        "TEST_MX_LISTS": json.dumps(mx_lists or {}),
        "TEST_PATHS": json.dumps(OPEN if paths is None else paths),
    }
    coord = cluster.coordinator(make_policy(POLICY), name=name, env=env)
    return Rig(cluster, coord, notes)


def delivered_at(records: SinkRecords) -> set[str]:
    """Return the recipients a sink took with a 250."""
    return {rcpt for r in records.refresh() if r["code"] == 250 for rcpt in r["rcpt_to"]}


def response(record: dict[str, Any]) -> tuple[int, str, str]:
    """Return (code, enhanced code, text) of a record's response."""
    resp = record["response"]
    enhanced = resp["enhanced_code"] or {}
    dotted = ".".join(str(enhanced.get(k)) for k in ("class", "subject", "detail"))
    return int(resp["code"]), dotted, str(resp["content"])


def ipv6_loopback() -> bool:
    """Return True when ::1 can be bound here (an IPv6 source on loopback)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


# -- MX preference -------------------------------------------------------------------------------


def test_mx_hosts_are_tried_in_preference_order(
    cluster: Cluster, make_policy: MakePolicy, fake: FakeDNS
) -> None:
    port, at = sinks(cluster, MX1, MX2)
    # down.test: the preferred host refuses connections, the next one takes the mail.
    fake.add("down.test", "MX", "10 mx1.down.test.")
    fake.add("down.test", "MX", "20 mx2.down.test.")
    fake.add("mx1.down.test", "A", DEAD)
    fake.add("mx2.down.test", "A", MX2)
    # up.test: both hosts live; the lower preference gets everything.
    fake.add("up.test", "MX", "20 mx2.up.test.")
    fake.add("up.test", "MX", "10 mx1.up.test.")
    fake.add("mx1.up.test", "A", MX1)
    fake.add("mx2.up.test", "A", MX2)
    rig = boot(cluster, make_policy, fake.address, port)

    down = rig.inject([f"d{i}@down.test" for i in range(3)])
    up = rig.inject([f"u{i}@up.test" for i in range(6)])
    got = rig.outcomes(down + up)
    for rcpt in down:
        rec = got[rcpt]
        assert rec["type"] == "Delivery", rec
        assert rec["num_attempts"] == 1, rec
        assert rec["peer_address"] == {"name": "mx2.down.test", "addr": MX2}, rec
        assert rec["site"] == "mx1.down.test,mx2.down.test", rec
        assert rig.after_reception(rcpt) == [rec]  # no TransientFailure before it
    for rcpt in up:
        rec = got[rcpt]
        assert rec["type"] == "Delivery", rec
        assert rec["peer_address"] == {"name": "mx1.up.test", "addr": MX1}, rec
    wait_for(lambda: set(up) <= delivered_at(at[MX1]), 10, "up.test mail at mx1")
    wait_for(lambda: set(down) <= delivered_at(at[MX2]), 10, "down.test mail at mx2")
    assert not delivered_at(at[MX1]) & set(down)
    assert not delivered_at(at[MX2]) & set(up)


def test_equal_preferences_spread_over_both_hosts(
    cluster: Cluster, make_policy: MakePolicy, fake: FakeDNS
) -> None:
    port, at = sinks(cluster, MX1, MX2)
    fake.add("eq.test", "MX", "10 mx1.eq.test.")
    fake.add("eq.test", "MX", "10 mx2.eq.test.")
    fake.add("mx1.eq.test", "A", MX1)
    fake.add("mx2.eq.test", "A", MX2)
    # One message per connection: each new connection draws the order of the hosts again.
    paths = {"*": {"prohibited_hosts": [], "max_deliveries_per_connection": 1}}
    rig = boot(cluster, make_policy, fake.address, port, paths=paths)
    rcpts = rig.inject([f"e{i}@eq.test" for i in range(24)])
    got = rig.outcomes(rcpts)
    assert {r["type"] for r in got.values()} == {"Delivery"}
    hosts = Counter(r["peer_address"]["addr"] for r in got.values())
    # Random among equals: both get some (each one misses with probability 2**-23).
    assert set(hosts) == {MX1, MX2}, hosts
    wait_for(
        lambda: len(delivered_at(at[MX1]) | delivered_at(at[MX2])) == 24, 10, "24 at the sinks"
    )
    assert len(delivered_at(at[MX1])) == hosts[MX1]


# -- what the DNS answer says ---------------------------------------------------------------------


def test_dns_answers_decide_delivery_bounce_or_retry(
    cluster: Cluster, make_policy: MakePolicy, fake: FakeDNS
) -> None:
    port, at = sinks(cluster, MX1)
    fake.add("implicit.test", "A", MX1)  # no MX: the domain's own address (RFC 5321 5.1)
    fake.add("null.test", "MX", "0 .")  # RFC 7505
    fake.add("sf.test", "A", MX1)
    fake.set_rcode("sf.test", dns.rcode.SERVFAIL)
    fake.add("slow.test", "MX", "10 mx.slow.test.")
    fake.add("mx.slow.test", "A", MX1)
    # Under the per-try wait (timeout 1 s over 2 attempts = 0.5 s): answered in time.
    fake.set_delay("slow.test", 0.3)
    rig = boot(cluster, make_policy, fake.address, port)

    rcpts = rig.inject(["x@implicit.test", "x@null.test", "x@nx.test", "x@sf.test", "x@slow.test"])
    got = rig.outcomes(rcpts)

    implicit = got["x@implicit.test"]
    assert implicit["type"] == "Delivery", implicit
    assert implicit["peer_address"] == {"name": "implicit.test", "addr": MX1}, implicit
    assert implicit["site"] == "implicit.test"

    null = got["x@null.test"]
    assert null["type"] == "Bounce", null
    code, enhanced, text = response(null)
    assert (code, enhanced) == (556, "5.1.10"), null
    assert "null MX" in text, text

    nx = got["x@nx.test"]
    assert nx["type"] == "Bounce", nx
    code, enhanced, text = response(nx)
    assert (code, enhanced) == (550, "5.1.2"), nx
    assert "NXDOMAIN" in text and "nx.test" in text, text

    sf = got["x@sf.test"]
    assert sf["type"] == "TransientFailure", sf
    code, enhanced, text = response(sf)
    assert (code, enhanced) == (451, "4.4.3"), sf
    assert "SERVFAIL" in text and fake.address in text, text

    slow = got["x@slow.test"]
    assert slow["type"] == "Delivery", slow
    assert slow["peer_address"] == {"name": "mx.slow.test", "addr": MX1}, slow
    assert fake.count("slow.test", "MX") >= 1

    both = {"x@implicit.test", "x@slow.test"}
    wait_for(lambda: both <= delivered_at(at[MX1]), 10, "two messages at the sink")
    # Only the SERVFAIL message is kept, for a retry; the bounces are gone.
    wait_for(lambda: rig.status()["messages"] == 1, 10, "one message left in the spool")
    assert [r["type"] for r in rig.after_reception("x@sf.test")] == ["TransientFailure"]


def test_a_dns_server_that_never_answers_is_named(
    cluster: Cluster, make_policy: MakePolicy
) -> None:
    # Bound, so no ICMP refusal comes back: the queries simply time out.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        server = f"127.0.0.1:{silent.getsockname()[1]}"
        port, _ = sinks(cluster, MX1)
        rig = boot(cluster, make_policy, server, port, dns_timeout="0.5s")
        (rcpt,) = rig.inject(["x@nodns.test"])
        rec = rig.outcomes([rcpt])[rcpt]
        assert rec["type"] == "TransientFailure", rec
        code, enhanced, text = response(rec)
        assert (code, enhanced) == (451, "4.4.3"), rec
        assert "MX records of nodns.test" in text, text
        assert "timed out" in text and server in text, text
        assert rig.status()["messages"] == 1


def test_an_answer_with_a_zero_ttl_is_used_for_the_mail_that_waited_for_it(
    cluster: Cluster, make_policy: MakePolicy, fake: FakeDNS
) -> None:
    port, _ = sinks(cluster, MX1)
    fake.add("zmx.test", "MX", "10 mx.zmx.test.", ttl=0)  # TTL 0: legal, "do not cache"
    fake.add("mx.zmx.test", "A", MX1)
    fake.add("za.test", "MX", "10 mx.za.test.")
    fake.add("mx.za.test", "A", MX1, ttl=0)
    rig = boot(cluster, make_policy, fake.address, port)
    rcpts = rig.inject(["x@zmx.test", "x@za.test"])
    try:
        got = rig.outcomes(rcpts, timeout=5)
    finally:
        queries = {
            "zmx.test MX": fake.count("zmx.test", "MX"),
            "mx.za.test A": fake.count("mx.za.test", "A"),
        }
    assert {r["type"] for r in got.values()} == {"Delivery"}, got
    # Looked up for the waiting mail, not again and again.
    assert max(queries.values()) <= 5, queries


# -- sites -----------------------------------------------------------------------------------------


def test_domains_with_the_same_mx_hosts_share_a_site_and_its_path_config(
    cluster: Cluster, make_policy: MakePolicy, fake: FakeDNS
) -> None:
    port, at = sinks(cluster, MX1)
    for domain in ("one.test", "two.test"):
        fake.add(domain, "MX", "10 mx.shared.test.")
    fake.add("mx.shared.test", "A", MX1)
    rig = boot(cluster, make_policy, fake.address, port)
    first = rig.inject([f"f{i}@one.test" for i in range(4)])
    rig.outcomes(first)
    second = rig.inject([f"s{i}@two.test" for i in range(4)])
    got = rig.outcomes(first + second)
    assert {r["type"] for r in got.values()} == {"Delivery"}, got
    assert {r["site"] for r in got.values()} == {"mx.shared.test"}
    assert {r["queue"] for r in got.values()} == {"one.test", "two.test"}
    # Both sources sent (equal weights), each asked about the site once, for the first domain.
    assert {r["egress_source"] for r in got.values()} == {"a", "b"}
    calls = rig.notes("path")
    assert sorted(calls) == [
        ["one.test", "a", "mx.shared.test"],
        ["one.test", "b", "mx.shared.test"],
    ], calls
    assert sorted(c[0] for c in rig.notes("queue")) == ["one.test", "two.test"]
    wait_for(lambda: set(first + second) <= delivered_at(at[MX1]), 10, "8 at the sink")
    assert delivered_at(at[MX1]) == set(first + second)


@pytest.mark.parametrize(
    "per_connection",
    [
        pytest.param(1024, id="open-connection-reused"),
        pytest.param(1, id="cached-route-reused"),
    ],
)
def test_same_hosts_in_another_preference_order_keep_their_own_order(
    cluster: Cluster, make_policy: MakePolicy, fake: FakeDNS, per_connection: int
) -> None:
    port, _ = sinks(cluster, MX1, MX2)
    fake.add("mxa.x.test", "A", MX1)
    fake.add("mxb.x.test", "A", MX2)
    fake.add("ab.test", "MX", "10 mxa.x.test.")
    fake.add("ab.test", "MX", "20 mxb.x.test.")
    fake.add("ba.test", "MX", "10 mxb.x.test.")
    fake.add("ba.test", "MX", "20 mxa.x.test.")
    # With one message per connection, no open connection is handed the next domain's mail:
    # what remains is the route cached by site name.
    paths = {"*": {"prohibited_hosts": [], "max_deliveries_per_connection": per_connection}}
    rig = boot(cluster, make_policy, fake.address, port, pools={"p": [["a", 1]]}, paths=paths)
    seen: dict[str, str] = {}
    # One after the other, each waiting for the last: ab, ba, then ab again.
    for rcpt in ("1@ab.test", "2@ba.test", "3@ab.test"):
        rig.inject([rcpt])
        rec = rig.outcomes([rcpt])[rcpt]
        assert rec["type"] == "Delivery", rec
        seen[rcpt] = rec["peer_address"]["addr"]
    assert seen == {"1@ab.test": MX1, "2@ba.test": MX2, "3@ab.test": MX1}


# -- prohibited and skipped hosts -----------------------------------------------------------------


def test_prohibited_hosts_bounce_by_default_but_spare_an_mx_list(
    cluster: Cluster, make_policy: MakePolicy, fake: FakeDNS
) -> None:
    port, at = sinks(cluster, MX1)
    smart, smart_records = cluster.sink(name="smart")  # on 127.0.0.1
    fake.add("loop.test", "MX", "10 mx.loop.test.")
    fake.add("mx.loop.test", "A", MX1)
    # No prohibited_hosts in the path config: KumoMTA's default list applies.
    rig = boot(
        cluster,
        make_policy,
        fake.address,
        port,
        paths={},
        mx_lists={"smart.test": [f"127.0.0.1:{smart.info['port']}"]},
    )
    rcpts = rig.inject(["x@loop.test", "x@smart.test"])
    got = rig.outcomes(rcpts)

    loop = got["x@loop.test"]
    assert loop["type"] == "Bounce", loop
    code, enhanced, text = response(loop)
    assert (code, enhanced) == (550, "5.4.4"), loop
    assert "prohibited_hosts" in text and MX1 in text and "mx.loop.test" in text, text
    assert not delivered_at(at[MX1])

    assert got["x@smart.test"]["type"] == "Delivery", got["x@smart.test"]
    wait_for(lambda: "x@smart.test" in delivered_at(smart_records), 10, "the smart host's mail")


def test_skip_hosts_pass_over_a_host(
    cluster: Cluster, make_policy: MakePolicy, fake: FakeDNS
) -> None:
    port, at = sinks(cluster, MX1, MX2)
    fake.add("skip.test", "MX", "10 mx1.skip.test.")
    fake.add("skip.test", "MX", "20 mx2.skip.test.")
    fake.add("mx1.skip.test", "A", MX1)
    fake.add("mx2.skip.test", "A", MX2)
    fake.add("allskip.test", "MX", "10 mx1.skip.test.")
    paths = {"*": {"prohibited_hosts": [], "skip_hosts": [f"{MX1}/32"]}}
    rig = boot(cluster, make_policy, fake.address, port, paths=paths)
    rcpts = rig.inject([f"s{i}@skip.test" for i in range(3)] + ["x@allskip.test"])
    got = rig.outcomes(rcpts)
    for rcpt in rcpts[:3]:
        rec = got[rcpt]
        assert rec["type"] == "Delivery", rec
        assert rec["num_attempts"] == 1, rec
        assert rec["peer_address"] == {"name": "mx2.skip.test", "addr": MX2}, rec
    # Every host skipped: a transient refusal naming skip_hosts (KumoMTA's newer 451 4.4.4).
    rec = got["x@allskip.test"]
    assert rec["type"] == "TransientFailure", rec
    code, enhanced, text = response(rec)
    assert (code, enhanced) == (451, "4.4.4"), rec
    assert "skip_hosts" in text, text
    assert not delivered_at(at[MX1])


# -- address families ------------------------------------------------------------------------------


def test_an_ipv6_only_site_cannot_be_reached_from_ipv4_sources(
    cluster: Cluster, make_policy: MakePolicy, fake: FakeDNS
) -> None:
    port, _ = sinks(cluster, MX1)
    fake.add("six.test", "MX", "10 mx.six.test.")
    fake.add("mx.six.test", "AAAA", "::1")
    rig = boot(cluster, make_policy, fake.address, port)
    (rcpt,) = rig.inject(["x@six.test"])
    rec = rig.outcomes([rcpt])[rcpt]
    assert rec["type"] == "TransientFailure", rec
    assert rec["egress_source"] is None, rec  # refused before any source tried
    code, _, text = response(rec)
    assert code == 451, rec
    assert "ipv4" in text and "ipv6" in text and "::1" in text, text
    assert "a (ipv4) has no ipv4 route" in text and "b (ipv4) has no ipv4 route" in text, text
    assert rig.status()["messages"] == 1


@pytest.fixture
def v6_source() -> str:
    """::1 as a source address (skip where IPv6 loopback is missing)."""
    if not ipv6_loopback():
        pytest.skip("::1 cannot be bound on this host")
    return "::1"


def test_a_mixed_pool_sends_to_an_ipv4_site_from_its_ipv4_source_only(
    cluster: Cluster, make_policy: MakePolicy, fake: FakeDNS, v6_source: str
) -> None:
    port, at = sinks(cluster, MX1)
    fake.add("four.test", "MX", "10 mx.four.test.")
    fake.add("mx.four.test", "A", MX1)
    rig = boot(
        cluster,
        make_policy,
        fake.address,
        port,
        sources={"v4": "127.0.0.2", "v6": v6_source},
        pools={"p": [["v4", 1], ["v6", 1]]},
    )
    rcpts = rig.inject([f"m{i}@four.test" for i in range(20)])
    got = rig.outcomes(rcpts)
    for rcpt in rcpts:
        assert rig.after_reception(rcpt) == [got[rcpt]], rig.after_reception(rcpt)
        assert got[rcpt]["type"] == "Delivery" and got[rcpt]["num_attempts"] == 1, got[rcpt]
        assert got[rcpt]["egress_source"] == "v4", got[rcpt]
    assert not [r for r in rig.records() if r["type"] == "TransientFailure"]
    wait_for(lambda: set(rcpts) <= delivered_at(at[MX1]), 10, "20 messages at the sink")
    assert {r["peer_ip"] for r in at[MX1].refresh()} == {"127.0.0.2"}


def test_a_dual_stack_host_is_reached_over_each_sources_own_family(
    cluster: Cluster, make_policy: MakePolicy, fake: FakeDNS, v6_source: str
) -> None:
    port, at = sinks(cluster, MX1, "::1")
    fake.add("dual.test", "MX", "10 mx.dual.test.")
    fake.add("mx.dual.test", "A", MX1)
    fake.add("mx.dual.test", "AAAA", "::1")
    rig = boot(
        cluster,
        make_policy,
        fake.address,
        port,
        sources={"v4": "127.0.0.2", "v6": v6_source},
        pools={"p": [["v4", 1], ["v6", 1]]},
    )
    rcpts = rig.inject([f"d{i}@dual.test" for i in range(20)])
    got = rig.outcomes(rcpts)
    assert {r["type"] for r in got.values()} == {"Delivery"}, got
    assert Counter(r["egress_source"] for r in got.values()) == {"v4": 10, "v6": 10}
    for rec in got.values():
        addr = MX1 if rec["egress_source"] == "v4" else "::1"
        assert rec["peer_address"] == {"name": "mx.dual.test", "addr": addr}, rec
    wait_for(lambda: len(delivered_at(at[MX1]) | delivered_at(at["::1"])) == 20, 10, "20 at sinks")
    assert {r["peer_ip"] for r in at[MX1].records} == {"127.0.0.2"}
    assert {r["peer_ip"] for r in at["::1"].records} == {"::1"}


def test_weights_hold_among_the_sources_with_a_route(
    cluster: Cluster, make_policy: MakePolicy, fake: FakeDNS, v6_source: str
) -> None:
    port, at = sinks(cluster, MX1)
    fake.add("four.test", "MX", "10 mx.four.test.")
    fake.add("mx.four.test", "A", MX1)
    rig = boot(
        cluster,
        make_policy,
        fake.address,
        port,
        sources={"a": "127.0.0.2", "b": "127.0.0.3", "v6": v6_source},
        pools={"p": [["a", 1], ["b", 3], ["v6", 2]]},
    )
    rcpts = rig.inject([f"w{i}@four.test" for i in range(40)])
    got = rig.outcomes(rcpts)
    assert {r["type"] for r in got.values()} == {"Delivery"}
    assert Counter(r["egress_source"] for r in got.values()) == {"a": 10, "b": 30}
    wait_for(lambda: set(rcpts) <= delivered_at(at[MX1]), 10, "40 messages at the sink")
    assert Counter(r["peer_ip"] for r in at[MX1].records) == {"127.0.0.2": 10, "127.0.0.3": 30}


# -- routing_domain --------------------------------------------------------------------------------


def test_routing_domain_routes_by_another_domains_mx(
    cluster: Cluster, make_policy: MakePolicy, fake: FakeDNS
) -> None:
    port, at = sinks(cluster, MX1)
    # alias.test is in no zone (NXDOMAIN): only real.test's MX can carry the mail.
    fake.add("real.test", "MX", "10 mx.real.test.")
    fake.add("mx.real.test", "A", MX1)
    rig = boot(cluster, make_policy, fake.address, port)
    (rcpt,) = rig.inject(["x@alias.test"], meta={"routing_domain": "real.test"})
    rec = rig.outcomes([rcpt])[rcpt]
    assert rec["type"] == "Delivery", rec
    assert rec["queue"] == "alias.test!real.test", rec
    assert rec["peer_address"] == {"name": "mx.real.test", "addr": MX1}, rec
    assert rec["site"] == "mx.real.test"
    assert rig.notes("queue") == [["alias.test", None, None, "real.test"]]
    assert {c[0] for c in rig.notes("path")} == {"real.test"}
    assert fake.count("alias.test", "MX") == 0
    wait_for(lambda: rcpt in delivered_at(at[MX1]), 10, "the message at the sink")


# -- per-source path config ------------------------------------------------------------------------


def test_each_source_keeps_its_own_connection_limit(
    cluster: Cluster, make_policy: MakePolicy, fake: FakeDNS
) -> None:
    # Every final reply takes 50 ms: the sources' connections overlap as far as they may.
    port, at = sinks(cluster, MX1, extra=("--slow-delay", "0.05"))
    fake.add("conc.test", "MX", "10 mx.conc.test.")
    fake.add("mx.conc.test", "A", MX1)
    paths: dict[str, dict[str, Any]] = {
        "*": {"prohibited_hosts": []},
        "a": {"connection_limit": 1},
        "b": {"connection_limit": 4},
    }
    rig = boot(cluster, make_policy, fake.address, port, paths=paths)
    rcpts = rig.inject([f"slow-{i}@conc.test" for i in range(80)])
    got = rig.outcomes(rcpts, timeout=60)
    assert {r["type"] for r in got.values()} == {"Delivery"}
    assert Counter(r["egress_source"] for r in got.values()) == {"a": 40, "b": 40}
    recs = wait_for(
        lambda: set(rcpts) <= delivered_at(at[MX1]) and at[MX1].records, 10, "80 at the sink"
    )
    conns: dict[str, set[int]] = {}
    for r in recs:
        conns.setdefault(r["peer_ip"], set()).add(r["conn"])
    assert len(conns["127.0.0.2"]) == 1, conns
    assert 2 <= len(conns["127.0.0.3"]) <= 4, conns
    assert sorted(c[1] for c in rig.notes("path")) == ["a", "b"]
