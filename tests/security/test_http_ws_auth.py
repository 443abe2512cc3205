"""HTTP (both engines) and WebSocket identity and authorization, in-process
over real loopback TCP under the autojump clock (each test asks for
``autojump_clock`` itself, so pytest-trio runs it under that clock)."""
from __future__ import annotations

import base64
import json

import pytest
import trio
import trio_websocket

from gridgate.config import AuthConfig, ConnectionsConfig, HTTPConfig, WebSocketConfig
from gridgate.security.passwords import format_line, hash_password
from inprocess import post, read_response
from security.jwt_helpers import make_key, public_pem, token

DELAY_S = 1.0
LONG = 10_000_000.0


def basic(user: str, password: str) -> bytes:
    return b"Authorization: Basic " + base64.b64encode(f"{user}:{password}".encode()) + b"\r\n"


def bearer(tok: str) -> bytes:
    return b"Authorization: Bearer " + tok.encode() + b"\r\n"


@pytest.fixture(params=["fast", "std"])
def engine(request) -> str:
    return request.param


@pytest.fixture
def jwt_key():
    return make_key("EdDSA")


@pytest.fixture
def gateway(start_gateway, tmp_path, engine, jwt_key):
    (tmp_path / "passwd").write_text(format_line("meter-1", hash_password(b"one pw"))
                                     + format_line("edge-1", hash_password(b"edge")))
    (tmp_path / "keys.json").write_text(json.dumps({"meter-4": public_pem(jwt_key)}))
    (tmp_path / "acl").write_text("user edge-1\ntopic write devices/+/telemetry\n"
                                  "pattern write devices/%u/telemetry\n")

    async def start(**auth):
        auth.setdefault("failure_delay_ms", int(DELAY_S * 1000))
        auth.setdefault("ban_s", LONG)
        gw = await start_gateway(
            # the spool commits on a thread: meanwhile the autojump clock leaps to the next
            # deadline, and a 30 s durable timeout would answer 503 (tests/autojump.py).
            # Likewise the 30 s WebSocket ping: one that reaches a trio-websocket client
            # while it closes is answered with a Pong that wsproto refuses in LOCAL_CLOSING,
            # failing the client's reader (seen once in CI)
            http=HTTPConfig(listen="127.0.0.1:0", engine=engine, durable_timeout_s=LONG),
            websocket=WebSocketConfig(listen="127.0.0.1:0", ping_interval_s=LONG),
            connections=ConnectionsConfig(idle_timeout_s=LONG, reap_interval_s=LONG / 10),
            auth=AuthConfig(password_file=str(tmp_path / "passwd"), jwt_keys_file=str(tmp_path / "keys.json"),
                            acl_file=str(tmp_path / "acl"), **auth))
        return gw
    return start


async def exchange(gw, request: bytes, source: str = "127.0.0.1") -> tuple[int, dict, dict, float]:
    """One request on a fresh connection: status, headers, JSON body, virtual seconds taken."""
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect(gw.addresses["http"])
    stream = trio.SocketStream(sock)
    start = trio.current_time()
    await stream.send_all(request)
    status, headers, body = await read_response(stream, bytearray())
    await stream.aclose()
    return status, headers, json.loads(body), trio.current_time() - start


async def counts(gw) -> tuple[int, int]:
    stats = await gw.spool.stats()
    return stats["records"], stats["rejected"]


async def test_missing_or_invalid_credentials_are_401_and_store_nothing(autojump_clock, gateway):
    gw = await gateway()
    for extra, delayed in [(b"", False), (basic("meter-1", "wrong"), True), (basic("meter-9", "one pw"), True),
                           (basic("meter-1", "x" * 2000), True), (b"Authorization: Digest x\r\n", True),
                           (bearer("eyJhbGciOiJub25lIn0.eyJzdWIiOiJtZXRlci00In0."), True)]:
        status, headers, body, took = await exchange(gw, post(b'{"device_id": "meter-1", "battery_mv": 1}', extra))
        assert status == 401, extra
        assert headers["www-authenticate"].startswith("Bearer realm=")
        assert body["error"] == "unauthorized"
        assert (DELAY_S <= took < DELAY_S + 0.1) if delayed else took < 0.1
    # a 64 KiB password does not even fit a request head (max_header_bytes): 431 at once
    status, _, _, took = await exchange(gw, post(b"{}", basic("meter-1", "x" * 65_535)))
    assert status == 431 and took < 0.1
    assert await counts(gw) == (0, 0)
    # open endpoints stay open
    status, _, body, _ = await exchange(gw, b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert status == 200


async def test_basic_and_bearer_are_accepted_and_cached(autojump_clock, gateway, jwt_key):
    gw = await gateway()
    status, _, body, _ = await exchange(gw, post(b'{"device_id": "meter-1", "battery_mv": 1}',
                                                 basic("meter-1", "one pw")))
    assert (status, body["accepted"]) == (202, 1)
    tok = token(jwt_key, "EdDSA", sub="meter-4")
    for _ in range(3):
        status, _, body, _ = await exchange(gw, post(b'{"device_id": "meter-4", "battery_mv": 2}', bearer(tok)))
        assert (status, body["accepted"]) == (202, 1)
    value = gw.metrics.registry.get_sample_value
    assert value("gridgate_auth_cache_hits_total", {"protocol": "http"}) == 2
    assert await counts(gw) == (4, 0)


async def test_each_reading_is_judged_alone(autojump_clock, gateway):
    gw = await gateway()
    batch = json.dumps([{"device_id": "meter-1", "battery_mv": 1}, {"device_id": "meter-2", "battery_mv": 2},
                        {"device_id": "meter-1", "battery_mv": "bad"}, {"device_id": "meter-3", "battery_mv": 3},
                        {"device_id": "meter-1", "battery_mv": 4}]).encode()
    status, _, body, _ = await exchange(gw, post(batch, basic("meter-1", "one pw")))
    assert status == 202 and (body["accepted"], body["rejected"]) == (2, 3)
    assert [(e["index"], e["reason"]) for e in body["errors"]] == [(1, "not_authorized"), (2, "bad_type"),
                                                                   (3, "not_authorized")]
    assert await counts(gw) == (2, 3)
    rows = list(gw.spool.spool.iter_rejections())
    refused = sorted(r["device_id"] for r in rows if r["reason"] == "not_authorized")
    assert refused == ["meter-2", "meter-3"]
    assert all(b"one pw" not in json.dumps(r).encode() for r in rows)          # no secret in dead letters
    # an edge gateway the ACL lets write for every meter
    status, _, body, _ = await exchange(gw, post(batch, basic("edge-1", "edge")))
    assert (body["accepted"], body["rejected"]) == (4, 1)


async def test_a_banned_address_gets_403_at_once_and_others_are_served(autojump_clock, gateway):
    gw = await gateway(failures_before_ban=3)
    for _ in range(3):
        assert (await exchange(gw, post(extra=basic("meter-1", "wrong"))))[0] == 401
    status, _, body, took = await exchange(gw, post(b'{"device_id": "meter-1"}', basic("meter-1", "one pw")))
    assert (status, body["error"]) == (403, "banned") and took < 0.1
    status, _, body, _ = await exchange(gw, post(b'{"device_id": "meter-1", "battery_mv": 1}',
                                                 basic("meter-1", "one pw")), source="127.0.0.2")
    assert status == 202
    assert await counts(gw) == (1, 0)


async def ws_open(gw, device_id: str, headers: list[tuple[bytes, bytes]]):
    host, port = gw.addresses["ws"]
    return trio_websocket.open_websocket(host, port, f"/v1/ws?device_id={device_id}", use_ssl=False,
                                         extra_headers=headers)


async def test_websocket_upgrades(autojump_clock, gateway, jwt_key):
    # (runs beside either HTTP engine: the WebSocket listener does not depend on it)
    gw = await gateway()
    tok = token(jwt_key, "EdDSA", sub="meter-4")
    for headers, device, status in [([], "meter-4", 401),
                                    ([(b"Authorization", b"Bearer nope.nope.nope")], "meter-4", 401),
                                    ([(b"Authorization", f"Bearer {tok}".encode())], "meter-1", 403)]:
        with pytest.raises(trio_websocket.ConnectionRejected) as info:
            async with await ws_open(gw, device, headers):
                pass
        assert info.value.status_code == status
        if status == 401:
            assert any(k.lower() == b"www-authenticate" for k, _ in info.value.headers)
    async with await ws_open(gw, "meter-4", [(b"Authorization", f"Bearer {tok}".encode())]) as ws:
        await ws.send_message(json.dumps({"seq": 1, "readings": [{"battery_mv": 5}]}))
        assert json.loads(await ws.get_message())["accepted"] == 1
    assert await counts(gw) == (1, 0)


async def test_a_verified_client_certificate_is_the_identity(autojump_clock, gateway, nursery):
    """https and wss: the certificate's CN, before any Authorization header
    (the TLS listener hands the connection the trio.SSLStream it made)."""
    import ssl

    import trio.testing
    import trustme

    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("gridgate.test").configure_cert(server_ctx)
    ca.configure_trust(server_ctx)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    ca.issue_cert("meter-1.devices", common_name="meter-1").configure_cert(client_ctx)
    gw = await gateway()

    async def tls_stream(handler) -> trio.SSLStream:
        client_raw, server_raw = trio.testing.memory_stream_pair()
        server = trio.SSLStream(server_raw, server_ctx, server_side=True, https_compatible=True)
        client = trio.SSLStream(client_raw, client_ctx, server_hostname="gridgate.test", https_compatible=True)

        async def serve() -> None:
            await server.do_handshake()
            await handler(server)
        nursery.start_soon(serve)
        return client

    client = await tls_stream(gw.handle_http)
    batch = json.dumps([{"device_id": "meter-1", "battery_mv": 1}, {"device_id": "meter-2", "battery_mv": 2}])
    # no Authorization header; a wrong one is not even looked at
    await client.send_all(post(batch.encode()) + post(batch.encode(), basic("meter-1", "wrong")))
    buf = bytearray()
    for _ in range(2):
        status, _, body = await read_response(client, buf)
        answer = json.loads(body)
        assert status == 202 and (answer["accepted"], answer["errors"][0]["reason"]) == (1, "not_authorized")
    client = await tls_stream(gw.handle_ws)
    async with trio.open_nursery() as ws_nursery:
        ws = await trio_websocket.wrap_client_stream(ws_nursery, client, "gridgate.test", "/v1/ws?device_id=meter-1")
        await ws.send_message(json.dumps({"seq": 1, "readings": [{"battery_mv": 5}]}))
        assert json.loads(await ws.get_message())["accepted"] == 1
        await ws.aclose()
    # MQTT over wss (/mqtt): the certificate is the identity of its CONNECT too
    from mqtt_frames import gen_connack, gen_connect
    for client_id, code in (("meter-1", 0), ("meter-2", 5)):
        client = await tls_stream(gw.handle_ws)
        async with trio.open_nursery() as ws_nursery:
            ws = await trio_websocket.wrap_client_stream(ws_nursery, client, "gridgate.test", "/mqtt",
                                                         subprotocols=["mqtt"])
            await ws.send_message(gen_connect(client_id))
            assert await ws.get_message() == gen_connack(code)
            await ws.aclose()
    assert await counts(gw) == (3, 2)
    value = gw.metrics.registry.get_sample_value
    assert value("gridgate_auth_successes_total", {"protocol": "http", "method": "certificate"}) == 1
    assert value("gridgate_auth_successes_total", {"protocol": "ws", "method": "certificate"}) == 1
    assert value("gridgate_auth_successes_total", {"protocol": "mqtt-ws", "method": "certificate"}) == 2


async def test_an_operator_sees_and_lifts_an_address_ban(autojump_clock, start_gateway, tmp_path, engine):
    from gridgate.config import AdminConfig
    from gridgate.security.admin_tokens import entry_toml, new_token

    (tmp_path / "passwd").write_text(format_line("meter-1", hash_password(b"one pw")))
    admin = new_token()
    (tmp_path / "admin.toml").write_text(entry_toml("ops", admin, ["bans:write"]))
    gw = await start_gateway(
        http=HTTPConfig(listen="127.0.0.1:0", engine=engine, durable_timeout_s=LONG),
        connections=ConnectionsConfig(idle_timeout_s=LONG, reap_interval_s=LONG / 10),
        auth=AuthConfig(password_file=str(tmp_path / "passwd"), failure_delay_ms=1000, failures_before_ban=3,
                        ban_s=600),
        admin=AdminConfig(tokens_file=str(tmp_path / "admin.toml")))
    for _ in range(3):
        assert (await exchange(gw, post(extra=basic("meter-1", "wrong"))))[0] == 401
    as_admin = b"Authorization: Bearer " + admin.encode() + b"\r\n"
    get_bans = b"GET /v1/bans HTTP/1.1\r\nHost: gw\r\n" + as_admin + b"\r\n"
    status, _, body, _ = await exchange(gw, get_bans, source="127.0.0.2")
    assert status == 200
    [ban] = body["bans"]
    assert (ban["kind"], ban["key"], ban["reason"]) == ("address", "127.0.0.1", "auth_failures")
    assert 590 < ban["expires_in_s"] <= 600
    # device credentials never open the admin API
    status, _, _, _ = await exchange(gw, b"GET /v1/bans HTTP/1.1\r\nHost: gw\r\n" + basic("meter-1", "one pw")
                                     + b"\r\n", source="127.0.0.2")
    assert status == 401
    lift = b"DELETE /v1/bans/address/127.0.0.1 HTTP/1.1\r\nHost: gw\r\n" + as_admin + b"\r\n"
    assert (await exchange(gw, lift, source="127.0.0.2"))[0] == 200
    assert (await exchange(gw, lift, source="127.0.0.2"))[0] == 404
    status, _, _, _ = await exchange(gw, post(b'{"device_id": "meter-1", "battery_mv": 1}', basic("meter-1", "one pw")))
    assert status == 202
