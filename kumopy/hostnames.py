"""Host names, address literals and unsafe characters: the one home of their syntax."""

from __future__ import annotations

import ipaddress
import re

__all__ = ["LDH_LABEL", "UNSAFE", "host_address", "hostname_problem", "parse_address_literal"]

LDH_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
"""One DNS label of a host name: letters, digits and hyphens, no hyphen at either end."""
_LABEL = re.compile(LDH_LABEL)

UNSAFE = re.compile(r"[\x00-\x20\x7f<>]")
"""Characters that would break an SMTP command line: controls, space, DEL and angle brackets."""


def hostname_problem(text: str) -> str | None:
    """Return why text is not a valid DNS host name, or None."""
    if not text:
        return "must not be empty"
    if not text.isascii():
        return f"{text!r} is not ASCII; write an internationalised name in its xn-- form"
    if len(text) > 253:
        return f"{text[:40]!r}... is longer than 253 characters"
    for label in text.split("."):
        if not label:
            return f"{text!r} has an empty label (two dots in a row or a leading dot)"
        if len(label) > 63:
            return f"{text!r} has a label longer than 63 characters"
        if not _LABEL.fullmatch(label):
            return (
                f"{text!r} has an invalid label {label!r}: use letters, digits and hyphens, "
                "not starting or ending with a hyphen"
            )
    return None


def parse_address_literal(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Return the address of an RFC 5321 literal `[a.b.c.d]` or `[IPv6:...]`; raise ValueError."""
    if not (text.startswith("[") and text.endswith("]")):
        raise ValueError(f"{text!r} is not an address literal in brackets")
    inner = text[1:-1]
    if inner[:5].lower() == "ipv6:":
        return ipaddress.IPv6Address(inner[5:])
    if ":" in inner:
        raise ValueError(f"write an IPv6 address literal as [IPv6:{inner}]")
    return ipaddress.IPv4Address(inner)


def host_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """Return the address in "192.0.2.1", "[IPv6:2001:db8::1]" or "[::1]"; None for a name."""
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None
