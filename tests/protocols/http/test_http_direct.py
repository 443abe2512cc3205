"""The fast engine on a real TCP socket, where a commit writes the answers
itself (fast._Owed): answers stay in request order when a later request's
answer is ready first, a half-closed client still gets what it is owed, an
answer larger than the socket takes at once arrives whole (a writer task
sends the rest), and a commit that lands after its connection is gone
writes nothing, not even to a new connection given the same fd. The
gateway runs in the test's Trio run on the real clock; its sink holds the
write until the test opens the gate."""
from __future__ import annotations

import json
import socket
import struct

import trio
import trio.testing

import gridgate
from gridgate.config import HTTPConfig, SinkConfig
from gridgate.connections import fdwait, ready_loop
from inprocess import READING, GatedSink, make_config, post, read_response

HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n"


async def _gateway(tmp_path, nursery: trio.Nursery) -> tuple[gridgate.Gateway, GatedSink]:
    config = make_config(tmp_path, http=HTTPConfig(listen="", engine="fast", durable_timeout_s=60),
                         sink=SinkConfig(write_timeout_s=86400))
    sink = GatedSink()
    return await nursery.start(gridgate.serve, config, sink), sink


async def _connect(gateway: gridgate.Gateway, nursery: trio.Nursery, listener: trio.SocketListener,
                   rcvbuf: int = 0) -> tuple[trio.SocketStream, trio.SocketStream]:
    """A loopback connection served by the gateway: (client, server side)."""
    sock = trio.socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)   # before connect: it sets the window
    await sock.connect(listener.socket.getsockname())
    client = trio.SocketStream(sock)
    server = await listener.accept()
    nursery.start_soon(gateway.handle_http, server)
    return client, server


async def _until(predicate, what: str) -> None:
    with trio.fail_after(10):
        while not predicate():
            await trio.sleep(0.005)
    await trio.testing.wait_all_tasks_blocked()


async def test_an_answer_ready_first_waits_for_the_one_owed_before_it(tmp_path, nursery):
    gateway, sink = await _gateway(tmp_path, nursery)
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    client, _ = await _connect(gateway, nursery, listener)
    await client.send_all(post())
    await _until(lambda: sink.waiting == 1, "the write under way")
    # a second read while the first request's answer is owed: its answer is
    # ready at once, but goes out only after the 202
    await client.send_all(HEALTHZ)
    await trio.testing.wait_all_tasks_blocked()
    with trio.move_on_after(0.2):
        early = await client.receive_some(65536)
        raise AssertionError(f"answered before the request owed first: {early!r}")
    sink.gate.set()
    buf = bytearray()
    status, _, body = await read_response(client, buf)
    assert (status, json.loads(body)["accepted"]) == (202, 1)
    assert (await read_response(client, buf))[0] == 200
    await client.send_all(post())                    # the connection goes on as before
    assert (await read_response(client, buf))[0] == 202
    assert buf == b""
    await client.aclose()
    await listener.aclose()


async def test_a_half_closed_client_still_gets_its_answer(tmp_path, nursery):
    gateway, sink = await _gateway(tmp_path, nursery)
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    client, _ = await _connect(gateway, nursery, listener)
    await client.send_all(post())
    await client.send_eof()
    await _until(lambda: sink.waiting == 1, "the write under way")
    sink.gate.set()
    buf = bytearray()
    assert (await read_response(client, buf))[0] == 202
    assert await client.receive_some(65536) == b""   # then the server closes
    await client.aclose()
    await listener.aclose()


async def test_an_answer_the_socket_does_not_take_at_once_arrives_whole_and_in_order(tmp_path, nursery):
    gateway, sink = await _gateway(tmp_path, nursery)
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    client, server = await _connect(gateway, nursery, listener, rcvbuf=4096)
    server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    # one valid reading and 2,000 rejected ones: a 202 of some 200 KB, far
    # more than both small buffers hold, written when the commit lands
    rejected = 2000
    body = b"[" + READING + b"".join(b',{"device_id": "meter-1", "temperature": "hot"}' for _ in range(rejected)) + b"]"
    await client.send_all(post(body))
    await _until(lambda: sink.waiting == 1, "the write under way")
    await client.send_all(HEALTHZ)                   # owed after it
    await trio.testing.wait_all_tasks_blocked()
    sink.gate.set()
    await _until(lambda: sink.batches, "the commit")
    await trio.sleep(0.05)                           # the client has not read yet: the socket is full
    buf = bytearray()
    status, _, answer = await read_response(client, buf)
    got = json.loads(answer)
    assert (status, got["accepted"], got["rejected"], len(got["errors"])) == (202, 1, rejected, rejected)
    assert [e["index"] for e in got["errors"]] == list(range(1, rejected + 1))
    assert (await read_response(client, buf))[0] == 200
    await client.send_all(HEALTHZ)
    assert (await read_response(client, buf))[0] == 200
    assert buf == b""
    await client.aclose()
    await listener.aclose()


async def test_a_commit_after_its_connection_reset_writes_nothing_to_a_new_one(tmp_path, nursery):
    gateway, sink = await _gateway(tmp_path, nursery)
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    first, _ = await _connect(gateway, nursery, listener)
    await first.send_all(post())
    await _until(lambda: sink.waiting == 1, "the write under way")
    # a reset (linger 0): the server's read fails and its connection ends
    # with the answer still owed; its fd is free for the next connection
    first.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await first.aclose()
    await _until(lambda: len(gateway.conns) == 0, "the reset connection gone")
    second, _ = await _connect(gateway, nursery, listener)
    await second.send_all(HEALTHZ)
    buf = bytearray()
    assert (await read_response(second, buf))[0] == 200
    sink.gate.set()                                  # the first request is durable now
    await _until(lambda: sink.batches, "the commit")
    await second.send_all(HEALTHZ)
    assert (await read_response(second, buf))[0] == 200
    assert buf == b""
    assert sum(len(b) for b in sink.batches) == 1
    await second.aclose()
    await listener.aclose()


async def test_an_idle_connection_parks_in_the_ready_loop_which_answers_its_requests(tmp_path, nursery):
    # every object on an idle connection's parked stack is RSS times the
    # number of connections: the engine's own frame is the last coroutine,
    # then the ready loop's park object (no trio wait frames); and the loop,
    # not the task, reads and begins the plain requests (issue 24)
    gateway, sink = await _gateway(tmp_path, nursery)
    sink.gate.set()
    loop = gateway.services.ready_loop
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    client, _ = await _connect(gateway, nursery, listener)
    buf = bytearray()
    await client.send_all(post())
    assert (await read_response(client, buf))[0] == 202
    await trio.testing.wait_all_tasks_blocked()
    [task] = [t for t in nursery.child_tasks if t.name.endswith("handle_http")]
    names, coro = [], task.coro
    while hasattr(coro, "cr_code"):
        names.append(coro.cr_code.co_qualname)
        coro = coro.cr_await
    assert names[-1] == "serve_fast_http"
    assert type(coro) is ready_loop._Park and len(loop) == 1
    served, handed_back = loop.served, loop.handed_back
    await client.send_all(post() + HEALTHZ)          # two requests in one read, both begun by the loop
    assert (await read_response(client, buf))[0] == 202
    assert (await read_response(client, buf))[0] == 200
    assert loop.served > served and loop.handed_back == handed_back
    # what has to wait goes back to the task: a head in two parts (its timeout)
    await client.send_all(post()[:20])
    await trio.testing.wait_all_tasks_blocked()
    assert loop.handed_back - handed_back == 1 and len(loop) == 0
    await client.send_all(post()[20:])
    assert (await read_response(client, buf))[0] == 202
    await trio.testing.wait_all_tasks_blocked()
    assert len(loop) == 1                            # parked again
    await client.aclose()
    await listener.aclose()


async def test_without_the_ready_loop_an_idle_connection_parks_under_the_fdwait_object(tmp_path, nursery):
    # where the loop is unavailable (another IO manager) or stopped, the task
    # waits and reads itself, under fdwait's one wait object
    gateway, sink = await _gateway(tmp_path, nursery)
    sink.gate.set()
    gateway.services.ready_loop = None
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    client, _ = await _connect(gateway, nursery, listener)
    buf = bytearray()
    await client.send_all(post())
    assert (await read_response(client, buf))[0] == 202
    await trio.testing.wait_all_tasks_blocked()
    [task] = [t for t in nursery.child_tasks if t.name.endswith("handle_http")]
    names, coro = [], task.coro
    while hasattr(coro, "cr_code"):
        names.append(coro.cr_code.co_qualname)
        coro = coro.cr_await
    assert names[-1] == "serve_fast_http"
    assert type(coro) is fdwait._ReadableWait
    await client.send_all(post() + HEALTHZ)
    assert (await read_response(client, buf))[0] == 202
    assert (await read_response(client, buf))[0] == 200
    await client.aclose()
    await listener.aclose()
