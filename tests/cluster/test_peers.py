"""Cluster liveness and messages, without NATS (gridgate.cluster.peers, messages)."""
from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, strategies as st

from gridgate.cluster import messages as m
from gridgate.cluster.peers import Peers


def peers() -> Peers:
    return Peers("me", presence_timeout_s=5.0)


def test_a_heartbeat_makes_a_peer_and_says_when_it_is_new():
    p = peers()
    assert p.heartbeat("a", 7, 3, now=0) is True
    assert p.heartbeat("a", 7, 4, now=1) is False
    assert p.nodes["a"].devices == 4 and p.names() == ["a"]


def test_own_heartbeats_are_not_a_peer():
    p = peers()
    assert p.heartbeat("me", 1, 0, now=0) is False and len(p) == 0


def test_a_restarted_node_is_new_again():
    p = peers()
    p.heartbeat("a", 7, 3, now=0)
    assert p.heartbeat("a", 8, 0, now=1) is True
    assert p.nodes["a"].incarnation == 8


def test_silent_nodes_expire_at_presence_timeout():
    p = peers()
    p.heartbeat("a", 7, 1, now=0)
    p.heartbeat("b", 8, 0, now=3)
    assert p.expire(now=4.9) == []
    assert [x.name for x in p.expire(now=5.0)] == ["a"]
    assert p.names() == ["b"]


def test_bye_drops_at_once():
    p = peers()
    p.heartbeat("a", 7, 2, now=0)
    assert p.drop("a").devices == 2 and p.drop("a") is None


@pytest.mark.parametrize("message", [
    m.Bind("a", "meter-1", 1), m.Heartbeat("a", 1, 2), m.Bye("a"), m.ConnectionCount("a", 3, {"mqtt": 3}),
    m.Ask("a", "command", "d", b'{"type":"x"}'), m.Ask("a", "device", "d"),
    m.Answer("a", True, 202, {"command_id": "x"}), m.Answer("a", False),
])
def test_messages_round_trip(message):
    assert m.decode(m.encode(message)) == message


@given(st.binary(max_size=200))
def test_any_bytes_decode_to_a_message_or_a_decode_error(data):
    try:
        m.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        pass


def test_an_ask_of_another_kind_is_refused():
    data = msgspec.msgpack.encode(["ask", "a", "shell", "d", b""])
    with pytest.raises(msgspec.ValidationError):
        m.decode(data)
