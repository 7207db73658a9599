"""MTA-STS (RFC 8461): discover, fetch, cache and apply a domain's policy."""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

import dns.resolver

from kumopy.dns import normalize_domain
from kumopy.errors import HttpsGetError, StsError
from kumopy.https_get import https_get

__all__ = [
    "MAX_BODY",
    "MAX_MAX_AGE",
    "FilteredHosts",
    "ResolveAddresses",
    "StsFetcher",
    "StsPolicy",
    "TxtLookup",
    "filter_hosts",
    "host_matches",
    "parse_policy",
    "parse_txt",
]

log = logging.getLogger(__name__)

MAX_MAX_AGE = 31_557_600
"""The largest max_age RFC 8461 allows (about a year), in seconds."""
MAX_BODY = 64 * 1024
"""The largest policy body accepted, in bytes (RFC 8461 section 3.3 suggests 64 KiB)."""
WELL_KNOWN = "/.well-known/mta-sts.txt"

ResolveAddresses = Callable[[str], Awaitable[list[str]]]
"""Resolve a host name to its IP addresses (strings), without the system resolver."""
TxtLookup = Callable[[str], Awaitable[list[str]]]
"""Return a name's TXT records, each with its strings joined; [], LookupError,
dns.resolver.NXDOMAIN or dns.resolver.NoAnswer all mean "no record"."""

_MODES = ("enforce", "testing", "none")
_TXT_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")
_NOT_FOUND = (LookupError, dns.resolver.NXDOMAIN, dns.resolver.NoAnswer)


def _norm(name: str) -> str:
    return name.strip().rstrip(".").lower()


@dataclass(frozen=True)
class StsPolicy:
    """One domain's MTA-STS policy as fetched."""

    mode: str
    """`enforce`, `testing` or `none`."""
    mx: tuple[str, ...]
    """Allowed MX patterns, lower-cased: `mx1.example.com` or `*.example.net`."""
    max_age: int
    """How long the policy may be cached, in seconds."""
    policy_id: str = ""
    """The id from the `_mta-sts` TXT record the policy was fetched for."""
    fetched: float = 0.0
    """When it was fetched, on the fetcher's clock."""

    def matches(self, host: str) -> bool:
        """Return True if MX `host` matches one of the patterns (RFC 8461 section 4.1)."""
        return any(host_matches(pattern, host) for pattern in self.mx)

    def fresh(self, now: float) -> bool:
        """Return True while the policy may still be used from the cache."""
        return now < self.fetched + self.max_age


def host_matches(pattern: str, host: str) -> bool:
    """Return True if MX `host` matches one policy pattern (RFC 8461 section 4.1)."""
    name = _norm(host)
    if not name or "*" in name:
        return False
    pattern = _norm(pattern)
    if pattern.startswith("*."):
        # A wildcard stands for exactly one leftmost label.
        head, dot, rest = name.partition(".")
        return bool(dot and head and rest == pattern[2:])
    return name == pattern


def _valid_mx(pattern: str) -> bool:
    name = pattern[2:] if pattern.startswith("*.") else pattern
    labels = name.split(".")
    return len(name) <= 253 and all(_LABEL.fullmatch(x) for x in labels)


def parse_policy(text: str, policy_id: str = "", fetched: float = 0.0) -> StsPolicy:
    """Parse a policy file (RFC 8461 section 3.2); raise StsError naming what is wrong."""
    fields: dict[str, str] = {}
    mx: list[str] = []
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.removesuffix("\r").rstrip(" \t")
        if not line:
            continue
        key, sep, value = line.partition(":")
        if not sep or not _KEY.fullmatch(key):
            raise StsError(
                f"policy line {number} is not 'key: value': {line[:80]!r}", "parse", False
            )
        value = value.lstrip(" \t")
        if key == "mx":
            pattern = _norm(value)
            if not _valid_mx(pattern):
                raise StsError(f"policy line {number}: bad mx pattern {value!r}", "parse", False)
            mx.append(pattern)
        else:
            # Keys are unique in valid policies; the first wins if a publisher repeats one.
            fields.setdefault(key, value)
    version = fields.get("version")
    if version != "STSv1":
        problem = "missing" if version is None else f"{version!r}, not 'STSv1'"
        raise StsError(f"policy version is {problem}", "parse", False)
    mode = fields.get("mode")
    if mode not in _MODES:
        problem = "missing" if mode is None else f"{mode!r}, not enforce, testing or none"
        raise StsError(f"policy mode is {problem}", "parse", False)
    age = fields.get("max_age")
    if age is None or not re.fullmatch(r"[0-9]{1,10}", age) or int(age) > MAX_MAX_AGE:
        problem = "missing" if age is None else f"{age!r}, not an integer 0..{MAX_MAX_AGE}"
        raise StsError(f"policy max_age is {problem}", "parse", False)
    if not mx and mode != "none":
        raise StsError(f"policy has no mx pattern but mode {mode!r} needs one", "parse", False)
    return StsPolicy(mode, tuple(mx), int(age), policy_id, fetched)


def _txt_id(records: Iterable[str]) -> tuple[str | None, str]:
    """Return the STSv1 id (or None) and, when None, why."""
    sts = [r for r in records if re.match(r"v=STSv1\s*(;|$)", r)]
    if not sts:
        return None, "no v=STSv1 TXT record"
    if len(sts) > 1:
        # RFC 8461 section 3.1: several records mean no policy at all.
        return None, f"{len(sts)} v=STSv1 TXT records (RFC 8461 3.1: treated as none)"
    for term in sts[0].split(";")[1:]:
        key, _, value = term.strip().partition("=")
        if key == "id":
            if _TXT_ID.fullmatch(value):
                return value, ""
            return None, f"bad id {value!r} in TXT record (1-32 letters or digits)"
    return None, "TXT record has no id"


def parse_txt(records: list[str]) -> str | None:
    """Return the policy id of the `_mta-sts` TXT records, or None when they define no policy."""
    return _txt_id(records)[0]


class FilteredHosts(NamedTuple):
    """MX hosts a policy allows, those it drops, and a sentence about the drop."""

    allowed: list[str]
    dropped: list[str]
    description: str


def filter_hosts(policy: StsPolicy | None, hosts: Iterable[str]) -> FilteredHosts:
    """Return the MX `hosts` the policy allows; only enforce mode drops any."""
    hosts = list(hosts)
    if policy is None or policy.mode == "none":
        return FilteredHosts(hosts, [], "")
    bad = [h for h in hosts if not policy.matches(h)]
    if not bad:
        return FilteredHosts(hosts, [], "")
    allowed = [h for h in hosts if policy.matches(h)]
    patterns = ", ".join(policy.mx)
    if policy.mode == "testing":
        # Testing mode only reports: delivery still uses every MX.
        note = f"MTA-STS testing mode would drop {', '.join(bad)} (allowed: {patterns})"
        return FilteredHosts(hosts, [], note)
    note = f"MTA-STS policy drops {', '.join(bad)} (allowed: {patterns})"
    if not allowed:
        note += "; no MX host is left"
    return FilteredHosts(allowed, bad, note)


class StsFetcher:
    """Look up, fetch and cache MTA-STS policies; use from one event loop."""

    def __init__(
        self,
        resolve: ResolveAddresses,
        txt: TxtLookup,
        *,
        https_port: int = 443,
        ca_file: str | None = None,
        timeout: float = 10.0,
        retry_after: float = 60.0,
        now: Callable[[], float] = time.time,
    ) -> None:
        if not 0 < https_port < 65536:
            raise ValueError(f"https_port {https_port} is not 1..65535")
        if not timeout > 0:
            raise ValueError(f"timeout {timeout} is not positive")
        if not retry_after >= 0:
            raise ValueError(f"retry_after {retry_after} is negative")
        self._resolve = resolve
        self._txt = txt
        self._port = https_port
        self._timeout = timeout
        self._retry_after = retry_after
        self._now = now
        try:
            # Default purpose SERVER_AUTH: CERT_REQUIRED and check_hostname are on.
            self._ssl = ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as e:
            raise StsError(f"cannot load CA file {ca_file!r}: {e}", "config", False) from e
        self._cache: dict[str, StsPolicy] = {}
        self._inflight: dict[str, asyncio.Task[StsPolicy | None]] = {}
        # domain -> (policy id, until, error) of the last failed fetch with nothing cached.
        self._failed: dict[str, tuple[str, float, StsError]] = {}

    def cached(self, domain: str) -> StsPolicy | None:
        """Return the cached policy for `domain` if it has not expired."""
        policy = self._cache.get(_norm(domain))
        return policy if policy is not None and policy.fresh(self._now()) else None

    async def policy(self, domain: str) -> StsPolicy | None:
        """Return the domain's policy, None if it has none; raise StsError if fetching failed."""
        # The A-label form everywhere: cache key, TXT name, SNI and Host header (RFC 8461 3.3).
        domain = normalize_domain(_norm(domain))
        task = self._inflight.get(domain)
        if task is None:
            task = asyncio.create_task(self._discover(domain))
            self._inflight[domain] = task
            task.add_done_callback(lambda t: self._finished(domain, t))
        # Shield: one caller giving up must not cancel the fetch the others wait for.
        return await asyncio.shield(task)

    async def policy_or_none(self, domain: str) -> StsPolicy | None:
        """Return the domain's policy, or None (logged) when it cannot be had (RFC 8461 5)."""
        try:
            return await self.policy(domain)
        except StsError as e:
            log.warning("MTA-STS for %s: no policy applied: %s", domain, e)
            return None
        except Exception:
            # A failed policy must never cost the domain its MX answer: no policy, logged.
            log.exception("MTA-STS for %s: no policy applied", domain)
            return None

    def _finished(self, domain: str, task: asyncio.Task[StsPolicy | None]) -> None:
        if self._inflight.get(domain) is task:
            del self._inflight[domain]
        if not task.cancelled():
            task.exception()  # mark retrieved even if every waiter was cancelled

    async def _discover(self, domain: str) -> StsPolicy | None:
        cached = self.cached(domain)
        try:
            records = await self._txt(f"_mta-sts.{domain}")
        except _NOT_FOUND:
            records = []
        except Exception as e:
            if cached is not None:
                log.info("MTA-STS TXT for %s failed (%s); using the cached policy", domain, e)
                return cached
            raise StsError(f"TXT lookup of _mta-sts.{domain} failed: {e!r}", "dns") from e
        policy_id, why = _txt_id(records)
        if policy_id is None:
            # RFC 8461 5.1: a cached unexpired policy outlives its record's disappearance.
            log.debug("MTA-STS for %s: %s", domain, why)
            return cached
        if cached is not None and cached.policy_id == policy_id:
            return cached
        failed = self._failed.get(domain)
        if cached is None and failed and failed[0] == policy_id and self._now() < failed[1]:
            # A broken policy host is not fetched from once per message: the same id failed
            # moments ago, so repeat that answer until retry_after has passed.
            left = failed[1] - self._now()
            raise StsError(f"{failed[2].message} (next try in {left:.0f}s)", failed[2].stage)
        try:
            policy = await self._fetch(domain, policy_id)
        except StsError as e:
            if cached is not None:
                log.warning("MTA-STS for %s: %s; keeping the cached policy", domain, e)
                return cached
            self._failed[domain] = (policy_id, self._now() + self._retry_after, e)
            raise
        self._failed.pop(domain, None)
        self._cache[domain] = policy
        return policy

    async def _fetch(self, domain: str, policy_id: str) -> StsPolicy:
        """Fetch and parse https://mta-sts.<domain>/.well-known/mta-sts.txt."""
        host = f"mta-sts.{domain}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        try:
            async with asyncio.timeout_at(deadline):
                addresses = await self._resolve(host)
        except TimeoutError:
            raise StsError(f"resolving {host} timed out after {self._timeout:g}s", "dns") from None
        except Exception as e:
            raise StsError(f"resolving {host} failed: {e!r}", "dns") from e
        if not addresses:
            raise StsError(f"{host} has no addresses", "dns")
        try:
            body = await https_get(
                host,
                addresses,
                WELL_KNOWN,
                port=self._port,
                ssl_context=self._ssl,
                deadline=deadline,
                max_body=MAX_BODY,
            )
        except HttpsGetError as e:
            raise StsError(f"fetching the MTA-STS policy: {e}", e.stage) from e
        try:
            text = body.decode("utf-8")
            policy = parse_policy(text, policy_id, self._now())
        except (UnicodeDecodeError, StsError) as e:
            raise StsError(f"https://{host}{WELL_KNOWN}: {e}", "parse") from e
        log.info(
            "MTA-STS for %s: id %s, mode %s, max_age %d",
            domain,
            policy_id,
            policy.mode,
            policy.max_age,
        )
        return policy

    def forget(self, domain: str) -> None:
        """Forget `domain`'s cached policy and failure (operator action; the next call fetches)."""
        self._cache.pop(_norm(domain), None)
        self._failed.pop(_norm(domain), None)

    def prune(self) -> int:
        """Drop expired policies; return how many were dropped."""
        now = self._now()
        stale = [d for d, p in self._cache.items() if not p.fresh(now)]
        for d in stale:
            del self._cache[d]
        for d in [d for d, (_, until, _) in self._failed.items() if now >= until]:
            del self._failed[d]
        return len(stale)

    def __repr__(self) -> str:
        return f"<StsFetcher {len(self._cache)} cached, port {self._port}>"
