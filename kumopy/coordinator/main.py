"""The coordinator process: its sockets, the main loop, signals, supervision and shutdown."""

from __future__ import annotations

import gc
import logging
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import zmq

from kumopy import sdnotify
from kumopy._fast import IMPLEMENTATION
from kumopy.coordinator.arbiter import Arbiter, WorkerSlot
from kumopy.coordinator.control import ControlServer
from kumopy.coordinator.core import Core
from kumopy.coordinator.ingress import Ingress
from kumopy.coordinator.logs import LogWriter
from kumopy.coordinator.operations import Operations
from kumopy.coordinator.options import RunOptions, check_listen_endpoint
from kumopy.coordinator.reconfig import SourceChanges
from kumopy.coordinator.redis_limits import make_limiter
from kumopy.coordinator.resolving import start_resolver
from kumopy.coordinator.spool import SpoolStore
from kumopy.coordinator.worklink import WorkLink
from kumopy.coordinator.zygote import Zygote
from kumopy.errors import ConfigError, PolicyError
from kumopy.gctune import settle_heap
from kumopy.ipc.control import default_control_endpoint
from kumopy.ipc.framing import MAX_HEADER_BYTES
from kumopy.ipc.jobs import Job, SiteSpec
from kumopy.metrics import MetricsExporter
from kumopy.policy import Policy, load_policy

__all__ = ["Coordinator"]

log = logging.getLogger(__name__)

_INGRESS_BATCH = 256
_INGRESS_FRAMES = 4096
_UNLOGGED = "unlogged.jsonl"
"""Log records that could not be written at shutdown, kept beside the spool for the next start."""


def _bounded_int(value: Any, default: int, top: int) -> int:
    """Return value as an int in 0..top, or default when it is not a non-negative int."""
    if type(value) is not int or value < 0:
        return default
    return min(value, top)


class Coordinator:
    """Own the policy, spool and queues; feed the workers; answer injectors."""

    def __init__(
        self, policy: Policy, options: RunOptions, sources_files: Sequence[str] = ()
    ) -> None:
        check_listen_endpoint(options.listen, options.allow_remote)
        self.options = options
        self.policy = policy
        self.sources_files = list(sources_files)
        self.reloads = {"ok": 0, "failed": 0}
        self.spool = SpoolStore(
            options.spool_dir,
            fsync=options.fsync,
            min_free_bytes=options.min_free_bytes,
            start_empty=options.start_empty,
        )
        self.logs = LogWriter(
            options.log_dir, max_bytes=options.log_max_bytes, compress=options.log_compress
        )
        self.logs.restore_unwritten(Path(options.spool_dir) / _UNLOGGED)
        self.resolver = start_resolver(policy, options.log_level)
        # The worker link needs the core; the core sends through the link: bind late.
        self.core = Core(
            policy,
            self.spool,
            self.logs,
            self._send_jobs,
            options.core,
            send_site=self._send_site,
            path_defaults=options.path_defaults,
            resolver=self.resolver,
            limiter=make_limiter(policy.settings),
        )
        self.core.book.route_all_to = options.route_all_to
        self.ingress_handler = Ingress(self.core, options.limits, self.status)
        self.ctx = zmq.Context()
        self.run_dir = tempfile.mkdtemp(prefix="kumopy-")
        worker_endpoint = f"ipc://{self.run_dir}/workers"
        self.workers = self._socket(zmq.ROUTER)
        self.workers.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.workers.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.workers.bind(worker_endpoint)
        self.ingress = self._socket(zmq.ROUTER)
        # ZeroMQ drops a peer whose frame declares more than this, before buffering it: a
        # body somewhat past --max-message-size still gets a clear error, a giant never lands.
        self.ingress.setsockopt(
            zmq.MAXMSGSIZE, 2 * max(options.limits.max_message_size, MAX_HEADER_BYTES)
        )
        self.ingress.bind(options.listen)
        self.endpoint = self.ingress.getsockopt_string(zmq.LAST_ENDPOINT)
        self.log_pub = self._log_publisher(options.log_publish)
        control = options.control or default_control_endpoint(options.spool_dir)
        check_listen_endpoint(control, allow_remote=False, flag="--control")
        self.control = ControlServer(
            self._socket(zmq.ROUTER), control, Operations(self.core), self.status, self.reload
        )
        self.arbiter = Arbiter(
            self.core.sources,
            worker_endpoint,
            self._worker_exited,
            # An idle worker beats every third of the timeout: it may miss two beats.
            [
                *("--credit", str(options.credit), *options.worker_args),
                *("--idle-heartbeat", f"{options.heartbeat_timeout / 3:g}"),
            ],
            stale_after=options.heartbeat_timeout,
            kill_grace=options.heartbeat_timeout / 3,
            boot_timeout=options.boot_timeout,
            zygote=Zygote(options.log_level, options.boot_timeout) if options.zygote else None,
            sources_per_worker=options.sources_per_worker,
        )
        self.link = WorkLink(self.workers, self.core, self.arbiter, self._worker_ready)
        self._signals: list[int] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.stopping = False
        self._ready_announced = False
        self._ready_seen: set[int] = set()
        self.metrics: MetricsExporter | None = None
        if options.metrics is not None:
            self.metrics = MetricsExporter(*options.metrics)

    def _log_publisher(self, endpoint: str | None) -> zmq.Socket[bytes] | None:
        """Bind the PUB socket of --log-publish and hand it to the log writer."""
        if endpoint is None:
            return None
        pub = self._socket(zmq.PUB)  # SNDHWM 100,000: past it PUB drops, never blocks
        pub.setsockopt(zmq.LINGER, 1000)  # the last records at a stop, if a subscriber is there
        try:
            pub.bind(endpoint)
        except zmq.ZMQError as exc:
            pub.close(0)
            raise ConfigError(f"--log-publish {endpoint!r}: {exc}") from None
        self.logs.publisher = pub
        return pub

    def _socket(self, kind: int) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        return sock

    # -- signals: handlers only enqueue -------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals.append(signum)

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    def _dispatch_signals(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        while self._signals:
            sig = self._signals.pop(0)
            if sig == signal.SIGCHLD:
                self.arbiter.reap()
            elif sig in (signal.SIGTERM, signal.SIGINT):
                if not self.stopping:
                    log.info("received %s; draining", signal.Signals(sig).name)
                    self.begin_stop()
            elif sig == signal.SIGHUP:
                self.reload()

    def reload(self) -> list[str]:
        """Reload the policy (SIGHUP, `kumopy reload`); keep the running one on any error.

        Return the errors (empty when the new policy runs now).
        """
        try:
            policy = load_policy(self.policy.path, self.sources_files)
            changes = self.core.reload(policy, self.options.path_defaults)
        except (ConfigError, PolicyError) as exc:
            log.error("reload refused, keeping the running policy: %s", exc)
            self.reloads["failed"] += 1
            if isinstance(exc, ConfigError):
                return [str(issue) for issue in exc.issues]
            return [exc.message]
        self.policy = policy
        self.reloads["ok"] += 1
        self._apply_source_changes(changes)
        log.info("policy reloaded from %s (%s)", policy.path, changes.describe(self.core.sources))
        return []

    def _apply_source_changes(self, changes: SourceChanges) -> None:
        """Start, stop and replace workers as a reload changed the sources in use."""
        arbiter, link = self.arbiter, self.link
        for i in changes.added:
            arbiter.add(self.core.sources[i])
        for i in changes.retired:
            arbiter.retire(i)
            link.stop(i, self.options.drain_timeout)
        for i in changes.changed:
            arbiter.replace(i, self.core.sources[i])
            link.stop(i, self.options.drain_timeout)
        for i in changes.revived:
            if i not in changes.changed:
                arbiter.replace(i, self.core.sources[i])

    # -- the loop ----------------------------------------------------------------------------
    def recover(self) -> int:
        """Load every message of the spool into its queue."""
        now = time.time()
        n = 0
        # Each recovered message is a few long-lived objects in no cycle; with the collector
        # on, its passes walk the growing queue again and again (a quarter of the time for a
        # million messages). One collection after start-up (settle_heap) is enough.
        collecting = gc.isenabled()
        gc.disable()
        try:
            for rec in self.spool.recover():
                self.core.enqueue(
                    rec.msg_id, rec.env, rec.size, now, attempts=rec.attempts, due=rec.due
                )
                n += 1
        finally:
            if collecting:
                gc.enable()
        self.core.recovered = n
        if n:
            log.info("recovered %d messages from the spool", n)
        return n

    def run(self) -> int:
        """Run until stopped; return the process exit code."""
        self._install_signals()
        try:
            self.recover()
            settle_heap()
            self.arbiter.start_all()
            self._loop()
        finally:
            self.shutdown()
        return 0

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.ingress, zmq.POLLIN)
        poller.register(self.workers, zmq.POLLIN)
        poller.register(self._wake_r.fileno(), zmq.POLLIN)
        poller.register(self.control.sock, zmq.POLLIN)
        if self.resolver is not None:  # DNS answers wake the loop; core.step collects them
            poller.register(self.resolver.fileno(), zmq.POLLIN)
        if (limits_fd := self.core.limiter.fileno()) is not None:  # shared limits' answers
            poller.register(limits_fd, zmq.POLLIN)
        last_tick = last_watchdog = last_prune = 0.0
        stop_deadline = 0.0
        busy = False
        while True:
            now = time.time()
            events = dict(poller.poll(0 if busy else self._poll_timeout(now)))
            if self._wake_r.fileno() in events or self._signals:
                self._dispatch_signals()
            if self.control.sock in events:  # first: operators are answered during floods
                self.control.read()
            if self.workers in events:
                self.link.read()
            if self.ingress in events:
                self._read_ingress()
            now = time.time()
            # Spin without sleeping only while a turn used its whole budget: work remains.
            busy = not self.stopping and self.core.step(now) >= self.options.core.dispatch_budget
            self.core.outcomes.commit()
            mono = time.monotonic()
            if mono - last_tick >= 0.2:
                last_tick = mono
                self.arbiter.tick()
                self.core.tick(now)
                if mono - last_prune >= 60.0:
                    last_prune = mono
                    self.spool.prune_client_ids(now - self.options.dedup_window)
                if mono - last_watchdog >= 1.0:
                    last_watchdog = mono
                    sdnotify.notify("WATCHDOG=1")
                    if self.metrics is not None:
                        # No queue list: a metrics scrape must not cost O(queues).
                        snapshot = self.status({"queues_limit": 0})
                        snapshot["paths"] = self.core.path_counts()
                        self.metrics.update(snapshot)
            if self.stopping:
                if not stop_deadline:
                    stop_deadline = mono + self.options.drain_timeout
                if not self.arbiter.alive():
                    return
                if mono > stop_deadline:
                    log.warning("drain timeout passed; killing remaining workers")
                    self.arbiter.terminate_all(signal.SIGKILL)
                    self.arbiter.wait_all(mono + 5)
                    return

    def _poll_timeout(self, now: float) -> int:
        core = self.core
        nxt = min(core.book.due.next_due(), core.dispatcher.next_wake(), core.desk.next_feed())
        wait = min(0.2, max(0.0, nxt - now))
        if self.core.outcomes.pending():
            wait = min(wait, self.core.settings.outcome_delay)
        return int(wait * 1000) + (1 if wait > 0 else 0)

    def _read_ingress(self) -> None:
        batch: list[list[zmq.Frame]] = []
        frames_read = 0
        # Bounded per turn, so that workers' heartbeats and other clients are served while a
        # flood of requests is spooled (each request's expansion is bounded by Limits).
        while len(batch) < _INGRESS_BATCH and frames_read < _INGRESS_FRAMES:
            try:
                frames = self.ingress.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            batch.append(frames)
            frames_read += len(frames)
        replies = self.ingress_handler.handle_batch(batch)
        del batch
        for reply in replies:
            try:
                self.ingress.send_multipart(reply, zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                log.warning("cannot answer an injector: %s", exc)

    # -- workers -----------------------------------------------------------------------------
    def _send_jobs(self, src: int, jobs: list[Job]) -> None:
        self.link.send_jobs(src, jobs)

    def _send_site(self, src: int, spec: SiteSpec) -> None:
        self.link.send_site(src, spec)

    def _worker_ready(self, src: int) -> None:
        self._ready_seen.add(src)
        self._maybe_announce_ready()

    def _worker_exited(self, slot: WorkerSlot, reason: str) -> None:
        self._ready_seen.discard(slot.index)
        self.core.desk.worker_gone(slot.index, slot.failed)
        self._maybe_announce_ready()

    def _maybe_announce_ready(self) -> None:
        if self._ready_announced:
            return
        expected = {s.index for s in self.arbiter.slots if s.failed is None and not s.retired}
        if not expected <= self._ready_seen:
            return
        self._ready_announced = True
        log.info("coordinator ready on %s with %d workers", self.endpoint, len(expected))
        sdnotify.notify("READY=1")
        if self.options.ready_file:
            tmp = Path(self.options.ready_file + ".tmp")
            tmp.write_text(self.endpoint)
            tmp.replace(self.options.ready_file)

    def status(self, request: dict[str, Any] | None = None) -> dict[str, Any]:
        """Return the queue counters plus each worker's pid and failure, if any.

        Only the largest queues are listed (`queues_limit`, default 50, from `queues_offset`):
        a host with a million queues must not answer with a reply of hundreds of megabytes.
        """
        request = request or {}
        limit = _bounded_int(request.get("queues_limit"), 50, 10_000)
        offset = _bounded_int(request.get("queues_offset"), 0, 2**31)
        st = self.core.status(limit, offset)
        st["workers"] = {s.source.name: s.pid for s in self.arbiter.slots}
        st["failures"] = {s.source.name: s.failed for s in self.arbiter.slots if s.failed}
        st["spool"] = {
            "accepted": self.ingress_handler.accepted,
            "rejected": self.ingress_handler.rejected,
            "salvage": self.spool.salvage,
        }
        st["reloads"] = dict(self.reloads)
        st["fast_impl"] = IMPLEMENTATION
        st["metrics_port"] = self.metrics.port if self.metrics is not None else None
        return st

    # -- stop --------------------------------------------------------------------------------
    def begin_stop(self) -> None:
        """Stop taking messages and ask every worker to finish what it holds."""
        self.stopping = True
        self.arbiter.stopping = True
        self.ingress_handler.refusing = "coordinator is shutting down; try again later"
        sdnotify.notify("STOPPING=1")
        self.link.stop_all(self.options.drain_timeout)

    def shutdown(self) -> None:
        """Close everything; messages still in flight stay in the spool for the next start."""
        self.arbiter.stopping = True
        if self.arbiter.alive():
            self.arbiter.terminate_all()
            if not self.arbiter.wait_all(time.monotonic() + 5):
                self.arbiter.terminate_all(signal.SIGKILL)
                self.arbiter.wait_all(time.monotonic() + 5)
        self.arbiter.stop_zygote()
        self.core.outcomes.commit(force=True)
        if self.resolver is not None:
            self.resolver.close()
        self.logs.close()
        if self.log_pub is not None:
            self.logs.publisher = None
            self.log_pub.close()
        self.logs.keep_unwritten(Path(self.options.spool_dir) / _UNLOGGED)
        self.spool.close()
        if self.metrics is not None:
            self.metrics.close()
        self.core.limiter.close()
        self.ingress.close(0)
        self.workers.close(0)
        self.control.sock.close(0)
        self.ctx.term()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if self.options.ready_file:
            Path(self.options.ready_file).unlink(missing_ok=True)
