"""SMTP wire encoding: the DATA payload, envelope address syntax and the line-length rule.

`encode_data` is the hot one; it comes from kumopy._fast (Cython, with its Python twin).
"""

from __future__ import annotations

import re
from typing import NoReturn

import idna

from kumopy._fast import encode_data, long_line_at
from kumopy.errors import InjectionError
from kumopy.hostnames import LDH_LABEL, UNSAFE, parse_address_literal

__all__ = [
    "MAX_LINE_LENGTH",
    "ascii_domain",
    "check_line_length",
    "decode_data",
    "domain_of",
    "encode_data",
    "validate_address",
    "wire_address",
]

MAX_LINE_LENGTH = 998
"""Longest line RFC 5322 (2.1.1) allows, in octets, not counting the line ending."""

_MAX_LOCAL = 64
_MAX_PATH = 254
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
# Dot-string "@" host name, local part 1-64 octets. The domain's 253-octet limit needs no check
# here: the whole path is capped at 254, and the local part and "@" take at least two of them.
_PLAIN_ADDRESS = re.compile(
    rf"(?=[^@]{{1,{_MAX_LOCAL}}}@){_ATEXT}+(?:\.{_ATEXT}+)*@{LDH_LABEL}(?:\.{LDH_LABEL})*"
)
# RFC 6531 (SMTPUTF8) widens atext and qtextSMTP with every non-ASCII character.
_NOT_DOT_STRING = re.compile(r"[^A-Za-z0-9!#$%&'*+/=?^_`{|}~.\u0080-\U0010ffff-]")
_LABEL = re.compile(LDH_LABEL)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# RFC 5321 Quoted-string: qtextSMTP (%d32-33 / %d35-91 / %d93-126) or a quoted-pairSMTP.
_QUOTED_LOCAL = re.compile(r'"(?:[ !#-\[\]-~]|\\[ -~])*"(?=@)')
# RFC 6531 (3.3) adds UTF8-non-ascii to qtextSMTP.
_QUOTED_LOCAL_UTF8 = re.compile(r'"(?:[ !#-\[\]-~\x80-\U0010ffff]|\\[ -~])*"(?=@)')
_TERMINATOR = b".\r\n"
_EOL = re.compile(rb"[\r\n]")


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


def _domain_problem(domain: str) -> str | None:
    """Return what is wrong with domain (a host name or an address literal), or None."""
    if domain.startswith("["):
        if not domain.endswith("]"):
            return f"unterminated address literal {domain!r}"
        try:
            parse_address_literal(domain)
        except ValueError:
            return f"invalid address literal {domain!r}"
        return None
    bad = UNSAFE.search(domain)
    if bad is not None:
        return f"contains {_describe(bad.group())} in the domain"
    if not domain.isascii():
        # RFC 6531: a U-label domain is fine; it must map to a valid A-label (IDNA 2008).
        try:
            domain = idna.encode(domain, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError) as exc:
            return f"invalid internationalized domain: {exc}"
    if len(domain) > 253:
        return "domain longer than 253 octets"
    for label in domain.split("."):
        if not label:
            return f"empty label in domain {domain!r}"
        if not _LABEL.fullmatch(label):
            return f"invalid domain label {label!r}"
    return None


def _describe(ch: str) -> str:
    """Name a refused character for an error message."""
    if ch == " ":
        return "a space"
    if ch in "<>":
        return "an angle bracket"
    return f"character {ch!r}"


def _dot_string_problem(local: str) -> str | None:
    """Return what keeps local from being an RFC 5321 Dot-string, or None."""
    bad = _NOT_DOT_STRING.search(local)
    if bad is not None:
        ch = bad.group()
        if ch == "@":
            return "more than one '@' outside a quoted local part"
        if ch == '"':
            return 'a quote may only enclose the whole local part ("...", inner ones escaped)'
        return f'contains {_describe(ch)}, allowed only in a quoted local part ("...")'
    if local.startswith("."):
        return "empty atom (local part starts with a dot)"
    if local.endswith("."):
        return "empty atom (local part ends with a dot)"
    if ".." in local:
        return "empty atom (two dots in a row)"
    return None


def _quoted_string_problem(local: str) -> str | None:
    """Return what keeps local (starting with a quote) from being a Quoted-string, or None."""
    # The caller has refused control characters, so every character left is qtextSMTP (RFC
    # 6531 adds non-ASCII) except the quote and the backslash, which may follow a backslash.
    i, n = 1, len(local)
    while i < n:
        ch = local[i]
        if ch == '"':
            if i == n - 1:
                return None
            return f"{local[i + 1 :]!r} after the closing quote of the quoted local part"
        if ch == "\\":
            # quoted-pairSMTP: a backslash takes the next character, printable ASCII only.
            if i + 1 < n and not " " <= local[i + 1] <= "~":
                return f"{local[i : i + 2]!r}: only printable ASCII may follow a backslash"
            i += 2
        else:
            i += 1
    if n > 1 and local[-1] == '"':
        # Reaching the end means that quote did not close the string: a backslash escaped it.
        return "unterminated quoted local part (its last quote is escaped by a backslash)"
    return "unterminated quoted local part"


def _address_problem(addr: str) -> str | None:
    """Return what is wrong with a non-empty envelope address, or None: the careful path."""
    # The domain never holds an "@" (a quoted local part may), so the last one splits them.
    local, at, domain = addr.rpartition("@")
    control = _CONTROL.search(addr)
    if control is not None:
        # Named first, whatever else is wrong: a CR or LF here is a try at injecting a command.
        ch = control.group()
        if local.startswith('"') and control.start() < len(local):
            return f"character {ch!r} not allowed in a quoted local part"
        return f"contains control character {ch!r}"
    if not at:
        return "missing '@'"
    if not local:
        return "empty local part"
    if not domain:
        return "empty domain"
    # Lengths are in octets: a UTF-8 address (RFC 6531) counts its encoded bytes.
    try:
        octets = len(local.encode("utf-8")), len(addr.encode("utf-8"))
    except UnicodeEncodeError:
        return "not valid Unicode (a lone surrogate)"
    if octets[0] > _MAX_LOCAL:
        return f"local part longer than {_MAX_LOCAL} octets"
    if octets[1] > _MAX_PATH:
        return f"address longer than {_MAX_PATH} octets"
    check = _quoted_string_problem if local.startswith('"') else _dot_string_problem
    return check(local) or _domain_problem(domain)


def validate_address(addr: str, *, allow_empty: bool = False, where: str = "recipient") -> str:
    """Check an envelope address against RFC 5321 (4.1.2); return it unchanged."""
    # The common case (a dot-string at a host name) costs one regex match in C.
    if len(addr) <= _MAX_PATH and _PLAIN_ADDRESS.fullmatch(addr) is not None:
        return addr
    if addr == "":
        if allow_empty:
            return addr
        raise InjectionError(f"{where}: empty address")
    problem = _address_problem(addr)
    if problem is not None:
        raise InjectionError(f"{where} {addr!r}: {problem}")
    return addr


def wire_address(addr: str, *, where: str = "recipient", utf8: bool = False) -> bytes:
    """Return addr as bytes for MAIL/RCPT; raise InjectionError if it could break the line.

    A cheap check for the hot path: only what would corrupt the command (control characters,
    spaces or brackets outside a quoted local part, and non-ASCII unless utf8 says the session
    uses SMTPUTF8, RFC 6531: then UTF-8). Full syntax checks belong to validate_address() at
    injection; every address it accepts passes here.
    """
    bad = UNSAFE.search(addr)
    if bad is not None:
        # A quoted local part may hold spaces and brackets; look again past it.
        quoted = None
        if addr.startswith('"'):
            quoted = (_QUOTED_LOCAL_UTF8 if utf8 else _QUOTED_LOCAL).match(addr)
        if quoted is not None:
            bad = UNSAFE.search(addr, quoted.end())
        if bad is not None:
            _refuse_on_wire(addr, where, bad.group(), utf8)
    try:
        return addr.encode("utf-8" if utf8 else "ascii")
    except UnicodeEncodeError:
        _refuse_on_wire(addr, where, "", utf8)


def _refuse_on_wire(addr: str, where: str, bad: str, utf8: bool) -> NoReturn:
    """Raise the InjectionError for an address wire_address() will not write."""
    # Name a control character first: that is what could smuggle in a command.
    control = _CONTROL.search(addr)
    if control is not None:
        bad = control.group()
    elif utf8 and not bad:
        # Only a lone surrogate (from surrogateescape decoding) has no UTF-8 form.
        raise InjectionError(f"{where} {addr!r}: not valid Unicode, cannot be written as UTF-8")
    elif not addr.isascii() and not utf8:
        raise InjectionError(f"{where} {addr!r}: non-ASCII address needs an SMTPUTF8 session")
    raise InjectionError(f"{where} {addr!r}: contains {bad!r}, not allowed on the wire")


def check_line_length(data: bytes | memoryview) -> None:
    """Raise InjectionError if a line of the message is longer than RFC 5322's 998 octets."""
    if len(data) <= MAX_LINE_LENGTH:
        return
    # One linear pass: LF-delimited lines found with memchr (the compiled twin), and only a
    # line that long split again at CR. A regex search for 999 non-CR/LF octets would restart
    # at every offset of every line: quadratic in the line length.
    start = long_line_at(data, MAX_LINE_LENGTH)
    if start >= 0:
        _refuse_long_line(data, start)


def _refuse_long_line(data: bytes | memoryview, start: int) -> NoReturn:
    """Raise the InjectionError for the over-long line starting at offset start."""
    # Line endings as encode_data sees them: CRLF, bare CR and bare LF each end one line. No
    # CRLF straddles start: the octet there is neither CR nor LF.
    head = bytes(data[:start])
    line = 1 + head.count(b"\r") + head.count(b"\n") - head.count(b"\r\n")
    eol = _EOL.search(data, start)
    length = (len(data) if eol is None else eol.start()) - start
    raise InjectionError(
        f"message line {line} is {length} octets long; RFC 5322 allows at most "
        f"{MAX_LINE_LENGTH} (not counting the line ending): encode that part as "
        "quoted-printable or base64"
    )


def domain_of(addr: str) -> str:
    """Return the lowercased domain part of an address."""
    return addr.rpartition("@")[2].lower()


def ascii_domain(addr: str) -> str:
    """Return addr with a U-label domain as its A-label (RFC 6531 3.2: no SMTPUTF8 needed)."""
    local, at, domain = addr.rpartition("@")
    if not at or domain.isascii() or not local.isascii():
        return addr
    try:
        return f"{local}@{idna.encode(domain, uts46=True).decode('ascii')}"
    except (idna.IDNAError, UnicodeError):
        return addr
