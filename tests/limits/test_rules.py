"""The Limiter: device buckets and [[limits.rule]] buckets, by protocol,
vendor, region and device glob; pause (charge) and refuse (admit)."""
from __future__ import annotations

import pytest

from gridgate.config import Config, ConfigError, LimitRule, LimitsConfig
from gridgate.limits.rules import DEVICE, Limiter

IDENTITY = {"ENVIRONMENT": "test", "SERVICE_NAME": "gg"}


def one(device="m-1", vendor=None, region=None):
    return [(device, vendor, region)]


def test_no_limits_configured_costs_nothing():
    limiter = Limiter(LimitsConfig(), 0.0)
    assert not limiter.enabled
    assert limiter.charge(one() * 1000, "mqtt", "m-1", 10**6, 0.0).wait == 0.0
    assert limiter.admit(one() * 1000, "http", "m-1", 10**6, 0.0).wait == 0.0


def test_device_readings_limit_is_per_device():
    limiter = Limiter(LimitsConfig(device_readings_per_s=10, device_readings_burst=10), 0.0)
    assert limiter.charge(one("a") * 10, "mqtt", "a", 0, 0.0).wait == 0.0
    charge = limiter.charge(one("a") * 5, "mqtt", "a", 0, 0.0)
    assert charge.wait == pytest.approx(0.5) and charge.name == DEVICE
    assert limiter.charge(one("b") * 10, "mqtt", "b", 0, 0.0).wait == 0.0     # b has its own bucket


def test_device_bytes_limit():
    limiter = Limiter(LimitsConfig(device_bytes_per_s=1000, device_bytes_burst=1000), 0.0)
    assert limiter.charge(one(), "mqtt", "m-1", 1000, 0.0).wait == 0.0
    assert limiter.charge(one(), "mqtt", "m-1", 500, 0.0).wait == pytest.approx(0.5)


def test_a_rule_is_one_bucket_shared_by_every_device_it_matches():
    rule = LimitRule(name="huawei-shanghai-mqtt", protocol="mqtt", vendor="huawei", region="shanghai",
                     readings_per_s=10, burst=10)
    limiter = Limiter(LimitsConfig(rule=[rule]), 0.0)
    for i in range(10):
        assert limiter.charge(one(f"m-{i}", "huawei", "shanghai"), "mqtt", None, 0, 0.0).wait == 0.0
    charge = limiter.charge(one("m-99", "huawei", "shanghai"), "mqtt", None, 0, 0.0)
    assert charge.wait == pytest.approx(0.1) and charge.name == "huawei-shanghai-mqtt"
    # another region, vendor or protocol is not the rule's business
    assert limiter.charge(one("m-1", "huawei", "beijing") * 50, "mqtt", None, 0, 0.0).wait == 0.0
    assert limiter.charge(one("m-1", "abb", "shanghai") * 50, "mqtt", None, 0, 0.0).wait == 0.0
    assert limiter.charge(one("m-1", "huawei", "shanghai") * 50, "http", None, 0, 0.0).wait == 0.0


def test_device_glob_and_every_matching_rule_counts():
    rules = [LimitRule(name="meters", device="meter-*", readings_per_s=100, burst=100),
             LimitRule(name="all", readings_per_s=5, burst=5)]
    limiter = Limiter(LimitsConfig(rule=rules), 0.0)
    charge = limiter.charge(one("meter-1") * 10, "ws", None, 0, 0.0)
    assert charge.name == "all" and charge.wait == pytest.approx(1.0)
    # "meters" took its 10 too
    assert limiter.charge(one("meter-2") * 90, "ws", None, 0, 10.0).name == "all"
    assert limiter.charge(one("inverter-1"), "ws", None, 0, 100.0).wait == 0.0


def test_admit_is_all_or_nothing_and_says_how_long_to_wait():
    rules = [LimitRule(name="r", readings_per_s=10, burst=10)]
    limiter = Limiter(LimitsConfig(device_readings_per_s=100, rule=rules), 0.0)
    assert limiter.admit(one("a") * 8, "http", "a", 0, 0.0).wait == 0.0
    refused = limiter.admit(one("a") * 5, "http", "a", 0, 0.0)
    assert refused.name == "r" and refused.wait == pytest.approx(0.3)
    # nothing was taken by the refusal: 2 still fit
    assert limiter.admit(one("a") * 2, "http", "a", 0, 0.0).wait == 0.0


def test_reload_keeps_a_rules_balance_by_name():
    rule = LimitRule(name="r", readings_per_s=10, burst=10)
    limiter = Limiter(LimitsConfig(rule=[rule]), 0.0)
    limiter.charge(one() * 10, "mqtt", None, 0, 0.0)
    limiter.reload(LimitsConfig(rule=[LimitRule(name="r", readings_per_s=20, burst=20)]), 0.0)
    assert limiter.charge(one(), "mqtt", None, 0, 0.0).wait == pytest.approx(1 / 20)
    limiter.reload(LimitsConfig(), 0.0)
    assert not limiter.enabled and limiter.rule_names == []


def test_tables_are_bounded():
    limiter = Limiter(LimitsConfig(device_readings_per_s=1, max_tracked=100), 0.0)
    for i in range(10_000):
        limiter.charge(one(f"d-{i}"), "mqtt", None, 0, 0.0)
    assert len(limiter._devices) == 100 and len(limiter._matches) == 100


def test_rules_from_toml(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text('[limits]\ndevice_readings_per_s = 5\n'
                    '[[limits.rule]]\nname = "huawei-shanghai-mqtt"\nprotocol = "mqtt"\nvendor = "huawei"\n'
                    'region = "shanghai"\nreadings_per_s = 100\n'
                    '[[limits.rule]]\nname = "meters"\ndevice = "meter-*"\nreadings_per_s = 1000\nburst = 50\n')
    config = Config.load(path, env=IDENTITY)
    assert [r.name for r in config.limits.rule] == ["huawei-shanghai-mqtt", "meters"]
    assert config.limits.rule[1] == LimitRule(name="meters", device="meter-*", readings_per_s=1000, burst=50)


def test_bad_rules_are_reported(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text('[[limits.rule]]\nname = "a"\nreadings_per_s = 1\n'
                    '[[limits.rule]]\nname = "a"\nreadings_per_s = 2\n')
    with pytest.raises(ConfigError) as info:
        Config.load(path, env=IDENTITY)
    assert info.value.problems == ["limits.rule: the name 'a' is used more than once (each names its own metrics)"]
    path.write_text('[[limits.rule]]\nname = "_x"\nreadings_per_s = 0\n')
    with pytest.raises(ConfigError) as info:
        Config.load(path, env=IDENTITY)
    assert len(info.value.problems) == 1 and info.value.problems[0].startswith("limits.rule: ")
