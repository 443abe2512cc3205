"""Bans with expiry, flapping detection, and shedding by commit p99."""
from __future__ import annotations

from gridgate.limits.bans import Ban, BanList, FlapDetector
from gridgate.limits.shedding import CommitLatency


def test_a_client_id_reconnecting_16_times_in_a_minute_is_banned():
    bans = BanList()
    flaps = FlapDetector(bans, max_connects=15, window_s=60, ban_s=300)
    assert [flaps.connect("m-1", float(t)) for t in range(15)] == [None] * 15
    ban = flaps.connect("m-1", 15.0)
    assert ban == Ban("client_id", "m-1", "flapping", 315.0)
    assert flaps.connect("m-1", 100.0) == ban                 # still banned, whatever it does
    assert flaps.connect("m-2", 100.0) is None                # others are not
    assert bans.active(100.0) == [ban]
    assert flaps.connect("m-1", 315.0) is None                # expired: a fresh start


def test_connects_spread_over_more_than_the_window_are_not_flapping():
    flaps = FlapDetector(BanList(), max_connects=15, window_s=60, ban_s=300)
    assert all(flaps.connect("m-1", t * 4.5) is None for t in range(100))


def test_lifting_a_ban():
    bans = BanList()
    flaps = FlapDetector(bans, max_connects=1, window_s=60, ban_s=300)
    flaps.connect("m-1", 0.0)
    assert flaps.connect("m-1", 0.0) is not None
    assert bans.lift("client_id", "m-1") is True
    assert bans.lift("client_id", "m-1") is False
    assert bans.banned("client_id", "m-1", 1.0) is None
    assert flaps.connect("m-1", 1.0) is None


def test_flapping_detection_off():
    flaps = FlapDetector(BanList(), max_connects=1, window_s=60, ban_s=0)
    assert all(flaps.connect("m-1", 0.0) is None for _ in range(100))


def test_ban_and_connect_tables_are_bounded():
    bans = BanList(limit=10)
    flaps = FlapDetector(bans, max_connects=1, window_s=60, ban_s=300, limit=10)
    for i in range(1000):
        bans.ban("address", f"10.0.0.{i}", "auth_failures", 100.0)
        flaps.connect(f"m-{i}", 0.0)
    assert len(bans.active(0.0)) == 10 and len(flaps._connects) == 10


def test_a_device_that_connected_once_costs_one_float_in_the_connect_table():
    # one entry per idle device: its size is RSS per connection
    flaps = FlapDetector(BanList(), max_connects=3, window_s=60, ban_s=300)
    flaps.connect("m-1", 10.0)
    assert flaps._connects["m-1"] == 10.0
    flaps.connect("m-1", 20.0)
    assert flaps._connects["m-1"] == (10.0, 20.0)
    flaps.connect("m-1", 75.0)                                # 10.0 left the window
    assert flaps._connects["m-1"] == (20.0, 75.0)
    flaps.connect("m-1", 200.0)                               # alone in the window again
    assert flaps._connects["m-1"] == 200.0


def test_ids_whose_last_connect_left_the_window_are_dropped_as_others_connect():
    flaps = FlapDetector(BanList(), max_connects=3, window_s=60, ban_s=300)
    for i in range(100):
        flaps.connect(f"m-{i}", float(i) / 10)                # a fleet connects within 10 s
    assert len(flaps._connects) == 100
    for i in range(60):                                       # then a few reconnects, much later
        flaps.connect(f"late-{i}", 100.0 + i)
    assert set(flaps._connects) == {f"late-{i}" for i in range(60)}
    assert flaps.connect("m-1", 200.0) is None                # a dropped id starts afresh


def test_shedding_follows_the_p99_of_the_last_ten_seconds():
    latency = CommitLatency(threshold_ms=800)
    for i in range(1000):
        latency.record(0.002, 100.0 + i / 1000)
    assert not latency.shedding(101.0)
    for _ in range(20):                                       # 2% slow: the p99 is slow
        latency.record(1.5, 101.0)
    assert latency.p99(101.5) == 2.5 and latency.shedding(101.5)
    assert latency.shedding(110.9)
    assert not latency.shedding(112.5)                        # the slow second left the window
    assert latency.p99(200.0) == 0.0


def test_threshold_is_exact_though_buckets_are_coarse():
    latency = CommitLatency(threshold_ms=300)
    for _ in range(100):
        latency.record(0.29, 5.0)
    assert not latency.shedding(5.0)
    latency = CommitLatency(threshold_ms=300)
    for _ in range(100):
        latency.record(0.31, 5.0)
    assert latency.shedding(5.0)


def test_shedding_off():
    latency = CommitLatency(threshold_ms=0)
    latency.record(100.0, 0.0)
    assert not latency.shedding(0.0)
