"""Traffic shaping from KumoMTA shaping files: merged blocks, path configs, automation rules."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from kumopy.errors import ConfigError, ConfigIssue
from kumopy.paths import PathOptions, make_egress_path
from kumopy.shaping_file import Block, Match, SourceBlock, read_shaping_file
from kumopy.shaping_rules import AutomationRule

__all__ = ["Shaping", "SiteOf", "load_shaping", "read_shaping", "site_hosts"]

logger = logging.getLogger(__name__)

SiteOf = Callable[[str], str | None]
"""Return the site a domain's MX resolved to, or None while unknown (set by the coordinator)."""
ShapingPath = str | os.PathLike[str]

_POLL_INTERVAL = 1.0
"""Seconds between two rounds of asking site_of about rolled-up domains it did not know yet."""
_CACHE_MAX = 100_000
"""Cached answers kept at most (cleared whole past it: they are cheap to compute again)."""


def site_hosts(site: str) -> tuple[str, ...]:
    """Return the host names of a site name: its MX hosts, or an mx_list's hosts."""
    if site.startswith("mx_list:"):
        hosts = []
        for item in site.removeprefix("mx_list:").split(","):
            if item.startswith("["):
                hosts.append(item[1:].partition("]")[0])  # [2001:db8::1]:25
            elif item.count(":") == 1:
                hosts.append(item.partition(":")[0])  # host:port
            else:
                hosts.append(item)  # a host, or a bare IPv6 address
    else:
        hosts = site.replace("|", ",").split(",")
    return tuple(h.lower().rstrip(".") for h in hosts if h)


def _domain(name: str) -> str:
    """Return a domain as blocks are keyed: lower case, no trailing dot."""
    return name.lower().rstrip(".")


@dataclass(frozen=True, slots=True)
class _Chain:
    """The blocks of one name across files, from the last one with replace_base on."""

    order: int
    """Where the name was first defined (blocks of one step apply in this order)."""
    blocks: tuple[Block, ...]
    matches: tuple[Match, ...]
    sources: Mapping[str, tuple[SourceBlock, ...]]
    rules: tuple[AutomationRule, ...]


def _chains(blocks: Iterable[Block]) -> dict[tuple[str, str, bool], _Chain]:
    """Group blocks by (kind, name, mx_rollup); a replace_base block drops those before it."""
    grouped: dict[tuple[str, str, bool], list[Block]] = {}
    for block in blocks:
        grouped.setdefault((block.kind, block.name, block.mx_rollup), []).append(block)
    chains: dict[tuple[str, str, bool], _Chain] = {}
    for order, (key, found) in enumerate(grouped.items()):
        starts = [i for i, block in enumerate(found) if block.replace_base]
        kept = tuple(found[starts[-1] if starts else 0 :])
        sources: dict[str, list[SourceBlock]] = {}
        for block in kept:
            for name, source in block.sources.items():
                sources.setdefault(name, []).append(source)
        chains[key] = _Chain(
            order,
            kept,
            tuple(m for block in kept for m in block.matches),
            MappingProxyType({name: tuple(found) for name, found in sources.items()}),
            tuple(rule for block in kept for rule in block.rules),
        )
    return chains


def _provider_matches(matches: tuple[Match, ...], domain: str, hosts: tuple[str, ...]) -> bool:
    """Match as KumoMTA does: any domain rule, or every MX host matching some MX rule."""
    for m in matches:
        if (m.kind == "DomainSuffix" and domain.endswith(m.value)) or (
            m.kind == "Domain" and domain == m.value
        ):
            return True
    host_rules = [m for m in matches if m.kind in ("MXSuffix", "HostName")]
    if not host_rules or not hosts:
        return False
    return all(
        any(host.endswith(m.value) if m.kind == "MXSuffix" else host == m.value for m in host_rules)
        for host in hosts
    )


class _Merge:
    """Accumulate path options step by step, remembering which blocks contributed."""

    def __init__(self) -> None:
        self.values: dict[str, object] = {}
        self.parts: list[tuple[str, str]] = []

    def add(self, file: str, label: str, options: Mapping[str, object], reset: bool) -> None:
        """Merge one block's options in (after dropping everything so far when reset)."""
        if reset:
            self.values.clear()
            self.parts.clear()
        self.values.update(options)
        self.parts.append((file, label))

    def chain(self, chain: _Chain) -> None:
        """Merge a chain's blocks in; its first block resets when it has replace_base."""
        for i, block in enumerate(chain.blocks):
            self.add(block.file, block.label, block.options, i == 0 and block.replace_base)

    def origin(self, files: Sequence[str]) -> str:
        """Return e.g. "shaping.toml: default, provider google; extra.toml: gmail.com"."""
        if not self.parts:
            return f"{', '.join(files) or 'shaping'}: no block applies"
        groups: list[tuple[str, list[str]]] = []
        for file, label in self.parts:
            if groups and groups[-1][0] == file:
                groups[-1][1].append(label)
            else:
                groups.append((file, [label]))
        return "; ".join(f"{file}: {', '.join(labels)}" for file, labels in groups)


class Shaping:
    """Merged shaping files: get_egress_path_config and rules_for, cached per path."""

    __slots__ = (
        "_by_site",
        "_default",
        "_domains",
        "_known",
        "_last_poll",
        "_matched",
        "_paths",
        "_providers",
        "_rollup",
        "_rules",
        "_site_of",
        "_unknown",
        "files",
        "where",
    )

    def __init__(
        self,
        blocks: Iterable[Block] = (),
        files: Sequence[str] = (),
        where: str = "",
        site_of: SiteOf | None = None,
    ) -> None:
        chains = _chains(blocks)
        self.files = tuple(files)
        """The files, as the operator named them, in merge order."""
        self.where = where
        """`file:line` of the kumo.load_shaping call (or empty)."""
        self._default = chains.get(("default", "default", True))
        self._providers = {n: c for (k, n, _), c in chains.items() if k == "provider"}
        self._rollup = {n: c for (k, n, r), c in chains.items() if k == "domain" and r}
        self._domains = {n: c for (k, n, r), c in chains.items() if k == "domain" and not r}
        self._known: dict[str, str] = {}
        self._unknown = set(self._rollup)
        self._by_site: dict[str, list[str]] = {}
        self._paths: dict[tuple[str, str, str], tuple[Mapping[str, object], PathOptions]] = {}
        self._rules: dict[tuple[str, str, str | None], tuple[AutomationRule, ...]] = {}
        self._matched: dict[tuple[str, str], tuple[tuple[str, _Chain], ...]] = {}
        self._last_poll = float("-inf")
        self._site_of = site_of

    def __repr__(self) -> str:
        return f"<Shaping {', '.join(self.files) or '(empty)'}>"

    @property
    def site_of(self) -> SiteOf | None:
        """The coordinator's DNS cache: domain -> site, for domain blocks rolled up by MX."""
        return self._site_of

    @site_of.setter
    def site_of(self, site_of: SiteOf | None) -> None:
        self._site_of = site_of
        self._last_poll = float("-inf")

    def rollup_domains(self) -> tuple[str, ...]:
        """Return the domains of rolled-up blocks: look up their sites early, for site_of."""
        return tuple(self._rollup)

    def provider_names(self) -> tuple[str, ...]:
        """Return the providers' names, in definition order."""
        return tuple(self._providers)

    def refresh_sites(self) -> bool:
        """Ask site_of about rolled-up domains of unknown site; return True if any is now known.

        A domain's site, once known, stays until the policy is reloaded (KumoMTA resolves them
        once, at load).
        """
        self._last_poll = time.monotonic()
        if self._site_of is None:
            return False
        found = False
        for domain in [d for d in self._rollup if d in self._unknown]:
            site = self._site_of(domain)
            if site:
                self._known[domain] = site
                self._unknown.discard(domain)
                self._by_site.setdefault(site, []).append(domain)
                found = True
        if found:
            self._paths.clear()
            self._rules.clear()
        return found

    def _poll(self) -> None:
        """Ask site_of about unknown rolled-up domains, at most once per _POLL_INTERVAL."""
        due = time.monotonic() - self._last_poll >= _POLL_INTERVAL
        if self._unknown and self._site_of is not None and due:
            self.refresh_sites()

    def _matching(self, domain: str, site: str) -> tuple[tuple[str, _Chain], ...]:
        """Return the providers matching a routing domain and site, in definition order."""
        key = (domain, site)
        found = self._matched.get(key)
        if found is None:
            if len(self._matched) >= _CACHE_MAX:
                self._matched.clear()
            hosts = site_hosts(site)
            found = tuple(
                (name, chain)
                for name, chain in self._providers.items()
                if _provider_matches(chain.matches, domain, hosts)
            )
            self._matched[key] = found
        return found

    def _site_chains(self, domain: str, site: str) -> list[_Chain]:
        """Return the rolled-up domain blocks for a site (and for the routing domain itself)."""
        names = set(self._by_site.get(site, ()))
        if domain in self._rollup:
            names.add(domain)
        return sorted((self._rollup[name] for name in names), key=lambda c: c.order)

    def providers_for(self, site: str, routing_domain: str) -> tuple[str, ...]:
        """Return the names of the providers whose match a site (and routing domain) meets."""
        return tuple(name for name, _ in self._matching(_domain(routing_domain), site))

    def get_egress_path_config(
        self, routing_domain: str, egress_source: str, site_name: str
    ) -> PathOptions:
        """Return the merged path options for (routing domain, source, site), cached."""
        return self._resolved(routing_domain, egress_source, site_name)[1]

    def path_options(
        self, routing_domain: str, egress_source: str, site_name: str
    ) -> dict[str, object]:
        """Return the merged options as written, for a handler that adds its own to them.

        `kumo.make_egress_path(**shaping.path_options(d, s, site), smtp_port=2525)`
        """
        return dict(self._resolved(routing_domain, egress_source, site_name)[0])

    def _resolved(
        self, routing_domain: str, egress_source: str, site_name: str
    ) -> tuple[Mapping[str, object], PathOptions]:
        """Return a path's options as written and as validated, computed once and cached."""
        self._poll()
        key = (routing_domain, egress_source, site_name)
        found = self._paths.get(key)
        if found is None:
            if len(self._paths) >= _CACHE_MAX:
                self._paths.clear()
            found = self._paths[key] = self._resolve(*key)
        return found

    def _resolve(
        self, routing_domain: str, source: str, site: str
    ) -> tuple[Mapping[str, object], PathOptions]:
        """Merge in KumoMTA's order: default, provider, provider+source, site, domain, ..."""
        domain = _domain(routing_domain)
        merge = _Merge()
        if self._default is not None:
            merge.chain(self._default)
        providers = self._matching(domain, site)
        for name, chain in providers:
            merge.chain(chain)
            merge.values["provider_name"] = name
        for name, chain in providers:
            for block in chain.sources.get(source, ()):
                merge.add(block.file, block.label, block.options, False)
                merge.values["provider_name"] = name
        own = self._domains.get(domain)
        chains = [*self._site_chains(domain, site), *([own] if own is not None else [])]
        for chain in chains:
            merge.chain(chain)
        for chain in chains:
            for block in chain.sources.get(source, ()):
                merge.add(block.file, block.label, block.options, False)
        values = MappingProxyType(merge.values)
        return values, make_egress_path(values, merge.origin(self.files))

    def rules_for(
        self, site: str, routing_domain: str, provider: str | None = None
    ) -> tuple[AutomationRule, ...]:
        """Return the automation rules for a site and routing domain, cached.

        In KumoMTA's order: default, providers, site (rolled-up domain blocks), domain. A
        `provider` named here (the path's provider_name) adds its rules if its match did not.
        """
        self._poll()
        key = (site, routing_domain, provider)
        found = self._rules.get(key)
        if found is None:
            if len(self._rules) >= _CACHE_MAX:
                self._rules.clear()
            domain = _domain(routing_domain)
            chains = [self._default] if self._default is not None else []
            matched = self._matching(domain, site)
            chains.extend(chain for _, chain in matched)
            if provider in self._providers and provider not in dict(matched):
                chains.append(self._providers[provider])
            chains.extend(self._site_chains(domain, site))
            if domain in self._domains:
                chains.append(self._domains[domain])
            found = self._rules[key] = tuple(rule for chain in chains for rule in chain.rules)
        return found


def _flatten(paths: Iterable[ShapingPath | Sequence[ShapingPath]]) -> list[ShapingPath]:
    """Return the paths with lists spread out (load_shaping("a.toml", ["b.toml"]))."""
    flat: list[ShapingPath] = []
    for path in paths:
        if isinstance(path, list | tuple):
            flat.extend(path)
        else:
            assert isinstance(path, str | os.PathLike)
            flat.append(path)
    return flat


def read_shaping(
    paths: Iterable[ShapingPath | Sequence[ShapingPath]],
    base: Path | None = None,
    where: str = "",
) -> tuple[Shaping, list[ConfigIssue]]:
    """Read and merge shaping files in order; with any issue, the Shaping is empty."""
    names = _flatten(paths)
    issues: list[ConfigIssue] = []
    blocks: list[Block] = []
    for path in names:
        file = read_shaping_file(base / path if base is not None else path, os.fspath(path))
        issues.extend(file.issues)
        blocks.extend(file.blocks)
    if not names:
        issues.append(ConfigIssue(where or "load_shaping", "shaping", "", "name a shaping file"))
    for (kind, name, _), chain in _chains(blocks).items():
        if kind == "provider" and not chain.matches:
            problem = 'no match: write match = [{MXSuffix = ".example.net"}] (or DomainSuffix)'
            issues.append(
                ConfigIssue(
                    chain.blocks[0].where, f'shaping block provider."{name}"', "match", problem
                )
            )
    files = [os.fspath(p) for p in names]
    if issues:
        return Shaping((), files, where), issues
    logger.debug("loaded shaping from %s: %d blocks", ", ".join(files), len(blocks))
    return Shaping(blocks, files, where), []


def load_shaping(*paths: ShapingPath, base: Path | None = None) -> Shaping:
    """Read and merge shaping files in order; raise ConfigError listing every problem."""
    shaping, issues = read_shaping(paths, base)
    if issues:
        raise ConfigError(issues)
    return shaping
