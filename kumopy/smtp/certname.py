"""Read the subject name of a DER certificate, for saying who answered a TLS handshake."""

from __future__ import annotations

from collections.abc import Iterator

__all__ = ["subject_name"]

_CN = "2.5.4.3"
_SHORT = {
    _CN: "CN",
    "2.5.4.6": "C",
    "2.5.4.7": "L",
    "2.5.4.8": "ST",
    "2.5.4.9": "STREET",
    "2.5.4.10": "O",
    "2.5.4.11": "OU",
    "0.9.2342.19200300.100.1.1": "UID",
    "0.9.2342.19200300.100.1.25": "DC",
}
"""The attribute type names RFC 4514 (3) lets a string representation use."""
_STRINGS = {
    0x0C: "utf-8",  # UTF8String
    0x13: "ascii",  # PrintableString
    0x16: "ascii",  # IA5String
    0x14: "latin-1",  # TeletexString: in practice Latin-1
    0x1E: "utf-16-be",  # BMPString
    0x1C: "utf-32-be",  # UniversalString
}
_SEQUENCE, _SET, _OID, _VERSION = 0x30, 0x31, 0x06, 0xA0

_Element = tuple[int, int, int, int]
"""A DER element: tag, where it starts, where its content starts, where it ends."""


def _element(der: bytes, pos: int, end: int) -> _Element:
    """Return the element at pos; raise ValueError if it runs past end."""
    if pos + 2 > end:
        raise ValueError("truncated DER element")
    tag, length = der[pos], der[pos + 1]
    start = pos + 2
    if length & 0x80:
        n = length & 0x7F
        if not 1 <= n <= 4 or start + n > end:
            raise ValueError("bad DER length")
        length = int.from_bytes(der[start : start + n], "big")
        start += n
    if start + length > end:
        raise ValueError("truncated DER element")
    return tag, pos, start, start + length


def _children(der: bytes, parent: _Element, tag: int) -> Iterator[_Element]:
    """Yield the elements inside parent, which must have the given tag."""
    if parent[0] != tag:
        raise ValueError(f"DER tag {parent[0]:#x} where {tag:#x} belongs")
    pos, end = parent[2], parent[3]
    while pos < end:
        child = _element(der, pos, end)
        yield child
        pos = child[3]


def _oid(content: bytes) -> str:
    """Decode an OBJECT IDENTIFIER's content octets to dotted form."""
    arcs: list[int] = []
    value = 0
    for octet in content:
        value = (value << 7) | (octet & 0x7F)
        if not octet & 0x80:
            arcs.append(value)
            value = 0
    if not arcs:
        raise ValueError("empty OID")
    first = min(arcs[0] // 40, 2)
    return ".".join(map(str, [first, arcs[0] - 40 * first, *arcs[1:]]))


def _value(der: bytes, value: _Element) -> str | None:
    """Decode an attribute value that is a string; None for any other type."""
    codec = _STRINGS.get(value[0])
    if codec is None:
        return None
    return der[value[2] : value[3]].decode(codec, "replace")


def _escape(value: str) -> str:
    """Escape a string attribute value for an RFC 4514 string (2.4)."""
    out = "".join("\\" + ch if ch in '"+,;<>\\' else "\\00" if ch == "\0" else ch for ch in value)
    if out.startswith((" ", "#")):
        out = "\\" + out
    if out.endswith(" ") and len(out) > 1:
        out = out[:-1] + "\\ "
    return out


def _subject(der: bytes) -> list[list[tuple[str, str | None, str]]]:
    """Return the subject's relative distinguished names: lists of (OID, value, RFC 4514 value)."""
    cert = _element(der, 0, len(der))
    tbs = next(_children(der, cert, _SEQUENCE))
    fields = list(_children(der, tbs, _SEQUENCE))
    if fields and fields[0][0] == _VERSION:
        fields = fields[1:]
    # serialNumber, signature, issuer, validity, subject (RFC 5280 4.1)
    rdns: list[list[tuple[str, str | None, str]]] = []
    for rdn in _children(der, fields[4], _SEQUENCE):
        attrs: list[tuple[str, str | None, str]] = []
        for attr in _children(der, rdn, _SET):
            kind, value = list(_children(der, attr, _SEQUENCE))[:2]
            if kind[0] != _OID:
                raise ValueError("attribute type is not an OID")
            text = _value(der, value)
            # A value of another type is written as the hex of its whole encoding.
            shown = "#" + der[value[1] : value[3]].hex() if text is None else _escape(text)
            attrs.append((_oid(der[kind[2] : kind[3]]), text, shown))
        rdns.append(attrs)
    return rdns


def subject_name(der: bytes | None) -> str | None:
    """Return the subject's CN, else the whole subject (RFC 4514); None if it cannot be read."""
    if not der:
        return None
    try:
        rdns = _subject(der)
    except (ValueError, IndexError, StopIteration):
        return None
    # The most specific CN: RFC 4514 lists the last RDN first.
    for rdn in reversed(rdns):
        for oid, value, _ in rdn:
            if oid == _CN and value:
                return value
    text = ",".join(
        "+".join(f"{_SHORT.get(oid, oid)}={shown}" for oid, _, shown in rdn)
        for rdn in reversed(rdns)
    )
    return text or None
