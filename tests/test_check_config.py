"""Tests for `kumopy check-config` (kumopy.checkconfig.main)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kumopy.checkconfig import main
from kumopy.checkprobe import parse_probe

ROOT = Path(__file__).parent.parent
DATA = Path(__file__).parent / "data"
DEMO = ROOT / "kumopy" / "examples" / "demo_policy.py"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run check-config in-process; return the exit status, stdout and stderr."""
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def words(text: str) -> list[list[str]]:
    """Return the words of each line of text."""
    return [line.split() for line in text.splitlines()]


def test_text_listing_of_the_demo_policy(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, str(DEMO))
    assert (status, err) == (0, "")
    lines = [line.split() for line in out.splitlines()]
    assert ["Sources", "(4):"] in lines
    host = socket.gethostname()
    assert [
        "unspecified",
        "(default)",
        "any",
        "(hostname:",
        f"{host})",
        "25",
        "unspecified",
    ] in lines
    assert ["mta1", "127.0.0.2", "ipv4", "mta1.demo.kumopy.test", "25", "transactional"] in lines
    assert [
        "mta2",
        "127.0.0.3",
        "ipv4",
        "mta2.demo.kumopy.test",
        "25",
        "transactional,",
        "bulk",
    ] in (lines)
    transactional = out.index("  transactional:")
    bulk = out.index("  bulk:")
    assert ["mta1", "1", "33.3%"] in words(out[transactional:bulk])
    assert ["mta2", "2", "66.7%"] in words(out[transactional:bulk])
    assert ["mta2", "1", "25.0%"] in words(out[bulk:])
    assert ["mta3", "3", "75.0%"] in words(out[bulk:])


def test_text_notes_idle_sources_empty_pools_and_ports(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    sources = tmp_path / "s.toml"
    sources.write_text(
        '[source.idle]\n[source.v6]\nsource_address = "2001:db8::1"\nremote_port = 2525\n'
        "[pool.empty]\n[pool.p.v6]\n"
    )
    status, out, _ = run(capsys, "--sources", str(sources))
    assert status == 0
    assert out.startswith("Policy: (none)\n")
    assert ["v6", "2001:db8::1", "ipv6", f"(hostname: {socket.gethostname()})", "2525", "p"] in [
        [*row[:3], " ".join(row[3:5]), *row[5:]] for row in words(out)
    ]
    assert "  note: in no pool (no worker will run for them): idle\n" in out
    assert "  empty: empty; messages routed to it wait\n" in out


def test_json_output(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, str(DATA / "chapter" / "pools.py"), "--json")
    assert (status, err) == (0, "")
    data = json.loads(out)
    assert set(data) == {"sources", "pools", "probes", "errors", "warnings"}
    assert [s["name"] for s in data["sources"]] == ["unspecified", "ip-1", "ip-2"]
    assert data["sources"][2] == {
        "name": "ip-2",
        "source_address": "2001:db8:3333:4444:5555:6666:7777:8888",
        "ehlo_domain": "mta2.examplecorp.com",
        "remote_port": None,
        "source_selection_rate": None,
        "warmup": None,
        "family": "ipv6",
        "pools": ["SharedPool"],
    }
    assert data["pools"][1] == {
        "name": "CustomerA",
        "entries": [{"name": "ip-1", "weight": 1, "share": 100.0}],
    }


def test_policy_and_sources_together(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    extra = tmp_path / "extra.toml"
    extra.write_text('[source."late"]\n[pool."bulk"."late"]\nweight = 4\n')
    status, out, _ = run(capsys, str(DATA / "with_sources.py"), "--sources", str(extra), "--json")
    assert status == 0
    bulk = next(p for p in json.loads(out)["pools"] if p["name"] == "bulk")
    assert [(e["name"], e["weight"], e["share"]) for e in bulk["entries"]] == [
        ("mta-a", 3, 30.0),
        ("mta-b", 2, 20.0),
        ("relay", 1, 10.0),
        ("late", 4, 40.0),
    ]


def test_errors_go_to_stderr_with_status_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    policy = tmp_path / "bad.py"
    policy.write_text(
        "from kumopy import kumo\n"
        'kumo.define_egress_source(name="a", source_address="mx.example.com")\n'
        'kumo.define_egress_pool(name="p", entries=[{"name": "b", "weight": -1}])\n'
    )
    status, out, err = run(capsys, str(policy), "--sources", str(DATA / "bad_syntax.toml"))
    assert (status, out) == (2, "")
    lines = err.splitlines()
    assert lines[0] == "kumopy check-config: 4 errors:"
    assert lines[1].startswith(f"  {DATA / 'bad_syntax.toml'}:4: sources file: TOML syntax error")
    assert lines[2].startswith(f'  {policy}:2: source "a": source_address: source_address must')
    assert lines[3] == (
        f"  {policy}:3: pool \"p\": entries[0].name: unknown source 'b'; define it first"
    )
    assert (
        lines[4]
        == f'  {policy}:3: pool "p": entries[0].weight: -1 is negative; use 0 to drop the entry'
    )


def test_errors_as_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "s.toml").write_text("[source.a]\nremote_port = 0\n")
    status, out, err = run(capsys, "--sources", str(tmp_path / "s.toml"), "--json")
    assert (status, err) == (2, "")
    assert json.loads(out) == {
        "errors": [
            {
                "where": f"{tmp_path / 's.toml'}:2",
                "object": 'source "a"',
                "field": "remote_port",
                "problem": "0 is not a port number (1 to 65535)",
            }
        ]
    }


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys)
    assert status == 2
    assert "give a POLICY file, --sources FILE, or both" in err
    status, out, _ = run(capsys, "--help")
    assert status == 0
    assert "usage: kumopy check-config" in out


# -- probes: the run-time handlers called as `kumopy run` would call them -------------------

HEAD = """\
from kumopy import kumo

kumo.define_egress_source(name="ip-1", source_address="10.0.0.1")
kumo.define_egress_source(name="ip-2", source_address="10.0.0.2")
kumo.define_egress_pool(name="shared", entries=[{"name": "ip-1"}, {"name": "ip-2", "weight": 3}])
kumo.define_egress_pool(name="vip", entries=[{"name": "ip-1"}])
POOLS = {"acme": "vip", "other": "shared"}
"""
QUEUE = "@kumo.on('get_queue_config')\ndef q(domain, tenant, campaign, routing_domain):\n"
PATH = "@kumo.on('get_egress_path_config')\ndef p(routing_domain, egress_source, site_name):\n"


def write_policy(tmp_path: Path, body: str) -> Path:
    """Write HEAD + body as a policy file; return its path."""
    path = tmp_path / "policy.py"
    path.write_text(HEAD + body)
    return path


def line_of(path: Path, text: str) -> str:
    """Return `file:line` of the first line of path containing text."""
    lines = path.read_text().splitlines()
    return f"{path}:{next(i for i, line in enumerate(lines, 1) if text in line)}"


def error_lines(err: str) -> list[str]:
    """Return the error lines of check-config's stderr, after its count line."""
    lines = err.splitlines()
    assert lines[0].startswith("kumopy check-config: ")
    return lines[1:]


def test_unknown_pool_names_the_pool_and_the_probe(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    policy = write_policy(
        tmp_path,
        QUEUE + "    return kumo.make_queue_config(egress_pool='shraed')\n",
    )
    status, out, err = run(capsys, str(policy), "--probe", "example.org,acme")
    assert status == 2
    assert error_lines(err) == [
        "  probe example.org,acme: queue 'acme@example.org' names unknown egress pool "
        "'shraed'; known pools: unspecified, shared, vip"
    ]
    assert "  example.org,acme -> queue acme@example.org: 1 error (listed on stderr)\n" in out


def test_misspelled_queue_option_is_caught_by_the_synthetic_probes(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    policy = write_policy(
        tmp_path,
        QUEUE + "    return kumo.make_queue_config(egress_pool='shared', retry_intervl='5m')\n",
    )
    status, out, err = run(capsys, str(policy))
    assert status == 2
    where = line_of(policy, "retry_intervl")
    problem = (
        f"{where}: queue config: retry_intervl: unknown option (did you mean 'retry_interval'?)"
    )
    lines = error_lines(err)
    assert [line.split("; known options")[0] for line in lines] == [
        f"  probe example.com: get_queue_config: {problem}",
        f"  probe example.com,tenant: get_queue_config: {problem}",
        f"  probe example.com,tenant,campaign: get_queue_config: {problem}",
    ]
    assert "Probes (3, synthetic: name real ones with --probe" in out


def test_unknown_path_option_names_the_source_and_site(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    policy = write_policy(
        tmp_path,
        QUEUE
        + "    return kumo.make_queue_config(egress_pool=POOLS[tenant])\n"
        + PATH
        + "    if egress_source == 'ip-2':\n"
        "        return kumo.make_egress_path(conection_limit=2)\n"
        "    return kumo.make_egress_path(connection_limit=4)\n",
    )
    status, out, err = run(capsys, str(policy), "--probe", "Example.ORG,other")
    assert status == 2
    where = line_of(policy, "conection_limit")
    assert error_lines(err) == [
        "  probe example.org,other: get_egress_path_config for source 'ip-2' and site "
        f"'example.org': {where}: egress path: conection_limit: unknown option "
        "(did you mean 'connection_limit'?)"
    ]
    # The source that is fine is still shown.
    good = line_of(policy, "connection_limit=4")
    assert f"    path from ip-1: connection_limit=4 ({good})\n" in out


def test_a_handler_raising_for_one_tenant_fails_that_probe_only(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    policy = write_policy(
        tmp_path,
        QUEUE + "    return kumo.make_queue_config(egress_pool=POOLS[tenant])\n",
    )
    status, out, err = run(
        capsys, str(policy), "--probe", "a.example,acme", "--probe", "b.example,nobody", "--json"
    )
    assert (status, err) == (2, "")
    data = json.loads(out)
    assert [(p["probe"], p["ok"]) for p in data["probes"]] == [
        ("a.example,acme", True),
        ("b.example,nobody", False),
    ]
    [error] = data["errors"]
    handler = line_of(policy, "@kumo.on('get_queue_config')")
    raised = line_of(policy, "POOLS[tenant]")
    assert error == {
        "probe": "b.example,nobody",
        "handler": "get_queue_config",
        "source": None,
        "site": None,
        "message": f"get_queue_config ({handler}) failed for queue 'nobody@b.example' "
        f"at {raised}: KeyError: 'nobody'",
        "where": None,
        "object": None,
        "field": None,
        "problem": None,
        "warning": False,
    }


MX_POLICY = """\
@kumo.on('get_queue_config')
def q(domain, tenant, campaign, routing_domain):
    if tenant == "acme":
        return kumo.make_queue_config(
            egress_pool="vip", mx_list=["relay.example.net:2525", "10.1.1.1"],
            retry_interval="1m", max_retry_interval="1h", max_age="2d",
        )
    return kumo.make_queue_config(egress_pool="shared")
SEEN = []
@kumo.on('get_egress_path_config')
def p(routing_domain, egress_source, site_name):
    SEEN.append((routing_domain, egress_source, site_name))
    if egress_source == "ip-2":
        return kumo.make_egress_path(enable_tls="Required", skip_hosts=["192.0.2.0/24"])
    return kumo.make_egress_path()
"""


def test_good_policy_with_probes_prints_a_summary(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    policy = write_policy(tmp_path, MX_POLICY)
    status, out, err = run(capsys, str(policy), "--probe", "x.example", "--probe", "y.example,acme")
    assert (status, err) == (0, "")
    where = line_of(policy, 'enable_tls="Required"')
    probes = out[out.index("\nProbes (2; ") :]
    assert probes.splitlines()[2:] == [
        "  x.example -> queue x.example",
        "    pool: shared: ip-1 (weight 1), ip-2 (weight 3)",
        "    retry: after 20m, doubling (no cap); expire after 7d",
        "    destination: MX lookup",
        "    site: x.example (no DNS lookup in check-config)",
        "    path from ip-1: defaults",
        f"    path from ip-2: enable_tls=Required, skip_hosts=[192.0.2.0/24] ({where})",
        "  y.example,acme -> queue acme@y.example",
        "    pool: vip: ip-1 (weight 1)",
        "    retry: after 1m, doubling (1h); expire after 2d",
        "    destination: mx_list relay.example.net:2525, 10.1.1.1",
        "    site: mx_list:relay.example.net:2525,10.1.1.1",
        "    path from ip-1: defaults",
    ]


def test_probe_results_as_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    policy = write_policy(tmp_path, MX_POLICY)
    status, out, err = run(capsys, str(policy), "--json", "--probe", "y.example,acme,spring")
    assert (status, err) == (0, "")
    data = json.loads(out)
    assert set(data) == {"sources", "pools", "probes", "errors", "warnings"}
    assert data["errors"] == []
    site = "mx_list:relay.example.net:2525,10.1.1.1"
    assert data["probes"] == [
        {
            "probe": "y.example,acme,spring",
            "domain": "y.example",
            "tenant": "acme",
            "campaign": "spring",
            "synthetic": False,
            "queue": "spring:acme@y.example",
            "ok": True,
            "queue_config": {
                "egress_pool": "vip",
                "retry_interval": 60.0,
                "max_retry_interval": 3600.0,
                "max_age": 172800.0,
                "mx_list": ["relay.example.net:2525", "10.1.1.1"],
            },
            "site": site,
            "paths": [
                {
                    "source": "ip-1",
                    "weight": 1,
                    "origin": line_of(policy, "return kumo.make_egress_path()"),
                    "changed": {},
                }
            ],
        }
    ]
    status, out, _ = run(capsys, str(policy), "--json")
    data = json.loads(out)
    assert [(p["probe"], p["synthetic"], p["ok"]) for p in data["probes"]] == [
        ("example.com", True, True),
        ("example.com,tenant", True, True),
        ("example.com,tenant,campaign", True, True),
    ]
    assert data["probes"][0]["paths"][1]["changed"] == {
        "enable_tls": "Required",
        "skip_hosts": ["192.0.2.0/24"],
    }


def test_handlers_get_what_kumopy_run_passes_and_print_to_stderr(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    policy = write_policy(
        tmp_path,
        "@kumo.on('init')\n"
        "def init():\n"
        "    print('policy output')\n"
        + QUEUE
        + "    print('queue', domain, tenant, campaign, routing_domain)\n"
        "    mx_list = ['10.1.1.1'] if tenant else None\n"
        "    return kumo.make_queue_config(egress_pool='vip', mx_list=mx_list)\n"
        + PATH
        + "    print('path', routing_domain, egress_source, site_name)\n"
        "    return kumo.make_egress_path()\n",
    )
    argv = ["--json", "--probe", "x.example", "--probe", "x.example,t,c"]
    status, out, err = run(capsys, str(policy), *argv)
    assert status == 0
    assert json.loads(out)["errors"] == []  # the policy's prints did not spoil the JSON
    # An mx_list is the site; the routing domain is the queue's, as in coordinator.routes.
    assert err.splitlines() == [
        "policy output",
        "queue x.example None None None",
        "path x.example ip-1 x.example",
        "queue x.example t c None",
        "path x.example ip-1 mx_list:10.1.1.1",
    ]


def test_no_handlers_no_synthetic_probes(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, str(DATA / "with_sources.py"))
    assert status == 0
    assert out.endswith(
        "\nProbes: none (the policy has no get_queue_config or get_egress_path_config)\n"
    )
    status, out, _ = run(capsys, str(DATA / "with_sources.py"), "--probe", "x.example")
    assert status == 0
    assert "    pool: unspecified: unspecified (weight 1)\n" in out


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("Example.COM", ("example.com", None, None)),
        ("example.com, t ", ("example.com", "t", None)),
        ("example.com,,c", ("example.com", None, "c")),
    ],
)
def test_parse_probe(text: str, parts: tuple[str, str | None, str | None]) -> None:
    probe = parse_probe(text)
    assert (probe.domain, probe.tenant, probe.campaign) == parts


@pytest.mark.parametrize("text", ["", ",t", "a@example.com", "a,b,c,d", "a b.com"])
def test_bad_probes_are_usage_errors(capsys: pytest.CaptureFixture[str], text: str) -> None:
    status, out, err = run(capsys, str(DEMO), "--probe", text)
    assert (status, out) == (2, "")
    assert "argument --probe: " in err
    assert "DOMAIN[,TENANT[,CAMPAIGN]]" in err


def cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m kumopy check-config ARGV` in a new process."""
    return subprocess.run(
        [sys.executable, "-m", "kumopy", "check-config", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.integration
def test_python_dash_m_kumopy_check_config(tmp_path: Path) -> None:
    done = cli(str(DEMO), "--json", env={**os.environ, "KUMOPY_DEMO_SINK": "127.0.0.1:2526"})
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert [s["name"] for s in data["sources"]] == ["unspecified", "mta1", "mta2", "mta3"]
    bad = tmp_path / "bad.toml"
    bad.write_text("[pool.p.nobody]\n")
    done = cli("--sources", str(bad))
    assert done.returncode == 2
    assert "unknown source 'nobody'" in done.stderr
    policy = write_policy(
        tmp_path,
        QUEUE + "    return kumo.make_queue_config(egress_pool=POOLS[tenant])\n",
    )
    done = cli(str(policy), "--probe", "x.example,acme")
    assert done.returncode == 0, done.stderr
    assert "    pool: vip: ip-1 (weight 1)\n" in done.stdout
    # The synthetic probes' made-up tenants are unknown to this policy: a warning, so that a
    # unit's ExecStartPre does not refuse to start; the operator's own probe is an error.
    done = cli(str(policy))
    assert done.returncode == 0, done.stderr
    assert "3 warnings (a handler raised for a synthetic probe" in done.stderr
    assert "probe example.com: get_queue_config (" in done.stderr
    assert "KeyError: None" in done.stderr
    done = cli(str(policy), "--probe", "x.example,nobody")
    assert done.returncode == 2
    assert "1 error:" in done.stderr and "KeyError: 'nobody'" in done.stderr
