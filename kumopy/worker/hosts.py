"""Destination hosts a source can reach: the addresses of its own family, in preference order."""

from __future__ import annotations

import asyncio
import random
import socket

from kumopy.config import EgressSource
from kumopy.hostnames import host_address

__all__ = ["Candidate", "Host", "by_preference", "candidates"]

_FAMILIES = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6, None: socket.AF_UNSPEC}

Candidate = tuple[str, str, int]
"""(host name as listed, IP address, port)."""


Host = tuple[str, str | None, int, int]
"""(host name, address or None to resolve, port, MX preference), as a SiteSpec lists them."""


def by_preference(hosts: list[Host]) -> list[tuple[str, str | None, int]]:
    """Order hosts by MX preference, shuffling each group of equal preference (RFC 5321 5.1)."""
    groups: dict[int, list[tuple[str, str | None, int]]] = {}
    for name, address, port, pref in hosts:
        groups.setdefault(pref, []).append((name, address, port))
    out: list[tuple[str, str | None, int]] = []
    for pref in sorted(groups):
        group = groups[pref]
        # Spread load over equal hosts, but keep one host's addresses together and in order.
        names = list(dict.fromkeys(h[0] for h in group))
        random.shuffle(names)
        out.extend(h for name in names for h in group if h[0] == name)
    return out


async def candidates(source: EgressSource, hosts: list[Host]) -> tuple[list[Candidate], str]:
    """Return the addresses of the source's family to try, and why others were skipped."""
    loop = asyncio.get_running_loop()
    want = source.family
    out: list[Candidate] = []
    skipped: list[str] = []
    for name, address, port in by_preference(hosts):
        ip = host_address(address or name)
        if ip is not None:
            fam = "ipv6" if ip.version == 6 else "ipv4"
            if want is None or fam == want:
                out.append((name, str(ip), port))
            else:
                skipped.append(f"{name} is {fam}")
            continue
        # An mx_list host name: smart hosts are found by the system's resolver (/etc/hosts).
        try:
            infos = await loop.getaddrinfo(
                name, port, family=_FAMILIES[source.family], type=socket.SOCK_STREAM
            )
        except OSError as exc:
            skipped.append(f"{name}: cannot resolve ({exc.strerror or exc})")
            continue
        seen: set[str] = set()
        for info in infos:
            addr = str(info[4][0])
            if addr not in seen:
                seen.add(addr)
                out.append((name, addr, port))
        if not seen:
            skipped.append(f"{name} has no {want} address")
    return out, "; ".join(skipped)
