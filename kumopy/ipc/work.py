"""Coordinator <-> worker: every message kind between them, both directions, side by side.

coordinator -> worker: site (hosts and path config of a site), deliver (jobs, each with its
body frame), stop (drain and exit).
worker -> coordinator: ready (credit), heartbeat (stats), results (one per job), bye.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kumopy.errors import ProtocolError
from kumopy.ipc.framing import body_frame, encode_header
from kumopy.ipc.jobs import Job, JobResult, RecipientResult, SiteSpec

__all__ = [
    "BATCH",
    "BYE",
    "DELIVER",
    "HEARTBEAT",
    "OWN_FRAME_FROM",
    "READY",
    "RESULTS",
    "SITE",
    "STOP",
    "WORKER_BOOT_ERROR",
    "decode_jobs",
    "decode_results",
    "decode_site",
    "encode_bye",
    "encode_heartbeat",
    "encode_jobs",
    "encode_ready",
    "encode_results",
    "encode_site",
    "encode_stop",
    "feed_batch",
    "worker_busy",
]

WORKER_BOOT_ERROR = 3
"""Exit code of a worker that cannot start at all (say, its address cannot be bound): the
coordinator does not restart it."""

SITE = "site"
"""coordinator -> worker: `site` = [name, hosts, config, sts_testing], sent before the first job
for that site and again whenever it changes (DNS answer, reload)."""
DELIVER = "deliver"
"""coordinator -> worker: `jobs` = [[job_id, msg_id, sender, recipients, site, frame]]."""
STOP = "stop"
"""coordinator -> worker: finish what you hold within `timeout` seconds, then exit."""
READY = "ready"
"""worker -> coordinator: connected, can hold `credit` jobs (`pid` for the logs)."""
HEARTBEAT = "heartbeat"
"""worker -> coordinator: still alive (every second), with delivery `stats`."""
RESULTS = "results"
"""worker -> coordinator: `results` = one row per finished job."""
BYE = "bye"
"""worker -> coordinator: draining: send nothing more."""


def encode_ready(credit: int, pid: int) -> bytes:
    """Pack a worker's Ready."""
    return encode_header(READY, credit=credit, pid=pid)


def encode_heartbeat(stats: dict[str, Any]) -> bytes:
    """Pack a worker's heartbeat."""
    return encode_header(HEARTBEAT, stats=stats)


def encode_bye() -> bytes:
    """Pack a worker's goodbye (it is draining)."""
    return encode_header(BYE)


def encode_stop(timeout: float) -> bytes:
    """Pack the coordinator's request to drain and exit within `timeout` seconds."""
    return encode_header(STOP, timeout=timeout)


def encode_site(spec: SiteSpec) -> bytes:
    """Pack a site's hosts and path config for a worker."""
    hosts = [list(h) for h in spec.hosts]
    sts = list(spec.sts_testing) if spec.sts_testing is not None else None
    return encode_header(SITE, site=[spec.name, hosts, spec.config, sts])


def decode_site(header: dict[str, Any]) -> SiteSpec:
    """Rebuild a SiteSpec sent by encode_site()."""
    try:
        name, hosts, config, sts = header["site"]
        spec_hosts = [
            (str(h), None if a is None else str(a), int(p), int(f)) for h, a, p, f in hosts
        ]
        return SiteSpec(
            str(name), spec_hosts, dict(config), tuple(map(str, sts)) if sts is not None else None
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed site message: {exc}") from None


BATCH = 64
"""Jobs, or results, that go in one message to or from a busy worker."""


def worker_busy(held: int, credit: int) -> bool:
    """Return True when a worker holds a quarter of its credit or more in jobs.

    Both sides batch then: the coordinator sends jobs BATCH at a time (a quarter of the
    credit if less), the worker holds its results back; one rule, so they agree.
    """
    return held > 0 and held >= credit // 4


def feed_batch(credit: int) -> int:
    """Return the jobs a busy worker of this credit is sent at once."""
    return min(BATCH, credit // 4)


OWN_FRAME_FROM = 65536
"""Bodies this large travel in a frame of their own (zero-copy); smaller ones share one."""


def encode_jobs(jobs: Sequence[Job]) -> list[Any]:
    """Frame a batch of jobs: header, the small bodies in one frame, then each large one."""
    specs = []
    small: list[bytes | memoryview] = []
    large: list[bytes | memoryview] = []
    end = 0
    for job in jobs:
        size = len(job.data)
        if size >= OWN_FRAME_FROM:
            # Copying a 100 KB body into a shared frame costs more than a frame of its own.
            large.append(job.data)
            where = (1 + len(large), 0, size)
        else:
            # Small bodies share frame 1: a frame per 2 KB body costs ZeroMQ (and pyzmq's
            # loop) far more than copying it.
            small.append(job.data)
            where = (1, end, end + size)
            end += size
        specs.append([job.job_id, job.msg_id, job.sender, job.recipients, job.site, *where])
    return [encode_header(DELIVER, jobs=specs), b"".join(small), *large]


def decode_jobs(header: dict[str, Any], frames: Sequence[Any]) -> list[Job]:
    """Rebuild the jobs of a deliver message (the coordinator is trusted; shape is checked)."""
    jobs = []
    views: dict[int, memoryview] = {}
    try:
        for job_id, msg_id, sender, rcpts, site, index, start, end in header["jobs"]:
            bodies = views.get(index)
            if bodies is None:
                frame = body_frame(frames, index)
                bodies = views[index] = memoryview(
                    frame.buffer if hasattr(frame, "buffer") else frame
                )
            if not 0 <= start <= end <= len(bodies):
                raise ValueError(f"body {start}:{end} outside the {len(bodies)}-byte frame")
            jobs.append(Job(job_id, msg_id, sender, list(rcpts), bodies[start:end], site))
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed deliver message: {exc}") from None
    return jobs


def encode_results(results: Sequence[JobResult]) -> bytes:
    """Pack a batch of job results for the coordinator."""
    rows = []
    for r in results:
        rcpts = [
            [x.recipient, x.status, x.code, x.enhanced_code, x.text, x.command] for x in r.results
        ]
        row = [r.job_id, rcpts, r.peer_name, r.peer_addr, r.source_address, r.possible_duplicate]
        if r.extra:
            row.append(r.extra)
        rows.append(row)
    return encode_header(RESULTS, results=rows)


def decode_results(header: dict[str, Any]) -> list[JobResult]:
    """Rebuild a batch of job results sent by encode_results()."""
    out = []
    try:
        for row in header["results"]:
            job_id, rcpts, peer_name, peer_addr, source_address, dup, *rest = row
            extra = rest[0] if rest and isinstance(rest[0], dict) else {}
            out.append(
                JobResult(
                    job_id,
                    [RecipientResult(*x) for x in rcpts],
                    peer_name,
                    peer_addr,
                    source_address,
                    bool(dup),
                    extra,
                )
            )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed results message: {exc}") from None
    return out
