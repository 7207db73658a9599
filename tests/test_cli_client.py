"""The injection clients (sync, asyncio, command line), metrics, and the listen-address guard."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import pkgutil
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

import kumopy
from kumopy import cli
from kumopy.client import AsyncClient, Client
from kumopy.coordinator.options import check_listen_endpoint
from kumopy.errors import ConfigError
from kumopy.harness import wait_for
from tests.conftest_procs import Cluster, MakePolicy
from tests.policies import boot

POLICY = """
import os

@kumo.on("init")
def init():
    kumo.define_egress_source(name="a", source_address="127.0.0.5", ehlo_domain="a.cli.test")
    kumo.define_egress_pool(name="p", entries=[{"name": "a"}])

@kumo.on("get_queue_config")
def qc(domain, tenant, campaign, routing_domain):
    return kumo.make_queue_config(egress_pool="p", mx_list=[os.environ["TEST_SINK"]])
"""


def _kumopy(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kumopy", *args],
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.integration
def test_inject_command_line_file_stdin_and_generate(
    cluster: Cluster, make_policy: MakePolicy, tmp_path: Path
) -> None:
    coord, records = boot(cluster, make_policy, policy=make_policy(POLICY))
    ep = coord.info["endpoint"]
    eml = tmp_path / "m.eml"
    eml.write_bytes(b"Subject: from a file\r\n\r\nbody\r\n")
    out = _kumopy(
        "inject",
        str(eml),
        "--endpoint",
        ep,
        "--from",
        "s@src.test",
        "--to",
        "f1@dst.test",
        "--to",
        "f2@dst.test",
        "--tenant",
        "t1",
        "--campaign",
        "c1",
        "--meta",
        "list=weekly",
    )
    assert out.returncode == 0 and out.stdout.startswith("accepted "), out.stderr
    out = _kumopy(
        "inject", "--endpoint", ep, "--to", "stdin@dst.test", stdin=b"Subject: stdin\n\nbody\n"
    )
    assert out.returncode == 0, out.stderr
    out = _kumopy(
        "inject",
        "--endpoint",
        ep,
        "--generate",
        "250",
        "--size",
        "1024",
        "--domain",
        "gen.test",
        "--tenant",
        "t2",
        "--quiet",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("accepted 250, rejected 0") and "msg/s" in out.stdout
    out = _kumopy("inject", "--endpoint", ep, "--to", "bad\x01@dst.test", stdin=b"x\r\n")
    assert out.returncode == 1 and "control" in out.stderr
    recs = records.wait_count(252, 60)
    gen = {r["rcpt_to"][0] for r in recs if r["rcpt_to"][0].endswith("@gen.test")}
    assert gen == {f"user{i}@gen.test" for i in range(250)}
    first = next(r for r in recs if "f1@dst.test" in r["rcpt_to"])
    assert first["rcpt_to"] == ["f1@dst.test", "f2@dst.test"]
    receptions = [r for r in cluster.records(coord) if r["type"] == "Reception"]
    tagged = next(r for r in receptions if r["recipient"] == ["f1@dst.test", "f2@dst.test"])
    assert tagged["queue"] == "c1:t1@dst.test" and tagged["meta"]["list"] == "weekly"


@pytest.mark.integration
def test_async_client_and_status_command(cluster: Cluster, make_policy: MakePolicy) -> None:
    coord, records = boot(cluster, make_policy, policy=make_policy(POLICY))
    ep = coord.info["endpoint"]

    async def go() -> list[bool]:
        client = AsyncClient(ep)
        try:
            results = await asyncio.gather(
                *(
                    client.send("s@src.test", f"as{i}@dst.test", b"Subject: a\r\n\r\nx\r\n")
                    for i in range(20)
                )
            )
        finally:
            client.close()
        return [r.ok for r in results]

    assert asyncio.run(go()) == [True] * 20
    records.wait_count(20, 30)
    out = _kumopy("status", "--endpoint", ep)
    assert out.returncode == 0
    wait_for(
        lambda: (
            json.loads(_kumopy("status", "--endpoint", ep).stdout)["sources"]["a"]["delivered"]
            == 20
        ),
        30,
        "20 deliveries counted",
    )


@pytest.mark.integration
def test_metrics_endpoint_reports_per_source_counts(
    cluster: Cluster, make_policy: MakePolicy
) -> None:
    extra = ("--metrics", "127.0.0.1:0")
    coord, records = boot(cluster, make_policy, policy=make_policy(POLICY), extra=extra)
    with Client(coord.info["endpoint"]) as c:
        for i in range(5):
            assert c.send("s@src.test", f"m{i}@dst.test", b"Subject: m\r\n\r\nx\r\n").ok
        port = c.request("status")["metrics_port"]
    records.wait_count(5, 30)
    # No proxy: the metrics server is on loopback and nothing else may be reached.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def scrape() -> str | None:
        text: str = opener.open(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        want = 'kumopy_source_delivered_total{address="127.0.0.5",source="a"} 5.0'
        return text if want in text else None

    text = wait_for(scrape, 30, "metrics to show 5 deliveries")
    assert 'kumopy_pool_picks_total{pool="p",source="a"} 5.0' in text
    assert 'kumopy_source_up{address="127.0.0.5",source="a"} 1.0' in text
    assert "kumopy_log_write_failing 0.0" in text
    assert "kumopy_log_unwritten_records 0.0" in text


@pytest.mark.parametrize(
    ("endpoint", "allowed"),
    [
        ("tcp://127.0.0.1:2025", True),
        ("tcp://127.0.0.9:*", True),
        ("tcp://[::1]:2025", True),
        ("tcp://localhost:2025", True),
        ("ipc:///run/kumopy/ingress", True),
        ("tcp://0.0.0.0:2025", False),
        ("tcp://192.0.2.1:2025", False),
        ("tcp://mail.example.com:2025", False),
    ],
)
def test_non_loopback_ingress_needs_explicit_permission(endpoint: str, allowed: bool) -> None:
    if allowed:
        check_listen_endpoint(endpoint, allow_remote=False)
    else:
        with pytest.raises(ConfigError, match="--allow-remote-ingress"):
            check_listen_endpoint(endpoint, allow_remote=False)
        check_listen_endpoint(endpoint, allow_remote=True)


@pytest.mark.integration
def test_run_refuses_a_public_listen_address_before_starting(tmp_path: Path) -> None:
    out = _kumopy(
        "run",
        "--listen",
        "tcp://0.0.0.0:2025",
        "--spool",
        str(tmp_path / "s"),
        "--log-dir",
        str(tmp_path / "l"),
    )
    assert out.returncode == 2 and "--allow-remote-ingress" in out.stderr


@pytest.mark.integration
def test_run_reports_every_config_error_and_exits_2(tmp_path: Path) -> None:
    policy = tmp_path / "bad.py"
    policy.write_text(
        "from kumopy import kumo\n"
        "kumo.on('init', lambda: (kumo.define_egress_source(name='x', source_address='mx.test'),"
        " kumo.define_egress_pool(name='p', entries=[{'name': 'nope'}])))\n"
    )
    out = _kumopy("run", str(policy), "--spool", str(tmp_path / "s"))
    assert out.returncode == 2
    assert "IP literal" in out.stderr and "unknown source 'nope'" in out.stderr
    assert not (tmp_path / "s").exists()  # nothing half-started


# Every verb of the command line. check-config and sink are parsed by their own modules:
# main() hands them their arguments before the parser, which lists them for --help only.
SUBCOMMANDS = {
    "run",
    "worker",
    "zygote",
    "resolver",
    "status",
    "inject",
    "demo",
    "bench",
    "check-config",
    "sink",
    "logs",
    "queues",
    "suspend",
    "resume",
    "bounce",
    "rebind",
    "reload",
    "ping",
}


def _main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int | str | None, str]:
    """Run kumopy's main() in-process; return its exit status and stdout."""
    try:
        status: int | str | None = cli.main(list(argv))
    except SystemExit as exc:
        status = exc.code
    return status, capsys.readouterr().out


def test_cli_lists_its_subcommands(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (sub,) = [a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(sub.choices) == SUBCOMMANDS
    helps = {a.dest: a.help for a in sub._choices_actions}
    assert set(helps) == SUBCOMMANDS and all(helps.values()), helps
    monkeypatch.setenv("COLUMNS", "200")  # one line per subcommand, whatever the terminal
    status, out = _main(capsys, "--help")
    assert status == 0
    for name, text in helps.items():
        assert text is not None
        line = rf"^ +{re.escape(name)} +{re.escape(text)}$"
        assert re.search(line, out, re.MULTILINE), f"kumopy --help lacks {name}: {text}"
    for name in ("check-config", "sink"):
        status, out = _main(capsys, name, "--help")
        assert status == 0 and out.startswith(f"usage: kumopy {name} "), out


def _modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(kumopy.__path__, "kumopy."):
        if info.name.endswith(("_c", "__main__")) or ".examples" in info.name:
            continue
        names.append(info.name)
    return sorted(names)


@pytest.mark.integration
@pytest.mark.parametrize("module", _modules())
def test_every_module_imports_alone_without_warnings(module: str) -> None:
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", f"import {module}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(
    "module",
    [m for m in _modules() if not m.rsplit(".", 1)[-1].startswith("_") or m == "kumopy._fast"],
)
def test_every_public_module_declares_all(module: str) -> None:
    mod = importlib.import_module(module)
    names = getattr(mod, "__all__", None)
    assert isinstance(names, list | tuple), f"{module} has no __all__"
    for name in names:
        assert hasattr(mod, name), f"{module}.__all__ names missing {name!r}"


@pytest.mark.integration
def test_systemd_notifications(cluster: Cluster, make_policy: MakePolicy, tmp_path: Path) -> None:
    import socket

    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(30)
    try:
        env = {"NOTIFY_SOCKET": str(path)}
        coord, _ = boot(cluster, make_policy, policy=make_policy(POLICY), env=env)
        seen: list[str] = []

        def until(state: str) -> None:
            while state not in seen:
                seen.append(sock.recv(4096).decode())

        until("READY=1")  # sent once every worker said Ready
        until("WATCHDOG=1")
        assert coord.stop() == 0
        until("STOPPING=1")
        assert seen.index("READY=1") < seen.index("STOPPING=1")
    finally:
        sock.close()
