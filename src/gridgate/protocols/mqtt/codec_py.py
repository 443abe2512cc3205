"""MQTT 3.1.1 server-side codec: the pure-Python reference implementation.

Sans-IO (the h11 pattern): ``MQTTCodec.feed(data)`` takes the bytes of one
read and returns every complete packet now buffered as an event of
gridgate.protocols.mqtt.events; the ``encode_*`` functions return the bytes of packets
the server sends. The compiled twin, src/_fastparse_mqtt.pxi (module
``gridgate._fastparse``), must behave identically on every input: same
events, same errors (tests/protocols/mqtt/test_mqtt_codec.py, tests/protocols/mqtt/test_mqtt_hypothesis.py).
Statement numbers (MQTT-x.y.z-n) and sections refer to MQTT Version 3.1.1
(OASIS Standard, 29 October 2014).

Errors
------
Only ``gridgate.errors.MQTTProtocolError`` escapes ``feed`` (encoders raise
``ValueError``/``TypeError`` on misuse: those are programming errors). Its
``reason`` is one of ``MQTT_ERROR_REASONS``:

``malformed``
    Remaining length longer than 4 bytes (2.2.3); a length field running past
    the end of its packet, or bytes left over inside a packet; reserved
    packet types 0 and 15 (2.2.1); PUBLISH with QoS 3 (MQTT-3.3.1-4); the
    reserved CONNECT flag set (MQTT-3.1.2-3); Will QoS or Will Retain without
    the Will flag (MQTT-3.1.2-11/13/15); Will QoS 3 (MQTT-3.1.2-14); the
    password flag without the user name flag (MQTT-3.1.2-22); a SUBSCRIBE
    requested-QoS byte with reserved bits set or QoS 3 (MQTT-3-8.3-4);
    SUBSCRIBE/UNSUBSCRIBE without any topic filter (MQTT-3.8.3-3,
    MQTT-3.10.3-2); acknowledgements whose remaining length is not 2, PINGREQ
    and DISCONNECT whose remaining length is not 0.
``too_large``
    The packet (fixed header + remaining length) is bigger than
    ``max_packet_bytes``. Raised as soon as the fixed header is complete,
    before any of the body is buffered.
``expected_connect``
    The first packet is not CONNECT (MQTT-3.1.0-1).
``duplicate_connect``
    A second CONNECT (MQTT-3.1.0-2).
``unsupported_protocol`` (``return_code=1``)
    The protocol name/level pair is neither "MQTT"/4 (3.1.1) nor "MQIsdp"/3
    (3.1) (MQTT-3.1.2-1/2). The session answers CONNACK 0x01 and closes.
``identifier_rejected`` (``return_code=2``)
    A zero-byte client id with CleanSession 0 (MQTT-3.1.3-8), or an MQTT 3.1
    (``MQIsdp``) client id over 23 bytes (MQTT 3.1 allows 1 to 23
    characters). The session answers CONNACK 0x02 and closes.
``bad_utf8``
    A string that is not well-formed UTF-8 (including UTF-16 surrogates
    U+D800..U+DFFF and overlong forms) or contains U+0000 (MQTT-1.5.3-1/2).
``bad_char``
    A well-formed string holding a control character (U+0001..U+001F,
    U+007F..U+009F) or a non-character (U+FDD0..U+FDEF, and U+nFFFE/U+nFFFF
    in every plane). Section 1.5.3 lets a receiver close the connection for
    these ("MAY"); gridgate always does: a device id, a topic or a user name
    with one is a mistake or an attack, and it would reach logs, metrics
    labels and sinks. Checked after ``bad_utf8`` (a string with U+0000 and
    a control character is ``bad_utf8``). Applies to every UTF-8 string of
    every packet: client id, Will topic, user name, topic names and filters.
``bad_flags``
    Fixed-header flags other than table 2.2.2 requires (PUBREL, SUBSCRIBE,
    UNSUBSCRIBE 0b0010, every other non-PUBLISH packet 0) (MQTT-2.2.2-1/2);
    DUP set on a QoS 0 PUBLISH (MQTT-3.3.1-2).
``bad_topic``
    A PUBLISH topic name or a Will topic that is empty or contains '+' or
    '#' (MQTT-3.3.2-2, MQTT-4.7.3-1).
``bad_topic_filter``
    A SUBSCRIBE/UNSUBSCRIBE topic filter that is empty or breaks section
    4.7.1 ('#' alone or last after '/', '+' a whole level) (MQTT-4.7.1-2/3,
    MQTT-4.7.3-1).
``bad_packet_id``
    Packet identifier 0 where one is required (MQTT-2.3.1-1).
``unexpected_packet``
    A packet only servers send: CONNACK, SUBACK, UNSUBACK, PINGRESP.
``data_after_disconnect``
    Any byte after a DISCONNECT (MQTT-3.14.4-1: the client closes after it).

Precedence: errors are raised in the order the bytes are read, so a stream
always gives the same error however it is split into reads. For each packet:

1. its first byte, as soon as that byte arrives (``_FIRST_BYTE_ERRORS``):
   ``data_after_disconnect``; before CONNECT any other type is
   ``expected_connect`` and a CONNECT with flags is ``bad_flags``; after it,
   types 0/15 are ``malformed``, CONNECT is ``duplicate_connect``,
   server-only types are ``unexpected_packet``, then the flag checks;
2. the remaining length: ``malformed`` (5th length byte), then ``too_large``;
3. the body, field by field in wire order; for CONNECT the protocol
   name/level come first, then the connect flags, the payload fields, the
   leftover check, and last ``identifier_rejected``.

After the first error the codec is dead: every later ``feed`` raises an
equal error (same reason and return code).

Payload zero copy
-----------------
``Publish.payload`` is a read-only ``memoryview`` slice of an immutable
``bytes`` object: of the ``data`` object passed to ``feed`` when the packet
lies wholly inside it, otherwise (the packet began in an earlier read) of a
``bytes`` object holding exactly that one packet, assembled from the bytes
held back and the head of ``data``. Only the straddling packet is copied;
the packets after it in the same read are sliced from ``data``. A
``bytearray`` or ``memoryview`` given to ``feed`` is copied to ``bytes``
first (a mutable buffer could be overwritten under the slices).

The bytes held back between reads grow with what was received (a
``bytearray``, amortised appends), never with what a header announces, so
a client that trickles a large packet byte by byte costs linear time and at
most ``max_packet_bytes`` of memory.
"""
from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable

from gridgate.errors import MQTTProtocolError
from gridgate.ingest.records import Record, Rejection
from gridgate.protocols.mqtt.events import (
    CONNACK,
    CONNECT,
    DISCONNECT,
    PINGREQ,
    PINGRESP,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBACK,
    SUBSCRIBE,
    UNSUBACK,
    UNSUBSCRIBE,
    Connect,
    Disconnect,
    Event,
    PingReq,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    Subscribe,
    Unsubscribe,
    Will,
)

__all__ = [
    "MQTTCodec", "MQTT_ERROR_REASONS", "encode_connack", "encode_puback", "encode_pubrec", "encode_pubrel",
    "encode_pubcomp", "encode_acks", "encode_suback", "encode_unsuback", "encode_pingresp", "encode_publish",
    "take_publishes",
]

MQTT_ERROR_REASONS = (
    "malformed", "too_large", "expected_connect", "duplicate_connect", "unsupported_protocol",
    "identifier_rejected", "bad_utf8", "bad_char", "bad_flags", "bad_topic", "bad_topic_filter", "bad_packet_id",
    "unexpected_packet", "data_after_disconnect",
)

# Largest remaining length a 4-byte varint can carry (section 2.2.3), and so
# the largest packet (1 type byte + 4 length bytes + that).
MAX_REMAINING_LENGTH = 268_435_455
MAX_PACKET_BYTES = MAX_REMAINING_LENGTH + 5

# Required fixed-header flags of every client-to-server type but PUBLISH
# (table 2.2.2, MQTT-2.2.2-1).
_REQUIRED_FLAGS = {
    CONNECT: 0b0000, PUBACK: 0b0000, PUBREC: 0b0000, PUBREL: 0b0010, PUBCOMP: 0b0000,
    SUBSCRIBE: 0b0010, UNSUBSCRIBE: 0b0010, PINGREQ: 0b0000, DISCONNECT: 0b0000,
}
_SERVER_ONLY = frozenset({CONNACK, SUBACK, UNSUBACK, PINGRESP})
_ACKS: dict[int, type[PubAck | PubRec | PubRel | PubComp]] = {
    PUBACK: PubAck, PUBREC: PubRec, PUBREL: PubRel, PUBCOMP: PubComp}


def _first_byte_error(first: int, connected: bool) -> tuple[str, str] | None:
    """(reason, detail) for a packet starting with `first`, or None if valid."""
    ptype, flags = first >> 4, first & 0x0F
    if not connected:
        if ptype != CONNECT:
            return "expected_connect", f"first packet has type {ptype}, not CONNECT (MQTT-3.1.0-1)"
        if flags:
            return "bad_flags", f"CONNECT with flags {flags:#06b} (MQTT-2.2.2-2)"
        return None
    if ptype == 0 or ptype == 15:
        return "malformed", f"reserved packet type {ptype} (section 2.2.1)"
    if ptype == CONNECT:
        return "duplicate_connect", "a second CONNECT on one connection (MQTT-3.1.0-2)"
    if ptype in _SERVER_ONLY:
        return "unexpected_packet", f"packet type {ptype} is sent by servers only"
    if ptype == PUBLISH:
        qos = (flags >> 1) & 3
        if qos == 3:
            return "malformed", "PUBLISH with QoS 3 (MQTT-3.3.1-4)"
        if flags & 0b1000 and qos == 0:
            return "bad_flags", "DUP set on a QoS 0 PUBLISH (MQTT-3.3.1-2)"
        return None
    if flags != _REQUIRED_FLAGS[ptype]:
        return "bad_flags", f"packet type {ptype} with flags {flags:#06b} (MQTT-2.2.2-2)"
    return None


# The state machine of the first byte as two tables, indexed
# [connected][first byte]: 512 verdicts computed once at import.
_FIRST_BYTE_ERRORS = (
    tuple(_first_byte_error(b, False) for b in range(256)),
    tuple(_first_byte_error(b, True) for b in range(256)),
)


# -- fields ---------------------------------------------------------------------


# Control characters and non-characters: the code points section 1.5.3 lets
# a receiver refuse, refused here always (see ``bad_char``).
_NONCHARS = "".join(f"\\U{(plane << 16) | 0xFFFE:08x}\\U{(plane << 16) | 0xFFFF:08x}" for plane in range(17))
_FORBIDDEN = re.compile(f"[\\x01-\\x1f\\x7f-\\x9f\\ufdd0-\\ufdef{_NONCHARS}]")

# MQTT 3.1 (section 3.1 of its spec): a client id is 1 to 23 characters.
MQTT31_MAX_CLIENT_ID_BYTES = 23


def _utf8(raw: bytes) -> str:
    """An MQTT UTF-8 string (section 1.5.3), strictly: see ``bad_utf8`` and ``bad_char``."""
    try:
        text = raw.decode("utf-8")  # strict: refuses surrogates and overlong forms (MQTT-1.5.3-1)
    except UnicodeDecodeError:
        raise MQTTProtocolError("bad_utf8", "string is not well-formed UTF-8 (MQTT-1.5.3-1)") from None
    # printable ASCII (nearly every topic and id) needs no further look
    if not (text.isascii() and text.isprintable()):
        if "\x00" in text:
            raise MQTTProtocolError("bad_utf8", "string contains U+0000 (MQTT-1.5.3-2)")
        bad = _FORBIDDEN.search(text)
        if bad is not None:
            raise MQTTProtocolError("bad_char", f"string contains U+{ord(bad.group()):04X}, a control character or "
                                                "non-character (section 1.5.3, refused as a MUST)")
    return text


def _u8(buf: bytes, pos: int, end: int) -> int:
    if pos >= end:
        raise MQTTProtocolError("malformed", "packet ends inside a one-byte field")
    return buf[pos]


def _u16(buf: bytes, pos: int, end: int) -> int:
    if pos + 2 > end:
        raise MQTTProtocolError("malformed", "packet ends inside a two-byte integer")
    return (buf[pos] << 8) | buf[pos + 1]


def _binary(buf: bytes, pos: int, end: int) -> tuple[bytes, int]:
    """A length-prefixed field (section 1.5.3 / 3.1.3.3): (bytes, next position)."""
    n = _u16(buf, pos, end)
    pos += 2
    if pos + n > end:
        raise MQTTProtocolError("malformed", "length prefix runs past the end of the packet")
    return buf[pos:pos + n], pos + n


def _string(buf: bytes, pos: int, end: int) -> tuple[str, int]:
    raw, pos = _binary(buf, pos, end)
    return _utf8(raw), pos


def _check_topic_name(topic: str) -> None:
    """A topic name: at least one character, no wildcards (MQTT-4.7.3-1, MQTT-3.3.2-2)."""
    if not topic:
        raise MQTTProtocolError("bad_topic", "empty topic name (MQTT-4.7.3-1)")
    if "+" in topic or "#" in topic:
        raise MQTTProtocolError("bad_topic", f"wildcard in topic name {topic[:64]!r} (MQTT-3.3.2-2)")


def _check_topic_filter(topic: str) -> None:
    """A topic filter (section 4.7.1): '#' only as the whole last level, '+' only as a whole level."""
    if not topic:
        raise MQTTProtocolError("bad_topic_filter", "empty topic filter (MQTT-4.7.3-1)")
    levels = topic.split("/")
    last = len(levels) - 1
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != last):
            raise MQTTProtocolError("bad_topic_filter", f"'#' is not the whole last level of {topic[:64]!r} "
                                                        "(MQTT-4.7.1-2)")
        if "+" in level and level != "+":
            raise MQTTProtocolError("bad_topic_filter", f"'+' is not a whole level of {topic[:64]!r} "
                                                        "(MQTT-4.7.1-3)")


# -- the codec --------------------------------------------------------------------


class MQTTCodec:
    """Server side of one MQTT 3.1.1 / 3.1 connection (sans-IO).

    Args:
        max_packet_bytes: the largest packet accepted, fixed header included.

    Error handling:
        ``feed`` raises ``MQTTProtocolError`` on the first violation (see the
        module docstring); the codec is dead afterwards and raises an equal
        error on every later ``feed``. Events decoded earlier in the same
        ``feed`` call are not returned: the connection is closed anyway.
    """

    __slots__ = ("_max", "_partial", "_header_len", "_need", "_connected", "_level", "_disconnected",
                 "_error")

    def __init__(self, max_packet_bytes: int = 1_048_576) -> None:
        max_packet_bytes = operator.index(max_packet_bytes)
        if not 2 <= max_packet_bytes <= MAX_PACKET_BYTES:
            raise ValueError(f"max_packet_bytes {max_packet_bytes} outside 2..{MAX_PACKET_BYTES}")
        self._max = max_packet_bytes
        # A packet begun in an earlier read: its bytes so far, the length of
        # its fixed header (0 while the header itself is incomplete) and its
        # total size once known.
        self._partial = bytearray()
        self._header_len = 0
        self._need = 0
        self._connected = False
        self._level = 0
        self._disconnected = False
        self._error: MQTTProtocolError | None = None

    @property
    def max_packet_bytes(self) -> int:
        return self._max

    @property
    def connected(self) -> bool:
        """A CONNECT has been decoded."""
        return self._connected

    @property
    def protocol_level(self) -> int:
        """0 before CONNECT, then 4 (MQTT 3.1.1) or 3 (MQTT 3.1)."""
        return self._level

    @property
    def buffered(self) -> int:
        """Bytes held back waiting for the rest of a packet."""
        return len(self._partial)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Append `data` and return every complete packet now buffered, in order.

        Partial packets stay buffered and give no event (and no error until
        a byte that breaks the protocol arrives).
        """
        if self._error is not None:
            e = self._error
            raise MQTTProtocolError(e.reason, e.detail, e.return_code)
        if type(data) is not bytes:
            data = bytes(memoryview(data))  # a mutable buffer could change under the payload slices
        events: list[Event] = []
        try:
            pos = 0
            if self._partial:
                pos = self._finish_partial(data, events)
                if pos < 0:
                    return events
            self._decode_all(data, pos, events)
        except MQTTProtocolError as exc:
            self._error = exc
            self._partial = bytearray()
            self._header_len = self._need = 0
            raise
        return events

    # -- framing ------------------------------------------------------------

    def _header(self, buf: bytes, pos: int, end: int) -> tuple[int, int]:
        """Fixed header at `pos` (section 2.2): (header length, packet size), or (0, 0) if incomplete."""
        if self._disconnected:
            raise MQTTProtocolError("data_after_disconnect", "bytes after DISCONNECT (MQTT-3.14.4-1)")
        error = _FIRST_BYTE_ERRORS[self._connected][buf[pos]]
        if error is not None:
            raise MQTTProtocolError(*error)
        # Remaining length: 7 bits per byte, least significant first, at
        # most 4 bytes (section 2.2.3).
        length = 0
        shift = 0
        i = pos + 1
        while True:
            if i >= end:
                return 0, 0
            byte = buf[i]
            i += 1
            length |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            if i - pos == 5:
                raise MQTTProtocolError("malformed", "remaining length longer than 4 bytes (section 2.2.3)")
            shift += 7
        size = i - pos + length
        if size > self._max:
            raise MQTTProtocolError("too_large", f"packet of {size} bytes exceeds max_packet_bytes {self._max}")
        return i - pos, size

    def _finish_partial(self, data: bytes, events: list[Event]) -> int:
        """Complete the held-back packet from the head of `data`.

        Returns how many bytes of `data` it took, or -1 if all of `data` went
        into the still incomplete packet.
        """
        partial = self._partial
        if not self._header_len:
            # The header is incomplete, so `partial` has at most 4 bytes; a
            # header never needs more than 5.
            head = bytes(partial) + data[:5]
            header_len, size = self._header(head, 0, len(head))
            if not header_len:
                partial += data
                return -1
            self._header_len, self._need = header_len, size
        missing = self._need - len(partial)
        if missing > len(data):
            partial += data
            return -1
        partial += memoryview(data)[:missing]
        packet = bytes(partial)
        header_len = self._header_len
        self._partial = bytearray()
        self._header_len = self._need = 0
        events.append(self._decode(packet[0], packet, header_len, len(packet), memoryview(packet)))
        return missing

    def _decode_all(self, data: bytes, pos: int, events: list[Event]) -> None:
        end = len(data)
        view = None
        while pos < end:
            header_len, size = self._header(data, pos, end)
            if not header_len or pos + size > end:
                self._partial = bytearray(memoryview(data)[pos:])
                self._header_len, self._need = header_len, size
                return
            if view is None:
                view = memoryview(data)
            events.append(self._decode(data[pos], data, pos + header_len, pos + size, view))
            pos += size

    # -- packets ------------------------------------------------------------

    def _decode(self, first: int, buf: bytes, start: int, end: int, view: memoryview) -> Event:
        """One packet whose first byte passed `_FIRST_BYTE_ERRORS`; body is buf[start:end]."""
        ptype = first >> 4
        if ptype == PUBLISH:
            return self._publish(first, buf, start, end, view)
        if ptype in _ACKS:  # PUBACK, PUBREC, PUBREL, PUBCOMP (sections 3.4-3.7)
            if end - start != 2:
                raise MQTTProtocolError("malformed", f"packet type {ptype} with remaining length {end - start}, "
                                                     "not 2")
            pid = _u16(buf, start, end)
            if pid == 0:
                raise MQTTProtocolError("bad_packet_id", "packet identifier 0 (MQTT-2.3.1-1)")
            return _ACKS[ptype](pid)
        if ptype == SUBSCRIBE or ptype == UNSUBSCRIBE:
            return self._subscribe(ptype, buf, start, end)
        if ptype == CONNECT:
            return self._connect(buf, start, end)
        # PINGREQ (3.12), DISCONNECT (3.14)
        if end != start:
            raise MQTTProtocolError("malformed", f"packet type {ptype} with remaining length {end - start}, not 0")
        if ptype == PINGREQ:
            return PingReq()
        self._disconnected = True
        return Disconnect()

    def _publish(self, first: int, buf: bytes, start: int, end: int, view: memoryview) -> Publish:
        """PUBLISH (section 3.3); the flags were checked on the first byte."""
        qos = (first >> 1) & 3
        topic, pos = _string(buf, start, end)
        _check_topic_name(topic)
        pid = 0
        if qos:
            pid = _u16(buf, pos, end)
            pos += 2
            if pid == 0:
                raise MQTTProtocolError("bad_packet_id", "packet identifier 0 (MQTT-2.3.1-1)")
        # The payload is the rest of the packet and may be empty (3.3.3).
        return Publish(topic, view[pos:end], qos, pid, bool(first & 0b0001), bool(first & 0b1000))

    def _subscribe(self, ptype: int, buf: bytes, start: int, end: int) -> Subscribe | Unsubscribe:
        """SUBSCRIBE (section 3.8) or UNSUBSCRIBE (section 3.10)."""
        pid = _u16(buf, start, end)
        if pid == 0:
            raise MQTTProtocolError("bad_packet_id", "packet identifier 0 (MQTT-2.3.1-1)")
        pos = start + 2
        if pos == end:
            raise MQTTProtocolError("malformed", "SUBSCRIBE/UNSUBSCRIBE without a topic filter "
                                                 "(MQTT-3.8.3-3, MQTT-3.10.3-2)")
        if ptype == SUBSCRIBE:
            topics: list[tuple[str, int]] = []
            while pos < end:
                topic, pos = _string(buf, pos, end)
                _check_topic_filter(topic)
                options = _u8(buf, pos, end)
                pos += 1
                if options > 2:  # reserved bits set, or QoS 3
                    raise MQTTProtocolError("malformed", f"requested QoS byte {options:#04x} (MQTT-3-8.3-4)")
                topics.append((topic, options))
            return Subscribe(pid, topics)
        filters: list[str] = []
        while pos < end:
            topic, pos = _string(buf, pos, end)
            _check_topic_filter(topic)
            filters.append(topic)
        return Unsubscribe(pid, filters)

    def _connect(self, buf: bytes, start: int, end: int) -> Connect:
        """CONNECT (section 3.1)."""
        # Protocol name and level before anything else (MQTT-3.1.2-1/2).
        name, pos = _binary(buf, start, end)
        level = _u8(buf, pos, end)
        pos += 1
        if not ((name == b"MQTT" and level == 4) or (name == b"MQIsdp" and level == 3)):
            raise MQTTProtocolError("unsupported_protocol", f"protocol {name[:16]!r} level {level}", 1)
        flags = _u8(buf, pos, end)
        keepalive = _u16(buf, pos + 1, end)
        pos += 3
        # Connect flags (3.1.2.3 - 3.1.2.9)
        if flags & 0x01:
            raise MQTTProtocolError("malformed", "reserved CONNECT flag set (MQTT-3.1.2-3)")
        clean = bool(flags & 0x02)
        will_flag = bool(flags & 0x04)
        will_qos = (flags >> 3) & 3
        will_retain = bool(flags & 0x20)
        has_password = bool(flags & 0x40)
        has_username = bool(flags & 0x80)
        if not will_flag and (will_qos or will_retain):
            raise MQTTProtocolError("malformed", "Will QoS/Retain set without the Will flag "
                                                 "(MQTT-3.1.2-11/13/15)")
        if will_qos == 3:
            raise MQTTProtocolError("malformed", "Will QoS 3 (MQTT-3.1.2-14)")
        if has_password and not has_username:
            raise MQTTProtocolError("malformed", "password flag without user name flag (MQTT-3.1.2-22)")
        # Payload, in this order (3.1.3): client id, Will topic and message,
        # user name, password.
        raw_client_id, pos = _binary(buf, pos, end)
        client_id = _utf8(raw_client_id)
        will = None
        if will_flag:
            will_topic, pos = _string(buf, pos, end)
            _check_topic_name(will_topic)
            will_message, pos = _binary(buf, pos, end)
            will = Will(will_topic, will_message, will_qos, will_retain)
        username = password = None
        if has_username:
            username, pos = _string(buf, pos, end)
        if has_password:
            password, pos = _binary(buf, pos, end)
        if pos != end:
            raise MQTTProtocolError("malformed", f"{end - pos} bytes after the CONNECT payload")
        if not client_id and not clean:
            raise MQTTProtocolError("identifier_rejected", "zero-byte client id needs CleanSession 1 "
                                                           "(MQTT-3.1.3-8)", 2)
        if level == 3 and len(raw_client_id) > MQTT31_MAX_CLIENT_ID_BYTES:
            raise MQTTProtocolError("identifier_rejected", f"MQTT 3.1 client id of {len(raw_client_id)} bytes, "
                                                           f"more than {MQTT31_MAX_CLIENT_ID_BYTES}", 2)
        self._connected = True
        self._level = level
        return Connect(name.decode("ascii"), level, clean, keepalive, client_id, will, username, password)


# -- encoders (server to client) -----------------------------------------------------


def _remaining_length(n: int) -> bytes:
    """Section 2.2.3 encoding of a remaining length."""
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _pid(packet_id: int) -> int:
    packet_id = operator.index(packet_id)
    if not 1 <= packet_id <= 65535:
        raise ValueError(f"packet id {packet_id} outside 1..65535")
    return packet_id


def encode_connack(session_present: bool, return_code: int) -> bytes:
    """CONNACK (section 3.2)."""
    return_code = operator.index(return_code)
    if not 0 <= return_code <= 5:  # 3.2.2.3: 6-255 are reserved
        raise ValueError(f"CONNACK return code {return_code} outside 0..5")
    if session_present and return_code:
        raise ValueError("session present with a non-zero return code (MQTT-3.2.2-4)")
    return bytes((0x20, 2, 1 if session_present else 0, return_code))


def _ack(first: int, packet_id: int) -> bytes:
    pid = _pid(packet_id)
    return bytes((first, 2, pid >> 8, pid & 0xFF))


def encode_puback(packet_id: int) -> bytes:
    """PUBACK (section 3.4)."""
    return _ack(0x40, packet_id)


def encode_pubrec(packet_id: int) -> bytes:
    """PUBREC (section 3.5)."""
    return _ack(0x50, packet_id)


def encode_pubrel(packet_id: int) -> bytes:
    """PUBREL (section 3.6), flags 0b0010."""
    return _ack(0x62, packet_id)


def encode_pubcomp(packet_id: int) -> bytes:
    """PUBCOMP (section 3.7)."""
    return _ack(0x70, packet_id)


_ACK_FIRST_BYTE = {PUBACK: 0x40, PUBREC: 0x50, PUBREL: 0x62, PUBCOMP: 0x70}


def encode_acks(packet_type: int, packet_ids: Iterable[int]) -> bytes:
    """Many PUBACK/PUBREC/PUBREL/PUBCOMP packets (``packet_type`` 4..7) in one buffer."""
    first = _ACK_FIRST_BYTE.get(packet_type) if type(packet_type) is int else None
    if first is None:
        raise ValueError(f"packet type {packet_type!r} is not PUBACK, PUBREC, PUBREL or PUBCOMP")
    out = bytearray()
    for packet_id in packet_ids:
        pid = _pid(packet_id)
        out += bytes((first, 2, pid >> 8, pid & 0xFF))
    return bytes(out)


def encode_suback(packet_id: int, return_codes: Iterable[int]) -> bytes:
    """SUBACK (section 3.9): one return code per filter, each 0, 1, 2 or 0x80 (MQTT-3.9.3-2)."""
    pid = _pid(packet_id)
    codes = bytes(return_codes)
    if not codes:
        raise ValueError("SUBACK needs one return code per topic filter, and there is at least one")
    for code in codes:
        if code not in (0x00, 0x01, 0x02, 0x80):
            raise ValueError(f"SUBACK return code {code:#04x} is reserved (MQTT-3.9.3-2)")
    return b"\x90" + _remaining_length(2 + len(codes)) + bytes((pid >> 8, pid & 0xFF)) + codes


def encode_unsuback(packet_id: int) -> bytes:
    """UNSUBACK (section 3.11)."""
    return _ack(0xB0, packet_id)


def encode_pingresp() -> bytes:
    """PINGRESP (section 3.13)."""
    return b"\xd0\x00"


def encode_publish(topic: str, payload: bytes, qos: int = 0, packet_id: int = 0, retain: bool = False,
                   dup: bool = False) -> bytes:
    """PUBLISH (section 3.3) from the server (downlink commands).

    ``packet_id`` must be 1..65535 for QoS 1 and 2, and 0 for QoS 0 (which
    also takes no DUP, MQTT-3.3.1-2). ``payload`` is any C-contiguous
    bytes-like object.
    """
    if not isinstance(topic, str):
        raise TypeError(f"topic must be str, not {type(topic).__name__}")
    qos = operator.index(qos)
    if qos not in (0, 1, 2):
        raise ValueError(f"QoS {qos} is not 0, 1 or 2")
    try:
        raw_topic = topic.encode("utf-8")  # refuses lone surrogates
        _check_topic_name(_utf8(raw_topic))
    except (UnicodeEncodeError, MQTTProtocolError) as exc:
        raise ValueError(f"invalid topic name {topic[:64]!r}: {exc}") from None
    if len(raw_topic) > 65535:
        raise ValueError(f"topic name of {len(raw_topic)} bytes, more than 65535")
    if qos:
        pid = _pid(packet_id)
    else:
        pid = operator.index(packet_id)
        if pid or dup:
            raise ValueError("a QoS 0 PUBLISH takes no packet id and no DUP (MQTT-2.3.1-5, MQTT-3.3.1-2)")
    body = memoryview(payload)
    if not body.c_contiguous:
        raise ValueError("payload is not a C-contiguous buffer")
    size = 2 + len(raw_topic) + (2 if qos else 0) + body.nbytes
    if size > MAX_REMAINING_LENGTH:
        raise ValueError(f"PUBLISH of remaining length {size}, more than {MAX_REMAINING_LENGTH}")
    first = 0x30 | (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    out = bytearray((first,))
    out += _remaining_length(size)
    out += len(raw_topic).to_bytes(2, "big")
    out += raw_topic
    if qos:
        out += pid.to_bytes(2, "big")
    out += body
    return bytes(out)


# -- the session's per-PUBLISH step --------------------------------------------

# Bytes a JSON document can start with (whitespace or the first byte of a
# value); anything else is taken as MessagePack. A MessagePack payload that
# starts with one of these is a bare positive integer, not a reading, so
# nothing valid is misjudged.
_JSON_FIRST = frozenset(b'{["-0123456789tfn \t\r\n')


def take_publishes(events: list[Event], start: int, telemetry_topic: str | None, validate_into: Callable[..., int],
                   protocol: str, client_id: str | None, next_ns: int, clock: Callable[[], int],
                   qos2_unreleased: set[int] | None, records: list[Record], rejections: list[Rejection],
                   pubacks: list[int], pubrecs: list[int]) -> tuple[int, int, int]:
    """What an MQTT session does with the PUBLISHes of one read, from
    events[start] up to the first event that is not one (or a QoS 2 one while
    ``qos2_unreleased`` is None: the caller makes that set, then goes on).

    Readings on the device's telemetry topic (or plain "telemetry") are
    validated into ``records`` and ``rejections``; other topics are rejected
    as bad_topic. QoS 1 packet ids go to ``pubacks``, QoS 2 ones to
    ``pubrecs``; a QoS 2 packet id still in ``qos2_unreleased`` is a
    redelivery of readings already held: answered again, stored once (MQTT
    4.3.3, method B).

    Each publish's readings take a receive time from ``clock`` (ns) later
    than ``next_ns`` and than the last publish's readings, so a burst stays
    distinct points in a time-series sink. Returns (the index it stopped at,
    the next ``next_ns``, the first publish's receive time, or 0).
    """
    i, n, first = start, len(events), 0
    while i < n:
        ev = events[i]
        if type(ev) is not Publish or (ev.qos == 2 and qos2_unreleased is None):
            break
        now = clock()
        publish_ns = now if now > next_ns else next_ns
        if not first:
            first = publish_ns
        i += 1
        if ev.qos == 2:
            assert qos2_unreleased is not None      # a QoS 2 publish with no set stopped the loop above
            pubrecs.append(ev.packet_id)
            if ev.packet_id in qos2_unreleased:
                continue
            qos2_unreleased.add(ev.packet_id)
        topic = ev.topic
        if topic == telemetry_topic or topic == "telemetry":
            payload = ev.payload
            fmt = "json" if not payload or payload[0] in _JSON_FIRST else "msgpack"
            next_ns = publish_ns + validate_into(payload, fmt, protocol, client_id, publish_ns, records, rejections) + 1
        else:
            rejections.append(Rejection(
                reason="bad_topic", field="topic", index=None, device_id=client_id, raw=bytes(ev.payload),
                detail=f"topic {topic!r} is not 'telemetry' or {telemetry_topic!r}"))
        if ev.qos == 1:
            pubacks.append(ev.packet_id)
    return i, next_ns, first
