"""STARTTLS for the SMTP client: the TLS policy, shared SSL contexts, the upgrade and its errors."""

from __future__ import annotations

import asyncio
import functools
import os
import re
import ssl
from dataclasses import dataclass
from typing import cast

from kumopy.errors import ProtocolError, TlsHandshakeError
from kumopy.hostnames import UNSAFE
from kumopy.smtp.certname import subject_name
from kumopy.smtp.protocol import ClientProtocol

__all__ = [
    "TLS_MODES",
    "TlsInfo",
    "TlsPolicy",
    "context_for",
    "preload_contexts",
    "upgrade",
]

TLS_MODES = ("Opportunistic", "OpportunisticInsecure", "Required", "RequiredInsecure", "Disabled")
"""KumoMTA's enable_tls values."""

_SHUTDOWN_TIMEOUT = 5.0
_SSL_SOURCE = re.compile(r"\s*\(_ssl\.c:\d+\)$")
_SSL_LABEL = re.compile(r"^\[[A-Z0-9_]+: [A-Z0-9_]+\] ")


@dataclass(frozen=True, slots=True)
class TlsPolicy:
    """How one connection uses STARTTLS: KumoMTA's enable_tls mode, the name to check, the CAs."""

    mode: str = "Opportunistic"
    """One of TLS_MODES: Opportunistic (TLS when offered, verified), OpportunisticInsecure (TLS
    when offered, unchecked), Required, RequiredInsecure (never in clear) or Disabled."""
    server_hostname: str | None = None
    """The MX host name the certificate must match, also sent as SNI. None when only the IP is
    known: the certificate must then name that IP (an IP SAN); a chain checked without any name
    would accept every certificate the CA ever issued, so that is never done."""
    ca_file: str | None = None
    """PEM file of the CAs to trust; None: the system store."""

    def __post_init__(self) -> None:
        if self.mode not in TLS_MODES:
            raise ValueError(f"TLS mode {self.mode!r} is not one of {', '.join(TLS_MODES)}")
        name = self.server_hostname
        if name is not None:
            if name.endswith("."):
                # DNS gives MX names fully qualified; certificates never carry the root dot.
                name = name[:-1]
                object.__setattr__(self, "server_hostname", name)
            if not name or not name.isascii() or UNSAFE.search(name):
                raise ValueError(f"invalid TLS server name {self.server_hostname!r}")

    @property
    def enabled(self) -> bool:
        """Return True unless the mode is Disabled."""
        return self.mode != "Disabled"

    @property
    def required(self) -> bool:
        """Return True when the session must never go on in clear."""
        return self.mode in ("Required", "RequiredInsecure")

    @property
    def verify(self) -> bool:
        """Return True when the certificate chain and name are checked."""
        return self.mode in ("Opportunistic", "Required")


@dataclass(frozen=True, slots=True)
class TlsInfo:
    """What protects a session after STARTTLS."""

    protocol_version: str
    """The TLS version, e.g. "TLSv1.3"."""
    cipher: str
    """The cipher suite's name, e.g. "TLS_AES_256_GCM_SHA384"."""
    peer_subject_name: str | None
    """The certificate's subject CN, else its whole subject (RFC 4514); None if none was sent.
    Reported even when nothing was checked."""
    verified: bool
    """True when the chain and the name were checked."""


def context_for(policy: TlsPolicy) -> ssl.SSLContext:
    """Return the shared SSLContext for the policy's checks and CA file; raise ValueError."""
    if not policy.verify:
        return _context(False, None, 0)
    stamp = 0
    if policy.ca_file is not None:
        try:
            # Part of the cache key: a rotated CA file is read again, an unchanged one never.
            stamp = os.stat(policy.ca_file).st_mtime_ns
        except OSError as exc:
            raise ValueError(f"cannot read TLS CA file {policy.ca_file}: {exc.strerror}") from exc
    return _context(True, policy.ca_file, stamp)


def preload_contexts() -> None:
    """Build the contexts of the default policies (the system CA store) ahead of need.

    The zygote calls it before forking workers: loading the system CA store costs tens of
    milliseconds of CPU and a few MiB per process, paid once and shared instead of once per
    worker (with 64 sources, about 30 µs per message of a 100,000-message run).
    """
    _context(True, None, 0)
    _context(False, None, 0)


@functools.lru_cache(maxsize=16)
def _context(verify: bool, ca_file: str | None, stamp: int) -> ssl.SSLContext:
    """Build an SSLContext (loading a CA store takes milliseconds: once, not per connection)."""
    if verify:
        try:
            ctx = ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load TLS CA file {ca_file}: {_reason(exc, 0)}") from exc
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _reason(exc: BaseException, timeout: float) -> str:
    """Say why a handshake failed, in OpenSSL's words where it has them."""
    if isinstance(exc, TimeoutError):
        return f"timed out after {timeout:g}s"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        text = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
        return _SSL_LABEL.sub("", _SSL_SOURCE.sub("", text))
    if isinstance(exc, ConnectionError):
        return f"connection lost: {str(exc) or 'closed by the peer'}"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


async def upgrade(
    proto: ClientProtocol,
    ctx: ssl.SSLContext,
    policy: TlsPolicy,
    address: str,
    where: str,
    timeout: float,
) -> TlsInfo:
    """Run the TLS handshake after a 220 to STARTTLS; switch proto to the TLS transport.

    Raises TlsHandshakeError on any failure, after closing the connection.
    """
    raw = proto.transport
    name = policy.server_hostname or address
    try:
        if raw is None or proto.exc is not None:
            raise proto.exc or ConnectionResetError("connection closed")
        if proto.replies or proto.reader.pending:
            # Bytes sent in clear after the 220 would be read as if they came over TLS.
            raise ProtocolError("the server sent data after its 220 reply to STARTTLS")
        # asyncio.timeout runs start_tls in this task: no other callback can read between the
        # check above and start_tls() taking the transport over. Both loops close the transport
        # when start_tls is cancelled; their own handshake timer is only a backstop.
        async with asyncio.timeout(timeout):
            tls = await proto.loop.start_tls(
                raw,
                proto,
                ctx,
                server_hostname=name,
                ssl_handshake_timeout=timeout * 2,
                ssl_shutdown_timeout=_SHUTDOWN_TIMEOUT,
            )
        sslobj = tls.get_extra_info("ssl_object") if tls is not None else None
        if sslobj is None or proto.exc is not None or proto.replies or proto.reader.pending:
            raise proto.exc or ProtocolError("the server sent data during the TLS handshake")
    except (OSError, ProtocolError) as exc:
        if raw is not None:
            raw.abort()
        # During the handshake the TLS layer keeps the loss to itself; record it here.
        proto.connection_lost(exc)
        host = policy.server_hostname
        raise TlsHandshakeError(
            f"TLS handshake with {where} failed: {_reason(exc, timeout)}", host, address
        ) from exc
    proto.transport = cast(asyncio.Transport, tls)
    sslobj = cast(ssl.SSLObject, sslobj)
    cipher = sslobj.cipher()
    return TlsInfo(
        protocol_version=sslobj.version() or "unknown",
        cipher=cipher[0] if cipher else "unknown",
        peer_subject_name=subject_name(sslobj.getpeercert(binary_form=True)),
        verified=policy.verify,
    )
