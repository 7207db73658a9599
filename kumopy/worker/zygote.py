"""The zygote: import the worker's modules once, then fork a worker per coordinator request."""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import logging
import os
import random
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

from kumopy.gctune import settle_heap
from kumopy.ipc.pipe import read_frame, write_frame
from kumopy.parent import adopted_by, die_with_parent
from kumopy.smtp.tls import preload_contexts

__all__ = ["PRELOAD", "WorkerMain", "serve"]

log = logging.getLogger(__name__)

PRELOAD = (
    "kumopy.worker.main",
    "uvloop",
    "zmq.asyncio",
    "asyncio.unix_events",
    "ssl",
    "encodings.idna",
)
"""Everything a worker imports on its way to Ready, so that a fork shares it, never re-imports."""

WorkerMain = Callable[[list[str]], int]
"""Run a worker from its command-line arguments (after `kumopy worker`); return its exit code."""

_ADOPTION_TIMEOUT = 10.0
_PR_SET_NAME = 15
# Signals whose handlers each worker gets back as the zygote found them at its start, which
# is as a fresh interpreter has them (SIGINT raises KeyboardInterrupt, SIGPIPE is ignored).
_RESET = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGPIPE)


def serve(fd_in: int, fd_out: int, parent_pid: int, worker_main: WorkerMain) -> int:
    """Preload, say hello, then fork a worker for each request until the pipe closes."""
    # No state worth a graceful stop: die at once with the coordinator, even by SIGKILL.
    die_with_parent(signal.SIGKILL)
    if os.getppid() != parent_pid:
        return 0
    initial: dict[int, Any] = {sig: signal.getsignal(sig) for sig in _RESET}
    # Ctrl-C reaches the whole process group: the coordinator drains, then closes our pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for name in PRELOAD:
        importlib.import_module(name)
    preload_contexts()
    # Objects from the imports go to a generation the collector never visits, so that a
    # collection in a worker does not write to (and so copy) the pages it shares with us.
    settle_heap()
    write_frame(fd_out, {"hello": os.getpid(), "modules": len(sys.modules)})
    log.debug("zygote %d ready: %d modules, fds %s", os.getpid(), len(sys.modules), _fds())
    while True:
        try:
            request = read_frame(fd_in)
        except EOFError:
            return 0  # the coordinator stopped or died
        middle = 0
        try:
            argv = [str(a) for a in request["argv"]]
            pid, middle = _fork_worker(argv, parent_pid, initial, worker_main)
        except (OSError, KeyError, TypeError, RuntimeError) as exc:
            log.error("zygote: cannot fork a worker: %s", exc)
            write_frame(fd_out, {"error": str(exc)})
        else:
            write_frame(fd_out, {"pid": pid})
        if middle:
            os.waitpid(middle, 0)  # after the reply: the coordinator need not wait for this


def _fds() -> list[int]:
    return sorted(int(n) for n in os.listdir("/proc/self/fd"))


def _fork_worker(
    argv: list[str], parent_pid: int, initial: dict[int, Any], worker_main: WorkerMain
) -> tuple[int, int]:
    """Double-fork a worker so that it becomes the coordinator's child.

    Return the worker's pid and the intermediate process's, which the caller reaps.
    """
    if threading.active_count() != 1:
        # A fork copies only the calling thread: locks held by others would stay held.
        raise RuntimeError("the zygote has threads; refusing to fork")
    r, w = os.pipe()
    try:
        middle = os.fork()
    except OSError:
        os.close(r)
        os.close(w)
        raise
    if middle == 0:  # the intermediate process: fork the worker, report its pid, exit
        code = 1
        try:
            os.close(r)
            pid = os.fork()
            if pid == 0:
                os.close(w)
                _become_worker(argv, parent_pid, initial, worker_main)
            os.write(w, b"%d\n" % pid)
            code = 0
        finally:
            os._exit(code)  # never return into the zygote's loop
    os.close(w)
    text = b""
    try:
        while not text.endswith(b"\n"):
            chunk = os.read(r, 32)
            if not chunk:
                break
            text += chunk
        if not text.strip().isdigit():
            raise OSError("the intermediate process could not fork the worker")
    except OSError:
        os.waitpid(middle, 0)
        raise
    finally:
        os.close(r)
    return int(text), middle


def _become_worker(
    argv: list[str], parent_pid: int, initial: dict[int, Any], worker_main: WorkerMain
) -> None:
    """Turn this fork into a worker as an exec'd one would start; never return."""
    code = 1
    try:
        # Only stdin, stdout and stderr stay open, as with subprocess's close_fds.
        os.closerange(3, _fd_limit())
        for sig, handler in initial.items():
            signal.signal(sig, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        random.seed()  # a fresh state, not the zygote's copy (message ids, jitter)
        for handler in logging.root.handlers[:]:
            logging.root.removeHandler(handler)  # the worker sets its logging up itself
        _set_name(b"kumopy-worker")
        # PDEATHSIG fires on the death of the thread that forked us (the intermediate): set
        # it only once adopted by the coordinator, which run_worker then checks again.
        code = worker_main(argv) if adopted_by(parent_pid, _ADOPTION_TIMEOUT) else 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except BaseException:
        traceback.print_exc()
    finally:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(code)  # the zygote's stack below must never run again


def _fd_limit() -> int:
    try:
        return max(int(os.sysconf("SC_OPEN_MAX")), 256)
    except (OSError, ValueError):
        return 65536


def _set_name(name: bytes) -> None:
    """Name the process in ps and top (its command line still says `kumopy zygote`)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        pass
