"""Length-prefixed JSON frames over a pipe: the coordinator's requests to the zygote."""

from __future__ import annotations

import json
import os
import select
import struct
import time
from typing import Any

__all__ = ["MAX_FRAME", "read_frame", "write_frame"]

MAX_FRAME = 1 << 20
"""Largest frame either side accepts: a request is one worker's arguments, a few KiB."""
_LENGTH = struct.Struct("!I")


def write_frame(fd: int, obj: dict[str, Any]) -> None:
    """Write one JSON object with its 4-byte length (a blocking pipe, whole or an error)."""
    body = json.dumps(obj, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise ValueError(f"frame of {len(body)} bytes is larger than {MAX_FRAME}")
    view = memoryview(_LENGTH.pack(len(body)) + body)
    while view:
        view = view[os.write(fd, view) :]


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes:
    chunks: list[bytes] = []
    while n:
        if deadline is not None:
            # Without select a hung peer would stall the coordinator's loop forever.
            wait = deadline - time.monotonic()
            poller = select.poll()  # not select(): the coordinator's fds may pass 1024
            poller.register(fd, select.POLLIN)
            if wait <= 0 or not poller.poll(wait * 1000):
                raise TimeoutError("no answer in time")
        chunk = os.read(fd, n)
        if not chunk:
            raise EOFError("the other end closed the pipe")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int, timeout: float | None = None) -> dict[str, Any]:
    """Read one frame; EOFError at its end, TimeoutError after `timeout`, ValueError on garbage."""
    deadline = None if timeout is None else time.monotonic() + timeout
    (length,) = _LENGTH.unpack(_read_exact(fd, _LENGTH.size, deadline))
    if length > MAX_FRAME:
        raise ValueError(f"frame of {length} bytes is larger than {MAX_FRAME}")
    obj = json.loads(_read_exact(fd, length, deadline))  # ValueError on garbage
    if not isinstance(obj, dict):
        raise ValueError("bad frame: not a JSON object")
    return obj
