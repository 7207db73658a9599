"""MX lookups with dnspython's asyncio resolver: hosts by preference, addresses, TTL cache."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import idna

from kumopy.dns_cache import TTLCache
from kumopy.errors import (
    BadDomainError,
    DNSError,
    DNSUnavailableError,
    DomainNotFoundError,
    NoAddressError,
    NullMXError,
    ResolverConfigError,
)

__all__ = [
    "MXResolver",
    "Resolution",
    "ResolvedHost",
    "ResolverConfig",
    "normalize_domain",
    "parse_name_server",
]

_MX, _A, _AAAA, _NS, _TXT = (
    dns.rdatatype.MX,
    dns.rdatatype.A,
    dns.rdatatype.AAAA,
    dns.rdatatype.NS,
    dns.rdatatype.TXT,
)


# -- configuration -----------------------------------------------------------------------------


def parse_name_server(entry: str) -> tuple[str, int]:
    """Return (address, port) of "192.0.2.1", "192.0.2.1:5353", "::1" or "[::1]:5353"."""
    text, port_text = entry.strip(), ""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"name server {entry!r}: write an IPv6 address and port as [::1]:53")
        port_text = rest[1:]
        if rest and not port_text:
            raise ValueError(f"name server {entry!r}: the port after ':' is missing")
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        if not port_text:
            raise ValueError(f"name server {entry!r}: the port after ':' is missing")
    else:
        host = text  # a bare IPv4 or IPv6 address
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"name server {entry!r}: {host!r} is not an IP address (a name server must be "
            "given by address: finding it by name would itself need DNS)"
        ) from None
    port = 53
    if port_text:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"name server {entry!r}: port {port_text!r} is not 1 to 65535")
        port = int(port_text)
    return str(address), port


@dataclass(frozen=True, slots=True)
class ResolverConfig:
    """Where and how to send DNS queries; no name servers means the system's resolv.conf."""

    name_servers: tuple[str, ...] = ()
    """Servers as "HOST", "HOST:PORT" or "[V6]:PORT", tried in order; () means resolv.conf."""
    timeout: float = 5.0
    """Seconds one DNS query (MX, A or AAAA) may take in all, over every server and retry."""
    attempts: int = 2
    """Queries a server gets within `timeout` (each waits timeout / attempts at most)."""
    failure_ttl: float = 10.0
    """Seconds a transient failure (SERVFAIL, timeout) is remembered, to spare a broken server."""
    max_ttl: float = 86400.0
    """Longest a positive or negative answer is kept, whatever its TTL says."""
    max_queries: int = 200
    """DNS queries in flight at once: each holds a socket, so this bounds file descriptors."""
    cache_size: int = 100_000
    """Domains (and, separately, host names) kept in the cache."""
    resolv_conf: str = "/etc/resolv.conf"
    """The system configuration read when `name_servers` is empty."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "name_servers", tuple(self.name_servers))
        for entry in self.name_servers:
            parse_name_server(entry)
        for name in ("timeout", "failure_ttl", "max_ttl"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a positive number of seconds")
        for name in ("attempts", "max_queries", "cache_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")

    def endpoints(self) -> tuple[tuple[str, int], ...]:
        """Return the configured servers as (address, port) pairs."""
        return tuple(parse_name_server(e) for e in self.name_servers)


# -- results -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResolvedHost:
    """One mail host of a domain: an MX target (or the domain itself) and its addresses."""

    name: str
    """Host name, lower case, without the final dot."""
    preference: int
    """MX preference; lower is tried first, equal preferences are tried in random order."""
    addresses: tuple[str, ...]
    """IPv4 then IPv6 addresses, as DNS gave them."""


@dataclass(frozen=True, slots=True)
class Resolution:
    """Where mail for one domain goes, or why it cannot go anywhere now."""

    domain: str
    """The domain, lower case, in IDNA A-label form."""
    site: str
    """The MX host names, sorted and comma-joined: domains sharing their MX share a site."""
    hosts: tuple[ResolvedHost, ...]
    """Hosts with at least one address, by preference (equal preferences adjacent)."""
    expires: float
    """Monotonic time after which this answer must be looked up again."""
    error: DNSError | None = None
    """Why no host can be used; None when hosts is not empty."""
    notes: tuple[str, ...] = ()
    """What was skipped and why (hosts without address, failed A/AAAA lookups)."""
    implicit: bool = False
    """True when the domain has no MX and its own address is used (RFC 5321 5.1)."""

    @property
    def families(self) -> frozenset[str]:
        """Return the address families ("ipv4", "ipv6") some host can be reached over."""
        return frozenset(
            "ipv6" if ":" in addr else "ipv4" for h in self.hosts for addr in h.addresses
        )

    def groups(self) -> list[tuple[ResolvedHost, ...]]:
        """Return the hosts grouped by preference, lowest preference first."""
        out: list[tuple[ResolvedHost, ...]] = []
        for host in self.hosts:
            if out and out[-1][0].preference == host.preference:
                out[-1] += (host,)
            else:
                out.append((host,))
        return out


def _a_label(text: str) -> tuple[str, str | None]:
    """Return (lower-case A-label form, why it is invalid or None)."""
    name = text.strip().rstrip(".")
    if not name.isascii():
        try:
            name = idna.encode(name, uts46=True).decode("ascii")
        except idna.IDNAError as exc:
            return name.lower(), f"{text!r} is not a valid internationalised domain: {exc}"
    name = name.lower()
    if not name:
        return name, "the domain is empty"
    try:
        dns.name.from_text(name)
    except dns.exception.DNSException as exc:
        return name, f"{text!r} is not a valid domain: {exc}"
    return name, None


def normalize_domain(text: str) -> str:
    """Return the form Resolution.domain takes: lower case, IDNA A-label, no final dot."""
    return _a_label(text)[0]


@dataclass(frozen=True, slots=True)
class _Answer:
    """One DNS query's outcome, reduced to what a Resolution needs."""

    records: tuple[Any, ...] = ()
    ttl: float = 0.0
    problem: str | None = None
    transient: bool = False
    nxdomain: bool = False


@dataclass(frozen=True, slots=True)
class _Addresses:
    """A host name's A and AAAA addresses, and why there are none or fewer."""

    addresses: tuple[str, ...]
    expires: float
    problems: tuple[str, ...] = field(default=())
    transient: bool = False


def _server_text(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _trouble(exc: Exception) -> str:
    """Describe, for an operator, why no server answered usefully."""
    if isinstance(exc, dns.resolver.LifetimeTimeout | dns.resolver.NoNameservers):
        seen: list[str] = []
        for server, _tcp, port, err, _resp in exc.kwargs.get("errors", []):
            host = str(server).removeprefix("Do53:").rpartition("@")[0] or str(server)
            what = err if isinstance(err, str) else (str(err) or type(err).__name__)
            if isinstance(err, dns.exception.Timeout):
                what = "no answer in time"
            text = f"{what} from {_server_text(host, int(port))}"
            if text not in seen:
                seen.append(text)
        if isinstance(exc, dns.resolver.LifetimeTimeout):
            head = f"timed out after {float(exc.kwargs.get('timeout', 0)):.1f}s"
            return f"{head} ({'; '.join(seen)})" if seen else head
        return "; ".join(seen) or "no name server could be reached"
    return str(exc) or type(exc).__name__


def _negative_ttl(exc: dns.resolver.NXDOMAIN) -> float:
    """Return the NXDOMAIN's negative-caching TTL: the SOA minimum (RFC 2308)."""
    for response in exc.kwargs.get("responses", {}).values():
        if isinstance(response, dns.message.QueryMessage):
            return float(response.resolve_chaining().minimum_ttl)
    return 0.0


class MXResolver:
    """Resolve domains to their mail hosts with dnspython's asyncio resolver, with a cache."""

    def __init__(
        self, config: ResolverConfig | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config = config or ResolverConfig()
        self._clock = clock
        if config.name_servers:
            self._dns = dns.asyncresolver.Resolver(configure=False)
            endpoints = config.endpoints()
            self._dns.nameservers = [dns.nameserver.Do53Nameserver(h, p) for h, p in endpoints]
            servers = ", ".join(_server_text(h, p) for h, p in endpoints)
        else:
            try:
                self._dns = dns.asyncresolver.Resolver(filename=config.resolv_conf)
            except dns.resolver.NoResolverConfiguration as exc:
                raise ResolverConfigError(
                    f"cannot use {config.resolv_conf} for DNS ({exc or 'no name server'}); "
                    "name the DNS servers in the configuration instead"
                ) from None
            listed = ", ".join(str(ns).removeprefix("Do53:") for ns in self._dns.nameservers)
            servers = f"{listed} (from {config.resolv_conf})"
        self.servers = servers
        """The servers asked, as messages name them."""
        self._dns.lifetime = config.timeout
        self._dns.timeout = config.timeout / config.attempts
        self._dns.cache = None  # our own caches hold the results, on our clock
        self._limit = asyncio.Semaphore(config.max_queries)
        self._domains: TTLCache[str, Resolution] = TTLCache(clock, config.cache_size)
        self._hosts: TTLCache[str, _Addresses] = TTLCache(clock, config.cache_size)

    def cached(self, domain: str) -> Resolution | None:
        """Return the cached, unexpired Resolution of domain, without any query."""
        return self._domains.get(normalize_domain(domain))

    def clear(self) -> None:
        """Forget every cached answer."""
        self._domains.clear()
        self._hosts.clear()

    async def resolve(self, domain: str) -> Resolution:
        """Return where mail for domain goes; failures come back as Resolution.error."""
        name, problem = _a_label(domain)
        if problem is not None:
            return self._failed(name, BadDomainError(name, problem), 0.0)

        async def fetch() -> tuple[Resolution, float]:
            res = await self._lookup(name)
            return res, res.expires

        return await self._domains.get_or_fetch(name, fetch)

    async def addresses(self, host: str) -> list[str]:
        """Return the A and AAAA addresses of a host name (cached; [] when it has none)."""
        found = await self._addresses(normalize_domain(host))
        return list(found.addresses)

    async def txt(self, name: str) -> list[str]:
        """Return the TXT records of a name, each record's strings joined ([] when none)."""
        answer = await self._query(dns.name.from_text(normalize_domain(name)), _TXT)
        if answer.transient:
            raise DNSUnavailableError(name, f"TXT lookup of {name} failed: {answer.problem}")
        return [b"".join(r.strings).decode("utf-8", "replace") for r in answer.records]

    async def check(self) -> str | None:
        """Ask the servers for the root's NS records; return what is wrong, or None."""
        answer = await self._query(dns.name.root, _NS)
        if answer.transient:
            return f"no DNS server answers ({self.servers}): {answer.problem}"
        return None

    # -- lookups -----------------------------------------------------------------------------

    async def _query(self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> _Answer:
        kind = dns.rdatatype.to_text(rdtype)
        async with self._limit:
            try:
                # dnspython's lifetime check runs only between tries, and its back-off sleeps
                # (up to 2 s) may overshoot it: this deadline is the hard one.
                async with asyncio.timeout(self.config.timeout):
                    answer = await self._dns.resolve(
                        qname, rdtype, raise_on_no_answer=False, search=False
                    )
            except dns.resolver.NXDOMAIN as exc:
                return _Answer(ttl=_negative_ttl(exc), problem="NXDOMAIN", nxdomain=True)
            except TimeoutError:
                timeout = self.config.timeout
                problem = f"timed out after {timeout:.1f}s (no answer in time from {self.servers})"
                return _Answer(problem=problem, transient=True)
            except (dns.exception.DNSException, OSError) as exc:
                # Timeouts, SERVFAIL/REFUSED from every server, unreachable servers, malformed
                # answers: none says the name is wrong, so each may clear up (transient).
                return _Answer(problem=_trouble(exc), transient=True)
        ttl = float(answer.chaining_result.minimum_ttl)
        if answer.rrset is None:
            return _Answer(ttl=ttl, problem=f"no {kind} record")
        return _Answer(records=tuple(answer.rrset), ttl=ttl)

    async def _addresses(self, host: str) -> _Addresses:
        async def fetch() -> tuple[_Addresses, float]:
            found = await self._fetch_addresses(host)
            return found, found.expires

        return await self._hosts.get_or_fetch(host, fetch)

    async def _fetch_addresses(self, host: str) -> _Addresses:
        now, qname = self._clock(), dns.name.from_text(host)
        v4, v6 = await asyncio.gather(self._query(qname, _A), self._query(qname, _AAAA))
        addresses = tuple(str(r.address) for r in (*v4.records, *v6.records))
        transient = v4.transient or v6.transient
        if v4.nxdomain:
            problems: tuple[str, ...] = ("NXDOMAIN",)
        elif not addresses and not transient:
            problems = ("no A or AAAA record",)
        else:
            problems = tuple(
                f"{kind} lookup failed: {a.problem}"
                for kind, a in (("A", v4), ("AAAA", v6))
                if a.problem and a.transient
            )
        ttl = min(a.ttl for a in (v4, v6))
        if transient:
            ttl = min(ttl, self.config.failure_ttl) if addresses else self.config.failure_ttl
        return _Addresses(addresses, now + min(ttl, self.config.max_ttl), problems, transient)

    def _failed(self, domain: str, error: DNSError, ttl: float) -> Resolution:
        expires = self._clock() + min(ttl, self.config.max_ttl)
        return Resolution(domain, domain, (), expires, error)

    async def _lookup(self, domain: str) -> Resolution:
        now, qname = self._clock(), dns.name.from_text(domain)
        mx = await self._query(qname, _MX)
        if mx.transient:
            error = DNSUnavailableError(
                domain, f"cannot look up the MX records of {domain}: {mx.problem}"
            )
            return self._failed(domain, error, self.config.failure_ttl)
        if mx.nxdomain:
            message = f"domain {domain} does not exist (NXDOMAIN from {self.servers})"
            return self._failed(domain, DomainNotFoundError(domain, message), mx.ttl)
        notes: list[str] = []
        # Lowest preference first; names sorted within a preference only for determinism.
        targets: dict[str, int] = {}
        null_mx = False
        for pref, target in sorted((r.preference, r.exchange) for r in mx.records):
            if target == dns.name.root:
                null_mx = True
            else:  # a host listed twice keeps its lowest preference
                targets.setdefault(target.to_text(omit_final_dot=True).lower(), int(pref))
        if null_mx and not targets:
            message = f"{domain} accepts no mail (RFC 7505 null MX)"
            return self._failed(domain, NullMXError(domain, message), mx.ttl)
        if null_mx:
            notes.append("a null MX '0 .' next to real MX records was ignored")
        implicit = not targets
        if implicit:
            targets = {domain: 0}
        found = await asyncio.gather(*(self._addresses(name) for name in targets))
        expires = now + min(mx.ttl, self.config.max_ttl)
        hosts: list[ResolvedHost] = []
        skipped: list[tuple[str, str]] = []
        any_transient = False
        for (name, pref), addrs in zip(targets.items(), found, strict=True):
            expires = min(expires, addrs.expires)
            any_transient = any_transient or addrs.transient
            if addrs.addresses:
                hosts.append(ResolvedHost(name, pref, addrs.addresses))
                notes.extend(f"{name}: {p}" for p in addrs.problems)
            else:
                skipped.append((name, ", ".join(addrs.problems)))
        # The site is the MX host set in preference order: hosts of equal preference joined by
        # "|", preferences by ",". Domains listing the same hosts in another order differ.
        groups: dict[int, list[str]] = {}
        for name, pref in targets.items():
            groups.setdefault(pref, []).append(name)
        site = (
            domain if implicit else ",".join("|".join(sorted(g)) for _, g in sorted(groups.items()))
        )
        if hosts:
            notes.extend(f"MX host {name} skipped: {why}" for name, why in skipped)
            return Resolution(domain, site, tuple(hosts), expires, None, tuple(notes), implicit)
        if implicit:
            what = f"{domain} has no MX record and no usable address ({skipped[0][1]})"
        else:
            hosts_text = "; ".join(f"{name} ({why})" for name, why in skipped)
            what = f"no MX host of {domain} has an address: {hosts_text}"
        failure = NoAddressError(domain, what, transient=any_transient or not implicit)
        if failure.transient:
            expires = min(expires, now + self.config.failure_ttl)
        return Resolution(domain, site, (), expires, failure, tuple(notes), implicit)
