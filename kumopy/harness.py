"""Start and stop a coordinator and a sink as real processes (the demo, benchmarks, tests)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from kumopy.errors import KumoError
from kumopy.ipc.control import default_control_endpoint

__all__ = [
    "Proc",
    "SinkRecords",
    "read_log_records",
    "start_coordinator",
    "start_sink",
    "wait_for",
]


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll `cond` until it returns something truthy; raise naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise KumoError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Proc:
    """A child process we started, stopped by its PID."""

    popen: subprocess.Popen[bytes]
    name: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        """Return the process id."""
        return self.popen.pid

    def alive(self) -> bool:
        """Return True while the process runs."""
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        """Send `sig` if the process still runs."""
        if self.alive():
            os.kill(self.pid, sig)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait up to `timeout`, then SIGKILL; return the exit code."""
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            return self.popen.wait(10)


def _python() -> list[str]:
    return [sys.executable, "-m", "kumopy"]


def start_sink(
    workdir: Path,
    host: str = "127.0.0.1",
    raw: bool = False,
    extra: Sequence[str] = (),
    stderr: IO[bytes] | None = None,
    prefix: Sequence[str] = (),
) -> Proc:
    """Start the SMTP sink on a free port; its records go to workdir/sink.jsonl.

    `prefix` runs it under another command, e.g. ``ip netns exec NAME``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / "sink.port"
    port_file.unlink(missing_ok=True)
    record = workdir / "sink.jsonl"
    cmd = [
        *prefix,
        *_python(),
        "sink",
        "--listen",
        f"[{host}]:0" if ":" in host else f"{host}:0",
        "--port-file",
        str(port_file),
        "--record",
        str(record),
    ]
    if raw:
        cmd.append("--raw")
    cmd.extend(extra)
    popen = subprocess.Popen(cmd, stderr=stderr)
    proc = Proc(popen, "sink")

    def ready() -> str | None:
        if not proc.alive():
            raise KumoError(f"sink exited with {popen.returncode}")
        text = port_file.read_text().strip() if port_file.exists() else ""
        return text or None

    port = int(wait_for(ready, 30, "the sink to listen"))
    proc.info.update(port=port, host=host, record=record)
    return proc


def start_coordinator(
    workdir: Path,
    policy: str | None,
    sources: Sequence[str] = (),
    extra: Sequence[str] = (),
    env: dict[str, str] | None = None,
    stderr: IO[bytes] | None = None,
    timeout: float = 60.0,
    prefix: Sequence[str] = (),
    listen: str = "tcp://127.0.0.1:*",
) -> Proc:
    """Start `kumopy run` on a free port and wait until every worker said Ready."""
    workdir.mkdir(parents=True, exist_ok=True)
    ready_file = workdir / "coordinator.ready"
    ready_file.unlink(missing_ok=True)
    cmd = [*prefix, *_python(), "run"]
    if policy:
        cmd.append(policy)
    for s in sources:
        cmd += ["--sources", s]
    cmd += [
        "--listen",
        listen,
        "--ready-file",
        str(ready_file),
        "--spool",
        str(workdir / "spool"),
        "--log-dir",
        str(workdir / "log"),
        *extra,
    ]
    popen = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stderr=stderr)
    proc = Proc(popen, "coordinator")

    def ready() -> str | None:
        if not proc.alive():
            raise KumoError(f"coordinator exited with {popen.returncode}")
        return ready_file.read_text().strip() if ready_file.exists() else None

    try:
        proc.info["endpoint"] = wait_for(ready, timeout, "the coordinator and its workers")
    except BaseException:
        proc.stop()  # a start that failed leaves no coordinator (and so no worker) behind
        raise
    proc.info["log_dir"] = workdir / "log"
    control = next((extra[i + 1] for i, a in enumerate(extra[:-1]) if a == "--control"), None)
    proc.info["control"] = control or default_control_endpoint(workdir / "spool")
    return proc


class SinkRecords:
    """Read the sink's JSON-lines record file incrementally."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        self._offset = 0
        self._partial = b""

    def refresh(self) -> list[dict[str, Any]]:
        """Read records appended since the last call; return all of them."""
        if not self.path.exists():
            return self.records
        with open(self.path, "rb") as fh:
            fh.seek(self._offset)
            chunk = fh.read()
        self._offset += len(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()
        self.records.extend(json.loads(line) for line in lines if line.strip())
        return self.records

    def wait_count(self, n: int, timeout: float) -> list[dict[str, Any]]:
        """Wait until at least `n` records exist."""
        wait_for(lambda: len(self.refresh()) >= n, timeout, f"{n} messages at the sink")
        return self.records


def read_log_records(log_dir: Path) -> list[dict[str, Any]]:
    """Read every JSON record the coordinator wrote to `log_dir` (plain and zstd segments)."""
    from kumopy.logread import read_records

    return [rec for rec, _line in read_records(log_dir)]
