"""End to end: ZeroMQ injection, the coordinator, one worker per source, SMTP from its own IP."""

from __future__ import annotations

import base64
import contextlib
import os
import random
import signal
import socket
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest
import zmq

from kumopy.client import Client, Message
from kumopy.harness import wait_for
from tests.conftest_procs import Cluster, MakePolicy
from tests.policies import boot, send

pytestmark = pytest.mark.integration

POLICY = """
import os
SINK = os.environ["TEST_SINK"]

@kumo.on("init")
def init():
    kumo.define_egress_source(name="a", source_address="127.0.0.2", ehlo_domain="a.mta.test")
    kumo.define_egress_source(name="b", source_address="127.0.0.3", ehlo_domain="b.mta.test")
    kumo.define_egress_source(name="c", source_address="127.0.0.4", ehlo_domain="c.mta.test")
    kumo.define_egress_pool(name="p12", entries=[{"name": "a", "weight": 1},
                                                 {"name": "b", "weight": 2}])
    kumo.define_egress_pool(name="pbc", entries=[{"name": "b"}, {"name": "c"}])

@kumo.on("get_queue_config")
def qc(domain, tenant, campaign, routing_domain):
    pool = {"one": "p12", "two": "pbc"}.get(tenant, "unspecified")
    return kumo.make_queue_config(egress_pool=pool, mx_list=[SINK])
"""

IPS = {"a": "127.0.0.2", "b": "127.0.0.3", "c": "127.0.0.4"}
EHLO = {"127.0.0.2": "a.mta.test", "127.0.0.3": "b.mta.test", "127.0.0.4": "c.mta.test"}


def test_two_tenants_leave_from_their_pools_ips_with_their_ehlo(
    cluster: Cluster, make_policy: MakePolicy
) -> None:
    coord, records = boot(
        cluster, make_policy, policy=make_policy(POLICY), extra=("--credit", "2000")
    )
    endpoint = coord.info["endpoint"]
    one = send(endpoint, 300, "one-", tenant="one")
    two = send(endpoint, 100, "two-", tenant="two")
    recs = records.wait_count(400, 60)
    by_rcpt = {r["rcpt_to"][0]: r for r in recs}
    assert set(by_rcpt) == set(one) | set(two)
    for r in recs:
        assert r["helo"] == EHLO[r["peer_ip"]], r
    ips_one = Counter(by_rcpt[x]["peer_ip"] for x in one)
    ips_two = Counter(by_rcpt[x]["peer_ip"] for x in two)
    assert set(ips_one) == {"127.0.0.2", "127.0.0.3"}
    assert set(ips_two) == {"127.0.0.3", "127.0.0.4"}  # b serves both pools
    # Weights 1:2 give exactly 1:2 (smooth WRR per pool, whatever the dispatch order).
    assert ips_one == {"127.0.0.2": 100, "127.0.0.3": 200}
    assert ips_two == {"127.0.0.3": 50, "127.0.0.4": 50}
    # The delivery records name pool, source and the actual source IP.
    wait_for(
        lambda: sum(r["type"] == "Delivery" for r in cluster.records(coord)) == 400,
        30,
        "400 Delivery records",
    )
    deliveries = [r for r in cluster.records(coord) if r["type"] == "Delivery"]
    for d in deliveries:
        assert d["source_address"]["address"] == IPS[d["egress_source"]]
        assert d["egress_pool"] in ("p12", "pbc")
        assert d["response"]["code"] == 250 and d["peer_address"]["addr"] == "127.0.0.1"
    receptions = [r for r in cluster.records(coord) if r["type"] == "Reception"]
    assert len(receptions) == 400


@pytest.mark.parametrize("impl", ["c", "py"])
def test_weights_hold_in_every_window(cluster: Cluster, make_policy: MakePolicy, impl: str) -> None:
    env = {"KUMOPY_NO_EXTENSIONS": "1" if impl == "py" else ""}
    coord, records = boot(
        cluster, make_policy, policy=make_policy(POLICY), extra=("--credit", "2000"), env=env
    )
    endpoint = coord.info["endpoint"]
    with Client(endpoint) as client:
        assert client.request("status")["fast_impl"] == impl
    rcpts = send(endpoint, 90, "w-", tenant="one")
    records.wait_count(90, 60)
    wait_for(
        lambda: sum(r["type"] == "Delivery" for r in cluster.records(coord)) == 90,
        30,
        "Delivery records",
    )
    picks = {
        r["recipient"]: r["egress_source"]
        for r in cluster.records(coord)
        if r["type"] == "Delivery"
    }
    # Recipients were injected in order and the pool's picks are taken in order: every
    # window of three consecutive messages holds exactly one from a and two from b.
    order = [picks[r] for r in rcpts]
    for i in range(0, 90, 3):
        assert Counter(order[i : i + 3]) == {"a": 1, "b": 2}, (i, order[i : i + 3])


SHARED_POLICY = """
import os
SINK = os.environ["TEST_SINK"]

def init():
    kumo.define_egress_source(name="plain")
    kumo.define_egress_source(name="x1", source_address="127.0.0.9", ehlo_domain="x1.mta.test")
    kumo.define_egress_source(name="x2", source_address="127.0.0.9", ehlo_domain="x2.mta.test")
    kumo.define_egress_pool(name="plain", entries=[{"name": "plain"}])
    kumo.define_egress_pool(name="shared", entries=[{"name": "x1"}, {"name": "x2"}])

def qc(domain, tenant, campaign, routing_domain):
    return kumo.make_queue_config(egress_pool=tenant or "unspecified", mx_list=[SINK])

kumo.on("init", init)
kumo.on("get_queue_config", qc)
"""


def test_default_address_and_shared_ip(cluster: Cluster, make_policy: MakePolicy) -> None:
    body = SHARED_POLICY
    coord, records = boot(cluster, make_policy, policy=make_policy(body))
    endpoint = coord.info["endpoint"]
    send(endpoint, 4, "p-", tenant="plain")
    send(endpoint, 10, "s-", tenant="shared")
    send(endpoint, 2, "u-")
    recs = records.wait_count(16, 60)
    import socket

    host = socket.gethostname()
    plain = [r for r in recs if r["rcpt_to"][0].startswith(("p-", "u-"))]
    assert {r["peer_ip"] for r in plain} == {"127.0.0.1"}
    assert {r["helo"] for r in plain} == {host}
    shared = [r for r in recs if r["rcpt_to"][0].startswith("s-")]
    assert {r["peer_ip"] for r in shared} == {"127.0.0.9"}
    assert Counter(r["helo"] for r in shared) == {"x1.mta.test": 5, "x2.mta.test": 5}


def test_bad_injections_are_answered_and_the_coordinator_keeps_serving(
    cluster: Cluster, make_policy: MakePolicy
) -> None:
    coord, records = boot(cluster, make_policy, policy=make_policy(POLICY))
    endpoint = coord.info["endpoint"]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        from kumopy.ipc.framing import decode_header

        for frames, reason in [
            ([b"\xc1garbage"], "not valid msgpack"),
            ([b"\x81\xa1v\x09"], "unsupported protocol version"),
            ([b"\x82\xa1v\x01\xa4kind\xa5other"], "unknown request kind"),
        ]:
            sock.send_multipart(frames)
            assert sock.poll(10_000)
            reply = decode_header(sock.recv())
            assert reply["ok"] is False and reason in reply["error"]["message"]
    finally:
        sock.close(0)
        ctx.term()
    with Client(endpoint) as client:
        bad = client.send_batch(
            [
                Message("s@src.test", ["evil@dst.test\r\nDATA"], b"x"),
                Message("s@src.test", [], b"x"),
                Message(
                    "s@src.test", ["ok@dst.test"], b"Subject: ok\r\n\r\nfine\r\n", tenant="one"
                ),
                Message("s@src.test", ["big@dst.test"], b"x" * (51 * 1024 * 1024)),
            ]
        )
    assert [r.ok for r in bad] == [False, False, True, False]
    assert "control" in str(bad[0].error)
    assert "non-empty" in str(bad[1].error)
    assert "exceeds" in str(bad[3].error)
    recs = records.wait_count(1, 30)
    assert recs[0]["rcpt_to"] == ["ok@dst.test"]


def test_body_line_endings_and_dots_are_exact_on_the_wire(
    cluster: Cluster, make_policy: MakePolicy
) -> None:
    coord, records = boot(cluster, make_policy, policy=make_policy(POLICY), sink_raw=True)
    endpoint = coord.info["endpoint"]
    body = b"Subject: dots\r\n\r\n.leading dot\r\n..two\n.bare-lf\rbare-cr\r\n.\r\nend"
    with Client(endpoint) as client:
        assert client.send("s@src.test", "dots@dst.test", body, tenant="one").ok
    rec = records.wait_count(1, 30)[0]
    raw = base64.b64decode(rec["raw"])
    want = (
        b"Subject: dots\r\n\r\n..leading dot\r\n...two\r\n..bare-lf\r\nbare-cr\r\n"
        b"..\r\nend\r\n.\r\n"
    )
    assert raw == want
    assert rec["bare_lf_or_cr"] is False
    assert base64.b64decode(rec["data"]) == (
        b"Subject: dots\r\n\r\n.leading dot\r\n..two\r\n.bare-lf\r\nbare-cr\r\n.\r\nend\r\n"
    )


def test_killed_worker_is_restarted_and_its_messages_delivered(
    cluster: Cluster, make_policy: MakePolicy
) -> None:
    coord, records = boot(cluster, make_policy, policy=make_policy(POLICY))
    endpoint = coord.info["endpoint"]
    with Client(endpoint) as client:
        pids = {name: v for name, v in client.request("status")["workers"].items()}
    victim = pids["b"]
    rcpts = send(endpoint, 600, "k-", tenant="one")
    os.kill(victim, signal.SIGKILL)
    # Duplicates are allowed (at-least-once), so wait for the set, not a count.
    wait_for(
        lambda: set(rcpts) <= {r["rcpt_to"][0] for r in records.refresh()},
        90,
        "every recipient at the sink",
    )

    def restarted() -> bool:
        with Client(endpoint) as client:
            st = client.request("status")
        return st["workers"]["b"] not in (None, victim) and st["sources"]["b"]["credit"] > 0

    wait_for(restarted, 30, "worker b to be restarted")
    more = set(send(endpoint, 30, "k2-", tenant="one"))
    wait_for(lambda: more <= {r["rcpt_to"][0] for r in records.refresh()}, 60, "30 more")
    later = Counter(r["peer_ip"] for r in records.records if r["rcpt_to"][0] in more)
    assert later == {"127.0.0.2": 10, "127.0.0.3": 20}


def test_worker_that_cannot_bind_fails_at_boot_without_a_restart_storm(
    cluster: Cluster, make_policy: MakePolicy
) -> None:
    body = POLICY.replace('source_address="127.0.0.4"', 'source_address="192.0.2.44"')
    coord, records = boot(cluster, make_policy, policy=make_policy(body))
    endpoint = coord.info["endpoint"]
    with Client(endpoint) as client:
        st = client.request("status")
    assert st["sources"]["c"]["live"] is False
    assert "failed at boot" in st["failures"]["c"]
    # Pool pbc still sends, through b alone.
    rcpts = send(endpoint, 10, "f-", tenant="two")
    recs = records.wait_count(10, 30)
    assert {r["peer_ip"] for r in recs if r["rcpt_to"][0] in set(rcpts)} == {"127.0.0.3"}


def test_queue_without_mx_list_or_pool_waits_with_a_clear_reason(
    cluster: Cluster, make_policy: MakePolicy
) -> None:
    # No mx_list: the queue's MX records are looked up, and the only DNS server is silent.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        dns = f"127.0.0.1:{silent.getsockname()[1]}"
        body = POLICY.replace("mx_list=[SINK]", "mx_list=None if tenant == 'nomx' else [SINK]")
        body = body.replace(
            '.get(tenant, "unspecified")',
            '.get(tenant, "nosuchpool" if tenant == "badpool" else "unspecified")',
        )
        body += f'kumo.dns.configure_resolver(name_servers=["{dns}"], timeout="0.3s")\n'
        coord, _ = boot(cluster, make_policy, policy=make_policy(body))
        endpoint = coord.info["endpoint"]
        send(endpoint, 1, "n-", tenant="nomx")
        send(endpoint, 1, "b-", tenant="badpool")

        def reasons() -> dict[str, str]:
            return {
                r["recipient"]: r["response"]["content"]
                for r in cluster.records(coord)
                if r["type"] == "TransientFailure"
            }

        got = wait_for(lambda: len(reasons()) == 2 and reasons(), 30, "two TransientFailures")
    nomx = got["n-0@dst.test"]
    assert "MX records of dst.test" in nomx and dns in nomx, nomx
    assert "nosuchpool" in got["b-0@dst.test"]
    with Client(endpoint) as client:
        assert client.request("status")["messages"] == 2  # kept, waiting for a retry


def _random_value(rng: random.Random, depth: int = 0) -> object:
    choices: list[Callable[[], object]] = [
        lambda: rng.randint(-(2**40), 2**40),
        lambda: rng.random(),
        lambda: "".join(chr(rng.randint(0, 0x2FF)) for _ in range(rng.randint(0, 12))),
        lambda: rng.randbytes(rng.randint(0, 12)),
        lambda: None,
        lambda: rng.choice([True, False]),
    ]
    if depth < 3:
        choices.append(lambda: [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))])
        choices.append(
            lambda: {
                rng.choice(
                    ["sender", "recipients", "data", "id", "meta", "tenant", "x"]
                ): _random_value(rng, depth + 1)
                for _ in range(rng.randint(0, 5))
            }
        )
    return rng.choice(choices)()


def test_random_malformed_requests_never_stop_the_coordinator(
    cluster: Cluster, make_policy: MakePolicy
) -> None:
    coord, records = boot(cluster, make_policy, policy=make_policy(POLICY))
    endpoint = coord.info["endpoint"]
    rng = random.Random(1234)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        for i in range(300):
            kind = rng.choice(["inject", "inject", "status", "ping", "nope", 5])
            header: dict[str, object] = {"v": rng.choice([1, 1, 1, 2, "1"]), "kind": kind, "req": i}
            if rng.random() < 0.8:
                header["messages"] = (
                    _random_value(rng)
                    if rng.random() < 0.3
                    else [_random_value(rng) for _ in range(rng.randint(0, 4))]
                )
            frames = [
                msgpack.packb(header, use_bin_type=True)
                if rng.random() < 0.9
                else rng.randbytes(rng.randint(0, 40))
            ]
            frames += [rng.randbytes(rng.randint(0, 50)) for _ in range(rng.randint(0, 3))]
            sock.send_multipart(frames)
        answered = 0
        while sock.poll(2000):
            sock.recv_multipart()
            answered += 1
    finally:
        sock.close(0)
        ctx.term()
    assert answered >= 250  # frames that are not a header at all get no answer
    with Client(endpoint) as client:
        assert client.send(
            "s@src.test", "after-fuzz@dst.test", b"Subject: ok\r\n\r\nx\r\n", tenant="one"
        ).ok
    wait_for(
        lambda: any(r["rcpt_to"] == ["after-fuzz@dst.test"] for r in records.refresh()),
        30,
        "the message after the fuzzing",
    )


def test_a_hung_worker_is_terminated_and_restarted(
    cluster: Cluster, make_policy: MakePolicy
) -> None:
    coord, records = boot(
        cluster, make_policy, policy=make_policy(POLICY), extra=("--heartbeat-timeout", "2.5")
    )
    endpoint = coord.info["endpoint"]
    with Client(endpoint) as client:
        victim = client.request("status")["workers"]["b"]
    os.kill(victim, signal.SIGSTOP)  # alive but silent: only the missing heartbeat tells
    try:

        def replaced() -> bool:
            with Client(endpoint) as client:
                st = client.request("status")
            return st["workers"]["b"] not in (None, victim) and st["sources"]["b"]["credit"] > 0

        wait_for(replaced, 30, "the hung worker to be replaced")
    finally:
        # SIGCONT lets a SIGTERM still pending on a stopped process take effect, if any.
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGCONT)
    with contextlib.suppress(ProcessLookupError):
        os.kill(victim, 0)
        raise AssertionError(f"hung worker {victim} still exists")
    more = set(send(endpoint, 30, "h-", tenant="one"))
    wait_for(lambda: more <= {r["rcpt_to"][0] for r in records.refresh()}, 30, "30 more")
    assert Counter(r["peer_ip"] for r in records.records if r["rcpt_to"][0] in more) == {
        "127.0.0.2": 10,
        "127.0.0.3": 20,
    }


def test_connection_shaping_options_reach_the_workers(
    cluster: Cluster, make_policy: MakePolicy
) -> None:
    extra = ("--connection-limit", "1", "--max-deliveries-per-connection", "5")
    coord, records = boot(cluster, make_policy, policy=make_policy(POLICY), extra=extra)
    endpoint = coord.info["endpoint"]
    rcpts = set(send(endpoint, 20, "sh-", tenant="two"))  # pool pbc: b and c, 10 each
    wait_for(lambda: rcpts <= {r["rcpt_to"][0] for r in records.refresh()}, 30, "20 messages")
    conns: dict[str, set[int]] = {}
    for r in records.records:
        conns.setdefault(r["peer_ip"], set()).add(r["conn"])
    # One connection at a time per source, replaced after every 5 messages.
    assert {ip: len(c) for ip, c in conns.items()} == {"127.0.0.3": 2, "127.0.0.4": 2}


def test_bad_shaping_option_is_refused_before_starting(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "kumopy",
            "run",
            "--connection-limit",
            "0",
            "--spool",
            str(tmp_path / "s"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "--connection-limit must be at least 1" in out.stderr
