"""SMTP wire encoding: the DATA payload and envelope address checks.

`encode_data` is the hot one; it comes from kumopy._fast (Cython, with its Python twin).
"""

from __future__ import annotations

import ipaddress
import re

from kumopy._fast import encode_data
from kumopy.errors import InjectionError

__all__ = ["decode_data", "domain_of", "encode_data", "validate_address", "wire_address"]

_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_BAD_CHARS = re.compile(r"[\x00-\x20\x7f<>]")
_TERMINATOR = b".\r\n"


def decode_data(payload: bytes) -> bytes:
    """Undo encode_data: drop the final ".\\r\\n" and one leading dot of every line."""
    if not payload.endswith(_TERMINATOR):
        raise ValueError("DATA payload does not end with .\\r\\n")
    if payload == _TERMINATOR:
        return b""
    if not payload.endswith(b"\r\n" + _TERMINATOR):
        raise ValueError("DATA payload does not end with CRLF.CRLF")
    body = payload[: -len(_TERMINATOR)]
    if b"\r\n." in body:
        body = body.replace(b"\r\n.", b"\r\n")
    if body[:1] == b".":
        body = body[1:]
    return body


def _check_domain(domain: str, prefix: str) -> None:
    """Raise InjectionError unless domain is a host name or an address literal."""
    if domain.startswith("["):
        if not domain.endswith("]"):
            raise InjectionError(f"{prefix}: unterminated address literal {domain!r}")
        literal = domain[1:-1]
        try:
            if literal[:5].lower() == "ipv6:":
                ipaddress.IPv6Address(literal[5:])
            else:
                ipaddress.IPv4Address(literal)
        except ValueError:
            raise InjectionError(f"{prefix}: invalid address literal {domain!r}") from None
        return
    if not domain.isascii():
        raise InjectionError(f"{prefix}: non-ASCII domain, use its IDNA (xn--) form")
    if len(domain) > 253:
        raise InjectionError(f"{prefix}: domain longer than 253 octets")
    for label in domain.split("."):
        if not label:
            raise InjectionError(f"{prefix}: empty label in domain {domain!r}")
        if not _LABEL.fullmatch(label):
            raise InjectionError(f"{prefix}: invalid domain label {label!r}")


def validate_address(addr: str, *, allow_empty: bool = False, where: str = "recipient") -> str:
    """Check an envelope address is safe and well formed for the wire; return it unchanged."""
    if addr == "":
        if allow_empty:
            return addr
        raise InjectionError(f"{where}: empty address")
    bad = _BAD_CHARS.search(addr)
    if bad is not None:
        ch = bad.group()
        what = {" ": "a space", "<": "an angle bracket", ">": "an angle bracket"}.get(
            ch, f"control character {ch!r}"
        )
        raise InjectionError(f"{where} {addr!r}: contains {what}")
    local, at, domain = addr.rpartition("@")
    if not at:
        raise InjectionError(f"{where} {addr!r}: missing '@'")
    if not local:
        raise InjectionError(f"{where} {addr!r}: empty local part")
    if not domain:
        raise InjectionError(f"{where} {addr!r}: empty domain")
    if not local.isascii():
        raise InjectionError(
            f"{where} {addr!r}: non-ASCII local part needs SMTPUTF8, which is not supported yet"
        )
    if "@" in local and not (local.startswith('"') and local.endswith('"')):
        raise InjectionError(f"{where} {addr!r}: more than one '@' outside a quoted local part")
    if len(local) > 64:
        raise InjectionError(f"{where} {addr!r}: local part longer than 64 octets")
    if len(addr) > 254:
        raise InjectionError(f"{where} {addr!r}: address longer than 254 octets")
    _check_domain(domain, f"{where} {addr!r}")
    return addr


def wire_address(addr: str, *, where: str = "recipient") -> bytes:
    """Return addr as ASCII bytes for MAIL/RCPT; raise InjectionError if it could break the line.

    A cheap check for the hot path: only what would corrupt the command (control characters,
    spaces, brackets, non-ASCII). Full syntax checks belong to validate_address() at injection.
    """
    bad = _BAD_CHARS.search(addr)
    if bad is not None:
        raise InjectionError(f"{where} {addr!r}: contains {bad.group()!r}, not allowed on the wire")
    try:
        return addr.encode("ascii")
    except UnicodeEncodeError:
        raise InjectionError(
            f"{where} {addr!r}: non-ASCII address needs SMTPUTF8, which is not supported yet"
        ) from None


def domain_of(addr: str) -> str:
    """Return the lowercased domain part of an address."""
    return addr.rpartition("@")[2].lower()
