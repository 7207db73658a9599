"""Where each queue's mail goes: its destination (mx_list or DNS) and each source's path to it."""

from __future__ import annotations

import ipaddress
import logging
import time
from dataclasses import dataclass, field, replace

from kumopy.config import EgressSource, QueueConfig
from kumopy.coordinator.holds import Holds
from kumopy.coordinator.queues import SchedQueue
from kumopy.dns import Resolution
from kumopy.dns_process import Lookup, ResolverProcess
from kumopy.errors import DNSError, PolicyError
from kumopy.hostnames import host_address
from kumopy.mtasts import StsPolicy
from kumopy.paths import EgressPath
from kumopy.policy_calls import Policy

__all__ = ["Destination", "PathRoute", "Refusal", "Routes", "Site"]

log = logging.getLogger(__name__)

_MX_LIST_TTL = float("inf")
_MIN_TTL = 5.0
"""Seconds a DNS answer is used at least, whatever its TTL."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why messages cannot go now: the reply logged for them, and whether to retry."""

    code: int
    enhanced: str
    text: str

    @property
    def transient(self) -> bool:
        """Return True for a 4xx refusal (retry later), False for a bounce."""
        return self.code < 500


@dataclass(frozen=True, slots=True)
class Site:
    """A destination's mail hosts (its MX host set, or an mx_list), in preference order."""

    name: str
    hosts: tuple[tuple[str, int, tuple[str, ...], int | None], ...]
    """(host name, preference, addresses, port) per host; no address: a name the worker
    resolves (mx_list only); no port: the path's smtp_port."""
    smart_hosts: bool = False
    """True for an mx_list: prohibited_hosts and skip_hosts do not apply to it."""


@dataclass(slots=True, eq=False)
class Destination:
    """Where one routing domain's mail goes, or why it cannot go now."""

    domain: str
    site: Site | None = None
    refusal: Refusal | None = None
    sts: StsPolicy | None = None
    expires: float = 0.0
    """Monotonic time after which it is looked up again."""
    waiting: list[SchedQueue] = field(default_factory=list)
    """Queues parked until the lookup under way comes back."""
    pending: bool = False


@dataclass(slots=True)
class PathRoute:
    """How one source reaches one destination: the worker's ready queue and its hosts."""

    key: str
    """The worker's site: the site's name, marked when MTA-STS narrowed its hosts."""
    site: str
    """The site's name (its MX host set, or mx_list:...): what per-site limits are kept by."""
    hosts: list[tuple[str, str | None, int, int]]
    """(host name, address or None, port, preference) in order, of the source's family."""
    config: EgressPath
    refusal: Refusal | None = None
    """Set when this source cannot send there at all (family, prohibited or skipped hosts)."""
    sts_testing: tuple[str, ...] | None = None
    """MTA-STS testing mode: the patterns a host should match (reported, not enforced)."""


def _mx_list_site(config: QueueConfig) -> Site:
    assert config.mx_list
    hosts = []
    for pref, mx in enumerate(config.mx_list):
        ip = host_address(mx.host)
        hosts.append((mx.host, pref, (str(ip),) if ip is not None else (), mx.port))
    return Site("mx_list:" + ",".join(str(mx) for mx in config.mx_list), tuple(hosts), True)


def _dns_site(res: Resolution) -> Site:
    hosts = tuple((h.name, h.preference, h.addresses, None) for h in res.hosts)
    return Site(res.site, hosts)


def _family(address: str) -> str:
    return "ipv6" if ":" in address else "ipv4"


class Routes:
    """Destinations by routing domain (looked up in the resolver thread) and paths by source."""

    def __init__(
        self,
        policy: Policy,
        sources: list[EgressSource],
        defaults: EgressPath,
        thread: ResolverProcess | None,
    ) -> None:
        self.policy = policy
        self.sources = sources
        self.defaults = defaults
        self.thread = thread
        self.destinations: dict[str, Destination] = {}
        self._paths: dict[tuple[int, str], EgressPath] = {}
        self._routes: dict[tuple[int, str, str], PathRoute] = {}
        self.lookups = 0
        self._rollup: set[str] = set()
        self._adopt_shaping(policy)
        self.holds: Holds | None = None
        """Config overrides (automation's SetConfig) applied over the policy's paths."""

    # -- destinations ------------------------------------------------------------------------
    def destination(self, q: SchedQueue, now: float) -> Destination | None:
        """Return where a queue's mail goes; None parks the queue until its lookup returns."""
        config = q.config
        assert config is not None
        if config.mx_list:
            key = "mx_list:" + ",".join(str(mx) for mx in config.mx_list)
            dest = self.destinations.get(key)
            if dest is None:
                dest = Destination(key, _mx_list_site(config), expires=_MX_LIST_TTL)
                self.destinations[key] = dest
            return dest
        domain = q.routing_domain
        dest = self.destinations.get(domain)
        if dest is None:
            dest = self.destinations[domain] = Destination(domain)
        if dest.pending:
            dest.waiting.append(q)
            return None
        if dest.expires > now:
            return dest
        if self.thread is None:
            dest.refusal = Refusal(451, "4.4.3", "kumopy: no DNS resolver is configured")
            dest.expires = now + 60.0
            return dest
        dest.pending = True
        dest.waiting.append(q)
        self.lookups += 1
        self.thread.submit(domain, sts=True)
        return None

    def collect(self) -> list[SchedQueue]:
        """Take finished lookups; return the queues that waited for them (to offer again)."""
        if self.thread is None:
            return []
        woken: list[SchedQueue] = []
        for lookup in self.thread.drain():
            woken.extend(self._settle(lookup))
        return woken

    def _settle(self, lookup: Lookup) -> list[SchedQueue]:
        dest = self.destinations.get(lookup.domain)
        if dest is None:
            return []
        res = lookup.resolution
        dest.pending = False
        # A TTL of 0 (or an answer that aged in the resolver) still serves the mail that waited
        # for it: without a floor the queue would look the domain up again at once, for ever.
        dest.expires = max(res.expires, time.monotonic() + _MIN_TTL)
        dest.sts = lookup.sts
        if res.error is not None:
            dest.site = None
            dest.refusal = _dns_refusal(res.error)
            log.warning("%s: %s", lookup.domain, res.error.message)
        else:
            site = _dns_site(res)
            if dest.site != site:
                dest.site = site
                # New hosts: the paths built on the old answer go, and are built again.
                self._routes = {k: v for k, v in self._routes.items() if k[1] != site.name}
                if lookup.domain in self._rollup:
                    # A shaping block rolled up by this domain's MX now reaches its site.
                    self.refresh()
            dest.refusal = None
        woken, dest.waiting = dest.waiting, []
        return woken

    # -- paths -------------------------------------------------------------------------------
    def path(self, src: int, dest: Destination, routing_domain: str) -> PathRoute:
        """Return how source `src` reaches `dest` (cached until reload or a new DNS answer).

        `routing_domain` is what the policy's get_egress_path_config hears about the first
        queue to ask; the answer serves every queue of the site, as KumoMTA's ready queues do.
        """
        site = dest.site
        assert site is not None
        sts = dest.sts if dest.sts is not None and dest.sts.mode != "none" else None
        sts_key = f"{sts.mode}:{sts.policy_id}" if sts is not None else ""
        route = self._routes.get((src, site.name, sts_key))
        if route is None:
            route = self._build(src, dest, site, sts, routing_domain)
            self._routes[(src, site.name, sts_key)] = route
        return route

    def path_config(self, src: int, site: str, routing_domain: str) -> EgressPath:
        """Return the egress path config of (source, site), asked once and cached."""
        config = self._paths.get((src, site))
        if config is None:
            name = self.sources[src].name
            try:
                config = self.policy.path_config(routing_domain, name, site, self.defaults)
            except PolicyError as exc:
                log.error("%s; using the defaults for %s -> %s", exc.message, name, site)
                config = self.defaults
            if self.holds is not None and self.holds.holds:
                changed = self.holds.overrides(name, site, config.provider_name)
                if changed:
                    config = replace(config, origin=f"{config.origin} + held overrides", **changed)
            self._paths[(src, site)] = config
        return config

    def _adopt_shaping(self, policy: Policy) -> None:
        """Give a shaping file our DNS answers (site_of), and look its rolled-up domains up."""
        shaping = policy.settings.get("shaping")
        self._rollup = set()
        if shaping is None:
            return
        shaping.site_of = self.site_of
        self._rollup = set(shaping.rollup_domains())
        if self.thread is None:
            return
        for domain in self._rollup:
            dest = self.destinations.get(domain)
            if dest is None:
                dest = self.destinations[domain] = Destination(domain)
            if not dest.pending and dest.expires <= time.monotonic():
                dest.pending = True
                self.lookups += 1
                self.thread.submit(domain, sts=True)  # as a queue would: it may use this answer

    def site_of(self, domain: str) -> str | None:
        """Return the site a domain resolved to, if known (a shaping file's rollup)."""
        dest = self.destinations.get(domain)
        return dest.site.name if dest is not None and dest.site is not None else None

    def refresh(self) -> None:
        """Forget every path config and route (holds changed): each is built again on use."""
        self._paths.clear()
        self._routes.clear()

    def _build(
        self, src: int, dest: Destination, site: Site, sts: StsPolicy | None, routing: str
    ) -> PathRoute:
        source = self.sources[src]
        config = self.path_config(src, site.name, routing)
        enforce = sts is not None and sts.mode == "enforce" and config.enable_mta_sts
        family = source.family
        hosts: list[tuple[str, str | None, int, int]] = []
        dropped: list[str] = []
        for name, pref, addresses, port in site.hosts:
            if enforce and sts is not None and not sts.matches(name):
                dropped.append(f"{name} (not in the MTA-STS policy)")
                continue
            port = source.remote_port or port or config.smtp_port
            if not addresses:  # an mx_list host name: the worker resolves it
                hosts.append((name, None, port, pref))
                continue
            for address in _ordered(addresses, config.ip_lookup_strategy):
                where = address if name == address else f"{name} {address}"
                if family is not None and _family(address) != family:
                    dropped.append(f"{where} ({_family(address)})")
                    continue
                if not site.smart_hosts:
                    ip = ipaddress.ip_address(address)
                    if any(ip in net for net in config.prohibited_hosts):
                        text = (
                            f"kumopy: {name} resolves to {address}, which prohibited_hosts "
                            f"forbids (bad DNS for {dest.domain}?)"
                        )
                        refused = Refusal(550, "5.4.4", text)
                        return PathRoute(site.name, site.name, [], config, refused)
                    if any(ip in net for net in config.skip_hosts):
                        dropped.append(f"{where} (skip_hosts)")
                        continue
                hosts.append((name, address, port, pref))
        key = site.name
        if enforce:
            config = _required_tls(config)
            key = f"{site.name}|mta-sts:{','.join(sorted({h[0] for h in hosts}))}"
        refusal = None
        if not hosts:
            why = "; ".join(dropped) or "no host"
            if family is not None:
                text = (
                    f"kumopy: source {source.name} ({family}) has no {family} route to "
                    f"{site.name}: {why}"
                )
            else:
                text = f"kumopy: no usable host for {site.name}: {why}"
            refusal = Refusal(451, "4.4.4", text)
        testing = None
        if sts is not None and sts.mode == "testing" and config.enable_mta_sts:
            testing = tuple(sts.mx)
            # Its own worker site: the report must not land on records of a domain of the same
            # MX hosts that has no policy (a site's description is shared by its jobs).
            key = f"{site.name}|mta-sts-testing:{','.join(testing)}"
        return PathRoute(key, site.name, hosts, config, refusal, testing)

    def reload(self, policy: Policy, defaults: EgressPath) -> None:
        """Adopt a new policy: every path config is asked again."""
        self.policy = policy
        self.defaults = defaults
        self._paths.clear()
        self._routes.clear()
        self._adopt_shaping(policy)

    def forget_expired(self, now: float) -> None:
        """Drop destinations no queue waits for once they expire (bounded memory)."""
        gone = [k for k, d in self.destinations.items() if d.expires < now and not d.pending]
        for key in gone:
            del self.destinations[key]


def _ordered(addresses: tuple[str, ...], strategy: str) -> list[str]:
    """Order (and keep) addresses by the path's ip_lookup_strategy."""
    v4 = [a for a in addresses if ":" not in a]
    v6 = [a for a in addresses if ":" in a]
    return {
        "Ipv4Only": v4,
        "Ipv6Only": v6,
        "Ipv4ThenIpv6": v4 + v6,
        "Ipv6ThenIpv4": v6 + v4,
    }.get(strategy, list(addresses))


def _required_tls(config: EgressPath) -> EgressPath:
    """MTA-STS enforce: mail goes only over TLS with a verified certificate."""
    return replace(config, enable_tls="Required")


def _dns_refusal(error: DNSError) -> Refusal:
    # The error's message starts with its SMTP codes; the record keeps them apart.
    text = error.message.removeprefix(f"{error.smtp_code} {error.enhanced_code} ")
    return Refusal(error.smtp_code, error.enhanced_code, f"kumopy: {text}")
