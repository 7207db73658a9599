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
    assert set(data) == {"sources", "pools"}
    assert [s["name"] for s in data["sources"]] == ["unspecified", "ip-1", "ip-2"]
    assert data["sources"][2] == {
        "name": "ip-2",
        "source_address": "2001:db8:3333:4444:5555:6666:7777:8888",
        "ehlo_domain": "mta2.examplecorp.com",
        "remote_port": None,
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


@pytest.mark.integration
def test_python_dash_m_kumopy_check_config(tmp_path: Path) -> None:
    env = {**os.environ, "KUMOPY_DEMO_SINK": "127.0.0.1:2526"}
    done = subprocess.run(
        [sys.executable, "-m", "kumopy", "check-config", str(DEMO), "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert [s["name"] for s in data["sources"]] == ["unspecified", "mta1", "mta2", "mta3"]
    bad = tmp_path / "bad.toml"
    bad.write_text("[pool.p.nobody]\n")
    done = subprocess.run(
        [sys.executable, "-m", "kumopy", "check-config", "--sources", str(bad)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "unknown source 'nobody'" in done.stderr
