"""What the payload validator produces and every sink consumes."""
from __future__ import annotations

import re

import msgspec

__all__ = ["Record", "Rejection", "REASONS", "DEVICE_ID_PATTERN", "DEVICE_ID_RE", "TRACEPARENT_RE",
           "MAX_TRACESTATE_CHARS", "trace_id"]

# What a device id may be (DESIGN section 3), wherever it comes from: an MQTT
# client id, a WebSocket ?device_id=, or a payload's device_id.
DEVICE_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}"
DEVICE_ID_RE = re.compile(DEVICE_ID_PATTERN + r"\Z")

# Reason codes for rejected input (DESIGN section 3). Public surface.
REASONS: tuple[str, ...] = (
    "malformed", "not_object", "missing_device_id", "bad_device_id",
    "identity_mismatch", "bad_timestamp", "future_timestamp", "bad_unit",
    "bad_type", "out_of_range", "bad_tag", "too_many_fields", "too_large",
    "bad_topic", "not_authorized", "sink_refused",
)


# W3C Trace Context level 1, section 3.2: version 00's traceparent
# (version-traceid-parentid-flags, lowercase hex); an all-zero trace or
# parent id is invalid. Later versions may append fields after the flags
# ("-..."), which a version-00 reader keeps but does not read.
TRACEPARENT_RE = re.compile(r"(?!ff)[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}(-[ -~]*)?\Z")
# tracestate: at most 32 list members, which W3C asks to propagate at least
# 512 characters of (section 3.3.1.1); longer ones are not kept.
MAX_TRACESTATE_CHARS = 512


def trace_id(traceparent: str) -> str:
    """The trace id of a valid traceparent (its 32 hex digits)."""
    return traceparent[3:35]


class Record(msgspec.Struct, kw_only=True, gc=False, omit_defaults=True):
    """One normalized reading, as sinks receive it.

    ``traceparent`` and ``tracestate``: the W3C Trace Context the device sent
    with it (MQTT 5 User Properties), None when it sent none; encoded only
    when set (omit_defaults), so a record without them encodes as before.

    ``fields`` and ``tags`` are read-only once the record is made: the
    compiled validator hands every reading of one location the same tags
    dict (and every reading without tags one empty dict), so a sink that
    needs other tags builds a new dict (``{**record.tags, ...}``) and never
    changes the one it got. tests/ingest/test_record_contract.py holds every
    module of gridgate to this.
    """

    device_id: str
    ts_ns: int                      # reading time, ns since the epoch (UTC)
    received_ns: int                # when gridgate received it
    protocol: str                   # "mqtt", "http", "ws", "mqtt-ws"
    fields: dict[str, int | float]
    tags: dict[str, str]
    traceparent: str | None = None
    tracestate: str | None = None


class Rejection(msgspec.Struct, kw_only=True, gc=False):
    """One rejected reading (or whole payload), bound for the dead-letter store."""

    reason: str                     # one of REASONS
    field: str | None = None        # the offending field, when one is to blame
    index: int | None = None        # position in the batch; None = the whole payload
    device_id: str | None = None    # as far as it could be told
    raw: bytes = b""                # the raw bytes of the item (or of the whole payload)
    detail: str = ""                # human-readable explanation
