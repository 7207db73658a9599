"""The worker process: one egress source (or a few), uvloop, a DEALER socket per source."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import json
import logging
import os
import signal
import socket
from collections.abc import Sequence
from typing import Any

import zmq
import zmq.asyncio

from kumopy.config import EgressSource
from kumopy.errors import KumoError
from kumopy.gctune import settle_heap
from kumopy.ipc.framing import decode_header
from kumopy.ipc.jobs import JobResult
from kumopy.ipc.work import (
    BATCH,
    DELIVER,
    SITE,
    STOP,
    WORKER_BOOT_ERROR,
    decode_jobs,
    decode_site,
    encode_bye,
    encode_heartbeat,
    encode_ready,
    encode_results,
    worker_busy,
)
from kumopy.parent import die_with_parent
from kumopy.validation import source_from_dict
from kumopy.worker.delivery import Deliverer

__all__ = ["WorkerProcess", "check_source_address", "decode_definition", "run_worker"]

log = logging.getLogger(__name__)

RESULT_FLUSH = 0.002
"""Seconds results may wait so several travel in one message (the worker runs low on jobs)."""
RESULT_HOLD = 0.025
"""Seconds they may wait while the worker holds a quarter of its credit or more in jobs."""
HEARTBEAT = 1.0
"""Seconds between heartbeats while the worker's stats change (jobs, connections, outcomes)."""
IDLE_HEARTBEAT = 5.0
"""Seconds between heartbeats while they stay the same (the coordinator passes a third of its
--heartbeat-timeout): each beat wakes two threads here and two in the coordinator, which made
256 idle workers cost 5% of a core at one a second."""


def decode_definition(text: str) -> EgressSource:
    """Decode the source definition the coordinator put on the command line."""
    return source_from_dict(json.loads(base64.b64decode(text)))


def check_source_address(source: EgressSource) -> str | None:
    """Return why the source address cannot be bound, or None when it can."""
    if source.source_address is None:
        return None
    family = socket.AF_INET6 if ":" in source.source_address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((source.source_address, 0))
        except OSError as exc:
            hint = (
                " (the address is not plumbed on this host)"
                if exc.errno == errno.EADDRNOTAVAIL
                else ""
            )
            return f"cannot bind source address {source.source_address}: {exc.strerror}{hint}"
    return None


class WorkerProcess:
    """Receive jobs, feed the Deliverer, send results back in small batches."""

    def __init__(
        self,
        source: EgressSource,
        endpoint: str,
        credit: int,
        parent_pid: int,
        idle_heartbeat: float = IDLE_HEARTBEAT,
        ctx: zmq.asyncio.Context | None = None,
    ) -> None:
        self.source = source
        self.idle_heartbeat = max(HEARTBEAT, idle_heartbeat)
        self.endpoint = endpoint
        self.credit = credit
        self.parent_pid = parent_pid
        # A shared context (several sources in one process) is its owner's to terminate.
        self._own_ctx = ctx is None
        self.ctx = zmq.asyncio.Context() if ctx is None else ctx
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.setsockopt(zmq.IDENTITY, source.name.encode())
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.setsockopt(zmq.RCVHWM, 100_000)
        self.results: list[JobResult] = []
        self._flush_scheduled = False
        self.deliverer = Deliverer(source, self._on_result)
        self.stopping = asyncio.Event()
        self.drain_timeout = 30.0
        self.group: list[WorkerProcess] = [self]
        """Every source this process runs: a signal or an orphaned parent stops them all."""

    def _on_result(self, result: JobResult) -> None:
        self.results.append(result)
        if len(self.results) >= BATCH:
            self._send_results()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            # A worker with plenty of work gains nothing from a result sent early (the
            # coordinator refills credit a batch at a time), and each message costs both
            # processes a wake-up: with many sources, most of their CPU.
            plenty = worker_busy(self.deliverer.holding(), self.credit)
            delay = RESULT_HOLD if plenty else RESULT_FLUSH
            asyncio.get_running_loop().call_later(delay, self._flush_soon)

    def _flush_soon(self) -> None:
        self._flush_scheduled = False
        self._send_results()

    def _send_results(self) -> None:
        if not self.results:
            return
        batch, self.results = self.results, []
        # zmq.asyncio sends without blocking when the pipe has room; HWM is set high.
        self.sock.send(encode_results(batch))

    async def _receive(self) -> None:
        while not self.stopping.is_set():
            frames = await self.sock.recv_multipart(copy=False)
            try:
                header = decode_header(frames[0].buffer)
                kind = header["kind"]
                if kind == DELIVER:
                    for job in decode_jobs(header, frames):
                        self.deliverer.submit(job)
                elif kind == SITE:
                    self.deliverer.define_site(decode_site(header))
                elif kind == STOP:
                    self.drain_timeout = float(header.get("timeout", self.drain_timeout))
                    self.stopping.set()
                else:
                    log.warning("unknown message kind %r from the coordinator", kind)
            except KumoError as exc:
                log.error("bad message from the coordinator: %s", exc)

    def _on_term(self, loop: asyncio.AbstractEventLoop) -> None:
        """Drain on a stop from the coordinator; quit at once when the coordinator is gone."""
        if os.getppid() != self.parent_pid:
            self._orphaned()
        for worker in self.group:
            loop.call_soon_threadsafe(worker.stopping.set)

    def _orphaned(self) -> None:
        # Nobody will record what this worker does from now on, and every job it holds stays
        # in the spool for the next coordinator: any delivery finished now would be sent twice.
        # So start nothing more, and reset open sessions so that unsent bodies never arrive.
        # Safe in a signal handler: it only sets socket options and writes to stderr.
        reset = sum(worker.deliverer.abandon() for worker in self.group)
        os.write(2, b"kumopy worker: coordinator is gone; reset %d SMTP sessions\n" % reset)
        os._exit(0)

    async def _heartbeat(self) -> None:
        last: dict[str, Any] | None = None
        idle = False
        while True:  # cancelled by run()
            # A busy worker's results prove it alive anyway; its beats carry fresh stats.
            await asyncio.sleep(self.idle_heartbeat if idle else HEARTBEAT)
            if os.getppid() != self.parent_pid:
                self._orphaned()  # PDEATHSIG missed (prctl unavailable): found by polling
            stats = self.deliverer.stats()
            idle, last = stats == last, stats
            await self.sock.send(encode_heartbeat(stats))

    async def run(self) -> int:
        """Say Ready, then work until told to stop; return the exit code."""
        loop = asyncio.get_running_loop()
        # Plain signal handlers, not the loop's: they run at the next bytecode, not after the
        # loop's current callbacks, so an orphan stops before it starts another transaction.
        # In a group each source installs the same handler (it covers the group): last wins.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: self._on_term(loop))
        self.sock.connect(self.endpoint)
        await self.sock.send(encode_ready(self.credit, os.getpid()))
        tasks = [asyncio.create_task(self._receive()), asyncio.create_task(self._heartbeat())]
        await self.stopping.wait()
        if len(self.group) == 1:
            tasks[1].cancel()
        # Keep receiving while draining: a deliver frame already queued is still answered.
        # A source of a group that a reload stops keeps beating meanwhile: a slow drain must
        # not look hung, or the coordinator would kill the rest of its group with it.
        await self.deliverer.drain(self.drain_timeout)
        tasks[0].cancel()
        tasks[1].cancel()
        self._send_results()
        await self.sock.send(encode_bye())
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self.sock.close(linger=2000)
        if self._own_ctx:
            self.ctx.term()
        return 0


def run_worker(
    source_defs: str | Sequence[str],
    endpoint: str,
    credit: int,
    parent_pid: int,
    idle_heartbeat: float = IDLE_HEARTBEAT,
) -> int:
    """Entry point of `python -m kumopy worker`: one WorkerProcess per source definition."""
    die_with_parent()
    defs = [source_defs] if isinstance(source_defs, str) else list(source_defs)
    try:
        sources = [decode_definition(d) for d in defs]
    except (ValueError, TypeError, KeyError) as exc:
        log.error("bad source definition: %s", exc)
        return WORKER_BOOT_ERROR
    if not sources:
        log.error("no source definition")
        return WORKER_BOOT_ERROR
    for source in sources:
        # One unbindable source fails the whole group at boot, as it would fail alone.
        problem = check_source_address(source)
        if problem:
            log.error("source %s: %s", source.name, problem)
            return WORKER_BOOT_ERROR
    if os.getppid() != parent_pid:
        return 0
    settle_heap()  # forked from the zygote or exec'd: the same collector settings
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency
        runner = asyncio.run

    async def main() -> int:
        if len(sources) == 1:
            return await WorkerProcess(
                sources[0], endpoint, credit, parent_pid, idle_heartbeat
            ).run()
        ctx = zmq.asyncio.Context()
        group = [
            WorkerProcess(s, endpoint, credit, parent_pid, idle_heartbeat, ctx=ctx) for s in sources
        ]
        for worker in group:
            worker.group = group
        # Each source stops on its own STOP (a reload); the process ends with the last.
        codes = await asyncio.gather(*(worker.run() for worker in group))
        ctx.term()  # every socket is closed by now, so this does not wait
        return next((code for code in codes if code), 0)

    result: int = runner(main())
    return result
