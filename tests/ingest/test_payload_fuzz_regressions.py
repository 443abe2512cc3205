"""Inputs the fuzzer (fuzz/, `make fuzz`) found the compiled validator and its
twin disagreeing on, with the answer both must give, run against both."""
from __future__ import annotations

import pytest

from gridgate.ingest.records import Rejection
from gridgate.ingest.rules import PayloadRules

NOW = 1_732_406_400_000_000_000
MALFORMED_JSON = "payload is not valid JSON"


@pytest.mark.parametrize("raw", [
    b'"\\udd80800"',                                    # the fuzzer's input: a lone low surrogate, top level
    b'"\\udc00"', b'"\\uDFFF"',                          # both ends of the low half
    b'{"device_id": "m", "x": 1, "tags": {"v": "\\udc80"}}',  # in a tag value a sink would have to encode
    b'{"device_id": "m\\ude00", "x": 1}',
    b'{"\\udfff": 1}',                                   # in a key
    b'[{"device_id": "m", "x": 1}, "\\udc00"]',
    b'"\\ude00\\ud83d"',                                 # low then high: two lone halves, not a pair
])
def test_a_lone_low_surrogate_escape_is_malformed_json(payload_impl, raw):
    """RFC 8259 section 8.2 leaves lone surrogates to the parser; msgspec
    (the compiled side) refuses both halves. The twin's check looked for
    high-surrogate escapes (\\uD800-\\uDBFF) only, so it let a lone low one
    (\\uDC00-\\uDFFF) through as a string that no sink can encode as UTF-8."""
    v = payload_impl.Validator(PayloadRules())
    assert v.validate(raw, "json", "http", None, NOW) == ([], [Rejection(
        reason="malformed", raw=raw, detail=MALFORMED_JSON)])


def test_a_surrogate_pair_escape_is_one_character(payload_impl):
    """The fix must not refuse a well-formed pair (U+1F600)."""
    v = payload_impl.Validator(PayloadRules())
    records, rejections = v.validate(b'{"device_id": "m", "x": 1, "tags": {"v": "\\ud83d\\ude00"}}', "json", "http",
                                     None, NOW)
    assert rejections == [] and records[0].tags == {"v": "\U0001f600"}


def test_a_lone_low_surrogate_escape_is_malformed_ndjson(payload_impl):
    v = payload_impl.Validator(PayloadRules())
    raw = b'{"device_id": "m", "x": 1}\n{"device_id": "\\udc00", "x": 1}'
    records, rejections = v.validate(raw, "ndjson", "http", None, NOW)
    assert [r.device_id for r in records] == ["m"]
    assert [(r.reason, r.index, r.detail) for r in rejections] == [("malformed", 1, "line is not valid JSON")]
