"""Events of the MQTT 5.0 server codec, both twins (``codec5_py`` and the
compiled ``src/_fastparse_mqtt5.pxi`` build these same classes), as the MQTT 5
session (``session5``) receives them.

msgspec Structs like gridgate.protocols.mqtt.events (compared field by field
in the tests, ``gc=False``: no reference cycles). PINGREQ carries nothing
new in 5.0, so the codec returns events.PingReq for it.
"""
from __future__ import annotations

import msgspec

from gridgate.protocols.mqtt.events import PingReq
from gridgate.protocols.mqtt.v5 import Properties

__all__ = [
    "Will5", "Connect5", "Publish5", "PubAck5", "PubRec5", "PubRel5", "PubComp5", "Subscription",
    "Subscribe5", "Unsubscribe5", "Disconnect5", "Auth", "PingReq", "Event5",
]

_NONE = Properties()


class Will5(msgspec.Struct, frozen=True, gc=False):
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Properties = _NONE     # Will Properties (3.1.3.2)


class Connect5(msgspec.Struct, frozen=True, gc=False):
    clean_start: bool
    keepalive: int           # seconds, 0 = disabled
    client_id: str           # may be empty: the server may assign one (3.1.3.1)
    will: Will5 | None
    username: str | None
    password: bytes | None   # 5.0 allows a password without a user name (3.1.2.9)
    properties: Properties = _NONE
    protocol_name: str = "MQTT"
    protocol_level: int = 5


class Publish5(msgspec.Struct, gc=False):
    # The topic name with the Topic Alias resolved: the one on the wire, or
    # the one the alias stands for when the wire's is empty (3.3.2.3.4).
    # ``properties.topic_alias`` keeps the alias as sent.
    topic: str
    # A zero-copy memoryview slice of the bytes the packet was decoded from
    # (the fed bytes, or the joined buffer when it straddled two reads), in
    # both twins. Compare with ==.
    payload: bytes | memoryview
    qos: int
    packet_id: int           # 0 for QoS 0
    retain: bool
    dup: bool
    properties: Properties = _NONE


class PubAck5(msgspec.Struct, frozen=True, gc=False):
    packet_id: int
    reason_code: int = 0
    properties: Properties = _NONE


class PubRec5(msgspec.Struct, frozen=True, gc=False):
    packet_id: int
    reason_code: int = 0
    properties: Properties = _NONE


class PubRel5(msgspec.Struct, frozen=True, gc=False):
    packet_id: int
    reason_code: int = 0
    properties: Properties = _NONE


class PubComp5(msgspec.Struct, frozen=True, gc=False):
    packet_id: int
    reason_code: int = 0
    properties: Properties = _NONE


class Subscription(msgspec.Struct, frozen=True, gc=False):
    """One Topic Filter and its Subscription Options (3.8.3.1). The filter's
    syntax is not checked by the codec: a bad one gets SUBACK 0x8F
    (v5.valid_topic_filter), not a DISCONNECT."""
    topic_filter: str
    qos: int
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0


class Subscribe5(msgspec.Struct, frozen=True, gc=False):
    packet_id: int
    subscriptions: tuple[Subscription, ...]
    properties: Properties = _NONE


class Unsubscribe5(msgspec.Struct, frozen=True, gc=False):
    packet_id: int
    topic_filters: tuple[str, ...]
    properties: Properties = _NONE


class Disconnect5(msgspec.Struct, frozen=True, gc=False):
    reason_code: int = 0
    properties: Properties = _NONE


class Auth(msgspec.Struct, frozen=True, gc=False):
    reason_code: int = 0
    properties: Properties = _NONE


Event5 = (Connect5 | Publish5 | PubAck5 | PubRec5 | PubRel5 | PubComp5 | Subscribe5 | Unsubscribe5 | PingReq
          | Disconnect5 | Auth)
