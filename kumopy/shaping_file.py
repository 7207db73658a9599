"""Read one KumoMTA shaping file (shaping.toml) into validated blocks, each problem at file:line."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from kumopy.errors import ConfigError, ConfigIssue, kind_of
from kumopy.paths import PATH_OPTIONS, make_egress_path
from kumopy.shaping_lines import Lines
from kumopy.shaping_rules import AutomationRule, parse_rules
from kumopy.toml_lines import syntax_error
from kumopy.validation import suggest

__all__ = [
    "KUMOMTA_ONLY_OPTIONS",
    "MATCH_KINDS",
    "PROVIDER_OPTIONS",
    "Block",
    "Match",
    "ShapingFile",
    "SourceBlock",
    "check_option",
    "parse_shaping_text",
    "read_shaping_file",
]

_KUMOMTA_OPTIONS = (
    "additional_connection_limits",
    "additional_message_rate_throttles",
    "additional_source_selection_rates",
    "aggressive_connection_opening",
    "allow_smtp_auth_plain_without_tls",
    "allow_smtp_auth_plain_without_valid_certificate",
    "auth_timeout",
    "consecutive_connection_failures_before_delay",
    "dispatcher_progress_watchdog_timeout",
    "dispatcher_wakeup_strategy",
    "enable_dane",
    "enable_rset",
    "ignore_8bit_checks",
    "low_memory_reduction_policy",
    "maintainer_wakeup_strategy",
    "max_mx_addresses_per_host",
    "max_mx_plan_size",
    "max_ready",
    "no_memory_reduction_policy",
    "openssl_cipher_list",
    "openssl_cipher_suites",
    "openssl_options",
    "opportunistic_tls_reconnect_on_failed_handshake",
    "provider_source_selection_rate",
    "reconnect_strategy",
    "refresh_interval",
    "refresh_strategy",
    "rset_timeout",
    "rustls_cipher_suites",
    "smtp_auth_plain_password",
    "smtp_auth_plain_username",
    "suspended",
    "system_shutdown_timeout",
    "tls_certificate",
    "tls_handshake_timeout",
    "tls_prefer_openssl",
    "tls_private_key",
    "try_next_host_on_transport_error",
    "use_lmtp",
)
KUMOMTA_ONLY_OPTIONS = tuple(name for name in _KUMOMTA_OPTIONS if name not in PATH_OPTIONS)
"""KumoMTA egress path options kumopy does not implement: an error, never silently ignored."""
PROVIDER_OPTIONS = ("provider_connection_limit", "provider_max_message_rate")
"""Limits spanning every site of a provider: only in provider blocks and their .sources."""
MATCH_KINDS = ("MXSuffix", "HostName", "DomainSuffix", "Domain")
"""Provider match kinds: KumoMTA's three, and kumopy's Domain (exact domain names)."""
_KEYWORDS = {
    "default": ("replace_base", "automation"),
    "domain": ("mx_rollup", "replace_base", "sources", "automation"),
    "provider": ("match", "replace_base", "sources", "automation"),
}
_ALL_KEYWORDS = ("match", "mx_rollup", "replace_base", "sources", "automation")


@dataclass(frozen=True, slots=True)
class Match:
    """One provider match: {MXSuffix = ".google.com"} and the like."""

    kind: str
    """One of MATCH_KINDS."""
    value: str
    """Lower-cased, without a trailing dot."""


@dataclass(frozen=True, slots=True)
class SourceBlock:
    """A ["domain".sources."name"] or [provider."p".sources."name"] table."""

    source: str
    file: str
    """The file as the operator named it (for origins)."""
    options: Mapping[str, object]
    """Path options as written (each validated by make_egress_path)."""
    where: str
    label: str
    """How the path's origin names it: `gmail.com.sources.ip-1`."""


@dataclass(frozen=True, slots=True)
class Block:
    """One ["default"], ["domain"] or [provider."name"] table of one file."""

    kind: str
    """"default", "domain" or "provider"."""
    name: str
    """"default", the domain (lower-cased) or the provider's name."""
    file: str
    """The file as the operator named it (for origins)."""
    where: str
    options: Mapping[str, object]
    """Path options as written (each validated by make_egress_path)."""
    replace_base: bool = False
    mx_rollup: bool = True
    matches: tuple[Match, ...] = ()
    sources: Mapping[str, SourceBlock] = field(default_factory=dict)
    rules: tuple[AutomationRule, ...] = ()

    @property
    def label(self) -> str:
        """Return how the path's origin names the block: `default`, `gmail.com`, `provider g`."""
        return f"provider {self.name}" if self.kind == "provider" else self.name


@dataclass(slots=True)
class ShapingFile:
    """The blocks of one shaping file (its valid parts), and its problems."""

    path: str
    name: str
    blocks: list[Block] = field(default_factory=list)
    issues: list[ConfigIssue] = field(default_factory=list)


def check_option(
    key: str, value: object, where: str, *, provider_ok: bool
) -> tuple[object, list[ConfigIssue]]:
    """Check one path option of a shaping block; return make_egress_path's value and the issues."""
    if key == "provider_name":
        problem = 'set by the [provider."name"] block that matches the site; not written by hand'
    elif key in PROVIDER_OPTIONS and not provider_ok:
        problem = (
            'only in a [provider."name"] block or its .sources: it spans the provider\'s sites'
        )
    elif key in PATH_OPTIONS:
        try:
            options = make_egress_path({key: value}, where)
        except ConfigError as exc:
            return None, exc.issues
        return options.values[key], []
    elif key in KUMOMTA_ONLY_OPTIONS:
        problem = "a KumoMTA option not supported by kumopy"
    else:
        problem = f"unknown option{suggest(key, (*PATH_OPTIONS, *_ALL_KEYWORDS))}"
    return None, [ConfigIssue(where, "egress path", key, problem)]


class _Reader:
    """Read the tables of one parsed file into blocks, collecting issues."""

    def __init__(self, result: ShapingFile, lines: Lines) -> None:
        self.result = result
        self.lines = lines

    def issue(self, where: str, obj: str, key: str, problem: str) -> None:
        """Note one problem of the file."""
        self.result.issues.append(ConfigIssue(where, obj, key, problem))

    def options(
        self, keys: tuple[str, ...], obj: str, key: str, value: object, provider_ok: bool
    ) -> object | None:
        """Check one path option; return the value as written, or None with issues noted."""
        _, issues = check_option(key, value, self.lines(*keys, key), provider_ok=provider_ok)
        self.result.issues.extend(replace(issue, obj=obj) for issue in issues)
        return None if issues else value

    def block(self, kind: str, name: str, table: object, keys: tuple[str, ...]) -> None:
        """Read one ["default"], ["domain"] or [provider."name"] table."""
        obj = (
            f'shaping block provider."{name}"' if kind == "provider" else f'shaping block "{name}"'
        )
        where = self.lines(*keys)
        if not isinstance(table, dict):
            problem = (
                f"{key_hint(keys)} must be a table, not {kind_of(table)}: a shaping file holds "
                '["default"], ["domain"] and [provider."name"] tables'
            )
            self.issue(where, "shaping file", "", problem)
            return
        if kind == "domain":
            name = name.strip().lower().rstrip(".")
            if not name or any(c.isspace() or c in "@/[]" or not c.isprintable() for c in name):
                self.issue(where, obj, "", f"{keys[0]!r} is not a domain name")
        elif kind == "provider" and not name.strip():
            self.issue(where, obj, "", "a provider needs a name")
        flags = {"replace_base": False, "mx_rollup": True}
        for flag in flags:
            if flag in table and flag in _KEYWORDS[kind]:
                if isinstance(table[flag], bool):
                    flags[flag] = table[flag]
                else:
                    problem = f"must be true or false, not {kind_of(table[flag])}"
                    self.issue(self.lines(*keys, flag), obj, flag, problem)
        options: dict[str, object] = {}
        matches: tuple[Match, ...] = ()
        sources: dict[str, SourceBlock] = {}
        rules: list[AutomationRule] = []
        label = f"provider {name}" if kind == "provider" else name
        for key, value in table.items():
            key_where = self.lines(*keys, key)
            if key in ("replace_base", "mx_rollup") and key in _KEYWORDS[kind]:
                continue
            if key == "match" and kind == "provider":
                matches = self.matches(value, key_where, obj)
            elif key == "sources" and key in _KEYWORDS[kind]:
                sources = self.sources(keys, obj, label, value, kind == "provider")
            elif key == "automation":
                rules.extend(self.rules(kind, name, keys, obj, value, flags["mx_rollup"]))
            elif key in _ALL_KEYWORDS:
                self.issue(key_where, obj, key, _misplaced(kind, key))
            elif isinstance(value, dict) and kind == "domain" and key not in PATH_OPTIONS:
                problem = (
                    f'a table inside a domain block: write the domain in quotes, like ["{name}.'
                    f'{key}"]; unquoted, its dots make nested tables'
                )
                self.issue(key_where, obj, key, problem)
            elif self.options(keys, obj, key, value, kind == "provider") is not None:
                options[key] = value
        self.result.blocks.append(
            Block(
                kind,
                name,
                self.result.name,
                where,
                MappingProxyType(options),
                flags["replace_base"],
                flags["mx_rollup"],
                matches,
                MappingProxyType(sources),
                tuple(rules),
            )
        )

    def matches(self, value: object, where: str, obj: str) -> tuple[Match, ...]:
        """Read a provider's match array."""
        example = '[{MXSuffix = ".google.com"}, {DomainSuffix = ".example"}]'
        if not isinstance(value, list):
            self.issue(where, obj, "match", f"must be an array like {example}")
            return ()
        found: list[Match] = []
        for i, item in enumerate(value):
            item_where = self.lines.array_item(where, i)
            if isinstance(item, dict) and len(item) == 1:
                ((kind, text),) = item.items()
                texts = text if kind == "Domain" and isinstance(text, list) else [text]
                if kind not in MATCH_KINDS:
                    known = ", ".join(MATCH_KINDS)
                    problem = (
                        f"unknown match kind {kind!r}{suggest(kind, MATCH_KINDS)}; use {known}"
                    )
                elif all(isinstance(t, str) and t.strip(". ") for t in texts):
                    found.extend(Match(kind, str(t).strip().lower().rstrip(".")) for t in texts)
                    continue
                else:
                    problem = f"{kind} must be a non-empty string, not {text!r}"
            elif isinstance(item, str):
                problem = (
                    f'{item!r}: write {{Domain = "{item}"}}, {{DomainSuffix = "{item}"}} '
                    f'or {{MXSuffix = "{item}"}}'
                )
            else:
                problem = f'must be a table like {{MXSuffix = ".google.com"}}, not {item!r}'
            self.issue(item_where, obj, f"match[{i}]", problem)
        return tuple(found)

    def sources(
        self, keys: tuple[str, ...], obj: str, label: str, value: object, provider_ok: bool
    ) -> dict[str, SourceBlock]:
        """Read a block's .sources tables."""
        if not isinstance(value, dict) or not all(isinstance(t, dict) for t in value.values()):
            problem = f'must be tables: write [{_header(keys)}.sources."ip-1"]'
            self.issue(self.lines(*keys, "sources"), obj, "sources", problem)
            return {}
        out: dict[str, SourceBlock] = {}
        for source, table in value.items():
            source_keys = (*keys, "sources", source)
            source_obj = f'{obj}.sources."{source}"'
            options: dict[str, object] = {}
            for key, option in table.items():
                if key in _ALL_KEYWORDS:
                    problem = f"not allowed in a .sources table (it belongs to [{_header(keys)}])"
                    self.issue(self.lines(*source_keys, key), source_obj, key, problem)
                elif self.options(source_keys, source_obj, key, option, provider_ok) is not None:
                    options[key] = option
            where = self.lines(*source_keys)
            label_source = f"{label}.sources.{source}"
            out[source] = SourceBlock(
                source, self.result.name, MappingProxyType(options), where, label_source
            )
        return out

    def rules(
        self, kind: str, name: str, keys: tuple[str, ...], obj: str, value: object, rollup: bool
    ) -> list[AutomationRule]:
        """Read a block's automation rules."""
        array = (*keys, "automation")
        scope_kind = {"default": "default", "provider": "provider"}.get(kind)
        if scope_kind is None:
            scope_kind = "site" if rollup else "domain"

        def locate(index: int, key: str | None) -> str:
            return self.lines.item(array, index, key) if index >= 0 else self.lines(*array)

        def string_item(index: int, key: str, sub: int) -> str:
            return self.lines.array_item(self.lines.item(array, index, key), sub)

        def check(key: str, value: object, where: str) -> tuple[object, list[ConfigIssue]]:
            return check_option(key, value, where, provider_ok=kind == "provider")

        rules, issues = parse_rules(
            value,
            scope_kind=scope_kind,
            scope=name,
            obj=obj,
            locate_item=locate,
            item_line=string_item,
            check=check,
        )
        self.result.issues.extend(issues)
        return rules


def key_hint(keys: tuple[str, ...]) -> str:
    """Return a key path as written in TOML: `"gmail.com".sources`."""
    return ".".join(f'"{k}"' if not k.replace("_", "").isalnum() else k for k in keys)


def _header(keys: tuple[str, ...]) -> str:
    """Return a table header's key path as written: `provider."google"`."""
    return ".".join(f'"{k}"' if k != "provider" else k for k in keys)


def _misplaced(kind: str, key: str) -> str:
    """Return why a block keyword is not allowed in this kind of block."""
    if key == "match":
        return 'only a [provider."name"] block takes match'
    if key == "mx_rollup":
        return 'only a ["domain"] block takes mx_rollup'
    return (
        'KumoMTA never reads ["default"].sources; put per-source options in a domain or '
        "provider block's .sources, or in the sources file"
    )


def parse_shaping_text(text: str, path: str = "<shaping>", name: str | None = None) -> ShapingFile:
    """Parse a shaping file's text; problems go to the result's issues, nothing raises."""
    result = ShapingFile(path, name or path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        where, problem = syntax_error(exc, path)
        result.issues.append(ConfigIssue(where, "shaping file", "", problem))
        return result
    reader = _Reader(result, Lines(path, text))
    for key, value in data.items():
        if key == "provider" and isinstance(value, dict):
            for provider, table in value.items():
                reader.block("provider", provider, table, ("provider", provider))
        elif key == "default":
            reader.block("default", "default", value, (key,))
        else:
            reader.block("domain", key, value, (key,))
    # In file order; the blocks stay for checks across files (read_shaping uses none of them
    # once any file has a problem: a bad file never half-loads).
    result.issues.sort(key=lambda issue: _line_of(issue.where))
    return result


def _line_of(where: str) -> int:
    """Return the line number of a `file:line` (0 without one), to sort issues by."""
    number = where.rpartition(":")[2]
    return int(number) if number.isdigit() else 0


def read_shaping_file(path: str | os.PathLike[str], name: str | None = None) -> ShapingFile:
    """Read one shaping file; a missing or unreadable file becomes an issue, not an exception."""
    full = os.fspath(path)
    if full.startswith(("http://", "https://")):
        problem = "loading shaping data over HTTP is not supported by kumopy; name a file"
    elif full.endswith(".json"):
        problem = "kumopy reads shaping files in TOML only (KumoMTA's JSON form is not supported)"
    else:
        try:
            with open(full, "rb") as handle:
                return parse_shaping_text(handle.read().decode("utf-8"), full, name)
        except FileNotFoundError:
            problem = "file not found"
        except UnicodeDecodeError as exc:
            problem = f"not UTF-8 text (byte {exc.start})"
        except OSError as exc:
            problem = f"cannot read: {exc.strerror or exc}"
    return ShapingFile(full, name or full, issues=[ConfigIssue(full, "shaping file", "", problem)])
