"""MX lookups for a synchronous loop: an asyncio resolver thread with a pollable result channel."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import threading
from types import TracebackType

from kumopy.dns import MXResolver, Resolution, normalize_domain
from kumopy.errors import DNSUnavailableError

__all__ = ["ResolverThread"]

log = logging.getLogger(__name__)


class ResolverThread:
    """Resolve domains on an asyncio loop in a daemon thread; poll fileno(), then drain()."""

    def __init__(self, resolver: MXResolver) -> None:
        self.resolver = resolver
        # Plain asyncio, not uvloop: a few hundred lookups need no speed, and uvloop may leak
        # the UDP transport of a query cancelled while its socket is being made (seen at close).
        self._loop = asyncio.new_event_loop()
        # Finished Resolutions wait in a deque; one byte on the socket pair wakes the poller.
        # A socket's fd can be registered in a zmq.Poller like any ZeroMQ socket.
        self._rsock, self._wsock = socket.socketpair()
        self._rsock.setblocking(False)
        self._wsock.setblocking(False)
        self._lock = threading.Lock()
        self._done: collections.deque[Resolution] = collections.deque()
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

    def submit(self, domain: str) -> None:
        """Start resolving domain; never blocks. Its Resolution comes out of drain()."""
        if self._closed:
            raise RuntimeError("the resolver thread is closed")
        self._loop.call_soon_threadsafe(self._start, domain)

    def fileno(self) -> int:
        """Return the fd that becomes readable when drain() has something."""
        return self._rsock.fileno()

    def drain(self) -> list[Resolution]:
        """Return every Resolution finished since the last call (never blocks)."""
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

    def _start(self, domain: str) -> None:
        task = self._loop.create_task(self._resolve(domain))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, domain: str) -> None:
        try:
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
        self._deliver(result)

    def _deliver(self, result: Resolution) -> None:
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
