"""What `kumopy run` was asked to do: the run options and the listen-address guard."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from kumopy.config import MxHost
from kumopy.coordinator.core import CoreSettings
from kumopy.errors import ConfigError
from kumopy.ipc.inject import DEFAULT_ENDPOINT, Limits
from kumopy.paths import EgressPath

__all__ = ["RunOptions", "check_listen_endpoint"]


@dataclass(slots=True)
class RunOptions:
    """What `kumopy run` was asked to do."""

    listen: str = DEFAULT_ENDPOINT
    spool_dir: str = "var/spool"
    start_empty: bool = False
    """Move an empty or unreadable spool.db to quarantine and start with an empty spool."""
    log_dir: str | None = "var/log"
    log_max_bytes: int = 256 * 1024 * 1024
    log_compress: bool = True
    """Compress closed log segments with zstd (NAME.jsonl.zst), off the main loop."""
    log_publish: str | None = None
    """Publish every log record on a ZeroMQ PUB socket bound here: [type, JSON] frames."""
    fsync: bool = True
    min_free_bytes: int = 64 * 1024 * 1024
    dedup_window: float = 86400.0
    """How long an injection id is remembered for de-duplication, in seconds."""
    limits: Limits = field(default_factory=Limits)
    credit: int = 256
    drain_timeout: float = 30.0
    heartbeat_timeout: float = 30.0
    """A worker silent this long is terminated (SIGTERM, then SIGKILL) and restarted."""
    boot_timeout: float = 60.0
    """A worker not Ready this long after its start is terminated and restarted."""
    zygote: bool = True
    """Fork workers from a zygote that imported their modules once (False: exec each one)."""
    sources_per_worker: int = 1
    """Run up to this many consecutive sources in one worker process (1: one per source)."""
    allow_remote: bool = False
    core: CoreSettings = field(default_factory=CoreSettings)
    worker_args: list[str] = field(default_factory=list)
    log_level: str = "INFO"
    """Logging level of the coordinator's child processes (workers, resolver)."""
    ready_file: str | None = None
    """Write the bound ingress endpoint here once every worker is ready (tests, demo)."""
    metrics: tuple[str, int] | None = None
    """Serve Prometheus metrics on this (host, port)."""
    path_defaults: EgressPath = field(default_factory=EgressPath)
    """Egress path config under the policy's get_egress_path_config (from the run flags)."""
    control: str | None = None
    """The control endpoint (ipc:// or loopback tcp); None: ipc://SPOOL/control.sock."""
    route_all_to: tuple[MxHost, ...] | None = None
    """Send every queue to these smart hosts, whatever the policy says (kumopy bench's sink)."""


def check_listen_endpoint(endpoint: str, allow_remote: bool, flag: str = "--listen") -> None:
    """Refuse a non-loopback tcp endpoint unless the operator allowed it explicitly."""
    if not endpoint.startswith("tcp://"):
        if endpoint.startswith(("ipc://", "inproc://")):
            return
        raise ConfigError(f"{flag} {endpoint!r}: use tcp://HOST:PORT or ipc://PATH")
    host = urlsplit(endpoint).hostname or ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and flag != "--listen":
        raise ConfigError(f"{flag} {endpoint!r}: the control channel listens on loopback only")
    if not loopback and not allow_remote:
        raise ConfigError(
            f"{flag} {endpoint!r} is not a loopback address; injection has no authentication "
            "yet, so pass --allow-remote-ingress to listen there anyway"
        )
