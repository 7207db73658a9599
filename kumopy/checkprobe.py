"""Probes for `kumopy check-config`: call the policy's run-time handlers as `kumopy run` would."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kumopy.config import QueueConfig, queue_name
from kumopy.errors import ConfigError, ConfigIssue, PolicyError
from kumopy.paths import PATH_OPTIONS, EgressPath
from kumopy.policy_calls import Policy

__all__ = [
    "NO_DNS",
    "SYNTHETIC_PROBES",
    "PathResult",
    "Probe",
    "ProbeError",
    "ProbeResult",
    "format_probes",
    "parse_probe",
    "run_probe",
]

SYNTHETIC_PROBES = ("example.com", "example.com,tenant", "example.com,tenant,campaign")
"""Probed when no --probe is given: the tenants and campaigns a policy knows are unknowable."""
NO_DNS = "no DNS lookup in check-config"


@dataclass(frozen=True, slots=True)
class Probe:
    """One queue to ask the policy about, written DOMAIN[,TENANT[,CAMPAIGN]]."""

    domain: str
    tenant: str | None = None
    campaign: str | None = None
    synthetic: bool = False
    """True for SYNTHETIC_PROBES, False for an operator's --probe."""

    @property
    def label(self) -> str:
        """Return the probe as DOMAIN[,TENANT[,CAMPAIGN]]."""
        parts = [self.domain, self.tenant or "", self.campaign or ""]
        while parts[-1] == "":
            parts.pop()
        return ",".join(parts)

    @property
    def queue(self) -> str:
        """Return the name of the scheduled queue the probe stands for."""
        return queue_name(self.domain, self.tenant, self.campaign)


def parse_probe(text: str, synthetic: bool = False) -> Probe:
    """Parse DOMAIN[,TENANT[,CAMPAIGN]]; raise ValueError saying what is wrong."""
    parts = [part.strip() for part in text.split(",")]
    if len(parts) > 3:
        raise ValueError(f"{text!r} has more than 3 parts; write DOMAIN[,TENANT[,CAMPAIGN]]")
    domain = parts[0].lower()
    if not domain or "@" in domain or any(c.isspace() or not c.isprintable() for c in domain):
        raise ValueError(f"{text!r} does not start with a domain; write DOMAIN[,TENANT[,CAMPAIGN]]")
    parts += [""] * (3 - len(parts))
    return Probe(domain, parts[1] or None, parts[2] or None, synthetic)


@dataclass(frozen=True, slots=True)
class ProbeError:
    """One problem a probe found: a handler raised, returned or named something unusable."""

    handler: str
    """get_queue_config or get_egress_path_config."""
    message: str
    """The whole problem, worded for an operator (with file:line where known)."""
    source: str | None = None
    site: str | None = None
    issue: ConfigIssue | None = None
    """The make_queue_config / make_egress_path issue, when that is what failed."""
    warning: bool = False
    """A handler raised for a synthetic probe: its made-up tenant may be unknown on purpose."""

    def to_dict(self, probe: Probe) -> dict[str, Any]:
        """Return the --json form, naming the probe."""
        issue = self.issue
        return {
            "probe": probe.label,
            "handler": self.handler,
            "source": self.source,
            "site": self.site,
            "message": self.message,
            "where": issue.where if issue else None,
            "object": issue.obj if issue else None,
            "field": issue.field if issue else None,
            "problem": issue.problem if issue else None,
            "warning": self.warning,
        }


@dataclass(frozen=True, slots=True)
class PathResult:
    """One pool source's egress path to the probe's site."""

    source: str
    weight: int
    path: EgressPath
    changed: dict[str, Any]
    """The settings that differ from the defaults, JSON-ready."""


@dataclass(slots=True)
class ProbeResult:
    """What the policy answered for one probe, or what went wrong."""

    probe: Probe
    config: QueueConfig | None = None
    site: str | None = None
    paths: list[PathResult] = field(default_factory=list)
    errors: list[ProbeError] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Return the --json form (errors are listed once, at the top level)."""
        probe, config = self.probe, self.config
        queue_config = None
        if config is not None:
            queue_config = {
                "egress_pool": config.egress_pool,
                "retry_interval": config.retry_interval,
                "max_retry_interval": config.max_retry_interval,
                "max_age": config.max_age,
                "mx_list": [str(mx) for mx in config.mx_list] if config.mx_list else None,
            }
        return {
            "probe": probe.label,
            "domain": probe.domain,
            "tenant": probe.tenant,
            "campaign": probe.campaign,
            "synthetic": probe.synthetic,
            "queue": probe.queue,
            "ok": not any(not e.warning for e in self.errors),
            "queue_config": queue_config,
            "site": self.site,
            "paths": [
                {
                    "source": p.source,
                    "weight": p.weight,
                    "origin": p.path.origin,
                    "changed": p.changed,
                }
                for p in self.paths
            ],
        }


def _jsonable(value: object) -> object:
    """Return value as JSON-ready data (address blocks as strings)."""
    if isinstance(value, tuple):
        return [str(item) for item in value]
    return value


def _errors(
    exc: PolicyError, handler: str, source: str | None, site: str | None, synthetic: bool
) -> list[ProbeError]:
    """Return the problems a PolicyError stands for: each issue of a ConfigError, or itself."""
    cause = exc.__cause__
    if not isinstance(cause, ConfigError):
        # A made-up tenant that the policy does not know must not stop a start (ExecStartPre):
        # warn; an operator's own --probe makes it an error.
        return [ProbeError(handler, exc.message, source, site, warning=synthetic)]
    # One line per bad option, as for a policy file, rather than one multi-line message.
    context = f"{handler} for source {source!r} and site {site!r}" if source else handler
    return [ProbeError(handler, f"{context}: {i}", source, site, i) for i in cause.issues]


def run_probe(policy: Policy, probe: Probe, defaults: EgressPath) -> ProbeResult:
    """Ask get_queue_config about probe, then get_egress_path_config for each pool source."""
    result = ProbeResult(probe)
    try:
        config = policy.queue_config(probe.domain, probe.tenant, probe.campaign)
    except PolicyError as exc:
        result.errors.extend(_errors(exc, "get_queue_config", None, None, probe.synthetic))
        return result
    result.config = config
    # As kumopy.coordinator.routes does: an mx_list is its own site; the handler hears the
    # queue's routing domain either way.
    routing = probe.domain
    if config.mx_list:
        site = "mx_list:" + ",".join(str(mx) for mx in config.mx_list)
    else:
        site = probe.domain
    result.site = site
    for entry in policy.config.pools[config.egress_pool].entries:
        try:
            path = policy.path_config(routing, entry.name, site, defaults)
        except PolicyError as exc:
            result.errors.extend(
                _errors(exc, "get_egress_path_config", entry.name, site, probe.synthetic)
            )
            continue
        changed = {
            name: _jsonable(getattr(path, name))
            for name in PATH_OPTIONS
            if getattr(path, name) != getattr(defaults, name)
        }
        result.paths.append(PathResult(entry.name, entry.weight, path, changed))
    return result


def _duration(seconds: float) -> str:
    """Return seconds in the largest unit that divides them: 1200 -> "20m"."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _show(value: object) -> str:
    """Return a setting's value as an operator would write it."""
    if isinstance(value, list):
        return "[" + ", ".join(str(item) for item in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _summary(policy: Policy, result: ProbeResult) -> list[str]:
    """Return the lines describing one successful probe."""
    config, site = result.config, result.site
    assert config is not None and site is not None
    pool = policy.config.pools[config.egress_pool]
    if pool.entries:
        entries = ", ".join(f"{e.name} (weight {e.weight})" for e in pool.entries)
        lines = [f"    pool: {pool.name}: {entries}"]
    else:
        lines = [f"    pool: {pool.name}: empty; messages routed to it wait"]
    cap = _duration(config.max_retry_interval) if config.max_retry_interval else "no cap"
    lines.append(
        f"    retry: after {_duration(config.retry_interval)}, doubling ({cap}); "
        f"expire after {_duration(config.max_age)}"
    )
    if config.mx_list:
        lines.append(f"    destination: mx_list {', '.join(str(mx) for mx in config.mx_list)}")
        lines.append(f"    site: {site}")
    else:
        lines.append("    destination: MX lookup")
        lines.append(f"    site: {site} ({NO_DNS})")
    for path in result.paths:
        if not path.changed:
            lines.append(f"    path from {path.source}: defaults")
            continue
        settings = ", ".join(f"{name}={_show(value)}" for name, value in path.changed.items())
        lines.append(f"    path from {path.source}: {settings} ({path.path.origin})")
    return lines


def format_probes(policy: Policy, results: list[ProbeResult]) -> str:
    """Return the human-readable listing of probe results (their errors go to stderr)."""
    if not results:
        return "\nProbes: none (the policy has no get_queue_config or get_egress_path_config)\n"
    head = f"Probes ({len(results)}"
    if all(result.probe.synthetic for result in results):
        head += ", synthetic: name real ones with --probe DOMAIN[,TENANT[,CAMPAIGN]]"
    lines = ["", head + "; paths show the settings that differ from the built-in defaults):"]
    for result in results:
        title = f"  {result.probe.label} -> queue {result.probe.queue}"
        errors = sum(not e.warning for e in result.errors)
        warnings = len(result.errors) - errors
        if errors:
            lines.append(f"{title}: {errors} error{'s' if errors != 1 else ''} (listed on stderr)")
        elif warnings:
            lines.append(f"{title}: the handler raised (a warning, listed on stderr)")
        if result.config is not None:
            if not result.errors:
                lines.append(title)
            lines.extend(_summary(policy, result))
    return "\n".join(lines) + "\n"
