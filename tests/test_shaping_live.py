"""A shaping file in a running coordinator: provider options reach the wire, and SIGHUP reloads.

The MX records come from kumopy.fakedns on loopback; one sink stands for every MX host, and
what it saw in EHLO tells which path options each (source, site) got.
"""

from __future__ import annotations

import signal
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kumopy.client import Client, Message
from kumopy.fakedns import FakeDNS
from kumopy.harness import SinkRecords, wait_for
from kumopy.inject import make_body
from tests.conftest_procs import Cluster

pytestmark = pytest.mark.integration

MX = "127.0.0.11"
SOURCES = {"a": "127.0.0.2", "b": "127.0.0.3"}

POLICY = """\
import os

from kumopy import kumo

kumo.dns.configure_resolver(name_servers=[os.environ["TEST_DNS"]], timeout="1s")
kumo.load_shaping("shaping.toml")


@kumo.on("init")
def init():
    kumo.define_egress_source(name="a", source_address="127.0.0.2", ehlo_domain="a.mta.test")
    kumo.define_egress_source(name="b", source_address="127.0.0.3", ehlo_domain="b.mta.test")
    kumo.define_egress_pool(name="p", entries=[{"name": "a"}, {"name": "b"}])


@kumo.on("get_queue_config")
def qc(domain, tenant, campaign, routing_domain):
    return kumo.make_queue_config(egress_pool="p", retry_interval="1h", max_age="1d")
"""

SHAPING = """\
# Every path: the sink's port, loopback allowed, one message per connection (so that each
# message's EHLO shows the path config of its moment).
["default"]
smtp_port = PORT
prohibited_hosts = []
max_deliveries_per_connection = 1

# Both test domains' MX hosts end in .gt.test: one provider, whatever the domain.
[provider."gt"]
match = [{MXSuffix = ".gt.test"}]
ehlo_domain = "gt.prov.test"

[provider."gt".sources."a"]
ehlo_domain = "A_EHLO"
"""


@pytest.fixture
def fake() -> Iterator[FakeDNS]:
    """A DNS server on loopback that this process scripts."""
    with FakeDNS() as server:
        yield server


def write_shaping(conf: Path, port: int, a_ehlo: str) -> None:
    """Write conf/shaping.toml for the sink's port, with source a's EHLO name at the provider."""
    text = SHAPING.replace("PORT", str(port)).replace("A_EHLO", a_ehlo)
    (conf / "shaping.toml").write_text(text)


def send(endpoint: str, rcpts: list[str]) -> list[str]:
    """Inject one message to each recipient; fail unless all are accepted."""
    msgs = [
        Message("s@src.test", [r], make_body("s@src.test", r, 200, i)) for i, r in enumerate(rcpts)
    ]
    with Client(endpoint) as client:
        results = client.send_batch(msgs)
    assert all(r.ok for r in results), [str(r.error) for r in results if not r.ok][:3]
    return rcpts


def helos(records: SinkRecords, rcpts: list[str]) -> dict[tuple[str, str], set[str]]:
    """Wait for every recipient at the sink; return the EHLO names by (source address, domain)."""

    def taken() -> list[dict[str, Any]] | None:
        got = [r for r in records.refresh() if r["code"] == 250 and r["rcpt_to"][0] in rcpts]
        return got if {r["rcpt_to"][0] for r in got} == set(rcpts) else None

    seen: dict[tuple[str, str], set[str]] = {}
    for r in wait_for(taken, 30, f"{len(rcpts)} messages at the sink"):
        seen.setdefault((r["peer_ip"], r["rcpt_to"][0].partition("@")[2]), set()).add(r["helo"])
    return seen


def reloads(endpoint: str) -> dict[str, int]:
    """Return the coordinator's reload counters."""
    with Client(endpoint) as client:
        counts: dict[str, int] = client.request("status")["reloads"]
    return counts


def test_provider_options_reach_every_matching_domain_and_reload(
    cluster: Cluster, fake: FakeDNS, tmp_path: Path
) -> None:
    sink, records = cluster.sink(host=MX)
    port = int(sink.info["port"])
    fake.add("one.test", "MX", "10 mx1.gt.test.")
    fake.add("two.test", "MX", "10 mx.eu.gt.test.")
    fake.add("other.test", "MX", "10 mx.other.test.")
    for host in ("mx1.gt.test", "mx.eu.gt.test", "mx.other.test"):
        fake.add(host, "A", MX)
    conf = tmp_path / "conf"
    conf.mkdir()
    write_shaping(conf, port, "a.gt.prov.test")
    (conf / "policy.py").write_text(textwrap.dedent(POLICY))
    coord = cluster.coordinator(str(conf / "policy.py"), env={"TEST_DNS": fake.address})
    ep = str(coord.info["endpoint"])
    a, b = SOURCES["a"], SOURCES["b"]

    first = send(
        ep, [f"{d[0]}{i}@{d}" for d in ("one.test", "two.test", "other.test") for i in range(4)]
    )
    assert helos(records, first) == {
        # The provider's EHLO name for both of its domains, source a's own override first...
        (a, "one.test"): {"a.gt.prov.test"},
        (a, "two.test"): {"a.gt.prov.test"},
        (b, "one.test"): {"gt.prov.test"},
        (b, "two.test"): {"gt.prov.test"},
        # ... and the sources' own names where the provider does not match.
        (a, "other.test"): {"a.mta.test"},
        (b, "other.test"): {"b.mta.test"},
    }

    # A broken shaping file: the reload is refused whole and the running config keeps going.
    (conf / "shaping.toml").write_text('["default"]\nsmtp_port = 0\n')
    coord.signal(signal.SIGHUP)
    wait_for(lambda: reloads(ep)["failed"] == 1, 30, "the refused reload")
    second = send(ep, [f"r{i}@one.test" for i in range(4)])
    assert helos(records, second) == {
        (a, "one.test"): {"a.gt.prov.test"},
        (b, "one.test"): {"gt.prov.test"},
    }

    # A good one: the new path config applies from the next connection on.
    write_shaping(conf, port, "a2.gt.prov.test")
    coord.signal(signal.SIGHUP)
    wait_for(lambda: reloads(ep)["ok"] == 1, 30, "the reload")
    third = send(ep, [f"n{i}@two.test" for i in range(4)])
    assert helos(records, third) == {
        (a, "two.test"): {"a2.gt.prov.test"},
        (b, "two.test"): {"gt.prov.test"},
    }
