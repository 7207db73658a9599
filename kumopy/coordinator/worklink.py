"""The coordinator's end of the worker protocol: jobs out, and ready, results and heartbeats in."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import zmq

from kumopy.coordinator.arbiter import Arbiter
from kumopy.coordinator.core import Core
from kumopy.errors import KumoError, ProtocolError
from kumopy.ipc.framing import decode_header
from kumopy.ipc.jobs import Job, SiteSpec
from kumopy.ipc.work import (
    BYE,
    HEARTBEAT,
    READY,
    RESULTS,
    decode_results,
    encode_jobs,
    encode_site,
    encode_stop,
)

__all__ = ["WorkLink"]

log = logging.getLogger(__name__)

_READ_PER_TURN = 1024


class WorkLink:
    """Route jobs to workers by source name and apply what the workers send back."""

    def __init__(
        self,
        sock: zmq.Socket[bytes],
        core: Core,
        arbiter: Arbiter,
        on_ready: Callable[[int], None],
    ) -> None:
        self.sock = sock
        self.core = core
        self.arbiter = arbiter
        self.on_ready = on_ready
        """Called with the source index of each worker that says Ready."""

    def send_jobs(self, src: int, jobs: list[Job]) -> None:
        """Send a batch of jobs to a source's worker (the dispatcher's send_jobs)."""
        name = self.core.sources[src].name.encode()
        try:
            # copy=False: pyzmq still copies frames under its copy_threshold (the header).
            self.sock.send_multipart([name, *encode_jobs(jobs)], copy=False)
        except zmq.ZMQError as exc:
            # The worker vanished between Ready and now: give the jobs back right away.
            log.warning(
                "worker %s unreachable (%s); requeueing %d jobs", name.decode(), exc, len(jobs)
            )
            self.core.desk.worker_gone(src, None)

    def send_site(self, src: int, spec: SiteSpec) -> None:
        """Tell a source's worker how it reaches a site (before that site's first job)."""
        try:
            self.sock.send_multipart([self.core.sources[src].name.encode(), encode_site(spec)])
        except zmq.ZMQError as exc:
            log.warning("worker %s unreachable (%s)", self.core.sources[src].name, exc)

    def stop(self, index: int, timeout: float) -> None:
        """Ask one worker to finish what it holds within `timeout`, then exit."""
        slot = self.arbiter.slots[index]
        if slot.pid is None:
            return
        try:
            self.sock.send_multipart([slot.source.name.encode(), encode_stop(timeout)])
        except zmq.ZMQError:
            # Not connected (yet): the signal does it (the worker drains on SIGTERM too). In
            # a group that stops every source of the process; the others restart alone.
            self.arbiter.terminate(index)

    def stop_all(self, timeout: float) -> None:
        """Ask every running worker to finish what it holds within `timeout`, then exit."""
        stop = encode_stop(timeout)
        for slot in self.arbiter.alive():
            try:
                self.sock.send_multipart([slot.source.name.encode(), stop])
            except zmq.ZMQError:
                self.arbiter.terminate_all()

    def read(self) -> None:
        """Apply what the workers sent, up to a bounded number of messages per turn."""
        now = time.time()
        for _ in range(_READ_PER_TURN):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            name = frames[0].bytes.decode("utf-8", "replace")
            src = self.core.source_index.get(name)
            if src is None or len(frames) < 2:
                log.warning("message from unknown worker %r ignored", name)
                continue
            try:
                self._apply(src, decode_header(frames[1].buffer), now)
            except (KumoError, KeyError, TypeError, ValueError) as exc:
                # A bad frame from a worker is logged and dropped; it must not stop the loop.
                log.error("bad message from worker %s: %s", name, exc)

    def _apply(self, src: int, header: dict[str, Any], now: float) -> None:
        kind = header["kind"]
        self.arbiter.seen(src)
        if kind == RESULTS:
            self.core.handle_results(src, decode_results(header), now)
        elif kind == READY:
            self.arbiter.ready(src)
            credit = int(header["credit"])
            log.info(
                "worker %s ready (pid %s, credit %d)",
                self.core.sources[src].name,
                header.get("pid"),
                credit,
            )
            self.core.desk.worker_ready(src, credit)
            self.on_ready(src)
        elif kind == HEARTBEAT:
            stats = header.get("stats")
            if isinstance(stats, dict):
                self.core.desk.worker_stats[src] = stats
        elif kind == BYE:
            self.core.desk.worker_stopping(src)
            # Results travel before the bye on the same pipe, so they are applied by now: a
            # reload's source in a shared process is done, though its process runs on.
            self.arbiter.source_stopped(src)
        else:
            raise ProtocolError(f"unknown worker message kind {kind!r}")
