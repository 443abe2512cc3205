"""MQTT 5.0 frames built independently of the code under test.

Written with ``struct`` from the figures of MQTT Version 5.0 (sections
cited); nothing here imports gridgate, so a test comparing the server's
bytes with these compares two independent readings of the spec. Properties
are given as raw bytes (``prop_u16(0x21, 1024)``), in the order the test
expects them on the wire.
"""
from __future__ import annotations

import struct

from mqtt_frames import pack_remaining_length, pack_string

__all__ = [
    "prop_byte", "prop_u16", "prop_u32", "prop_vbi", "prop_str", "prop_bin", "prop_user", "props",
    "connect5", "connack5", "publish5", "puback5", "pubrec5", "pubrel5", "pubcomp5", "subscribe5", "suback5",
    "unsubscribe5", "unsuback5", "disconnect5", "pingreq5", "pingresp5",
]


# Property identifiers (section 2.2.2.2, table 2-4)
PAYLOAD_FORMAT = 0x01
MESSAGE_EXPIRY = 0x02
CONTENT_TYPE = 0x03
RESPONSE_TOPIC = 0x08
CORRELATION_DATA = 0x09
SESSION_EXPIRY = 0x11
SERVER_KEEP_ALIVE = 0x13
AUTH_METHOD = 0x15
REQUEST_PROBLEM_INFO = 0x17
REASON_STRING = 0x1F
RECEIVE_MAXIMUM = 0x21
TOPIC_ALIAS_MAXIMUM = 0x22
TOPIC_ALIAS = 0x23
RETAIN_AVAILABLE = 0x25
USER_PROPERTY = 0x26
MAXIMUM_PACKET_SIZE = 0x27
WILDCARD_AVAILABLE = 0x28
SUBSCRIPTION_ID_AVAILABLE = 0x29
SHARED_AVAILABLE = 0x2A


def prop_byte(ident: int, value: int) -> bytes:
    return struct.pack("!BB", ident, value)


def prop_u16(ident: int, value: int) -> bytes:
    return struct.pack("!BH", ident, value)


def prop_u32(ident: int, value: int) -> bytes:
    return struct.pack("!BI", ident, value)


def prop_vbi(ident: int, value: int) -> bytes:
    return struct.pack("!B", ident) + pack_remaining_length(value)


def prop_str(ident: int, value: str) -> bytes:
    return struct.pack("!B", ident) + pack_string(value)


def prop_bin(ident: int, value: bytes) -> bytes:
    return struct.pack("!B", ident) + pack_string(value)


def prop_user(name: str, value: str) -> bytes:
    return struct.pack("!B", USER_PROPERTY) + pack_string(name) + pack_string(value)


def props(*items: bytes) -> bytes:
    """A property block (2.2.2.1): its length as a variable byte integer, then the properties."""
    body = b"".join(items)
    return pack_remaining_length(len(body)) + body


def _packet(first: int, body: bytes) -> bytes:
    return struct.pack("!B", first) + pack_remaining_length(len(body)) + body


def connect5(client_id: str, keepalive: int = 0, clean_start: bool = True, properties: bytes = b"\x00",
             username: str | None = None, password: bytes | None = None, level: int = 5,
             will: tuple[str, bytes, int, bool] | None = None) -> bytes:
    """CONNECT (3.1); ``will``: (topic, payload, QoS, retain), with no Will Properties (3.1.3.2)."""
    flags = (0x02 if clean_start else 0) | (0x80 if username is not None else 0) | (0x40 if password is not None
                                                                                      else 0)
    if will is not None:
        flags |= 0x04 | (will[2] << 3) | (0x20 if will[3] else 0)
    body = pack_string("MQTT") + struct.pack("!BBH", level, flags, keepalive) + properties + pack_string(client_id)
    if will is not None:
        body += b"\x00" + pack_string(will[0]) + pack_string(will[1])
    if username is not None:
        body += pack_string(username)
    if password is not None:
        body += pack_string(password)
    return _packet(0x10, body)


def connack5(reason: int, properties: bytes = b"\x00", session_present: bool = False) -> bytes:
    """CONNACK (3.2): flags, reason code, properties (always present)."""
    return _packet(0x20, struct.pack("!BB", 1 if session_present else 0, reason) + properties)


def publish5(topic: str, payload: bytes, qos: int = 0, mid: int = 0, properties: bytes = b"\x00",
             retain: bool = False, dup: bool = False) -> bytes:
    """PUBLISH (3.3)."""
    first = 0x30 | (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    body = pack_string(topic) + (struct.pack("!H", mid) if qos else b"") + properties + payload
    return _packet(first, body)


def _ack(first: int, mid: int, reason: int, properties: bytes | None) -> bytes:
    """PUBACK and siblings (3.4.2): remaining length 2 for Success without
    properties, 3 for a reason code alone, else reason code and properties."""
    if properties is None:
        body = struct.pack("!H", mid) if reason == 0 else struct.pack("!HB", mid, reason)
    else:
        body = struct.pack("!HB", mid, reason) + properties
    return _packet(first, body)


def puback5(mid: int, reason: int = 0, properties: bytes | None = None) -> bytes:
    return _ack(0x40, mid, reason, properties)


def pubrec5(mid: int, reason: int = 0, properties: bytes | None = None) -> bytes:
    return _ack(0x50, mid, reason, properties)


def pubrel5(mid: int, reason: int = 0, properties: bytes | None = None) -> bytes:
    return _ack(0x62, mid, reason, properties)


def pubcomp5(mid: int, reason: int = 0, properties: bytes | None = None) -> bytes:
    return _ack(0x70, mid, reason, properties)


def subscribe5(mid: int, filters: list[tuple[str, int]], properties: bytes = b"\x00") -> bytes:
    """SUBSCRIBE (3.8): each filter with its Subscription Options byte."""
    body = struct.pack("!H", mid) + properties + b"".join(pack_string(t) + struct.pack("!B", o) for t, o in filters)
    return _packet(0x82, body)


def suback5(mid: int, reasons: list[int], properties: bytes = b"\x00") -> bytes:
    return _packet(0x90, struct.pack("!H", mid) + properties + bytes(reasons))


def unsubscribe5(mid: int, filters: list[str], properties: bytes = b"\x00") -> bytes:
    return _packet(0xA2, struct.pack("!H", mid) + properties + b"".join(pack_string(t) for t in filters))


def unsuback5(mid: int, reasons: list[int], properties: bytes = b"\x00") -> bytes:
    return _packet(0xB0, struct.pack("!H", mid) + properties + bytes(reasons))


def disconnect5(reason: int = 0, properties: bytes | None = None) -> bytes:
    """DISCONNECT (3.14): remaining length 0 for Normal disconnection without
    properties, 1 for a reason code alone."""
    if properties is None:
        return _packet(0xE0, b"" if reason == 0 else struct.pack("!B", reason))
    return _packet(0xE0, struct.pack("!B", reason) + properties)


def pingreq5() -> bytes:
    return b"\xc0\x00"


def pingresp5() -> bytes:
    return b"\xd0\x00"
