"""The /v1/ws ack frames: the hand-built JSON of an ack without errors is
byte for byte what msgspec writes for the general case."""
from __future__ import annotations

import msgspec
import pytest

from gridgate.ingest.records import Rejection
from gridgate.protocols.websocket.frames import OP_BINARY, OP_TEXT, FrameDecoder
from gridgate.protocols.websocket.session import _ack_frame


def server_frame_payload(frame: bytes) -> tuple[int, bytes]:
    # the decoder takes client (masked) frames: mask this one with the zero key
    masked = bytes([frame[0], frame[1] | 0x80]) + frame[2:4 if frame[1] == 126 else 2] + b"\0\0\0\0"
    masked += frame[4 if frame[1] == 126 else 2:]
    [(opcode, payload)] = FrameDecoder(1 << 20).feed(masked)
    return opcode, payload


@pytest.mark.parametrize("seq, accepted", [(0, 0), (1, 1), (7, 500), (2**32, 3), (2**63 - 1, 10**6)])
def test_json_ack_without_errors_is_what_msgspec_writes(seq, accepted):
    opcode, payload = server_frame_payload(_ack_frame(seq, accepted, [], False))
    assert opcode == OP_TEXT
    assert payload == msgspec.json.encode({"ack": seq, "accepted": accepted, "rejected": 0, "errors": []})


def test_acks_with_errors_and_msgpack_acks():
    refused = [Rejection(reason="out_of_range", device_id="m", raw=b"", index=1, field="humidity", detail="d")]
    opcode, payload = server_frame_payload(_ack_frame(3, 1, refused, False))
    assert (opcode, msgspec.json.decode(payload)) == (OP_TEXT, {"ack": 3, "accepted": 1, "rejected": 1, "errors": [
        {"index": 1, "reason": "out_of_range", "field": "humidity", "detail": "d"}]})
    opcode, payload = server_frame_payload(_ack_frame(4, 2, [], True))
    assert (opcode, msgspec.msgpack.decode(payload)) == (OP_BINARY, {"ack": 4, "accepted": 2, "rejected": 0,
                                                                   "errors": []})
