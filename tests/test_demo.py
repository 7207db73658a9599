"""`kumopy demo`, the README's main job, end to end in a process of its own."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.integration
def test_the_demo_delivers_everything_and_reports_each_sources_own_rate(tmp_path: Path) -> None:
    demo = str(tmp_path / "demo")
    out = subprocess.run(
        [sys.executable, "-m", "kumopy", "demo", "--count", "600", "--quiet", "--workdir", demo],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "delivered 600 of 600" in out
    rows = {
        m["source"]: m
        for m in re.finditer(
            r"^(?P<source>mta\d)\s+(?P<n>\d+)\s+\S+%\s+(?P<rate>[\d,]+/s|-)\s+(?P<ip>\S+)\s+(?P<ehlo>\S+)$",
            out,
            re.MULTILINE,
        )
    }
    assert set(rows) == {"mta1", "mta2", "mta3"}, out
    assert sum(int(r["n"]) for r in rows.values()) == 600
    for name, row in rows.items():
        assert row["ehlo"] == f"{name}.demo.kumopy.test"
        assert row["ip"] == f"127.0.0.{int(name[-1]) + 1}"
    # Each source's rate is over its own first-to-last delivery at the sink, not its count
    # over the whole run (which would only restate its share).
    times: dict[str, list[float]] = {}
    for line in (tmp_path / "demo" / "sink" / "sink.jsonl").read_text().splitlines():
        rec = json.loads(line)
        times.setdefault(rec["peer_ip"], []).append(rec["time"])
    assert "its rate" in out
    for row in rows.values():
        t = times[row["ip"]]
        want = f"{(len(t) - 1) / (max(t) - min(t)):,.0f}/s" if len(t) > 1 else "-"
        assert row["rate"] == want, (row["source"], row["rate"], want)
