"""Inject messages into a kumopy coordinator over ZeroMQ (sync and asyncio clients)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import zmq
import zmq.asyncio

from kumopy.errors import KumoError, error_from_dict
from kumopy.ipc.framing import decode_header
from kumopy.ipc.inject import (
    DEFAULT_ENDPOINT,
    InjectResult,
    Message,
    decode_inject_reply,
    encode_inject,
    encode_request,
)

__all__ = ["AsyncClient", "Client", "InjectResult", "Message"]


def _message(sender: str, recipients: Iterable[str] | str, data: bytes, **kw: Any) -> Message:
    rcpts = [recipients] if isinstance(recipients, str) else list(recipients)
    return Message(sender, rcpts, data, **kw)


class Client:
    """Synchronous client: one DEALER socket, several requests may be in flight."""

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        timeout: float = 30.0,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        self._own_ctx = context is None
        self.ctx: zmq.Context[Any] = context or zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.timeout_ms = int(timeout * 1000)
        self._req = itertools.count(1)

    def send(
        self,
        sender: str,
        recipients: Iterable[str] | str,
        data: bytes,
        *,
        id: str | None = None,
        tenant: str | None = None,
        campaign: str | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> InjectResult:
        """Inject one message and return its result."""
        msg = _message(
            sender, recipients, data, id=id, tenant=tenant, campaign=campaign, meta=dict(meta or {})
        )
        return self.send_batch([msg])[0]

    def send_batch(self, messages: Iterable[Message]) -> list[InjectResult]:
        """Inject a batch in one request; return one result per message, in order."""
        return next(self.send_batches([list(messages)], window=1))

    def send_batches(
        self, batches: Iterable[list[Message]], window: int = 4
    ) -> Iterator[list[InjectResult]]:
        """Pipeline batches, `window` requests in flight; yield results in request order."""
        pending: dict[int, int] = {}
        done: dict[int, list[InjectResult]] = {}
        order: list[int] = []
        it = iter(batches)
        exhausted = False
        while True:
            while not exhausted and len(pending) < window:
                try:
                    batch = next(it)
                except StopIteration:
                    exhausted = True
                    break
                req = next(self._req)
                self.sock.send_multipart(encode_inject(req, batch), copy=len(batch) < 64)
                pending[req] = len(batch)
                order.append(req)
            if not pending:
                return
            if not self.sock.poll(self.timeout_ms):
                raise KumoError(f"no answer from the coordinator in {self.timeout_ms / 1000:.0f}s")
            frame = self.sock.recv()
            answered = decode_header(frame).get("req")
            if not isinstance(answered, int) or answered not in pending:
                continue  # a late answer to an abandoned request
            done[answered] = decode_inject_reply(frame, pending.pop(answered))
            while order and order[0] in done:
                yield done.pop(order.pop(0))

    def request(self, kind: str, **fields: Any) -> Any:
        """Send a control request (ping, status) and return its result."""
        req = next(self._req)
        self.sock.send(encode_request(kind, req, **fields))
        while True:
            if not self.sock.poll(self.timeout_ms):
                raise KumoError(f"no answer from the coordinator in {self.timeout_ms / 1000:.0f}s")
            header = decode_header(self.sock.recv())
            if header.get("req") != req:
                continue
            if not header.get("ok"):
                raise error_from_dict(header.get("error") or {})
            return header.get("result")

    def close(self) -> None:
        """Close the socket (and the context this client created)."""
        self.sock.close(0)
        if self._own_ctx:
            self.ctx.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client; requests may be awaited concurrently."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, timeout: float = 30.0) -> None:
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.timeout = timeout
        self._req = itertools.count(1)
        self._waiters: dict[int, Any] = {}
        self._reader: Any = None

    async def send(
        self,
        sender: str,
        recipients: Iterable[str] | str,
        data: bytes,
        *,
        id: str | None = None,
        tenant: str | None = None,
        campaign: str | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> InjectResult:
        """Inject one message and return its result."""
        msg = _message(
            sender, recipients, data, id=id, tenant=tenant, campaign=campaign, meta=dict(meta or {})
        )
        return (await self.send_batch([msg]))[0]

    async def send_batch(self, messages: Iterable[Message]) -> list[InjectResult]:
        """Inject a batch in one request; return one result per message, in order."""
        import asyncio

        batch = list(messages)
        req = next(self._req)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiters[req] = fut
        if self._reader is None or self._reader.done():
            self._reader = asyncio.ensure_future(self._read())
        await self.sock.send_multipart(encode_inject(req, batch))
        try:
            frame = await asyncio.wait_for(fut, self.timeout)
        except TimeoutError:
            raise KumoError(f"no answer from the coordinator in {self.timeout:.0f}s") from None
        finally:
            self._waiters.pop(req, None)
        return decode_inject_reply(frame, len(batch))

    async def _read(self) -> None:
        while self._waiters:
            frame = await self.sock.recv()
            req = decode_header(frame).get("req")
            fut = self._waiters.get(req) if isinstance(req, int) else None
            if fut is not None and not fut.done():
                fut.set_result(frame)

    def close(self) -> None:
        """Close the socket and its context."""
        if self._reader is not None:
            self._reader.cancel()
        self.sock.close(0)
        self.ctx.term()
