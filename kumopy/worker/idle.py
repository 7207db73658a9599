"""The idle wait of one connection between jobs, bounded by one lazily moved timer."""

from __future__ import annotations

import asyncio

from kumopy.ipc.jobs import Job

__all__ = ["IdleClock"]


class IdleClock:
    """Bound a connection's waits for a job with one timer, not one timer per wait.

    Each wait moves the deadline; the timer, when it fires, sleeps again until the deadline if
    that moved later. A connection busy with a steady flow of jobs so pays one timer per idle
    period, where a timer per wait cost a create and a cancel for every job.
    """

    __slots__ = ("_at", "_deadline", "_fut", "_loop", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._fut: asyncio.Future[Job | None] | None = None
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._at = 0.0

    def start(self, fut: asyncio.Future[Job | None], timeout: float) -> None:
        """Resolve fut with None unless something else resolves it within timeout seconds."""
        self._fut = fut
        self._deadline = deadline = self._loop.time() + timeout
        if self._timer is None or deadline < self._at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(deadline, self._fire)
            self._at = deadline

    def stop(self) -> None:
        """End the current wait (the timer, if any, finds nothing to do when it fires)."""
        self._fut = None

    def close(self) -> None:
        """Cancel the timer: the connection is gone."""
        self._fut = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        """Expire the wait if its deadline passed, else sleep again until it."""
        self._timer = None
        fut = self._fut
        if fut is None or fut.done():
            return
        # The loop's clock and timers are rounded to the millisecond: allow for it.
        if self._loop.time() + 0.001 < self._deadline:
            self._timer = self._loop.call_at(self._deadline, self._fire)
            self._at = self._deadline
            return
        fut.set_result(None)
