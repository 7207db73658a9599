"""The control socket: operators' requests answered apart from injection, so never starved."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import zmq

from kumopy.coordinator.operations import Operations
from kumopy.errors import KumoError, ProtocolError
from kumopy.ipc.control import (
    BOUNCE,
    PING,
    QUEUES,
    REBIND,
    RELOAD,
    RESUME,
    STATUS,
    SUSPEND,
    parse_selection,
)
from kumopy.ipc.framing import decode_header, error_reply, ok_reply

__all__ = ["ControlServer"]

log = logging.getLogger(__name__)

_PER_TURN = 64
"""Control requests answered per loop turn at most (each is small and quick)."""
_MAX_FRAME = 64 * 1024


class ControlServer:
    """Answer control requests on their own ROUTER socket (ipc mode 0600 or loopback tcp)."""

    def __init__(
        self,
        sock: zmq.Socket[bytes],
        endpoint: str,
        ops: Operations,
        status: Callable[[dict[str, Any]], dict[str, Any]],
        reload: Callable[[], list[str]],
    ) -> None:
        self.sock = sock
        self.ops = ops
        self.status = status
        self.reload = reload
        sock.setsockopt(zmq.MAXMSGSIZE, _MAX_FRAME)
        path = endpoint.removeprefix("ipc://") if endpoint.startswith("ipc://") else None
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # a stale socket file of a crashed run
            old = os.umask(0o177)  # created 0600: only the owner (root, kumopy) may connect
            try:
                sock.bind(endpoint)
            finally:
                os.umask(old)
        else:
            sock.bind(endpoint)
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.answered = 0

    def read(self) -> None:
        """Answer the requests waiting, a bounded number per turn."""
        for _ in range(_PER_TURN):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) < 2:
                continue  # not even an identity and a header: nothing to answer
            envelope, frame = frames[:-1], frames[-1]
            reply = self._answer(frame)
            with contextlib.suppress(zmq.ZMQError):
                self.sock.send_multipart([*envelope, reply], zmq.NOBLOCK)
            self.answered += 1

    def _answer(self, frame: bytes) -> bytes:
        req: Any = None
        try:
            header = decode_header(frame, max_bytes=_MAX_FRAME)
            req = header.get("req")
            return ok_reply(req, self._handle(header))
        except KumoError as exc:
            return error_reply(req, exc)
        except Exception as exc:  # a bug in one verb must not stop the coordinator
            log.exception("control request failed")
            return error_reply(req, f"internal error: {type(exc).__name__}: {exc}", "internal")

    def _handle(self, header: dict[str, Any]) -> Any:
        kind = header["kind"]
        now = time.time()
        ops = self.ops
        if kind == PING:
            return {"pong": True}
        if kind == STATUS:
            return self.status(header)
        if kind == QUEUES:
            limit = header.get("limit", 200)
            if type(limit) is not int or not 0 <= limit <= 100_000:
                raise ProtocolError("limit must be a whole number from 0 to 100000")
            return ops.queues(now, limit)
        if kind == SUSPEND:
            return ops.suspend(parse_selection(header), now)
        if kind == RESUME:
            return ops.resume(parse_selection(header))
        if kind == BOUNCE:
            dry = header.get("dry_run", False)
            if not isinstance(dry, bool):
                raise ProtocolError("dry_run must be true or false")
            return ops.bounce(parse_selection(header, reason_needed=not dry), now, dry)
        if kind == REBIND:
            pool = header.get("to_pool")
            if not isinstance(pool, str) or not pool:
                raise ProtocolError("rebind needs the name of the new pool (to_pool)")
            return ops.rebind(parse_selection(header), pool, now)
        if kind == RELOAD:
            errors = self.reload()
            return {"ok": not errors, "errors": errors}
        raise ProtocolError(f"unknown control request kind {kind!r}")
