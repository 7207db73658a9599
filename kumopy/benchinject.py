"""The benchmark's injector processes: each its own ZeroMQ client, started together on "go"."""

from __future__ import annotations

import argparse
import json
import resource
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import IO, Any

from kumopy.errors import KumoError

__all__ = ["InjectPlan", "Injectors", "main"]


@dataclass(frozen=True, slots=True)
class InjectPlan:
    """What every injector sends: its share of `count` messages of `size` bytes."""

    count: int
    size: int
    domain: str
    tenants: tuple[str, ...] = ()
    campaign: str | None = None
    batch: int = 100
    window: int = 8


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Injectors:
    """K injector processes, started ready and released together (a separate GIL each)."""

    def __init__(self, endpoint: str, plan: InjectPlan, k: int) -> None:
        k = max(1, min(k, plan.count))
        self.procs: list[subprocess.Popen[bytes]] = []
        self._reports: list[dict[str, Any]] | None = None
        for i in range(k):
            share = plan.count // k + (1 if i < plan.count % k else 0)
            cmd = [sys.executable, "-m", "kumopy.benchinject", endpoint, str(share)]
            cmd += [str(plan.size), plan.domain, "--campaign", plan.campaign or ""]
            cmd += ["--tenants", ",".join(plan.tenants)]
            cmd += ["--batch", str(plan.batch), "--window", str(plan.window)]
            self.procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE))

    @property
    def pids(self) -> list[int]:
        """Return the injectors' process ids."""
        return [p.pid for p in self.procs]

    def _line(self, p: subprocess.Popen[bytes]) -> bytes:
        assert p.stdout is not None
        line = p.stdout.readline()
        if not line:
            raise KumoError(f"injector {p.pid} exited with {p.wait()} before answering")
        return line

    def start(self, timeout: float) -> float:
        """Wait until every injector is connected, then release them all; return the time."""
        deadline = time.monotonic() + timeout
        for p in self.procs:
            left = max(0.0, deadline - time.monotonic())
            assert p.stdout is not None
            if not select.select([p.stdout], [], [], left)[0]:
                raise KumoError(f"injector {p.pid} not ready after {timeout:.0f}s")
            if self._line(p).strip() != b"ready":
                raise KumoError(f"injector {p.pid} did not say ready")
        t = time.time()
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write(b"go\n")
            p.stdin.flush()
        return t

    def results(self, timeout: float) -> list[dict[str, Any]]:
        """Return each injector's report: accepted, rejected, start, end, cpu, reasons."""
        if self._reports is not None:
            return self._reports
        deadline = time.monotonic() + timeout
        out = []
        for p in self.procs:
            left = max(0.1, deadline - time.monotonic())
            try:
                p.wait(left)
            except subprocess.TimeoutExpired:
                raise KumoError(f"injector {p.pid} still runs after {timeout:.0f}s") from None
            out.append(json.loads(self._line(p)))
        self._reports = out
        return out

    def stop(self) -> None:
        """Kill every injector still running and reap it (an error or Ctrl-C got here)."""
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            for fh in (p.stdin, p.stdout):
                if fh is not None:
                    fh.close()


def _say(out: IO[str], text: str) -> None:
    out.write(text + "\n")
    out.flush()


def main(argv: list[str] | None = None) -> int:
    """Run one injector: connect, say ready, wait for go, inject, print a JSON report."""
    from kumopy.client import Client
    from kumopy.inject import generate_messages, inject_many
    from kumopy.parent import die_with_parent

    # Ctrl-C reaches the whole process group: the bench cleans up, an injector just ends;
    # and an injector never outlives a bench that was killed.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    die_with_parent(signal.SIGKILL)

    p = argparse.ArgumentParser(prog="python -m kumopy.benchinject", description=__doc__)
    p.add_argument("endpoint")
    p.add_argument("count", type=int)
    p.add_argument("size", type=int)
    p.add_argument("domain")
    p.add_argument("--campaign", default="")
    p.add_argument("--tenants", default="")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--window", type=int, default=8)
    args = p.parse_args(argv)
    tenants = [t for t in args.tenants.split(",") if t] or None
    with Client(args.endpoint, timeout=120) as client:
        client.request("ping")  # connected and answered: what "ready" promises
        msgs = generate_messages(
            args.count,
            args.size,
            args.domain,
            f"bench@{args.domain}",
            None,
            args.campaign or None,
            {},
            tenants=tenants,
        )
        _say(sys.stdout, "ready")
        if sys.stdin.readline().strip() != "go":
            return 1
        cpu0, start = _cpu(), time.time()
        ok, bad, _, reasons = inject_many(
            client, msgs, args.count, args.batch, args.window, progress=False
        )
        end, cpu = time.time(), _cpu() - cpu0
    report = {"accepted": ok, "rejected": bad, "start": start, "end": end, "cpu": cpu}
    _say(sys.stdout, json.dumps({**report, "reasons": reasons}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
