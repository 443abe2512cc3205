"""MQTT 5.0 building blocks: variable byte integers, reason codes, the
property table and the codec of a property block (pure Python, sans-IO).

Sections and statement numbers (MQTT-x.y.z-n) refer to MQTT Version 5.0
(OASIS Standard, 7 March 2019). Used by ``codec5_py`` and, for its
constants and errors, by the compiled twin (``src/_fastparse_mqtt5.pxi``) and
the MQTT 5 session (``session5``).

Errors
------
A peer's bytes that break the spec raise ``MQTT5Error``, a subclass of
``gridgate.errors.MQTTProtocolError`` (so code that closes a connection on
the 3.1.1 error closes on this one too) that adds ``reason_code``: the
reason code of the DISCONNECT the server sends before closing (section
4.13), or of the CONNACK when the error is in the CONNECT packet itself
(``return_code`` is then set too: the server MUST NOT send DISCONNECT
before CONNACK, MQTT-3.14.0-1). Its ``reason`` is the reason code's name in
snake case (``malformed_packet``, ``protocol_error``, ...).

The spec's own split between the two common codes (section 4.13 and
2.2.2.2) is followed: what cannot be parsed, an identifier not valid for
the packet and ill-formed UTF-8 are 0x81 Malformed Packet; a property
included twice where that is not allowed and a value the spec forbids
(Receive Maximum 0, Maximum Packet Size 0, a 0/1 byte that is 2, ...) are
0x82 Protocol Error. Encoders raise ``ValueError``/``TypeError``: a wrong
argument is a programming error, not a peer's.

UTF-8 strictness: as in gridgate's 3.1.1 strictness (DESIGN section 4), the
MAY-close rule of section 1.5.4 is a MUST here: a string with a control
character (U+0001..U+001F, U+007F..U+009F) or a non-character (U+FDD0..
U+FDEF and U+xFFFE/U+xFFFF of every plane) is a Malformed Packet, as is
U+0000 and ill-formed UTF-8 (MQTT-1.5.4-1/2).
"""
from __future__ import annotations

import operator
import re
from typing import Final

import msgspec

from gridgate.errors import MQTTProtocolError

__all__ = [
    "MQTT5Error", "Properties", "PropertySpec", "PROPERTIES", "PROPERTIES_BY_NAME", "REASON_CODE_NAMES",
    "REASON_CODES_BY_PACKET", "WILL", "MAX_VBI", "encode_vbi", "decode_vbi", "decode_properties",
    "encode_properties", "check_utf8", "valid_topic_name", "valid_topic_filter", "reason_name",
    "BYTE", "TWO_BYTE", "FOUR_BYTE", "VBI", "UTF8", "BINARY", "UTF8_PAIR",
]

# Control packet types (section 2.1.2); AUTH (15) is new in 5.0.
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = 8, 9, 10, 11, 12, 13, 14, 15
# The Will Properties of a CONNECT payload (3.1.3.2) have their own set of
# allowed properties, so the table treats them as a pseudo packet type
# outside 0..15.
WILL: Final = 16

PACKET_NAMES: Final = {
    CONNECT: "CONNECT", CONNACK: "CONNACK", PUBLISH: "PUBLISH", PUBACK: "PUBACK", PUBREC: "PUBREC",
    PUBREL: "PUBREL", PUBCOMP: "PUBCOMP", SUBSCRIBE: "SUBSCRIBE", SUBACK: "SUBACK", UNSUBSCRIBE: "UNSUBSCRIBE",
    UNSUBACK: "UNSUBACK", PINGREQ: "PINGREQ", PINGRESP: "PINGRESP", DISCONNECT: "DISCONNECT", AUTH: "AUTH",
    WILL: "Will Properties",
}

# -- reason codes (section 2.4) ---------------------------------------------------

SUCCESS = 0x00                      # also Normal disconnection, Granted QoS 0
GRANTED_QOS_1 = 0x01
GRANTED_QOS_2 = 0x02
DISCONNECT_WITH_WILL_MESSAGE = 0x04
NO_MATCHING_SUBSCRIBERS = 0x10
NO_SUBSCRIPTION_EXISTED = 0x11
CONTINUE_AUTHENTICATION = 0x18
RE_AUTHENTICATE = 0x19
UNSPECIFIED_ERROR = 0x80
MALFORMED_PACKET = 0x81
PROTOCOL_ERROR = 0x82
IMPLEMENTATION_SPECIFIC_ERROR = 0x83
UNSUPPORTED_PROTOCOL_VERSION = 0x84
CLIENT_IDENTIFIER_NOT_VALID = 0x85
BAD_USER_NAME_OR_PASSWORD = 0x86
NOT_AUTHORIZED = 0x87
SERVER_UNAVAILABLE = 0x88
SERVER_BUSY = 0x89
BANNED = 0x8A
SERVER_SHUTTING_DOWN = 0x8B
BAD_AUTHENTICATION_METHOD = 0x8C
KEEP_ALIVE_TIMEOUT = 0x8D
SESSION_TAKEN_OVER = 0x8E
TOPIC_FILTER_INVALID = 0x8F
TOPIC_NAME_INVALID = 0x90
PACKET_IDENTIFIER_IN_USE = 0x91
PACKET_IDENTIFIER_NOT_FOUND = 0x92
RECEIVE_MAXIMUM_EXCEEDED = 0x93
TOPIC_ALIAS_INVALID = 0x94
PACKET_TOO_LARGE = 0x95
MESSAGE_RATE_TOO_HIGH = 0x96
QUOTA_EXCEEDED = 0x97
ADMINISTRATIVE_ACTION = 0x98
PAYLOAD_FORMAT_INVALID = 0x99
RETAIN_NOT_SUPPORTED = 0x9A
QOS_NOT_SUPPORTED = 0x9B
USE_ANOTHER_SERVER = 0x9C
SERVER_MOVED = 0x9D
SHARED_SUBSCRIPTIONS_NOT_SUPPORTED = 0x9E
CONNECTION_RATE_EXCEEDED = 0x9F
MAXIMUM_CONNECT_TIME = 0xA0
SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED = 0xA1
WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED = 0xA2

# The spec's name of each code (table 2-6). 0x00 has three names; the one
# used in errors and docs is "Success".
REASON_CODE_NAMES: Final = {
    0x00: "Success", 0x01: "Granted QoS 1", 0x02: "Granted QoS 2", 0x04: "Disconnect with Will Message",
    0x10: "No matching subscribers", 0x11: "No subscription existed", 0x18: "Continue authentication",
    0x19: "Re-authenticate", 0x80: "Unspecified error", 0x81: "Malformed Packet", 0x82: "Protocol Error",
    0x83: "Implementation specific error", 0x84: "Unsupported Protocol Version",
    0x85: "Client Identifier not valid", 0x86: "Bad User Name or Password", 0x87: "Not authorized",
    0x88: "Server unavailable", 0x89: "Server busy", 0x8A: "Banned", 0x8B: "Server shutting down",
    0x8C: "Bad authentication method", 0x8D: "Keep Alive timeout", 0x8E: "Session taken over",
    0x8F: "Topic Filter invalid", 0x90: "Topic Name invalid", 0x91: "Packet Identifier in use",
    0x92: "Packet Identifier not found", 0x93: "Receive Maximum exceeded", 0x94: "Topic Alias invalid",
    0x95: "Packet too large", 0x96: "Message rate too high", 0x97: "Quota exceeded",
    0x98: "Administrative action", 0x99: "Payload format invalid", 0x9A: "Retain not supported",
    0x9B: "QoS not supported", 0x9C: "Use another server", 0x9D: "Server moved",
    0x9E: "Shared Subscriptions not supported", 0x9F: "Connection rate exceeded", 0xA0: "Maximum connect time",
    0xA1: "Subscription Identifiers not supported", 0xA2: "Wildcard Subscriptions not supported",
}

# Which codes each packet may carry (sections 3.2.2.2, 3.4.2.1, 3.5.2.1,
# 3.6.2.1, 3.7.2.1, 3.9.3, 3.11.3, 3.14.2.1, 3.15.2.1).
_PUB_CODES = frozenset({0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99})
REASON_CODES_BY_PACKET: Final[dict[int, frozenset[int]]] = {
    CONNACK: frozenset({0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90,
                        0x95, 0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F}),
    PUBACK: _PUB_CODES,
    PUBREC: _PUB_CODES,
    PUBREL: frozenset({0x00, 0x92}),
    PUBCOMP: frozenset({0x00, 0x92}),
    SUBACK: frozenset({0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2}),
    UNSUBACK: frozenset({0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91}),
    DISCONNECT: frozenset({0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93,
                           0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1,
                           0xA2}),
    AUTH: frozenset({0x00, 0x18, 0x19}),
}


def reason_name(code: int) -> str:
    """``0x81`` -> ``"malformed_packet"``: the spec's name in snake case."""
    name = REASON_CODE_NAMES.get(code)
    if name is None:
        return f"reason_{code:#04x}"
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


class MQTT5Error(MQTTProtocolError):
    """A peer broke MQTT 5.0; send DISCONNECT (or CONNACK) ``reason_code`` and close.

    ``return_code`` is ``reason_code`` when the error lies in the CONNECT
    packet (answer with CONNACK), None after it (answer with DISCONNECT) or
    when the first packet is not a CONNECT at all (close, MQTT-3.1.0-1).
    """

    def __init__(self, reason_code: int, detail: str = "", return_code: int | None = None) -> None:
        super().__init__(reason_name(reason_code), detail, return_code)
        self.reason_code = reason_code

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MQTT5Error):
            return NotImplemented
        return (self.reason_code, self.return_code) == (other.reason_code, other.return_code)

    def __hash__(self) -> int:
        return hash((self.reason_code, self.return_code))

    def __reduce__(self) -> tuple[type[MQTT5Error], tuple[int, str, int | None]]:  # type: ignore[override]
        return (type(self), (self.reason_code, self.detail, self.return_code))


# -- variable byte integers (section 1.5.5) ------------------------------------------

MAX_VBI: Final = 268_435_455


def encode_vbi(n: int) -> bytes:
    """7 bits a byte, least significant group first, bit 7 = more follows."""
    n = operator.index(n)
    if not 0 <= n <= MAX_VBI:
        raise ValueError(f"variable byte integer {n} outside 0..{MAX_VBI}")
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_vbi(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """(value, next position) of the integer at ``pos``; ``(-1, pos)`` if it is cut off at ``end``.

    More than 4 bytes, or more bytes than the value needs (MQTT-1.5.5-1:
    "the minimum number of bytes"), is a Malformed Packet.
    """
    value = shift = 0
    i = pos
    while True:
        if i >= end:
            return -1, pos
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            # A last byte of 0 after the first adds nothing: a longer form than needed.
            if byte == 0 and i - pos > 1:
                raise MQTT5Error(MALFORMED_PACKET, "variable byte integer not in its shortest form (MQTT-1.5.5-1)")
            return value, i
        if i - pos == 4:
            raise MQTT5Error(MALFORMED_PACKET, "variable byte integer longer than 4 bytes (section 1.5.5)")
        shift += 7


# -- strings ----------------------------------------------------------------------------

# Control characters and non-characters (section 1.5.4), and U+0000.
_NONCHARS = "".join(f"\\U{(plane << 16) | 0xFFFE:08x}\\U{(plane << 16) | 0xFFFF:08x}" for plane in range(17))
_FORBIDDEN = re.compile(f"[\\x00-\\x1f\\x7f-\\x9f\\ufdd0-\\ufdef{_NONCHARS}]")


def check_utf8(raw: bytes) -> str:
    """An MQTT UTF-8 Encoded String (section 1.5.4), strictly: see the module docstring."""
    try:
        text = raw.decode("utf-8")  # strict: refuses surrogates and overlong forms (MQTT-1.5.4-1)
    except UnicodeDecodeError:
        raise MQTT5Error(MALFORMED_PACKET, "string is not well-formed UTF-8 (MQTT-1.5.4-1)") from None
    if not text.isascii() or not text.isprintable():
        # isprintable() is a cheap pre-filter for the common all-printable-ASCII case
        bad = _FORBIDDEN.search(text)
        if bad is not None:
            rule = "MQTT-1.5.4-2" if bad.group() == "\x00" else "section 1.5.4, refused as a MUST"
            raise MQTT5Error(MALFORMED_PACKET, f"string contains U+{ord(bad.group()):04X} ({rule})")
    return text


def valid_topic_name(topic: str) -> bool:
    """At least one character, no wildcard (MQTT-4.7.3-1, MQTT-3.3.2-2)."""
    return bool(topic) and "+" not in topic and "#" not in topic


def valid_topic_filter(topic: str) -> bool:
    """Section 4.7.1 ('#' only as the whole last level, '+' only as a whole
    level) and, for ``$share/``, section 4.8.2 (a ShareName of at least one
    character without '/', '+', '#', then '/' and a filter)."""
    if not topic:
        return False
    if topic.startswith("$share/"):
        share, sep, rest = topic[7:].partition("/")
        if not share or not sep or not rest or "+" in share or "#" in share:
            return False
        topic = rest
    levels = topic.split("/")
    last = len(levels) - 1
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != last):
            return False
        if "+" in level and level != "+":
            return False
    return True


# -- properties (section 2.2.2) ---------------------------------------------------------

# Data types (section 1.5)
BYTE, TWO_BYTE, FOUR_BYTE, VBI, UTF8, BINARY, UTF8_PAIR = range(7)


class PropertySpec(msgspec.Struct, frozen=True, gc=False):
    identifier: int
    name: str               # the spec's name
    attr: str               # the Properties field
    type: int               # BYTE .. UTF8_PAIR
    packets: frozenset[int]
    repeat_in: frozenset[int]   # the packets where it may appear more than once


def _spec(identifier: int, name: str, attr: str, type_: int, packets: set[int],
          repeat_in: set[int] | None = None) -> PropertySpec:
    return PropertySpec(identifier, name, attr, type_, frozenset(packets), frozenset(repeat_in or ()))


_ALL_USER = {CONNECT, CONNACK, PUBLISH, WILL, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBSCRIBE, SUBACK, UNSUBSCRIBE,
             UNSUBACK, DISCONNECT, AUTH}

# Table 2-4. User Property may repeat everywhere (3.1.2.11.8 and its
# siblings); Subscription Identifier only in PUBLISH (one per matching
# subscription, 3.3.2.3.8), in SUBSCRIBE it is a Protocol Error to include it
# twice (3.8.2.1.2). Every other property: Protocol Error twice.
PROPERTIES: Final[tuple[PropertySpec, ...]] = (
    _spec(0x01, "Payload Format Indicator", "payload_format_indicator", BYTE, {PUBLISH, WILL}),
    _spec(0x02, "Message Expiry Interval", "message_expiry_interval", FOUR_BYTE, {PUBLISH, WILL}),
    _spec(0x03, "Content Type", "content_type", UTF8, {PUBLISH, WILL}),
    _spec(0x08, "Response Topic", "response_topic", UTF8, {PUBLISH, WILL}),
    _spec(0x09, "Correlation Data", "correlation_data", BINARY, {PUBLISH, WILL}),
    _spec(0x0B, "Subscription Identifier", "subscription_identifiers", VBI, {PUBLISH, SUBSCRIBE}, {PUBLISH}),
    _spec(0x11, "Session Expiry Interval", "session_expiry_interval", FOUR_BYTE, {CONNECT, CONNACK, DISCONNECT}),
    _spec(0x12, "Assigned Client Identifier", "assigned_client_identifier", UTF8, {CONNACK}),
    _spec(0x13, "Server Keep Alive", "server_keep_alive", TWO_BYTE, {CONNACK}),
    _spec(0x15, "Authentication Method", "authentication_method", UTF8, {CONNECT, CONNACK, AUTH}),
    _spec(0x16, "Authentication Data", "authentication_data", BINARY, {CONNECT, CONNACK, AUTH}),
    _spec(0x17, "Request Problem Information", "request_problem_information", BYTE, {CONNECT}),
    _spec(0x18, "Will Delay Interval", "will_delay_interval", FOUR_BYTE, {WILL}),
    _spec(0x19, "Request Response Information", "request_response_information", BYTE, {CONNECT}),
    _spec(0x1A, "Response Information", "response_information", UTF8, {CONNACK}),
    _spec(0x1C, "Server Reference", "server_reference", UTF8, {CONNACK, DISCONNECT}),
    _spec(0x1F, "Reason String", "reason_string", UTF8,
          {CONNACK, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK, UNSUBACK, DISCONNECT, AUTH}),
    _spec(0x21, "Receive Maximum", "receive_maximum", TWO_BYTE, {CONNECT, CONNACK}),
    _spec(0x22, "Topic Alias Maximum", "topic_alias_maximum", TWO_BYTE, {CONNECT, CONNACK}),
    _spec(0x23, "Topic Alias", "topic_alias", TWO_BYTE, {PUBLISH}),
    _spec(0x24, "Maximum QoS", "maximum_qos", BYTE, {CONNACK}),
    _spec(0x25, "Retain Available", "retain_available", BYTE, {CONNACK}),
    _spec(0x26, "User Property", "user_properties", UTF8_PAIR, _ALL_USER, _ALL_USER),
    _spec(0x27, "Maximum Packet Size", "maximum_packet_size", FOUR_BYTE, {CONNECT, CONNACK}),
    _spec(0x28, "Wildcard Subscription Available", "wildcard_subscription_available", BYTE, {CONNACK}),
    _spec(0x29, "Subscription Identifier Available", "subscription_identifier_available", BYTE, {CONNACK}),
    _spec(0x2A, "Shared Subscription Available", "shared_subscription_available", BYTE, {CONNACK}),
)
_BY_ID: Final = {p.identifier: p for p in PROPERTIES}
PROPERTIES_BY_NAME: Final = {p.attr: p for p in PROPERTIES}


class Properties(msgspec.Struct, frozen=True, kw_only=True, gc=False, omit_defaults=True, repr_omit_defaults=True):
    """The properties of one packet; None (or empty) = absent.

    The two properties that may repeat are tuples in wire order:
    ``user_properties`` ((name, value) pairs, order kept, names may repeat:
    3.3.2.3.7) and ``subscription_identifiers``.
    """
    payload_format_indicator: int | None = None
    message_expiry_interval: int | None = None
    content_type: str | None = None
    response_topic: str | None = None
    correlation_data: bytes | None = None
    subscription_identifiers: tuple[int, ...] = ()
    session_expiry_interval: int | None = None
    assigned_client_identifier: str | None = None
    server_keep_alive: int | None = None
    authentication_method: str | None = None
    authentication_data: bytes | None = None
    request_problem_information: int | None = None
    will_delay_interval: int | None = None
    request_response_information: int | None = None
    response_information: str | None = None
    server_reference: str | None = None
    reason_string: str | None = None
    receive_maximum: int | None = None
    topic_alias_maximum: int | None = None
    topic_alias: int | None = None
    maximum_qos: int | None = None
    retain_available: int | None = None
    user_properties: tuple[tuple[str, str], ...] = ()
    maximum_packet_size: int | None = None
    wildcard_subscription_available: int | None = None
    subscription_identifier_available: int | None = None
    shared_subscription_available: int | None = None


NO_PROPERTIES: Final = Properties()
_ZERO_ONE = frozenset({0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A})


def _value_error(spec: PropertySpec, value: object) -> tuple[int, str] | None:
    """(reason code, detail) if ``value`` is out of the property's range, else None."""
    ident = spec.identifier
    if ident in _ZERO_ONE and value not in (0, 1):
        # 3.1.2.11.6/7 say so for the two Request flags, 3.2.2.3.4 for Maximum
        # QoS; the others are booleans of the same shape.
        return PROTOCOL_ERROR, f"{spec.name} {value!r}, not 0 or 1"
    if value == 0 and ident in (0x21, 0x27, 0x0B):
        # Receive Maximum 3.1.2.11.3, Maximum Packet Size 3.1.2.11.4,
        # Subscription Identifier 3.8.2.1.2: "It is a Protocol Error ... value of 0"
        return PROTOCOL_ERROR, f"{spec.name} 0"
    if ident == 0x23 and value == 0:
        return TOPIC_ALIAS_INVALID, "Topic Alias 0 (MQTT-3.3.2-8)"
    if ident == 0x08 and not (isinstance(value, str) and valid_topic_name(value)):
        return PROTOCOL_ERROR, f"Response Topic {value!r} is not a topic name (MQTT-3.3.2-14)"
    return None


def decode_properties(buf: bytes, pos: int, end: int, packet: int) -> tuple[Properties, int]:
    """The property block at ``pos`` (Property Length, then the properties):
    (properties, position after it). ``packet`` is a packet type or WILL."""
    length, start = decode_vbi(buf, pos, end)
    if length < 0:
        raise MQTT5Error(MALFORMED_PACKET, "packet ends inside the Property Length")
    stop = start + length
    if stop > end:
        raise MQTT5Error(MALFORMED_PACKET, f"Property Length {length} runs past the end of the packet")
    if length == 0:
        return NO_PROPERTIES, stop
    found: dict[str, object] = {}
    pairs: list[tuple[str, str]] = []
    sub_ids: list[int] = []
    pos = start
    while pos < stop:
        ident, pos = decode_vbi(buf, pos, stop)   # the identifier is a VBI (2.2.2.2)
        if ident < 0:
            raise MQTT5Error(MALFORMED_PACKET, "property block ends inside an identifier")
        spec = _BY_ID.get(ident)
        if spec is None:
            raise MQTT5Error(MALFORMED_PACKET, f"unknown property identifier {ident:#04x} (section 2.2.2.2)")
        if packet not in spec.packets:
            # 2.2.2.2: "an Identifier which is not valid for its packet type ... is a Malformed Packet"
            raise MQTT5Error(MALFORMED_PACKET, f"{spec.name} is not allowed in {PACKET_NAMES[packet]} "
                                               "(section 2.2.2.2)")
        value: object
        t = spec.type
        if t == BYTE:
            if pos >= stop:
                raise MQTT5Error(MALFORMED_PACKET, f"{spec.name} cut off")
            value = buf[pos]
            pos += 1
        elif t == TWO_BYTE:
            if pos + 2 > stop:
                raise MQTT5Error(MALFORMED_PACKET, f"{spec.name} cut off")
            value = (buf[pos] << 8) | buf[pos + 1]
            pos += 2
        elif t == FOUR_BYTE:
            if pos + 4 > stop:
                raise MQTT5Error(MALFORMED_PACKET, f"{spec.name} cut off")
            value = int.from_bytes(buf[pos:pos + 4], "big")
            pos += 4
        elif t == VBI:
            value, pos = decode_vbi(buf, pos, stop)
            if value < 0:
                raise MQTT5Error(MALFORMED_PACKET, f"{spec.name} cut off")
        elif t == UTF8_PAIR:
            key, pos = _binary(buf, pos, stop)
            val, pos = _binary(buf, pos, stop)
            value = (check_utf8(key), check_utf8(val))
        else:   # UTF8, BINARY
            raw, pos = _binary(buf, pos, stop)
            value = check_utf8(raw) if t == UTF8 else raw
        bad = _value_error(spec, value)
        if bad is not None:
            raise MQTT5Error(*bad)
        if ident == 0x26:
            pairs.append(value)  # type: ignore[arg-type]
            continue
        if ident == 0x0B:
            if sub_ids and packet not in spec.repeat_in:
                raise MQTT5Error(PROTOCOL_ERROR, f"{spec.name} twice in {PACKET_NAMES[packet]} (3.8.2.1.2)")
            sub_ids.append(value)  # type: ignore[arg-type]
            continue
        if spec.attr in found:
            raise MQTT5Error(PROTOCOL_ERROR, f"{spec.name} twice in {PACKET_NAMES[packet]} (section 2.2.2.2)")
        found[spec.attr] = value
    if pairs:
        found["user_properties"] = tuple(pairs)
    if sub_ids:
        found["subscription_identifiers"] = tuple(sub_ids)
    return Properties(**found), stop  # type: ignore[arg-type]


def _binary(buf: bytes, pos: int, end: int) -> tuple[bytes, int]:
    """Two-byte length then that many bytes (sections 1.5.4, 1.5.6)."""
    if pos + 2 > end:
        raise MQTT5Error(MALFORMED_PACKET, "packet ends inside a length prefix")
    n = (buf[pos] << 8) | buf[pos + 1]
    pos += 2
    if pos + n > end:
        raise MQTT5Error(MALFORMED_PACKET, "length prefix runs past the end of its field")
    return bytes(buf[pos:pos + n]), pos + n


def _encode_string(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be str, not {type(value).__name__}")
    try:
        raw = value.encode("utf-8")   # refuses lone surrogates
        check_utf8(raw)
    except (UnicodeEncodeError, MQTT5Error) as exc:
        raise ValueError(f"{what} {value[:64]!r} is not an MQTT UTF-8 string: {exc}") from None
    return _encode_binary(raw, what)


def _encode_binary(value: object, what: str) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what} must be bytes, not {type(value).__name__}")
    raw = bytes(value)
    if len(raw) > 65535:
        raise ValueError(f"{what} of {len(raw)} bytes, more than 65535")
    return len(raw).to_bytes(2, "big") + raw


def _encode_one(spec: PropertySpec, value: object) -> bytes:
    head = bytes((spec.identifier,))   # every identifier is < 128: a one-byte VBI
    t = spec.type
    if t == UTF8_PAIR:
        if not (isinstance(value, tuple) and len(value) == 2):
            raise TypeError(f"a User Property is a (name, value) pair, not {value!r}")
        return head + _encode_string(value[0], "User Property name") + _encode_string(value[1], "User Property value")
    if t == UTF8:
        return head + _encode_string(value, spec.name)
    if t == BINARY:
        return head + _encode_binary(value, spec.name)
    if type(value) is not int:
        raise TypeError(f"{spec.name} must be int, not {type(value).__name__}")
    if t == VBI:
        return head + encode_vbi(value)
    size = {BYTE: 1, TWO_BYTE: 2, FOUR_BYTE: 4}[t]
    if not 0 <= value < 1 << (8 * size):
        raise ValueError(f"{spec.name} {value} does not fit in {size} byte(s)")
    return head + value.to_bytes(size, "big")


def encode_properties(props: Properties | None, packet: int) -> bytes:
    """Property Length and the properties of ``props`` for ``packet`` (a packet
    type or WILL), in table order (the spec sets no order). Raises
    ValueError for a property the packet does not allow or a value the spec
    forbids: the encoder never produces what the decoder refuses."""
    if props is None or props == NO_PROPERTIES:
        return b"\x00"
    out = bytearray()
    for spec in PROPERTIES:
        value = getattr(props, spec.attr)
        if value is None or value == ():
            continue
        if packet not in spec.packets:
            raise ValueError(f"{spec.name} is not allowed in {PACKET_NAMES[packet]}")
        values = value if spec.attr in ("user_properties", "subscription_identifiers") else (value,)
        if len(values) > 1 and packet not in spec.repeat_in:
            raise ValueError(f"{spec.name} more than once in {PACKET_NAMES[packet]}")
        for v in values:
            bad = _value_error(spec, v)
            if bad is not None:
                raise ValueError(bad[1])
            out += _encode_one(spec, v)
    return encode_vbi(len(out)) + bytes(out)
