"""A loaded policy at run time: its Config, and its handlers called with every answer checked."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from kumopy.config import Config, QueueConfig, queue_name
from kumopy.errors import PolicyError
from kumopy.paths import EgressPath, PathOptions

__all__ = ["Handler", "Policy", "raised_at"]

Handler = tuple[Callable[..., Any], str]
"""A handler function and `file:line` where it was registered."""


def raised_at(exc: BaseException, filename: str) -> str | None:
    """Return `file:line` of the innermost traceback frame in filename, or None."""
    where = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            where = f"{filename}:{tb.tb_lineno}"
        tb = tb.tb_next
    return where


class Policy:
    """A loaded policy: its validated Config and its run-time handlers."""

    __slots__ = ("_handlers", "config", "path", "settings")

    def __init__(
        self,
        config: Config,
        path: Path | None = None,
        handlers: Mapping[str, Handler] | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        self.config = config
        """The validated sources and pools."""
        self.path = path
        """The policy file, or None when only sources files were loaded."""
        self._handlers = dict(handlers or {})
        self.settings: Mapping[str, Any] = dict(settings or {})
        """What the policy configured besides sources and pools (e.g. `resolver`)."""

    def has_handler(self, event: str) -> bool:
        """Return True when the policy handles `event`."""
        return event in self._handlers

    def _call(self, event: str, args: tuple[Any, ...], what: str, want: type, make: str) -> Any:
        """Call an event's handler; raise PolicyError naming where it failed or what it gave."""
        handler, where = self._handlers[event]
        try:
            answer: object = handler(*args)
        except Exception as exc:
            code = getattr(handler, "__code__", None)
            line = raised_at(exc, code.co_filename) if code is not None else None
            raise PolicyError(
                f"{event} ({where}) failed for {what}"
                f"{f' at {line}' if line else ''}: {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(answer, want):
            raise PolicyError(
                f"{event} ({where}) returned {type(answer).__name__} for {what}; "
                f"it must return kumo.{make}(...)"
            )
        return answer

    def queue_config(
        self,
        domain: str,
        tenant: str | None,
        campaign: str | None,
        routing_domain: str | None = None,
    ) -> QueueConfig:
        """Ask get_queue_config for a queue's config; raise PolicyError if it is unusable."""
        queue = queue_name(domain, tenant, campaign, routing_domain)
        result: QueueConfig = QueueConfig()
        if "get_queue_config" in self._handlers:
            result = self._call(
                "get_queue_config",
                (domain, tenant, campaign, routing_domain),
                f"queue {queue!r}",
                QueueConfig,
                "make_queue_config",
            )
        if result.egress_pool not in self.config.pools:
            known = ", ".join(self.config.pools)
            raise PolicyError(
                f"queue {queue!r} names unknown egress pool {result.egress_pool!r}; "
                f"known pools: {known}",
                result,
            )
        return result

    def path_config(
        self, routing_domain: str, source: str, site: str, defaults: EgressPath
    ) -> EgressPath:
        """Ask get_egress_path_config how `source` sends to `site`; raise PolicyError."""
        if "get_egress_path_config" not in self._handlers:
            return defaults
        options: PathOptions = self._call(
            "get_egress_path_config",
            (routing_domain, source, site),
            f"source {source!r} and site {site!r}",
            PathOptions,
            "make_egress_path",
        )
        return options.over(defaults)

    def automation_rules(self) -> Callable[[str, str, str | None], Any] | None:
        """Return the shaping files' rule lookup (site, domain, provider), or None."""
        rules: Callable[[str, str, str | None], Any] | None = self.settings.get("automation_rules")
        return rules

    def describe(self) -> dict[str, Any]:
        """Return the sources and pools as JSON-ready dicts (for check-config --json)."""
        pools_of: dict[str, list[str]] = {name: [] for name in self.config.sources}
        pools = []
        for pool in self.config.pools.values():
            total = sum(entry.weight for entry in pool.entries)
            entries = []
            for entry in pool.entries:
                pools_of[entry.name].append(pool.name)
                share = round(100.0 * entry.weight / total, 1)
                entries.append({"name": entry.name, "weight": entry.weight, "share": share})
            pools.append({"name": pool.name, "entries": entries})
        sources = [
            {**source.to_dict(), "family": source.family, "pools": pools_of[name]}
            for name, source in self.config.sources.items()
        ]
        return {"sources": sources, "pools": pools}
