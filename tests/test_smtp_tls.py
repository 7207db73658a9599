"""STARTTLS in kumopy.smtp.client: each TLS mode against aiosmtpd and scripted peers, both loops."""

from __future__ import annotations

import asyncio
import datetime
import os
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest
import trustme
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from kumopy.errors import DeliveryError, TlsHandshakeError, TlsUnavailableError
from kumopy.smtp.certname import subject_name
from kumopy.smtp.client import SMTPClient
from kumopy.smtp.protocol import END_OF_DATA, Timeouts
from kumopy.smtp.replies import Reply
from kumopy.smtp.tls import TLS_MODES, TlsPolicy, context_for
from kumopy.smtp.transaction import Transaction, too_many, wants_tls
from kumopy.smtp.wire import encode_data
from tests.smtp_peer import PEER_NAME, Peer, Scripted

__all__ = ["Runner", "loop_run"]

T = TypeVar("T")
BODY = encode_data(b"Subject: tls\n\nbody\n")
MX = PEER_NAME


# -- running a client on either loop ---------------------------------------------------------


class Runner(Protocol):
    """Run a coroutine to completion on a fresh event loop."""

    def __call__(self, main: Callable[[], Coroutine[Any, Any, T]]) -> T: ...


def _asyncio_run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(main())


def _uvloop_run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    result: T = uvloop.run(main())
    return result


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_run(request: pytest.FixtureRequest) -> Runner:
    """Run the test's client on asyncio's loop, then on uvloop's (the worker's)."""
    return _uvloop_run if request.param == "uvloop" else _asyncio_run


# -- certificates ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """A trustme CA, its PEM file, and server contexts for the certificates the tests need."""

    ca_file: str
    good: ssl.SSLContext
    """mx.example.test and 127.0.0.1, CN mx.example.test."""
    name_only: ssl.SSLContext
    """mx.example.test only, no CN (its subject is O/OU)."""
    stranger: ssl.SSLContext
    """mx.example.test, from a CA the client does not trust."""


def _server_context(cert: trustme.LeafCert) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    return ctx


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca = trustme.CA()
    path = tmp_path_factory.mktemp("pki") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return Pki(
        str(path),
        _server_context(ca.issue_cert(MX, "127.0.0.1", common_name=MX)),
        _server_context(ca.issue_cert(MX)),
        _server_context(trustme.CA().issue_cert(MX, common_name=MX)),
    )


# -- helpers ---------------------------------------------------------------------------------


def policy(pki: Pki, mode: str, name: str | None = MX) -> TlsPolicy:
    """Return a policy trusting the test CA only."""
    return TlsPolicy(mode, server_hostname=name, ca_file=pki.ca_file)


async def send_one(
    port: int, tls: TlsPolicy | None, timeouts: Timeouts | None = None
) -> tuple[SMTPClient, Reply]:
    """Connect with tls, send one message, quit; return the client and the recipient's reply."""
    client = SMTPClient()
    await client.connect(
        "127.0.0.1",
        port,
        source_address=None,
        ehlo_domain="client.test",
        timeouts=timeouts,
        tls=tls,
    )
    result = await client.send_transaction("s@client.test", ["r@mx.example.test"], BODY)
    await client.quit()
    return client, result.replies[0]


# -- every mode against a good certificate ---------------------------------------------------


@pytest.mark.parametrize("mode", TLS_MODES)
def test_each_mode_against_a_good_certificate(loop_run: Runner, pki: Pki, mode: str) -> None:
    with Peer(pki.good) as peer:
        client, reply = loop_run(lambda: send_one(peer.port, policy(pki, mode)))
        assert (reply.code, reply.command) == (250, END_OF_DATA)
        (seen,) = peer.received
        assert seen.rcpt_tos == ["r@mx.example.test"] and seen.content.endswith(b"body\r\n")
        if mode == "Disabled":
            assert client.tls is None and not seen.tls
            assert "STARTTLS" in client.extensions  # offered, never used
            return
        assert seen.tls and client.tls is not None
        assert client.tls.verified is (mode in ("Opportunistic", "Required"))
        assert client.tls.protocol_version in ("TLSv1.2", "TLSv1.3")
        assert client.tls.cipher and client.tls.peer_subject_name == MX
        assert "STARTTLS" not in client.extensions  # the EHLO given over TLS replaced them


def test_no_policy_never_says_starttls(pki: Pki) -> None:
    with Peer(pki.good) as peer:
        client, reply = _asyncio_run(lambda: send_one(peer.port, None))
        assert reply.code == 250 and client.tls is None and not peer.received[0].tls


@pytest.mark.parametrize("mode", ["Required", "RequiredInsecure", "Opportunistic"])
def test_peer_without_starttls(loop_run: Runner, pki: Pki, mode: str) -> None:
    with Peer() as peer:
        if mode == "Opportunistic":
            client, reply = loop_run(lambda: send_one(peer.port, policy(pki, mode)))
            assert reply.code == 250 and client.tls is None and not peer.received[0].tls
            return
        with pytest.raises(TlsUnavailableError) as info:
            loop_run(lambda: send_one(peer.port, policy(pki, mode)))
        err = info.value
        assert err.transient and (err.host, err.address) == (MX, "127.0.0.1")
        assert f"127.0.0.1:{peer.port}" in err.message
        assert f"does not offer STARTTLS and the TLS mode is {mode}" in err.message
        assert err.to_dict()["host"] == MX and not peer.handler.mails


# -- certificates that do not check out ------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "name", "reason"),
    [
        ("good", "other.example.test", "Hostname mismatch"),
        ("stranger", MX, "unable to get local issuer certificate"),
        ("name_only", None, "IP address mismatch"),
    ],
    ids=["wrong-name", "unknown-ca", "no-ip-san"],
)
@pytest.mark.parametrize("mode", ["Opportunistic", "Required", "OpportunisticInsecure"])
def test_bad_certificate(
    loop_run: Runner, pki: Pki, bad: str, name: str | None, reason: str, mode: str
) -> None:
    ctx: ssl.SSLContext = getattr(pki, bad)
    with Peer(ctx) as peer:
        tls = policy(pki, mode, name)
        if mode == "OpportunisticInsecure":
            client, reply = loop_run(lambda: send_one(peer.port, tls))
            assert reply.code == 250 and peer.received[0].tls
            assert client.tls is not None and not client.tls.verified
            assert client.tls.peer_subject_name  # reported although nothing was checked
            return

        async def go() -> SMTPClient:
            client = SMTPClient()
            with pytest.raises(TlsHandshakeError) as info:
                await client.connect(
                    "127.0.0.1", peer.port, source_address=None, ehlo_domain="c.test", tls=tls
                )
            err = info.value
            assert err.transient and (err.host, err.address) == (name, "127.0.0.1")
            assert f"TLS handshake with 127.0.0.1:{peer.port}" in err.message
            assert f"certificate verify failed: {reason}" in err.message
            await asyncio.wait_for(client.wait_closed(), 5)
            return client

        client = loop_run(go)
        assert not client.usable and client.tls is None and not peer.handler.mails


def test_the_peer_ip_is_the_name_when_no_host_name_is_known(pki: Pki) -> None:
    with Peer(pki.good) as peer:
        client, reply = _asyncio_run(lambda: send_one(peer.port, policy(pki, "Required", None)))
        assert reply.code == 250 and client.tls is not None and client.tls.verified


def test_subject_without_cn_is_reported_whole(pki: Pki) -> None:
    with Peer(pki.name_only) as peer:
        client, _ = _asyncio_run(lambda: send_one(peer.port, policy(pki, "Required")))
        assert client.tls is not None
        assert (client.tls.peer_subject_name or "").startswith("OU=Testing cert #")


# -- broken handshakes and timeouts ----------------------------------------------------------


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("garbage", "TLS handshake with"),
        ("close", "connection lost"),
        ("inject-reply", "more reply than commands"),
        ("inject-partial", "sent data after its 220 reply to STARTTLS"),
        ("hang", "timed out after 0.3s"),
        ("silent", "timed out after 0.3s waiting for the reply to STARTTLS"),
    ],
)
def test_broken_starttls_fails_fast(loop_run: Runner, pki: Pki, how: str, reason: str) -> None:
    # A generous limit for the cases that fail at once, a short one for those that must wait.
    waits = how in ("hang", "silent")
    timeouts = Timeouts(starttls=0.3 if waits else 30.0)

    async def go() -> tuple[TlsHandshakeError, float, SMTPClient]:
        async with Scripted("PIPELINING", "STARTTLS", starttls=how) as peer:
            client = SMTPClient()
            start = time.monotonic()
            with pytest.raises(TlsHandshakeError) as info:
                await client.connect(
                    "127.0.0.1",
                    peer.port,
                    source_address=None,
                    ehlo_domain="c.test",
                    timeouts=timeouts,
                    tls=policy(pki, "Opportunistic"),
                )
            elapsed = time.monotonic() - start
            await asyncio.wait_for(client.wait_closed(), 5)
            return info.value, elapsed, client

    err, elapsed, client = loop_run(go)
    assert reason in err.message and err.transient and err.address == "127.0.0.1"
    assert elapsed < (3.0 if waits else 10.0) and not client.usable


@pytest.mark.parametrize("mode", ["Opportunistic", "Required"])
def test_starttls_refused_with_454(loop_run: Runner, pki: Pki, mode: str) -> None:
    async def go() -> tuple[Scripted, Reply | TlsUnavailableError]:
        async with Scripted("STARTTLS", starttls="454 4.7.0 TLS not available") as peer:
            try:
                _, reply = await send_one(peer.port, policy(pki, mode))
            except TlsUnavailableError as exc:
                return peer, exc
            return peer, reply

    peer, out = loop_run(go)
    if mode == "Required":
        assert isinstance(out, TlsUnavailableError)
        assert "answered STARTTLS with 454 4.7.0 TLS not available" in out.message
        assert not peer.messages
    else:
        assert isinstance(out, Reply) and out.code == 250 and len(peer.messages) == 1


# -- servers that insist on TLS --------------------------------------------------------------


@pytest.mark.parametrize("mode", ["Opportunistic", "Disabled"])
def test_server_requiring_tls(loop_run: Runner, pki: Pki, mode: str) -> None:
    with Peer(pki.good, require_starttls=True) as peer:
        client, reply = loop_run(lambda: send_one(peer.port, policy(pki, mode)))
        if mode == "Opportunistic":
            assert reply.code == 250 and client.tls is not None and peer.received[0].tls
            return
        assert (reply.code, reply.enhanced_code, reply.command) == (451, "4.7.0", "MAIL FROM")
        assert reply.is_transient and not peer.received
        assert reply.text == (
            "kumopy: the server requires TLS (530 Must issue a STARTTLS command first)"
        )


def test_tls_refusal_at_rcpt_is_transient_in_clear_only() -> None:
    clear, tls = Transaction(["a", "b"], 1.0, clear=True), Transaction(["a"], 1.0, clear=False)
    clear.rcpt(0, Reply(250, None, "ok", "RCPT TO"))
    clear.rcpt(1, Reply(550, "5.7.0", "Encryption required: use STARTTLS", "RCPT TO"))
    tls.mail(Reply(530, "5.7.0", "Authentication required", "MAIL FROM"))
    softened = clear.result(Reply(250, None, "delivered")).replies[1]
    kept = tls.result().replies[0]
    assert (softened.code, softened.enhanced_code, softened.command) == (451, "4.7.0", "RCPT TO")
    assert softened.text.endswith("(550 5.7.0 Encryption required: use STARTTLS)")
    assert kept.code == 530


@pytest.mark.parametrize(
    ("reply", "tls"),
    [
        (Reply(530, None, "Must issue a STARTTLS command first"), True),
        (Reply(530, "5.7.0", "Authentication required"), True),
        (Reply(550, "5.7.0", "TLS required for this domain"), True),
        (Reply(554, "5.7.1", "Please use STARTTLS"), True),
        (Reply(550, "5.7.0", "see https://example.test/policy"), False),
        (Reply(550, "5.1.1", "No such user"), False),
        (Reply(451, "4.7.0", "TLS required, try later"), False),
    ],
)
def test_wants_tls(reply: Reply, tls: bool) -> None:
    assert wants_tls(reply) is tls


def test_too_many() -> None:
    assert too_many(Reply(452, "4.5.3", "Too many recipients"))
    assert too_many(Reply(452, None, "Too many recipients"))
    assert too_many(Reply(552, "5.5.3", "Too many recipients"))
    assert not too_many(Reply(452, "4.2.2", "Mailbox full"))
    assert not too_many(Reply(552, "5.2.2", "Mailbox full"))


# -- pipelining and extensions over TLS ------------------------------------------------------


def test_pipelined_transactions_over_tls_use_the_new_extensions(loop_run: Runner, pki: Pki) -> None:
    async def go() -> tuple[Scripted, SMTPClient, list[int]]:
        async with Scripted(
            "PIPELINING",
            "STARTTLS",
            tls_context=pki.good,
            tls_extensions=("PIPELINING", "SIZE 100000", "8BITMIME"),
        ) as peer:
            client = SMTPClient()
            await client.connect(
                "127.0.0.1",
                peer.port,
                source_address=None,
                ehlo_domain="c.test",
                tls=policy(pki, "Required"),
            )
            assert client.max_size == 100000 and client.pipelining
            nxt = ("s2@c.test", ["b@mx.example.test"], BODY)
            one = await client.send_transaction("s1@c.test", ["a@mx.example.test"], BODY, then=nxt)
            two = await client.send_transaction(*nxt)
            await client.quit()
            return peer, client, [one.replies[0].code, two.replies[0].code]

    peer, client, codes = loop_run(go)
    assert codes == [250, 250] and len(peer.messages) == 2
    assert client.tls is not None and client.tls.verified
    verbs = [line.split(b" ")[0].strip() for line in peer.lines]
    assert verbs[:3] == [b"EHLO", b"STARTTLS", b"EHLO"]
    assert peer.lines[3].endswith(b" SIZE=%d\r\n" % len(BODY))


# -- policy and contexts ---------------------------------------------------------------------


def test_policy_validation_and_shared_contexts(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not one of Opportunistic"):
        TlsPolicy("opportunistic")
    with pytest.raises(ValueError, match="invalid TLS server name"):
        TlsPolicy(server_hostname="mx example.test")
    assert TlsPolicy(server_hostname="mx.example.test.").server_hostname == MX
    assert TlsPolicy().mode == "Opportunistic" and TlsPolicy().verify
    verified = context_for(policy(pki, "Opportunistic"))
    assert verified is context_for(policy(pki, "Required", "other.test"))
    assert verified.verify_mode == ssl.CERT_REQUIRED and verified.check_hostname
    insecure = context_for(policy(pki, "OpportunisticInsecure"))
    assert insecure is context_for(TlsPolicy("RequiredInsecure"))
    assert insecure.verify_mode == ssl.CERT_NONE and not insecure.check_hostname
    for ctx in (verified, insecure):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    # A CA file replaced in place is read again.
    rotated = tmp_path / "ca.pem"
    rotated.write_bytes(Path(pki.ca_file).read_bytes())
    first = context_for(TlsPolicy(ca_file=str(rotated)))
    assert context_for(TlsPolicy(ca_file=str(rotated))) is first
    stat = rotated.stat()
    os.utime(rotated, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert context_for(TlsPolicy(ca_file=str(rotated))) is not first


def test_unreadable_ca_file_fails_before_connecting(tmp_path: Path) -> None:
    client = SMTPClient()
    for path, why in ((tmp_path / "missing.pem", "No such file"), (tmp_path / "bad.pem", "")):
        if why == "":
            path.write_text("not a certificate\n")
        tls = TlsPolicy(ca_file=str(path))
        with pytest.raises(ValueError, match=f"TLS CA file {path}: {why}"):
            _asyncio_run(
                lambda tls=tls: client.connect(  # type: ignore[misc]
                    "127.0.0.1", 1, source_address=None, ehlo_domain="c.test", tls=tls
                )
            )
    assert not client.usable


def test_tls_errors_are_delivery_errors() -> None:
    err = TlsHandshakeError("x", None, "192.0.2.1")
    assert isinstance(err, DeliveryError) and err.transient and err.code == "tls_handshake"
    assert err.to_dict() == {
        "type": "TlsHandshakeError",
        "code": "tls_handshake",
        "message": "x",
        "transient": True,
        "host": None,
        "address": "192.0.2.1",
    }


# -- subject names ---------------------------------------------------------------------------


def _der_with_subject(subject: x509.Name) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(Encoding.DER)


@pytest.mark.parametrize(
    "attrs",
    [
        [(NameOID.COUNTRY_NAME, "DE"), (NameOID.ORGANIZATION_NAME, 'A, "B"+ <c>; #d ')],
        [(NameOID.DOMAIN_COMPONENT, "test"), (NameOID.ORGANIZATIONAL_UNIT_NAME, "#x")],
        [(NameOID.ORGANIZATION_NAME, "Zürich Mail"), (NameOID.SERIAL_NUMBER, "42")],
    ],
)
def test_subject_name_matches_rfc4514(attrs: list[tuple[x509.ObjectIdentifier, str]]) -> None:
    name = x509.Name([x509.NameAttribute(oid, value) for oid, value in attrs])
    got = subject_name(_der_with_subject(name))
    assert got is not None
    assert got == name.rfc4514_string()
    cn = x509.Name([*name.rdns, x509.RelativeDistinguishedName([_cn("mx.test")])])
    assert subject_name(_der_with_subject(cn)) == "mx.test"
    assert subject_name(b"\x30\x03abc") is None and subject_name(None) is None


def _cn(value: str) -> x509.NameAttribute[str]:
    return x509.NameAttribute(NameOID.COMMON_NAME, value)
