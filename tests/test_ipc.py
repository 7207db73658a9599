"""The wire protocol: header framing, limits, inject validation, job and result round trips."""

from __future__ import annotations

from collections.abc import Sequence

import msgpack
import pytest

from kumopy.errors import InjectionError, ProtocolError
from kumopy.ipc.framing import PROTOCOL_VERSION, decode_header, encode_header, error_reply
from kumopy.ipc.inject import InboundMessage, Limits, parse_inject
from kumopy.ipc.jobs import Job, JobResult, RecipientResult
from kumopy.ipc.work import decode_jobs, decode_results, encode_jobs, encode_results


def test_header_round_trip() -> None:
    h = decode_header(encode_header("inject", req=7, messages=[]))
    assert h == {"v": PROTOCOL_VERSION, "kind": "inject", "req": 7, "messages": []}


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"", "empty header"),
        (b"\xc1", "not valid msgpack"),
        (msgpack.packb([1, 2]), "must be a msgpack map"),
        (msgpack.packb({"v": 99, "kind": "inject"}), "unsupported protocol version 99"),
        (msgpack.packb({"v": 1}), "no 'kind'"),
        (msgpack.packb({1: 2}), "not valid msgpack"),
    ],
)
def test_bad_headers_name_the_problem(frame: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        decode_header(frame)


def test_header_size_limit() -> None:
    with pytest.raises(ProtocolError, match="exceeds the 10-byte limit"):
        decode_header(encode_header("x", pad="y" * 20), max_bytes=10)


def test_error_reply_is_uniform() -> None:
    h = decode_header(error_reply(3, ProtocolError("bad")))
    assert h["ok"] is False and h["req"] == 3
    assert h["error"]["code"] == "protocol_error" and h["error"]["message"] == "bad"


def _inject(messages: Sequence[object]) -> dict[str, object]:
    return decode_header(encode_header("inject", req=1, messages=messages))


def test_parse_inject_accepts_frame_and_bin_data() -> None:
    header = _inject(
        [
            {"sender": "a@x.test", "recipients": ["b@y.test"], "data": 1, "meta": {"tenant": "t"}},
            {"sender": "", "recipients": ["c@y.test"], "data": b"Subject: x\r\n\r\nhi\r\n"},
        ]
    )
    out = parse_inject(header, [b"hdr", b"Subject: y\r\n\r\nbody\r\n"], Limits())
    assert all(isinstance(m, InboundMessage) for m in out)
    first = out[0]
    assert isinstance(first, InboundMessage)
    assert bytes(first.data) == b"Subject: y\r\n\r\nbody\r\n" and first.meta == {"tenant": "t"}


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ({"sender": "a@x.test", "recipients": [], "data": b"x"}, "non-empty list"),
        (
            {"sender": "a@x.test", "recipients": ["b@y.test\r\nRCPT TO:<c@z>"], "data": b"x"},
            "control",
        ),
        ({"sender": "a\x00@x.test", "recipients": ["b@y.test"], "data": b"x"}, "control"),
        ({"sender": "a@x.test", "recipients": ["no-at-sign"], "data": b"x"}, "@"),
        ({"sender": "a@x.test", "recipients": ["b@y.test"], "data": 5}, "frame 5"),
        ({"sender": "a@x.test", "recipients": ["b@y.test"], "data": b""}, "empty"),
        ({"sender": "a@x.test", "recipients": ["b@y.test"], "data": b"x" * 101}, "exceeds"),
        ({"sender": "a@x.test", "recipients": ["b@y.test"], "data": b"x", "meta": [1]}, "map"),
        (
            {
                "sender": "a@x.test",
                "recipients": ["b@y.test"],
                "data": b"x",
                "meta": {"tenant": "a:b"},
            },
            "without ':'",
        ),
        ({"sender": 5, "recipients": ["b@y.test"], "data": b"x"}, "sender"),
        ("not a map", "must be a map"),
    ],
)
def test_parse_inject_rejects_each_bad_message_alone(message: object, reason: str) -> None:
    good = {"sender": "a@x.test", "recipients": ["b@y.test"], "data": b"ok"}
    out = parse_inject(_inject([good, message, good]), [b"h"], Limits(max_message_size=100))
    assert isinstance(out[0], InboundMessage) and isinstance(out[2], InboundMessage)
    assert isinstance(out[1], InjectionError)
    assert reason in str(out[1])


def test_parse_inject_takes_quoted_local_parts_as_given() -> None:
    rcpts = ['"john smith"@y.test', '"a\\"b"@y.test', "plain@y.test"]
    header = _inject(
        [
            {"sender": '"s s"@x.test', "recipients": rcpts, "data": b"x"},
            {"sender": "a@x.test", "recipients": ["ok@y.test", '"@y.test'], "data": b"x"},
            {"sender": ".a@x.test", "recipients": ["ok@y.test"], "data": b"x"},
        ]
    )
    good, unterminated, empty_atom = parse_inject(header, [b"h"], Limits())
    assert isinstance(good, InboundMessage)
    assert good.sender == '"s s"@x.test' and good.recipients == rcpts
    assert isinstance(unterminated, InjectionError)
    assert str(unterminated).startswith("recipients[1] '\"@y.test': unterminated quoted")
    assert isinstance(empty_atom, InjectionError)
    assert "sender '.a@x.test': empty atom" in str(empty_atom)


def test_parse_inject_refuses_lines_over_998_octets() -> None:
    head = b"Subject: x\r\n\r\n"
    ok, long = head + b"y" * 998 + b"\r\n", head + b"y" * 999 + b"\n"
    msg = {"sender": "a@x.test", "recipients": ["b@y.test"]}
    header = _inject([{**msg, "data": 1}, {**msg, "data": long}, {**msg, "data": 2}])
    out = parse_inject(header, [b"h", memoryview(long), ok], Limits())
    assert isinstance(out[0], InjectionError) and isinstance(out[1], InjectionError)
    for refused in out[:2]:
        assert "message line 3 is 999 octets long; RFC 5322 allows at most 998" in str(refused)
    assert isinstance(out[2], InboundMessage) and bytes(out[2].data) == ok
    # The size limit is checked first: a body both too big and long-lined is "too big".
    (too_big,) = parse_inject(_inject([{**msg, "data": long}]), [b"h"], Limits(500))
    assert "exceeds the 500-byte limit" in str(too_big)


def test_parse_inject_request_level_errors() -> None:
    with pytest.raises(ProtocolError, match="non-empty 'messages'"):
        parse_inject(_inject([]), [b"h"], Limits())
    too_many = [{"sender": "", "recipients": ["b@y.test"], "data": b"x"}] * 3
    with pytest.raises(ProtocolError, match="exceeds the limit of 2"):
        parse_inject(_inject(too_many), [b"h"], Limits(max_batch=2))


def test_jobs_round_trip_keeps_body_bytes_exact() -> None:
    body = b"a\r\n.b\nc\r"
    jobs = [Job(1, "m1", "s@x.test", ["r@y.test"], body, "mx_list:x")]
    frames = encode_jobs(jobs)
    back = decode_jobs(decode_header(frames[0]), frames)
    assert back[0].recipients == ["r@y.test"] and back[0].site == "mx_list:x"
    assert bytes(back[0].data) == body


def test_site_round_trip() -> None:
    from kumopy.ipc.jobs import SiteSpec
    from kumopy.ipc.work import SITE, decode_site, encode_site

    spec = SiteSpec(
        "mx1.y.test,mx2.y.test",
        [("mx1.y.test", "192.0.2.1", 25, 10), ("mx2.y.test", None, 2525, 20)],
        {"connection_limit": 3, "enable_tls": "Required"},
        ("*.y.test",),
    )
    header = decode_header(encode_site(spec))
    assert header["kind"] == SITE and decode_site(header) == spec
    with pytest.raises(ProtocolError, match="malformed site"):
        decode_site({"site": ["x", [["h", None, "not a port", 1]], {}, None]})


def test_results_round_trip() -> None:
    r = JobResult(
        4,
        [RecipientResult("r@y.test", "transient", 451, "4.3.0", "later", "RCPT TO")],
        "mx",
        "127.0.0.1",
        "127.0.0.2",
        True,
    )
    back = decode_results(decode_header(encode_results([r])))
    assert back == [r]
    with pytest.raises(ProtocolError, match="malformed results"):
        decode_results({"results": [[1, 2]]})


def test_inject_request_round_trip_client_side_to_coordinator_side() -> None:
    from kumopy.ipc.framing import ok_reply
    from kumopy.ipc.inject import INJECT, Message, decode_inject_reply, encode_inject

    frames = encode_inject(5, [Message("s@x.test", ["r@y.test"], b"hi\r\n", id="i1", tenant="t")])
    header = decode_header(frames[0])
    assert header["kind"] == INJECT and header["req"] == 5
    (msg,) = parse_inject(header, frames, Limits())
    assert isinstance(msg, InboundMessage)
    assert (msg.sender, msg.recipients, bytes(msg.data), msg.client_id, msg.meta) == (
        "s@x.test",
        ["r@y.test"],
        b"hi\r\n",
        "i1",
        {"tenant": "t"},
    )
    reply = ok_reply(5, {"messages": [{"ok": True, "id": "m1", "duplicate": True}]})
    (result,) = decode_inject_reply(reply, 1)
    assert result.ok and result.id == "m1" and result.duplicate


def test_worker_messages_round_trip() -> None:
    from kumopy.ipc.work import (
        BYE,
        HEARTBEAT,
        READY,
        STOP,
        encode_bye,
        encode_heartbeat,
        encode_ready,
        encode_stop,
    )

    assert decode_header(encode_ready(7, 123)) | {} == {
        "v": PROTOCOL_VERSION,
        "kind": READY,
        "credit": 7,
        "pid": 123,
    }
    assert decode_header(encode_heartbeat({"queued": 1}))["kind"] == HEARTBEAT
    assert decode_header(encode_bye())["kind"] == BYE
    stop = decode_header(encode_stop(2.5))
    assert (stop["kind"], stop["timeout"]) == (STOP, 2.5)


def test_small_bodies_share_one_frame_and_large_ones_travel_alone() -> None:
    from kumopy.ipc.work import OWN_FRAME_FROM

    big = OWN_FRAME_FROM
    bodies = [b"a\r\n", b"", b"x" * big, b".\r\n", b"y" * (big + 1), b"z" * (big - 1)]
    jobs = [Job(i, f"m{i}", "s@x.test", ["r@y.test"], b, "site") for i, b in enumerate(bodies)]
    frames = encode_jobs(jobs)
    # header, the four small bodies together, then each large body as it was (no copy)
    assert len(frames) == 4 and frames[2] is bodies[2] and frames[3] is bodies[4]
    assert frames[1] == b"a\r\n.\r\n" + b"z" * (big - 1)
    back = decode_jobs(decode_header(frames[0]), frames)
    assert [bytes(j.data) for j in back] == bodies and [j.job_id for j in back] == list(range(6))


@pytest.mark.parametrize("span", [(1, 0, 10**6), (1, 5, 2), (1, -1, 3), (2, 0, 1), (0, 0, 1)])
def test_a_deliver_message_whose_body_lies_outside_its_frame_is_refused(
    span: tuple[int, int, int],
) -> None:
    from kumopy.ipc.work import DELIVER

    header = encode_header(DELIVER, jobs=[[1, "m", "s@x.test", ["r@y.test"], "site", *span]])
    with pytest.raises(ProtocolError, match="malformed deliver message"):
        decode_jobs(decode_header(header), [header, b"0123456789"])
