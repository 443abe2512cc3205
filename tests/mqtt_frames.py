"""MQTT 3.1.1 frames built independently of the code under test, with
``struct`` (the helpers of paho's tests/paho_test.py)."""
from __future__ import annotations

import struct


def pack_remaining_length(n: int) -> bytes:
    out = b""
    while True:
        byte = n % 128
        n //= 128
        if n > 0:
            byte |= 0x80
        out += struct.pack("!B", byte)
        if n == 0:
            return out


def _str(s: str | bytes) -> bytes:
    raw = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("!H", len(raw)) + raw


def gen_connect(client_id: str | bytes, keepalive: int = 0, clean_session: bool = True,
                proto_name: bytes = b"MQTT", proto_ver: int = 4, will_topic: str | None = None,
                will_payload: bytes = b"", will_qos: int = 0, will_retain: bool = False,
                username: str | None = None, password: bytes | None = None) -> bytes:
    flags = 0
    payload = _str(client_id)
    if clean_session:
        flags |= 0x02
    if will_topic is not None:
        flags |= 0x04 | (will_qos << 3) | (0x20 if will_retain else 0)
        payload += _str(will_topic) + _str(will_payload)
    if username is not None:
        flags |= 0x80
        payload += _str(username)
    if password is not None:
        flags |= 0x40
        payload += _str(password)
    variable = _str(proto_name) + struct.pack("!BBH", proto_ver, flags, keepalive)
    body = variable + payload
    return b"\x10" + pack_remaining_length(len(body)) + body


def gen_publish(topic: str | bytes, qos: int = 0, payload: bytes = b"", retain: bool = False,
                dup: bool = False, mid: int = 0) -> bytes:
    first = 0x30 | (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    body = _str(topic) + (struct.pack("!H", mid) if qos > 0 else b"") + payload
    return struct.pack("!B", first) + pack_remaining_length(len(body)) + body


def _ack(first: int, mid: int) -> bytes:
    return struct.pack("!BBH", first, 2, mid)


def gen_puback(mid: int) -> bytes:
    return _ack(0x40, mid)


def gen_pubrec(mid: int) -> bytes:
    return _ack(0x50, mid)


def gen_pubrel(mid: int) -> bytes:
    return _ack(0x62, mid)


def gen_pubcomp(mid: int) -> bytes:
    return _ack(0x70, mid)


def gen_unsuback(mid: int) -> bytes:
    return _ack(0xB0, mid)


def gen_subscribe(mid: int, topics: list[tuple[str, int]]) -> bytes:
    body = struct.pack("!H", mid) + b"".join(_str(t) + struct.pack("!B", q) for t, q in topics)
    return b"\x82" + pack_remaining_length(len(body)) + body


def gen_unsubscribe(mid: int, topics: list[str]) -> bytes:
    body = struct.pack("!H", mid) + b"".join(_str(t) for t in topics)
    return b"\xa2" + pack_remaining_length(len(body)) + body


def gen_suback(mid: int, codes: list[int]) -> bytes:
    body = struct.pack("!H", mid) + bytes(codes)
    return b"\x90" + pack_remaining_length(len(body)) + body


def gen_connack(rc: int, session_present: bool = False) -> bytes:
    return struct.pack("!BBBB", 0x20, 2, 1 if session_present else 0, rc)


def gen_pingreq() -> bytes:
    return b"\xc0\x00"


def gen_pingresp() -> bytes:
    return b"\xd0\x00"


def gen_disconnect() -> bytes:
    return b"\xe0\x00"
