"""MQTT 3.1.1 server codec, pure-Python reference implementation.

Sans-IO: ``MQTTCodec.feed(bytes)`` returns every complete packet as an event
(gridgate.mqtt_events); encoders return bytes. The compiled twin in
src/_fastparse_mqtt.pxi must behave identically (tests/test_mqtt_*.py).

Errors: only ``gridgate.errors.MQTTProtocolError`` escapes, with one of
``MQTT_ERROR_REASONS``:

- ``malformed``: bad remaining length, lengths that overrun or underfill a
  packet, reserved bits or values, reserved packet types 0/15.
- ``too_large``: the packet is bigger than ``max_packet_bytes`` (raised on the
  fixed header, before the body is buffered).
- ``expected_connect`` (MQTT-3.1.0-1), ``duplicate_connect`` (MQTT-3.1.0-2).
- ``unsupported_protocol`` (return_code 1): not MQTT/4 or MQIsdp/3.
- ``identifier_rejected`` (return_code 2): empty client id without clean session (MQTT-3.1.3-8).
- ``bad_utf8``: an ill-formed string, U+0000 or a surrogate (MQTT-1.5.3-1/2).
- ``bad_flags``: fixed-header flags other than table 2.2.2 requires (MQTT-2.2.2-1/2),
  DUP on QoS 0 (MQTT-3.3.1-2).
- ``bad_topic``: an empty topic name or one with wildcards (MQTT-3.3.2-2, 4.7.3-1).
- ``bad_topic_filter``: a topic filter that breaks section 4.7.1.
- ``bad_packet_id``: packet identifier 0 where one is required (MQTT-2.3.1-1).
- ``unexpected_packet``: a server-to-client packet (CONNACK, SUBACK, UNSUBACK, PINGRESP).
- ``data_after_disconnect``: bytes after DISCONNECT.
"""
from __future__ import annotations

from collections.abc import Iterable

from gridgate.errors import MQTTProtocolError
from gridgate.mqtt_events import (
    Connect, Disconnect, PingReq, PubAck, PubComp, Publish, PubRec, PubRel, Subscribe, Unsubscribe, Will,
)

__all__ = [
    "MQTTCodec", "MQTT_ERROR_REASONS", "encode_connack", "encode_puback", "encode_pubrec", "encode_pubrel",
    "encode_pubcomp", "encode_acks", "encode_suback", "encode_unsuback", "encode_pingresp", "encode_publish",
]

MQTT_ERROR_REASONS = (
    "malformed", "too_large", "expected_connect", "duplicate_connect", "unsupported_protocol",
    "identifier_rejected", "bad_utf8", "bad_flags", "bad_topic", "bad_topic_filter", "bad_packet_id",
    "unexpected_packet", "data_after_disconnect",
)

# Required fixed-header flags per packet type (MQTT 3.1.1 table 2.2.2);
# None = PUBLISH, whose flags carry DUP/QoS/RETAIN.
_FLAGS = {1: 0, 2: 0, 3: None, 4: 0, 5: 0, 6: 2, 7: 0, 8: 2, 9: 0, 10: 2, 11: 0, 12: 0, 13: 0, 14: 0}
_SERVER_TO_CLIENT = {2, 9, 11, 13}


def _err(reason: str, detail: str = "", return_code: int | None = None) -> MQTTProtocolError:
    return MQTTProtocolError(reason, detail, return_code)


def _utf8(raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")  # strict: rejects surrogates and overlongs
    except UnicodeDecodeError:
        raise _err("bad_utf8", "string is not well-formed UTF-8") from None
    if "\x00" in text:
        raise _err("bad_utf8", "string contains U+0000")
    return text


def _check_topic_name(topic: str) -> None:
    if not topic:
        raise _err("bad_topic", "empty topic name")
    if "+" in topic or "#" in topic:
        raise _err("bad_topic", f"wildcard in topic name {topic!r}")


def _check_topic_filter(topic: str) -> None:
    if not topic:
        raise _err("bad_topic_filter", "empty topic filter")
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise _err("bad_topic_filter", f"'#' must be a whole last level in {topic!r}")
        if "+" in level and level != "+":
            raise _err("bad_topic_filter", f"'+' must be a whole level in {topic!r}")


class _Reader:
    """Reads fields of one packet body; any overrun is ``malformed``."""

    __slots__ = ("buf", "pos", "end")

    def __init__(self, buf: bytes, pos: int, end: int) -> None:
        self.buf, self.pos, self.end = buf, pos, end

    def u8(self) -> int:
        if self.pos + 1 > self.end:
            raise _err("malformed", "packet ends inside a field")
        value = self.buf[self.pos]
        self.pos += 1
        return value

    def u16(self) -> int:
        if self.pos + 2 > self.end:
            raise _err("malformed", "packet ends inside a field")
        value = (self.buf[self.pos] << 8) | self.buf[self.pos + 1]
        self.pos += 2
        return value

    def binary(self) -> bytes:
        n = self.u16()
        if self.pos + n > self.end:
            raise _err("malformed", "length prefix runs past the packet")
        value = self.buf[self.pos:self.pos + n]
        self.pos += n
        return value

    def string(self) -> str:
        return _utf8(self.binary())

    def done(self) -> bool:
        return self.pos >= self.end


class MQTTCodec:
    """Server side of one MQTT 3.1.1 / 3.1 connection."""

    def __init__(self, max_packet_bytes: int = 1_048_576) -> None:
        self.max_packet_bytes = max_packet_bytes
        self._buf = b""
        self._connected = False
        self._level = 0
        self._disconnected = False
        self._error: MQTTProtocolError | None = None

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def protocol_level(self) -> int:
        return self._level

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list:
        if self._error is not None:
            raise self._error
        if type(data) is not bytes:
            data = bytes(data)
        buf = self._buf + data if self._buf else data
        events: list = []
        pos = 0
        end = len(buf)
        try:
            while pos < end:
                if self._disconnected:
                    raise _err("data_after_disconnect", "bytes after DISCONNECT")
                # fixed header: type/flags byte and the remaining length
                # varint (at most 4 bytes, MQTT 3.1.1 section 2.2.3)
                first = buf[pos]
                length = 0
                mult = 1
                i = pos + 1
                while True:
                    if i >= end:
                        self._buf = buf[pos:]
                        return events
                    byte = buf[i]
                    length += (byte & 0x7F) * mult
                    i += 1
                    if not byte & 0x80:
                        break
                    if i - pos - 1 >= 4:
                        raise _err("malformed", "remaining length longer than 4 bytes")
                    mult *= 128
                if (i - pos) + length > self.max_packet_bytes:
                    raise _err("too_large", f"packet of {(i - pos) + length} bytes exceeds "
                                            f"max_packet_bytes {self.max_packet_bytes}")
                if i + length > end:
                    self._buf = buf[pos:]
                    return events
                events.append(self._decode(first, buf, i, i + length))
                pos = i + length
            self._buf = b""
            return events
        except MQTTProtocolError as exc:
            self._error = exc
            self._buf = b""
            raise

    # -- packets ----------------------------------------------------------

    def _decode(self, first: int, buf: bytes, start: int, end: int):
        ptype = first >> 4
        flags = first & 0x0F
        if ptype == 0 or ptype == 15:
            raise _err("malformed", f"reserved packet type {ptype}")
        required = _FLAGS[ptype]
        if required is not None and flags != required:
            raise _err("bad_flags", f"packet type {ptype} with flags {flags:#x}")
        if ptype in _SERVER_TO_CLIENT:
            raise _err("unexpected_packet", f"packet type {ptype} is sent by servers only")
        if not self._connected:
            if ptype != 1:
                raise _err("expected_connect", "the first packet must be CONNECT")
            return self._connect(buf, start, end)
        r = _Reader(buf, start, end)
        if ptype == 3:
            return self._publish(flags, r, buf)
        if ptype == 1:
            raise _err("duplicate_connect", "a second CONNECT on one connection")
        if 4 <= ptype <= 7:
            if end - start != 2:
                raise _err("malformed", "acknowledgement with remaining length other than 2")
            pid = r.u16()
            if pid == 0:
                raise _err("bad_packet_id", "packet identifier 0")
            return (PubAck, PubRec, PubRel, PubComp)[ptype - 4](pid)
        if ptype == 8 or ptype == 10:
            pid = r.u16()
            if pid == 0:
                raise _err("bad_packet_id", "packet identifier 0")
            if r.done():
                raise _err("malformed", "SUBSCRIBE/UNSUBSCRIBE without a topic filter")
            if ptype == 8:
                topics: list = []
                while not r.done():
                    topic = r.string()
                    qos = r.u8()
                    if qos > 2:
                        raise _err("malformed", f"requested QoS byte {qos:#x}")
                    _check_topic_filter(topic)
                    topics.append((topic, qos))
                return Subscribe(pid, topics)
            filters: list = []
            while not r.done():
                topic = r.string()
                _check_topic_filter(topic)
                filters.append(topic)
            return Unsubscribe(pid, filters)
        # PINGREQ (12), DISCONNECT (14)
        if end != start:
            raise _err("malformed", f"packet type {ptype} must have no body")
        if ptype == 12:
            return PingReq()
        self._disconnected = True
        return Disconnect()

    def _publish(self, flags: int, r: _Reader, buf: bytes) -> Publish:
        qos = (flags >> 1) & 3
        dup = bool(flags & 8)
        if qos == 3:
            raise _err("malformed", "PUBLISH with QoS 3")
        if dup and qos == 0:
            raise _err("bad_flags", "DUP set on a QoS 0 PUBLISH")
        topic = r.string()
        _check_topic_name(topic)
        pid = 0
        if qos:
            pid = r.u16()
            if pid == 0:
                raise _err("bad_packet_id", "packet identifier 0")
        payload = memoryview(buf)[r.pos:r.end]
        return Publish(topic, payload, qos, pid, bool(flags & 1), dup)

    def _connect(self, buf: bytes, start: int, end: int) -> Connect:
        r = _Reader(buf, start, end)
        name_raw = r.binary()
        level = r.u8()
        if not ((name_raw == b"MQTT" and level == 4) or (name_raw == b"MQIsdp" and level == 3)):
            raise _err("unsupported_protocol", f"protocol {name_raw[:16]!r} level {level}", 1)
        name = name_raw.decode("ascii")
        cflags = r.u8()
        keepalive = r.u16()
        if cflags & 0x01:
            raise _err("malformed", "reserved CONNECT flag set")
        clean = bool(cflags & 0x02)
        will_flag = bool(cflags & 0x04)
        will_qos = (cflags >> 3) & 3
        will_retain = bool(cflags & 0x20)
        has_password = bool(cflags & 0x40)
        has_username = bool(cflags & 0x80)
        if not will_flag and (will_qos or will_retain):
            raise _err("malformed", "Will QoS/retain set without the Will flag")
        if will_qos == 3:
            raise _err("malformed", "Will QoS 3")
        if has_password and not has_username:
            raise _err("malformed", "password flag without username flag")
        client_id = r.string()
        will = None
        if will_flag:
            will_topic = r.string()
            _check_topic_name(will_topic)
            will = Will(will_topic, r.binary(), will_qos, will_retain)
        username = r.string() if has_username else None
        password = r.binary() if has_password else None
        if not r.done():
            raise _err("malformed", "bytes after the CONNECT payload")
        if not client_id and not clean:
            raise _err("identifier_rejected", "empty client id requires clean session", 2)
        self._connected = True
        self._level = level
        return Connect(name, level, clean, keepalive, client_id, will, username, password)


# -- encoders ---------------------------------------------------------------


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n % 128
        n //= 128
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _check_pid(packet_id: int) -> None:
    if not 1 <= packet_id <= 65535:
        raise ValueError(f"packet id {packet_id} outside 1..65535")


def encode_connack(session_present: bool, return_code: int) -> bytes:
    if not 0 <= return_code <= 255:
        raise ValueError(f"return code {return_code} outside 0..255")
    return bytes((0x20, 2, 1 if session_present else 0, return_code))


def _ack(first: int, packet_id: int) -> bytes:
    _check_pid(packet_id)
    return bytes((first, 2, packet_id >> 8, packet_id & 0xFF))


def encode_puback(packet_id: int) -> bytes:
    return _ack(0x40, packet_id)


def encode_pubrec(packet_id: int) -> bytes:
    return _ack(0x50, packet_id)


def encode_pubrel(packet_id: int) -> bytes:
    return _ack(0x62, packet_id)


def encode_pubcomp(packet_id: int) -> bytes:
    return _ack(0x70, packet_id)


_ACK_FIRST = {4: 0x40, 5: 0x50, 6: 0x62, 7: 0x70}


def encode_acks(packet_type: int, packet_ids: Iterable[int]) -> bytes:
    """Several PUBACK/PUBREC/PUBREL/PUBCOMP packets in one buffer."""
    first = _ACK_FIRST.get(packet_type)
    if first is None:
        raise ValueError(f"packet type {packet_type} is not an acknowledgement")
    return b"".join([_ack(first, pid) for pid in packet_ids])


def encode_suback(packet_id: int, return_codes: Iterable[int]) -> bytes:
    _check_pid(packet_id)
    codes = bytes(return_codes)
    if not codes or any(c not in (0, 1, 2, 0x80) for c in codes):
        raise ValueError(f"invalid SUBACK return codes {list(codes)}")
    return b"\x90" + _remaining_length(2 + len(codes)) + packet_id.to_bytes(2, "big") + codes


def encode_unsuback(packet_id: int) -> bytes:
    return _ack(0xB0, packet_id)


def encode_pingresp() -> bytes:
    return b"\xd0\x00"


def encode_publish(topic: str, payload: bytes, qos: int = 0, packet_id: int = 0, retain: bool = False,
                   dup: bool = False) -> bytes:
    if qos not in (0, 1, 2):
        raise ValueError(f"QoS {qos} is not 0, 1 or 2")
    try:
        _check_topic_name(topic)
        raw_topic = _utf8(topic.encode("utf-8")).encode("utf-8")
    except (MQTTProtocolError, UnicodeEncodeError) as exc:
        raise ValueError(f"invalid topic {topic!r}: {exc}") from None
    if len(raw_topic) > 65535:
        raise ValueError("topic longer than 65535 bytes")
    if qos:
        _check_pid(packet_id)
    elif packet_id or dup:
        raise ValueError("QoS 0 PUBLISH takes no packet id and no DUP")
    body_len = 2 + len(raw_topic) + (2 if qos else 0) + len(payload)
    if body_len > 268_435_455:
        raise ValueError("PUBLISH larger than MQTT allows")
    first = 0x30 | (8 if dup else 0) | (qos << 1) | (1 if retain else 0)
    parts = [bytes((first,)), _remaining_length(body_len), len(raw_topic).to_bytes(2, "big"), raw_topic]
    if qos:
        parts.append(packet_id.to_bytes(2, "big"))
    parts.append(bytes(payload))
    return b"".join(parts)
