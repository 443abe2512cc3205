"""TLS for the mqtts, https and wss listeners (DESIGN section 10), on the
standard ``ssl`` module and ``trio.SSLStream``.

- ``server_context(tls)``: the server ``ssl.SSLContext`` of ``[tls]``: TLS 1.2
  and 1.3 (``min_version``), Mozilla's "intermediate" suites for TLS 1.2,
  no compression, no renegotiation, the client CAs and CRL for mutual TLS.
  Every file that cannot be used is a problem of a ``ConfigError``.
- ``handshake(...)``: the server side of one handshake under
  ``handshake_timeout_s``, timed and, when it fails, counted by reason.
- ``certificate_identity(stream, mode)``: the device id a verified client
  certificate names (subject CN or first DNS/URI SAN).
"""
from __future__ import annotations

import logging
import re
import ssl
from typing import Any, Literal

import trio
from cryptography.exceptions import InvalidSignature

from gridgate.config import ConfigError, TLSConfig
from gridgate.observability.metrics import Metrics

__all__ = ["INTERMEDIATE_TLS12_CIPHERS", "server_context", "handshake", "failure_reason", "certificate_identity",
           "CertificateJudge", "peer_certificate"]

log = logging.getLogger("gridgate.security.tls")

# Mozilla's "intermediate" profile (v5.7) for TLS 1.2, without its DHE
# suites: every suite is forward secret (ECDHE) and AEAD (AES-GCM or
# ChaCha20-Poly1305); no CBC, RC4, 3DES, NULL or EXPORT can be negotiated.
# TLS 1.3 suites are OpenSSL's defaults, all AEAD. Both ECDSA and RSA
# server keys have suites here.
INTERMEDIATE_TLS12_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
))

_MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")

# OpenSSL's reasons (ssl.SSLError.reason) for a failed server handshake,
# grouped into the short labels of gridgate_tls_handshake_failures.
_REASONS = {
    # not TLS at all: an MQTT CONNECT, an HTTP request, a proxy's CONNECT
    "WRONG_VERSION_NUMBER": "plaintext", "HTTP_REQUEST": "plaintext", "HTTPS_PROXY_REQUEST": "plaintext",
    "UNKNOWN_PROTOCOL": "plaintext",
    "UNSUPPORTED_PROTOCOL": "protocol_version", "NO_PROTOCOLS_AVAILABLE": "protocol_version",
    "VERSION_TOO_LOW": "protocol_version", "TLSV1_ALERT_PROTOCOL_VERSION": "protocol_version",
    "INAPPROPRIATE_FALLBACK": "protocol_version",    # a downgrade the client itself flagged (TLS_FALLBACK_SCSV)
    # nothing both sides support: suites, signature algorithms or key exchange groups
    "NO_SHARED_CIPHER": "no_shared_cipher", "NO_SUITABLE_SIGNATURE_ALGORITHM": "no_shared_cipher",
    "NO_SUITABLE_KEY_SHARE": "no_shared_cipher", "NO_SHARED_GROUPS": "no_shared_cipher",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no_certificate",
}
# X509 verify codes of a client certificate that was refused
_VERIFY_CODES = {
    23: "revoked",                                   # X509_V_ERR_CERT_REVOKED
    2: "unknown_ca", 19: "unknown_ca", 20: "unknown_ca", 21: "unknown_ca",   # issuer not among client_ca_file
    18: "unknown_ca",                                # self-signed leaf
    3: "crl", 11: "crl", 12: "crl",                  # no CRL for the issuer, CRL not yet valid, CRL expired
}

TLSStream = trio.SSLStream[Any]

# How long the alert of a failed handshake may take to leave; then the
# connection is closed without it.
_ALERT_TIMEOUT_S = 1.0


def _refuse_encrypted_key() -> bytes:
    # Without a password callback OpenSSL would prompt on the terminal and
    # block the start; a service has nobody to answer it.
    raise ValueError("the key is encrypted; gridgate needs an unencrypted PEM key (protect the file instead)")


def _pem_kinds(path: str) -> list[str]:
    with open(path, "rb") as f:
        return [m.group(1).decode() for m in _PEM_BLOCK.finditer(f.read())]


def server_context(tls: TLSConfig) -> ssl.SSLContext:
    """The server context of every TLS listener, from ``[tls]``.

    TLS 1.2 and 1.3 (1.3 when the client offers it; ``min_version = "1.3"``
    refuses 1.2), Mozilla "intermediate" suites for 1.2, no compression, no
    renegotiation. With ``client_ca_file`` a client certificate is asked for
    and verified against it (required with ``require_client_cert``, else
    optional: a client without one still connects); with ``crl_file`` a
    client certificate its issuer revoked is refused (the leaf is checked,
    so every CA of client_ca_file needs its CRL in the file).

    OpenSSL's read and write buffers are released while a connection is
    idle (the stdlib's default, SSL_MODE_RELEASE_BUFFERS): 16 KiB less per
    idle connection.

    Error handling: raises ConfigError listing every file that is missing,
    unreadable or unusable (a key that does not match the certificate, an
    encrypted key, a crl_file without a CRL or with anything but CRLs).
    Messages name the file, never its contents.
    """
    problems: list[str] = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _MIN_VERSIONS[tls.min_version]
    context.set_ciphers(INTERMEDIATE_TLS12_CIPHERS)
    # PROTOCOL_TLS_SERVER sets OP_NO_COMPRESSION already; said again so a
    # change of default cannot bring CRIME back. No renegotiation at all:
    # a client could otherwise make the server redo handshakes at will.
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file, password=_refuse_encrypted_key)
    except (OSError, ssl.SSLError, ValueError) as exc:
        problems.append(f"tls.cert_file {tls.cert_file} / tls.key_file {tls.key_file}: {_describe(exc)}")
    if tls.client_ca_file:
        try:
            if "CERTIFICATE" not in _pem_kinds(tls.client_ca_file):
                raise ValueError("no PEM CERTIFICATE in it")
            context.load_verify_locations(cafile=tls.client_ca_file)
        except (OSError, ssl.SSLError, ValueError) as exc:
            problems.append(f"tls.client_ca_file {tls.client_ca_file}: {_describe(exc)}")
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    if tls.crl_file:
        try:
            kinds = _pem_kinds(tls.crl_file)
            # load_verify_locations takes certificates from the same file:
            # a certificate here would silently become a trusted client CA.
            if not kinds or any(kind != "X509 CRL" for kind in kinds):
                raise ValueError("must hold PEM X509 CRL blocks and nothing else")
            context.load_verify_locations(cafile=tls.crl_file)
        except (OSError, ssl.SSLError, ValueError) as exc:
            problems.append(f"tls.crl_file {tls.crl_file}: {_describe(exc)}")
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    if problems:
        raise ConfigError(problems)
    return context


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason == "KEY_VALUES_MISMATCH":
        return "the key does not belong to the certificate"
    if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, ssl.SSLError):
        return exc.strerror
    return str(exc)


def failure_reason(exc: BaseException) -> str:
    """The short label of a failed server handshake.

    ``plaintext`` (not TLS: an MQTT or HTTP client on the TLS port),
    ``protocol_version`` (SSLv3, TLS 1.0/1.1, or 1.2 under min_version 1.3),
    ``no_shared_cipher`` (no common suite, signature algorithm or key
    exchange group), ``no_certificate`` (required and not sent),
    ``unknown_ca``, ``revoked``, ``crl`` (the issuer's CRL is missing or out
    of date), ``bad_certificate`` (expired, not yet valid, any other refusal
    of the client certificate), ``closed`` (the client went away mid-way,
    as port probes and clients refusing our certificate do), ``other``.
    ``timeout`` is ``handshake``'s own.
    """
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return _VERIFY_CODES.get(cause.verify_code, "bad_certificate")
    if isinstance(cause, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return "closed"
    if isinstance(cause, ssl.SSLError):
        reason = cause.reason or ""
        if reason in _REASONS:
            return _REASONS[reason]
        if reason.startswith(("SSLV3_ALERT_", "TLSV1_ALERT_")) or reason == "UNEXPECTED_EOF_WHILE_READING":
            return "closed"        # the client gave up (it did not trust us, or it only probed)
        return "other"
    if isinstance(cause, OSError):
        return "closed"            # reset by the peer
    return "closed" if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ is None else "other"


async def handshake(stream: TLSStream, *, listener: str, timeout_s: float, metrics: Metrics) -> bool:
    """The server side of ``stream``'s handshake, at most ``timeout_s`` long.

    Returns True once it is done (its time observed in
    ``gridgate_tls_handshake_seconds{listener}``), False when it failed or
    timed out (counted in ``gridgate_tls_handshake_failures{listener,
    reason}``, logged at debug with the reason only); the caller then closes
    the stream. A client that stalls is left at the timeout; one that sends
    plaintext is refused at its first bytes. Never raises for anything the
    client does (Cancelled passes).
    """
    start = trio.current_time()
    failure: str | None = None
    detail = ""
    with trio.move_on_after(timeout_s) as scope:
        try:
            await stream.do_handshake()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            failure = failure_reason(exc)
            detail = str(exc.__cause__ or exc)
    if scope.cancelled_caught:
        failure, detail = "timeout", f"no handshake within {timeout_s:g}s"
    if failure is not None:
        metrics.tls_handshake_failures.labels(listener, failure).inc()
        # The OpenSSL message names reasons, never key material.
        log.debug("%s TLS handshake failed (%s): %s", listener, failure, detail)
        if failure != "timeout":
            await _send_alert(stream)
        return False
    metrics.tls_handshake_seconds.labels(listener).observe(trio.current_time() - start)
    return True


async def _send_alert(stream: TLSStream) -> None:
    """Send the alert OpenSSL wrote for a failed handshake, best effort.

    trio.SSLStream leaves it unsent in its outgoing buffer when the
    handshake raises; sent, it tells a device why (``certificate revoked``,
    ``unknown ca``) instead of a bare close. The buffer is private to Trio:
    should a release rename it, the device gets the bare close again.
    """
    outgoing = getattr(stream, "_outgoing", None)
    if not isinstance(outgoing, ssl.MemoryBIO) or not outgoing.pending:
        return
    with trio.move_on_after(_ALERT_TIMEOUT_S):
        try:
            await stream.transport_stream.send_all(outgoing.read())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


def certificate_identity(stream: TLSStream, mode: Literal["cn", "san"]) -> str | None:
    """The device id of the client certificate verified on ``stream``.

    ``mode = "cn"``: the subject's common name (None when the subject has
    none, or more than one: which would be the device is a guess);
    ``"san"``: the first DNS or URI subjectAltName. None without a verified
    client certificate (no ``client_ca_file``, or an optional one not sent).
    Call it after ``handshake`` returned True.
    """
    cert = stream.getpeercert()
    if not cert:
        return None
    if mode == "cn":
        names = [value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]
        return names[0] if len(names) == 1 and names[0] else None
    for kind, value in cert.get("subjectAltName", ()):
        if kind in ("DNS", "URI") and value:
            return str(value)
    return None


class CertificateJudge:
    """Whether a client certificate verified at some past handshake would
    still be accepted by the current ``[tls]`` (a SIGHUP reload): signed by
    one of ``client_ca_file``'s CAs, not revoked by ``crl_file``, not expired.
    Built once per reload; judging one connection is a dictionary lookup and
    a signature check, no handshake."""

    def __init__(self, tls: TLSConfig) -> None:
        from cryptography import x509

        self._cas: list[x509.Certificate] = []
        self._revoked: dict[bytes, set[int]] = {}          # issuer DER name -> serials
        if tls.client_ca_file:
            with open(tls.client_ca_file, "rb") as f:
                self._cas = x509.load_pem_x509_certificates(f.read())
        if tls.crl_file:
            with open(tls.crl_file, "rb") as f:
                data = f.read()
            for block in re.findall(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", data, re.S):
                crl = x509.load_pem_x509_crl(block)
                serials = self._revoked.setdefault(crl.issuer.public_bytes(), set())
                serials.update(r.serial_number for r in crl)

    def refusal(self, der: bytes) -> str | None:
        """None when the certificate (DER) still passes, else why not:
        ``revoked``, ``unknown_ca`` or ``expired``."""
        import datetime

        from cryptography import x509

        cert = x509.load_der_x509_certificate(der)
        if cert.serial_number in self._revoked.get(cert.issuer.public_bytes(), ()):
            return "revoked"
        if cert.not_valid_after_utc < datetime.datetime.now(datetime.UTC):
            return "expired"
        for ca in self._cas:
            if ca.subject == cert.issuer:
                try:
                    cert.verify_directly_issued_by(ca)
                except (ValueError, TypeError, InvalidSignature):
                    continue
                return None
        return "unknown_ca"


def peer_certificate(stream: object) -> bytes | None:
    """The DER client certificate a TLS handshake of ``stream`` (or of the
    stream it is carried over) verified, if any."""
    if not isinstance(stream, trio.SSLStream):
        stream = getattr(stream, "transport", None)
        if not isinstance(stream, trio.SSLStream):
            return None
    try:
        der = stream.getpeercert(binary_form=True)
    except (ValueError, trio.BrokenResourceError, trio.ClosedResourceError):
        return None
    return der if isinstance(der, bytes) else None
