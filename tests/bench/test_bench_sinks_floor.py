"""bench/sinks.py's nats-server floor: a raw-socket publisher against a real
``nats-server -js`` (tests/natsproc.py) on a free loopback port, storing
messages shaped as the JetStream sink's. Only counts and shapes are checked,
never how fast."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import msgspec
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))   # bench/ is not an installed package

from bench import sinks  # noqa: E402

FRAME = re.compile(rb"HPUB (\S+) (\S+) (\d+) (\d+)\r\n")


def test_floor_frames_are_the_sinks_shape():
    frames = sinks._floor_frames(1100, b"_INBOX.t")
    replies = []
    for frame in frames:
        m = FRAME.match(frame)
        assert m is not None
        subject, reply, hlen, size = m[1], m[2], int(m[3]), int(m[4])
        rest = frame[m.end():]
        assert len(rest) == size + 2 and rest.endswith(b"\r\n")
        header, body = rest[:hlen], rest[hlen:size]
        assert header.startswith(b"NATS/1.0\r\nNats-Msg-Id: ") and header.endswith(
            b"\r\nNats-Expected-Stream: TELEMETRY\r\n\r\n")
        record = msgspec.msgpack.decode(body)
        assert subject == b"telemetry.loadgen." + record["device_id"].encode()
        assert re.fullmatch(rb"Nats-Msg-Id: %s:%d:[0-9a-f]{24}" % (record["device_id"].encode(), record["ts_ns"]),
                            header.split(b"\r\n")[1])
        replies.append(reply)
    # one reply subject per slot of the window, reused in turn
    assert replies[:sinks.FLOOR_WINDOW] == [b"_INBOX.t.%d" % i for i in range(sinks.FLOOR_WINDOW)]
    assert set(replies) == set(replies[:sinks.FLOOR_WINDOW])
    assert len({m for f in frames for m in re.findall(rb"Nats-Msg-Id: (\S+)", f)}) == 1100   # each its own id


@pytest.mark.usefixtures("nats_server_binary")
def test_floor_stores_every_message_and_reports_the_servers_cpu(tmp_path):
    result = sinks.nats_server_floor(tmp_path, messages=3000)
    assert result["messages"] == 3000
    assert result["server_cpu_us_per_message"] >= 0 and result["messages_per_s"] > 0
    assert set(result) == {"messages", "server_cpu_us_per_message", "messages_per_s"}


def test_machine_ceiling_is_the_cores_over_the_floor_and_the_load_generator():
    # 2 cores, 7.2 + 3.8 µs per reading: 2e6 / 11 readings/s
    assert sinks.machine_ceiling(2, 7.2, 3.8) == pytest.approx(181_818.18, rel=1e-6)
    assert sinks.machine_ceiling(8, 7.2, 0.8) == pytest.approx(1e6)
    # the gateway's own share, when given, counts as well
    assert sinks.machine_ceiling(2, 6.9, 2.5, 4.3) == pytest.approx(2e6 / 13.7)
    # without a floor or the load generator's figure there is no ceiling to give
    assert sinks.machine_ceiling(2, None, 3.8) is None
    assert sinks.machine_ceiling(2, 7.2, None) is None
