"""The coordinator's resolver process, set up from the policy: MX lookups and MTA-STS policies."""

from __future__ import annotations

import logging
import resource

from kumopy.dns import MXResolver, ResolverConfig
from kumopy.dns_process import ResolverProcess
from kumopy.errors import ResolverConfigError
from kumopy.policy_calls import Policy

__all__ = ["start_resolver"]

log = logging.getLogger(__name__)


def _more_descriptors(wanted: int) -> None:
    """Raise the soft limit on open files toward `wanted` (each DNS query in flight holds one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def start_resolver(policy: Policy, log_level: str = "INFO") -> ResolverProcess | None:
    """Start the resolver process the policy configured (None, logged, when it cannot be)."""
    config = policy.settings.get("resolver")
    if not isinstance(config, ResolverConfig):
        config = ResolverConfig()
    _more_descriptors(config.max_queries * 2 + 4096)
    try:
        MXResolver(config)  # reads resolv.conf when no server is named: fail here, clearly
    except ResolverConfigError as exc:
        # Not fatal: queues with an mx_list need no DNS; each queue that does will say why.
        log.error("DNS: %s; queues without mx_list cannot be sent", exc.message)
        return None
    return ResolverProcess(config, policy.settings.get("mta_sts"), log_level)
