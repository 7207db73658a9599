"""Bounce classification: map an SMTP response to one of KumoMTA's classes by regex rules."""

from __future__ import annotations

import functools
import os
import re
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kumopy.errors import ConfigError, ConfigIssue
from kumopy.toml_lines import key_lines, syntax_error
from kumopy.validation import suggest

__all__ = [
    "CLASSES",
    "SHIPPED_RULES",
    "UNCATEGORIZED",
    "BounceClassifier",
    "Rule",
    "default_classifier",
    "make_classifier",
    "normalize",
    "parse_rules",
    "read_rules",
]

CLASSES = (
    "InvalidRecipient",
    "DNSFailure",
    "SpamBlock",
    "SpamContent",
    "ProhibitedAttachment",
    "RelayDenied",
    "AutoReply",
    "TransientFailure",
    "Subscribe",
    "Unsubscribe",
    "ChallengeResponse",
    "BadConfiguration",
    "BadConnection",
    "BadDomain",
    "ContentRelated",
    "InactiveMailbox",
    "InvalidSender",
    "MessageExpired",
    "NoAnswerFromHost",
    "PolicyRelated",
    "ProtocolErrors",
    "QuotaIssues",
    "RelayingIssues",
    "RoutingErrors",
    "SpamRelated",
    "VirusRelated",
    "AuthenticationFailed",
    "TooManyRecipients",
    "Uncategorized",
)
"""KumoMTA's predefined bounce classes."""

UNCATEGORIZED = "Uncategorized"
"""The class of a response no rule matches (and of every Delivery and Reception)."""

SHIPPED_RULES = Path(__file__).resolve().parent / "examples" / "bounce_rules.toml"
"""The rules kumopy ships; a policy's files are tried before them."""

_CACHE_SIZE = 4096
"""Distinct responses remembered: a flood of one reply costs one scan of the rules."""


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule: responses its pattern finds belong to its class."""

    pattern: re.Pattern[str]
    classification: str
    where: str
    """`file:line` of the rule."""


def normalize(code: int, enhanced: str | None, text: str) -> str:
    """Return the string rules match: "code enhanced text", whitespace collapsed to spaces."""
    text = " ".join(text.split())
    return f"{code} {enhanced} {text}" if enhanced else f"{code} {text}"


def parse_rules(text: str, path: str) -> tuple[list[Rule], list[ConfigIssue]]:
    """Parse a rules file: a [rules] table of 'regex' = "Class" lines, tried in file order."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line, problem = syntax_error(exc, path)
        return [], [ConfigIssue(line, "bounce rules", "", problem)]
    lines = key_lines(text)

    def where(*keys: str) -> str:
        number = lines.get(keys) or lines.get(keys[:1])
        return f"{path}:{number}" if number else path

    rules: list[Rule] = []
    issues: list[ConfigIssue] = []
    for key in data:
        if key != "rules":
            problem = "a rules file holds one [rules] table of 'regex' = \"Class\" lines"
            issues.append(ConfigIssue(where(key), "bounce rules", key, problem))
    table = data.get("rules", {})
    if not isinstance(table, dict):
        issues.append(ConfigIssue(where("rules"), "bounce rules", "rules", "must be a table"))
        table = {}
    for pattern, cls in table.items():
        at = where("rules", pattern)
        if not isinstance(cls, str) or cls not in CLASSES:
            hint = suggest(cls, CLASSES) if isinstance(cls, str) else ""
            problem = f"unknown class {cls!r}{hint}; KumoMTA's classes are {', '.join(CLASSES)}"
            issues.append(ConfigIssue(at, "bounce rule", pattern, problem))
            continue
        try:
            compiled = re.compile(pattern, re.IGNORECASE)
        except re.error as exc:
            issues.append(ConfigIssue(at, "bounce rule", pattern, f"bad regex: {exc}"))
            continue
        rules.append(Rule(compiled, cls, at))
    return rules, issues


def read_rules(path: str | os.PathLike[str]) -> list[Rule]:
    """Read one rules file; raise ConfigError naming file:line of every problem."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as handle:
            text = handle.read().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError([ConfigIssue(name, "bounce rules", "", "file not found")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigIssue(name, "bounce rules", "", f"cannot read: {exc}")]) from None
    rules, issues = parse_rules(text, name)
    if issues:
        raise ConfigError(issues)
    return rules


class BounceClassifier:
    """Classify responses by the first matching rule; cache the answer per distinct response."""

    def __init__(self, rules: Sequence[Rule], files: Sequence[str] = ()) -> None:
        self.rules = tuple(rules)
        self.files = tuple(files)
        """The rules files, in the order they are tried."""
        self.scans = 0
        """How many responses were matched against the rules (cache misses)."""
        self.classify: Callable[[int, str | None, str], str] = functools.lru_cache(_CACHE_SIZE)(
            self._scan
        )
        """Return the class of a response (code, enhanced code, text); cached."""

    def _scan(self, code: int, enhanced: str | None, text: str) -> str:
        self.scans += 1
        subject = normalize(code, enhanced, text)
        for rule in self.rules:
            if rule.pattern.search(subject):
                return rule.classification
        return UNCATEGORIZED


def make_classifier(files: Sequence[str | os.PathLike[str]] = ()) -> BounceClassifier:
    """Build a classifier from these files, then the shipped rules; raise ConfigError."""
    rules: list[Rule] = []
    issues: list[ConfigIssue] = []
    names = [os.fspath(f) for f in files]
    for name in names:
        try:
            rules.extend(read_rules(name))
        except ConfigError as exc:
            issues.extend(exc.issues)
    if issues:
        raise ConfigError(issues)
    return BounceClassifier([*rules, *_shipped()], [*names, str(SHIPPED_RULES)])


@functools.cache
def _shipped() -> tuple[Rule, ...]:
    """Return the shipped rules, read once per process."""
    return tuple(read_rules(SHIPPED_RULES))


@functools.cache
def default_classifier() -> BounceClassifier:
    """Return the classifier of the shipped rules alone (one per process)."""
    return make_classifier()
