"""The kumopy exception tree: every error the package raises derives from KumoError."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from kumopy.smtp.replies import Reply

__all__ = [
    "BadDomainError",
    "ConfigError",
    "ConfigIssue",
    "DNSError",
    "DNSUnavailableError",
    "DeliveryError",
    "DomainNotFoundError",
    "HttpsGetError",
    "InjectionError",
    "KumoError",
    "LogUnavailableError",
    "NoAddressError",
    "NullMXError",
    "PolicyError",
    "ProtocolError",
    "ResolverConfigError",
    "SMTPReplyError",
    "ShuttingDownError",
    "SourceBindError",
    "SpoolError",
    "SpoolFullError",
    "SpoolLockedError",
    "StsError",
    "TlsError",
    "TlsHandshakeError",
    "TlsUnavailableError",
    "WorkerBootError",
    "error_from_dict",
    "kind_of",
]


class KumoError(Exception):
    """Base of every kumopy error; carries a stable code and serialises for ZeroMQ."""

    code: ClassVar[str] = "kumo_error"
    transient: bool = False
    """True when trying again later may succeed (one name for transience, on every error)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, Any]:
        """Return a msgpack-safe description of this error."""
        return {
            "type": type(self).__name__,
            "code": self.code,
            "message": self.message,
            "transient": self.transient,
        }

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
        self.transient = transient


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
    """The peer answered with a failure reply; transient for 4xx, permanent for 5xx."""

    code = "smtp_reply"

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply
        """The reply, labelled with the command it answered."""
        self.transient = reply.is_transient

    def to_dict(self) -> dict[str, Any]:
        """Return a msgpack-safe description with code, enhanced code, text and command."""
        d = super().to_dict()
        r = self.reply
        d.update(smtp_code=r.code, text=r.text, enhanced_code=r.enhanced_code, command=r.command)
        return d


# -- TLS ---------------------------------------------------------------------------------


class TlsError(DeliveryError):
    """STARTTLS could not protect the session; `host` and `address` name the peer."""

    code = "tls_error"

    def __init__(self, message: str, host: str | None, address: str) -> None:
        super().__init__(message, transient=True)
        self.host = host
        """The name the certificate was checked against; None when only the IP was known."""
        self.address = address
        """The IP address connected to."""

    def to_dict(self) -> dict[str, Any]:
        """Return a msgpack-safe description, with the host and address."""
        d = super().to_dict()
        d.update(host=self.host, address=self.address)
        return d


class TlsUnavailableError(TlsError):
    """The TLS mode forbids clear text and the peer offers no STARTTLS (or refused it)."""

    code = "tls_unavailable"


class TlsHandshakeError(TlsError):
    """STARTTLS was accepted but the handshake or the certificate check failed; session closed."""

    code = "tls_handshake"


# -- DNS and MTA-STS ----------------------------------------------------------------------


class DNSError(KumoError):
    """A domain's mail hosts could not be found; carries the SMTP reply to log for it."""

    code = "dns_error"
    transient = True
    smtp_code = 451
    enhanced_code = "4.4.3"

    def __init__(self, domain: str, message: str) -> None:
        super().__init__(f"{self.smtp_code} {self.enhanced_code} {message}")
        self.domain = domain

    def to_dict(self) -> dict[str, Any]:
        """Return a msgpack-safe description, with the domain and the SMTP codes."""
        d = super().to_dict()
        d.update(domain=self.domain, smtp_code=self.smtp_code, enhanced_code=self.enhanced_code)
        return d


class DNSUnavailableError(DNSError):
    """No DNS server gave a usable answer (SERVFAIL, REFUSED, timeout, unreachable)."""

    code = "dns_unavailable"


class BadDomainError(DNSError):
    """The domain is not a valid DNS name (empty label, too long, bad IDNA)."""

    code = "dns_bad_domain"
    transient = False
    smtp_code, enhanced_code = 550, "5.1.2"


class DomainNotFoundError(DNSError):
    """The domain does not exist (NXDOMAIN)."""

    code = "dns_nxdomain"
    transient = False
    smtp_code, enhanced_code = 550, "5.1.2"


class NullMXError(DNSError):
    """The domain publishes a null MX: it accepts no mail (RFC 7505)."""

    code = "dns_null_mx"
    transient = False
    smtp_code, enhanced_code = 556, "5.1.10"


class NoAddressError(DNSError):
    """No mail host of the domain has an address: transient for MX hosts, else permanent."""

    code = "dns_no_address"

    def __init__(self, domain: str, message: str, transient: bool) -> None:
        self.transient = transient
        if not transient:  # no MX and no address of its own: RFC 5321 5.1 says give up
            self.smtp_code, self.enhanced_code = 550, "5.4.4"
        super().__init__(domain, message)


class ResolverConfigError(KumoError, ValueError):
    """The DNS configuration is unusable (no name server in resolv.conf, unreadable file)."""

    code = "dns_config"


class StsError(KumoError):
    """An MTA-STS record or policy is unusable, or could not be fetched; `stage` says where."""

    code = "mta_sts"

    def __init__(self, message: str, stage: str, transient: bool = True) -> None:
        super().__init__(message)
        self.stage = stage
        """Where it failed: dns, connect, tls, http, timeout, parse or config."""
        self.transient = transient

    def to_dict(self) -> dict[str, Any]:
        """Return a msgpack-safe description, with the stage."""
        d = super().to_dict()
        d["stage"] = self.stage
        return d


class HttpsGetError(KumoError):
    """An HTTPS GET failed; `stage` says where: connect, tls, http or timeout."""

    code = "https_get"
    transient = True

    def __init__(self, message: str, stage: str) -> None:
        super().__init__(message)
        self.stage = stage
        """Where the fetch failed: `connect`, `tls`, `http` or `timeout`."""

    def to_dict(self) -> dict[str, Any]:
        """Return a msgpack-safe description, with the stage."""
        d = super().to_dict()
        d["stage"] = self.stage
        return d


_REGISTRY: dict[str, type[KumoError]] = {
    cls.__name__: cls
    for cls in (
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
        DNSError,
        DNSUnavailableError,
        BadDomainError,
        DomainNotFoundError,
        NullMXError,
        NoAddressError,
        ResolverConfigError,
        StsError,
        HttpsGetError,
        TlsError,
        TlsUnavailableError,
        TlsHandshakeError,
    )
}


def error_from_dict(data: dict[str, Any]) -> KumoError:
    """Rebuild any KumoError from its to_dict() form; unknown types become KumoError."""
    name = str(data.get("type", "KumoError"))
    message = str(data.get("message", ""))
    cls = _REGISTRY.get(name, KumoError)
    if cls is SMTPReplyError:
        from kumopy.smtp.replies import Reply  # replies imports this module: import late

        reply = Reply(
            int(data.get("smtp_code", 0)),
            data.get("enhanced_code"),
            str(data.get("text", "")),
            data.get("command"),
        )
        return SMTPReplyError(reply)
    if cls is ConfigError:
        issues = [ConfigIssue(*map(str, i)) for i in data.get("issues", [])]
        return ConfigError(issues or message)
    # The rest carry plain fields beside the message: set them as they came, without running
    # constructors that would rebuild the message (a DNS error prefixes its SMTP codes).
    err = cls.__new__(cls)
    KumoError.__init__(err, message)
    for key, value in data.items():
        if key not in ("type", "code", "message") and isinstance(value, str | int | float | bool):
            setattr(err, key, value)
    return err


def kind_of(value: object) -> str:
    """Return a short description of a value's type for error messages."""
    if value is None:
        return "nothing (None)"
    if isinstance(value, bool):
        return f"a boolean ({value})"
    names = {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a table"}
    return names.get(type(value), f"a {type(value).__name__}")
