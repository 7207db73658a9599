"""The worker's delivery engine: per-site ready queues, connection pools and SMTP transactions."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from kumopy.config import EgressSource
from kumopy.ipc.jobs import DELIVERED, PERMANENT, TRANSIENT, Job, JobResult, SiteSpec
from kumopy.smtp.client import SMTPClient
from kumopy.smtp.replies import synthesized
from kumopy.worker.connect import Connector, Session
from kumopy.worker.facts import session_facts
from kumopy.worker.hosts import Candidate
from kumopy.worker.idle import IdleClock
from kumopy.worker.prepare import Prepared, prepare, result_for
from kumopy.worker.sites import HANDOFF_DELAY, Admission, Site

__all__ = ["Deliverer"]

log = logging.getLogger(__name__)


def _resolve_waiter(fut: asyncio.Future[Job | None]) -> None:
    """Release an idle connection's wait with no job (call_later callback)."""
    if not fut.done():
        fut.set_result(None)


class Deliverer:
    """Deliver jobs from one egress source, keeping a pool of SMTP connections per site."""

    def __init__(
        self,
        source: EgressSource,
        on_result: Callable[[JobResult], None],
        *,
        hostname: str | None = None,
    ) -> None:
        self.source = source
        self._on_result = on_result
        # Never getfqdn(): it would query the system resolver.
        self._ehlo = source.ehlo_domain or hostname or socket.gethostname()
        self._sites: dict[str, Site] = {}
        self._pending: dict[int, Job] = {}
        """Jobs submitted and not yet reported, by id(job): each gets exactly one result."""
        self._sending: set[int] = set()
        """Jobs whose transaction is under way on a connection (a possible duplicate if cut)."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._clients: dict[SMTPClient, str] = {}
        """Open sessions and their session_id (for the log), so that abandon() can reset all."""
        self._facts: dict[SMTPClient, tuple[SiteSpec, dict[str, object]]] = {}
        """What every result of a session says about it, under the site spec it was made for."""
        self._draining = False
        self._connector = Connector(source)
        self._admission = Admission()

    # -- public API ------------------------------------------------------------------------------

    def define_site(self, spec: SiteSpec) -> None:
        """Learn (or update) how this source reaches a site: hosts, limits, TLS, timeouts."""
        site = self._sites.get(spec.name)
        if site is None:
            self._sites[spec.name] = Site(spec, self._ehlo)
        else:
            site.configure(spec, self._ehlo)

    def has_site(self, name: str) -> bool:
        """Return True once the worker was told about site `name`."""
        return name in self._sites

    def submit(self, job: Job) -> None:
        """Queue a job for delivery; never blocks (call from the event loop)."""
        if self._draining:
            self._fail_job(job, "kumopy: worker is shutting down, job not attempted")
            return
        self._pending[id(job)] = job
        if not job.recipients:
            self._report(job, JobResult(job.job_id, []))
            return
        site = self._sites.get(job.site)
        if site is None:
            self._fail_job(job, f"kumopy: the worker was not told about site {job.site!r}")
            return
        if site.waiters and len(site.queue) >= site.busy:
            site.queue.append(job)
            self._hand_over(site)
            return
        # Every busy connection has no job lined up: this one rides behind a body in flight
        # (its envelope pipelined with that DATA) rather than wake an idle connection for a
        # round trip of its own. An idle one still takes it if it waits HANDOFF_DELAY.
        site.queue.append(job)
        if site.waiters and site.handoff is None:
            site.handoff = asyncio.get_running_loop().call_later(
                HANDOFF_DELAY, self._hand_over, site
            )
        self._maybe_connect(site)

    def _hand_over(self, site: Site) -> None:
        """Give queued jobs to idle connections, the most recently idle first."""
        if site.handoff is not None:
            site.handoff.cancel()
            site.handoff = None
        while site.queue and site.waiters:
            # LIFO: the longest-idle connections reach their idle timeout and close.
            waiter = site.waiters.pop()
            if not waiter.done():
                waiter.set_result(site.queue.popleft())

    def holding(self) -> int:
        """Return the jobs submitted and not yet answered."""
        return len(self._pending)

    async def drain(self, timeout: float) -> None:
        """Stop taking jobs, finish queued and in-flight ones within timeout, close connections."""
        self._draining = True
        for site in self._sites.values():
            while site.waiters:
                _resolve_waiter(site.waiters.popleft())
        deadline = time.monotonic() + timeout
        while self._tasks:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            await asyncio.wait(set(self._tasks), timeout=remaining)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for site in self._sites.values():
            site.queue.clear()
        for key, job in list(self._pending.items()):
            dup = key in self._sending
            self._fail_job(job, "kumopy: worker stopped before the delivery finished", dup)

    def abandon(self) -> int:
        """Arm a TCP reset on every open session, for an exit right after; return how many."""
        self._draining = True
        clients = list(self._clients)
        for client in clients:
            client.arm_reset()
        return len(clients)

    def stats(self) -> dict[str, Any]:
        """Return counts per site and totals: connections, queued, in flight, outcomes."""
        sites: dict[str, Any] = {}
        totals = {DELIVERED: 0, TRANSIENT: 0, PERMANENT: 0}
        for name, site in self._sites.items():
            sites[name] = {
                "connections": site.open,
                "connecting": site.connecting,
                "busy": site.busy,
                "opened": site.opened,
                "queued": len(site.queue),
                **site.counts,
            }
            for key, value in site.counts.items():
                totals[key] += value
        return {
            "source": self.source.name,
            "connections": sum(s.open for s in self._sites.values()),
            "queued": sum(len(s.queue) for s in self._sites.values()),
            "sending": len(self._sending),
            "pending": len(self._pending),
            "bind_failures": self._connector.bind_failures,
            "draining": self._draining,
            **totals,
            "sites": sites,
        }

    # -- results ---------------------------------------------------------------------------------

    def _report(self, job: Job, result: JobResult) -> None:
        """Hand a job's one result to on_result, counting outcomes per site."""
        key = id(job)
        if self._pending.pop(key, None) is None:
            log.error("job %s (%s) reported twice; second result dropped", job.job_id, job.msg_id)
            return
        self._sending.discard(key)
        site = self._sites.get(job.site)
        if site is not None:
            for r in result.results:
                site.counts[r.status] += 1
        try:
            self._on_result(result)
        except Exception:
            log.exception("on_result failed for job %s", job.job_id)

    def _fail_job(
        self,
        job: Job,
        text: str,
        possible_duplicate: bool = False,
        *,
        enhanced: str = "4.4.1",
        peer: Candidate | None = None,
        extra: dict[str, object] | None = None,
    ) -> None:
        """Report every recipient of job as transient with a synthesized 451 reply."""
        self._pending.setdefault(id(job), job)
        reply = synthesized(451, enhanced, text)
        result = JobResult(
            job.job_id,
            [result_for(r, reply) for r in job.recipients],
            peer_name=peer[0] if peer else None,
            peer_addr=peer[1] if peer else None,
            source_address=self.source.source_address,
            possible_duplicate=possible_duplicate,
        )
        if extra:
            result.extra.update(extra)
        self._report(job, result)

    # -- connection pool -------------------------------------------------------------------------

    def _maybe_connect(self, site: Site) -> None:
        """Open one more connection if jobs wait that no opening connection will take."""
        site.woken = None
        if not site.wants_connection() or self._draining:
            return
        wait = self._admission.wait(site)
        if wait is None:
            return  # its provider's connections are all in use: one closing wakes it
        if wait > 0.0:
            if site.woken is None:  # one timer per site, not one per job (no busy waiting)
                site.woken = asyncio.get_running_loop().call_later(wait, self._maybe_connect, site)
            return
        site.connecting += 1
        self._admission.opening(site)
        task = asyncio.get_running_loop().create_task(self._connection(site))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _provider_freed(self, site: Site) -> None:
        """A connection to the site's provider ended: another of its sites may connect."""
        self._admission.closed(site)
        if site.provider is None or self._cancelling():
            return
        for other in self._sites.values():
            if other.provider == site.provider and other is not site and other.queue:
                self._maybe_connect(other)

    async def _next_job(self, site: Site, idle: IdleClock) -> Job | None:
        """Return the next job of the site, waiting up to the idle timeout for one."""
        if site.queue:
            return site.queue.popleft()
        if self._draining:
            return None
        fut: asyncio.Future[Job | None] = asyncio.get_running_loop().create_future()
        site.waiters.append(fut)
        idle.start(fut, site.timeouts.idle)
        job: Job | None = None
        try:
            job = await fut
            return job
        finally:
            idle.stop()
            # submit() took it off the list to hand it a job; otherwise it is still there.
            if job is None and fut in site.waiters:
                site.waiters.remove(fut)

    async def _connection(self, site: Site) -> None:
        """Run one connection: open it, deliver queued jobs one after another, then close."""
        try:
            opened = await self._open(site)
        finally:
            site.connecting -= 1
        if opened is None:
            self._provider_freed(site)
            return
        client, peer_name = opened.client, opened.peer_name
        self._clients[client] = uuid.uuid4().hex
        site.open += 1
        site.opened += 1
        ahead: Prepared | None = None
        idle = IdleClock(asyncio.get_running_loop())
        try:
            for n in range(site.max_deliveries, 0, -1):
                if ahead is not None:
                    prep, ahead = ahead, None
                else:
                    job = await self._next_job(site, idle)
                    if job is None:
                        break
                    if not client.usable:
                        # The peer dropped the idle session; another connection takes the job.
                        site.queue.appendleft(job)
                        break
                    prep = prepare(job, site.batch)
                site.busy += 1
                self._sending.add(id(prep.job))
                try:
                    ahead = await self._deliver(client, peer_name, prep, site, n > 1)
                finally:
                    site.busy -= 1
                if not client.usable:
                    break
        finally:
            idle.close()
            self._clients.pop(client, None)
            self._facts.pop(client, None)
            site.open -= 1
            if ahead is not None and id(ahead.job) in self._pending:
                # Only its envelope went out, never its body: safe to hand to another connection.
                site.queue.appendleft(ahead.job)
            if client.usable and not self._cancelling():
                await client.quit()
            else:
                client.close()
            self._provider_freed(site)
            if site.queue and not self._cancelling():
                self._hand_over(site)  # jobs queued behind this connection go to idle ones
                self._maybe_connect(site)

    def _cancelling(self) -> bool:
        """Return True when the current task is being cancelled (drain deadline)."""
        task = asyncio.current_task()
        return task is not None and task.cancelling() > 0

    async def _open(self, site: Site) -> Session | None:
        """Connect to the first host that greets us; on total failure fail the site's jobs."""
        if not site.queue:
            return None
        opened = await self._connector.open(site.spec, site.ehlo, site.timeouts)
        if isinstance(opened, Session):
            return opened
        if opened.extra or site.open == 0:
            # A bind failure fails every job (the source is suspended); otherwise the site's
            # jobs wait for the connections still open.
            self._fail_site(
                site, opened.text, enhanced=opened.enhanced, peer=opened.peer, extra=opened.extra
            )
        return None

    def _fail_site(
        self,
        site: Site,
        text: str,
        *,
        enhanced: str = "4.4.1",
        peer: Candidate | None = None,
        extra: dict[str, object] | None = None,
    ) -> None:
        """Fail every queued job of the site with the same transient reason."""
        jobs = list(site.queue)
        site.queue.clear()
        for job in jobs:
            self._fail_job(job, text, enhanced=enhanced, peer=peer, extra=extra)

    # -- one job ---------------------------------------------------------------------------------

    def _take_ahead(self, site: Site) -> Prepared | None:
        """Pop the site's next job whose envelope can ride behind the current body."""
        while site.queue:
            prep = prepare(site.queue.popleft(), site.batch)
            if prep.batches:
                return prep
            # Nothing to send for it: every recipient already has its (permanent) result.
            self._finish(prep, None, None)
        return None

    async def _deliver(
        self, client: SMTPClient, peer_name: str, prep: Prepared, site: Site, more: bool
    ) -> Prepared | None:
        """Send one prepared job in batches and report it; return a job taken ahead, if any."""
        job, results = prep.job, prep.results
        duplicate = False
        ahead: Prepared | None = None
        pending = deque(prep.batches)
        try:
            while pending:
                batch = pending.popleft()
                if not client.usable:
                    lost = synthesized(
                        451, "4.4.2", "kumopy: connection lost before this batch of recipients"
                    )
                    for i in batch:
                        results[i] = result_for(job.recipients[i], lost)
                    continue
                then: tuple[str, list[str], bytes] | None = None
                if pending:
                    then = (prep.sender, prep.rcpts(pending[0]), prep.payload)
                elif more and client.pipelining and site.queue:
                    ahead = self._take_ahead(site)
                    if ahead is not None:
                        then = (ahead.sender, ahead.rcpts(ahead.batches[0]), ahead.payload)
                outcome = await client.send_transaction(
                    prep.sender, prep.rcpts(batch), prep.payload, then=then
                )
                duplicate = duplicate or outcome.possible_duplicate
                for i, reply in zip(batch, outcome.replies, strict=True):
                    results[i] = result_for(job.recipients[i], reply)
                if outcome.again and client.usable and not client.announced:
                    # 452 "too many recipients": the rest go at once in a new transaction
                    # (RFC 5321 4.5.3.1.10), before anything else on this session.
                    if ahead is not None:
                        site.queue.appendleft(ahead.job)
                        ahead = None
                    pending.appendleft([batch[j] for j in outcome.again])
        except BaseException:
            if ahead is not None:
                site.queue.appendleft(ahead.job)
            raise
        self._finish(prep, client, peer_name, duplicate)
        return ahead

    def _finish(
        self,
        prep: Prepared,
        client: SMTPClient | None,
        peer_name: str | None,
        duplicate: bool = False,
    ) -> None:
        """Report a prepared job whose every recipient has a result."""
        final = [r for r in prep.results if r is not None]
        assert len(final) == len(prep.results), "a recipient was left without a result"
        result = JobResult(
            prep.job.job_id,
            final,
            peer_name=peer_name,
            peer_addr=client.peer_address if client else None,
            source_address=client.local_address if client else self.source.source_address,
            possible_duplicate=duplicate,
            extra=self._session_extra(client, peer_name, prep.job.site) if client else {},
        )
        self._report(prep.job, result)

    def _session_extra(self, client: SMTPClient, peer: str | None, name: str) -> dict[str, object]:
        """Return a fresh copy of what a result says about its session (built once per spec)."""
        site = self._sites.get(name)
        cached = self._facts.get(client)
        if site is None or cached is None or cached[0] is not site.spec:
            # A define_site() since the last result may change the MTA-STS testing verdict.
            facts = session_facts(client, peer, site)
            facts["session_id"] = self._clients.get(client)
            if site is None:
                return facts
            cached = self._facts[client] = (site.spec, facts)
        return dict(cached[1])
