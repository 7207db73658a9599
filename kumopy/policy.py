"""The policy API (`kumo`), and loading a policy file into a validated Config."""

from __future__ import annotations

import inspect
import logging
import os
import sys
import types
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar, overload

from kumopy.bounce_class import make_classifier
from kumopy.config import (
    UNSPECIFIED,
    EntryDefinition,
    PoolDefinition,
    QueueConfig,
    SourceDefinition,
)
from kumopy.dns import ResolverConfig
from kumopy.errors import ConfigError, ConfigIssue, PolicyError
from kumopy.paths import make_egress_path
from kumopy.policy_calls import Policy, raised_at
from kumopy.redis_config import throttle_settings
from kumopy.shaping import Shaping, read_shaping
from kumopy.sources_file import SourcesMerger, read_sources_file
from kumopy.units import duration_seconds
from kumopy.validation import build_config, make_queue_config, suggest

__all__ = ["EVENTS", "KumoNamespace", "Policy", "kumo", "load_policy"]

logger = logging.getLogger(__name__)

EVENTS: Mapping[str, tuple[str, ...]] = types.MappingProxyType(
    {
        "init": (),
        "get_queue_config": ("domain", "tenant", "campaign", "routing_domain"),
        "get_egress_path_config": ("routing_domain", "egress_source", "site_name"),
    }
)
"""Events a policy may handle, with the arguments each handler receives."""

_Handler = TypeVar("_Handler", bound=Callable[..., Any])
_RESOLVER_OPTIONS = ("name_servers", "timeout", "attempts")


def _caller(depth: int = 2) -> str:
    """Return `file:line` of the code that called the public API function."""
    frame = sys._getframe(depth)
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"


class _Loader:
    """Everything one policy load collects; discarded if the load fails."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.base = path.parent if path is not None else Path.cwd()
        self.sources: list[SourceDefinition] = []
        self.pools: list[PoolDefinition] = []
        self.handlers: dict[str, list[tuple[Callable[..., Any], str]]] = {e: [] for e in EVENTS}
        self.issues: list[ConfigIssue] = []
        self.merger = SourcesMerger()
        self.settings: dict[str, Any] = {}

    def add_sources_file(self, path: Path) -> None:
        """Read and merge one sources file."""
        file = read_sources_file(path)
        self.issues.extend(file.issues)
        sources, pools = self.merger.add(file)
        self.sources.extend(sources)
        self.pools.extend(pools)

    def failure(self, exc: BaseException, what: str) -> None:
        """Record an exception raised by the policy, located at its deepest policy line."""
        if isinstance(exc, ConfigError):
            self.issues.extend(exc.issues)
            return
        filename = str(self.path)
        where = raised_at(exc, filename) or filename
        if isinstance(exc, SyntaxError) and exc.filename == filename:
            where = f"{filename}:{exc.lineno}"
            problem = f"syntax error: {exc.msg}"
        else:
            problem = f"{what} raised {type(exc).__name__}: {exc}"
        self.issues.append(ConfigIssue(where, "policy", "", problem))


_loading: ContextVar[_Loader | None] = ContextVar("kumopy_policy_loading", default=None)


def _current(function: str) -> _Loader:
    """Return the loader of the policy being loaded, or raise if there is none."""
    loader = _loading.get()
    if loader is None:
        raise PolicyError(
            f"kumo.{function}() can only be called while a policy file is being loaded "
            "(by load_policy or `kumopy check-config`)"
        )
    return loader


def _options(spec: Mapping[str, Any] | None, options: dict[str, Any]) -> dict[str, Any]:
    """Merge the Lua-style single-table argument with keyword arguments."""
    if spec is None:
        return options
    if not isinstance(spec, Mapping):
        raise TypeError(f"expected a dict of options, not {type(spec).__name__}")
    return {**spec, **options}


class DnsNamespace:
    """`kumo.dns`: where MX lookups go."""

    __slots__ = ()

    def configure_resolver(
        self,
        spec: Mapping[str, Any] | None = None,
        /,
        *,
        name_servers: Sequence[str] | None = None,
        timeout: float | str = "5s",
        attempts: int = 2,
        **unknown: Any,
    ) -> None:
        """Send DNS queries to these servers ("127.0.0.1:5353", "[::1]:53"), not resolv.conf."""
        loader = _current("dns.configure_resolver")
        where = _caller()
        options = _options(spec, {"timeout": timeout, "attempts": attempts, **unknown})
        servers = options.pop("name_servers", name_servers)
        problems = [f"unknown option{suggest(str(k), _RESOLVER_OPTIONS)}" for k in unknown]
        try:
            if isinstance(servers, str) or not isinstance(servers, Sequence | type(None)):
                raise ValueError(
                    f'name_servers must be a list like ["127.0.0.1:53"], not {servers!r}'
                )
            seconds = duration_seconds(options["timeout"])
            config = ResolverConfig(
                name_servers=tuple(servers or ()), timeout=seconds, attempts=options["attempts"]
            )
        except (ValueError, TypeError) as exc:
            problems.append(str(exc))
        else:
            loader.settings["resolver"] = config
        for problem in problems:
            loader.issues.append(ConfigIssue(where, "dns.configure_resolver", "", problem))


class KumoNamespace:
    """The `kumo` object policies call, as KumoMTA's Lua policies call `kumo`."""

    __slots__ = ()

    dns = DnsNamespace()
    """MX lookups: `kumo.dns.configure_resolver(...)`."""

    def configure_mta_sts(
        self,
        *,
        https_port: int = 443,
        ca_file: str | None = None,
        timeout: float | str = "10s",
    ) -> None:
        """Set how MTA-STS policies are fetched: the HTTPS port, the CA bundle, the timeout."""
        loader = _current("configure_mta_sts")
        where = _caller()
        try:
            if isinstance(https_port, bool) or not isinstance(https_port, int):
                raise ValueError(f"https_port must be a port number, not {https_port!r}")
            if not 0 < https_port < 65536:
                raise ValueError(f"https_port {https_port} is not 1 to 65535")
            if ca_file is not None:
                path = loader.base / ca_file
                if not path.is_file():
                    raise ValueError(f"ca_file {str(path)!r} is not a readable file")
                ca_file = str(path)
            seconds = duration_seconds(timeout)
        except ValueError as exc:
            loader.issues.append(ConfigIssue(where, "configure_mta_sts", "", str(exc)))
            return
        loader.settings["mta_sts"] = {
            "https_port": https_port,
            "ca_file": ca_file,
            "timeout": seconds,
        }

    def configure_bounce_classifier(
        self, spec: Mapping[str, Any] | None = None, /, *, files: Any = None, **unknown: Any
    ) -> None:
        """Classify bounces by these rules files (relative to the policy) before kumopy's own."""
        loader = _current("configure_bounce_classifier")
        where = _caller()
        options = _options(spec, {"files": files, **unknown})
        files = options.pop("files", None)
        problems = [f"unknown option {k!r}{suggest(str(k), ('files',))}" for k in options]
        if isinstance(files, str | os.PathLike):
            files = [files]
        if not isinstance(files, list | tuple) or not all(
            isinstance(f, str | os.PathLike) for f in files
        ):
            problems.append(f'files must be a list like ["bounce_rules.toml"], not {files!r}')
        elif "bounce_classifier" in loader.settings:
            problems.append("called twice; list every rules file in one call")
        if problems:
            for problem in problems:
                loader.issues.append(ConfigIssue(where, "configure_bounce_classifier", "", problem))
            return
        try:
            classifier = make_classifier([loader.base / f for f in files])
        except ConfigError as exc:
            loader.issues.extend(exc.issues)
            return
        loader.settings["bounce_classifier"] = classifier

    def configure_redis_throttles(
        self,
        spec: Mapping[str, Any] | None = None,
        /,
        *,
        node: str | None = None,
        prefix: str | None = None,
        timeout: float | str | None = None,
        **unknown: Any,
    ) -> None:
        """Share rates, caps and holds with other kumopy hosts through one Redis node."""
        loader = _current("configure_redis_throttles")
        where = _caller()
        given = {"node": node, "prefix": prefix, "timeout": timeout}
        options = _options(spec, {k: v for k, v in given.items() if v is not None} | unknown)
        settings, problems = throttle_settings(options)
        for problem in problems:
            loader.issues.append(ConfigIssue(where, "configure_redis_throttles", "", problem))
        if settings is not None:
            loader.settings["redis_throttles"] = settings

    @overload
    def on(self, event: str) -> Callable[[_Handler], _Handler]: ...

    @overload
    def on(self, event: str, handler: _Handler) -> _Handler: ...

    def on(self, event: str, handler: Any = None) -> Any:
        """Register handler for event; without handler, return a decorator doing so."""
        loader = _current("on")
        where = _caller()

        def register(fn: _Handler) -> _Handler:
            _register(loader, event, fn, where)
            return fn

        return register if handler is None else register(handler)

    def define_egress_source(
        self, spec: Mapping[str, Any] | None = None, /, **options: Any
    ) -> None:
        """Define an egress source: name, source_address, ehlo_domain, remote_port."""
        loader = _current("define_egress_source")
        options = _options(spec, options)
        name = options.pop("name", None)
        loader.sources.append(SourceDefinition(name, options, _caller()))

    def define_egress_pool(self, spec: Mapping[str, Any] | None = None, /, **options: Any) -> None:
        """Define an egress pool: name and entries=[{"name": source, "weight": n}, ...]."""
        loader = _current("define_egress_pool")
        where = _caller()
        options = _options(spec, options)
        name = options.pop("name", None)
        raw = options.pop("entries", [])
        entries: list[EntryDefinition] = []
        problem = None
        if isinstance(raw, list | tuple):
            entries = [EntryDefinition(v, f"entries[{i}]", where) for i, v in enumerate(raw)]
        else:
            kind = type(raw).__name__
            problem = f'must be a list like [{{"name": "ip-1", "weight": 1}}], not a {kind}'
        loader.pools.append(PoolDefinition(name, entries, where, options, problem))

    def load_sources(self, *paths: str | os.PathLike[str] | Sequence[str]) -> None:
        """Load sources TOML files, relative to the policy's directory, merging them in order."""
        loader = _current("load_sources")
        flat: list[str | os.PathLike[str]] = []
        for path in paths:
            if isinstance(path, list | tuple):
                flat.extend(path)
            else:
                assert isinstance(path, str | os.PathLike)
                flat.append(path)
        for path in flat:
            loader.add_sources_file(loader.base / path)

    def load_shaping(self, *paths: str | os.PathLike[str] | Sequence[str]) -> Shaping:
        """Load KumoMTA shaping files, relative to the policy's directory, merged in order.

        Without a get_egress_path_config handler in the policy, the Shaping becomes it.
        """
        loader = _current("load_shaping")
        where = _caller()
        shaping, issues = read_shaping(paths, loader.base, where)
        loader.issues.extend(issues)
        known = loader.settings.get("shaping")
        if known is not None:
            problem = f"already called at {known.where}; name every file in one call"
            loader.issues.append(ConfigIssue(where, "load_shaping", "", problem))
        else:
            loader.settings["shaping"] = shaping
            loader.settings["automation_rules"] = shaping.rules_for
        return shaping

    def make_queue_config(
        self,
        *,
        egress_pool: str = UNSPECIFIED,
        retry_interval: float | str = "20m",
        max_retry_interval: float | str | None = None,
        max_age: float | str = "7d",
        mx_list: Sequence[str] | None = None,
        **unknown: Any,
    ) -> QueueConfig:
        """Return the QueueConfig a get_queue_config handler hands back; raise ConfigError."""
        options = {
            "egress_pool": egress_pool,
            "retry_interval": retry_interval,
            "max_retry_interval": max_retry_interval,
            "max_age": max_age,
            "mx_list": mx_list,
            **unknown,
        }
        return make_queue_config(options, _caller())

    def make_egress_path(self, spec: Mapping[str, Any] | None = None, /, **options: Any) -> Any:
        """Return what a get_egress_path_config handler hands back; raise ConfigError."""
        return make_egress_path(_options(spec, options), _caller())


def _register(loader: _Loader, event: object, fn: object, where: str) -> None:
    """Check and record one event handler."""
    problem = None
    if event not in EVENTS:
        known = ", ".join(repr(e) for e in EVENTS)
        problem = f"unknown event {event!r}{suggest(str(event), EVENTS)}; kumopy knows {known}"
    elif not callable(fn) or inspect.iscoroutinefunction(fn):
        problem = "the handler must be a plain (not async) function"
    else:
        assert isinstance(event, str)
        try:
            inspect.signature(fn).bind(*EVENTS[event])
        except TypeError:
            args = ", ".join(EVENTS[event]) or "no arguments"
            problem = f"the {event} handler must accept ({args})"
        except ValueError:
            pass  # builtins without a signature: trust them
        others = loader.handlers[event]
        if event != "init" and others:
            problem = f"a {event} handler is already registered at {others[0][1]}; keep one"
    if problem is not None:
        loader.issues.append(ConfigIssue(where, f"event {event!r}", "", problem))
        return
    assert isinstance(event, str)
    loader.handlers[event].append((fn, where))  # type: ignore[arg-type]


kumo = KumoNamespace()
"""The policy API: `from kumopy import kumo`."""


def _run_file(loader: _Loader, path: Path) -> bool:
    """Execute the policy file and its init handlers; return False if any of it failed."""
    try:
        code = compile(path.read_bytes(), str(path), "exec", dont_inherit=True)
    except OSError as exc:
        problem = "file not found" if isinstance(exc, FileNotFoundError) else str(exc)
        loader.issues.append(ConfigIssue(str(path), "policy", "", problem))
        return False
    except (SyntaxError, ValueError) as exc:
        loader.failure(exc, "compiling")
        return False
    module = types.ModuleType("kumopy_policy", f"kumopy policy {path}")
    module.__file__ = str(path)
    # The policy runs as trusted operator code, like KumoMTA's Lua policy.
    try:
        exec(code, module.__dict__)
    except (Exception, SystemExit) as exc:
        loader.failure(exc, "the policy")
        return False
    for handler, where in list(loader.handlers["init"]):
        try:
            handler()
        except (Exception, SystemExit) as exc:
            loader.failure(exc, f"init handler ({where})")
            return False
    return True


def load_policy(
    path: str | os.PathLike[str] | None,
    sources: Sequence[str | os.PathLike[str]] = (),
) -> Policy:
    """Load a policy file and extra sources files; raise ConfigError listing every problem."""
    policy_path = Path(path) if path is not None else None
    loader = _Loader(policy_path)
    ran = True
    token = _loading.set(loader)
    try:
        if policy_path is not None:
            ran = _run_file(loader, policy_path)
    finally:
        _loading.reset(token)
    if not ran:
        raise ConfigError(loader.issues)
    for extra in sources:
        loader.add_sources_file(Path(extra))
    config = build_config(loader.sources, loader.pools, loader.issues)
    shaping = loader.settings.get("shaping")
    if shaping is not None and not loader.handlers["get_egress_path_config"]:
        loader.handlers["get_egress_path_config"].append(
            (shaping.get_egress_path_config, shaping.where)
        )
    handlers = {event: found[0] for event, found in loader.handlers.items() if found}
    handlers.pop("init", None)
    logger.debug(
        "loaded policy %s: %d sources, %d pools",
        policy_path,
        len(config.sources),
        len(config.pools),
    )
    return Policy(config, policy_path, handlers, loader.settings)
