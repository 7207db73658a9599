"""Tests for kumopy.sources_file: KumoMTA's sources TOML, read as it is."""

from __future__ import annotations

from pathlib import Path

import pytest

from kumopy.config import UNSPECIFIED, EgressPool, EgressSource, PoolEntry
from kumopy.errors import ConfigError, ConfigIssue
from kumopy.policy import load_policy
from kumopy.sources_file import SourcesMerger, parse_sources_text, read_sources_file
from kumopy.validation import build_config

DATA = Path(__file__).parent / "data"
FACTS_EXAMPLE = """\
[source."mta-a"]
source_address = "192.0.2.10"
ehlo_domain = "a.mta.example.net"

[source."mta-b"]
source_address = "2001:db8::10"
ehlo_domain = "b.mta.example.net"

[pool."transactional"]
[pool."transactional"."mta-a"]        # weight 1 when absent

[pool."bulk"]
[pool."bulk"."mta-a"]
weight = 3
[pool."bulk"."mta-b"]
weight = 1
"""


def issues_of(text: str) -> list[ConfigIssue]:
    """Load a sources text and return every issue it raises."""
    file = parse_sources_text(text, "s.toml")
    with pytest.raises(ConfigError) as exc:
        build_config(file.sources, file.pools, file.issues)
    return exc.value.issues


@pytest.mark.parametrize("example", ["name_only", "ipv4", "ipv6", "pools"])
def test_chapter_examples_in_toml_equal_python(example: str) -> None:
    from_toml = load_policy(None, [DATA / "chapter" / f"{example}.toml"])
    from_python = load_policy(DATA / "chapter" / f"{example}.py")
    assert from_toml.config == from_python.config
    assert from_toml.path is None
    assert len(from_toml.config.sources) > 1


def test_reference_example() -> None:
    file = parse_sources_text(FACTS_EXAMPLE, "s.toml")
    assert file.issues == []
    config = build_config(file.sources, file.pools)
    assert list(config.sources.values()) == [
        EgressSource(UNSPECIFIED),
        EgressSource("mta-a", "192.0.2.10", "a.mta.example.net"),
        EgressSource("mta-b", "2001:db8::10", "b.mta.example.net"),
    ]
    assert config.pools["transactional"] == EgressPool("transactional", (PoolEntry("mta-a", 1),))
    assert config.pools["bulk"].entries == (PoolEntry("mta-a", 3), PoolEntry("mta-b", 1))


def test_inline_tables_weight_zero_and_empty_pool() -> None:
    file = parse_sources_text(
        "[source]\na = {}\nb = { remote_port = 2525 }\n"
        "[pool.empty]\n[pool.p]\na = { weight = 0 }\nb = {}\n",
        "s.toml",
    )
    config = build_config(file.sources, file.pools, file.issues)
    assert config.sources["b"] == EgressSource("b", remote_port=2525)
    assert config.pools["empty"].entries == ()
    assert config.pools["p"].entries == (PoolEntry("b", 1),)


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    file = read_sources_file(DATA / "bad_syntax.toml")
    (issue,) = file.issues
    assert issue.where == f"{DATA / 'bad_syntax.toml'}:4"
    assert issue.problem.startswith("TOML syntax error: ")
    assert "line 4" not in issue.problem
    assert file.sources == [] and file.pools == []


def test_duplicate_table_is_a_syntax_error() -> None:
    (issue,) = parse_sources_text("[source.a]\n\n[source.a]\n", "s.toml").issues
    assert issue.where == "s.toml:3"


def test_validation_issues_point_at_lines() -> None:
    found = issues_of(
        """\
# sources
[source."a"]
source_address = "10.0.0.1"
ehlo_domain = "x"

[source."b"]
ha_proxy_server = "192.0.2.1:5000"
socks5_proxy_password = "s3cret"
bogus = 1

[pool."q"]
"a" = 3
[pool."z"."a"]
weight = 2
foo = 1
[pool."w"."missing"]
weight = true
[other]
x = 1
[source.c]
name = "d"
"""
    )
    # Problems of the file's layout come first, then those of the values.
    assert [(i.where, i.obj, i.field) for i in found] == [
        ("s.toml:21", 'source "c"', "name"),
        ("s.toml:12", 'pool "q"', 'entry "a"'),
        ("s.toml:15", 'pool "z"', 'entry "a".foo'),
        ("s.toml:18", "key 'other'", ""),
        ("s.toml:4", 'source "a"', "ehlo_domain"),
        ("s.toml:7", 'source "b"', "ha_proxy_server"),
        ("s.toml:8", 'source "b"', "socks5_proxy_password"),
        ("s.toml:9", 'source "b"', "bogus"),
        ("s.toml:16", 'pool "w"', 'entry "missing".name'),
        ("s.toml:16", 'pool "w"', 'entry "missing".weight'),
    ]
    problems = [i.problem for i in found]
    assert problems[1] == (
        'must be a table, not an integer: write [pool."q"."a"] followed by an optional weight = N'
    )
    assert problems[2] == "unknown option; a pool entry table takes only weight"
    assert problems[-1] == "must be a whole number >= 0, not a boolean"
    assert "s3cret" not in str(found)


@pytest.mark.parametrize(
    "weight, fragment", [("-2", "negative"), ("1.5", "not 1.5"), ('"3"', "not a string")]
)
def test_bad_weights(weight: str, fragment: str) -> None:
    (issue,) = issues_of(f"[source.a]\n[pool.p.a]\nweight = {weight}\n")
    assert (issue.where, issue.field) == ("s.toml:2", 'entry "a".weight')
    assert fragment in issue.problem


def test_redefining_unspecified_in_toml() -> None:
    found = issues_of("[source.unspecified]\n[pool.unspecified.unspecified]\n")
    assert [(i.where, i.obj) for i in found] == [
        ("s.toml:1", 'source "unspecified"'),
        ("s.toml:2", 'pool "unspecified"'),
    ]


def test_quoted_and_literal_keys_are_located() -> None:
    text = "[source.\"we\\u0069rd.name\"]\nremote_port = 0\n\n[source.'lit.eral']\nx = 1\n"
    found = issues_of(text)
    assert [(i.where, i.obj, i.field) for i in found] == [
        ("s.toml:2", 'source "weird.name"', "remote_port"),
        ("s.toml:5", 'source "lit.eral"', "x"),
    ]


def test_multiline_strings_do_not_confuse_line_numbers() -> None:
    text = '[source.a]\nehlo_domain = """\n[source.b]\n"""\nremote_port = 0\n'
    fields = {i.field: i.where for i in issues_of(text)}
    assert fields == {"ehlo_domain": "s.toml:2", "remote_port": "s.toml:5"}


def test_unreadable_files(tmp_path: Path) -> None:
    (issue,) = read_sources_file(tmp_path / "missing.toml").issues
    assert (issue.where, issue.problem) == (str(tmp_path / "missing.toml"), "file not found")
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b'[source."caf\xe9"]\n')
    (issue,) = read_sources_file(latin).issues
    assert issue.problem == "not UTF-8 text (byte 12)"
    (issue,) = read_sources_file(tmp_path).issues
    assert issue.problem.startswith("cannot read")


def test_merger_overrides_in_order() -> None:
    merger = SourcesMerger()
    first = parse_sources_text(FACTS_EXAMPLE, "base.toml")
    second = parse_sources_text(
        '[source."mta-b"]\nsource_address = "2001:db8::20"\n[source."mta-c"]\n'
        '[pool.bulk."mta-b"]\nweight = 2\n[pool.bulk."mta-c"]\n[pool.extra]\n',
        "override.toml",
    )
    new_sources, new_pools = merger.add(first)
    assert [s.name for s in new_sources] == ["mta-a", "mta-b"]
    assert [p.name for p in new_pools] == ["transactional", "bulk"]
    more_sources, more_pools = merger.add(second)
    assert [s.name for s in more_sources] == ["mta-c"]
    assert [p.name for p in more_pools] == ["extra"]
    config = build_config(new_sources + more_sources, new_pools + more_pools)
    assert config.sources["mta-b"] == EgressSource("mta-b", "2001:db8::20", "b.mta.example.net")
    assert config.pools["bulk"].entries == (
        PoolEntry("mta-a", 3),
        PoolEntry("mta-b", 2),
        PoolEntry("mta-c", 1),
    )
    assert new_sources[1].option_where["source_address"] == "override.toml:2"
    assert new_sources[1].option_where["ehlo_domain"] == "base.toml:7"


def test_merged_option_error_points_at_the_overriding_file(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('[source.x]\nsource_address = "192.0.2.1"\n')
    (tmp_path / "b.toml").write_text('\n\n[source.x]\nsource_address = "x.example.com"\n')
    with pytest.raises(ConfigError) as exc:
        load_policy(None, [tmp_path / "a.toml", tmp_path / "b.toml"])
    (issue,) = exc.value.issues
    assert issue.where == f"{tmp_path / 'b.toml'}:4"
    assert "not a host name" in issue.problem


def test_pool_may_name_a_source_from_another_file(tmp_path: Path) -> None:
    (tmp_path / "sources.toml").write_text('[source.a]\nsource_address = "192.0.2.1"\n')
    (tmp_path / "pools.toml").write_text("[pool.p.a]\nweight = 4\n")
    policy = load_policy(None, [tmp_path / "sources.toml", tmp_path / "pools.toml"])
    assert policy.config.pools["p"].entries == (PoolEntry("a", 4),)
