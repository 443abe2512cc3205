"""Events produced by the MQTT server codec (both implementations).

msgspec Structs: cheap to build from compiled code, compared field by field
(the differential tests rely on ``==``), and ``gc=False`` because they never
form reference cycles.
"""
from __future__ import annotations

import msgspec

__all__ = [
    "Will", "Connect", "Publish", "PubAck", "PubRec", "PubRel", "PubComp",
    "Subscribe", "Unsubscribe", "PingReq", "Disconnect", "Event",
    "CONNECT", "CONNACK", "PUBLISH", "PUBACK", "PUBREC", "PUBREL", "PUBCOMP",
    "SUBSCRIBE", "SUBACK", "UNSUBSCRIBE", "UNSUBACK", "PINGREQ", "PINGRESP", "DISCONNECT",
]

# Control packet types, MQTT 3.1.1 section 2.2.1.
CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
PUBREC = 5
PUBREL = 6
PUBCOMP = 7
SUBSCRIBE = 8
SUBACK = 9
UNSUBSCRIBE = 10
UNSUBACK = 11
PINGREQ = 12
PINGRESP = 13
DISCONNECT = 14


class Will(msgspec.Struct, frozen=True, gc=False):
    topic: str
    payload: bytes
    qos: int
    retain: bool


class Connect(msgspec.Struct, frozen=True, gc=False):
    protocol_name: str       # "MQTT" (3.1.1) or "MQIsdp" (3.1)
    protocol_level: int      # 4 or 3
    clean_session: bool
    keepalive: int           # seconds, 0 = disabled
    client_id: str
    will: Will | None
    username: str | None
    password: bytes | None


class Publish(msgspec.Struct, gc=False):
    topic: str
    # A zero-copy slice (memoryview) of the bytes object the codec was fed,
    # or bytes when the packet straddled two reads. Compare with ==.
    payload: bytes | memoryview
    qos: int
    packet_id: int           # 0 for QoS 0
    retain: bool
    dup: bool


class PubAck(msgspec.Struct, frozen=True, gc=False):
    packet_id: int


class PubRec(msgspec.Struct, frozen=True, gc=False):
    packet_id: int


class PubRel(msgspec.Struct, frozen=True, gc=False):
    packet_id: int


class PubComp(msgspec.Struct, frozen=True, gc=False):
    packet_id: int


class Subscribe(msgspec.Struct, frozen=True, gc=False):
    packet_id: int
    topics: list[tuple[str, int]]   # (topic filter, requested QoS)


class Unsubscribe(msgspec.Struct, frozen=True, gc=False):
    packet_id: int
    topics: list[str]


class PingReq(msgspec.Struct, frozen=True, gc=False):
    pass


class Disconnect(msgspec.Struct, frozen=True, gc=False):
    pass


Event = Connect | Publish | PubAck | PubRec | PubRel | PubComp | Subscribe | Unsubscribe | PingReq | Disconnect
