"""gridgate-loadgen mqtt --tls --cafile: devices over TLS against a real
gridgate mqtts listener (every acked reading in the spool), an untrusted
certificate refused at the handshake, the argument check, and
``loadgen.tls.TlsSocketStream`` over a loopback TLS pair (a payload larger
than the socket buffers both ways, records split across reads, EOF)."""
from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import trio.lowlevel
import trio.testing

from gatewayproc import GatewayProcess, gridgate_env, spool_stats
from loadgen.tls import TlsSocketStream, client_context
from security.pki import CA

LOADGEN = [sys.executable, "-m", "loadgen.cli"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("pki")
    ca = CA("ecdsa")
    cert, key = ca.server("ecdsa").write(d, "server")
    return {"ca": ca.write(d), "cert": cert, "key": key, "other_ca": CA("ecdsa", "someone else").write(d, "other")}


def _loadgen(target: tuple[str, int], out: Path, *extra: str, devices: int = 6) -> subprocess.CompletedProcess:
    return subprocess.run(LOADGEN + ["mqtt", "--target", f"{target[0]}:{target[1]}", "--devices", str(devices),
                                     "--duration", "2", "--inflight", "4", "--json", str(out), *extra],
                          capture_output=True, text=True, timeout=120)


def test_devices_publish_over_tls_and_every_acked_reading_is_stored(tmp_path, pki):
    env = gridgate_env(GRIDGATE_MQTT_TLS_LISTEN="127.0.0.1:0", GRIDGATE_TLS_CERT_FILE=pki["cert"],
                       GRIDGATE_TLS_KEY_FILE=pki["key"])
    gw = GatewayProcess(tmp_path / "data", env=env)
    try:
        out = _loadgen(gw.mqtts, tmp_path / "r.json", "--tls", "--cafile", pki["ca"], "--procs", "2")
        assert out.returncode == 0, out.stderr
        result = json.loads((tmp_path / "r.json").read_text())
        assert result["errors"] == 0 and result["connects"] == 6
        assert result["acked"] == result["sent"] > 100, result    # the window drains before the end
        # the CA the server's certificate does not chain to: every handshake fails
        bad = _loadgen(gw.mqtts, tmp_path / "bad.json", "--tls", "--cafile", pki["other_ca"], "--no-reconnect",
                       devices=2)
        assert bad.returncode == 0, bad.stderr
        refused = json.loads((tmp_path / "bad.json").read_text())
        assert refused["connects"] == 0 and refused["errors"] >= 2 and refused["acked"] == 0
        assert gw.alive()
    finally:
        assert gw.stop() == 0
    assert spool_stats(tmp_path / "data")["records"] == result["acked"]


def test_cafile_needs_tls():
    out = subprocess.run(LOADGEN + ["mqtt", "--target", "127.0.0.1:1", "--devices", "1", "--duration", "1",
                                    "--cafile", "x.pem"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "--cafile needs --tls" in out.stderr


async def test_tls_socket_stream_moves_more_than_the_buffers_hold_both_ways(pki):
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pki["cert"], pki["key"])
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    # 16 MiB: more than loopback's socket buffers hold, so the send must wait for the socket
    big = bytes(range(256)) * (1 << 16)
    got = bytearray()

    checked = trio.Event()

    async def server() -> None:
        conn, _ = await listener.accept()
        stream = trio.SSLStream(trio.SocketStream(conn), server_ctx, server_side=True)
        await stream.do_handshake()
        # read nothing until the client's second sender was refused: its
        # first send_all is then surely still waiting on a full socket
        await checked.wait()
        received = bytearray()
        while len(received) < len(big):
            received += await stream.receive_some(65536)
        assert received == big
        await stream.send_all(big)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        client = await TlsSocketStream.handshake(await trio.open_tcp_stream("127.0.0.1", port),
                                                 client_context(pki["ca"]), "127.0.0.1")
        with trio.fail_after(30):
            async with trio.open_nursery() as inner:
                inner.start_soon(client.send_all, big)
                # a second sender while the first waits on the socket is refused, never interleaved
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(trio.BusyResourceError):
                    await client.send_all(b"x")
                checked.set()
            while True:
                chunk = await client.receive_some(65536)
                if not chunk:
                    break
                got += chunk
        await client.aclose()
        await client.aclose()          # twice is harmless
    listener.close()
    assert got == big


async def test_an_untrusted_server_fails_the_handshake_and_closes_the_socket(pki):
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pki["cert"], pki["key"])
    a, b = socket.socketpair()
    server = trio.SSLStream(trio.SocketStream(trio.socket.from_stdlib_socket(b)), server_ctx, server_side=True)

    async def serve() -> None:
        with pytest.raises(trio.BrokenResourceError):
            await server.do_handshake()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(a))
        with pytest.raises(ssl.SSLCertVerificationError):
            await TlsSocketStream.handshake(stream, client_context(pki["other_ca"]), "127.0.0.1")
    await server.aclose()
