"""Automation rules of a shaping file ([["yahoo.com".automation]]): parsed and validated."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from kumopy.errors import ConfigIssue, kind_of
from kumopy.rates import parse_rate
from kumopy.units import duration_seconds
from kumopy.validation import suggest

__all__ = [
    "ACTIONS",
    "CONFIG_ACTIONS",
    "RULE_KEYS",
    "SCOPE_KINDS",
    "AutomationRule",
    "CheckOption",
    "Locate",
    "parse_rules",
]

ACTIONS = ("Suspend", "SuspendTenant", "SuspendCampaign", "SetConfig", "SetDomainConfig")
"""The actions kumopy takes (KumoMTA's names)."""
CONFIG_ACTIONS = ("SetConfig", "SetDomainConfig")
"""Actions written {SetConfig = {name = "...", value = ...}}: a path option for a while."""
_KUMOMTA_ONLY_ACTIONS = ("Bounce", "BounceTenant", "BounceCampaign")
RULE_KEYS = ("regex", "action", "trigger", "duration", "match_internal")
"""The keys an automation rule takes."""
SCOPE_KINDS = ("default", "provider", "site", "domain")
"""Where a rule was written: the default block, a provider block, a domain block rolled up to
its site (mx_rollup, the default), or a domain block with mx_rollup = false."""

CheckOption = Callable[[str, object, str], tuple[object, list[ConfigIssue]]]
"""Validate one path option (name, value, `file:line`): its validated value and its issues."""
Locate = Callable[[str | None], str]
"""Return `file:line` of a key of the rule being read (None: the rule itself)."""


@dataclass(frozen=True, slots=True)
class AutomationRule:
    """One automation rule: when a response matches, take the action for `duration`."""

    scope_kind: str
    """One of SCOPE_KINDS."""
    scope: str
    """The block's name: "default", the provider's name, or the domain of the block."""
    regexes: tuple[re.Pattern[str], ...]
    """The rule matches a response that any of these finds (re.search)."""
    action: str
    """One of ACTIONS."""
    config: tuple[str, object] | None
    """For SetConfig and SetDomainConfig: the path option and its value, as make_egress_path
    validated it (a Rate for a rate, seconds for a duration)."""
    trigger_count: int
    """Matches needed within trigger_window; 1 for Immediate."""
    trigger_window: float
    """Seconds the matches are counted over; 0 for Immediate."""
    duration: float
    """Seconds the action lasts."""
    where: str
    """`file:line` of the rule."""
    match_internal: bool = False
    """Whether responses kumopy made up itself may match (KumoMTA's match_internal)."""

    def matches(self, response: str) -> bool:
        """Return True when one of the regexes finds a match in the response."""
        return any(pattern.search(response) for pattern in self.regexes)


class _Rule:
    """Read one rule table, collecting its issues."""

    def __init__(self, obj: str, locate: Locate, check: CheckOption) -> None:
        self.obj = obj
        self.locate = locate
        self.check = check
        self.issues: list[ConfigIssue] = []

    def problem(self, key: str, text: str, where: str | None = None) -> None:
        """Note one problem of the rule, at its key's line unless `where` says otherwise."""
        self.issues.append(ConfigIssue(where or self.locate(key), self.obj, key, text))

    def regexes(self, value: object, item_where: Callable[[int], str]) -> list[re.Pattern[str]]:
        """Compile `regex`: one string or a list of them."""
        texts = value if isinstance(value, list) else [value]
        if not texts:
            self.problem("regex", "must name at least one regular expression")
        out: list[re.Pattern[str]] = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                what = f"item {i} " if isinstance(value, list) else ""
                self.problem("regex", f"{what}must be a string, not {kind_of(text)}")
                continue
            try:
                out.append(re.compile(text))
            except re.error as exc:
                where = item_where(i) if isinstance(value, list) else None
                self.problem("regex", f"{text!r} is not a valid regular expression: {exc}", where)
        return out

    def action(self, value: object) -> tuple[str, tuple[str, object] | None] | None:
        """Read one action: its name and, for SetConfig, the option and its value."""
        if isinstance(value, str):
            if value in CONFIG_ACTIONS:
                example = f'{{{value} = {{name = "max_message_rate", value = "50/h"}}}}'
                self.problem("action", f"{value} names the option to set: write {example}")
            elif value in ACTIONS:
                return value, None
            elif value in _KUMOMTA_ONLY_ACTIONS:
                self.problem("action", f"{value!r} is a KumoMTA action not supported by kumopy")
            else:
                self.problem("action", f"unknown action {value!r}{suggest(value, ACTIONS)}")
            return None
        if isinstance(value, dict) and len(value) == 1:
            ((kind, spec),) = value.items()
            if kind in CONFIG_ACTIONS:
                return self.config_action(kind, spec)
            self.problem("action", f"unknown action {kind!r}{suggest(kind, CONFIG_ACTIONS)}")
            return None
        names = ", ".join(repr(a) for a in ACTIONS[:3])
        self.problem(
            "action",
            f"must be one of {names}, {{SetConfig = {{name = ..., value = ...}}}}, "
            f"{{SetDomainConfig = ...}} or a list of them, not {kind_of(value)}",
        )
        return None

    def config_action(self, kind: str, spec: object) -> tuple[str, tuple[str, object]] | None:
        """Read {SetConfig = {name, value}}: the value is checked as make_egress_path does."""
        if not isinstance(spec, dict) or set(spec) != {"name", "value"}:
            self.problem("action", f'{kind} takes {{name = "option", value = ...}}, not {spec!r}')
            return None
        name = spec["name"]
        if not isinstance(name, str):
            self.problem("action", f"{kind}: name must be a string, not {kind_of(name)}")
            return None
        checked, issues = self.check(name, spec["value"], self.locate("action"))
        for issue in issues:
            self.problem("action", f"{kind} {issue.field}: {issue.problem}")
        return (kind, (name, checked)) if not issues else None

    def trigger(self, value: object) -> tuple[int, float] | None:
        """Read `trigger`: (count, window seconds); (1, 0) for Immediate."""
        if value == "Immediate":
            return 1, 0.0
        if isinstance(value, dict) and list(value) == ["Threshold"]:
            text = value["Threshold"]
            try:
                rate = parse_rate(text)
                if rate.local or rate.burst != rate.limit:
                    raise ValueError(f"{text!r} is more than COUNT/PERIOD")
            except ValueError as exc:
                self.problem("trigger", f'Threshold: {exc}; write e.g. {{Threshold = "3/10min"}}')
                return None
            return rate.limit, rate.period
        hint = suggest(value, ("Immediate",)) if isinstance(value, str) else ""
        self.problem(
            "trigger",
            f'must be "Immediate" or {{Threshold = "3/10min"}}, not {value!r}{hint}',
        )
        return None

    def duration(self, value: object) -> float | None:
        """Read `duration` in seconds (longer than zero)."""
        try:
            seconds = duration_seconds(value)
        except ValueError as exc:
            self.problem("duration", str(exc))
            return None
        if seconds <= 0:
            self.problem("duration", "must be longer than zero")
            return None
        return seconds


def parse_rules(
    value: object,
    *,
    scope_kind: str,
    scope: str,
    obj: str,
    locate_item: Callable[[int, str | None], str],
    item_line: Callable[[int, str, int], str],
    check: CheckOption,
) -> tuple[list[AutomationRule], list[ConfigIssue]]:
    """Parse a block's automation array: one AutomationRule per action of each rule."""
    if not isinstance(value, list):
        where = locate_item(-1, None)
        problem = f'must be an array of tables ([["{scope}".automation]]), not {kind_of(value)}'
        return [], [ConfigIssue(where, obj, "automation", problem)]
    rules: list[AutomationRule] = []
    issues: list[ConfigIssue] = []
    for index, table in enumerate(value):
        label = f"{obj} automation[{index}]"

        def locate(key: str | None, index: int = index) -> str:
            return locate_item(index, key)

        reader = _Rule(label, locate, check)
        if not isinstance(table, dict):
            reader.problem("", f"must be a table, not {kind_of(table)}", locate(None))
            issues.extend(reader.issues)
            continue
        rules.extend(_one_rule(reader, table, scope_kind, scope, index, item_line))
        issues.extend(reader.issues)
    return (rules if not issues else []), issues


def _one_rule(
    reader: _Rule,
    table: dict[str, object],
    scope_kind: str,
    scope: str,
    index: int,
    item_line: Callable[[int, str, int], str],
) -> list[AutomationRule]:
    """Check one rule table; return its rules (none when it has problems)."""
    for key in table:
        if key not in RULE_KEYS:
            reader.problem(key, f"unknown key{suggest(key, RULE_KEYS)}")
    for key in ("regex", "action", "duration"):
        if key not in table:
            reader.problem(key, "is required", reader.locate(None))
    regexes: list[re.Pattern[str]] = []
    if "regex" in table:
        regexes = reader.regexes(table["regex"], lambda i: item_line(index, "regex", i))
    raw = table.get("action")
    if isinstance(raw, list) and not raw:
        reader.problem("action", "must name at least one action")
    actions = []
    if "action" in table:
        actions = [reader.action(a) for a in (raw if isinstance(raw, list) else [raw])]
    trigger = reader.trigger(table.get("trigger", "Immediate"))
    duration = reader.duration(table["duration"]) if "duration" in table else None
    internal = table.get("match_internal", False)
    if not isinstance(internal, bool):
        reader.problem("match_internal", f"must be true or false, not {kind_of(internal)}")
    if reader.issues or trigger is None or duration is None:
        return []
    where = reader.locate(None)
    return [
        AutomationRule(
            scope_kind,
            scope,
            tuple(regexes),
            action,
            config,
            trigger[0],
            trigger[1],
            duration,
            where,
            bool(internal),
        )
        for action, config in (a for a in actions if a is not None)
    ]
