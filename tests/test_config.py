"""Config: TOML + GRIDGATE_<SECTION>_<KEY> + flags, every problem at once."""
from __future__ import annotations

import pytest

from gatewayproc import gridgate_env, run_cli
from gridgate.config import Config, ConfigError, is_loopback_host, parse_address
from gridgate.ingest.rules import FieldRule

IDENTITY = {"ENVIRONMENT": "test", "SERVICE_NAME": "gg"}


def test_embedded_default_needs_only_the_service_identity():
    config = Config.load(env=IDENTITY)
    assert config.mqtt.listen == "127.0.0.1:1883"
    assert config.connections.idle_timeout_s == 300
    assert config.connections.reap_interval_s == 30
    assert config.pipeline.ack == "durable"
    assert config.spool.data_dir == "./gridgate-data"
    assert config.fields["temperature"] == FieldRule(min=-40.0, max=125.0)


def test_missing_identity_and_bad_values_are_reported_together(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text('[mqtt]\nlisten = "nohostport"\n[connections]\nidle_timeout_s = -5\n'
                    '[pipeline]\nack = "maybe"\n[nonsense]\nx = 1\n[fields.humidity]\nmin = 10\nmax = 5\n')
    with pytest.raises(ConfigError) as info:
        Config.load(path, env={"GRIDGATE_MQTT_MAX_PACKET_BYTES": "lots"})
    problems = info.value.problems
    assert problems == [
        "[nonsense]: unknown section (known: admin, auth, cluster, connections, devices, downlink, fields, http, "
        "influxdb, limits, mqtt, nats, "
        "payload, pipeline, service, sink, spool, tls, websocket)",
        "mqtt.max_packet_bytes (from GRIDGATE_MQTT_MAX_PACKET_BYTES): Expected `int`, got `str` (got 'lots')",
        "connections.idle_timeout_s: Expected `float` > 0.0 (got -5)",
        "pipeline.ack: Invalid enum value 'maybe' (got 'maybe')",
        "service.environment is not set (set ENVIRONMENT, GRIDGATE_SERVICE_ENVIRONMENT or [service] environment)",
        "service.service_name is not set (set SERVICE_NAME, GRIDGATE_SERVICE_SERVICE_NAME or [service] service_name)",
        "mqtt.listen: 'nohostport' is not HOST:PORT",
        "fields.humidity: min 10.0 is greater than max 5.0",
    ]


def test_precedence_file_then_env_then_flags(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text('[service]\nenvironment = "file"\nservice_name = "svc"\n'
                    '[mqtt]\nlisten = "127.0.0.1:1000"\nreceive_bytes = 4096\n'
                    '[connections]\nidle_timeout_s = 100\n')
    env = {"GRIDGATE_MQTT_LISTEN": "127.0.0.1:2000", "GRIDGATE_CONNECTIONS_IDLE_TIMEOUT_S": "200",
           "GRIDGATE_PAYLOAD_LOCATION_LEVELS": "country, city"}
    config = Config.load(path, env=env, overrides={"connections": {"idle_timeout_s": 50.0}})
    assert config.service.environment == "file"
    assert config.mqtt.listen == "127.0.0.1:2000"      # env over file
    assert config.mqtt.receive_bytes == 4096           # file over default
    assert config.connections.idle_timeout_s == 50.0   # flag over env
    assert config.payload.location_levels == ("country", "city")


def test_platform_env_names_and_gridgate_names_for_identity():
    config = Config.load(env={"ENVIRONMENT": "prod", "SERVICE_NAME": "a",
                              "GRIDGATE_SERVICE_SERVICE_NAME": "b"})
    assert (config.service.environment, config.service.service_name) == ("prod", "b")


def test_field_rules_merge_with_defaults(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text('[fields.voltage_v]\nmin = 0\nmax = 480\n[fields.temperature]\nmin = -20\nmax = 60\n')
    config = Config.load(path, env=IDENTITY)
    rules = config.payload_rules()
    assert rules.fields["voltage_v"] == FieldRule(min=0.0, max=480.0)
    assert rules.fields["temperature"] == FieldRule(min=-20.0, max=60.0)
    assert rules.fields["battery_mv"] == FieldRule(min=0, max=65535, integer=True)


def test_unknown_key_names_the_known_ones(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text('[spool]\nmax_megabytes = 3\n')
    with pytest.raises(ConfigError) as info:
        Config.load(path, env=IDENTITY)
    assert info.value.problems == ["spool.max_megabytes: unknown key (known: data_dir, fsync, max_bytes)"]


def test_missing_and_unparsable_files(tmp_path):
    with pytest.raises(ConfigError) as info:
        Config.load(tmp_path / "absent.toml", env=IDENTITY)
    assert info.value.problems == [f"config file {str(tmp_path / 'absent.toml')!r} does not exist"]
    bad = tmp_path / "bad.toml"
    bad.write_text("[mqtt\n")
    with pytest.raises(ConfigError) as info:
        Config.load(bad, env=IDENTITY)
    assert info.value.problems[0].startswith(f"config file {str(bad)!r}: ")


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:1883", ("127.0.0.1", 1883)),
    ("[::1]:0", ("::1", 0)),
    ("", None),
])
def test_parse_address(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize("text, message", [
    ("1883", "'1883' is not HOST:PORT"),
    (":1883", "':1883' is not HOST:PORT"),
    ("host:port", "'host:port': port 'port' is not a number"),
    ("h:70000", "'h:70000': port 70000 is out of range 0..65535"),
])
def test_parse_address_rejects(text, message):
    with pytest.raises(ValueError) as info:
        parse_address(text)
    assert str(info.value) == message


def test_serve_without_identity_exits_2_listing_every_problem(tmp_path):
    env = gridgate_env()
    del env["ENVIRONMENT"], env["SERVICE_NAME"]
    out = run_cli("serve", "--mqtt", "bad", "--data-dir", str(tmp_path), env=env)
    assert out.returncode == 2
    assert "service.environment is not set" in out.stderr
    assert "service.service_name is not set" in out.stderr
    assert "mqtt.listen: 'bad' is not HOST:PORT" in out.stderr


def test_check_config_prints_the_effective_config():
    out = run_cli("check-config", env=gridgate_env(GRIDGATE_MQTT_LISTEN="127.0.0.1:9999"))
    assert out.returncode == 0, out.stderr
    assert '[mqtt]\nlisten = "127.0.0.1:9999"\n' in out.stdout
    assert '[service]\nenvironment = "test"\nservice_name = "gridgate-test"\n' in out.stdout
    # the printed config is itself a valid config file
    import tomllib
    assert tomllib.loads(out.stdout)["connections"]["idle_timeout_s"] == 300.0


def test_version_reports_the_compiled_hot_path():
    out = run_cli("--version")
    assert out.returncode == 0
    assert out.stdout.startswith("gridgate 0.1.0\nhot path: compiled (")
    assert ".so)" in out.stdout


def test_serving_process_tunes_the_cyclic_gc():
    import gc

    from gridgate.cli import GC_THRESHOLD0, tune_gc

    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == (GC_THRESHOLD0, *before[1:])
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


# -- secure by default (DESIGN section 10) ----------------------------------

@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.8.9.1", True), ("::1", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("10.1.2.3", False), ("gateway.example", False),
])
def test_is_loopback_host(host, loopback):
    assert is_loopback_host(host) is loopback


def test_exposed_listener_without_credentials_is_refused_with_one_line():
    with pytest.raises(ConfigError) as info:
        Config.load(env={**IDENTITY, "GRIDGATE_MQTT_LISTEN": "0.0.0.0:1883"})
    assert info.value.problems == [
        "mqtt.listen=0.0.0.0:1883 is not a loopback address and no credential store is set: "
        "set auth.password_file, auth.jwt_keys_file or tls.client_ca_file, "
        "or auth.allow_anonymous = true to serve anyone on purpose"]


@pytest.mark.parametrize("extra", [
    {"GRIDGATE_AUTH_ALLOW_ANONYMOUS": "true"},
    {"GRIDGATE_AUTH_PASSWORD_FILE": "/etc/gridgate/passwd"},
    {"GRIDGATE_AUTH_JWT_KEYS_FILE": "/etc/gridgate/keys.toml"},
])
def test_exposed_listener_with_a_credential_store_or_anonymous_on_purpose_starts(extra):
    config = Config.load(env={**IDENTITY, "GRIDGATE_HTTP_LISTEN": "0.0.0.0:8080", **extra})
    assert config.http.listen == "0.0.0.0:8080"


def test_tls_listener_needs_a_certificate():
    with pytest.raises(ConfigError) as info:
        Config.load(env={**IDENTITY, "GRIDGATE_MQTT_TLS_LISTEN": "127.0.0.1:8883",
                         "GRIDGATE_TLS_REQUIRE_CLIENT_CERT": "true"})
    assert info.value.problems == ["a tls_listen is set but tls.cert_file and tls.key_file are not",
                                   "tls.require_client_cert needs tls.client_ca_file"]


def test_serve_on_an_exposed_address_without_credentials_exits_2(tmp_path):
    out = run_cli("serve", "--mqtt", "0.0.0.0:0", "--data-dir", str(tmp_path), env=gridgate_env())
    assert out.returncode == 2
    assert "mqtt.listen=0.0.0.0:0 is not a loopback address and no credential store is set" in out.stderr
