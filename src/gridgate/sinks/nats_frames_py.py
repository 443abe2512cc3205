"""The JetStream sink's one-reading messages, built in Python: the reference
for the compiled ``gridgate._fastparse.nats_build_frames`` (src/_fastparse_nats.pxi).

Both build, for each record of a range, its size, its frame head
``HPUB <subject> <reply prefix>`` and the frame's tail after the reply slot,
with the sink's own encoders, hash and subject render, and stop at a record
with a trace context (or a ts_ns outside int64), which the sink builds
itself. tests/sinks/test_nats_frames.py holds the two to the same bytes.
"""
from __future__ import annotations

import binascii
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["build_frames"]

_INT64 = range(-2**63, 2**63)


def build_frames(records: Sequence[Any], start: int, stop: int, render: Callable[[Any], str],
                 head_of: dict[str, bytes], prefix: bytes, tail: bytes, id_encode: Callable[[Any], bytes],
                 encode: Callable[[Any], bytes], blake: Callable[[], Any], token: Callable[[str], bytes],
                 sizes: list[int], heads: list[bytes], tails: list[bytes]) -> int:
    """Build the one-reading messages ``records[start:stop]``; the index of the first not built."""
    if start < 0 or stop < start or stop > len(records):
        raise ValueError(f"records[{start}:{stop}] is not a range of the {len(records)} records")
    plain_header = len(b"NATS/1.0\r\nNats-Msg-Id: ") + len(tail)
    hexlify = binascii.hexlify
    for i in range(start, stop):
        r = records[i]
        ts_ns = r.ts_ns
        if r.traceparent is not None or type(ts_ns) is not int or ts_ns not in _INT64:
            return i
        device_id = r.device_id
        h = blake()
        h.update(id_encode((device_id, ts_ns, r.fields, r.tags)))
        mid = b"%b:%d:%b" % (token(device_id), ts_ns, hexlify(h.digest()))
        payload = encode(r)
        hlen = plain_header + len(mid)
        size = hlen + len(payload)
        subject = render(r)
        head = head_of.get(subject)
        if head is None:
            head = head_of[subject] = b"HPUB %b %b" % (subject.encode(), prefix)
        sizes.append(size)
        heads.append(head)
        tails.append(b" %d %d\r\nNATS/1.0\r\nNats-Msg-Id: %b%b%b\r\n" % (hlen, size, mid, tail, payload))
    return stop
