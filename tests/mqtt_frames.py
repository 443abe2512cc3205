"""MQTT 3.1.1 frames built independently of the code under test.

The helpers of paho's tests/paho_test.py, written with ``struct`` from the
specification's figures. Nothing here imports gridgate: a test that compares
the codec with these frames compares two independent readings of the spec.
Every builder takes raw overrides (``flags=``, ``first=``, ``options=``) so
tests can build invalid packets with the same code.
"""
from __future__ import annotations

import struct

__all__ = [
    "pack_remaining_length", "pack_string", "gen_packet", "gen_connect", "gen_connack", "gen_publish",
    "gen_puback", "gen_pubrec", "gen_pubrel", "gen_pubcomp", "gen_subscribe", "gen_suback", "gen_unsubscribe",
    "gen_unsuback", "gen_pingreq", "gen_pingresp", "gen_disconnect",
]


def pack_remaining_length(n: int) -> bytes:
    """Section 2.2.3: 7 bits a byte, least significant group first, bit 7 = more follows."""
    out = b""
    while True:
        byte = n % 128
        n //= 128
        if n > 0:
            byte |= 0x80
        out += struct.pack("!B", byte)
        if n == 0:
            return out


def pack_string(s: str | bytes) -> bytes:
    """Section 1.5.3: a two-byte big-endian length, then the bytes (UTF-8 for a str)."""
    raw = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("!H", len(raw)) + raw


def gen_packet(first: int, body: bytes = b"") -> bytes:
    """Any packet: first byte (type << 4 | flags), remaining length, body."""
    return struct.pack("!B", first) + pack_remaining_length(len(body)) + body


def gen_connect(client_id: str | bytes, keepalive: int = 0, clean_session: bool = True,
                proto_name: bytes = b"MQTT", proto_ver: int = 4, will_topic: str | bytes | None = None,
                will_payload: bytes = b"", will_qos: int = 0, will_retain: bool = False,
                username: str | bytes | None = None, password: bytes | None = None,
                flags: int | None = None, first: int = 0x10) -> bytes:
    """CONNECT (section 3.1); ``flags`` replaces the computed connect flags byte."""
    computed = 0
    payload = pack_string(client_id)
    if clean_session:
        computed |= 0x02
    if will_topic is not None:
        computed |= 0x04 | (will_qos << 3) | (0x20 if will_retain else 0)
        payload += pack_string(will_topic) + pack_string(will_payload)
    if username is not None:
        computed |= 0x80
        payload += pack_string(username)
    if password is not None:
        computed |= 0x40
        payload += pack_string(password)
    variable = pack_string(proto_name) + struct.pack("!BBH", proto_ver, computed if flags is None else flags,
                                                     keepalive)
    return gen_packet(first, variable + payload)


def gen_connack(rc: int, session_present: bool = False) -> bytes:
    return struct.pack("!BBBB", 0x20, 2, 1 if session_present else 0, rc)


def gen_publish(topic: str | bytes, qos: int = 0, payload: bytes = b"", retain: bool = False,
                dup: bool = False, mid: int = 0, first: int | None = None) -> bytes:
    """PUBLISH (section 3.3); the packet id is present only for QoS > 0."""
    if first is None:
        first = 0x30 | (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    body = pack_string(topic) + (struct.pack("!H", mid) if qos > 0 else b"") + payload
    return gen_packet(first, body)


def _ack(first: int, mid: int) -> bytes:
    return struct.pack("!BBH", first, 2, mid)


def gen_puback(mid: int) -> bytes:
    return _ack(0x40, mid)


def gen_pubrec(mid: int) -> bytes:
    return _ack(0x50, mid)


def gen_pubrel(mid: int) -> bytes:
    return _ack(0x62, mid)  # flags 0b0010 (section 3.6.1)


def gen_pubcomp(mid: int) -> bytes:
    return _ack(0x70, mid)


def gen_subscribe(mid: int, topics: list[tuple[str | bytes, int]], first: int = 0x82) -> bytes:
    """SUBSCRIBE (section 3.8): packet id, then (filter, requested QoS byte) pairs."""
    body = struct.pack("!H", mid) + b"".join(pack_string(t) + struct.pack("!B", q) for t, q in topics)
    return gen_packet(first, body)


def gen_suback(mid: int, codes: list[int]) -> bytes:
    return gen_packet(0x90, struct.pack("!H", mid) + bytes(codes))


def gen_unsubscribe(mid: int, topics: list[str | bytes], first: int = 0xA2) -> bytes:
    """UNSUBSCRIBE (section 3.10): packet id, then filters."""
    return gen_packet(first, struct.pack("!H", mid) + b"".join(pack_string(t) for t in topics))


def gen_unsuback(mid: int) -> bytes:
    return _ack(0xB0, mid)


def gen_pingreq() -> bytes:
    return b"\xc0\x00"


def gen_pingresp() -> bytes:
    return b"\xd0\x00"


def gen_disconnect() -> bytes:
    return b"\xe0\x00"
