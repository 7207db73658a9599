"""Log records: KumoMTA's shape, segments that rotate by size, nothing lost across segments."""

from __future__ import annotations

from pathlib import Path

from kumopy.coordinator.logs import LogWriter, enhanced_code_dict, response_dict
from kumopy.harness import read_log_records


def test_segments_rotate_by_size_and_read_back_in_order(tmp_path: Path) -> None:
    logs = LogWriter(tmp_path, nodeid="n1", max_bytes=400)
    for i in range(30):
        logs.write(
            {"type": "Delivery", "id": f"m{i}", "response": response_dict(250, None, "ok", ".")}
        )
    logs.close()
    files = sorted(tmp_path.glob("*.jsonl"))
    assert len(files) > 3
    assert all(f.stat().st_size <= 400 + 200 for f in files)
    recs = read_log_records(tmp_path)
    assert [r["id"] for r in recs] == [f"m{i}" for i in range(30)]
    assert {r["nodeid"] for r in recs} == {"n1"}
    assert logs.counts == {"Delivery": 30}


def test_enhanced_codes_split_like_kumomta() -> None:
    assert enhanced_code_dict("4.2.1") == {"class": 4, "subject": 2, "detail": 1}
    assert enhanced_code_dict(None) is None
    assert enhanced_code_dict("bogus") is None
    assert response_dict(550, "5.1.1", "no such user", "RCPT TO") == {
        "code": 550,
        "enhanced_code": {"class": 5, "subject": 1, "detail": 1},
        "content": "no such user",
        "command": "RCPT TO",
    }
