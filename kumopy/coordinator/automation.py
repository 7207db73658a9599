"""Traffic-shaping automation: replies that match a rule suspend or reconfigure a path a while."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from kumopy.coordinator.holds import Hold, Holds
from kumopy.errors import SpoolError
from kumopy.rates import Rate

__all__ = ["Automation", "Rule", "RulesFor"]

log = logging.getLogger(__name__)

_MAX_TRACKED = 100_000
"""Threshold windows kept at most (sources x sites x rules); the oldest are dropped past it."""


class Rule(Protocol):
    """What the engine needs of a shaping file's automation rule (kumopy.shaping_rules)."""

    @property
    def scope_kind(self) -> str: ...
    @property
    def scope(self) -> str: ...
    @property
    def regexes(self) -> Sequence[Any]: ...
    @property
    def action(self) -> str: ...
    @property
    def config(self) -> tuple[str, object] | None: ...
    @property
    def trigger_count(self) -> int: ...
    @property
    def trigger_window(self) -> float: ...
    @property
    def duration(self) -> float: ...
    @property
    def where(self) -> str: ...
    @property
    def match_internal(self) -> bool: ...


RulesFor = Callable[[str, str, str | None], Sequence[Rule]]
"""(site, routing domain, provider) -> the rules that apply there."""


def _wire_value(value: object) -> object:
    """Return an option value as an operator writes it (holds are stored msgpack-safe)."""
    if isinstance(value, Rate):
        return value.text
    if isinstance(value, tuple):
        return [str(item) for item in value]
    return value


class Automation:
    """Match each failure reply against the rules of its site and act on a trigger."""

    def __init__(self, holds: Holds, rules_for: RulesFor | None = None) -> None:
        self.holds = holds
        self.rules_for = rules_for
        self._rules: dict[tuple[str, str, str | None], Sequence[Rule]] = {}
        self._seen: dict[tuple[str, str, str], deque[float]] = {}
        self.fired = 0

    def reload(self, rules_for: RulesFor | None) -> None:
        """Adopt the rules of a reloaded policy (thresholds start again)."""
        self.rules_for = rules_for
        self._rules.clear()
        self._seen.clear()

    def observe(
        self,
        source: str,
        site: str,
        domain: str,
        provider: str | None,
        tenant: str | None,
        campaign: str | None,
        reply: str,
        now: float,
        internal: bool = False,
    ) -> None:
        """Take one failure reply ("421 4.7.0 text") seen by source at site.

        `internal`: kumopy wrote the reply itself (no peer answered); only rules with
        match_internal see those, as in KumoMTA.
        """
        if self.rules_for is None:
            return
        key = (site, domain, provider)
        rules = self._rules.get(key)
        if rules is None:
            rules = self._rules[key] = tuple(self.rules_for(site, domain, provider))
        for rule in rules:
            if internal and not rule.match_internal:
                continue
            if not any(rx.search(reply) for rx in rule.regexes):
                continue
            if rule.trigger_window > 0 and not self._triggered(rule, source, site, now):
                continue
            self._act(rule, source, site, provider, tenant, campaign, reply, now)

    def _triggered(self, rule: Rule, source: str, site: str, now: float) -> bool:
        """Count a match in the rule's window; return True when it reaches the threshold."""
        key = (rule.where, source, site)
        seen = self._seen.get(key)
        if seen is None:
            if len(self._seen) >= _MAX_TRACKED:
                del self._seen[next(iter(self._seen))]
            seen = self._seen[key] = deque()
        seen.append(now)
        while seen and seen[0] <= now - rule.trigger_window:
            seen.popleft()
        if len(seen) < rule.trigger_count:
            return False
        seen.clear()
        return True

    def _act(
        self,
        rule: Rule,
        source: str,
        site: str,
        provider: str | None,
        tenant: str | None,
        campaign: str | None,
        reply: str,
        now: float,
    ) -> None:
        where = provider if rule.scope_kind == "provider" and provider else site
        reason = f"{reply[:200]}"
        origin = f"automation {rule.where}"
        until = now + rule.duration
        if rule.action == "Suspend":
            hold = Hold("path", f"{source}>{where}", until, reason, origin, since=now)
        elif rule.action == "SuspendTenant":
            if not tenant:
                return  # nothing to suspend: the message has no tenant
            hold = Hold("tenant", tenant, until, reason, origin, site=site, since=now)
        elif rule.action == "SuspendCampaign":
            if not campaign:
                return
            hold = Hold("campaign", campaign, until, reason, origin, site=site, since=now)
        elif rule.config is not None:
            name, value = rule.config
            target = f"{source}>{where}"
            hold = Hold(
                "config", target, until, reason, origin, None, name, _wire_value(value), now
            )
        else:
            log.error("automation rule at %s has no action kumopy knows: %r", rule.where, rule)
            return
        current = self.holds.holds.get(hold.key)
        if current is not None and current.until >= until - rule.duration / 2:
            return  # already in force for most of its time: no spool write per reply
        try:
            self.holds.add(hold)
        except SpoolError as exc:
            log.error("automation could not record its hold: %s", exc.message)
            return
        self.fired += 1
