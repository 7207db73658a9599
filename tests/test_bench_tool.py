"""`kumopy bench`: its arithmetic and report alone, then whole runs into both sinks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kumopy.benchcli import parse_list
from kumopy.benchpolicy import expected_shares, source_address, synthetic_policy
from kumopy.benchreport import chart_sources, format_report, format_sweep, human_seconds
from kumopy.benchsink import find_tool
from kumopy.benchstats import Samples, cpu_per_message, log_figures, percentile, record_time
from kumopy.cli import parse_size
from kumopy.policy import load_policy

# -- the pure parts -------------------------------------------------------------------------


def test_percentile_interpolates_between_ranks() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 100.0
    assert percentile([3.0], 99) == 3.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_sizes_and_lists_parse() -> None:
    assert parse_size("2k") == 2048
    assert parse_size("100k") == 102400
    assert parse_size("2048") == 2048
    assert parse_list("1,4,16") == [1, 4, 16]
    assert parse_list("2k,100k", parse_size) == [2048, 102400]


def test_synthetic_addresses_run_through_loopback() -> None:
    assert source_address(0) == "127.0.0.2"
    assert source_address(252) == "127.0.0.254"
    assert source_address(253) == "127.0.1.1"
    assert source_address(253 + 253) == "127.0.1.254"
    assert source_address(253 + 254) == "127.0.2.1"
    addresses = {source_address(i) for i in range(2000)}
    assert len(addresses) == 2000
    assert not any(a.endswith((".0", ".255")) for a in addresses)


def test_expected_shares_follow_weights_and_pool_traffic(tmp_path: Path) -> None:
    path = tmp_path / "policy.py"
    path.write_text(synthetic_policy([1, 2, 1]))
    config = load_policy(path).config
    shares = expected_shares(config, {"bench": {"bench1": 10, "bench2": 20, "bench3": 10}})
    assert shares == pytest.approx({"bench1": 0.25, "bench2": 0.5, "bench3": 0.25})


def _rec(kind: str, msg: str, t: float, source: str | None = None, precise: bool = True) -> Any:
    rec: dict[str, Any] = {"type": kind, "id": msg, "timestamp": int(t), "egress_source": source}
    if precise:
        seconds = int(t)
        micros = round((t - seconds) * 1e6)
        rec["event_time"] = f"2026-01-01T00:00:{seconds:02d}.{micros:06d}Z"
    return rec


def test_log_figures_count_per_source_and_measure_latency() -> None:
    records = [
        _rec("Reception", "a", 1.0),
        _rec("Reception", "b", 1.5),
        _rec("Reception", "c", 2.0),
        _rec("Delivery", "a", 1.25, "s1"),
        _rec("Delivery", "b", 2.0, "s2"),
        _rec("Delivery", "c", 3.0, "s1"),
        {"type": "TransientFailure", "id": "d", "timestamp": 3},
    ]
    f = log_figures(records)
    assert f["clock"] == "event_time"
    assert f["delivered"] == 3
    assert f["per_source"]["s1"]["delivered"] == 2
    assert f["per_source"]["s1"]["last"] - f["per_source"]["s1"]["first"] == pytest.approx(1.75)
    assert f["latency"]["p50"] == pytest.approx(0.5)
    assert f["latency"]["max"] == pytest.approx(1.0)
    assert f["other_records"] == {"TransientFailure": 1}
    assert record_time({"timestamp": 7}) == (7.0, "timestamp")
    coarse = log_figures([_rec("Reception", "a", 1.0, precise=False)])
    assert coarse["clock"] == "timestamp"


def test_samples_span_is_good_to_a_poll() -> None:
    s = Samples()
    for t, n in [(0.0, 0), (0.1, 0), (0.2, 5), (0.3, 9), (0.4, 10), (0.5, 10)]:
        s.add(t, {"s1": {"delivered": n}, "s2": {"delivered": 0}})
    assert s.span("s1") == pytest.approx(0.35 - 0.15)
    assert s.span("s2") is None


def test_cpu_per_message_by_kind() -> None:
    before = {"coordinator": {1: 1.0}, "workers": {2: 0.5, 3: 0.5}, "sink": {4: 0.0}}
    after = {"coordinator": {1: 2.0}, "workers": {2: 1.0}, "sink": {4: 0.5}}
    cpu = cpu_per_message(before, after, 1000, {"injectors": 0.25})
    per = cpu["us_per_msg"]
    assert per == pytest.approx(
        {"coordinator": 1000.0, "workers": 500.0, "sink": 500.0, "injectors": 250.0}
    )
    assert cpu["processes_missing"] == [3]  # a worker gone mid-run is named, not guessed
    assert cpu["total_us_per_msg"] == pytest.approx(2250.0)


def _result(clock: str = "timestamp") -> dict[str, Any]:
    source = {
        "name": "bench1",
        "address": "127.0.0.2",
        "weights": {"bench": 1},
        "expected_share": 1.0,
        "delivered": 300,
        "share": 1.0,
        "rate": 1234.5,
        "alone_rate": None,
    }
    return {
        "policy_label": "1 synthetic source",
        "count": 300,
        "size": 2048,
        "injectors": 2,
        "fsync": True,
        "spool_fs": "ext4",
        "sink": "kumopy",
        "workers": 2,
        "startup_seconds": 0.8,
        "injection": {"accepted": 300, "rejected": 0, "seconds": 0.05, "rate": 6000.0},
        "delivered": 300,
        "seconds": 0.25,
        "rate": 1200.0,
        "ceiling": {
            "sessions": 32,
            "rate": 12000.0,
            "cpu_us_per_msg": {"smtp-source": 40.0, "sink": 30.0},
        },
        "ratio": 0.1,
        "latency": {"messages": 300, "p50": 0.1, "p99": 0.2, "max": 0.3},
        "clock": clock,
        "span_from": "status polls every 0.1s",
        "other_records": {},
        "failures": {},
        "sources": [source],
        "cpu": {"us_per_msg": {"coordinator": 70.0, "workers": 80.0}, "total_us_per_msg": 150.0},
    }


def test_report_shows_the_table_and_says_where_times_come_from() -> None:
    text = format_report(_result())
    assert "source  address" in text
    assert "bench1  127.0.0.2" in text
    assert "1,234/s" in text
    assert "kumopy / ceiling = 0.10" in text
    assert "no event_time" in text
    assert "no event_time" not in format_report(_result("event_time"))
    assert human_seconds(0.25) == "250 ms"
    assert human_seconds(2.5) == "2.50 s"


def test_sweep_table_keeps_a_failed_point() -> None:
    ok = {**_result(), "sources_n": 1}
    text = format_sweep([ok, {"sources_n": 256, "size": 2048, "error": "timed out"}])
    assert "FAILED 256 sources, 2,048 B: timed out" in text
    assert "1,200/s" in text


def test_chart_is_skipped_without_matplotlib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("kumopy.benchreport._pyplot", lambda: None)
    assert chart_sources(_result(), tmp_path / "c.png") is None
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "c.png").exists()


def test_chart_is_drawn_with_matplotlib(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = chart_sources(_result(), tmp_path / "c.png")
    assert path is not None and path.read_bytes()[:4] == b"\x89PNG"


# -- whole runs -----------------------------------------------------------------------------


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A work directory with a short path: the coordinator's ipc sockets must fit 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="kb"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _bench(tmp_path: Path, workdir: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "kumopy", "bench", *args, "--quiet", "--out", str(out)]
    cmd += ["--workdir", str(workdir), "--timeout", "60"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Per source" in done.stdout
    (path,) = out.glob("bench-*.json")
    result: dict[str, Any] = json.loads(path.read_text())
    return result


def _alive(pid: int) -> bool:
    """Return True if `pid` still runs as one of ours (not a zombie, not a reused pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    state = stat[stat.rindex(")") + 2]
    return state != "Z" and (b"kumopy" in cmdline or b"smtp-sink" in cmdline)


def _check(r: dict[str, Any], count: int, weights: list[int], workdir: Path) -> None:
    rows = r["sources"]
    assert sum(s["delivered"] for s in rows) == count == r["delivered"]
    total = sum(weights)
    # Smooth weighted round robin is exact while no source reaches --max-ready (1024).
    for s, w in zip(rows, weights, strict=True):
        assert s["expected_share"] == pytest.approx(w / total)
        assert s["share"] == pytest.approx(w / total, abs=0.02)
    lat = r["latency"]
    assert lat["messages"] == count
    assert lat["p50"] is not None and lat["p99"] is not None and lat["p50"] <= lat["p99"]
    per = r["cpu"]["us_per_msg"]
    for kind in ("coordinator", "workers", "sink", "injectors"):
        assert per[kind] is not None and per[kind] >= 0
    assert r["injection"]["accepted"] == count and r["injection"]["rate"] > 0
    assert r["startup_seconds"] > 0
    if find_tool("smtp-source"):
        assert r["ratio"] == pytest.approx(r["rate"] / r["ceiling"]["rate"])
    pids = [*r["all_pids"], r["sink_pid"]]
    assert len(pids) >= 2 + len(rows)
    assert not [p for p in pids if _alive(p)], "processes left behind"
    assert not list(workdir.glob("kumopy-bench-*")), "work files left behind without --keep"


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_bench_each_source_alone_into_kumopys_sink(tmp_path: Path, short_dir: Path) -> None:
    args = ["--sources", "3", "--weights", "1,2,3", "--count", "300", "--each"]
    r = _bench(tmp_path, short_dir, *args, "--sink", "kumopy")
    assert r["sink"] == "kumopy"
    _check(r, 300, [1, 2, 3], short_dir)
    for s in r["sources"]:
        assert s["alone_rate"] is not None and s["alone_rate"] > 0
    assert set(r["each"]) == {"bench1", "bench2", "bench3"}


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.skipif(find_tool("smtp-sink") is None, reason="Postfix's smtp-sink is not installed")
def test_bench_your_policy_into_smtp_sink(tmp_path: Path, short_dir: Path) -> None:
    policy = tmp_path / "mine.py"
    # Its get_queue_config names a real MX host: --route-all-to must win over it.
    policy.write_text(
        "from kumopy import kumo\n"
        "@kumo.on('init')\n"
        "def init():\n"
        "    kumo.define_egress_source(name='a', source_address='127.0.0.5', ehlo_domain='a.t')\n"
        "    kumo.define_egress_source(name='b', source_address='127.0.0.6', ehlo_domain='b.t')\n"
        "    entries = [{'name': 'a'}, {'name': 'b', 'weight': 3}]\n"
        "    kumo.define_egress_pool(name='p', entries=entries)\n"
        "@kumo.on('get_queue_config')\n"
        "def qc(domain, tenant, campaign, routing_domain):\n"
        "    return kumo.make_queue_config(egress_pool='p', mx_list=['192.0.2.1:25'])\n"
    )
    r = _bench(tmp_path, short_dir, str(policy), "--count", "300", "--sink", "smtp-sink")
    assert r["sink"] == "smtp-sink"
    _check(r, 300, [1, 3], short_dir)
    assert [s["address"] for s in r["sources"]] == ["127.0.0.5", "127.0.0.6"]


def test_bench_needs_a_policy_or_sources(capsys: pytest.CaptureFixture[str]) -> None:
    from kumopy.cli import main

    assert main(["bench", "--count", "1"]) == 1
    assert "give your policy file, or --sources N" in capsys.readouterr().err
