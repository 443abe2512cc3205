"""The downlink command's wire format: plain data, no I/O.

What a device receives (``{"id", "type", "payload"}`` as JSON or MessagePack)
and what ``POST /v1/devices/{id}/commands`` takes. Plain on purpose: the
configuration checks each device config's UPDATE_CONFIG size with this very
encoder, and it must not pull in the outboxes or Trio to do so.
"""
from __future__ import annotations

import re
import uuid
from typing import Any

import msgspec

__all__ = ["Command", "CommandError", "UPDATE_CONFIG", "new_command", "parse_command", "encode_command"]

UPDATE_CONFIG = "UPDATE_CONFIG"
COMMAND_TYPE_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.:-]{0,63}\Z")


class Command(msgspec.Struct, frozen=True, gc=False):
    """A downlink command as the device receives it (JSON or MessagePack)."""

    id: str
    type: str
    payload: Any


class _CommandRequest(msgspec.Struct, forbid_unknown_fields=True):
    type: str
    payload: Any = msgspec.field(default_factory=dict)


class CommandError(ValueError):
    """The body of a command request is unusable (HTTP 400 or 413)."""

    def __init__(self, error: str, detail: str, status: int = 400) -> None:
        super().__init__(detail)
        self.error = error
        self.detail = detail
        self.status = status


_request_decoder = msgspec.json.Decoder(_CommandRequest)
_json = msgspec.json.Encoder()


def new_command(type_: str, payload: Any) -> Command:
    return Command(id=uuid.uuid4().hex, type=type_, payload=payload)


def encode_command(command: Command) -> bytes:
    """The JSON form: the MQTT PUBLISH payload and the WebSocket command."""
    return _json.encode(command)


def parse_command(body: bytes, max_bytes: int) -> Command:
    """``{"type": "REBOOT", "payload": {...}}`` -> a Command with a fresh id.

    Raises:
        CommandError: not JSON, not that shape, a bad type, or too large.
    """
    try:
        req = _request_decoder.decode(body)
    except msgspec.DecodeError as exc:
        # ValidationError is a DecodeError: both mean a body we cannot take
        raise CommandError("bad_command", f"expected {{\"type\": str, \"payload\": any}}: {exc}") from None
    if not COMMAND_TYPE_RE.match(req.type):
        raise CommandError("bad_command", "type must match [A-Za-z][A-Za-z0-9_.:-]{0,63}")
    command = new_command(req.type, req.payload)
    size = len(encode_command(command))
    if size > max_bytes:
        raise CommandError("too_large", f"command of {size} bytes exceeds downlink.max_command_bytes {max_bytes}",
                           413)
    return command
