"""The kumopy command line: run, check-config, inject, demo, bench, status, logs, sink, worker."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kumopy.errors import ConfigError, KumoError

if TYPE_CHECKING:
    from kumopy.config import MxHost
    from kumopy.paths import EgressPath

__all__ = ["main", "parse_size"]

log = logging.getLogger(__name__)


def parse_size(text: str) -> int:
    """Parse "2048", "2k", "50MB" into bytes (an argparse type)."""
    from kumopy.units import parse_size as parse

    try:
        return parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def _cmd_run(args: argparse.Namespace) -> int:
    import zmq

    from kumopy.coordinator.core import CoreSettings
    from kumopy.coordinator.main import Coordinator
    from kumopy.coordinator.options import RunOptions
    from kumopy.ipc.inject import Limits
    from kumopy.metrics import parse_metrics_address
    from kumopy.policy import load_policy

    _setup_logging(args.log_level)
    if not args.fsync:
        log.warning(
            "--no-fsync: accepted messages are NOT durable; a power loss or kernel crash can "
            "lose every message acknowledged since the last checkpoint. Use for tests only."
        )
    try:
        policy = load_policy(args.policy, args.sources)
        options = RunOptions(
            listen=args.listen,
            spool_dir=args.spool,
            start_empty=args.start_empty,
            log_dir=args.log_dir,
            log_max_bytes=args.log_max_size,
            log_compress=args.log_compress,
            log_publish=args.log_publish,
            fsync=args.fsync,
            min_free_bytes=args.min_free_space,
            dedup_window=args.dedup_window,
            limits=Limits(max_message_size=args.max_message_size),
            credit=args.credit,
            drain_timeout=args.drain_timeout,
            heartbeat_timeout=args.heartbeat_timeout,
            boot_timeout=args.boot_timeout,
            zygote=args.zygote,
            sources_per_worker=args.sources_per_worker,
            allow_remote=args.allow_remote_ingress,
            core=CoreSettings(
                problem_retry=args.problem_retry,
                max_ready=args.max_ready,
                suspend_unplumbed=args.suspend_unplumbed,
                queue_idle=args.queue_idle_timeout,
                max_pending_outcomes=args.max_pending_outcomes,
            ),
            worker_args=["--log-level", args.log_level],
            log_level=args.log_level,
            path_defaults=path_defaults(args),
            ready_file=args.ready_file,
            metrics=parse_metrics_address(args.metrics) if args.metrics else None,
            route_all_to=_route_all_to(args.route_all_to),
            control=args.control,
        )
        coordinator = Coordinator(policy, options, args.sources)
    except zmq.ZMQError as exc:
        print(f"kumopy run: cannot listen on {args.listen}: {exc}", file=sys.stderr)
        return 1
    except (ConfigError, ValueError) as exc:
        print(f"kumopy run: {exc}", file=sys.stderr)
        return 2
    except KumoError as exc:
        print(f"kumopy run: {exc}", file=sys.stderr)
        return 1
    return coordinator.run()


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _route_all_to(text: str | None) -> tuple[MxHost, ...] | None:
    from kumopy.validation import parse_mx_host

    return (parse_mx_host(text, "--route-all-to"),) if text else None


def path_defaults(args: argparse.Namespace) -> EgressPath:
    """Build the egress path defaults (under the policy's) from `kumopy run`'s flags."""
    from kumopy.paths import PATH_OPTIONS, EgressPath, make_egress_path

    options: dict[str, object] = {}
    for name in ("connection_limit", "max_deliveries_per_connection", "max_recipients_per_batch"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, not {value}")
        options[name] = value
    steps = sorted(n.removesuffix("_timeout") for n in PATH_OPTIONS if n.endswith("_timeout"))
    for item in args.smtp_timeout:
        step, sep, value = item.partition("=")
        if not sep or step not in steps:
            raise ValueError(f"--smtp-timeout {item!r}: use STEP=DURATION, STEP one of {steps}")
        options[f"{step}_timeout"] = value
    return make_egress_path(options, "kumopy run flags").over(EgressPath())


def _cmd_worker(args: argparse.Namespace) -> int:
    from kumopy.worker.main import run_worker

    _setup_logging(args.log_level)
    return run_worker(
        args.source_def, args.endpoint, args.credit, args.parent_pid, args.idle_heartbeat
    )


def _cmd_zygote(args: argparse.Namespace) -> int:
    from kumopy.worker.zygote import serve

    _setup_logging(args.log_level)
    # Built once here, so that the forked workers share the parser and what it imported.
    parser = build_parser()

    def worker_main(argv: list[str]) -> int:
        return _dispatch(parser.parse_args(["worker", *argv]))

    return serve(args.fd_in, args.fd_out, args.parent_pid, worker_main)


def _cmd_resolver(args: argparse.Namespace) -> int:
    from kumopy.dns_process import serve

    _setup_logging(args.log_level)
    return serve(args.fd, args.settings, args.parent_pid)


def _cmd_check_config(argv: list[str]) -> int:
    from kumopy.checkconfig import main as check_main

    return check_main(argv)


def _cmd_status(args: argparse.Namespace) -> int:
    from kumopy.client import Client

    with Client(args.endpoint, timeout=args.timeout) as client:
        print(json.dumps(client.request("status"), indent=2, sort_keys=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of every subcommand."""
    from kumopy.ipc.inject import DEFAULT_ENDPOINT, DEFAULT_MAX_MESSAGE_SIZE
    from kumopy.logread import DEFAULT_LOG_DIR, add_logs_arguments

    p = argparse.ArgumentParser(prog="kumopy", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="start the coordinator and one worker per egress source")
    run.add_argument("policy", nargs="?", help="policy file (Python)")
    run.add_argument(
        "--sources",
        action="append",
        default=[],
        metavar="FILE",
        help="KumoMTA-style sources TOML file (repeatable, merged in order)",
    )
    run.add_argument("--listen", default=DEFAULT_ENDPOINT, help="ingress endpoint (ZeroMQ)")
    run.add_argument(
        "--allow-remote-ingress",
        action="store_true",
        help="allow --listen on a non-loopback address (no authentication yet)",
    )
    run.add_argument("--spool", default=os.path.join("var", "spool"), help="spool directory")
    run.add_argument(
        "--start-empty",
        action="store_true",
        help="if spool.db is empty or unreadable, move it to quarantine and start an empty spool",
    )
    run.add_argument("--log-dir", default=DEFAULT_LOG_DIR, help="log record directory")
    run.add_argument(
        "--no-fsync",
        dest="fsync",
        action="store_false",
        help="do not fsync the spool (throughput tests only: risks acknowledged mail)",
    )
    run.add_argument(
        "--min-free-space",
        type=parse_size,
        default=64 * 1024**2,
        help="refuse injection when the spool's file system has less free space",
    )
    run.add_argument("--max-message-size", type=parse_size, default=DEFAULT_MAX_MESSAGE_SIZE)
    run.add_argument(
        "--credit", type=int, default=256, help="deliveries each worker may hold at once"
    )
    run.add_argument(
        "--log-max-size",
        type=parse_size,
        default=256 * 1024**2,
        help="start a new log segment when the current one passes this size",
    )
    run.add_argument(
        "--log-compress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compress closed log segments with zstd (NAME.jsonl.zst)",
    )
    run.add_argument(
        "--log-publish",
        metavar="ENDPOINT",
        help="publish every log record on a ZeroMQ PUB socket, e.g. tcp://127.0.0.1:5560",
    )
    run.add_argument(
        "--suspend-unplumbed",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="suspend a source whose address cannot be bound for this long (0: never)",
    )
    run.add_argument(
        "--max-ready",
        type=int,
        default=1024,
        help="messages picked for a source that may wait for its worker's credit",
    )
    run.add_argument(
        "--queue-idle-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="forget a scheduled queue this long after its last message left",
    )
    run.add_argument(
        "--max-pending-outcomes",
        type=int,
        default=50_000,
        help="outcomes waiting for the spool past which no new delivery starts",
    )
    run.add_argument(
        "--dedup-window",
        type=float,
        default=86400.0,
        metavar="SECONDS",
        help="how long an injection id is remembered to de-duplicate retried injections",
    )
    run.add_argument(
        "--connection-limit",
        type=int,
        default=32,
        help="SMTP connections one source keeps to one destination site",
    )
    run.add_argument(
        "--max-deliveries-per-connection",
        type=int,
        default=1024,
        help="messages sent over one connection before it is closed and replaced",
    )
    run.add_argument(
        "--max-recipients-per-batch",
        type=int,
        default=100,
        help="recipients per SMTP transaction; more are split into several",
    )
    run.add_argument(
        "--smtp-timeout",
        action="append",
        default=[],
        metavar="STEP=DURATION",
        help="override one SMTP timeout (connect, banner, ehlo, mail_from, rcpt_to, data, "
        "data_dot, idle), e.g. data_dot=10m; repeatable",
    )
    run.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="terminate and restart a worker silent this long once it said Ready (it beats "
        "every second, and every third of this while idle)",
    )
    run.add_argument(
        "--boot-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="terminate and restart a worker that has not said Ready this long after its start",
    )
    run.add_argument(
        "--sources-per-worker",
        type=_positive_int,
        default=1,
        metavar="N",
        help="run up to N consecutive sources in one worker process (default 1: one process "
        "per source); fewer wake-ups with many sources, but a crashed or hung source takes its "
        "whole process down, and sources restarted later run alone",
    )
    run.add_argument(
        "--no-zygote",
        dest="zygote",
        action="store_false",
        help="exec each worker (python -m kumopy worker) instead of forking it from a zygote "
        "that imported the worker's modules once",
    )
    run.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds SIGTERM waits for in-flight deliveries",
    )
    run.add_argument(
        "--problem-retry",
        type=float,
        default=None,
        help="retry delay for queue-level problems (default: the queue's schedule)",
    )
    run.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics",
    )
    run.add_argument(
        "--control",
        metavar="ENDPOINT",
        help="control channel for the operator verbs (default: ipc://SPOOL/control.sock, 0600)",
    )
    run.add_argument("--ready-file", help="write the bound endpoint here once workers are ready")
    # kumopy bench: every queue goes to its sink, whatever get_queue_config answers.
    run.add_argument("--route-all-to", metavar="HOST:PORT", help=argparse.SUPPRESS)
    run.add_argument("--log-level", default="INFO")
    run.set_defaults(func=_cmd_run)

    w = sub.add_parser("worker", help="(internal) the worker process of one or more sources")
    w.add_argument("--endpoint", required=True)
    w.add_argument(
        "--source-def",
        action="append",
        required=True,
        help="a source to serve (base64 JSON); repeated for several sources in one process",
    )
    w.add_argument("--credit", type=int, default=256)
    w.add_argument("--parent-pid", type=int, required=True)
    w.add_argument("--idle-heartbeat", type=float, default=5.0, metavar="SECONDS")
    w.add_argument("--log-level", default="INFO")
    w.set_defaults(func=_cmd_worker)

    z = sub.add_parser("zygote", help="(internal) fork workers from preloaded modules")
    z.add_argument("--fd-in", type=int, required=True)
    z.add_argument("--fd-out", type=int, required=True)
    z.add_argument("--parent-pid", type=int, required=True)
    z.add_argument("--log-level", default="INFO")
    z.set_defaults(func=_cmd_zygote)

    r = sub.add_parser("resolver", help="(internal) the coordinator's DNS lookups")
    r.add_argument("--fd", type=int, required=True)
    r.add_argument("--settings", required=True)
    r.add_argument("--parent-pid", type=int, required=True)
    r.add_argument("--log-level", default="INFO")
    r.set_defaults(func=_cmd_resolver)

    add_logs_arguments(sub.add_parser("logs", help="print log records (plain and .zst), filtered"))

    st = sub.add_parser("status", help="print the coordinator's counters as JSON")
    st.add_argument("--endpoint", default=DEFAULT_ENDPOINT)
    st.add_argument("--timeout", type=float, default=10.0)
    st.set_defaults(func=_cmd_status)

    from kumopy.benchcli import add_bench_parser
    from kumopy.demo import add_demo_parser
    from kumopy.inject import add_inject_parser
    from kumopy.opscli import add_ops_parsers

    add_ops_parsers(sub)
    add_inject_parser(sub)
    add_demo_parser(sub)
    add_bench_parser(sub)
    sub.add_parser(
        "check-config", help="validate a policy and print its sources and pools", add_help=False
    )
    sub.add_parser("sink", help="run the test SMTP sink", add_help=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    # check-config and sink own their whole argument lists.
    if args_list[:1] == ["check-config"]:
        try:
            return _cmd_check_config(args_list[1:])
        except BrokenPipeError:
            return 141
    if args_list[:1] == ["sink"]:
        from kumopy.smtp.sink import main as sink_main

        return int(sink_main(args_list[1:]) or 0)
    return _dispatch(build_parser().parse_args(args_list))


def _dispatch(args: argparse.Namespace) -> int:
    """Run a parsed subcommand; return its exit code."""
    try:
        result: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 141  # stdout closed early (e.g. piped into head): not an error worth a trace
    except KumoError as exc:
        print(f"kumopy {args.command}: {exc}", file=sys.stderr)
        return 1
    return result
