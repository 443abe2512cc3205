"""The WebSocket devices on the one-task-per-process mux (loadgen.ws_mux):
keepalive pings, a pong that does not come, a server's ping and close, on a
real socket pair with the gateway's frame decoder as the server's ear. The
end-to-end runs against gridgate (counts equal to the spool, with and
without the mux) are in test_loadgen.py."""
from __future__ import annotations

import socket

import trio

from gridgate.protocols.websocket.frames import OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, FrameDecoder, encode_frame
from loadgen.device import DeviceOptions
from loadgen.mqtt_device import RawSocketStream
from loadgen.mqtt_mux import Mux
from loadgen.stats import Stats
from loadgen.ws_mux import WsMuxDevice


async def serve_one(answer_pings: bool, first: bytes = b"", leftover: bytes = b"") -> tuple[bool, list[int], float]:
    """An idle ws device on the mux for a 60 s run (keepalive 2: a ping when
    nothing was sent for 1 s) against a server that answers its pings with
    pongs or not, having first sent ``first`` (``leftover``: what the device's
    handshake read beyond the 101); returns whether the device
    ended cleanly, the opcodes the server got, and when it ended."""
    stats = Stats()
    opts = DeviceOptions(host="127.0.0.1", port=1, protocol="ws", idle=True, keepalive=2)
    dev = WsMuxDevice(0, opts, stats, None)
    dev._buf = leftover
    start = trio.current_time()
    mux = Mux(stats, start + 60, 1.0, opts.keepalive)
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    got: list[int] = []

    async def server() -> None:
        decoder = FrameDecoder(1 << 20)
        if first:
            theirs.send(first)
        while True:
            await trio.lowlevel.wait_readable(theirs)
            data = theirs.recv(65536)
            if not data:
                return
            for opcode, payload in decoder.feed(data):
                got.append(opcode)
                if opcode == OP_PING and answer_pings:
                    theirs.send(encode_frame(OP_PONG, payload))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(mux.run)
        nursery.start_soon(server)
        clean = await mux.run_connection(dev, RawSocketStream(ours))
        ended = trio.current_time() - start
        await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    theirs.close()
    return clean, got, ended


async def test_an_idle_device_is_kept_alive_by_pings_and_ends_with_a_close(autojump_clock):
    clean, got, ended = await serve_one(answer_pings=True)
    assert clean and ended >= 60
    assert got[-1] == OP_CLOSE and set(got[:-1]) == {OP_PING} and 50 <= len(got) - 1 <= 61


async def test_a_device_whose_pong_does_not_come_is_dropped(autojump_clock):
    clean, got, ended = await serve_one(answer_pings=False)
    # the first ping after 1 s, no pong by 10 s later: dropped at the next check, without a close frame
    assert not clean and 11 <= ended <= 13
    assert OP_CLOSE not in got and set(got) == {OP_PING}


async def test_a_server_ping_is_answered_and_a_close_ends_the_connection(autojump_clock):
    clean, got, _ = await serve_one(answer_pings=True, first=encode_frame(OP_PING, b"hi"))
    assert clean and got[0] == OP_PONG and got[-1] == OP_CLOSE
    close = encode_frame(OP_CLOSE, (1001).to_bytes(2, "big") + b"going away")
    clean, got, ended = await serve_one(answer_pings=True, first=close)
    assert not clean and ended < 1 and got == []
    # a command that came with the handshake is answered as soon as the mux takes the device
    command = encode_frame(OP_TEXT, b'{"command":{"id":"c-7","type":"x"}}')
    clean, got, _ = await serve_one(answer_pings=True, leftover=command)
    assert clean and got[0] == OP_TEXT
