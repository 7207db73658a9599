"""Supervise the worker processes of the egress sources, in the manner of gunicorn's arbiter."""

from __future__ import annotations

import base64
import errno
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kumopy.config import EgressSource
from kumopy.coordinator.zygote import Zygote
from kumopy.ipc.work import WORKER_BOOT_ERROR

__all__ = ["Arbiter", "WorkerSlot"]

log = logging.getLogger(__name__)

STORM_RESTARTS = 5
"""More restarts than this within STORM_WINDOW seconds stop restarting a source."""
STORM_WINDOW = 60.0
HEARTBEAT_STALE = 15.0
BOOT_TIMEOUT = 60.0
"""A worker not Ready this long after its start is terminated (many start at once on a host)."""
KILL_GRACE = 5.0
EXIT_SETTLE = 0.1
"""Seconds between reaping a worker and acting on its exit: the results it sent just before
exiting may still be in the coordinator's ZeroMQ I/O thread, and a job whose worker is gone
is sent again (a forked worker exits within a millisecond of its last message)."""


@dataclass(slots=True, eq=False)
class WorkerSlot:
    """One source's worker: its process and restart history."""

    index: int
    source: EgressSource
    pid: int | None = None
    proc: subprocess.Popen[bytes] | None = None
    """The exec'd worker's Popen; None for a worker forked by the zygote (tracked by pid).
    The slots of a group (--sources-per-worker) share their pid and Popen."""
    started: float = 0.0
    ready_at: float | None = None
    """When the running worker said Ready; until then the boot timeout applies, not staleness."""
    last_seen: float = 0.0
    restarts: deque[float] = field(default_factory=deque)
    next_start: float | None = None
    failed: str | None = None
    """Why this source's worker is no longer restarted (boot failure or restart storm)."""
    term_sent: float | None = None
    grouped: bool = False
    """The running process serves other sources too (--sources-per-worker)."""
    exited: tuple[float, int] | None = None
    """When the worker was reaped and its exit code, until the arbiter acts on its exit."""
    retired: bool = False
    """A reload took the source out of every pool: its worker drains and is not restarted."""
    replacement: EgressSource | None = None
    """A reload changed the source: this definition's worker starts once the old one exits."""


class Arbiter:
    """Start, reap, restart and stop the workers; never called from a signal handler."""

    def __init__(
        self,
        sources: Sequence[EgressSource],
        endpoint: str,
        on_exit: Callable[[WorkerSlot, str], None],
        worker_args: Sequence[str] = (),
        backoff: tuple[float, float] = (0.1, 10.0),
        stale_after: float = HEARTBEAT_STALE,
        kill_grace: float = KILL_GRACE,
        boot_timeout: float = BOOT_TIMEOUT,
        zygote: Zygote | None = None,
        sources_per_worker: int = 1,
    ) -> None:
        self.per_worker = max(1, sources_per_worker)
        self.stale_after = stale_after
        self.boot_timeout = boot_timeout
        self.zygote = zygote
        self.kill_grace = kill_grace
        self.endpoint = endpoint
        self.slots = [WorkerSlot(i, s) for i, s in enumerate(sources)]
        self.by_pid: dict[int, list[WorkerSlot]] = {}
        """The slots each running process serves: one, or a group at start."""
        self.on_exit = on_exit
        self.worker_args = list(worker_args)
        self.backoff = backoff
        self.stopping = False
        self.clock: Callable[[], float] = time.monotonic
        """The clock of starts, heartbeats and restarts (tests move a fake one)."""

    def _argv(self, slots: Sequence[WorkerSlot]) -> list[str]:
        """Return the worker's arguments (after `python -m kumopy worker`)."""
        defs: list[str] = []
        for slot in slots:
            definition = base64.b64encode(json.dumps(slot.source.to_dict()).encode()).decode()
            defs += ["--source-def", definition]
        return [
            *("--endpoint", self.endpoint, *defs),
            *("--parent-pid", str(os.getpid()), *self.worker_args),
        ]

    def spawn(self, slot: WorkerSlot) -> None:
        """Start a fresh worker for `slot` alone: forked by the zygote, else exec'd."""
        # Alone even with --sources-per-worker: a restart or a reload never touches a
        # process that serves other sources, nor waits to gather a group.
        argv = self._argv([slot])
        self._started([slot], argv, self.zygote.spawn(argv) if self.zygote is not None else None)

    def _started(self, slots: list[WorkerSlot], argv: list[str], pid: int | None) -> None:
        """Track the worker the zygote forked (`pid`), or exec one when it could not."""
        proc = None
        if pid is None:
            proc = subprocess.Popen(
                [sys.executable, "-m", "kumopy", "worker", *argv], close_fds=True
            )
            pid = proc.pid
        now = self.clock()
        for slot in slots:
            slot.proc, slot.pid, slot.grouped = proc, pid, len(slots) > 1
            slot.started = slot.last_seen = now
            slot.ready_at = None
            slot.next_start = None
            slot.term_sent = None
        self.by_pid[pid] = slots
        how = "exec'd" if proc is not None else "forked"
        names = ", ".join(slot.source.name for slot in slots)
        log.info("started worker for source %s (pid %d, %s)", names, pid, how)

    def start_all(self) -> None:
        """Start the zygote, if any, then every worker (a group of sources per process)."""
        n = self.per_worker
        groups = [self.slots[i : i + n] for i in range(0, len(self.slots), n)]
        argvs = [self._argv(group) for group in groups]
        pids: list[int | None] = [None] * len(argvs)
        if self.zygote is not None:
            self.zygote.start()
            self.zygote.wait_ready(self.boot_timeout)
            pids = self.zygote.spawn_many(argvs)
        for group, argv, pid in zip(groups, argvs, pids, strict=True):
            self._started(group, argv, pid)

    def stop_zygote(self) -> None:
        """Stop the zygote (at shutdown; the workers it forked are ours, not its)."""
        if self.zygote is not None:
            self.zygote.stop()

    def seen(self, index: int) -> None:
        """Note a sign of life (Ready, results, heartbeat) from a worker."""
        self.slots[index].last_seen = self.clock()

    def ready(self, index: int) -> None:
        """Note a worker's Ready: from now on its silence counts, not its boot time."""
        slot = self.slots[index]
        slot.ready_at = slot.last_seen = self.clock()

    def reap(self) -> None:
        """Collect every exited worker without blocking and decide about restarting it."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            code = os.waitstatus_to_exitcode(status)
            if self.zygote is not None and pid == self.zygote.pid:
                self.zygote.exited(code)
                continue
            for slot in self.by_pid.pop(pid, ()):
                if slot.proc is not None:
                    slot.proc.returncode = code  # keep Popen from waiting on a reaped pid
                slot.exited = (self.clock(), code)
        self._settle()

    def _settle(self) -> None:
        """Act on the exits reaped at least EXIT_SETTLE seconds ago."""
        now = self.clock()
        for slot in self.slots:
            if slot.exited is not None and now - slot.exited[0] >= EXIT_SETTLE:
                code = slot.exited[1]
                slot.pid = slot.proc = slot.exited = None
                self._after_exit(slot, code)

    # -- reloads ------------------------------------------------------------------------------
    def add(self, source: EgressSource) -> WorkerSlot:
        """Start a worker for a source a reload added (its index is the next slot's)."""
        slot = WorkerSlot(len(self.slots), source)
        self.slots.append(slot)
        self.spawn(slot)
        return slot

    def retire(self, index: int) -> None:
        """Let a source's worker finish and stop for good (told to stop by the caller)."""
        slot = self.slots[index]
        slot.retired, slot.replacement = True, None

    def replace(self, index: int, source: EgressSource) -> None:
        """Run `source` in this slot: now if no worker runs, else once the old one exits."""
        slot = self.slots[index]
        slot.retired = False
        if slot.pid is None:
            slot.source, slot.failed, slot.replacement = source, None, None
            slot.restarts.clear()
            self.spawn(slot)
        else:
            slot.replacement = source

    def shared(self, slot: WorkerSlot) -> bool:
        """Return True when the slot's process serves other sources too."""
        return slot.pid is not None and len(self.by_pid.get(slot.pid, ())) > 1

    def source_stopped(self, index: int) -> None:
        """Note a source's bye: a retired or replaced source of a group counts as exited.

        Its process keeps serving the rest of the group and does not exit; the worker
        answered every job it held before its bye, and the caller returns any job sent
        after it (never received) to its queue through `on_exit`.
        """
        slot = self.slots[index]
        if self.stopping or slot.exited is not None or not self.shared(slot):
            return  # alone: its process exits, and `reap` acts on that as before
        if not slot.retired and slot.replacement is None:
            return  # not asked by a reload: the heartbeat check handles a source gone quiet
        assert slot.pid is not None
        self.by_pid[slot.pid].remove(slot)
        slot.pid = slot.proc = None
        self._after_exit(slot, None)

    def _after_exit(self, slot: WorkerSlot, code: int | None) -> None:
        name = slot.source.name
        if code is None:
            how = "said bye; its process serves other sources"
        elif code >= 0:
            how = f"exit code {code}"
        else:
            how = f"signal {signal.Signals(-code).name}"
        now = self.clock()
        if slot.retired and not self.stopping:
            reason = f"worker for retired source {name} stopped ({how})"
            log.info("%s", reason)
            self.on_exit(slot, reason)
            return
        if slot.replacement is not None and not self.stopping:
            reason = f"worker for {name} stopped ({how}); starting it with the new definition"
            log.info("%s", reason)
            self.on_exit(slot, reason)
            slot.source, slot.replacement, slot.failed = slot.replacement, None, None
            slot.restarts.clear()
            self.spawn(slot)
            return
        if self.stopping or code is None:
            reason = f"worker for {name} stopped ({how})"
            log.info("%s", reason)
        elif code == WORKER_BOOT_ERROR and not slot.grouped:
            # A group fails at boot when any one of its sources does: each is restarted
            # alone below, and only the one that cannot boot is given up on.
            slot.failed = f"worker for source {name} failed at boot ({how}); not restarting"
            reason = slot.failed
            log.error("%s", reason)
        else:
            slot.restarts.append(now)
            while slot.restarts and slot.restarts[0] < now - STORM_WINDOW:
                slot.restarts.popleft()
            if len(slot.restarts) > STORM_RESTARTS:
                slot.failed = (
                    f"worker for source {name} died {len(slot.restarts)} times in "
                    f"{STORM_WINDOW:.0f}s (last: {how}); restart storm stopped"
                )
                reason = slot.failed
                log.error("%s", reason)
            else:
                base, cap = self.backoff
                delay = min(cap, base * 2 ** (len(slot.restarts) - 1)) * random.uniform(0.5, 1.5)
                slot.next_start = now + delay
                reason = f"worker for {name} died ({how}); restarting in {delay:.2f}s"
                log.warning("%s", reason)
        self.on_exit(slot, reason)

    def tick(self) -> None:
        """Restart workers whose backoff has passed; kill hung ones."""
        if self.zygote is not None:
            self.zygote.tick(self.stopping)
        self._settle()
        now = self.clock()
        for slot in self.slots:
            if slot.exited is not None:
                continue
            if slot.pid is None:
                if (
                    not self.stopping
                    and not slot.retired
                    and slot.failed is None
                    and slot.next_start is not None
                    and now >= slot.next_start
                ):
                    self.spawn(slot)
                continue
            if slot.term_sent is not None:
                if now - slot.term_sent > self.kill_grace:
                    self._kill(slot, signal.SIGKILL)
            elif self.stopping:
                continue
            elif slot.ready_at is None and now - slot.started > self.boot_timeout:
                # Counted from the start, not from a heartbeat: on a busy host hundreds of
                # workers boot at once and the last ones take far longer than a heartbeat.
                log.error(
                    "worker for %s not ready %.0fs after its start; terminating it",
                    slot.source.name,
                    now - slot.started,
                )
                self._kill(slot, signal.SIGTERM)
                slot.term_sent = now
            elif slot.ready_at is not None and now - slot.last_seen > self.stale_after:
                log.error(
                    "worker for %s sent nothing for %.0fs; terminating it",
                    slot.source.name,
                    now - slot.last_seen,
                )
                self._kill(slot, signal.SIGTERM)
                slot.term_sent = now

    def _kill(self, slot: WorkerSlot, sig: int) -> None:
        # A slot of a group shares its pid: a hung source stops its whole group (documented).
        if slot.pid is None or slot.exited is not None:
            return  # never signal a reaped pid: the kernel may have given it to another process
        try:
            os.kill(slot.pid, sig)
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                raise

    def alive(self) -> list[WorkerSlot]:
        """Return the slots whose process is running."""
        return [s for s in self.slots if s.pid is not None]

    def processes(self) -> list[WorkerSlot]:
        """Return one running slot per worker process (a group's process is signalled once)."""
        found: dict[int, WorkerSlot] = {}
        for slot in self.slots:
            if slot.pid is not None:
                found.setdefault(slot.pid, slot)
        return list(found.values())

    def terminate(self, index: int, sig: int = signal.SIGTERM) -> None:
        """Send `sig` to one slot's worker (its whole group's process), if it runs."""
        self._kill(self.slots[index], sig)

    def terminate_all(self, sig: int = signal.SIGTERM) -> None:
        """Send `sig` to every running worker."""
        for slot in self.processes():
            self._kill(slot, sig)

    def wait_all(self, deadline: float) -> bool:
        """Reap until every worker has exited or `deadline` (monotonic) passes."""
        while self.alive() and time.monotonic() < deadline:
            self.reap()
            if self.alive():
                time.sleep(0.01)
        return not self.alive()
