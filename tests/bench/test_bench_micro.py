"""bench/micro.py's WebSocket row measures what it says: both sides unmask the
200-byte payload of one client frame, cut from it as FrameDecoder.feed cuts it."""
from __future__ import annotations

from bench import micro
from gridgate import _fastparse
from gridgate.protocols import wsmask_py


def test_the_unmask_row_unmasks_a_200_byte_payload_with_the_frames_key():
    [(name, units, make)] = [case for case in micro.cases() if case[0].startswith("WebSocket")]
    key = bytes.fromhex("37fa213d")
    want = bytes(b ^ key[i % 4] for i, b in enumerate(range(200)))
    assert units == 1 and "200 B" in name
    assert make(_fastparse)() == make(wsmask_py)() == want
