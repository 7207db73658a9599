"""What a delivery result says about its SMTP session: TLS, and the MTA-STS testing verdict."""

from __future__ import annotations

from kumopy.mtasts import host_matches as sts_match
from kumopy.smtp.client import SMTPClient
from kumopy.worker.sites import Site

__all__ = ["session_facts"]


def session_facts(client: SMTPClient, peer: str | None, site: Site | None) -> dict[str, object]:
    """Return what the log record says about the session: TLS, and MTA-STS testing mode."""
    facts: dict[str, object] = {}
    tls = client.tls
    if tls is not None:
        facts["tls_protocol_version"] = tls.protocol_version
        facts["tls_cipher"] = tls.cipher
        facts["tls_peer_subject_name"] = tls.peer_subject_name
    patterns = site.spec.sts_testing if site is not None else None
    if patterns is not None:
        # MTA-STS testing mode (RFC 8461 5): report what enforce mode would have refused.
        problems = []
        if peer is None or not any(sts_match(p, peer) for p in patterns):
            problems.append(f"MX host {peer} is not in the policy ({', '.join(patterns)})")
        if tls is None or not tls.verified:
            problems.append("the session was not over verified TLS")
        if problems:
            facts["mta_sts"] = "testing mode, would have failed: " + "; ".join(problems)
    return facts
