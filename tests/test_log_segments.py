"""Log segments: zstd compression off the loop, leftovers of a crash, publishing, reading back."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
import zstandard

from kumopy.cli import build_parser, main
from kumopy.coordinator.logs import LogWriter, compress_segment, response_dict
from kumopy.harness import wait_for
from kumopy.logread import (
    Filter,
    follow_records,
    format_record,
    parse_time,
    read_records,
    segment_lines,
    segments,
)


def _record(i: int, kind: str = "Delivery", t: float = 1_795_000_000.0) -> dict[str, Any]:
    return {
        "type": kind,
        "id": f"m{i}",
        "queue": "q1" if i % 2 else "q2",
        "egress_source": "a" if i % 3 else "b",
        "timestamp": int(t + i),
        "event_time": f"2026-11-18T11:06:{40 + i:02d}.500000Z",
        "response": response_dict(250, "2.0.0", "ok", "."),
    }


def _names(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def test_rotated_segments_are_compressed_in_the_background(tmp_path: Path) -> None:
    logs = LogWriter(tmp_path, nodeid="n1", max_bytes=400, compress=True)
    for i in range(30):
        logs.write(_record(i))
    logs.flush()
    assert logs.path is not None
    current = logs.path.name

    def only_the_current_is_plain() -> bool:
        names = _names(tmp_path)
        return [n for n in names if not n.endswith(".jsonl.zst")] == [current]

    wait_for(only_the_current_is_plain, 30, "the closed segments to be compressed")
    logs.close()  # the last segment too, before close() returns
    names = _names(tmp_path)
    assert len(names) > 3 and all(n.endswith(".jsonl.zst") for n in names)
    assert [r["id"] for r, _ in read_records(tmp_path)] == [f"m{i}" for i in range(30)]
    with open(tmp_path / names[0], "rb") as fh:  # a standard zstd frame, checksummed
        assert zstandard.get_frame_parameters(fh.read(18)).has_checksum


def test_a_crash_leaves_plain_segments_that_the_next_start_compresses(tmp_path: Path) -> None:
    me, parent = os.getpid(), os.getppid()  # this process's old segments, a live writer's
    old = tmp_path / f"20260101-000000-{me}-0001.jsonl"
    old.write_bytes(b'{"type":"Delivery","id":"old"}\n{"type":"Deliv')  # torn by the crash
    live = tmp_path / f"20260101-000003-{parent}-0001.jsonl"
    live.write_bytes(b'{"type":"Delivery","id":"live"}\n')
    twin = tmp_path / f"20260101-000001-{me}-0002.jsonl"
    twin.write_bytes(b'{"type":"Delivery","id":"twin"}\n')
    assert compress_segment(twin) is not None
    twin.write_bytes(b'{"type":"Delivery","id":"twin"}\n')  # renamed, then died before unlink
    stale = tmp_path / f"20260101-000002-{me}-0003.jsonl.zst.tmp"
    stale.write_bytes(b"half")
    logs = LogWriter(tmp_path, compress=True)
    assert logs.path is not None
    logs.close()
    names = _names(tmp_path)
    assert names == sorted(
        [old.name + ".zst", live.name, twin.name + ".zst", logs.path.name + ".zst"]
    )
    assert [r["id"] for r, _ in read_records(tmp_path)] == ["old", "twin", "live"]


def test_a_segment_that_cannot_be_compressed_stays_plain(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    plain = tmp_path / "20260101-000000-1-0001.jsonl"
    plain.write_bytes(b'{"type":"Delivery"}\n')
    (tmp_path / (plain.name + ".zst.tmp")).mkdir()  # the .tmp cannot be written
    assert compress_segment(plain) is None
    assert plain.read_bytes() == b'{"type":"Delivery"}\n'
    assert "cannot compress log segment" in caplog.text
    assert compress_segment(tmp_path / "gone.jsonl") is None  # removed meanwhile: quiet


def test_without_compress_segments_stay_plain(tmp_path: Path) -> None:
    logs = LogWriter(tmp_path, max_bytes=200)
    for i in range(10):
        logs.write(_record(i))
    logs.close()
    assert all(n.endswith(".jsonl") for n in _names(tmp_path))
    args = build_parser().parse_args(["run", "--no-log-compress"])
    assert args.log_compress is False
    assert build_parser().parse_args(["run"]).log_compress is True


@pytest.fixture
def pubsub() -> Iterator[tuple[zmq.Socket[bytes], zmq.Socket[bytes]]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub, sub = ctx.socket(zmq.PUB), ctx.socket(zmq.SUB)
    pub.bind("inproc://records")
    sub.connect("inproc://records")
    try:
        yield pub, sub
    finally:
        pub.close(0)
        sub.close(0)
        ctx.term()


def _subscribed(logs: LogWriter, sub: zmq.Socket[bytes]) -> None:
    """Publish Probe records until the subscriber gets one: its subscription is in place."""

    def probe() -> bool:
        logs.write({"type": "Probe"})
        return bool(sub.poll(20))

    wait_for(probe, 10, "the subscription")
    while sub.poll(0):
        sub.recv_multipart()


def test_records_are_published_by_type(
    tmp_path: Path, pubsub: tuple[zmq.Socket[bytes], zmq.Socket[bytes]]
) -> None:
    pub, sub = pubsub
    sub.setsockopt(zmq.SUBSCRIBE, b"Probe")
    sub.setsockopt(zmq.SUBSCRIBE, b"Bounce")
    logs = LogWriter(tmp_path, nodeid="n1")
    logs.publisher = pub
    _subscribed(logs, sub)
    for i in range(6):
        logs.write(_record(i, "Bounce" if i % 2 else "Delivery"))
    got: list[list[bytes]] = []
    while sub.poll(1000) and len(got) < 3:
        got.append(sub.recv_multipart())
    assert [topic for topic, _ in got] == [b"Bounce"] * 3
    assert [json.loads(body)["id"] for _, body in got] == ["m1", "m3", "m5"]
    assert json.loads(got[0][1])["nodeid"] == "n1" and not got[0][1].endswith(b"\n")
    logs.close()
    on_file = [r["id"] for r, _ in read_records(tmp_path) if r["type"] != "Probe"]
    assert on_file == [f"m{i}" for i in range(6)]


def test_publishing_never_blocks_nor_raises(
    pubsub: tuple[zmq.Socket[bytes], zmq.Socket[bytes]],
) -> None:
    pub, sub = pubsub
    pub.setsockopt(zmq.SNDHWM, 10)
    sub.setsockopt(zmq.RCVHWM, 10)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    logs = LogWriter(None)  # publishing alone, no files
    logs.publisher = pub
    _subscribed(logs, sub)
    for i in range(20_000):  # nobody reads: PUB drops past its high-water mark
        logs.write(_record(i))
    assert logs.counts["Delivery"] == 20_000 and logs.publish_errors == 0
    pub.close(0)
    logs.write(_record(0))  # a dead socket is counted, never raised
    assert logs.publish_errors == 1


def test_parse_time_takes_rfc3339_unix_and_relative_times() -> None:
    assert parse_time("2026-11-30T17:01:02.5Z") == 1796058062.5
    assert parse_time("2026-11-30T18:01:02.5+01:00") == 1796058062.5
    assert parse_time("1796058062") == 1796058062.0
    assert parse_time("-10m", now=1000.0) == 400.0
    assert parse_time("-1h30m", now=10_000.0) == 4600.0
    for bad in ("yesterday", "2026-11-30T17:01:02", "-10 parsecs"):
        with pytest.raises(ValueError):
            parse_time(bad)


def _segment(directory: Path, name: str, recs: list[dict[str, Any]], zst: bool = False) -> None:
    data = b"".join(json.dumps(r).encode() + b"\n" for r in recs)
    path = directory / name
    path.write_bytes(data)
    if zst:
        assert compress_segment(path) is not None


def test_segments_are_read_in_time_order_and_filtered(tmp_path: Path) -> None:
    _segment(tmp_path, "20261118-110643-77-0010.jsonl", [_record(3), _record(4)])
    _segment(tmp_path, "20261118-110641-77-0009.jsonl", [_record(1), _record(2)], zst=True)
    _segment(tmp_path, "20261118-110640-12-0001.jsonl", [_record(0)], zst=True)
    (tmp_path / "notes.txt").write_text("not a segment")
    assert [p.name for p in segments(tmp_path)] == [
        "20261118-110640-12-0001.jsonl.zst",
        "20261118-110641-77-0009.jsonl.zst",
        "20261118-110643-77-0010.jsonl",
    ]
    ids = [r["id"] for r, _ in read_records(tmp_path)]
    assert ids == ["m0", "m1", "m2", "m3", "m4"]
    queue = Filter(queue="q1")
    assert [r["id"] for r, _ in read_records(tmp_path, queue)] == ["m1", "m3"]
    source = Filter(frozenset({"Delivery"}), source="b")
    assert [r["id"] for r, _ in read_records(tmp_path, source)] == ["m0", "m3"]
    assert not list(read_records(tmp_path, Filter(frozenset({"Bounce"}))))
    # Whole seconds decide unless a bound falls in the record's second: then event_time does.
    window = Filter(since=1_795_000_001.6, until=1_795_000_003.5)
    assert [r["id"] for r, _ in read_records(tmp_path, window)] == ["m2", "m3"]
    lines = [line for _, line in read_records(tmp_path)]
    assert lines[0] == json.dumps(_record(0)).encode() + b"\n"


def test_since_skips_segments_closed_before_it(tmp_path: Path) -> None:
    _segment(tmp_path, "20261118-094639-12-0001.jsonl", [_record(0)])
    _segment(tmp_path, "20261118-094700-12-0002.jsonl", [_record(1, t=1_795_000_100.0)])
    (tmp_path / "20261118-094639-12-0001.jsonl").write_bytes(b"garbage, never read\n")
    since = Filter(since=parse_time("2026-11-18T09:47:05Z"))
    assert [r["id"] for r, _ in read_records(tmp_path, since)] == ["m1"]


def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "20261118-094640-1-0001.jsonl"
    path.write_bytes(b'{"type":"Delivery","id":"a"}\n{"type":"Deli')
    assert list(segment_lines(path)) == [b'{"type":"Delivery","id":"a"}\n']


def test_follow_reads_on_across_rotation_and_compression(tmp_path: Path) -> None:
    logs = LogWriter(tmp_path, max_bytes=600, compress=True)
    logs.write(_record(0))
    logs.flush()
    script = iter(range(1, 12))
    seen: list[str] = []

    def stop() -> bool:
        """Called whenever the reader is idle: write the next record, or stop when all came."""
        if len(seen) == 12:
            return True
        i = next(script, None)
        if i is not None:
            logs.write(_record(i))  # rotates every few records; old segments get compressed
            logs.flush()
        return False

    for rec, _ in follow_records(tmp_path, Filter(), stop=stop, poll=0.01):
        seen.append(rec["id"])
    logs.close()
    assert seen == [f"m{i}" for i in range(12)]
    assert len(segments(tmp_path)) > 2


def test_kumopy_logs_prints_json_lines_or_one_line_each(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    rec = _record(1) | {
        "type": "Bounce",
        "sender": "s@x.test",
        "recipient": "r@y.test",
        "source_address": {"address": "127.0.0.2"},
        "response": response_dict(550, "5.1.1", "no such\r\nuser", "RCPT TO"),
        "bounce_classification": "InvalidRecipient",
    }
    _segment(tmp_path, "20261118-094640-1-0001.jsonl", [_record(0), rec], zst=True)
    assert main(["logs", str(tmp_path), "--json", "--type", "Bounce"]) == 0
    assert capsysbinary.readouterr().out == json.dumps(rec).encode() + b"\n"
    assert main(["logs", str(tmp_path), "--type", "Bounce", "--source", "a"]) == 0
    line = capsysbinary.readouterr().out.decode()
    assert line == (
        "2026-11-18T11:06:41.500000Z Bounce           q1 s@x.test -> r@y.test via a(127.0.0.2): "
        "550 5.1.1 no such user [InvalidRecipient]\n"
    )
    assert format_record({"type": "Reception", "recipient": ["a", "b"]}).startswith(" Reception")
    assert main(["logs", str(tmp_path), "--since", "soon"]) == 2
    assert main(["logs", str(tmp_path / "nope")]) == 1
