"""gridgate.security.tls on its own: the server context of [tls], the
handshake under its timeout (real OpenSSL handshakes over in-memory stream
pairs, so time is the autojump clock's), and the identity of a client
certificate."""
from __future__ import annotations

import datetime as dt
import ssl
import tempfile
from pathlib import Path

import pytest
import trio
import trio.testing

from gridgate.config import ConfigError, TLSConfig
from gridgate.observability.metrics import Metrics
from gridgate.security.tls import certificate_identity, handshake, server_context
from security.pki import CA, Leaf

UTC = dt.UTC


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA("ecdsa")


def config_for(tmp_path, server: Leaf, **kw) -> TLSConfig:
    cert, key = server.write(tmp_path, "server")
    return TLSConfig(cert_file=cert, key_file=key, **kw)


def client_context(ca: CA, leaf: Leaf | None = None, **versions) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca.cert_pem.decode())
    if leaf is not None:
        with tempfile.TemporaryDirectory() as tmp:          # read at once: the files can go
            ctx.load_cert_chain(*leaf.write(Path(tmp), "client"))
    for name, value in versions.items():
        setattr(ctx, name, value)
    return ctx


def failures(metrics: Metrics, reason: str, listener: str = "mqtts") -> float:
    return metrics.registry.get_sample_value("gridgate_tls_handshake_failures_total",
                                             {"listener": listener, "reason": reason}) or 0.0


def handshakes_done(metrics: Metrics, listener: str = "mqtts") -> float:
    return metrics.registry.get_sample_value("gridgate_tls_handshake_seconds_count", {"listener": listener}) or 0.0


async def run_handshake(context: ssl.SSLContext, client: ssl.SSLContext | bytes | None, metrics: Metrics,
                        timeout_s: float = 10.0) -> tuple[bool, trio.SSLStream, BaseException | None]:
    """The gateway's handshake against a real client over a memory stream
    pair; ``client`` bytes are sent raw (plaintext), None sends nothing."""
    client_end, server_end = trio.testing.memory_stream_pair()
    server = trio.SSLStream(server_end, context, server_side=True, https_compatible=True)
    result: list[bool] = []
    client_error: list[BaseException] = []

    async def serve() -> None:
        result.append(await handshake(server, listener="mqtts", timeout_s=timeout_s, metrics=metrics))
        if result[0]:
            await server.send_all(b"pong")
        else:
            await trio.aclose_forcefully(server)

    async def connect() -> None:
        if isinstance(client, ssl.SSLContext):
            stream = trio.SSLStream(client_end, client, server_hostname="localhost")
            try:
                await stream.do_handshake()
                # TLS 1.3: the server judges the client certificate after the
                # client's handshake is done; a read shows its verdict
                assert await stream.receive_some(4) == b"pong"
            except trio.BrokenResourceError as exc:
                client_error.append(exc)
                # as a real client's socket closes (trio's client leaves its own alert unsent)
                await trio.aclose_forcefully(stream)
        elif client == b"close":
            await client_end.aclose()
        elif client is not None:
            await client_end.send_all(client)
            with trio.move_on_after(timeout_s + 1):
                while await client_end.receive_some(1024):
                    pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        nursery.start_soon(connect)
    return result[0], server, client_error[0] if client_error else None


# -- the context -------------------------------------------------------------------


def test_context_is_tls12_plus_intermediate_suites_no_compression_no_renegotiation(tmp_path, ca):
    ctx = server_context(config_for(tmp_path, ca.server()))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_COMPRESSION
    assert ctx.options & ssl.OP_NO_RENEGOTIATION
    # the stdlib's defaults are kept (buffers released after the handshake is one of them, not visible here)
    assert ctx.options & ssl.OP_ENABLE_MIDDLEBOX_COMPAT
    assert ctx.verify_mode == ssl.CERT_NONE
    suites = ctx.get_ciphers()
    tls12 = sorted(s["name"] for s in suites if s["protocol"] == "TLSv1.2")
    assert tls12 == sorted(["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
                            "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
                            "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305"])
    assert all(s["aead"] for s in suites)
    assert {s["protocol"] for s in suites} == {"TLSv1.2", "TLSv1.3"}


def test_min_version_13_and_client_certificates(tmp_path, ca):
    (tmp_path / "crl.pem").write_bytes(ca.crl([]))
    ctx = server_context(config_for(tmp_path, ca.server(), min_version="1.3", client_ca_file=ca.write(tmp_path),
                                    require_client_cert=True, crl_file=str(tmp_path / "crl.pem")))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.verify_flags & ssl.VERIFY_CRL_CHECK_LEAF
    optional = server_context(config_for(tmp_path, ca.server(), client_ca_file=ca.write(tmp_path)))
    assert optional.verify_mode == ssl.CERT_OPTIONAL
    assert not optional.verify_flags & ssl.VERIFY_CRL_CHECK_LEAF


def test_every_unusable_file_is_one_problem_naming_it_and_no_key_material(tmp_path, ca):
    server = ca.server()
    other = ca.server()
    cert, _ = server.write(tmp_path, "server")
    _, other_key = other.write(tmp_path, "other")
    (tmp_path / "ca-empty.pem").write_text("not a certificate\n")
    (tmp_path / "crl-is-a-cert.pem").write_bytes(ca.cert_pem)
    tls = TLSConfig(cert_file=cert, key_file=other_key, client_ca_file=str(tmp_path / "ca-empty.pem"),
                    crl_file=str(tmp_path / "crl-is-a-cert.pem"))
    with pytest.raises(ConfigError) as info:
        server_context(tls)
    problems = info.value.problems
    assert len(problems) == 3, problems
    assert problems[0] == f"tls.cert_file {cert} / tls.key_file {other_key}: the key does not belong to the certificate"
    assert problems[1] == f"tls.client_ca_file {tmp_path / 'ca-empty.pem'}: no PEM CERTIFICATE in it"
    assert problems[2] == (f"tls.crl_file {tmp_path / 'crl-is-a-cert.pem'}: "
                           "must hold PEM X509 CRL blocks and nothing else")
    key_body = other.key_pem.decode().splitlines()[1]
    assert key_body not in str(info.value)
    (tmp_path / "garbage.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(ConfigError) as info:
        server_context(TLSConfig(cert_file=str(tmp_path / "garbage.pem"), key_file=other_key))
    (problem,) = info.value.problems
    assert problem.startswith(f"tls.cert_file {tmp_path / 'garbage.pem'} / tls.key_file {other_key}: [SSL]"), problem


def test_missing_files_and_an_encrypted_key_are_problems_not_a_prompt(tmp_path, ca):
    from cryptography.hazmat.primitives import serialization

    server = ca.server()
    cert, _ = server.write(tmp_path, "server")
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(server.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret-pass")))
    with pytest.raises(ConfigError) as info:
        server_context(TLSConfig(cert_file=cert, key_file=str(encrypted)))
    (problem,) = info.value.problems
    assert problem == (f"tls.cert_file {cert} / tls.key_file {encrypted}: the key is encrypted; "
                       "gridgate needs an unencrypted PEM key (protect the file instead)")
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError) as info:
        server_context(TLSConfig(cert_file=str(missing), key_file=str(missing), client_ca_file=str(missing),
                                 crl_file=str(missing)))
    assert info.value.problems == [
        f"tls.cert_file {missing} / tls.key_file {missing}: No such file or directory",
        f"tls.client_ca_file {missing}: No such file or directory",
        f"tls.crl_file {missing}: No such file or directory",
    ]


# -- handshakes ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ecdsa", "rsa"])
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_handshake_with_ecdsa_and_rsa_certificates(tmp_path, ca, kind, version):
    metrics = Metrics()
    ctx = server_context(config_for(tmp_path, ca.server(kind)))
    ok, server, error = await run_handshake(ctx, client_context(ca, maximum_version=version), metrics)
    assert ok and error is None
    assert server.version() == {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
    cipher = server.cipher()[0]
    if version == ssl.TLSVersion.TLSv1_2:
        assert cipher.startswith("ECDHE-ECDSA-" if kind == "ecdsa" else "ECDHE-RSA-"), cipher
    assert certificate_identity(server, "cn") is None          # no client certificate asked for
    assert handshakes_done(metrics) == 1


async def test_tls13_is_chosen_when_the_client_offers_it(tmp_path, ca):
    ok, server, _ = await run_handshake(server_context(config_for(tmp_path, ca.server())), client_context(ca),
                                        Metrics())
    assert ok and server.version() == "TLSv1.3"


async def test_min_version_13_refuses_a_tls12_client(tmp_path, ca):
    metrics = Metrics()
    ctx = server_context(config_for(tmp_path, ca.server(), min_version="1.3"))
    ok, _, error = await run_handshake(ctx, client_context(ca, maximum_version=ssl.TLSVersion.TLSv1_2), metrics)
    assert not ok and error is not None
    assert failures(metrics, "protocol_version") == 1
    assert handshakes_done(metrics) == 0


async def test_a_tls11_client_is_refused(tmp_path, ca):
    metrics = Metrics()
    client = client_context(ca)
    with pytest.warns(DeprecationWarning):
        client.minimum_version = ssl.TLSVersion.TLSv1
        client.maximum_version = ssl.TLSVersion.TLSv1_1
    client.set_ciphers("ALL:@SECLEVEL=0")
    ok, _, _ = await run_handshake(server_context(config_for(tmp_path, ca.server())), client, metrics)
    assert not ok
    assert failures(metrics, "protocol_version") == 1


@pytest.mark.parametrize("plaintext", [
    b"\x10\x10\x00\x04MQTT\x04\x02\x00\x3c\x00\x04abcd",                   # an MQTT CONNECT
    b"POST /v1/telemetry HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n\r\n{}",
    b"GET /v1/ws HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\n\r\n",
], ids=["mqtt", "http", "ws-upgrade"])
async def test_plaintext_is_refused_at_once_and_counted(tmp_path, ca, plaintext, autojump_clock):
    metrics = Metrics()
    start = trio.current_time()
    ok, _, _ = await run_handshake(server_context(config_for(tmp_path, ca.server())), plaintext, metrics)
    assert not ok
    assert trio.current_time() == start             # refused at its first bytes, not at the timeout
    assert failures(metrics, "plaintext") == 1


async def test_a_stalling_client_is_dropped_exactly_at_the_timeout(tmp_path, ca, autojump_clock):
    metrics = Metrics()
    ctx = server_context(config_for(tmp_path, ca.server(), handshake_timeout_s=10))
    start = trio.current_time()
    ok, _, _ = await run_handshake(ctx, None, metrics, timeout_s=10.0)
    assert not ok
    assert trio.current_time() == start + 10.0
    assert failures(metrics, "timeout") == 1


async def test_a_client_that_sends_half_a_client_hello_is_dropped_at_the_timeout(tmp_path, ca, autojump_clock):
    # the start of a real ClientHello: a record header promising 512 bytes, then silence
    metrics = Metrics()
    start = trio.current_time()
    ok, _, _ = await run_handshake(server_context(config_for(tmp_path, ca.server())),
                                   b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", metrics, timeout_s=2.5)
    assert not ok
    assert trio.current_time() == start + 2.5
    assert failures(metrics, "timeout") == 1


# -- client certificates -------------------------------------------------------------------


def mtls_context(tmp_path, ca: CA, *, required: bool = True, revoked: list[Leaf] | None = None,
                 identity: str = "cn") -> ssl.SSLContext:
    crl = ""
    if revoked is not None:
        (tmp_path / "crl.pem").write_bytes(ca.crl(revoked))
        crl = str(tmp_path / "crl.pem")
    return server_context(config_for(tmp_path, ca.server(), client_ca_file=ca.write(tmp_path),
                                     require_client_cert=required, crl_file=crl, identity=identity))


async def test_a_client_certificate_of_the_ca_is_accepted_and_names_the_device(tmp_path, ca):
    metrics = Metrics()
    leaf = ca.issue(cn="meter-7", dns=("meter-7.devices.example",), uris=("urn:dev:meter-7",))
    ok, server, error = await run_handshake(mtls_context(tmp_path, ca, revoked=[]), client_context(ca, leaf), metrics)
    assert ok and error is None
    assert certificate_identity(server, "cn") == "meter-7"
    assert certificate_identity(server, "san") == "meter-7.devices.example"


@pytest.mark.parametrize("make, reason", [
    (lambda ca, other: other.issue(cn="meter-1"), "unknown_ca"),
    (lambda ca, other: ca.issue(cn="meter-1", not_before=dt.datetime(2020, 1, 1, tzinfo=UTC),
                                not_after=dt.datetime(2021, 1, 1, tzinfo=UTC)), "bad_certificate"),
    (lambda ca, other: None, "no_certificate"),
], ids=["wrong-ca", "expired", "none"])
async def test_refused_client_certificates_are_counted_by_reason(tmp_path, ca, make, reason):
    metrics = Metrics()
    leaf = make(ca, CA("ecdsa", "another CA"))
    ok, _, error = await run_handshake(mtls_context(tmp_path, ca), client_context(ca, leaf), metrics)
    assert not ok
    assert isinstance(error, trio.BrokenResourceError)      # the client is told, not left hanging
    assert failures(metrics, reason) == 1
    assert handshakes_done(metrics) == 0


async def test_a_revoked_client_certificate_is_refused_and_another_still_accepted(tmp_path, ca):
    metrics = Metrics()
    revoked, good = ca.issue(cn="meter-1"), ca.issue(cn="meter-2")
    ctx = mtls_context(tmp_path, ca, revoked=[revoked])
    ok, _, error = await run_handshake(ctx, client_context(ca, revoked), metrics)
    assert not ok
    assert failures(metrics, "revoked") == 1
    # the device is told why (the alert trio.SSLStream left unsent is sent)
    assert isinstance(error.__cause__, ssl.SSLError) and error.__cause__.reason == "SSLV3_ALERT_CERTIFICATE_REVOKED"
    ok, server, _ = await run_handshake(ctx, client_context(ca, good), metrics)
    assert ok and certificate_identity(server, "cn") == "meter-2"


async def test_an_optional_client_certificate_may_be_absent(tmp_path, ca):
    ok, server, _ = await run_handshake(mtls_context(tmp_path, ca, required=False), client_context(ca), Metrics())
    assert ok
    assert certificate_identity(server, "cn") is None
    assert certificate_identity(server, "san") is None


@pytest.mark.parametrize("names, cn, san", [
    ({"cn": "meter-1"}, "meter-1", None),
    ({"cn": ["meter-1", "meter-2"]}, None, None),                  # two CNs: which is the device is a guess
    ({"uris": ("urn:dev:meter-9",), "dns": ()}, None, "urn:dev:meter-9"),
    ({"cn": "meter-1", "ips": ("10.0.0.1",), "dns": ("meter-1.example",)}, "meter-1", "meter-1.example"),
    ({"ips": ("10.0.0.1",)}, None, None),                          # an IP SAN is no device id
], ids=["cn", "two-cns", "uri", "ip-then-dns", "ip-only"])
async def test_certificate_identity(tmp_path, ca, names, cn, san):
    leaf = ca.issue(**names)
    ok, server, _ = await run_handshake(mtls_context(tmp_path, ca), client_context(ca, leaf), Metrics())
    assert ok
    assert certificate_identity(server, "cn") == cn
    assert certificate_identity(server, "san") == san


async def test_an_optional_client_certificate_that_is_sent_is_still_verified(tmp_path, ca):
    metrics = Metrics()
    stranger = CA("ecdsa", "another CA").issue(cn="meter-1")
    ok, _, _ = await run_handshake(mtls_context(tmp_path, ca, required=False), client_context(ca, stranger), metrics)
    assert not ok
    assert failures(metrics, "unknown_ca") == 1


async def test_a_crl_file_without_the_issuers_crl_refuses_its_certificates(tmp_path, ca):
    # VERIFY_CRL_CHECK_LEAF: no CRL for the issuer is no proof it is not revoked
    metrics = Metrics()
    other = CA("ecdsa", "another CA")
    (tmp_path / "crl.pem").write_bytes(other.crl([]))
    ctx = server_context(config_for(tmp_path, ca.server(), client_ca_file=ca.write(tmp_path),
                                    require_client_cert=True, crl_file=str(tmp_path / "crl.pem")))
    ok, _, _ = await run_handshake(ctx, client_context(ca, ca.issue(cn="meter-1")), metrics)
    assert not ok
    assert failures(metrics, "crl") == 1


async def test_a_client_that_goes_away_or_refuses_our_certificate_is_closed(tmp_path, ca):
    metrics = Metrics()
    ctx = server_context(config_for(tmp_path, ca.server()))
    ok, _, _ = await run_handshake(ctx, b"close", metrics)          # a port probe: connect, close
    assert not ok
    distrustful = ssl.create_default_context(cadata=CA("ecdsa", "another CA").cert_pem.decode())
    ok, _, error = await run_handshake(ctx, distrustful, metrics)   # it does not trust our CA: its alert
    assert not ok and isinstance(error, trio.BrokenResourceError)
    assert failures(metrics, "closed") == 2
    assert failures(metrics, "other") == 0
