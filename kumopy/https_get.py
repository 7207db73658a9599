"""Fetch one small resource by HTTPS/1.1 GET over asyncio streams: no redirects, capped body."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import ssl
from collections.abc import Sequence

from kumopy.errors import HttpsGetError

__all__ = ["https_get"]

_MAX_HEADER_BYTES = 16 * 1024
_MAX_HEADERS = 100
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
_DIGITS = re.compile(r"[0-9]{1,18}")


async def https_get(
    host: str,
    addresses: Sequence[str],
    path: str,
    *,
    port: int = 443,
    ssl_context: ssl.SSLContext,
    deadline: float,
    max_body: int = 64 * 1024,
) -> bytes:
    """GET `path` from `host` at the first of `addresses` (IPs) that works; return the body."""
    # `ssl_context` checks the certificate against `host`; only status 200 is accepted;
    # `deadline` (on loop.time()'s clock) bounds the connects and the exchange together.
    failures: list[str] = []
    stage = "connect"
    if not host.isascii():
        raise HttpsGetError(f"host {host!r} must be in its A-label (xn--) form", "connect")
    for addr in addresses:
        where = f"{addr} port {port}"
        try:
            # An IP literal never reaches the system resolver; a name would, so refuse names.
            ipaddress.ip_address(addr)
        except ValueError:
            failures.append(f"{addr!r} is not an IP address")
            continue
        try:
            async with asyncio.timeout_at(deadline):
                reader, writer = await asyncio.open_connection(
                    addr, port, ssl=ssl_context, server_hostname=host
                )
        except TimeoutError:
            # The deadline covers the whole fetch: no time is left for the other addresses.
            failures.append(f"{where}: timed out connecting or in the TLS handshake")
            raise HttpsGetError(_join(host, failures), "timeout") from None
        except ssl.SSLCertVerificationError as e:
            stage = "tls"
            failures.append(f"{where}: TLS verification failed: {e.verify_message}")
            continue
        except ssl.SSLError as e:
            stage = "tls"
            failures.append(f"{where}: TLS handshake failed: {e.reason or e}")
            continue
        except OSError as e:
            failures.append(f"{where}: connect failed: {e.strerror or e}")
            continue
        try:
            return await _exchange(reader, writer, host, path, port, deadline, max_body, where)
        finally:
            # Abort rather than close: the body is read, and a TLS close_notify exchange with a
            # misbehaving server could outlast the deadline.
            writer.transport.abort()
    if not failures:
        failures.append("no addresses to connect to")
    raise HttpsGetError(_join(host, failures), stage)


def _join(host: str, failures: list[str]) -> str:
    return f"https://{host}: " + "; ".join(failures)


async def _exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    host: str,
    path: str,
    port: int,
    deadline: float,
    max_body: int,
    where: str,
) -> bytes:
    """Send the request and read one response on an open connection."""
    host_header = host if port == 443 else f"{host}:{port}"
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nConnection: close\r\n"
        "Accept: text/plain\r\nUser-Agent: kumopy\r\n\r\n"
    )
    doing = "sending the request"
    try:
        async with asyncio.timeout_at(deadline):
            writer.write(request.encode("ascii"))
            await writer.drain()
            doing = "reading the response headers"
            status, reason, headers = await _read_head(reader)
            if status != 200:
                raise HttpsGetError(_status_problem(host, where, status, reason, headers), "http")
            doing = "reading the response body"
            return await _read_body(reader, headers, max_body)
    except TimeoutError:
        raise HttpsGetError(f"https://{host} at {where}: timed out {doing}", "timeout") from None
    except _BadResponse as e:
        raise HttpsGetError(f"https://{host} at {where}: {e}", "http") from None
    except ssl.SSLError as e:
        raise HttpsGetError(f"https://{host} at {where}: TLS error {doing}: {e}", "tls") from None
    except (OSError, asyncio.IncompleteReadError) as e:
        raise HttpsGetError(
            f"https://{host} at {where}: connection lost {doing}: {e}", "http"
        ) from e


class _BadResponse(Exception):
    """The response is malformed or over a limit (turned into HttpsGetError by the caller)."""


def _status_problem(
    host: str, where: str, status: int, reason: str, headers: dict[str, str]
) -> str:
    text = f"https://{host} at {where}: HTTP {status} {reason}".rstrip()
    if 300 <= status < 400:
        target = headers.get("location", "(no Location)")
        return f"{text}: redirect to {target} not followed (RFC 8461 section 3.3)"
    return f"{text} (only 200 is accepted)"


async def _read_line(reader: asyncio.StreamReader, what: str) -> bytes:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as e:
        raise _BadResponse(f"connection closed in the {what}") from e
    except asyncio.LimitOverrunError as e:
        raise _BadResponse(f"{what} line too long") from e
    return line


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, str, dict[str, str]]:
    """Read the status line and headers; header names are lower-cased."""
    line = await _read_line(reader, "status line")
    parts = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    if (
        len(parts) < 2
        or not parts[0].startswith("HTTP/1.")
        or not re.fullmatch(r"[0-9]{3}", parts[1])
    ):
        raise _BadResponse(f"not an HTTP/1.x status line: {line[:80]!r}")
    status, reason = int(parts[1]), parts[2] if len(parts) > 2 else ""
    headers: dict[str, str] = {}
    total = len(line)
    while True:
        line = await _read_line(reader, "headers")
        total += len(line)
        if total > _MAX_HEADER_BYTES or len(headers) > _MAX_HEADERS:
            raise _BadResponse(f"response headers over {_MAX_HEADER_BYTES} bytes")
        text = line.decode("latin-1").rstrip("\r\n")
        if not text:
            return status, reason, headers
        name, sep, value = text.partition(":")
        if not sep or not name or name != name.strip():
            raise _BadResponse(f"malformed header line: {text[:80]!r}")
        key = name.lower()
        value = value.strip()
        # Repeated headers fold into one comma-separated value (RFC 9110 5.3).
        headers[key] = f"{headers[key]}, {value}" if key in headers else value


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str], cap: int) -> bytes:
    """Read a chunked, Content-Length or close-delimited body of at most `cap` bytes."""
    too_big = f"body over the {cap}-byte limit"
    coding = headers.get("transfer-encoding")
    if coding is not None:
        if coding.lower().split(",")[-1].strip() != "chunked":
            raise _BadResponse(f"unsupported Transfer-Encoding {coding!r}")
        return await _read_chunked(reader, cap, too_big)
    length = headers.get("content-length")
    if length is not None:
        if not _DIGITS.fullmatch(length):
            raise _BadResponse(f"bad Content-Length {length!r}")
        n = int(length)
        if n > cap:
            raise _BadResponse(f"{too_big} (Content-Length {n})")
        try:
            return await reader.readexactly(n)
        except asyncio.IncompleteReadError as e:
            raise _BadResponse(f"connection closed after {len(e.partial)} of {n} bytes") from e
    # No framing: the body ends when the server closes (we sent Connection: close).
    body = await reader.read(cap + 1)
    while len(body) <= cap:
        more = await reader.read(cap + 1 - len(body))
        if not more:
            return body
        body += more
    raise _BadResponse(too_big)


async def _read_chunked(reader: asyncio.StreamReader, cap: int, too_big: str) -> bytes:
    body = b""
    while True:
        line = await _read_line(reader, "chunk size")
        size_text = line.split(b";", 1)[0].strip()
        # int(x, 16) alone would also take "0x1f", "+1f" and "1_f".
        if not _HEX.fullmatch(size_text):
            raise _BadResponse(f"bad chunk size {size_text[:20]!r}")
        size = int(size_text, 16)
        if size == 0:
            break
        if len(body) + size > cap:
            raise _BadResponse(too_big)
        try:
            body += await reader.readexactly(size)
            crlf = await reader.readexactly(2)
        except asyncio.IncompleteReadError as e:
            raise _BadResponse("connection closed inside a chunk") from e
        if crlf != b"\r\n":
            raise _BadResponse("chunk not followed by CRLF")
    # Trailer fields, if any, end with an empty line; we have no use for them.
    total = 0
    while True:
        line = await _read_line(reader, "trailers")
        total += len(line)
        if not line.strip():
            return body
        if total > _MAX_HEADER_BYTES:
            raise _BadResponse("trailers too long")
