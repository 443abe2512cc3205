"""What cluster nodes say to each other over NATS (MessagePack, msgspec).

Every message names its sender (``node``). Subjects, under ``[cluster]
subject_prefix`` (default ``gridgate.cluster``; P below):

- ``P.bind``: a node took a device (``Bind``); a node holding an older
  session of the device closes it (takeover across nodes).
- ``P.hb``: ``Heartbeat`` every ``heartbeat_s`` (liveness, and how many
  devices the sender holds); ``P.bye``: a node stopping gracefully.
- ``P.ask``: a question about one device to every node (``Ask``: deliver
  this command, or describe the device); each node answers ``Answer``, with
  ``held`` true only from the node that holds it.
- ``P.connections``: each node answers with its ``ConnectionCount``.

Messages come from the cluster's own NATS, which only gateways should be
able to publish to (NATS accounts or credentials: README); they are still
decoded strictly (an undecodable one is counted and dropped).
"""
from __future__ import annotations

from typing import Any, Literal

import msgspec

__all__ = ["Bind", "Heartbeat", "Bye", "ConnectionCount", "Ask", "Answer", "encode", "decode"]


class Bind(msgspec.Struct, tag="bind", array_like=True):
    node: str
    device: str
    since_ns: int          # when the node bound it (wall clock): the newest session wins a takeover


class Heartbeat(msgspec.Struct, tag="hb", array_like=True):
    node: str
    incarnation: int       # the node's start time (ns): a restarted node with the same name is a new peer
    devices: int


class Bye(msgspec.Struct, tag="bye", array_like=True):
    node: str


class ConnectionCount(msgspec.Struct, tag="conns", array_like=True):
    node: str
    total: int
    by_protocol: dict[str, int]


class Ask(msgspec.Struct, tag="ask", array_like=True):
    node: str
    kind: Literal["command", "device"]
    device: str
    body: bytes = b""      # a command: the POSTed JSON, checked by the asking node and again by the holder


class Answer(msgspec.Struct, tag="answer", array_like=True):
    node: str
    held: bool             # this node holds the device: status and body are the answer
    status: int = 0
    body: Any = None       # the JSON object the HTTP API answers with


Message = Bind | Heartbeat | Bye | ConnectionCount | Ask | Answer

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


def decode(data: bytes) -> Message:
    """Raises msgspec.DecodeError / ValidationError for anything that is not one of ours."""
    return _decoder.decode(data)
