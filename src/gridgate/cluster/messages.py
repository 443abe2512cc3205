"""What cluster nodes say to each other over NATS (MessagePack, msgspec).

Every message names its sender (``node``). Subjects, under ``[cluster]
subject_prefix`` (default ``gridgate.cluster``; P below):

- ``P.bind`` / ``P.unbind``: a node took or let go of a device (``Bind``,
  ``Unbind``); every node keeps a directory from them, and a node holding an
  older session of the device closes it (takeover across nodes).
- ``P.hb``: ``Heartbeat`` every ``heartbeat_s``: the sender is alive, with
  the count and an order-free digest of the devices it holds, so a node
  whose view of it differs asks for a ``Sync``.
- ``P.bye``: a node stopping gracefully; others forget it at once.
- ``P.connections``: each node answers with its ``ConnectionCount``.
- ``P.node.<node>.command|device|sync``: requests to one node (a routed
  downlink command, a device's state, its whole device list, sent back in
  ``SyncChunk`` messages to ``P.node.<asker>.synced``).

Messages come from the cluster's own NATS, which only gateways should be
able to publish to (NATS accounts or credentials: README); they are still
decoded strictly (an undecodable one is counted and dropped), never trusted
to be small: a sync is cut into chunks of at most SYNC_CHUNK devices.
"""
from __future__ import annotations

import hashlib
from typing import Any

import msgspec

__all__ = [
    "Bind", "Unbind", "Heartbeat", "Bye", "ConnectionCount", "CommandRequest", "DeviceRequest", "SyncRequest",
    "SyncChunk", "RemoteAnswer", "SYNC_CHUNK", "device_digest", "encode", "decode",
]

SYNC_CHUNK = 5_000

_MASK = (1 << 64) - 1


def device_digest(device_id: str) -> int:
    """A device's share of a node's digest (the digest is their sum mod 2**64:
    order-free and updated per bind in O(1)). Stable across processes, unlike hash()."""
    return int.from_bytes(hashlib.blake2b(device_id.encode(), digest_size=8).digest(), "little")


def add_digest(total: int, device_id: str, sign: int = 1) -> int:
    return (total + sign * device_digest(device_id)) & _MASK


class Bind(msgspec.Struct, tag="bind", array_like=True):
    node: str
    device: str
    since_ns: int          # when the node bound it (wall clock): the newest session wins a takeover


class Unbind(msgspec.Struct, tag="unbind", array_like=True):
    node: str
    device: str
    since_ns: int


class Heartbeat(msgspec.Struct, tag="hb", array_like=True):
    node: str
    incarnation: int       # the node's start time (ns): a restarted node with the same name starts over
    count: int
    digest: int


class Bye(msgspec.Struct, tag="bye", array_like=True):
    node: str


class ConnectionCount(msgspec.Struct, tag="conns", array_like=True):
    node: str
    total: int
    by_protocol: dict[str, int]


class CommandRequest(msgspec.Struct, tag="cmd", array_like=True):
    node: str
    device: str
    body: bytes            # the POSTed JSON command, checked by the asking node and again here


class DeviceRequest(msgspec.Struct, tag="dev", array_like=True):
    node: str
    device: str


class SyncRequest(msgspec.Struct, tag="sync", array_like=True):
    node: str


class SyncChunk(msgspec.Struct, tag="synced", array_like=True):
    node: str
    incarnation: int
    index: int
    last: bool
    devices: list[tuple[str, int]]      # (device id, since_ns)


class RemoteAnswer(msgspec.Struct, tag="answer", array_like=True):
    node: str
    status: int
    body: Any              # the JSON object the HTTP API answers with


Message = (Bind | Unbind | Heartbeat | Bye | ConnectionCount | CommandRequest | DeviceRequest | SyncRequest
           | SyncChunk | RemoteAnswer)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


def decode(data: bytes) -> Message:
    """Raises msgspec.DecodeError / ValidationError for anything that is not one of ours."""
    return _decoder.decode(data)
