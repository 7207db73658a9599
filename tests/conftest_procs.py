"""Fixtures that run the real thing: a sink process and coordinator processes, stopped by PID.

Only tests marked `integration` may start processes: the guard here fails any other that tries.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kumopy.harness import Proc, SinkRecords, read_log_records, start_coordinator, start_sink

__all__ = ["Cluster", "MakePolicy", "fill", "policy_file", "require_integration", "tmpfs"]

MakePolicy = Callable[[str], str]
"""The `make_policy` fixture: write a policy snippet to a file, return its path."""

# Test files that start processes and are not ours to mark yet (their owners are editing
# them): the guard below lets them through. Empty this once they carry the marker.


def require_integration(item: pytest.Item, what: str) -> None:
    """Fail the test unless it is marked integration, so that `-m "not integration"` stays fast."""
    if item.get_closest_marker("integration") is None:
        pytest.fail(
            f"{item.nodeid} starts {what} but is not marked integration: add "
            "@pytest.mark.integration (or pytestmark = pytest.mark.integration in its module)",
            pytrace=False,
        )


@pytest.fixture(autouse=True)
def _processes_need_the_integration_marker(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Make any subprocess an unmarked test starts fail it (kumopy, sinks, python -c, ...)."""
    item = request.node
    assert isinstance(item, pytest.Item)
    if item.get_closest_marker("integration") is not None:
        return
    init = subprocess.Popen.__init__

    def guarded(self: subprocess.Popen[Any], args: Any, *rest: Any, **kwargs: Any) -> None:
        words = [args] if isinstance(args, str | bytes | os.PathLike) else list(args)
        require_integration(item, f"a process ({' '.join(map(str, words[:4]))} ...)")
        init(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded)


def policy_file(path: Path, body: str) -> str:
    """Write a policy file from an indented snippet and return its path."""
    path.write_text("from kumopy import kumo\n\n" + textwrap.dedent(body))
    return str(path)


class Cluster:
    """One test's processes: sinks and coordinators, all stopped at teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[Proc] = []

    def sink(
        self,
        name: str = "sink",
        host: str = "127.0.0.1",
        raw: bool = False,
        extra: tuple[str, ...] = (),
    ) -> tuple[Proc, SinkRecords]:
        """Start a sink; return it and a reader of its records."""
        proc = start_sink(self.tmp / name, host=host, raw=raw, extra=extra)
        self.procs.append(proc)
        return proc, SinkRecords(proc.info["record"])

    def coordinator(
        self,
        policy: str | None,
        *,
        name: str = "coord",
        sources: tuple[str, ...] = (),
        extra: tuple[str, ...] = (),
        workdir: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> Proc:
        """Start a coordinator and wait until its workers are ready."""
        proc = start_coordinator(
            workdir or self.tmp / name,
            policy,
            sources,
            extra=["--log-level", "INFO", *extra],
            env=env,
        )
        self.procs.append(proc)
        return proc

    def records(self, coord: Proc) -> list[dict[str, Any]]:
        """Return every log record the coordinator wrote so far."""
        return read_log_records(coord.info["log_dir"])

    def stop_all(self) -> None:
        """Stop every process this test started, coordinators first."""
        for proc in sorted(self.procs, key=lambda p: p.name != "coordinator"):
            proc.stop(timeout=30)


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    """Give a test a Cluster whose processes are stopped by PID afterwards."""
    assert isinstance(request.node, pytest.Item)
    require_integration(request.node, "processes (the cluster fixture)")
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop_all()


@pytest.fixture
def make_policy(tmp_path: Path) -> MakePolicy:
    """Write a policy snippet to a file and return its path."""
    counter = iter(range(1000))

    def make(body: str) -> str:
        return policy_file(tmp_path / f"policy{next(counter)}.py", body)

    return make


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mount small tmpfs file systems (to fill them up); unmounted afterwards. Needs root."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        point = tmp_path / f"tmpfs{len(mounted)}"
        point.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], check=True
        )
        mounted.append(point)
        return point

    try:
        yield mount
    finally:
        for point in reversed(mounted):
            subprocess.run(["umount", "-l", str(point)], check=False)


def fill(fs: Path) -> Path:
    """Fill a file system to the last block; return the filler file to delete later."""
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            block = b"\0" * size
            try:
                while True:
                    os.write(fd, block)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler
