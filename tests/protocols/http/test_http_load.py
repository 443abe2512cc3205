"""HTTP under real load against a real ``gridgate serve``, both engines:
1,000 slowloris connections in real time (a 1 s header timeout) while a
normal client keeps asking, and wrk with a Lua POST script for 10 s with
every answer a 2xx and the spool holding what the gateway says it wrote.

The server's real time is what these tests exercise, so they assert what
happened and in which order, never how many seconds it took or how fast it
went: a loaded CI machine may be slow, but not wrong. (The exact times of
the same timeouts are asserted under the autojump clock in
test_http_inprocess.py.)"""
from __future__ import annotations

import json
import re
import resource
import subprocess
from pathlib import Path

import pytest
import trio

from binaries import require
from gatewayproc import GatewayProcess, gridgate_env, spool_stats

WRK_SCRIPT = Path(__file__).resolve().parents[3] / "bench" / "wrk_post.lua"
POST = (b"POST /v1/telemetry HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: 45\r\n\r\n"
        b'{"device_id": "meter-1", "temperature": 21.5}')
# A head that never ends: a header value growing by a byte per send
SLOW_HEAD = b"POST /v1/telemetry HTTP/1.1\r\nHost: gw\r\nX-Slow: "
SLOW_BYTES = 240                 # one every 0.25 s: a minute, 60 header timeouts


@pytest.fixture(params=["fast", "std"], ids=["fast", "std"])
def engine(request):
    return request.param


def _raise_fd_limit(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))


def _stopped_line(gw: GatewayProcess) -> tuple[int, int]:
    """(readings written, rejected) from the gateway's last log line."""
    (counts,) = [(int(m.group(1)), int(m.group(2))) for line in gw.lines
                 if (m := re.search(r"stopped: (\d+) readings written, (\d+) rejected", line))]
    return counts


async def test_1000_slowloris_heads_are_closed_while_a_normal_client_is_served(tmp_path, engine):
    _raise_fd_limit(4096)
    gw = GatewayProcess(tmp_path / "data", "--http-engine", engine,
                        env=gridgate_env(GRIDGATE_HTTP_HEADER_TIMEOUT_S="1"))
    host, port = gw.http
    events: list[tuple[str, int]] = []    # in the order they happened: ("open" | "closed" | "answer", n)
    ends: list[str] = []

    async def slow(i: int) -> None:
        how = "gave up: never closed by the server"
        async with await trio.open_tcp_stream(host, port) as stream:
            await stream.send_all(SLOW_HEAD)
            events.append(("open", i))
            for _ in range(SLOW_BYTES):
                try:
                    with trio.move_on_after(0.25):
                        data = await stream.receive_some(1024)
                        how = "closed by the server" if data == b"" else f"answered {data[:20]!r}"
                        break
                    await stream.send_all(b"a")
                except trio.BrokenResourceError:
                    how = "closed by the server"
                    break
        events.append(("closed", i))
        ends.append(how)

    async def normal(done: trio.Event) -> None:
        async with await trio.open_tcp_stream(host, port) as stream:
            n = 0
            while not done.is_set():      # one request at a time, each as soon as the last is answered
                await stream.send_all(POST)
                reply = b""
                while not reply.endswith(b"}"):
                    chunk = await stream.receive_some(65536)
                    assert chunk, reply
                    reply += chunk
                assert reply.startswith(b"HTTP/1.1 202 "), reply
                n += 1
                events.append(("answer", n))

    try:
        with trio.fail_after(120):
            async with trio.open_nursery() as outer:
                done = trio.Event()
                outer.start_soon(normal, done)
                async with trio.open_nursery() as nursery:
                    for i in range(1000):
                        nursery.start_soon(slow, i)
                done.set()
        assert gw.alive()
    finally:
        assert gw.stop() == 0, gw.log()
    # every slow head was closed by the server, unanswered, before it gave up
    assert ends == ["closed by the server"] * 1000
    # the normal client was answered while slow heads were held open
    kinds = [kind for kind, _ in events]
    first_open, last_closed = kinds.index("open"), len(kinds) - 1 - kinds[::-1].index("closed")
    assert "answer" in kinds[first_open:last_closed], "no answer while the slow heads were open"
    answered = kinds.count("answer")
    assert _stopped_line(gw) == (answered, 0)
    assert spool_stats(gw.data_dir)["records"] == answered


@pytest.fixture
def wrk() -> str:
    """The wrk binary (binaries.require: a skip here, a failure in CI)."""
    return require("wrk")


def test_wrk_10s_all_2xx_and_the_spool_holds_exactly_what_was_acknowledged(wrk, tmp_path, engine):
    gw = GatewayProcess(tmp_path / "data", "--http-engine", engine)
    host, port = gw.http
    try:
        out = subprocess.run([wrk, "-t", "2", "-c", "32", "-d", "10s", "-s", str(WRK_SCRIPT),
                              f"http://{host}:{port}/"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
    finally:
        assert gw.stop() == 0, gw.log()
    counts = dict((k, int(v)) for k, v in re.findall(r"(\w+)=(\d+)", out.stdout.split("WRK_COUNTS", 1)[1]
                                                      .splitlines()[0]))
    assert "Non-2xx" not in out.stdout and "Socket errors" not in out.stdout, out.stdout
    assert counts["non2xx"] == 0 and counts["answered"] > 0, out.stdout
    assert counts["accepted"] == counts["answered"] * counts["readings"]
    written, rejected = _stopped_line(gw)
    # the spool holds what the gateway wrote, no more, no less; that is every
    # reading wrk saw acknowledged, plus those of requests still in flight
    # when wrk stopped (answered to a closed socket), and none it never sent
    assert spool_stats(gw.data_dir)["records"] == written and rejected == 0
    assert counts["accepted"] <= written <= counts["sent"] * counts["readings"], (counts, written)
    print(json.dumps({"engine": engine, **counts, "spool_records": written}))
