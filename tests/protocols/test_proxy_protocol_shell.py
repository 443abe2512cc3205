"""accept_proxy_header over real loopback TCP connections: exactly the
header is consumed (the client's first bytes stay in the socket for the
session's raw reads), split reads, untrusted peers refused before anything
is read, and the header deadline under the autojump clock."""
from __future__ import annotations

import pytest
import trio

from gridgate.protocols.proxied import FirstRefusals, TrustedProxies, accept_proxy_header
from gridgate.protocols.proxy_protocol import ProxyHeader, ProxyProtocolError
from proxy_headers import ssl_tlv, v1, v2

LOOPBACK = TrustedProxies(["127.0.0.0/8"])
CONNECT = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00"


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """(client, server) of one real loopback TCP connection."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    try:
        port = listeners[0].socket.getsockname()[1]
        client = await trio.open_tcp_stream("127.0.0.1", port)
        server = await listeners[0].accept()
    finally:
        await listeners[0].aclose()
    assert isinstance(server, trio.SocketStream)
    return client, server


async def rest_of(server: trio.SocketStream, n: int) -> bytes:
    """``n`` bytes read straight off the socket, as the MQTT session's fast path does."""
    got = b""
    while len(got) < n:
        chunk = await server.socket.recv(n - len(got))
        assert chunk
        got += chunk
    return got


@pytest.mark.parametrize(("version", "header"), [
    (1, v1("192.0.2.7", "10.0.0.1", 56324, 1883)),
    (2, v2("2001:db8::7", "2001:db8::1", 4000, 1883, tlvs=ssl_tlv("meter-7"), crc=True)),
])
async def test_exactly_the_header_is_consumed(version, header):
    client, server = await tcp_pair()
    async with client, server:
        await client.send_all(header + CONNECT)
        got = await accept_proxy_header(server, version=version, trusted=LOOPBACK, timeout_s=5)
        assert isinstance(got, ProxyHeader) and got.length == len(header)
        assert got.client_address is not None and got.client_address[0] in ("192.0.2.7", "2001:db8::7")
        assert await rest_of(server, len(CONNECT)) == CONNECT


@pytest.mark.parametrize("version", [1, 2])
async def test_a_header_arriving_byte_by_byte(version):
    header = v1("192.0.2.7", "10.0.0.1", 1, 2) if version == 1 else v2("192.0.2.7", "10.0.0.1", 1, 2)
    client, server = await tcp_pair()
    async with client, server, trio.open_nursery() as nursery:
        async def trickle() -> None:
            for i in range(len(header)):
                await client.send_all(header[i:i + 1])
                await trio.sleep(0.001)
            await client.send_all(CONNECT)

        nursery.start_soon(trickle)
        got = await accept_proxy_header(server, version=version, trusted=LOOPBACK, timeout_s=30)
        assert got.client_address == ("192.0.2.7", 1)
        assert await rest_of(server, len(CONNECT)) == CONNECT


async def test_an_untrusted_peer_is_refused_before_anything_is_read():
    client, server = await tcp_pair()
    async with client, server:
        await client.send_all(v2("192.0.2.7", "10.0.0.1", 1, 2) + CONNECT)
        with pytest.raises(ProxyProtocolError) as caught:
            await accept_proxy_header(server, version=2, trusted=TrustedProxies(["10.0.0.0/8"]), timeout_s=5)
        assert caught.value.reason == "untrusted_source"
        assert caught.value.detail == "'127.0.0.1' is not in service.trusted_proxies"
        # nothing consumed: the header is still waiting
        assert (await rest_of(server, 12))[:12] == v2("192.0.2.7", "10.0.0.1", 1, 2)[:12]


@pytest.mark.parametrize(("sent", "reason"), [
    (CONNECT, "not_proxy"),
    (v1("192.0.2.7", "10.0.0.1", 1, 2), "wrong_version"),
    (b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x04\x00", "too_long"),
])
async def test_a_bad_header_is_refused_with_its_reason(sent, reason):
    client, server = await tcp_pair()
    async with client, server:
        await client.send_all(sent)
        with pytest.raises(ProxyProtocolError) as caught:
            await accept_proxy_header(server, version=2, trusted=LOOPBACK, timeout_s=5)
        assert caught.value.reason == reason


async def test_eof_inside_the_header():
    client, server = await tcp_pair()
    async with server:
        await client.send_all(v2("192.0.2.7", "10.0.0.1", 1, 2)[:20])
        await client.aclose()
        with pytest.raises(ProxyProtocolError) as caught:
            await accept_proxy_header(server, version=2, trusted=LOOPBACK, timeout_s=5)
        assert (caught.value.reason, caught.value.detail) == ("closed", "EOF after 20 header bytes")


async def test_a_slow_header_is_cut_at_the_deadline(autojump_clock):
    client, server = await tcp_pair()
    async with client, server:
        await client.send_all(v1("192.0.2.7", "10.0.0.1", 1, 2)[:10])
        start = trio.current_time()
        with pytest.raises(ProxyProtocolError) as caught:
            await accept_proxy_header(server, version=1, trusted=LOOPBACK, timeout_s=5)
        assert trio.current_time() == start + 5
        assert (caught.value.reason, caught.value.detail) == ("timeout", "no complete header within 5 s "
                                                                         "(10 bytes received)")


def test_trusted_proxies():
    trusted = TrustedProxies(["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"])
    assert "10.1.2.3" in trusted and "192.0.2.7" in trusted and "2001:db8::5" in trusted
    assert "::ffff:10.0.0.5" in trusted                # a dual-stack listener's view of an IPv4 proxy
    assert "192.0.2.8" not in trusted and "::1" not in trusted
    assert "" not in trusted and "not-an-address" not in trusted and None not in trusted
    assert not TrustedProxies([]) and trusted


def test_first_refusals_are_bounded():
    seen = FirstRefusals(limit=3)
    assert [seen.first(h, 0.0) for h in ("a", "a", "b", "c", "b")] == [True, False, True, True, False]
    assert seen.first("d", 0.0) is True and seen.first("a", 0.0) is True     # full: forgotten, logged once more


def test_first_refusals_log_few_new_addresses_per_window():
    seen = FirstRefusals(per_window=2, window_s=60.0)
    assert [seen.first(f"2001:db8::{i}", 0.0) for i in range(5)] == [True, True, False, False, False]
    assert seen.first("2001:db8::9", 59.9) is False
    assert seen.first("2001:db8::9", 60.0) is True and seen.take_unlogged() == 4 and seen.take_unlogged() == 0
    # one not logged is not remembered as logged: it is logged when the budget allows
    assert seen.first("2001:db8::3", 61.0) is True
