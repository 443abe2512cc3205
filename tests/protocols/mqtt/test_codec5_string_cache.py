"""The compiled MQTT 5.0 codec keeps the last Content Type and User Property
strings it decoded, one slot per role, and gives the cached str when the same
bytes come again (src/_fastparse_mqtt5.pxi, _m5_cached_utf8/_m5_cached_pair).
These sequences are built to land on the slots' edges: the same length with
other bytes, the same name with another value, a name/value split moved over
the same bytes, a valid string then an invalid one of the same length in the
same slot, more pairs than slots, strings longer than a slot holds. Each
decode is checked against Properties built here from the strings, on both
twins, so a stale or half-replaced slot shows up as a wrong value or a
missing error.
"""
from __future__ import annotations

import struct

import pytest

from gridgate import _fastparse
from gridgate.protocols.mqtt import v5
from gridgate.protocols.mqtt.codec5 import compiled_codec5
from gridgate.protocols.mqtt.v5 import MQTT5Error, Properties

PUBLISH = 3
C5 = compiled_codec5(_fastparse)


@pytest.fixture(params=["py", "c"])
def decode_properties(request: pytest.FixtureRequest):
    return v5.decode_properties if request.param == "py" else _fastparse.mqtt5_decode_properties


def _raw(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def _vbi(n: int) -> bytes:
    out = bytearray()
    while True:
        n, byte = n >> 7, n & 0x7F
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _block(content_type: str | bytes | None, pairs: list[tuple[str | bytes, str | bytes]]) -> bytes:
    body = b"" if content_type is None else b"\x03" + _raw(content_type)
    body += b"".join(b"\x26" + _raw(k) + _raw(v) for k, v in pairs)
    return _vbi(len(body)) + body


def _check(decode_properties, content_type: str | None, pairs: list[tuple[str, str]]) -> None:
    data = b"\xff" + _block(content_type, pairs) + b"\xee"
    props, end = decode_properties(data, 1, len(data) - 1, PUBLISH)
    assert end == len(data) - 1
    assert props == Properties(content_type=content_type, user_properties=tuple(pairs))
    assert props.content_type == content_type and list(props.user_properties) == pairs


SEQUENCE: list[tuple[str | None, list[tuple[str, str]]]] = [
    ("application/json", [("traceparent", "00-aa-01"), ("tracestate", "rojo=1")]),
    ("application/json", [("traceparent", "00-aa-01"), ("tracestate", "rojo=1")]),   # all hits
    ("application/cbor", [("traceparent", "00-ab-01"), ("tracestate", "rojo=1")]),   # same lengths, other bytes
    ("application/cbor", [("traceparent", "00-ab-02"), ("tracestate", "rojo=2")]),   # same names, other values
    (None, [("tracestate", "rojo=2"), ("traceparent", "00-ab-02")]),                 # pairs swap slots
    ("text/plain", [("ab", "c"), ("x", "yz")]),
    ("text/plain", [("a", "bc"), ("xy", "z")]),      # the same bytes, name/value split elsewhere
    ("text/plain", [("a", "bc"), ("xy", "z"), ("k3", "v3"), ("k4", "v4"), ("k5", "v5"), ("k6", "v6")]),
    ("text/plain", [("a", "bc"), ("xy", "z"), ("k3", "v3"), ("k4", "v4"), ("k5", "w5"), ("k6", "v6")]),
    ("t" * 200, [("n" * 100, "v" * 100), ("n" * 100, "v" * 27), ("", "")]),           # longer than a slot
    ("t" * 200, [("n" * 100, "v" * 100), ("n" * 100, "v" * 28), ("", "")]),
    ("", [("", ""), ("", "")]),
    ("caf\u00e9/\u65e5\u672c", [("n\u00e9", "\U0001f600"), ("tracestate", "rojo=1")]),  # UTF-8, not ASCII
    ("caf\u00e9/\u65e5\u672c", [("n\u00e9", "\U0001f601"), ("tracestate", "rojo=1")]),
    ("application/json", [("traceparent", "00-aa-01"), ("tracestate", "rojo=1")]),
]


def test_repeated_and_changed_strings(decode_properties) -> None:
    for _ in range(2):
        for content_type, pairs in SEQUENCE:
            _check(decode_properties, content_type, pairs)


@pytest.mark.parametrize("bad", [b"applic\x00tion/json", b"applic\x7ftion/json", b"applic\xc2\x85ion/json",
                                 b"applic\xc3(tion/json", b"applic\xed\xa0\x80on/json"],
                         ids=["nul", "del", "c1", "cut-utf8", "surrogate"])
def test_a_bad_string_after_a_cached_one_of_its_length(decode_properties, bad: bytes) -> None:
    """The slots hold the last valid bytes: other bytes of the same length are checked again."""
    assert len(bad) in (16, 17)
    good = "application/json" if len(bad) == 16 else "applicatio/jsonx!"
    for role in ("content type", "name", "value"):
        _check(decode_properties, good, [(good, good)])
        if role == "content type":
            block = _block(bad, [(good, good)])
        elif role == "name":
            block = _block(good, [(bad, good)])
        else:
            block = _block(good, [(good, bad)])
        with pytest.raises(MQTT5Error) as err:
            decode_properties(block, 0, len(block), PUBLISH)
        assert err.value.reason_code == 0x81
        _check(decode_properties, good, [(good, good)])


def test_publish_events_through_the_codec() -> None:
    """The same through MQTT5Codec.feed, both twins on one stream."""
    from gridgate.protocols.mqtt import codec5_py

    def publish(pid: int, content_type: str | None, pairs: list[tuple[str, str]]) -> bytes:
        body = _raw("devices/m1/t") + struct.pack("!H", pid) + _block(content_type, pairs) + b"{}"
        return b"\x32" + _vbi(len(body)) + body

    connect_body = _raw("MQTT") + bytes((5, 0x02, 0, 60)) + b"\x00" + _raw("meter-1")
    stream = b"\x10" + _vbi(len(connect_body)) + connect_body
    stream += b"".join(publish(i + 1, ct, pairs) for i, (ct, pairs) in enumerate(SEQUENCE * 2))
    events = {}
    for name, impl in (("py", codec5_py), ("c", C5)):
        events[name] = impl.MQTT5Codec(1 << 20, 0).feed(stream)[1:]
    assert events["c"] == events["py"]
    for event, (content_type, pairs) in zip(events["c"], SEQUENCE * 2, strict=True):
        assert event.properties == Properties(content_type=content_type, user_properties=tuple(pairs))
