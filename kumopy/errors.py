"""The kumopy exception tree: every error the package raises derives from KumoError."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "ConfigError",
    "ConfigIssue",
    "DeliveryError",
    "InjectionError",
    "KumoError",
    "LogUnavailableError",
    "PolicyError",
    "ProtocolError",
    "SMTPReplyError",
    "ShuttingDownError",
    "SourceBindError",
    "SpoolError",
    "SpoolFullError",
    "SpoolLockedError",
    "WorkerBootError",
    "error_from_dict",
]


class KumoError(Exception):
    """Base of every kumopy error; carries a stable code and serialises for ZeroMQ."""

    code: ClassVar[str] = "kumo_error"
    transient: ClassVar[bool] = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, Any]:
        """Return a msgpack-safe description of this error."""
        return {"type": type(self).__name__, "code": self.code, "message": self.message}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KumoError:
        """Rebuild an error sent across ZeroMQ by to_dict()."""
        return error_from_dict(data)


@dataclass(frozen=True)
class ConfigIssue:
    """One configuration problem, located by file, object and field."""

    where: str
    """The file (or `policy`) the problem was found in."""
    obj: str
    """The object, e.g. `source "ip-1"` or `pool "bulk"`."""
    field: str
    """The field name, or empty when the whole object is wrong."""
    problem: str
    """What is wrong, written for an operator."""

    def __str__(self) -> str:
        loc = f"{self.where}: {self.obj}"
        if self.field:
            loc += f": {self.field}"
        return f"{loc}: {self.problem}"


class ConfigError(KumoError, ValueError):
    """The configuration is invalid; `issues` lists every problem found at once."""

    code = "config_error"

    def __init__(self, issues: list[ConfigIssue] | str) -> None:
        if isinstance(issues, str):
            issues = [ConfigIssue("config", "", "", issues)]
        self.issues: list[ConfigIssue] = list(issues)
        n = len(self.issues)
        head = f"{n} configuration error{'s' if n != 1 else ''}"
        super().__init__(head + ":\n" + "\n".join(f"  - {i}" for i in self.issues))

    def to_dict(self) -> dict[str, Any]:
        """Return a msgpack-safe description, with each issue."""
        d = super().to_dict()
        d["issues"] = [[i.where, i.obj, i.field, i.problem] for i in self.issues]
        return d


class PolicyError(KumoError):
    """The policy raised or returned something unusable for one queue or event."""

    code = "policy_error"
    transient = True

    def __init__(self, message: str, answer: object = None) -> None:
        super().__init__(message)
        self.answer = answer
        """What the policy returned, when it returned something (its retry schedule still
        applies to a queue config that names an unknown pool)."""


class ProtocolError(KumoError, ValueError):
    """A frame, request or reply (ZeroMQ or SMTP) is malformed, too large or unknown."""

    code = "protocol_error"


class InjectionError(KumoError, ValueError):
    """One injected message was rejected (bad envelope, too big, ...)."""

    code = "rejected"


class SpoolError(KumoError, OSError):
    """The spool could not store or read a message; injection is refused meanwhile."""

    code = "spool_error"
    transient = True


class SpoolFullError(SpoolError):
    """The spool's file system is below its free-space minimum."""

    code = "spool_full"


class SpoolLockedError(SpoolError):
    """Another process holds the spool directory's lock; two runs must not share a spool."""

    code = "spool_locked"
    transient = False


class ShuttingDownError(KumoError):
    """The coordinator is stopping and takes no new messages; try again after it restarts."""

    code = "shutting_down"
    transient = True


class LogUnavailableError(KumoError):
    """Log records cannot be written (full or missing file system); injection waits meanwhile."""

    code = "log_unavailable"
    transient = True


class WorkerBootError(KumoError):
    """A worker could not start (for example its source address cannot be bound)."""

    code = "worker_boot"


class DeliveryError(KumoError):
    """A delivery attempt failed before any SMTP reply (connect, timeout, reset)."""

    code = "delivery_error"

    def __init__(self, message: str, transient: bool = True) -> None:
        super().__init__(message)
        self.is_transient = transient

    def to_dict(self) -> dict[str, Any]:
        """Return a msgpack-safe description, with its transience."""
        d = super().to_dict()
        d["transient"] = self.is_transient
        return d


class SourceBindError(DeliveryError):
    """The source address could not be bound (typically EADDRNOTAVAIL: not on this host)."""

    code = "source_bind"

    def __init__(self, message: str, address: str, errno_name: str) -> None:
        super().__init__(message, transient=True)
        self.address = address
        self.errno_name = errno_name

    def to_dict(self) -> dict[str, Any]:
        """Return a msgpack-safe description, with the address and errno name."""
        d = super().to_dict()
        d.update(address=self.address, errno_name=self.errno_name)
        return d


class SMTPReplyError(KumoError):
    """The peer answered with a failure reply; says whether it is transient or permanent."""

    code = "smtp_reply"

    def __init__(
        self,
        smtp_code: int,
        text: str,
        enhanced_code: str | None = None,
        command: str | None = None,
    ) -> None:
        self.smtp_code = smtp_code
        self.text = text
        self.enhanced_code = enhanced_code
        self.command = command
        enh = f" {enhanced_code}" if enhanced_code else ""
        super().__init__(f"{smtp_code}{enh} {text}")

    @property
    def is_transient(self) -> bool:
        """Return True for a 4xx reply (try again later)."""
        return 400 <= self.smtp_code < 500

    @property
    def is_permanent(self) -> bool:
        """Return True for a 5xx reply (do not retry)."""
        return self.smtp_code >= 500

    def to_dict(self) -> dict[str, Any]:
        """Return a msgpack-safe description with code, enhanced code, text and command."""
        d = super().to_dict()
        d.update(
            smtp_code=self.smtp_code,
            text=self.text,
            enhanced_code=self.enhanced_code,
            command=self.command,
        )
        return d


_REGISTRY: dict[str, type[KumoError]] = {}
for _cls in (
    KumoError,
    ConfigError,
    PolicyError,
    ProtocolError,
    InjectionError,
    SpoolError,
    SpoolFullError,
    SpoolLockedError,
    ShuttingDownError,
    LogUnavailableError,
    WorkerBootError,
    DeliveryError,
    SourceBindError,
    SMTPReplyError,
):
    _REGISTRY[_cls.__name__] = _cls


def error_from_dict(data: dict[str, Any]) -> KumoError:
    """Rebuild any KumoError from its to_dict() form; unknown types become KumoError."""
    name = str(data.get("type", "KumoError"))
    message = str(data.get("message", ""))
    cls = _REGISTRY.get(name, KumoError)
    if cls is SMTPReplyError:
        return SMTPReplyError(
            int(data.get("smtp_code", 0)),
            str(data.get("text", "")),
            data.get("enhanced_code"),
            data.get("command"),
        )
    if cls is DeliveryError:
        return DeliveryError(message, bool(data.get("transient", True)))
    if cls is SourceBindError:
        return SourceBindError(
            message, str(data.get("address", "")), str(data.get("errno_name", ""))
        )
    if cls is ConfigError:
        issues = [ConfigIssue(*map(str, i)) for i in data.get("issues", [])]
        return ConfigError(issues or message)
    return cls(message)
