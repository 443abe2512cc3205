"""Gateway._serve_connection, the bottom frame of every connection's task:
what a protocol handler's failure does to its connection (and only to it).
A real gateway and a real socket pair; the handler is a stand-in that fails
the way a session can."""
from __future__ import annotations

import logging

import pytest
import trio

import gridgate
from inprocess import MemorySink, make_config


class Stop(BaseException):
    """Not an Exception: must pass through, as Cancelled and KeyboardInterrupt do."""


def failing(exc: BaseException):
    async def serve(stream, services, session) -> None:
        await trio.lowlevel.checkpoint()
        raise exc
    return serve


CASES = {
    "bug": (ValueError("boom"), "internal error", True),
    "lost": (trio.BrokenResourceError(), "connection lost", False),
    "closed": (trio.ClosedResourceError(), "connection lost", False),
    "group, lost only": (ExceptionGroup("g", [trio.BrokenResourceError()]), "connection lost", False),
    "group, lost and a bug": (ExceptionGroup("g", [trio.BrokenResourceError(), KeyError("k")]), "internal error",
                              True),
}


@pytest.mark.parametrize("case", CASES)
async def test_a_failing_handler_closes_only_its_connection(tmp_path, caplog, case):
    exc, reason, logged = CASES[case]
    seen = []
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            gateway = await nursery.start(gridgate.serve, make_config(tmp_path), MemorySink())
            a, b = trio.socket.socketpair()
            client, server = trio.SocketStream(a), trio.SocketStream(b)
            register = gateway.conns.register
            gateway.conns.register = lambda s: (seen.append(s), register(s))[1]
            with caplog.at_level(logging.ERROR, logger="gridgate"):
                await gateway._serve_connection(server, "mqtt", failing(exc))     # returns: handled
            assert len(gateway.conns) == 0
            assert seen[0].close_reason == reason
            assert (f"error on mqtt connection from {seen[0].remote}" in caplog.text) is logged
            assert await client.receive_some(10) == b""                # the server side is closed
            await client.aclose()
            gateway.stop()


async def test_what_is_not_an_exception_goes_through_and_still_cleans_up(tmp_path):
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            gateway = await nursery.start(gridgate.serve, make_config(tmp_path), MemorySink())
            a, b = trio.socket.socketpair()
            client, server = trio.SocketStream(a), trio.SocketStream(b)
            with pytest.raises(Stop):
                await gateway._serve_connection(server, "mqtt", failing(Stop()))
            assert len(gateway.conns) == 0
            assert await client.receive_some(10) == b""
            await client.aclose()
            gateway.stop()
