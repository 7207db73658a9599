"""kumopy.worker.delivery.Deliverer on uvloop against real peers on loopback."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time
from collections.abc import Callable
from typing import Any

from kumopy.config import EgressSource
from kumopy.hostnames import host_address
from kumopy.ipc.jobs import DELIVERED, PERMANENT, TRANSIENT, Job, JobResult, SiteSpec
from kumopy.smtp.protocol import END_OF_DATA, Timeouts
from kumopy.worker.delivery import Deliverer
from tests.smtp_peer import AiosmtpdPeer, refusing_port, run_deliverer, running_sink

BODY = b"Subject: delivery test\n\nhello\n.dot line\n"


SITES: dict[str, list[tuple[str, str | None, int, int]]] = {}
"""Hosts of each site the tests' jobs name (a worker learns them from SITE messages)."""


def job(job_id: int, hosts: list[tuple[str, int]], *rcpts: str, site: str = "example.net") -> Job:
    """Build a job for the given recipients (default: one ordinary recipient) to these hosts."""
    recipients = list(rcpts) or [f"user{job_id}@example.net"]
    name = f"{site}={hosts}"
    SITES[name] = [
        (h, str(a) if (a := host_address(h)) else None, p, n) for n, (h, p) in enumerate(hosts)
    ]
    return Job(job_id, f"msg-{job_id}", "sender@example.com", recipients, BODY, name)


class SiteDeliverer(Deliverer):
    """A Deliverer that learns each job's site from SITES, with these path settings."""

    def __init__(
        self,
        src: EgressSource,
        on_result: Callable[[JobResult], None],
        hostname: str | None = None,
        timeouts: Timeouts | None = None,
        **config: Any,
    ) -> None:
        super().__init__(src, on_result, hostname=hostname)
        self.config = {**config, "timeouts": dataclasses.asdict(timeouts or Timeouts())}

    def submit(self, job: Job) -> None:
        """Describe the job's site first, as the coordinator's SITE message would."""
        if not self.has_site(job.site):
            self.define_site(SiteSpec(job.site, SITES[job.site], dict(self.config)))
        super().submit(job)


def source(addr: str | None = "127.0.0.2", **kw: Any) -> EgressSource:
    kw.setdefault("ehlo_domain", "mta2.example.com")
    return EgressSource("ip-2", source_address=addr, **kw)


def deliver(
    src: EgressSource, jobs: list[Job], **kw: Any
) -> tuple[list[JobResult], dict[str, Any]]:
    return run_deliverer(lambda on_result: SiteDeliverer(src, on_result, **kw), jobs)


def site_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """Return the stats of the one site a test used."""
    (one,) = stats["sites"].values()
    result: dict[str, Any] = one
    return result


def test_delivers_from_the_source_address_with_its_ehlo_name() -> None:
    with running_sink(raw=True) as sink:
        (result,), stats = deliver(source(), [job(1, [("127.0.0.1", sink.port)])])
        (rec,) = sink.wait_for(1)
    assert rec["peer_ip"] == "127.0.0.2" and rec["helo"] == "mta2.example.com"
    assert rec["data"] == b"Subject: delivery test\r\n\r\nhello\r\n.dot line\r\n"
    assert (result.peer_name, result.peer_addr, result.source_address) == (
        "127.0.0.1",
        "127.0.0.1",
        "127.0.0.2",
    )
    (r,) = result.results
    assert (r.status, r.code, r.enhanced_code, r.command) == (DELIVERED, 250, "2.0.0", END_OF_DATA)
    assert not result.possible_duplicate
    assert stats["delivered"] == 1 and site_stats(stats)["opened"] == 1


def test_ehlo_falls_back_to_given_hostname_then_gethostname() -> None:
    with running_sink() as sink:
        hosts = [("127.0.0.1", sink.port)]
        deliver(source(ehlo_domain=None), [job(1, hosts)], hostname="worker.test")
        deliver(source(None, ehlo_domain=None), [job(2, hosts)])
        first, second = sink.wait_for(2)
    assert first["helo"] == "worker.test"
    assert second["helo"] == socket.gethostname() and second["peer_ip"] == "127.0.0.1"


def test_per_recipient_outcomes_in_one_transaction() -> None:
    with running_sink() as sink:
        rcpts = ["ok@x.test", "reject-1@x.test", "tempfail-1@x.test", "bad\r\n@x.test"]
        (result,), stats = deliver(source(), [job(1, [("127.0.0.1", sink.port)], *rcpts)])
    ok, rejected, deferred, bad = result.results
    assert (ok.status, rejected.status, deferred.status) == (DELIVERED, PERMANENT, TRANSIENT)
    assert (rejected.code, rejected.enhanced_code, rejected.command) == (550, "5.1.1", "RCPT TO")
    assert (deferred.code, deferred.command) == (451, "RCPT TO")
    assert (bad.status, bad.code, bad.enhanced_code, bad.command) == (PERMANENT, 553, "5.1.3", None)
    assert stats["delivered"] == 1 and stats["permanent"] == 2 and stats["transient"] == 1


def test_connections_are_reused_and_grow_with_backlog() -> None:
    with running_sink() as sink:
        jobs = [job(i, [("127.0.0.1", sink.port)]) for i in range(40)]
        results, _ = deliver(source(), jobs, connection_limit=2)
        assert all(r.results[0].status == DELIVERED for r in results)
        assert len(sink.wait_for(40)) == 40 and sink.connections == 2
        assert any(rec["pipelined"] for rec in sink.records)
    with running_sink() as sink:
        hosts = [("127.0.0.1", sink.port)]

        async def one_at_a_time() -> None:
            # Without a backlog the pool must not grow: each job finds the idle connection.
            loop = asyncio.get_running_loop()
            waiter: asyncio.Future[JobResult] = loop.create_future()
            d = SiteDeliverer(source(), lambda r: waiter.set_result(r), connection_limit=32)
            for i in range(5):
                d.submit(job(i, hosts))
                assert (await asyncio.wait_for(waiter, 10)).results[0].status == DELIVERED
                waiter = loop.create_future()
            await d.drain(5)

        asyncio.run(one_at_a_time())
        assert sink.connections == 1 and len(sink.wait_for(5)) == 5


def test_max_deliveries_per_connection() -> None:
    with running_sink() as sink:
        jobs = [job(i, [("127.0.0.1", sink.port)]) for i in range(10)]
        _, stats = deliver(source(), jobs, connection_limit=1, max_deliveries_per_connection=3)
        records = sink.wait_for(10)
    assert sink.connections == 4 and site_stats(stats)["opened"] == 4
    per_conn: dict[int, int] = {}
    for rec in records:
        per_conn[rec["conn"]] = per_conn.get(rec["conn"], 0) + 1
    assert sorted(per_conn.values()) == [1, 3, 3, 3]


def test_recipients_are_split_into_batches() -> None:
    with running_sink() as sink:
        rcpts = [f"r{i}@x.test" for i in range(250)] + ["reject-x@x.test"]
        (result,), _ = deliver(
            source(), [job(1, [("127.0.0.1", sink.port)], *rcpts)], max_recipients_per_batch=100
        )
        records = sink.wait_for(3)
    assert [len(rec["rcpt_to"]) for rec in records] == [100, 100, 50]
    assert [r.status for r in result.results] == [DELIVERED] * 250 + [PERMANENT]


def test_refused_host_is_skipped_for_the_next() -> None:
    with running_sink() as sink, refusing_port() as dead:
        hosts = [("127.0.0.1", dead), ("127.0.0.1", sink.port)]
        (result,), _ = deliver(source(), [job(1, hosts)])
    assert result.results[0].status == DELIVERED
    assert result.peer_addr == "127.0.0.1" and sink.connections == 1


def test_all_hosts_failing_is_transient_for_every_queued_job() -> None:
    with refusing_port() as dead, refusing_port("127.0.0.1") as dead2:
        hosts = [("127.0.0.1", dead), ("127.0.0.1", dead2)]
        results, stats = deliver(
            source(), [job(i, hosts, "a@x.test", "b@x.test") for i in range(5)]
        )
    for result in results:
        for r in result.results:
            assert (r.status, r.code, r.enhanced_code, r.command) == (TRANSIENT, 451, "4.4.1", None)
            assert (
                f"connect to 127.0.0.1:{dead} from 127.0.0.2 failed: Connection refused" in r.text
            )
            assert f"127.0.0.1:{dead2}" in r.text
    assert stats["transient"] == 10


def test_greeting_421_moves_to_the_next_host() -> None:
    with running_sink(greeting_code=421) as busy, running_sink() as sink:
        hosts = [("127.0.0.1", busy.port), ("127.0.0.1", sink.port)]
        (result,), _ = deliver(source(), [job(1, hosts)])
        assert result.results[0].status == DELIVERED and busy.connections == 1
        assert sink.wait_for(1)[0]["peer_ip"] == "127.0.0.2"


def test_timeout_after_the_dot_is_a_possible_duplicate() -> None:
    with running_sink(slow_delay=5.0) as sink:
        hosts = [("127.0.0.1", sink.port)]
        (slow, after), _ = deliver(
            source(),
            [job(1, hosts, "slow-1@x.test"), job(2, hosts)],
            timeouts=Timeouts(data_dot=0.3),
            connection_limit=1,
        )
        assert slow.possible_duplicate and slow.results[0].status == TRANSIENT
        assert "final dot" in slow.results[0].text
        # The broken session is replaced: the next job still goes out, on a new connection.
        assert after.results[0].status == DELIVERED and not after.possible_duplicate
        assert sink.connections == 2


def test_ipv4_source_never_tries_an_ipv6_host() -> None:
    with running_sink("::1") as sink6:
        (result,), _ = deliver(source(), [job(1, [("[::1]", sink6.port)])])
        assert sink6.connections == 0
    (r,) = result.results
    assert (r.status, r.code, r.enhanced_code) == (TRANSIENT, 451, "4.4.4")
    assert "no ipv4 destination host" in r.text and "[::1] is ipv6" in r.text


def test_ipv6_source_to_ipv6_host_and_family_filtering() -> None:
    with running_sink("::1") as sink6, running_sink() as sink4:
        hosts = [("127.0.0.1", sink4.port), ("[::1]", sink6.port)]
        (result,), _ = deliver(source("::1"), [job(1, hosts)])
        assert sink4.connections == 0 and sink6.wait_for(1)[0]["peer_ip"] == "::1"
    assert result.results[0].status == DELIVERED
    assert (result.peer_addr, result.source_address) == ("::1", "::1")


def test_host_names_are_resolved_within_the_family() -> None:
    with running_sink() as sink:
        (result,), _ = deliver(source(), [job(1, [("localhost", sink.port)])])
    assert (result.peer_name, result.peer_addr) == ("localhost", "127.0.0.1")
    assert result.results[0].status == DELIVERED


def test_unplumbed_source_address_fails_with_its_name() -> None:
    with running_sink() as sink:
        (result,), stats = deliver(source("192.0.2.1"), [job(1, [("127.0.0.1", sink.port)])])
        assert sink.connections == 0
    (r,) = result.results
    assert r.status == TRANSIENT and "cannot bind source address 192.0.2.1" in r.text
    assert result.extra == {"bind_failed": "192.0.2.1", "errno": "EADDRNOTAVAIL"}
    assert stats["bind_failures"] == 1


def test_against_aiosmtpd_without_pipelining() -> None:
    with AiosmtpdPeer() as peer:
        jobs = [
            job(i, [("127.0.0.1", peer.port)], f"u{i}@y.test", "reject-1@y.test") for i in range(5)
        ]
        results, _ = deliver(source(), jobs, connection_limit=1)
    assert [[r.status for r in res.results] for res in results] == [[DELIVERED, PERMANENT]] * 5
    assert [m.rcpt_tos for m in peer.received] == [[f"u{i}@y.test"] for i in range(5)]
    assert {m.peer[0] for m in peer.received} == {"127.0.0.2"}


def test_idle_connections_close_after_the_idle_timeout() -> None:
    with running_sink() as sink:

        async def wait_idle_close(deliverer: Deliverer) -> None:
            assert sink.connections == 1 and deliverer.stats()["connections"] == 1
            for _ in range(300):
                if sink.open_connections == 0:
                    assert deliverer.stats()["connections"] == 0
                    return
                await asyncio.sleep(0.01)
            raise AssertionError("idle connection still open")

        run_deliverer(
            lambda cb: SiteDeliverer(source(), cb, timeouts=Timeouts(idle=0.1)),
            [job(1, [("127.0.0.1", sink.port)])],
            after=wait_idle_close,
        )


def test_drain_finishes_queued_jobs_then_refuses_new_ones() -> None:
    with running_sink() as sink:
        hosts = [("127.0.0.1", sink.port)]
        results: list[JobResult] = []

        async def go() -> None:
            d = SiteDeliverer(source(), results.append, connection_limit=2)
            for i in range(6):
                d.submit(job(i, hosts))
            await d.drain(10)
            assert d.stats()["connections"] == 0
            d.submit(job(99, hosts))

        asyncio.run(go())
    assert sorted(r.job_id for r in results[:6]) == list(range(6))
    assert all(r.results[0].status == DELIVERED for r in results[:6])
    late = results[6]
    assert late.job_id == 99 and late.results[0].status == TRANSIENT
    assert "shutting down" in late.results[0].text


def test_drain_deadline_reports_in_flight_jobs() -> None:
    with running_sink(slow_delay=5.0) as sink:
        results: list[JobResult] = []

        async def go() -> None:
            d = SiteDeliverer(source(), results.append, connection_limit=1)
            d.submit(job(1, [("127.0.0.1", sink.port)], "slow-1@x.test"))
            d.submit(job(2, [("127.0.0.1", sink.port)]))
            while not sink.messages:
                await asyncio.sleep(0.01)
            await d.drain(0.2)

        asyncio.run(go())
    (first, second) = sorted(results, key=lambda r: r.job_id)
    assert first.possible_duplicate and first.results[0].status == TRANSIENT
    assert second.results[0].status == TRANSIENT and not second.possible_duplicate
    assert "stopped" in first.results[0].text and len(results) == 2


def test_a_job_for_a_site_the_worker_was_not_told_about_is_transient() -> None:
    (result,), _ = run_deliverer(lambda cb: Deliverer(source(), cb), [job(1, [("127.0.0.1", 9)])])
    (r,) = result.results
    assert r.status == TRANSIENT and "not told about site" in r.text


def test_max_connection_rate_spaces_new_connections() -> None:
    with running_sink() as sink:
        hosts = [("127.0.0.1", sink.port)]
        jobs = [job(i, hosts) for i in range(4)]
        loop_start = time.monotonic()
        results, _ = deliver(
            source(), jobs, max_deliveries_per_connection=1, max_connection_rate="4/s,max_burst=1"
        )
        elapsed = time.monotonic() - loop_start
    assert [r.results[0].status for r in results] == [DELIVERED] * 4
    assert sink.connections == 4
    # One connection at once, then one per 0.25 s: the fourth cannot open before 0.75 s.
    assert elapsed >= 0.7


def test_provider_connection_limit_spans_the_providers_sites() -> None:
    with running_sink(slow_delay=0.05) as sink:
        hosts = [("127.0.0.1", sink.port)]
        jobs = [job(i, hosts, f"slow-{i}@x.test", site=f"site{i % 3}") for i in range(9)]
        results, stats = deliver(
            source(),
            jobs,
            connection_limit=10,
            max_deliveries_per_connection=1,
            provider_name="bigmail",
            provider_connection_limit=2,
        )
    assert [r.results[0].status for r in results] == [DELIVERED] * 9
    assert len(stats["sites"]) == 3 and sink.connections == 9
    assert sink.peak_connections == 2  # three sites, ten each, but two for the provider


def test_connections_open_as_the_queue_needs_them() -> None:
    from kumopy.ipc.jobs import Job
    from kumopy.worker.sites import JOBS_PER_CONNECTION, Site

    site = Site(SiteSpec("s", [("h", "127.0.0.1", 25, 0)], {"connection_limit": 5}), "e.test")
    assert not site.wants_connection()  # nothing queued
    site.queue.append(Job(1, "m", "s@x.test", ["r@y.test"], b"x\r\n", "s"))
    assert site.wants_connection()  # the first job opens the first connection
    site.connecting = 1
    for i in range(JOBS_PER_CONNECTION - 1):
        site.queue.append(Job(i + 2, "m", "s@x.test", ["r@y.test"], b"x\r\n", "s"))
    assert not site.wants_connection()  # 8 jobs: one opening connection takes them
    site.queue.append(Job(99, "m", "s@x.test", ["r@y.test"], b"x\r\n", "s"))
    assert site.wants_connection()  # the 9th justifies a second one
    site.connecting, site.open = 2, 3
    site.queue.extend([site.queue[0]] * 1000)
    assert not site.wants_connection()  # never past connection_limit


def test_a_job_behind_a_slow_transaction_goes_to_an_idle_connection() -> None:
    from kumopy.worker.sites import HANDOFF_DELAY

    with running_sink(slow_delay=2.0) as sink:
        hosts = [("127.0.0.1", sink.port)]
        done: dict[int, float] = {}

        async def go() -> None:
            loop = asyncio.get_running_loop()
            waiters: dict[int, asyncio.Future[None]] = {}

            def on_result(r: JobResult) -> None:
                assert r.results[0].status == DELIVERED, r
                done[r.job_id] = loop.time()
                waiters[r.job_id].set_result(None)

            d = SiteDeliverer(source(), on_result, connection_limit=4)
            burst = [job(i, hosts) for i in range(9)]  # 9 queued jobs open 2 connections
            for j in burst:
                waiters[j.job_id] = loop.create_future()
                d.submit(j)
            await asyncio.wait_for(asyncio.gather(*waiters.values()), 10)
            assert d.stats()["connections"] == 2  # both idle now
            slow, quick = job(100, hosts, "slow-1@example.net"), job(101, hosts)
            for j in (slow, quick):
                waiters[j.job_id] = loop.create_future()
            d.submit(slow)  # an idle connection takes it and waits 2 s for the final reply
            await asyncio.sleep(0)
            start = loop.time()
            d.submit(quick)  # queued behind the slow one, then handed to the other idle one
            await asyncio.wait_for(waiters[101], 10)
            assert done[101] - start < 1.0 and 100 not in done
            assert done[101] - start >= HANDOFF_DELAY * 0.9
            await asyncio.wait_for(waiters[100], 10)
            assert d.stats()["connections"] == 2  # no connection opened for it
            await d.drain(5)

        asyncio.run(go())
        assert sink.connections == 2
