"""Child processes die with their parent: the kernel signals them when the coordinator dies."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time

__all__ = ["adopted_by", "become_subreaper", "die_with_parent"]

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> bool:
    """Call Linux prctl(option, value); return False where it is unavailable or refused."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(option, value, 0, 0, 0)) == 0
    return False


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send `sig` when the parent dies, even by SIGKILL (Linux prctl)."""
    _prctl(_PR_SET_PDEATHSIG, sig)


def become_subreaper() -> bool:
    """Adopt orphaned descendants (PR_SET_CHILD_SUBREAPER); return False where unsupported.

    A worker forked by the zygote's intermediate process is reparented to us, so that our
    waitpid() reaps it and sees its real exit status, as for a worker we started ourselves.
    """
    return _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def adopted_by(parent_pid: int, timeout: float = 5.0) -> bool:
    """Wait until `parent_pid` is our parent (after a double fork); False at the deadline."""
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while os.getppid() != parent_pid:
        # The intermediate process exits right after forking us: this is a few milliseconds.
        if time.monotonic() > deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
    return True
