"""The worker's delivery engine: per-site ready queues, connection pools and SMTP transactions."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from kumopy.config import EgressSource
from kumopy.errors import DeliveryError, SMTPReplyError, SourceBindError
from kumopy.ipc.jobs import DELIVERED, PERMANENT, TRANSIENT, Job, JobResult
from kumopy.smtp.client import SMTPClient
from kumopy.smtp.protocol import Timeouts
from kumopy.smtp.replies import synthesized
from kumopy.worker.hosts import Candidate, candidates
from kumopy.worker.prepare import Prepared, prepare, result_for

__all__ = ["Deliverer"]

log = logging.getLogger(__name__)


def _resolve_waiter(fut: asyncio.Future[Job | None]) -> None:
    """Release an idle connection's wait with no job (call_later callback)."""
    if not fut.done():
        fut.set_result(None)


class _Site:
    """The ready queue and connection pool of one destination site."""

    __slots__ = (
        "busy",
        "connecting",
        "counts",
        "name",
        "open",
        "opened",
        "queue",
        "waiters",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.queue: deque[Job] = deque()
        self.waiters: deque[asyncio.Future[Job | None]] = deque()
        """Idle connections waiting for a job; submit() hands the job straight to one."""
        self.open = 0
        self.connecting = 0
        self.busy = 0
        self.opened = 0
        self.counts = {DELIVERED: 0, TRANSIENT: 0, PERMANENT: 0}


class Deliverer:
    """Deliver jobs from one egress source, keeping a pool of SMTP connections per site."""

    def __init__(
        self,
        source: EgressSource,
        on_result: Callable[[JobResult], None],
        *,
        connection_limit: int = 32,
        max_deliveries_per_connection: int = 1024,
        max_recipients_per_batch: int = 100,
        timeouts: Timeouts | None = None,
        hostname: str | None = None,
    ) -> None:
        for name, value in (
            ("connection_limit", connection_limit),
            ("max_deliveries_per_connection", max_deliveries_per_connection),
            ("max_recipients_per_batch", max_recipients_per_batch),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        self.source = source
        self._on_result = on_result
        self._limit = connection_limit
        self._max_deliveries = max_deliveries_per_connection
        self._batch = max_recipients_per_batch
        self._timeouts = timeouts or Timeouts()
        # Never getfqdn(): it would query the system resolver.
        self._ehlo = source.ehlo_domain or hostname or socket.gethostname()
        self._sites: dict[str, _Site] = {}
        self._pending: dict[int, Job] = {}
        """Jobs submitted and not yet reported, by id(job): each gets exactly one result."""
        self._sending: set[int] = set()
        """Jobs whose transaction is under way on a connection (a possible duplicate if cut)."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._clients: set[SMTPClient] = set()
        """Open sessions, so that abandon() can reset them all."""
        self._draining = False
        self._bind_failures = 0

    # -- public API ------------------------------------------------------------------------------

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
            site = self._sites[job.site] = _Site(job.site)
        while site.waiters:
            waiter = site.waiters.popleft()
            if not waiter.done():
                waiter.set_result(job)
                return
        site.queue.append(job)
        self._maybe_connect(site)

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
            "bind_failures": self._bind_failures,
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

    def _maybe_connect(self, site: _Site) -> None:
        """Open one more connection if jobs wait that no opening connection will take."""
        if len(site.queue) > site.connecting and site.open + site.connecting < self._limit:
            site.connecting += 1
            task = asyncio.get_running_loop().create_task(self._connection(site))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _next_job(self, site: _Site) -> Job | None:
        """Return the next job of the site, waiting up to the idle timeout for one."""
        if site.queue:
            return site.queue.popleft()
        if self._draining:
            return None
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Job | None] = loop.create_future()
        site.waiters.append(fut)
        handle = loop.call_later(self._timeouts.idle, _resolve_waiter, fut)
        try:
            return await fut
        finally:
            handle.cancel()
            if fut in site.waiters:
                site.waiters.remove(fut)

    async def _connection(self, site: _Site) -> None:
        """Run one connection: open it, deliver queued jobs one after another, then close."""
        try:
            opened = await self._open(site)
        finally:
            site.connecting -= 1
        if opened is None:
            return
        client, peer_name = opened
        self._clients.add(client)
        site.open += 1
        site.opened += 1
        ahead: Prepared | None = None
        try:
            for n in range(self._max_deliveries, 0, -1):
                if ahead is not None:
                    prep, ahead = ahead, None
                else:
                    job = await self._next_job(site)
                    if job is None:
                        break
                    if not client.usable:
                        # The peer dropped the idle session; another connection takes the job.
                        site.queue.appendleft(job)
                        break
                    prep = prepare(job, self._batch)
                site.busy += 1
                self._sending.add(id(prep.job))
                try:
                    ahead = await self._deliver(client, peer_name, prep, site, n > 1)
                finally:
                    site.busy -= 1
                if not client.usable:
                    break
        finally:
            self._clients.discard(client)
            site.open -= 1
            if ahead is not None and id(ahead.job) in self._pending:
                # Only its envelope went out, never its body: safe to hand to another connection.
                site.queue.appendleft(ahead.job)
            if client.usable and not self._cancelling():
                await client.quit()
            else:
                client.close()
            if site.queue and not self._cancelling():
                self._maybe_connect(site)

    def _cancelling(self) -> bool:
        """Return True when the current task is being cancelled (drain deadline)."""
        task = asyncio.current_task()
        return task is not None and task.cancelling() > 0

    async def _open(self, site: _Site) -> tuple[SMTPClient, str] | None:
        """Connect to the first host that greets us; on total failure fail the site's jobs."""
        if not site.queue:
            return None
        hosts = site.queue[0].hosts
        src = self.source.source_address
        found, skipped = await candidates(self.source, hosts)
        if not found:
            listed = ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in hosts)
            listed = listed or "none"
            why = f"; {skipped}" if skipped else ""
            text = (
                f"kumopy: no {self.source.family or 'usable'} destination host for source "
                f"{self.source.name!r} ({src or 'unbound'}) among {listed}{why}"
            )
            self._fail_site(site, text, enhanced="4.4.4")
            return None
        reasons: list[str] = []
        last: Candidate | None = None
        for cand in found:
            name, addr, port = last = cand
            client = SMTPClient()
            try:
                await client.connect(
                    addr, port, source_address=src, ehlo_domain=self._ehlo, timeouts=self._timeouts
                )
            except DeliveryError as exc:
                if isinstance(exc, SourceBindError):
                    self._bind_failures += 1
                    log.warning("source %s: %s", self.source.name, exc.message)
                    extra: dict[str, object] = {
                        "bind_failed": exc.address,
                        "errno": exc.errno_name,
                    }
                    self._fail_site(site, f"kumopy: {exc.message}", peer=cand, extra=extra)
                    return None
                reasons.append(exc.message)
                continue
            except SMTPReplyError as exc:
                reasons.append(f"{addr}:{port} answered {exc.reply.command or 'banner'} with {exc}")
                continue
            except ValueError as exc:
                self._fail_site(site, f"kumopy: {exc}", peer=cand)
                return None
            return client, name
        log.info("source %s: site %s unreachable: %s", self.source.name, site.name, reasons)
        if site.open == 0:
            self._fail_site(site, "kumopy: " + "; ".join(reasons), peer=last)
        return None

    def _fail_site(
        self,
        site: _Site,
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

    def _take_ahead(self, site: _Site) -> Prepared | None:
        """Pop the site's next job whose envelope can ride behind the current body."""
        while site.queue:
            prep = prepare(site.queue.popleft(), self._batch)
            if prep.batches:
                return prep
            # Nothing to send for it: every recipient already has its (permanent) result.
            self._finish(prep, None, None)
        return None

    async def _deliver(
        self, client: SMTPClient, peer_name: str, prep: Prepared, site: _Site, more: bool
    ) -> Prepared | None:
        """Send one prepared job in batches and report it; return a job taken ahead, if any."""
        job, results = prep.job, prep.results
        duplicate = False
        ahead: Prepared | None = None
        last = len(prep.batches) - 1
        try:
            for k, batch in enumerate(prep.batches):
                if not client.usable:
                    lost = synthesized(
                        451, "4.4.2", "kumopy: connection lost before this batch of recipients"
                    )
                    for i in batch:
                        results[i] = result_for(job.recipients[i], lost)
                    continue
                then: tuple[str, list[str], bytes] | None = None
                if k < last:
                    nxt = prep.batches[k + 1]
                    then = (job.sender, [job.recipients[i] for i in nxt], prep.payload)
                elif more and client.pipelining and site.queue:
                    ahead = self._take_ahead(site)
                    if ahead is not None:
                        a_job = ahead.job
                        a_rcpts = [a_job.recipients[i] for i in ahead.batches[0]]
                        then = (a_job.sender, a_rcpts, ahead.payload)
                outcome = await client.send_transaction(
                    job.sender, [job.recipients[i] for i in batch], prep.payload, then=then
                )
                duplicate = duplicate or outcome.possible_duplicate
                for i, reply in zip(batch, outcome.replies, strict=True):
                    results[i] = result_for(job.recipients[i], reply)
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
        self._report(
            prep.job,
            JobResult(
                prep.job.job_id,
                final,
                peer_name=peer_name,
                peer_addr=client.peer_address if client else None,
                source_address=client.local_address if client else self.source.source_address,
                possible_duplicate=duplicate,
            ),
        )
