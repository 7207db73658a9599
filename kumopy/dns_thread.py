"""Route lookups (MX and MTA-STS) for a synchronous loop: an asyncio thread, a pollable channel."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import threading
from dataclasses import dataclass
from types import TracebackType

from kumopy.dns import MXResolver, Resolution, normalize_domain
from kumopy.errors import DNSUnavailableError
from kumopy.mtasts import StsFetcher, StsPolicy

__all__ = ["Lookup", "ResolverThread"]


@dataclass(frozen=True, slots=True)
class Lookup:
    """One finished lookup: where the domain's mail goes, and its MTA-STS policy if asked."""

    domain: str
    """The domain as submitted."""
    resolution: Resolution
    sts: StsPolicy | None = None
    """The domain's MTA-STS policy; None when it has none, or it was not asked for."""


log = logging.getLogger(__name__)


class ResolverThread:
    """Resolve domains on an asyncio loop in a daemon thread; poll fileno(), then drain()."""

    def __init__(self, resolver: MXResolver, sts: StsFetcher | None = None) -> None:
        self.resolver = resolver
        self.sts = sts
        # Plain asyncio, not uvloop: a few hundred lookups need no speed, and uvloop may leak
        # the UDP transport of a query cancelled while its socket is being made (seen at close).
        self._loop = asyncio.new_event_loop()
        # Finished Resolutions wait in a deque; one byte on the socket pair wakes the poller.
        # A socket's fd can be registered in a zmq.Poller like any ZeroMQ socket.
        self._rsock, self._wsock = socket.socketpair()
        self._rsock.setblocking(False)
        self._wsock.setblocking(False)
        self._lock = threading.Lock()
        self._done: collections.deque[Lookup] = collections.deque()
        self._signalled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="kumopy-dns", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    # -- the coordinator's side ------------------------------------------------------------

    def submit(self, domain: str, sts: bool = False) -> None:
        """Start resolving domain (and its MTA-STS policy); never blocks; see drain()."""
        if self._closed:
            raise RuntimeError("the resolver thread is closed")
        self._loop.call_soon_threadsafe(self._start, domain, sts)

    def fileno(self) -> int:
        """Return the fd that becomes readable when drain() has something."""
        return self._rsock.fileno()

    def drain(self) -> list[Lookup]:
        """Return every Lookup finished since the last call (never blocks)."""
        # Read the wake-up bytes before taking the results: a result added after the read
        # either is taken below or sends a new byte, so no wake-up is lost.
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while self._rsock.recv(4096):
                pass
        with self._lock:
            self._signalled = False
            out = list(self._done)
            self._done.clear()
        return out

    def check(self, timeout: float | None = None) -> str | None:
        """Return why no DNS server answers, or None; blocks, so call it at start only."""
        future = asyncio.run_coroutine_threadsafe(self.resolver.check(), self._loop)
        wait = timeout if timeout is not None else self.resolver.config.timeout + 1.0
        try:
            return future.result(wait)
        except TimeoutError:
            future.cancel()
            return f"no DNS server answered within {wait:.1f}s ({self.resolver.servers})"

    def check_soon(self) -> None:
        """Check the servers in the background and log the outcome (never blocks)."""
        asyncio.run_coroutine_threadsafe(self._log_check(), self._loop)

    async def _log_check(self) -> None:
        problem = await self.resolver.check()
        if problem is not None:
            log.error(
                "DNS: %s; queues without mx_list will wait for it (name the servers with "
                "kumo.dns.configure_resolver(name_servers=[...]) in the policy)",
                problem,
            )
        else:
            log.info("DNS: resolving with %s", self.resolver.servers)

    def is_alive(self) -> bool:
        """Return True while the resolver thread runs."""
        return self._thread.is_alive()

    def close(self) -> None:
        """Cancel lookups under way, stop the thread and close the channel (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop already closed
                self._loop.call_soon_threadsafe(self._stop)
            self._thread.join(10)
        self._rsock.close()
        self._wsock.close()

    def __enter__(self) -> ResolverThread:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the resolver thread's side --------------------------------------------------------

    def _start(self, domain: str, sts: bool) -> None:
        task = self._loop.create_task(self._resolve(domain, sts))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, domain: str, sts: bool) -> None:
        policy: StsPolicy | None = None
        try:
            if sts and self.sts is not None:
                # Both at once: the policy fetch must not add its latency to the MX lookup.
                result, policy = await asyncio.gather(
                    self.resolver.resolve(domain), self.sts.policy_or_none(domain)
                )
            else:
                result = await self.resolver.resolve(domain)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A bug, not a DNS answer: the coordinator still gets one result per submit,
            # so the domain's queue is not left waiting for ever.
            log.exception("resolving %s failed", domain)
            name = normalize_domain(domain)
            error = DNSUnavailableError(name, f"resolving {name} failed: {exc!r}")
            result = Resolution(name, name, (), 0.0, error)  # expired: not worth caching
        self._deliver(Lookup(domain, result, policy))

    def _deliver(self, result: Lookup) -> None:
        with self._lock:
            self._done.append(result)
            wake = not self._signalled
            self._signalled = True
        if wake:
            # At most one byte is ever unread, so the send cannot block; OSError means the
            # channel was closed under us, and then nobody is left to wake.
            with contextlib.suppress(OSError):
                self._wsock.send(b"\0")

    async def _cancel_all(self) -> None:
        # Every task, not just ours: the resolver's shared fetches run as tasks of their own
        # that cancelling a waiter leaves running (on purpose), and they hold sockets.
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loop.stop()

    def _stop(self) -> None:
        self._loop.create_task(self._cancel_all())
