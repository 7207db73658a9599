"""Destination hosts a source can reach: the addresses of its own family, in preference order."""

from __future__ import annotations

import asyncio
import socket

from kumopy.config import EgressSource
from kumopy.hostnames import host_address

__all__ = ["Candidate", "candidates"]

_FAMILIES = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6, None: socket.AF_UNSPEC}

Candidate = tuple[str, str, int]
"""(host name as listed, IP address, port)."""


async def candidates(
    source: EgressSource, hosts: list[tuple[str, int]]
) -> tuple[list[Candidate], str]:
    """Return the addresses of the source's family to try, and why others were skipped."""
    loop = asyncio.get_running_loop()
    want = source.family
    out: list[Candidate] = []
    skipped: list[str] = []
    for name, host_port in hosts:
        port = source.remote_port or host_port
        ip = host_address(name)
        if ip is not None:
            fam = "ipv6" if ip.version == 6 else "ipv4"
            if want is None or fam == want:
                out.append((name, str(ip), port))
            else:
                skipped.append(f"{name} is {fam}")
            continue
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
