"""bench/floor_app.py, the bare Trio responder the pipelines bench runs at
1,000 connections for the RSS floor: a real subprocess on a free loopback
port, real clients (http.client, raw sockets, wrk). Every socket has a
timeout, so a server that hangs fails the test instead of stalling it."""
from __future__ import annotations

import http.client
import json
import socket
import sys
from pathlib import Path

import pytest
import trio
import trio.testing

from binaries import require

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))   # bench/ is not an installed package

from bench import floor_app, pipelines, procs, targets  # noqa: E402

TIMEOUT = 10.0
BODY = b'[{"device_id":"wrk-1","temperature":21.5,"battery_mv":3600,"location":"sh/fa"}]'


def _answer(status_line: bytes, body: bytes, close: bool) -> bytes:
    """An answer as the floor must send it, byte for byte (built here, not by floor_app)."""
    return (b"HTTP/1.1 " + status_line + b"\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n" + (b"Connection: close\r\n" if close else b"") + b"\r\n" + body)


# what gridgate answers to a one-reading POST, which the floor answers to every POST
ACCEPTED_BODY = b'{"accepted":1,"rejected":0,"errors":[]}'
ACCEPTED = _answer(b"202 Accepted", ACCEPTED_BODY, close=False)
ACCEPTED_CLOSE = _answer(b"202 Accepted", ACCEPTED_BODY, close=True)


def _post(extra: bytes = b"", body: bytes = BODY, method: bytes = b"POST") -> bytes:
    return (method + b" /v1/telemetry HTTP/1.1\r\nHost: floor\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n%s\r\n%s" % (len(body), extra, body))


@pytest.fixture
def floor():
    server = procs.floor_app()   # returns once the port accepts connections
    try:
        yield server.address
        assert server.proc.poll() is None, "the floor app died"
        assert server.lines == [], server.lines   # it prints nothing, errors included
    finally:
        server.stop()


def _connect(address: tuple[str, int]) -> socket.socket:
    return socket.create_connection(address, timeout=TIMEOUT)


def _read_to_eof(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (bounded by the socket's timeout)."""
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
        assert len(data) < 1 << 20


def test_keep_alive_posts_each_get_202_on_one_connection(floor):
    conn = http.client.HTTPConnection(*floor, timeout=TIMEOUT)
    try:
        first_socket = None
        for _ in range(5):
            conn.request("POST", "/v1/telemetry", body=BODY, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 202
            assert resp.getheader("Content-Type") == "application/json"
            assert json.loads(body) == {"accepted": 1, "rejected": 0, "errors": []}
            first_socket = first_socket or conn.sock
            assert conn.sock is first_socket   # kept alive, not reconnected
        conn.request("POST", "/v1/telemetry", body=BODY, headers={"Connection": "close"})
        resp = conn.getresponse()
        assert resp.status == 202 and resp.getheader("Connection") == "close"
        resp.read()
    finally:
        conn.close()


def test_pipelined_requests_are_answered_in_order(floor):
    # a POST, then a GET (405, so the order shows) that asks to close
    with _connect(floor) as sock:
        sock.sendall(_post() + _post(b"Connection: close\r\n", body=b"", method=b"GET"))
        data = _read_to_eof(sock)
    assert data == ACCEPTED + _answer(b"405 Method Not Allowed", b'{"error":"405"}', close=True)


async def test_a_request_in_pieces_is_framed_across_reads(nursery):
    # in process, on a memory stream: each piece is one read of its own
    # (wait_all_tasks_blocked: the server took it and waits for more), which
    # a socket could not promise without sleeping between the pieces
    request = _post()
    head_end = request.index(b"\r\n\r\n")
    client, server = trio.testing.memory_stream_pair()

    async def serve() -> None:
        await floor_app._serve(server)
        await server.aclose()

    nursery.start_soon(serve)
    # split inside the blank line and inside the body
    for piece in (request[:head_end + 2], request[head_end + 2:head_end + 10], request[head_end + 10:]):
        await trio.testing.wait_all_tasks_blocked()
        await client.send_all(piece)
    await client.send_all(_post(b"Connection: close\r\n"))
    data = b""
    while chunk := await client.receive_some(65536):
        data += chunk
    assert data == ACCEPTED + ACCEPTED_CLOSE


def test_many_connections_open_at_once_are_all_served(floor):
    # all connected before any request: each is accepted from the backlog and
    # gets its own task, none waits for another to finish
    socks = [_connect(floor) for _ in range(200)]
    try:
        for sock in socks:
            sock.sendall(_post(b"Connection: close\r\n"))
        assert [_read_to_eof(sock) for sock in socks] == [ACCEPTED_CLOSE] * 200
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.parametrize("request_bytes, status_line", [
    (b"garbage\r\n\r\n", b"400 Bad Request"),
    (_post(b"Transfer-Encoding: chunked\r\n"), b"411 Length Required"),
    (b"POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (floor_app.MAX_BODY + 1), b"413 Content Too Large"),
    (b"POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}", b"400 Bad Request"),
], ids=["garbage", "chunked", "body-too-large", "two-lengths"])
def test_what_it_cannot_frame_gets_an_error_and_a_close(floor, request_bytes, status_line):
    # each request is small enough to arrive in one read, so the floor closes
    # with nothing unread (a FIN, not a reset): the answer is all the client gets
    with _connect(floor) as sock:
        sock.sendall(request_bytes)
        data = _read_to_eof(sock)
    assert data == _answer(status_line, b'{"error":"%s"}' % status_line[:3], close=True)


def test_an_oversized_header_block_gets_431_and_a_close_not_a_hang(floor):
    # one byte over MAX_HEAD and no blank line: the floor must read all of it
    # to know, so it closes with nothing unread and the 431 arrives whole
    # (more bytes than it reads would make its close a reset that may drop the 431)
    head = b"POST / HTTP/1.1\r\nX-Pad: "
    head += b"a" * (floor_app.MAX_HEAD + 1 - len(head))
    with _connect(floor) as sock:
        sock.sendall(head)
        data = _read_to_eof(sock)
    assert data == _answer(b"431 Request Header Fields Too Large", b'{"error":"431"}', close=True)


def test_wrk_2s_at_50_connections_is_all_2xx(floor):
    require("wrk")
    result = procs.wrk(floor, 2, 50)
    assert result is not None
    assert result["answered"] > 0
    assert result["non2xx"] == 0 and not result["socket_errors"], result


# -- how the pipelines bench uses it -----------------------------------------------

def test_the_floor_runs_on_wrk_1000_only_and_never_for_perfcheck():
    assert "floor" in pipelines._contenders_for("wrk-1000", pipelines.CONTENDERS)
    assert "floor" not in pipelines._contenders_for("wrk-64", pipelines.CONTENDERS)
    assert "floor" not in pipelines._contenders_for("loadgen", pipelines.CONTENDERS)
    # bench.perfcheck narrows the contenders to the two engines
    assert pipelines._contenders_for("wrk-1000", ("std", "fast")) == ("std", "fast")


def _run(contender: str, peak_mib: float, rps: float) -> dict:
    return {"driver": "wrk-1000", "contender": contender, "connections": 1000, "round": 0,
            "readings_per_s": rps, "peak_rss_kb": peak_mib * 1024, "idle_rss_kb": 30 * 1024,
            "cpu_us_per_reading": 100.0, "latency_ms": {"p50": 1.0, "p90": 2.0, "p99": 3.0, "p99.9": 4.0, "max": 5.0}}


def test_summary_and_target_row_carry_the_floor():
    runs = [_run("std", 52, 2000), _run("fast", 50, 8000), _run("floor", 32, 20000)]
    per = pipelines.summarize(runs)["wrk-1000"]
    assert per["floor_vs_std_rss"] == pytest.approx(32 / 52)
    assert per["fast_vs_std"] == pytest.approx(4.0)   # the floor changes no other ratio
    row = next(r for r in targets.rows({"pipelines": {"summary": {"wrk-1000": per}, "runs": runs}})
               if "above the bare-Trio floor" in r.target)
    # per connection: std 22.5, fast 20.5, floor 2.0 KiB; above the floor 18.4 / 20.5 = 0.90
    assert row.ok is False
    assert row.measured == "0.90x (18.4 vs 20.5 KiB over a 2.0 KiB floor)"
