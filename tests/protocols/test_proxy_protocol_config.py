"""[service] trusted_proxies and the listeners' proxy_protocol in the config:
validated, every problem named, shown by ``gridgate check-config``."""
from __future__ import annotations

import tomllib

import pytest

from gatewayproc import gridgate_env, run_cli
from gridgate.config import Config, ConfigError

IDENTITY = {"ENVIRONMENT": "test", "SERVICE_NAME": "gg"}


def test_check_config_shows_the_proxies_and_each_sections_proxy_protocol():
    out = run_cli("check-config", env=gridgate_env(GRIDGATE_SERVICE_TRUSTED_PROXIES="10.0.0.0/8, 2001:db8::/32",
                                                   GRIDGATE_MQTT_PROXY_PROTOCOL="v2",
                                                   GRIDGATE_HTTP_PROXY_PROTOCOL="v1"))
    assert out.returncode == 0, out.stderr
    shown = tomllib.loads(out.stdout)
    assert shown["service"]["trusted_proxies"] == ["10.0.0.0/8", "2001:db8::/32"]
    assert shown["service"]["proxy_header_timeout_s"] == 5.0
    assert [shown[s]["proxy_protocol"] for s in ("mqtt", "http", "websocket")] == ["v2", "v1", "off"]


def test_proxy_protocol_without_trusted_proxies_and_bad_cidrs_are_named():
    with pytest.raises(ConfigError) as caught:
        Config.load(env={**IDENTITY, "GRIDGATE_WEBSOCKET_PROXY_PROTOCOL": "v1", "GRIDGATE_MQTT_PROXY_PROTOCOL": "v2"})
    assert caught.value.problems == [
        "mqtt.proxy_protocol, websocket.proxy_protocol is set but service.trusted_proxies is empty: name the load "
        "balancers' addresses (CIDRs) whose PROXY headers are believed"]
    with pytest.raises(ConfigError) as caught:
        Config.load(env={**IDENTITY, "GRIDGATE_SERVICE_TRUSTED_PROXIES": "10.0.0.0/33,lb.example,192.0.2.1",
                         "GRIDGATE_HTTP_PROXY_PROTOCOL": "v3"})
    assert caught.value.problems == [
        "http.proxy_protocol (from GRIDGATE_HTTP_PROXY_PROTOCOL): Invalid enum value 'v3' (got 'v3')",
        "service.trusted_proxies: '10.0.0.0/33' is not an address or CIDR (e.g. 10.0.0.0/8, ::1)",
        "service.trusted_proxies: 'lb.example' is not an address or CIDR (e.g. 10.0.0.0/8, ::1)",
    ]


def test_a_cli_serve_refuses_it_with_exit_2(tmp_path):
    out = run_cli("serve", "--data-dir", str(tmp_path), env=gridgate_env(GRIDGATE_MQTT_PROXY_PROTOCOL="v2"))
    assert out.returncode == 2
    assert "mqtt.proxy_protocol is set but service.trusted_proxies is empty" in out.stderr
