"""The cluster directory and its messages, without NATS: who holds which
device as far as one node has heard (gridgate.cluster.directory)."""
from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, strategies as st

from gridgate.cluster import messages as m
from gridgate.cluster.directory import MISMATCHES_BEFORE_SYNC, Directory


def directory(max_devices: int = 1000) -> Directory:
    return Directory("me", presence_timeout_s=5.0, max_devices=max_devices)


def digest(*devices: str) -> int:
    total = 0
    for d in devices:
        total = m.add_digest(total, d)
    return total


def test_bind_unbind_and_the_newest_holder_wins():
    d = directory()
    d.bind("a", "meter-1", 100, now=0)
    assert d.holder("meter-1") == "a"
    d.bind("b", "meter-1", 200, now=0)         # a takeover on node b
    assert d.holder("meter-1") == "b"
    d.bind("a", "meter-1", 150, now=0)         # a late, older announcement does not win
    assert d.holder("meter-1") == "b"
    d.unbind("b", "meter-1", now=0)
    assert d.holder("meter-1") == "a"          # a still says it holds it: the next newest
    d.unbind("a", "meter-1", now=0)
    assert d.holder("meter-1") is None
    assert len(d) == 0


def test_own_messages_are_ignored():
    d = directory()
    d.bind("me", "meter-1", 1, now=0)
    assert d.holder("meter-1") is None and not d.nodes


def test_heartbeat_asks_for_a_sync_only_after_repeated_mismatch():
    d = directory()
    d.bind("a", "m1", 1, now=0)
    assert d.heartbeat("a", 7, 1, digest("m1"), now=1) is False
    # a bind crossing the heartbeat: one mismatch is tolerated
    assert d.heartbeat("a", 7, 2, digest("m1", "m2"), now=2) is False
    assert [d.heartbeat("a", 7, 2, digest("m1", "m2"), now=3 + i)
            for i in range(MISMATCHES_BEFORE_SYNC - 1)][-1] is True


def test_same_count_other_devices_is_a_mismatch():
    d = directory()
    d.bind("a", "m1", 1, now=0)
    results = [d.heartbeat("a", 7, 1, digest("m9"), now=i) for i in range(MISMATCHES_BEFORE_SYNC)]
    assert results[-1] is True


def test_sync_replaces_the_view_at_its_last_chunk():
    d = directory()
    d.bind("a", "stale", 1, now=0)
    d.sync_chunk("a", 7, 0, False, [("m1", 10)], now=1)
    assert d.holder("m1") is None and d.holder("stale") == "a"     # not applied before the last chunk
    d.sync_chunk("a", 7, 1, True, [("m2", 11)], now=1)
    assert d.holder("m1") == "a" and d.holder("m2") == "a" and d.holder("stale") is None
    assert d.heartbeat("a", 7, 2, digest("m1", "m2"), now=2) is False
    assert d.nodes["a"].mismatches == 0


def test_silent_nodes_expire_and_their_devices_are_forgotten():
    d = directory()
    d.heartbeat("a", 7, 0, 0, now=0)
    d.bind("a", "m1", 1, now=0)
    d.heartbeat("b", 8, 0, 0, now=3)
    assert d.expire(now=4.9) == []
    assert d.expire(now=5.0) == [("a", 1)]
    assert d.holder("m1") is None and d.live_nodes() == ["b"]


def test_a_restarted_node_with_the_same_name_starts_over():
    d = directory()
    d.heartbeat("a", 7, 0, 0, now=0)
    d.bind("a", "m1", 1, now=0)
    d.heartbeat("a", 8, 0, 0, now=1)              # new incarnation
    assert d.holder("m1") is None


def test_remote_devices_are_bounded():
    d = directory(max_devices=2)
    for i in range(5):
        d.bind("a", f"m{i}", i, now=0)
    assert len(d) == 2 and d.dropped == 3
    assert d.holder("m4") is None


def test_drop_hands_a_device_to_the_other_holder():
    d = directory()
    d.bind("a", "m1", 1, now=0)
    d.bind("b", "m1", 2, now=0)
    d.drop("b")
    assert d.holder("m1") == "a"


@pytest.mark.parametrize("message", [
    m.Bind("a", "meter-1", 1), m.Unbind("a", "meter-1", 1), m.Heartbeat("a", 1, 2, 3), m.Bye("a"),
    m.ConnectionCount("a", 3, {"mqtt": 3}), m.CommandRequest("a", "d", b'{"type":"x"}'),
    m.DeviceRequest("a", "d"), m.SyncRequest("a"), m.SyncChunk("a", 1, 0, True, [("d", 1)]),
    m.RemoteAnswer("a", 202, {"command_id": "x"}),
])
def test_messages_round_trip(message):
    assert m.decode(m.encode(message)) == message


@given(st.binary(max_size=200))
def test_any_bytes_decode_to_a_message_or_a_decode_error(data):
    try:
        m.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        pass


def test_digest_is_order_free_and_stable():
    assert digest("a", "b", "c") == digest("c", "a", "b")
    assert m.add_digest(digest("a", "b"), "b", -1) == digest("a")
    # the same in every process and version of a cluster (not Python's salted hash()):
    # BLAKE2b-64 of the id, little-endian
    assert m.device_digest("meter-1") == 0x4FB61C50D4D35F78
