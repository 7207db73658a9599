"""The benchmark's sink (Postfix's smtp-sink, else kumopy's) and its smtp-source ceiling."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from kumopy.errors import KumoError
from kumopy.harness import Proc, start_sink, wait_for

__all__ = [
    "CEILING_SESSIONS",
    "cpu_seconds",
    "find_tool",
    "free_port",
    "run_ceiling",
    "start_bench_sink",
]

CEILING_SESSIONS = 32
"""smtp-source's parallel sessions for the ceiling (what bench/throughput always used)."""
_SINK_BACKLOG = 4096
_HELO = "bench.kumopy.test"
"""Given to smtp-source (-M) so that it never looks the machine's own name up."""


def find_tool(name: str) -> str | None:
    """Return the path of a Postfix test tool (smtp-sink, smtp-source), or None."""
    found = shutil.which(name)
    if found:
        return found
    path = Path("/usr/sbin") / name
    return str(path) if path.exists() else None


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port free on `host` right now (smtp-sink cannot bind port 0 and tell)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float | None:
    """Return a live process's user + system CPU seconds from /proc, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            text = fh.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: the fields start after the last ')'.
    fields = text[text.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _greets(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0) as s:
            return s.recv(4).startswith(b"220")
    except OSError:
        return False


def _start_smtp_sink(tool: str, host: str, sessions: int) -> Proc:
    last = ""
    for _ in range(5):  # the free port may be taken between our probe and smtp-sink's bind
        port = free_port(host)
        # As root smtp-sink insists on dropping its privileges after binding (-u).
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        cmd = [tool, *user, "-m", str(sessions), f"{host}:{port}", str(_SINK_BACKLOG)]
        popen = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        proc = Proc(popen, "smtp-sink", {"host": host, "port": port, "kind": "smtp-sink"})

        def up(proc: Proc = proc, port: int = port) -> bool:
            return not proc.alive() or _greets(host, port)

        wait_for(up, 15, "smtp-sink to listen")
        if proc.alive():
            assert popen.stderr is not None
            popen.stderr.close()
            return proc
        assert popen.stderr is not None
        last = popen.stderr.read().decode(errors="replace").strip()
    raise KumoError(f"smtp-sink would not start: {last}")


def start_bench_sink(workdir: Path, kind: str = "auto", sessions: int = 4096) -> Proc:
    """Start the sink on 127.0.0.1: smtp-sink (`auto` when installed) or kumopy's own.

    `sessions` is how many connections smtp-sink serves at once (its -m); more wait in the
    listen queue, which would measure the sink's limit rather than kumopy's.
    """
    tool = find_tool("smtp-sink") if kind in ("auto", "smtp-sink") else None
    if kind == "smtp-sink" and tool is None:
        raise KumoError("--sink smtp-sink: smtp-sink is not installed (Debian: postfix)")
    if tool is not None:
        return _start_smtp_sink(tool, "127.0.0.1", sessions)
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "sink.stderr", "wb") as err:  # the child keeps its own descriptor
        proc = start_sink(workdir, "127.0.0.1", stderr=err)
    proc.info["kind"] = "kumopy"
    return proc


def run_ceiling(sink: Proc, count: int, size: int, timeout: float) -> dict[str, Any] | None:
    """Send `count` messages of `size` bytes with smtp-source (C, 32 sessions) into the sink.

    Return its rate and the CPU per message of smtp-source and of the sink, or None when
    smtp-source is not installed.
    """
    tool = find_tool("smtp-source")
    if tool is None:
        return None
    cmd = [
        tool,
        *("-s", str(CEILING_SESSIONS), "-m", str(count), "-l", str(size), "-d"),
        *("-M", _HELO, "-f", f"s@{_HELO}", "-t", f"r@{_HELO}"),
        f"{sink.info['host']}:{sink.info['port']}",
    ]
    sink_before = cpu_seconds(sink.pid) or 0.0
    t0 = time.perf_counter()
    popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    # wait4, not Popen.wait: it also gives smtp-source's own CPU time.
    while True:
        pid, status, usage = os.wait4(popen.pid, os.WNOHANG)
        if pid:
            popen.returncode = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() > deadline:
            popen.kill()
            popen.wait()
            raise KumoError(f"smtp-source did not finish {count} messages in {timeout:.0f}s")
        time.sleep(0.01)
    secs = time.perf_counter() - t0
    sink_cpu = (cpu_seconds(sink.pid) or sink_before) - sink_before
    if popen.returncode != 0:
        raise KumoError(f"smtp-source exited with {popen.returncode}")
    return {
        "tool": "smtp-source",
        "sessions": CEILING_SESSIONS,
        "messages": count,
        "seconds": secs,
        "rate": count / secs,
        "cpu_us_per_msg": {
            "smtp-source": 1e6 * (usage.ru_utime + usage.ru_stime) / count,
            "sink": 1e6 * sink_cpu / count,
        },
    }
