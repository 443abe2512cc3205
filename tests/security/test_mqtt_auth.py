"""MQTT identity and authorization, in-process over real loopback TCP,
under pytest-trio's autojump clock: the failure delay is measured exactly
and costs no real time.

Each test asks for ``autojump_clock`` itself: pytest-trio runs a test
under the clock only when the test's own arguments hold it.

A note on the clock: while a test waits on a real socket every task is
blocked, so the autojump clock leaps to the next deadline. Bans and idle
timeouts are set far beyond anything a test does, and each test states the
virtual time it allows for what it checks.
"""
from __future__ import annotations

import json

import pytest
import trio
import trio.testing

from gridgate.config import AuthConfig, ConnectionsConfig, MQTTConfig
from gridgate.security.passwords import format_line, hash_password
from mqtt_frames import gen_connack, gen_connect, gen_puback, gen_publish, gen_suback, gen_subscribe
from security.jwt_helpers import make_key, public_pem, token, unsigned_token

DELAY_S = 1.0
LONG = 10_000_000.0        # seconds: bans and idle timeouts no test reaches


def delayed_answer(took: float) -> bool:
    """Answered after the failure delay. Not exactly DELAY_S: while bytes
    cross the loopback the autojump clock may leap to another timer (the
    batcher's, a few ms)."""
    return DELAY_S <= took < DELAY_S + 0.1


def at_once(took: float) -> bool:
    return took < 0.1


async def open_mqtt(addr: tuple[str, int], source: str = "127.0.0.1") -> trio.SocketStream:
    """A TCP connection from ``source`` (a loopback address of its own: bans are per address)."""
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect(addr)
    return trio.SocketStream(sock)


async def read_exactly(stream: trio.abc.Stream, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            return buf
        buf += chunk
    return buf


async def connect(addr, client_id: str, username=None, password=None, source="127.0.0.1"):
    """(stream, CONNACK bytes, virtual seconds until the CONNACK came)."""
    stream = await open_mqtt(addr, source)
    start = trio.current_time()
    await stream.send_all(gen_connect(client_id, username=username, password=password))
    connack = await read_exactly(stream, 4)
    return stream, connack, trio.current_time() - start


async def closed(stream: trio.abc.Stream) -> bool:
    with trio.fail_after(LONG / 10):
        while True:
            try:
                if not await stream.receive_some(1024):
                    return True
            except trio.BrokenResourceError:
                return True


@pytest.fixture
def credentials(tmp_path):
    path = tmp_path / "passwd"
    path.write_text(format_line("meter-1", hash_password(b"one pw")) + format_line("meter-2", hash_password(b"two"))
                    + format_line("edge-1", hash_password(b"edge")))
    return path


@pytest.fixture
def jwt_key(tmp_path):
    key = make_key("ES256")
    (tmp_path / "keys.json").write_text(json.dumps({"meter-4": public_pem(key), "meter-5": public_pem(key)}))
    return key


@pytest.fixture
def gateway_with(start_gateway, tmp_path):
    async def start(**auth):
        auth.setdefault("failure_delay_ms", int(DELAY_S * 1000))
        auth.setdefault("ban_s", LONG)
        gw = await start_gateway(
            mqtt=MQTTConfig(listen="127.0.0.1:0"),
            connections=ConnectionsConfig(idle_timeout_s=LONG, reap_interval_s=LONG / 10),
            auth=AuthConfig(**auth))
        return gw, gw.addresses["mqtt"]
    return start


async def stats(gw) -> dict:
    return await gw.spool.stats()


async def test_good_credentials_connect_and_publish(autojump_clock, gateway_with, credentials):
    gw, addr = await gateway_with(password_file=str(credentials))
    stream, connack, took = await connect(addr, "meter-1", "meter-1", b"one pw")
    assert connack == gen_connack(0) and at_once(took)
    await stream.send_all(gen_publish("devices/meter-1/telemetry", 1, b'{"battery_mv": 3700}', mid=1))
    assert await read_exactly(stream, 4) == gen_puback(1)
    assert (await stats(gw))["records"] == 1
    value = gw.metrics.registry.get_sample_value
    assert value("gridgate_auth_successes_total", {"protocol": "mqtt", "method": "password"}) == 1


@pytest.mark.parametrize("client_id, username, password, code, delayed", [
    ("meter-1", "meter-1", b"wrong", 4, True),                # wrong password
    ("meter-9", "meter-9", b"one pw", 4, True),               # unknown device
    ("meter-1", "meter-1", b"x" * 65_535, 4, True),           # a 64 KiB password: a plain failure
    ("meter-2", "meter-1", b"one pw", 5, False),              # device A's credentials with client id B
    ("meter-1", None, None, 5, False),                        # none, and anonymous is off
])
async def test_refused_connects(autojump_clock, gateway_with, credentials, client_id, username, password, code,
                                delayed):
    gw, addr = await gateway_with(password_file=str(credentials))
    stream, connack, took = await connect(addr, client_id, username, password)
    assert connack == gen_connack(code)
    # failures are answered after the delay; a refusal of valid or missing credentials at once
    assert delayed_answer(took) if delayed else at_once(took), took
    assert await closed(stream)
    counts = await stats(gw)
    assert (counts["records"], counts["rejected"]) == (0, 0)
    assert gw.conns.get_device(client_id) is None


async def test_anonymous_on_purpose(autojump_clock, gateway_with, credentials):
    gw, addr = await gateway_with(password_file=str(credentials), allow_anonymous=True)
    stream, connack, _ = await connect(addr, "meter-7")
    assert connack == gen_connack(0)
    # the default ACL still holds it to its own topics
    await stream.send_all(gen_publish("devices/meter-8/telemetry", 1, b'{"battery_mv": 1}', mid=3))
    assert await read_exactly(stream, 4) == gen_puback(3)
    rejected = list(gw.spool.spool.iter_rejections())
    assert [r["reason"] for r in rejected] == ["not_authorized"]


@pytest.mark.parametrize("case", ["good", "good_without_sub", "wrong_aud", "expired", "other_key", "alg_none",
                                  "too_long_lifetime", "sub_of_another_device"])
async def test_jwt_passwords(autojump_clock, gateway_with, tmp_path, jwt_key, case):
    gw, addr = await gateway_with(jwt_keys_file=str(tmp_path / "keys.json"), jwt_max_lifetime_s=3600)
    import time as _time
    tok = {
        "good": lambda: token(jwt_key, "ES256", sub="meter-4"),
        "good_without_sub": lambda: token(jwt_key, "ES256", sub=None),
        "wrong_aud": lambda: token(jwt_key, "ES256", sub="meter-4", aud="other"),
        "expired": lambda: token(jwt_key, "ES256", sub="meter-4", iat=_time.time() - 100, lifetime=50),
        "other_key": lambda: token(make_key("ES256"), "ES256", sub="meter-4"),
        "alg_none": lambda: unsigned_token("meter-4"),
        "too_long_lifetime": lambda: token(jwt_key, "ES256", sub="meter-4", lifetime=3601),
        # valid, for meter-5: but the client id is meter-4
        "sub_of_another_device": lambda: token(jwt_key, "ES256", sub="meter-5"),
    }[case]()
    stream, connack, took = await connect(addr, "meter-4", "meter-4", tok.encode())
    want = {"good": 0, "good_without_sub": 0, "sub_of_another_device": 5}.get(case, 4)
    assert connack == gen_connack(want)
    assert delayed_answer(took) if want == 4 else at_once(took), took
    if want == 0:
        await stream.send_all(gen_publish("telemetry", 1, b'{"battery_mv": 3700}', mid=9))
        assert await read_exactly(stream, 4) == gen_puback(9)
        assert (await stats(gw))["records"] == 1
    else:
        assert await closed(stream)
        assert (await stats(gw))["records"] == 0


async def test_acl_refusals_are_dead_lettered_and_acknowledged(autojump_clock, gateway_with, credentials):
    gw, addr = await gateway_with(password_file=str(credentials))
    stream, connack, _ = await connect(addr, "meter-1", "meter-1", b"one pw")
    assert connack == gen_connack(0)
    frames = [gen_publish("devices/meter-1/telemetry", 1, b'{"battery_mv": 1}', mid=1),
              gen_publish("devices/meter-2/telemetry", 1, b'{"battery_mv": 2}', mid=2),     # another device's
              gen_publish("devices/meter-1/status", 1, b'{"battery_mv": 3}', mid=3),        # allowed, not telemetry
              gen_publish("telemetry", 1, b'{"battery_mv": 4}', mid=4),
              gen_subscribe(5, [("devices/meter-1/commands", 1), ("devices/meter-2/commands", 1), ("#", 0)])]
    await stream.send_all(b"".join(frames))
    got = await read_exactly(stream, 4 * 4 + 7)
    # the SUBACK goes out at once, the PUBACKs once durable: all four are acknowledged
    suback = gen_suback(5, [1, 0x80, 0x80])
    assert suback in got
    acks = got.replace(suback, b"")
    assert sorted(acks[i:i + 4] for i in range(0, 16, 4)) == sorted(gen_puback(m) for m in (1, 2, 3, 4))
    assert (await stats(gw))["records"] == 2
    reasons = sorted(r["reason"] for r in gw.spool.spool.iter_rejections())
    assert reasons == ["bad_topic", "not_authorized"]
    value = gw.metrics.registry.get_sample_value
    assert value("gridgate_not_authorized_total", {"protocol": "mqtt", "action": "publish"}) == 1
    assert value("gridgate_not_authorized_total", {"protocol": "mqtt", "action": "subscribe"}) == 2


async def test_an_edge_gateway_the_acl_lets_write_for_a_meter(autojump_clock, gateway_with, credentials, tmp_path):
    acl = tmp_path / "acl"
    acl.write_text("user edge-1\ntopic write devices/meter-3/#\ntopic read devices/meter-3/commands\n"
                   "pattern write devices/%u/telemetry\n")
    gw, addr = await gateway_with(password_file=str(credentials), acl_file=str(acl))
    stream, connack, _ = await connect(addr, "meter-3", "edge-1", b"edge")
    assert connack == gen_connack(0)
    await stream.send_all(gen_publish("devices/meter-3/telemetry", 1, b'{"battery_mv": 5}', mid=1)
                          + gen_publish("telemetry", 1, b'{"battery_mv": 6}', mid=2))      # not granted by the file
    assert await read_exactly(stream, 8) == gen_puback(1) + gen_puback(2)
    assert (await stats(gw))["records"] == 1
    assert [r["reason"] for r in gw.spool.spool.iter_rejections()] == ["not_authorized"]
    # meter-1's own credentials: its own id is allowed by the %u pattern; another meter's is not
    assert (await connect(addr, "meter-1", "meter-1", b"one pw"))[1] == gen_connack(0)
    assert (await connect(addr, "meter-2", "edge-1", b"edge"))[1] == gen_connack(5)


async def test_1000_failed_logins_ban_the_address_and_others_are_served(autojump_clock, gateway_with, credentials):
    gw, addr = await gateway_with(password_file=str(credentials), failures_before_ban=10)
    start = trio.current_time()
    codes = []
    for i in range(1000):
        stream, connack, _ = await connect(addr, "meter-1", "meter-1", b"guess-%d" % i)
        codes.append(connack[3])
        await stream.aclose()
    assert codes[:10] == [4] * 10 and codes[10:] == [5] * 990
    # the banned address: refused at once even with the right password
    stream, connack, took = await connect(addr, "meter-1", "meter-1", b"one pw")
    assert connack == gen_connack(5) and at_once(took)
    assert trio.current_time() - start < LONG          # the ban (LONG) held throughout
    # a good device from another address is served
    stream, connack, took = await connect(addr, "meter-2", "meter-2", b"two", source="127.0.0.2")
    assert connack == gen_connack(0) and at_once(took)
    await stream.send_all(gen_publish("telemetry", 1, b'{"battery_mv": 7}', mid=1))
    assert await read_exactly(stream, 4) == gen_puback(1)
    value = gw.metrics.registry.get_sample_value
    assert value("gridgate_auth_bans_total", {}) == 1
    assert value("gridgate_auth_banned_connections_total", {"protocol": "mqtt"}) == 991
    assert value("gridgate_auth_failures_total", {"protocol": "mqtt", "reason": "bad_password"}) == 10
    assert (await stats(gw))["records"] == 1


async def test_a_verified_client_certificate_is_the_identity(autojump_clock, start_gateway, nursery, credentials):
    """mqtts: the certificate's CN comes before any user name and password
    (the TLS listener hands the session the trio.SSLStream it made)."""
    import ssl

    import trustme

    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("gridgate.test").configure_cert(server_ctx)
    ca.configure_trust(server_ctx)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    ca.issue_cert("meter-1.devices", common_name="meter-1").configure_cert(client_ctx)
    gw = await start_gateway(auth=AuthConfig(password_file=str(credentials), failure_delay_ms=1000))

    async def tls_connect(client_id: str, **kw) -> bytes:
        client_raw, server_raw = trio.testing.memory_stream_pair()
        server = trio.SSLStream(server_raw, server_ctx, server_side=True)
        client = trio.SSLStream(client_raw, client_ctx, server_hostname="gridgate.test")

        async def serve() -> None:
            await server.do_handshake()
            await gw.handle_mqtt(server)
        nursery.start_soon(serve)
        await client.send_all(gen_connect(client_id, **kw))
        return await read_exactly(client, 4)

    assert await tls_connect("meter-1") == gen_connack(0)
    # the certificate wins over a wrong password, and binds the client id
    assert await tls_connect("meter-1", username="meter-1", password=b"wrong") == gen_connack(0)
    assert await tls_connect("meter-2") == gen_connack(5)
    value = gw.metrics.registry.get_sample_value
    assert value("gridgate_auth_successes_total", {"protocol": "mqtt", "method": "certificate"}) == 3


async def test_a_credentials_reload_closes_the_connections_whose_credentials_were_removed(
        autojump_clock, gateway_with, credentials):
    gw, addr = await gateway_with(password_file=str(credentials))
    one, connack1, _ = await connect(addr, "meter-1", "meter-1", b"one pw")
    two, connack2, _ = await connect(addr, "meter-2", "meter-2", b"two")
    assert connack1 == connack2 == gen_connack(0)
    # a broken file: the old set stays, nobody is closed
    credentials.write_text("meter-2 without a hash\n")
    problems = gw.reload_credentials()
    assert len(problems) == 1 and "passwd:1" in problems[0]
    # meter-1 removed
    credentials.write_text(format_line("meter-2", hash_password(b"two")))
    assert gw.reload_credentials() == []
    assert await closed(one)
    await two.send_all(gen_publish("telemetry", 1, b'{"battery_mv": 1}', mid=1))
    assert await read_exactly(two, 4) == gen_puback(1)
    assert (await connect(addr, "meter-1", "meter-1", b"one pw"))[1] == gen_connack(4)
    value = gw.metrics.registry.get_sample_value
    assert value("gridgate_credential_reloads_total", {"result": "failed"}) == 1
    assert value("gridgate_credential_reloads_total", {"result": "ok"}) == 1
