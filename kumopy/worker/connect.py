"""Open a session to a site for one source: its hosts in order, STARTTLS as the path says."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from kumopy.config import EgressSource
from kumopy.errors import (
    DeliveryError,
    SMTPReplyError,
    SourceBindError,
    TlsHandshakeError,
    TlsUnavailableError,
)
from kumopy.hostnames import host_address
from kumopy.ipc.jobs import SiteSpec
from kumopy.smtp.client import SMTPClient
from kumopy.smtp.protocol import Timeouts
from kumopy.smtp.tls import TlsPolicy
from kumopy.worker.hosts import Candidate, candidates

__all__ = ["Connector", "Failure", "Session"]

log = logging.getLogger(__name__)

_OPPORTUNISTIC = ("Opportunistic", "OpportunisticInsecure")


@dataclass(slots=True)
class Session:
    """An open session and the host it went to."""

    client: SMTPClient
    peer_name: str


@dataclass(slots=True)
class Failure:
    """No host of the site could be used: the reply every waiting job gets."""

    text: str
    enhanced: str = "4.4.1"
    peer: Candidate | None = None
    extra: dict[str, object] = field(default_factory=dict)
    """bind_failed / errno when the source address could not be bound."""


class Connector:
    """Open sessions for one source; remember hosts whose TLS is broken (Opportunistic)."""

    def __init__(self, source: EgressSource) -> None:
        self.source = source
        self.bind_failures = 0
        self._broken: dict[str, float] = {}
        """Address -> monotonic time until which it gets mail in clear (its TLS failed)."""

    def _tls(self, spec: SiteSpec, name: str, address: str) -> TlsPolicy:
        """Return the TLS policy for one connection to (name, address)."""
        mode = str(spec.config.get("enable_tls", "Opportunistic"))
        until = self._broken.get(address)
        if until is not None:
            if time.monotonic() < until and mode in _OPPORTUNISTIC:
                mode = "Disabled"
            elif time.monotonic() >= until:
                del self._broken[address]
        # An IP literal host has no name to check: the certificate must then name the IP.
        server = None if host_address(name) is not None else name
        ca = spec.config.get("tls_ca_file")
        return TlsPolicy(mode, server, str(ca) if ca else None)

    def _remember_broken(self, spec: SiteSpec, address: str) -> None:
        remember = spec.config.get("remember_broken_tls", 3600.0)
        if remember:
            self._broken[address] = time.monotonic() + float(remember)

    async def open(self, spec: SiteSpec, ehlo: str, timeouts: Timeouts) -> Session | Failure:
        """Connect to the first host that greets us (and does TLS as the path wants)."""
        src = self.source.source_address
        found, skipped = await candidates(self.source, spec.hosts)
        if not found:
            listed = ", ".join(
                f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, _a, p, _f in spec.hosts
            )
            why = f"; {skipped}" if skipped else ""
            text = (
                f"kumopy: no {self.source.family or 'usable'} destination host for source "
                f"{self.source.name!r} ({src or 'unbound'}) among {listed or 'none'}{why}"
            )
            return Failure(text, "4.4.4")
        reasons: list[str] = []
        last: Candidate | None = None
        for cand in found:
            name, addr, port = last = cand
            tls = self._tls(spec, name, addr)
            for attempt in (tls, TlsPolicy("Disabled")):
                client = SMTPClient()
                try:
                    await client.connect(
                        addr,
                        port,
                        source_address=src,
                        ehlo_domain=ehlo,
                        timeouts=timeouts,
                        tls=attempt,
                    )
                except TlsHandshakeError as exc:
                    if attempt.mode in _OPPORTUNISTIC:
                        # KumoMTA's remember_broken_tls: this host gets mail in clear for a
                        # while, starting now.
                        log.warning("%s; trying %s again in clear", exc.message, addr)
                        self._remember_broken(spec, addr)
                        continue
                    reasons.append(exc.message)
                    break
                except TlsUnavailableError as exc:
                    reasons.append(exc.message)
                    break
                except SourceBindError as exc:
                    self.bind_failures += 1
                    log.warning("source %s: %s", self.source.name, exc.message)
                    extra: dict[str, object] = {"bind_failed": exc.address, "errno": exc.errno_name}
                    return Failure(f"kumopy: {exc.message}", "4.4.1", cand, extra)
                except DeliveryError as exc:
                    reasons.append(exc.message)
                    break
                except SMTPReplyError as exc:
                    command = exc.reply.command or "banner"
                    reasons.append(f"{addr}:{port} answered {command} with {exc}")
                    break
                except ValueError as exc:
                    return Failure(f"kumopy: {exc}", "4.4.1", cand)
                return Session(client, name)
        log.info("source %s: site %s unreachable: %s", self.source.name, spec.name, reasons)
        return Failure("kumopy: " + "; ".join(reasons), "4.4.1", last)
