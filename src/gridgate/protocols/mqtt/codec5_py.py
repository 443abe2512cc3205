"""MQTT 5.0 server-side codec: the pure-Python reference implementation.

Sans-IO like the 3.1.1 twin (``codec_py``): ``MQTT5Codec.feed(data)``
returns every complete client-to-server packet as an event of ``events5``;
the ``encode_*`` functions build the server-to-client packets. Its compiled
twin is ``MQTT5Codec`` and ``mqtt5_encode_*`` in ``src/_fastparse_mqtt5.pxi``;
``codec5`` picks the one in use, and the MQTT 5 session (``session5``) is
handed a connection whose CONNECT carries protocol level 5 (this codec
answers any other level with 0x84 Unsupported Protocol Version). Sections and MQTT-x.y.z-n refer to MQTT Version 5.0.

Errors: only ``v5.MQTT5Error`` escapes ``feed``; its ``reason_code`` is the
code of the DISCONNECT to send before closing (section 4.13), and
``return_code`` is set instead (same value) when the error is in the
CONNECT packet: answer CONNACK with it, no DISCONNECT before a CONNACK
(MQTT-3.14.0-1). A first packet other than CONNECT is 0x82 with no
return_code: close without a word (MQTT-3.1.0-1). Errors come in the order
the bytes are read, so a stream gives the same error however it is split;
after one the codec is dead and raises an equal error on every ``feed``.

What the codec enforces, beyond the property block rules of ``v5``:
framing (reserved types and flags 0x81, remaining length in shortest form,
``max_packet_bytes`` -> 0x95 as soon as the fixed header is complete),
CONNECT (name "MQTT" level 5 else 0x84, reserved flag and Will flag
combinations 0x81, Authentication Data without Method 0x82, the Will
Properties, a Will topic that is a topic name), PUBLISH (packet id, topic
name, Topic Alias against ``topic_alias_maximum`` 0x94 and its mapping, no
Subscription Identifier from a client MQTT-3.3.4-6), acks with the
omission rules (remaining length 2: Success without properties; 3: a
reason code without properties), SUBSCRIBE options (reserved bits 0x81,
QoS 3 and Retain Handling 3 0x82, No Local on a shared subscription 0x82),
DISCONNECT (the Session Expiry rule of 3.14.2.2.2), AUTH (only after a
CONNECT with an Authentication Method, the same method, reason 0x18/0x19).
What it leaves to the session: topic filter syntax (SUBACK 0x8F),
Receive Maximum, Retain Available, Maximum QoS, packet ids in use.

The encoders give the shortest form the spec allows, and those with a
Reason String take the client's Maximum Packet Size (``max_packet_size``):
over it, the Reason String and User Properties are left out, as the spec
allows for exactly those two (a PUBLISH over it is for the session to
discard, MQTT-3.1.2-28).
"""
from __future__ import annotations

import operator
from collections.abc import Callable, Iterable

import msgspec

from gridgate.ingest.records import Record, Rejection
from gridgate.protocols.mqtt.events import PingReq
from gridgate.protocols.mqtt.events5 import (
    Auth,
    Connect5,
    Disconnect5,
    Event5,
    PubAck5,
    PubComp5,
    Publish5,
    PubRec5,
    PubRel5,
    Subscribe5,
    Subscription,
    Unsubscribe5,
    Will5,
)
from gridgate.protocols.mqtt.v5 import (
    AUTH,
    CONNACK,
    CONNECT,
    DISCONNECT,
    MALFORMED_PACKET,
    MAX_VBI,
    NO_PROPERTIES,
    PACKET_TOO_LARGE,
    PINGREQ,
    PINGRESP,
    PROTOCOL_ERROR,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    REASON_CODES_BY_PACKET,
    SUBACK,
    SUBSCRIBE,
    TOPIC_ALIAS_INVALID,
    UNSPECIFIED_ERROR,
    UNSUBACK,
    UNSUBSCRIBE,
    UNSUPPORTED_PROTOCOL_VERSION,
    WILL,
    MQTT5Error,
    Properties,
    check_utf8,
    decode_properties,
    decode_vbi,
    encode_properties,
    encode_vbi,
    valid_topic_name,
)

__all__ = [
    "MQTT5Codec", "MAX_PACKET_BYTES", "encode_connack", "encode_publish", "encode_puback", "encode_pubrec",
    "encode_pubrel", "encode_pubcomp", "encode_suback", "encode_unsuback", "encode_pingresp",
    "encode_disconnect", "encode_auth", "take_publishes5",
]

MAX_PACKET_BYTES = MAX_VBI + 5

# Required fixed-header flags (table 2-2): PUBREL, SUBSCRIBE, UNSUBSCRIBE
# 0b0010, every other non-PUBLISH type 0; anything else is malformed (2.1.3).
_REQUIRED_FLAGS = {
    CONNECT: 0, PUBACK: 0, PUBREC: 0, PUBREL: 2, PUBCOMP: 0, SUBSCRIBE: 2, UNSUBSCRIBE: 2, PINGREQ: 0,
    DISCONNECT: 0, AUTH: 0,
}
_SERVER_ONLY = frozenset({CONNACK, SUBACK, UNSUBACK, PINGRESP})
_ACK_EVENTS: dict[int, type[PubAck5 | PubRec5 | PubRel5 | PubComp5]] = {
    PUBACK: PubAck5, PUBREC: PubRec5, PUBREL: PubRel5, PUBCOMP: PubComp5}
_CONNACK_CODES = REASON_CODES_BY_PACKET[CONNACK]


def _first_byte_error(first: int, connected: bool) -> tuple[int, str] | None:
    ptype, flags = first >> 4, first & 0x0F
    if not connected:
        if ptype != CONNECT:
            return PROTOCOL_ERROR, f"first packet has type {ptype}, not CONNECT (MQTT-3.1.0-1)"
        if flags:
            return MALFORMED_PACKET, f"CONNECT with flags {flags:#06b} (section 2.1.3)"
        return None
    if ptype == 0:
        return MALFORMED_PACKET, "reserved packet type 0 (section 2.1.2)"
    if ptype == CONNECT:
        return PROTOCOL_ERROR, "a second CONNECT on one connection (MQTT-3.1.0-2)"
    if ptype in _SERVER_ONLY:
        return PROTOCOL_ERROR, f"packet type {ptype} is sent by servers only"
    if ptype == PUBLISH:
        qos = (flags >> 1) & 3
        if qos == 3:
            return MALFORMED_PACKET, "PUBLISH with QoS 3 (MQTT-3.3.1-4)"
        if flags & 0b1000 and qos == 0:
            return MALFORMED_PACKET, "DUP set on a QoS 0 PUBLISH (MQTT-3.3.1-2)"
        return None
    if flags != _REQUIRED_FLAGS[ptype]:
        return MALFORMED_PACKET, f"packet type {ptype} with flags {flags:#06b} (section 2.1.3)"
    return None


# [connected][first byte], computed once.
_FIRST_BYTE_ERRORS = (
    tuple(_first_byte_error(b, False) for b in range(256)),
    tuple(_first_byte_error(b, True) for b in range(256)),
)


def _u16(buf: bytes, pos: int, end: int) -> int:
    if pos + 2 > end:
        raise MQTT5Error(MALFORMED_PACKET, "packet ends inside a two-byte integer")
    return (buf[pos] << 8) | buf[pos + 1]


def _binary(buf: bytes, pos: int, end: int) -> tuple[bytes, int]:
    n = _u16(buf, pos, end)
    pos += 2
    if pos + n > end:
        raise MQTT5Error(MALFORMED_PACKET, "length prefix runs past the end of the packet")
    return bytes(buf[pos:pos + n]), pos + n


def _string(buf: bytes, pos: int, end: int) -> tuple[str, int]:
    raw, pos = _binary(buf, pos, end)
    return check_utf8(raw), pos


def _packet_id(buf: bytes, pos: int, end: int) -> int:
    pid = _u16(buf, pos, end)
    if pid == 0:
        # MQTT-2.2.1-3: a non-zero Packet Identifier; it parses, so a Protocol Error (4.13)
        raise MQTT5Error(PROTOCOL_ERROR, "packet identifier 0 (MQTT-2.2.1-3)")
    return pid


class MQTT5Codec:
    """Server side of one MQTT 5.0 connection (sans-IO).

    Args:
        max_packet_bytes: the largest packet accepted, fixed header included
            (the Maximum Packet Size the server sends in CONNACK).
        topic_alias_maximum: the Topic Alias Maximum the server sends in
            CONNACK; 0 (the default, as when CONNACK omits it) refuses every
            alias (MQTT-3.2.2-17/18, MQTT-3.3.2-9 -> 0x94).
    """

    __slots__ = ("_max", "_alias_max", "_aliases", "_partial", "_header_len", "_need", "_connected",
                 "_in_connect", "_disconnected", "_error", "_session_expiry", "_auth_method")

    def __init__(self, max_packet_bytes: int = 1_048_576, topic_alias_maximum: int = 0) -> None:
        max_packet_bytes = operator.index(max_packet_bytes)
        if not 2 <= max_packet_bytes <= MAX_PACKET_BYTES:
            raise ValueError(f"max_packet_bytes {max_packet_bytes} outside 2..{MAX_PACKET_BYTES}")
        topic_alias_maximum = operator.index(topic_alias_maximum)
        if not 0 <= topic_alias_maximum <= 65535:
            raise ValueError(f"topic_alias_maximum {topic_alias_maximum} outside 0..65535")
        self._max = max_packet_bytes
        self._alias_max = topic_alias_maximum
        self._aliases: dict[int, str] = {}
        self._partial = bytearray()
        self._header_len = 0
        self._need = 0
        self._connected = False
        self._in_connect = False       # the first byte of a CONNECT has arrived
        self._disconnected = False
        self._error: MQTT5Error | None = None
        self._session_expiry = 0
        self._auth_method: str | None = None

    @property
    def max_packet_bytes(self) -> int:
        return self._max

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def buffered(self) -> int:
        return len(self._partial)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event5]:
        """Append ``data``; return every complete packet now buffered, in order."""
        if self._error is not None:
            e = self._error
            raise MQTT5Error(e.reason_code, e.detail, e.return_code)
        if type(data) is not bytes:
            data = bytes(memoryview(data))   # a mutable buffer could change under the payload slices
        events: list[Event5] = []
        try:
            pos = 0
            if self._partial:
                pos = self._finish_partial(data, events)
                if pos < 0:
                    return events
            self._decode_all(data, pos, events)
        except MQTT5Error as exc:
            if self._in_connect and not self._connected and exc.return_code is None:
                # in the CONNECT itself: the answer is a CONNACK (MQTT-3.14.0-1)
                code = exc.reason_code if exc.reason_code in _CONNACK_CODES else UNSPECIFIED_ERROR
                exc = MQTT5Error(exc.reason_code, exc.detail, code)
            self._error = exc
            self._partial = bytearray()
            self._header_len = self._need = 0
            raise exc from None
        return events

    # -- framing ----------------------------------------------------------------

    def _header(self, buf: bytes, pos: int, end: int) -> tuple[int, int]:
        """(header length, packet size) of the packet at ``pos``, or (0, 0) if the header is incomplete."""
        if self._disconnected:
            raise MQTT5Error(PROTOCOL_ERROR, "bytes after DISCONNECT (MQTT-3.14.4-1)")
        error = _FIRST_BYTE_ERRORS[self._connected][buf[pos]]
        if not self._connected and buf[pos] >> 4 == CONNECT:
            self._in_connect = True
        if error is not None:
            raise MQTT5Error(*error)
        length, i = decode_vbi(buf, pos + 1, end)
        if length < 0:   # cut off (decode_vbi raised on a fifth length byte or a long form)
            return 0, 0
        size = i - pos + length
        if size > self._max:
            raise MQTT5Error(PACKET_TOO_LARGE, f"packet of {size} bytes exceeds max_packet_bytes {self._max}")
        return i - pos, size

    def _finish_partial(self, data: bytes, events: list[Event5]) -> int:
        partial = self._partial
        if not self._header_len:
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

    def _decode_all(self, data: bytes, pos: int, events: list[Event5]) -> None:
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

    # -- packets ------------------------------------------------------------------

    def _decode(self, first: int, buf: bytes, start: int, end: int, view: memoryview) -> Event5:
        ptype = first >> 4
        if ptype == PUBLISH:
            return self._publish(first, buf, start, end, view)
        if ptype in _ACK_EVENTS:
            return self._ack(ptype, buf, start, end)
        if ptype == SUBSCRIBE:
            return self._subscribe(buf, start, end)
        if ptype == UNSUBSCRIBE:
            return self._unsubscribe(buf, start, end)
        if ptype == CONNECT:
            return self._connect(buf, start, end)
        if ptype == PINGREQ:
            if end != start:
                raise MQTT5Error(MALFORMED_PACKET, f"PINGREQ with remaining length {end - start}")
            return PingReq()
        if ptype == DISCONNECT:
            return self._disconnect(buf, start, end)
        return self._auth(buf, start, end)

    def _reason_and_properties(self, ptype: int, buf: bytes, pos: int, end: int) -> tuple[int, Properties]:
        """A reason code and properties that may be omitted at the end of a packet
        (3.4.2.1 and its siblings, 3.14.2.1, 3.15.2.1): nothing left is Success, one
        byte is a reason code alone, more is a reason code and a property block."""
        if pos == end:
            return 0, Properties()
        code = buf[pos]
        if code not in REASON_CODES_BY_PACKET[ptype]:
            raise MQTT5Error(PROTOCOL_ERROR, f"reason code {code:#04x} is not one of packet type {ptype}")
        if pos + 1 == end:
            return code, Properties()
        props, pos = decode_properties(buf, pos + 1, end, ptype)
        if pos != end:
            raise MQTT5Error(MALFORMED_PACKET, f"{end - pos} bytes after the properties of packet type {ptype}")
        return code, props

    def _ack(self, ptype: int, buf: bytes, start: int, end: int) -> PubAck5 | PubRec5 | PubRel5 | PubComp5:
        pid = _packet_id(buf, start, end)
        code, props = self._reason_and_properties(ptype, buf, start + 2, end)
        return _ACK_EVENTS[ptype](pid, code, props)

    def _publish(self, first: int, buf: bytes, start: int, end: int, view: memoryview) -> Publish5:
        qos = (first >> 1) & 3
        topic, pos = _string(buf, start, end)
        pid = 0
        if qos:
            pid = _packet_id(buf, pos, end)
            pos += 2
        props, pos = decode_properties(buf, pos, end, PUBLISH)
        if props.subscription_identifiers:
            raise MQTT5Error(PROTOCOL_ERROR, "Subscription Identifier in a client's PUBLISH (MQTT-3.3.4-6)")
        if topic and not valid_topic_name(topic):
            raise MQTT5Error(PROTOCOL_ERROR, f"wildcard in topic name {topic[:64]!r} (MQTT-3.3.2-2)")
        alias = props.topic_alias
        if alias is not None:
            if alias > self._alias_max:
                raise MQTT5Error(TOPIC_ALIAS_INVALID, f"Topic Alias {alias} above the maximum {self._alias_max} "
                                                      "(MQTT-3.3.2-9/12)")
            if topic:
                self._aliases[alias] = topic     # 3.3.2.3.4: a name with an alias sets the mapping
            else:
                known = self._aliases.get(alias)
                if known is None:
                    raise MQTT5Error(PROTOCOL_ERROR, f"Topic Alias {alias} has no mapping yet (3.3.2.3.4)")
                topic = known
        elif not topic:
            raise MQTT5Error(PROTOCOL_ERROR, "empty topic name without a Topic Alias (3.3.2.1)")
        return Publish5(topic, view[pos:end], qos, pid, bool(first & 1), bool(first & 8), props)

    def _subscribe(self, buf: bytes, start: int, end: int) -> Subscribe5:
        pid = _packet_id(buf, start, end)
        props, pos = decode_properties(buf, start + 2, end, SUBSCRIBE)
        if pos == end:
            raise MQTT5Error(PROTOCOL_ERROR, "SUBSCRIBE without a topic filter (MQTT-3.8.3-2)")
        subs: list[Subscription] = []
        while pos < end:
            topic, pos = _string(buf, pos, end)
            if pos >= end:
                raise MQTT5Error(MALFORMED_PACKET, "SUBSCRIBE ends before the Subscription Options")
            options = buf[pos]
            pos += 1
            if options & 0xC0:
                raise MQTT5Error(MALFORMED_PACKET, f"reserved Subscription Options bits in {options:#04x} "
                                                   "(MQTT-3.8.3-5)")
            qos, retain_handling = options & 3, (options >> 4) & 3
            if qos == 3:
                raise MQTT5Error(PROTOCOL_ERROR, "Maximum QoS 3 in Subscription Options (3.8.3.1)")
            if retain_handling == 3:
                raise MQTT5Error(PROTOCOL_ERROR, "Retain Handling 3 in Subscription Options (3.8.3.1)")
            no_local = bool(options & 4)
            if no_local and topic.startswith("$share/"):
                raise MQTT5Error(PROTOCOL_ERROR, "No Local on a Shared Subscription (MQTT-3.8.3-4)")
            subs.append(Subscription(topic, qos, no_local, bool(options & 8), retain_handling))
        return Subscribe5(pid, tuple(subs), props)

    def _unsubscribe(self, buf: bytes, start: int, end: int) -> Unsubscribe5:
        pid = _packet_id(buf, start, end)
        props, pos = decode_properties(buf, start + 2, end, UNSUBSCRIBE)
        if pos == end:
            raise MQTT5Error(PROTOCOL_ERROR, "UNSUBSCRIBE without a topic filter (MQTT-3.10.3-2)")
        filters: list[str] = []
        while pos < end:
            topic, pos = _string(buf, pos, end)
            filters.append(topic)
        return Unsubscribe5(pid, tuple(filters), props)

    def _disconnect(self, buf: bytes, start: int, end: int) -> Disconnect5:
        code, props = self._reason_and_properties(DISCONNECT, buf, start, end)
        expiry = props.session_expiry_interval
        if expiry and not self._session_expiry:
            raise MQTT5Error(PROTOCOL_ERROR, "non-zero Session Expiry Interval in DISCONNECT after 0 in CONNECT "
                                             "(3.14.2.2.2)")
        self._disconnected = True
        return Disconnect5(code, props)

    def _auth(self, buf: bytes, start: int, end: int) -> Auth:
        code, props = self._reason_and_properties(AUTH, buf, start, end)
        if code == 0:
            # table 3.15.2.1: Success is sent by the server only; a client continues (0x18) or re-authenticates (0x19)
            raise MQTT5Error(PROTOCOL_ERROR, "AUTH with reason code 0x00 from a client (3.15.2.1)")
        if self._auth_method is None:
            raise MQTT5Error(PROTOCOL_ERROR, "AUTH after a CONNECT without Authentication Method (section 4.12)")
        if props.authentication_method != self._auth_method:
            raise MQTT5Error(PROTOCOL_ERROR, "AUTH without the CONNECT's Authentication Method (3.15.2.2.2, "
                                             "section 4.12)")
        return Auth(code, props)

    def _connect(self, buf: bytes, start: int, end: int) -> Connect5:
        # Protocol name and version first (3.1.2.1, 3.1.2.2)
        name, pos = _binary(buf, start, end)
        if pos >= end:
            raise MQTT5Error(MALFORMED_PACKET, "CONNECT ends before the protocol version")
        level = buf[pos]
        pos += 1
        if name != b"MQTT" or level != 5:
            raise MQTT5Error(UNSUPPORTED_PROTOCOL_VERSION, f"protocol {name[:16]!r} level {level}, not MQTT 5")
        if pos >= end:
            raise MQTT5Error(MALFORMED_PACKET, "CONNECT ends before the connect flags")
        flags = buf[pos]
        keepalive = _u16(buf, pos + 1, end)
        pos += 3
        if flags & 0x01:
            raise MQTT5Error(MALFORMED_PACKET, "reserved CONNECT flag set (MQTT-3.1.2-3)")
        will_flag = bool(flags & 0x04)
        will_qos = (flags >> 3) & 3
        will_retain = bool(flags & 0x20)
        if not will_flag and (will_qos or will_retain):
            raise MQTT5Error(MALFORMED_PACKET, "Will QoS/Retain without the Will flag (MQTT-3.1.2-11/13/15)")
        if will_qos == 3:
            raise MQTT5Error(MALFORMED_PACKET, "Will QoS 3 (3.1.2.6)")
        props, pos = decode_properties(buf, pos, end, CONNECT)
        if props.authentication_data is not None and props.authentication_method is None:
            raise MQTT5Error(PROTOCOL_ERROR, "Authentication Data without Authentication Method (3.1.2.11.10)")
        # Payload (3.1.3): client id, Will Properties, Will Topic, Will Payload, user name, password
        client_id, pos = _string(buf, pos, end)
        will = None
        if will_flag:
            will_props, pos = decode_properties(buf, pos, end, WILL)
            will_topic, pos = _string(buf, pos, end)
            if not valid_topic_name(will_topic):
                raise MQTT5Error(PROTOCOL_ERROR, f"Will Topic {will_topic[:64]!r} is not a topic name (3.1.3.3)")
            will_payload, pos = _binary(buf, pos, end)
            will = Will5(will_topic, will_payload, will_qos, will_retain, will_props)
        username = password = None
        if flags & 0x80:
            username, pos = _string(buf, pos, end)
        if flags & 0x40:
            password, pos = _binary(buf, pos, end)
        if pos != end:
            raise MQTT5Error(MALFORMED_PACKET, f"{end - pos} bytes after the CONNECT payload")
        self._connected = True
        self._session_expiry = props.session_expiry_interval or 0
        self._auth_method = props.authentication_method
        return Connect5(bool(flags & 0x02), keepalive, client_id, will, username, password, props)


# -- encoders (server to client) ----------------------------------------------------------


def _pid(packet_id: int) -> bytes:
    packet_id = operator.index(packet_id)
    if not 1 <= packet_id <= 65535:
        raise ValueError(f"packet id {packet_id} outside 1..65535")
    return packet_id.to_bytes(2, "big")


def _code(ptype: int, reason_code: int, what: str) -> int:
    reason_code = operator.index(reason_code)
    if reason_code not in REASON_CODES_BY_PACKET[ptype]:
        raise ValueError(f"reason code {reason_code:#04x} is not one of {what}")
    return reason_code


def _packet(first: int, body: bytes) -> bytes:
    if len(body) > MAX_VBI:
        raise ValueError(f"remaining length {len(body)}, more than {MAX_VBI}")
    return bytes((first,)) + encode_vbi(len(body)) + body


def _fit(build: Callable[[Properties | None], bytes], properties: Properties | None,
         max_packet_size: int | None) -> bytes:
    """``build(properties)``, or, when that exceeds the client's Maximum Packet
    Size, ``build`` without Reason String and User Properties: the spec lets a
    sender drop exactly those two to fit, never the packet (MQTT-3.2.2-19/20,
    MQTT-3.4.2-2/3 and their siblings in 3.5 - 3.15). What still does not fit
    is the caller's to handle."""
    raw = build(properties)
    if max_packet_size is None or len(raw) <= max_packet_size or properties is None:
        return raw
    return build(msgspec.structs.replace(properties, reason_string=None, user_properties=()))


def encode_connack(session_present: bool, reason_code: int = 0, properties: Properties | None = None,
                   max_packet_size: int | None = None) -> bytes:
    """CONNACK (3.2); the Property Length is always present (3.2.2.3).
    ``max_packet_size``: the client's Maximum Packet Size, see ``_fit``."""
    code = _code(CONNACK, reason_code, "CONNACK")
    if session_present and code:
        raise ValueError("Session Present with a non-zero reason code (MQTT-3.2.2-6)")
    head = bytes((1 if session_present else 0, code))
    return _fit(lambda p: _packet(0x20, head + encode_properties(p, CONNACK)), properties, max_packet_size)


def _encode_ack(ptype: int, first: int, packet_id: int, reason_code: int, properties: Properties | None,
                what: str, max_packet_size: int | None) -> bytes:
    pid = _pid(packet_id)
    code = _code(ptype, reason_code, what)

    def build(p: Properties | None) -> bytes:
        props = encode_properties(p, ptype)
        # The omission rules (3.4.2.1, 3.4.2.2.1): no properties -> no Property
        # Length; Success and no properties -> no reason code either.
        if props == b"\x00":
            return _packet(first, pid if code == 0 else pid + bytes((code,)))
        return _packet(first, pid + bytes((code,)) + props)
    return _fit(build, properties, max_packet_size)


def encode_puback(packet_id: int, reason_code: int = 0, properties: Properties | None = None,
                   max_packet_size: int | None = None) -> bytes:
    """PUBACK (3.4), shortest form the spec allows."""
    return _encode_ack(PUBACK, 0x40, packet_id, reason_code, properties, "PUBACK", max_packet_size)


def encode_pubrec(packet_id: int, reason_code: int = 0, properties: Properties | None = None,
                   max_packet_size: int | None = None) -> bytes:
    """PUBREC (3.5)."""
    return _encode_ack(PUBREC, 0x50, packet_id, reason_code, properties, "PUBREC", max_packet_size)


def encode_pubrel(packet_id: int, reason_code: int = 0, properties: Properties | None = None,
                   max_packet_size: int | None = None) -> bytes:
    """PUBREL (3.6), flags 0b0010."""
    return _encode_ack(PUBREL, 0x62, packet_id, reason_code, properties, "PUBREL", max_packet_size)


def encode_pubcomp(packet_id: int, reason_code: int = 0, properties: Properties | None = None,
                    max_packet_size: int | None = None) -> bytes:
    """PUBCOMP (3.7)."""
    return _encode_ack(PUBCOMP, 0x70, packet_id, reason_code, properties, "PUBCOMP", max_packet_size)


def _encode_sub_ack(ptype: int, first: int, packet_id: int, reason_codes: Iterable[int],
                    properties: Properties | None, what: str, max_packet_size: int | None) -> bytes:
    pid = _pid(packet_id)
    codes = bytes(_code(ptype, c, what) for c in reason_codes)
    if not codes:
        raise ValueError(f"{what} needs one reason code per topic filter, and there is at least one")
    return _fit(lambda p: _packet(first, pid + encode_properties(p, ptype) + codes), properties, max_packet_size)


def encode_suback(packet_id: int, reason_codes: Iterable[int], properties: Properties | None = None,
                  max_packet_size: int | None = None) -> bytes:
    """SUBACK (3.9): one reason code per Topic Filter, in order (MQTT-3.8.4-6)."""
    return _encode_sub_ack(SUBACK, 0x90, packet_id, reason_codes, properties, "SUBACK", max_packet_size)


def encode_unsuback(packet_id: int, reason_codes: Iterable[int], properties: Properties | None = None,
                    max_packet_size: int | None = None) -> bytes:
    """UNSUBACK (3.11): one reason code per Topic Filter (MQTT-3.11.3-1)."""
    return _encode_sub_ack(UNSUBACK, 0xB0, packet_id, reason_codes, properties, "UNSUBACK", max_packet_size)


def encode_pingresp() -> bytes:
    """PINGRESP (3.13)."""
    return b"\xd0\x00"


def encode_disconnect(reason_code: int = 0, properties: Properties | None = None,
                      max_packet_size: int | None = None) -> bytes:
    """DISCONNECT (3.14) from the server, shortest form: remaining length 0
    for Normal disconnection without properties, 1 for a reason code alone."""
    code = _code(DISCONNECT, reason_code, "DISCONNECT")
    if code == 0x04:
        raise ValueError("0x04 Disconnect with Will Message is sent by clients only (3.14.2.1)")
    if properties is not None and properties.session_expiry_interval is not None:
        raise ValueError("a server's DISCONNECT carries no Session Expiry Interval (MQTT-3.14.2-2)")

    def build(p: Properties | None) -> bytes:
        props = encode_properties(p, DISCONNECT)
        if props == b"\x00":
            return _packet(0xE0, b"" if code == 0 else bytes((code,)))
        return _packet(0xE0, bytes((code,)) + props)
    return _fit(build, properties, max_packet_size)


def encode_auth(reason_code: int = 0, properties: Properties | None = None,
                max_packet_size: int | None = None) -> bytes:
    """AUTH (3.15) from the server: 0x00 Success or 0x18 Continue; remaining
    length 0 for Success without properties (3.15.2.1)."""
    code = _code(AUTH, reason_code, "AUTH")
    if code == 0x19:
        raise ValueError("0x19 Re-authenticate is sent by clients only (3.15.2.1)")

    def build(p: Properties | None) -> bytes:
        props = encode_properties(p, AUTH)
        if code == 0 and props == b"\x00":
            return b"\xf0\x00"
        return _packet(0xF0, bytes((code,)) + props)
    return _fit(build, properties, max_packet_size)


def encode_publish(topic: str, payload: bytes | bytearray | memoryview, qos: int = 0, packet_id: int = 0,
                   retain: bool = False, dup: bool = False, properties: Properties | None = None) -> bytes:
    """PUBLISH (3.3) from the server (downlink commands). ``topic`` may be
    empty when ``properties.topic_alias`` is set (3.3.2.3.4)."""
    if not isinstance(topic, str):
        raise TypeError(f"topic must be str, not {type(topic).__name__}")
    qos = operator.index(qos)
    if qos not in (0, 1, 2):
        raise ValueError(f"QoS {qos} is not 0, 1 or 2")
    try:
        raw_topic = topic.encode("utf-8")
        check_utf8(raw_topic)
    except (UnicodeEncodeError, MQTT5Error) as exc:
        raise ValueError(f"invalid topic name {topic[:64]!r}: {exc}") from None
    if topic and not valid_topic_name(topic):
        raise ValueError(f"wildcard in topic name {topic[:64]!r} (MQTT-3.3.2-2)")
    if not topic and (properties is None or properties.topic_alias is None):
        raise ValueError("an empty topic name needs a Topic Alias (3.3.2.1)")
    if len(raw_topic) > 65535:
        raise ValueError(f"topic name of {len(raw_topic)} bytes, more than 65535")
    if qos:
        pid = _pid(packet_id)
    else:
        if operator.index(packet_id) or dup:
            raise ValueError("a QoS 0 PUBLISH takes no packet id and no DUP (MQTT-2.2.1-2, MQTT-3.3.1-2)")
        pid = b""
    body = memoryview(payload)
    if not body.c_contiguous:
        raise ValueError("payload is not a C-contiguous buffer")
    head = len(raw_topic).to_bytes(2, "big") + raw_topic + pid + encode_properties(properties, PUBLISH)
    first = 0x30 | (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    size = len(head) + body.nbytes
    if size > MAX_VBI:
        raise ValueError(f"PUBLISH of remaining length {size}, more than {MAX_VBI}")
    out = bytearray((first,))
    out += encode_vbi(size)
    out += head
    out += body
    return bytes(out)


# -- the 5.0 session's per-PUBLISH step for plain readings ----------------------

# Bytes a JSON document can start with; anything else is MessagePack (3.1.1's
# rule, codec_py.take_publishes: a plain PUBLISH has no Content Type to say).
_JSON_FIRST = frozenset(b'{["-0123456789tfn \t\r\n')


def take_publishes5(events: list[Event5], start: int, telemetry_topic: str | None,
                    validate_into: Callable[..., int], protocol: str, client_id: str | None, next_ns: int,
                    clock: Callable[[], int], max_qos1: int, records: list[Record], rejections: list[Rejection],
                    acks: bytearray, spans: list[tuple[int, int, int, int, int]] | None,
                    ) -> tuple[int, int, int, tuple[int, int, int] | None]:
    """What an MQTT 5.0 session does with a run of plain readings of one
    read, from events[start]: consecutive ``Publish5`` events with no
    properties (``NO_PROPERTIES`` itself), not retained, QoS 0 or 1, on the
    device's telemetry topic or plain "telemetry". It stops before any
    other event (the session's own loop handles it) and before a QoS 1
    publish once ``max_qos1`` QoS 1 publishes were taken (what Receive
    Maximum still allows: the caller refuses the next one).

    Each publish's payload (JSON or MessagePack by its first byte) is
    validated into ``records`` and ``rejections`` with a receive time from
    ``clock`` (ns) later than ``next_ns`` and than the last publish's
    readings. A QoS 1 publish that gave no rejection is acknowledged: its
    PUBACK 0x00 (4 bytes, no properties: 3.4.2.1 lets both go) is appended
    to ``acks``, the bytes of the read's acks so far, and, when ``spans`` is
    a list and it stored records, (its offset in ``acks``, 1, its packet id,
    its records' start and end in ``records``) to ``spans``, so a refusal by
    the external sink can turn that ack into 0x83. A QoS 1
    publish that gave rejections is the last one taken and is NOT
    acknowledged: the caller picks its reason code (``puback_reason``).
    A QoS 0 one has no answer: its rejections do not stop the run.

    Returns (the index it stopped at, the next ``next_ns``, the first
    publish's receive time or 0, ``rejected``): ``rejected`` is None, or
    for that last unacknowledged QoS 1 publish (its packet id,
    len(records) and len(rejections) before it).
    """
    if start < 0:
        raise IndexError("start must not be negative")
    if not isinstance(acks, bytearray):
        raise TypeError("acks must be a bytearray")
    i, n, first, qos1 = start, len(events), 0, 0
    while i < n:
        ev = events[i]
        if (type(ev) is not Publish5 or ev.properties is not NO_PROPERTIES or ev.retain or ev.qos == 2
                or (ev.topic != telemetry_topic and ev.topic != "telemetry")):
            break
        if ev.qos:
            if qos1 >= max_qos1:
                break
            qos1 += 1
        now = clock()
        publish_ns = now if now > next_ns else next_ns
        if not first:
            first = publish_ns
        i += 1
        payload = ev.payload
        n_before, r_before = len(rejections), len(records)
        next_ns = publish_ns + validate_into(payload, "json" if not payload or payload[0] in _JSON_FIRST else "msgpack",
                                             protocol, client_id, publish_ns, records, rejections) + 1
        if not ev.qos:
            continue
        if len(rejections) != n_before:
            return i, next_ns, first, (ev.packet_id, r_before, n_before)
        if spans is not None and len(records) != r_before:
            spans.append((len(acks), 1, ev.packet_id, r_before, len(records)))
        acks += bytes((PUBACK << 4, 2, ev.packet_id >> 8, ev.packet_id & 0xFF))
    return i, next_ns, first, None
