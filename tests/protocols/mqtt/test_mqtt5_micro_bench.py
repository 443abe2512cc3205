"""bench/micro_mqtt.py's MQTT 5.0 cases measure what they say: each read
decodes, on both twins, into that many PUBLISHes of the bench's topic and
payload with the properties named (the alias case's topic mapped back), and
the PUBACK cases encode the frames tests/mqtt5_frames.py builds. A smoke run
of every row. Nothing about timing is asserted."""
from __future__ import annotations

import pytest

from bench import micro_mqtt
from gridgate import _fastparse
from gridgate.protocols.mqtt import codec5_py
from gridgate.protocols.mqtt.codec5 import compiled_codec5
from gridgate.protocols.mqtt.events5 import Publish5
from mqtt5_frames import REASON_STRING, prop_str, props, puback5

TWINS = {"twin": codec5_py, "compiled": compiled_codec5(_fastparse)}


@pytest.mark.parametrize("kind", ["props", "alias", "empty"])
@pytest.mark.parametrize("impl", TWINS)
def test_each_5_0_read_decodes_into_its_publishes(kind, impl):
    read, n = micro_mqtt._aligned_read5(kind)
    codec = TWINS[impl].MQTT5Codec(1 << 20, 16)
    codec.feed(micro_mqtt._connect5())
    events = codec.feed(read)
    assert len(events) == n > 200
    assert all(type(e) is Publish5 and e.topic == micro_mqtt.TOPIC and bytes(e.payload) == micro_mqtt.PAYLOAD
               and e.qos == 1 for e in events)
    p = events[-1].properties
    if kind == "empty":
        assert p.user_properties == () and p.content_type is None
    else:
        assert (p.payload_format_indicator, p.content_type) == (1, "application/json")
        assert [name for name, _ in p.user_properties] == ["traceparent", "tracestate"]


@pytest.mark.parametrize("impl", TWINS)
def test_the_5_0_puback_cases_encode_the_spec_frames(impl):
    rows = {name: make(TWINS[impl])() for name, _, make in micro_mqtt.cases5() if "encode" in name}
    assert list(rows.values()) == [puback5(7), puback5(7, 0x99, props(prop_str(REASON_STRING,
                                                                                "out_of_range: temperature")))]


def test_a_quick_run_has_every_row():
    rows = micro_mqtt.run(quick=True)
    assert [r["case"] for r in rows] == [c[0] for c in (*micro_mqtt.cases(), *micro_mqtt.cases5())]
    assert all(r["py_ns"] > 0 and r["c_ns"] > 0 for r in rows)
