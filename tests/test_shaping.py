"""Tests for kumopy.shaping: KumoMTA shaping files, their precedence, errors and policy use."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from kumopy.checkconfig import main as check_config
from kumopy.errors import ConfigError
from kumopy.paths import EgressPath, PathOptions
from kumopy.policy import load_policy
from kumopy.rates import parse_rate
from kumopy.shaping import Shaping, load_shaping, read_shaping, site_hosts
from kumopy.shaping_lines import array_item_line

EXAMPLE = Path(__file__).parent.parent / "kumopy" / "examples" / "shaping.toml"
GSITE = "aspmx.l.google.test|alt1.aspmx.l.google.test"
"""A site whose MX hosts all end in .google.test (the gmx provider's suffix)."""
GMAIL_SITE = "gmail-smtp-in.l.google.test,alt1.gmail-smtp-in.l.googlemail.test"

BASE = """\
["default"]
connection_limit = 10
max_deliveries_per_connection = 100
idle_timeout = "60s"

[[ "default".automation ]]
regex = "KumoMTA is not amused"
action = "Suspend"
duration = "5m"

[provider."gmx"]
match = [{MXSuffix = ".google.test"}, {MXSuffix = ".googlemail.test"}]
max_deliveries_per_connection = 50
provider_connection_limit = 20
provider_max_message_rate = "200/s"

[provider."gmx".sources."ip-1"]
provider_max_message_rate = "20/s"
connection_limit = 8

[[provider."gmx".automation]]
regex = ["^421 4\\\\.7\\\\.0 ", "rate limited"]
action = "SuspendTenant"
trigger = {Threshold = "3/10min"}
duration = "1h"

[provider."listed"]
match = [{Domain = ["a.example", "b.example"]}, {DomainSuffix = ".corp.example"}]
max_recipients_per_batch = 7

["gmail.test"]
connection_limit = 6
max_message_rate = "10/s"

["gmail.test".sources."ip-2"]
max_deliveries_per_connection = 3

[["gmail.test".automation]]
regex = "unusual rate"
action = [{SetConfig = {name = "max_message_rate", value = "50/h"}}, "Suspend"]
duration = "2h"

["vanity.test"]
mx_rollup = false
connection_limit = 2
max_deliveries_per_connection = 9

["vanity.test".sources."ip-1"]
connection_limit = 1

[["vanity.test".automation]]
regex = "slow down"
action = {SetDomainConfig = {name = "connection_limit", value = 1}}
trigger = "Immediate"
duration = "30m"

["reset.test"]
mx_rollup = false
replace_base = true
enable_tls = "Disabled"
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    """Write a file under tmp_path and return its path."""
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def shaping(tmp_path: Path, *texts: str) -> Shaping:
    """Load shaping files f0.toml, f1.toml, ... with these texts, relative to tmp_path."""
    for i, text in enumerate(texts):
        write(tmp_path, f"f{i}.toml", text)
    return load_shaping(*(f"f{i}.toml" for i in range(len(texts))), base=tmp_path)


def options(found: PathOptions) -> dict[str, Any]:
    """Return the options with rates as text, for comparisons."""
    return {k: (str(v) if k.endswith("rate") else v) for k, v in found.values.items()}


def issues_of(exc: pytest.ExceptionInfo[ConfigError]) -> list[tuple[str, str, str, str]]:
    """Return each issue as (file:line with the file's name only, object, field, problem)."""
    return [(Path(i.where).name, i.obj, i.field, i.problem) for i in exc.value.issues]


# -- precedence ----------------------------------------------------------------------------------


def test_default_alone(tmp_path: Path) -> None:
    s = shaping(tmp_path, BASE)
    found = s.get_egress_path_config("other.test", "ip-1", "mx.other.test")
    assert options(found) == {
        "connection_limit": 10,
        "max_deliveries_per_connection": 100,
        "idle_timeout": 60.0,
    }
    assert found.origin == "f0.toml: default"


def test_provider_then_provider_and_source(tmp_path: Path) -> None:
    s = shaping(tmp_path, BASE)
    # Step 2: the provider's options over the default, and its name on the path.
    from_ip2 = s.get_egress_path_config("hosted.test", "ip-2", GSITE)
    assert options(from_ip2) == {
        "connection_limit": 10,
        "max_deliveries_per_connection": 50,
        "idle_timeout": 60.0,
        "provider_connection_limit": 20,
        "provider_max_message_rate": "200/s",
        "provider_name": "gmx",
    }
    assert from_ip2.origin == "f0.toml: default, provider gmx"
    # Step 3: provider + source.
    from_ip1 = s.get_egress_path_config("hosted.test", "ip-1", GSITE)
    assert options(from_ip1)["provider_max_message_rate"] == "20/s"
    assert options(from_ip1)["connection_limit"] == 8
    assert from_ip1.origin == "f0.toml: default, provider gmx, provider gmx.sources.ip-1"


def test_site_block_rolls_up_by_mx_through_site_of(tmp_path: Path) -> None:
    s = shaping(tmp_path, BASE)
    assert s.rollup_domains() == ("gmail.test",)
    # The block's own domain gets it whatever its site (step 4 over step 3).
    own = s.get_egress_path_config("gmail.test", "ip-1", GMAIL_SITE)
    assert options(own)["connection_limit"] == 6
    assert options(own)["max_message_rate"] == "10/s"
    assert options(own)["provider_name"] == "gmx"
    # Another domain on the same site: only once site_of says where gmail.test goes.
    other = s.get_egress_path_config("googlemail.test", "ip-2", GMAIL_SITE)
    assert options(other)["connection_limit"] == 10
    s.site_of = {"gmail.test": GMAIL_SITE}.get
    rolled = s.get_egress_path_config("googlemail.test", "ip-2", GMAIL_SITE)
    assert options(rolled)["connection_limit"] == 6
    # Step 6: site + source.
    assert options(rolled)["max_deliveries_per_connection"] == 3
    assert rolled.origin == "f0.toml: default, provider gmx, gmail.test, gmail.test.sources.ip-2"
    # A site gmail.test does not resolve to is untouched.
    assert "max_message_rate" not in s.get_egress_path_config("x.test", "ip-2", GSITE).values


def test_domain_block_then_site_source_then_domain_source(tmp_path: Path) -> None:
    s = shaping(tmp_path, BASE)
    s.site_of = {"gmail.test": GMAIL_SITE}.get
    # vanity.test is hosted on the gmail site but has a block of its own (mx_rollup = false).
    ip2 = s.get_egress_path_config("vanity.test", "ip-2", GMAIL_SITE)
    # Step 5 (domain: 2 over the site's 6), then step 6 (site + source: 3 over the domain's 9).
    assert options(ip2)["connection_limit"] == 2
    assert options(ip2)["max_deliveries_per_connection"] == 3
    assert ip2.origin == (
        "f0.toml: default, provider gmx, gmail.test, vanity.test, gmail.test.sources.ip-2"
    )
    # Step 7: domain + source, last of all.
    ip1 = s.get_egress_path_config("vanity.test", "ip-1", GMAIL_SITE)
    assert options(ip1)["connection_limit"] == 1
    assert options(ip1)["max_deliveries_per_connection"] == 9
    assert ip1.origin.endswith("gmail.test, vanity.test, vanity.test.sources.ip-1")


def test_replace_base_drops_what_came_before(tmp_path: Path) -> None:
    s = shaping(tmp_path, BASE)
    found = s.get_egress_path_config("reset.test", "ip-1", "mx.reset.test")
    assert options(found) == {"enable_tls": "Disabled"}
    assert found.origin == "f0.toml: reset.test"
    assert found.over(EgressPath()).connection_limit == EgressPath().connection_limit


def test_later_files_merge_over_earlier_ones_unless_replace_base(tmp_path: Path) -> None:
    later = '["gmail.test"]\nidle_timeout = "30s"\n[provider."gmx"]\nconnection_limit = 9\n'
    s = shaping(tmp_path, BASE, later)
    found = s.get_egress_path_config("gmail.test", "ip-2", GMAIL_SITE)
    assert options(found)["idle_timeout"] == 30.0
    assert options(found)["connection_limit"] == 6
    assert options(found)["max_deliveries_per_connection"] == 3
    assert found.origin == (
        "f0.toml: default, provider gmx; f1.toml: provider gmx; f0.toml: gmail.test; "
        "f1.toml: gmail.test; f0.toml: gmail.test.sources.ip-2"
    )
    replacing = '["gmail.test"]\nreplace_base = true\nconnection_limit = 4\n'
    s = shaping(tmp_path, BASE, later, replacing)
    found = s.get_egress_path_config("gmail.test", "ip-2", GMAIL_SITE)
    # The earlier gmail.test blocks (and their .sources), the default and the provider: gone.
    assert options(found) == {"connection_limit": 4}
    assert found.origin == "f2.toml: gmail.test"
    assert s.rules_for(GMAIL_SITE, "gmail.test")[-1].scope == "gmx"


def test_provider_by_domain_list_and_domain_suffix(tmp_path: Path) -> None:
    s = shaping(tmp_path, BASE)
    for domain in ("a.example", "B.Example.", "mail.corp.example"):
        found = s.get_egress_path_config(domain, "ip-1", "mx.elsewhere.test")
        assert options(found)["provider_name"] == "listed", domain
        assert options(found)["max_recipients_per_batch"] == 7
    for domain in ("c.example", "corp.example", "a.example.org"):
        found = s.get_egress_path_config(domain, "ip-1", "mx.elsewhere.test")
        assert "provider_name" not in found.values, domain


def test_mx_suffix_needs_every_mx_host(tmp_path: Path) -> None:
    s = shaping(tmp_path, BASE)
    assert s.providers_for("mx1.google.test,mx2.googlemail.test", "x.test") == ("gmx",)
    assert s.providers_for("mx1.google.test|mx.other.test", "x.test") == ()
    assert s.providers_for("google.test", "x.test") == ()  # the suffix has its leading dot
    assert s.providers_for("mx_list:smtp.google.test:2525,[2001:db8::1]:25", "x.test") == ()
    assert s.providers_for("mx_list:smtp.google.test:2525", "x.test") == ("gmx",)


def test_results_are_cached_until_a_site_becomes_known(tmp_path: Path) -> None:
    s = shaping(tmp_path, BASE)
    first = s.get_egress_path_config("googlemail.test", "ip-2", GMAIL_SITE)
    assert s.get_egress_path_config("googlemail.test", "ip-2", GMAIL_SITE) is first
    sites: dict[str, str] = {}
    s.site_of = sites.get
    assert s.refresh_sites() is False
    sites["gmail.test"] = GMAIL_SITE
    assert s.refresh_sites() is True
    again = s.get_egress_path_config("googlemail.test", "ip-2", GMAIL_SITE)
    assert again is not first and again.values["connection_limit"] == 6


def test_site_hosts() -> None:
    assert site_hosts("mx1.a.test|mx2.a.test,MX3.a.test.") == (
        "mx1.a.test",
        "mx2.a.test",
        "mx3.a.test",
    )
    assert site_hosts("mx_list:relay.test:2525,10.1.1.1,[2001:db8::1]:25,2001:db8::2") == (
        "relay.test",
        "10.1.1.1",
        "2001:db8::1",
        "2001:db8::2",
    )


# -- automation rules ------------------------------------------------------------------------------


def test_automation_rules_in_kumomta_order(tmp_path: Path) -> None:
    s = shaping(tmp_path, BASE)
    s.site_of = {"gmail.test": GMAIL_SITE}.get
    rules = s.rules_for(GMAIL_SITE, "vanity.test")
    assert [(r.scope_kind, r.scope, r.action) for r in rules] == [
        ("default", "default", "Suspend"),
        ("provider", "gmx", "SuspendTenant"),
        ("site", "gmail.test", "SetConfig"),
        ("site", "gmail.test", "Suspend"),
        ("domain", "vanity.test", "SetDomainConfig"),
    ]
    default, provider, set_config, suspend, domain = rules
    assert (default.trigger_count, default.trigger_window, default.duration) == (1, 0.0, 300.0)
    assert (provider.trigger_count, provider.trigger_window, provider.duration) == (3, 600.0, 3600)
    assert provider.matches("421 4.7.0 [TS01] Messages from 10.0.0.1 temporarily deferred")
    assert provider.matches("451 you are being rate limited")
    assert not provider.matches("250 ok")
    assert set_config.config == ("max_message_rate", parse_rate("50/h"))
    assert suspend.config is None and suspend.where == set_config.where
    header = BASE.splitlines().index('[["gmail.test".automation]]') + 1
    assert Path(set_config.where).name == f"f0.toml:{header}"
    assert domain.config == ("connection_limit", 1)
    # Only the default's rule elsewhere; a provider named by the caller adds its rules.
    assert [r.scope for r in s.rules_for("mx.other.test", "other.test")] == ["default"]
    assert [r.scope for r in s.rules_for("mx.other.test", "other.test", "gmx")] == [
        "default",
        "gmx",
    ]


# -- errors ----------------------------------------------------------------------------------------

BAD = """\
["default"]
conection_limit = 5
max_message_rate = "fast"
enable_rset = false

[provider."google"]
match = [{MXSuffix = ".google.com"},
         {MXSufix = ".googlemail.com"}]

["gmail.com"]
provider_max_message_rate = "5/s"

[["gmail.com".automation]]
regex = ["ok", "bad("]
action = "Suspnd"
trigger = {Threshold = "often"}
duration = "1h"

[["gmail.com".automation]]
regex = "fine"
action = {SetConfig = {name = "max_message_rate", value = "lots"}}
duration = "1h"
"""


def test_every_problem_of_every_file_at_once(tmp_path: Path) -> None:
    write(tmp_path, "bad.toml", BAD)
    write(tmp_path, "syntax.toml", '["x.test"]\nconnection_limit = 1\n["y.test"\n')
    with pytest.raises(ConfigError) as exc:
        load_shaping("bad.toml", "syntax.toml", "missing.toml", base=tmp_path)
    rate = '"100/s", "5000/h", "20000/day" or "50/10min,max_burst=5"'
    gmail = 'shaping block "gmail.com"'
    assert issues_of(exc) == [
        (
            "bad.toml:2",
            'shaping block "default"',
            "conection_limit",
            "unknown option (did you mean 'connection_limit'?)",
        ),
        (
            "bad.toml:3",
            'shaping block "default"',
            "max_message_rate",
            f"'fast' is not a rate such as {rate}",
        ),
        (
            "bad.toml:4",
            'shaping block "default"',
            "enable_rset",
            "a KumoMTA option not supported by kumopy",
        ),
        (
            "bad.toml:8",
            'shaping block provider."google"',
            "match[1]",
            "unknown match kind 'MXSufix' (did you mean 'MXSuffix'?); "
            "use MXSuffix, HostName, DomainSuffix, Domain",
        ),
        (
            "bad.toml:11",
            gmail,
            "provider_max_message_rate",
            'only in a [provider."name"] block or its .sources: it spans the provider\'s sites',
        ),
        (
            "bad.toml:14",
            f"{gmail} automation[0]",
            "regex",
            "'bad(' is not a valid regular expression: missing ), unterminated subpattern "
            "at position 3",
        ),
        (
            "bad.toml:15",
            f"{gmail} automation[0]",
            "action",
            "unknown action 'Suspnd' (did you mean 'Suspend'?)",
        ),
        (
            "bad.toml:16",
            f"{gmail} automation[0]",
            "trigger",
            f"Threshold: 'often' is not a rate such as {rate}; write e.g. "
            '{Threshold = "3/10min"}',
        ),
        (
            "bad.toml:21",
            f"{gmail} automation[1]",
            "action",
            f"SetConfig max_message_rate: 'lots' is not a rate such as {rate}",
        ),
        (
            "syntax.toml:3",
            "shaping file",
            "",
            "TOML syntax error: Expected ']' at the end of a table declaration",
        ),
        ("missing.toml", "shaping file", "", "file not found"),
    ]
    # Nothing half-loads: with any problem, read_shaping hands back an empty Shaping.
    empty, issues = read_shaping(["bad.toml"], tmp_path)
    assert issues and empty.get_egress_path_config("gmail.com", "a", "x").values == {}


@pytest.mark.parametrize(
    ("text", "issue"),
    [
        (
            "connection_limit = 5\n",
            (
                "f0.toml:1",
                "shaping file",
                "",
                "connection_limit must be a table, not an integer: "
                'a shaping file holds ["default"], ["domain"] and [provider."name"] tables',
            ),
        ),
        (
            "[gmail.com]\nconnection_limit = 5\n",
            (
                "f0.toml:1",
                'shaping block "gmail"',
                "com",
                "a table inside a domain block: write "
                'the domain in quotes, like ["gmail.com"]; unquoted, its dots make nested tables',
            ),
        ),
        (
            '[provider."p"]\nconnection_limit = 5\n',
            (
                "f0.toml:1",
                'shaping block provider."p"',
                "match",
                'no match: write match = [{MXSuffix = ".example.net"}] (or DomainSuffix)',
            ),
        ),
        (
            '[provider."p"]\nmatch = ["p.example"]\n',
            (
                "f0.toml:2",
                'shaping block provider."p"',
                "match[0]",
                '\'p.example\': write {Domain = "p.example"}, {DomainSuffix = "p.example"} or '
                '{MXSuffix = "p.example"}',
            ),
        ),
        (
            '["a.test"]\nmatch = [{Domain = "a.test"}]\n',
            (
                "f0.toml:2",
                'shaping block "a.test"',
                "match",
                'only a [provider."name"] block takes match',
            ),
        ),
        (
            '["default".sources."ip-1"]\nconnection_limit = 5\n',
            (
                "f0.toml:1",
                'shaping block "default"',
                "sources",
                'KumoMTA never reads ["default"].sources; put per-source options in a domain or '
                "provider block's .sources, or in the sources file",
            ),
        ),
        (
            '["a.test"]\nprovider_name = "x"\n',
            (
                "f0.toml:2",
                'shaping block "a.test"',
                "provider_name",
                'set by the [provider."name"] block that matches the site; not written by hand',
            ),
        ),
        (
            '[["a.test".automation]]\nregex = "x"\naction = "Bounce"\nduration = "1h"\nwhy = 1\n',
            (
                "f0.toml:3",
                'shaping block "a.test" automation[0]',
                "action",
                "'Bounce' is a KumoMTA action not supported by kumopy",
            ),
        ),
        (
            '[["a.test".automation]]\nregex = "x"\naction = "Suspend"\nduration = "1h"\nwhy = 1\n',
            ("f0.toml:5", 'shaping block "a.test" automation[0]', "why", "unknown key"),
        ),
        (
            '[["a.test".automation]]\nregex = "x"\naction = "SetConfig"\nduration = "0s"\n',
            (
                "f0.toml:3",
                'shaping block "a.test" automation[0]',
                "action",
                'SetConfig names the option to set: write {SetConfig = {name = "max_message_rate", '
                'value = "50/h"}}',
            ),
        ),
        (
            '["a.test"]\nconsecutive_connection_failures_before_delay = 5\n',
            (
                "f0.toml:2",
                'shaping block "a.test"',
                "consecutive_connection_failures_before_delay",
                "a KumoMTA option not supported by kumopy",
            ),
        ),
    ],
    ids=[
        "top-level-option",
        "unquoted-domain",
        "provider-without-match",
        "match-plain-string",
        "match-in-domain",
        "default-sources",
        "provider-name",
        "bounce-action",
        "unknown-rule-key",
        "setconfig-bare",
        "kumomta-only-option",
    ],
)
def test_single_problems(tmp_path: Path, text: str, issue: tuple[str, str, str, str]) -> None:
    with pytest.raises(ConfigError) as exc:
        shaping(tmp_path, text)
    assert issues_of(exc)[0] == issue


def test_array_item_line() -> None:
    text = 'regex = ["a",\n  "b", # "c"\n  {x = ["y", "z"]},\n  "d"]\n'
    assert [array_item_line(text, 1, i) for i in range(5)] == [1, 2, 3, 4, 1]


def test_the_example_file_loads() -> None:
    s = load_shaping(EXAMPLE)
    assert s.provider_names() == ("google", "yahoo")
    gmail = s.get_egress_path_config("gmail.com", "ip-1", "gmail-smtp-in.l.google.com")
    assert options(gmail)["provider_max_message_rate"] == "20/s"
    assert options(gmail)["max_recipients_per_batch"] == 50
    (rule,) = s.rules_for("mta5.am0.yahoodns.net", "yahoo.com")
    assert (rule.action, rule.trigger_count, rule.trigger_window, rule.duration) == (
        "Suspend",
        3,
        600.0,
        3600.0,
    )


# -- from a policy ---------------------------------------------------------------------------------

POLICY = """\
from kumopy import kumo

SHAPING = kumo.load_shaping("shaping.toml")

@kumo.on("init")
def init():
    kumo.define_egress_source(name="ip-1", source_address="10.0.0.1")
    kumo.define_egress_source(name="ip-2", source_address="10.0.0.2")
    kumo.define_egress_pool(name="p", entries=[{"name": "ip-1"}, {"name": "ip-2"}])

@kumo.on("get_queue_config")
def qc(domain, tenant, campaign, routing_domain):
    return kumo.make_queue_config(egress_pool="p")
"""


def test_policy_load_shaping_installs_the_handler(tmp_path: Path) -> None:
    write(tmp_path, "shaping.toml", BASE)
    policy = load_policy(write(tmp_path, "policy.py", POLICY))
    shaping_obj = policy.settings["shaping"]
    assert isinstance(shaping_obj, Shaping)
    assert shaping_obj.where == f"{tmp_path / 'policy.py'}:3"
    assert policy.has_handler("get_egress_path_config")
    assert policy.automation_rules() == shaping_obj.rules_for
    # One cap for every domain whose MX hosts end in the provider's suffixes.
    for domain, site in [
        ("gmail.test", "gmail-smtp-in.l.google.test|alt1.gmail-smtp-in.l.google.test"),
        ("hosted.test", "aspmx.l.google.test,alt1.aspmx.l.google.test"),
        ("other.test", "mx1.googlemail.test"),
    ]:
        path = policy.path_config(domain, "ip-2", site, EgressPath())
        assert path.provider_name == "gmx", domain
        assert path.provider_connection_limit == 20
        assert str(path.provider_max_message_rate) == "200/s"
        assert path.origin.startswith("shaping.toml: default, provider gmx")
    plain = policy.path_config("plain.test", "ip-1", "mx.plain.test", EgressPath())
    assert (plain.provider_name, plain.connection_limit, plain.idle_timeout) == (None, 10, 60.0)


def test_policy_handler_of_its_own_stays(tmp_path: Path) -> None:
    write(tmp_path, "shaping.toml", BASE)
    own = POLICY + textwrap.dedent(
        """
        @kumo.on("get_egress_path_config")
        def path(routing_domain, egress_source, site_name):
            base = SHAPING.path_options(routing_domain, egress_source, site_name)
            return kumo.make_egress_path(**base, smtp_port=2525)
        """
    )
    policy = load_policy(write(tmp_path, "policy.py", own))
    path = policy.path_config("x.test", "ip-1", GSITE, EgressPath())
    assert (path.smtp_port, path.provider_name, path.connection_limit) == (2525, "gmx", 8)


def test_policy_reports_shaping_and_policy_problems_together(tmp_path: Path) -> None:
    write(tmp_path, "shaping.toml", '["default"]\nconnection_limit = 0\n')
    body = POLICY.replace('source_address="10.0.0.2"', 'source_address="nowhere"')
    body += 'kumo.load_shaping("shaping.toml")\n'
    with pytest.raises(ConfigError) as exc:
        load_policy(write(tmp_path, "policy.py", body))
    found = [(Path(i.where).name, i.obj, i.field) for i in exc.value.issues]
    assert ("shaping.toml:2", 'shaping block "default"', "connection_limit") in found
    assert (f"policy.py:{len(body.splitlines())}", "load_shaping", "") in found
    assert any(obj == 'source "ip-2"' for _, obj, _ in found)


def test_check_config_shows_shaping_errors_with_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shaping_file = write(tmp_path, "shaping.toml", '["default"]\n\nmax_message_rate = "soon"\n')
    policy = write(tmp_path, "policy.py", POLICY)
    assert check_config([str(policy)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines()[1].startswith(
        f"  {shaping_file}:3: shaping block \"default\": max_message_rate: 'soon' is not a rate"
    )
    # Fixed, the probes show what the shaping file gives each source.
    write(tmp_path, "shaping.toml", BASE)
    assert check_config([str(policy), "--probe", "gmail.test"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert (
        "    path from ip-2: connection_limit=6, max_deliveries_per_connection=3, "
        "idle_timeout=60, max_message_rate=10/s (shaping.toml: default, gmail.test, "
        "gmail.test.sources.ip-2)\n"
    ) in out
