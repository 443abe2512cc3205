"""Configuration: TOML file, then ``GRIDGATE_<SECTION>_<KEY>`` environment
variables, then command-line flags (DESIGN section 2).

Every problem is collected and reported at once (``ConfigError.problems``):
a operator fixing a config file should not have to rerun the gateway once per
mistake. ``ENVIRONMENT`` and ``SERVICE_NAME`` (or ``[service]`` keys) are
required, as in the platform this gateway fronts: a process that does not
know which environment it serves must not start.
"""
from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from gridgate.downlink.device_configs import device_config_problems, load_device_configs
from gridgate.ingest.rules import DEFAULT_FIELD_RULES, FieldRule, PayloadLimits, PayloadRules

__all__ = [
    "Config", "ConfigError", "ServiceConfig", "MQTTConfig", "HTTPConfig", "ConnectionsConfig",
    "PipelineConfig", "PayloadConfig", "SinkConfig", "SpoolConfig", "WebSocketConfig", "DownlinkConfig",
    "AuthConfig", "AdminConfig", "TLSConfig", "LimitsConfig", "LimitRule", "ClusterConfig", "parse_address",
    "is_loopback_host",
]

PositiveInt = Annotated[int, Meta(ge=1)]
NonNegInt = Annotated[int, Meta(ge=0)]
PositiveFloat = Annotated[float, Meta(gt=0)]


class ConfigError(Exception):
    """The configuration is unusable; ``problems`` lists every reason."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


class ServiceConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    environment: str = ""
    service_name: str = ""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    summary_interval_s: PositiveFloat = 60.0
    # gateway processes on the same ports under a supervisor (gridgate.cluster);
    # "auto": one per CPU; 1: a lone gateway, no supervisor
    workers: Annotated[int, Meta(ge=1, le=1024)] | Literal["auto"] = 1
    # Load balancers (CIDRs) whose connections may begin with a PROXY protocol
    # header; a listener with proxy_protocol set takes connections from these only.
    trusted_proxies: list[str] = msgspec.field(default_factory=list)
    # a trusted proxy's header must be complete within this, or the connection is closed
    proxy_header_timeout_s: PositiveFloat = 5.0


class MQTTConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    listen: str = "127.0.0.1:1883"
    tls_listen: str = ""                             # MQTT over TLS (mqtts), e.g. "0.0.0.0:8883"
    # "v1" or "v2": both listeners of this section take only connections from
    # [service] trusted_proxies that begin with that PROXY protocol header
    proxy_protocol: Literal["off", "v1", "v2"] = "off"
    max_packet_bytes: Annotated[int, Meta(ge=64, le=268_435_460)] = 1_048_576
    receive_bytes: Annotated[int, Meta(ge=512, le=16_777_216)] = 65_536
    # Unacknowledged outgoing bytes per connection before we stop reading it.
    max_outgoing_bytes: Annotated[int, Meta(ge=1024)] = 1_048_576
    # MQTT 5 (DESIGN section 4), sent in CONNACK: QoS 1/2 publishes a client
    # may have unacknowledged (more: DISCONNECT 0x93); topic aliases it may set
    # (0 = none); the longest keepalive served (0 = the client's), lowering a
    # longer one by Server Keep Alive.
    receive_maximum: Annotated[int, Meta(ge=1, le=65_535)] = 1024
    topic_alias_maximum: Annotated[int, Meta(ge=0, le=65_535)] = 16
    max_keepalive_s: Annotated[int, Meta(ge=0, le=65_535)] = 0


class HTTPConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    listen: str = "127.0.0.1:8080"
    tls_listen: str = ""                             # HTTPS, e.g. "0.0.0.0:8443"
    # "v1" or "v2": both listeners of this section take only connections from
    # [service] trusted_proxies that begin with that PROXY protocol header
    proxy_protocol: Literal["off", "v1", "v2"] = "off"
    # "fast": the compiled parser and validator; "std": h11 and the pure-Python
    # validator (DESIGN section 5). Same behaviour, different inner workings.
    engine: Literal["fast", "std"] = "fast"
    header_timeout_s: PositiveFloat = 10.0
    body_timeout_s: PositiveFloat = 30.0
    max_body_bytes: PositiveInt = 1_048_576          # also the limit after gzip decompression
    max_header_bytes: Annotated[int, Meta(ge=1024)] = 16_384
    durable_timeout_s: PositiveFloat = 30.0          # longest wait for the sink before 503


class WebSocketConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    listen: str = "127.0.0.1:8083"
    tls_listen: str = ""                             # wss, e.g. "0.0.0.0:8084"
    # "v1" or "v2": both listeners of this section take only connections from
    # [service] trusted_proxies that begin with that PROXY protocol header
    proxy_protocol: Literal["off", "v1", "v2"] = "off"
    # A bigger message closes the connection with 1009 (also bounds one MQTT
    # packet carried over /mqtt, which may span several messages).
    max_message_bytes: Annotated[int, Meta(ge=1024, le=268_435_456)] = 1_048_576
    # Server pings keep NAT paths open and let a live-but-quiet device's pong
    # count as a heartbeat; 0 = no server pings (client pings still count).
    ping_interval_s: Annotated[float, Meta(ge=0)] = 30.0
    handshake_timeout_s: PositiveFloat = 10.0        # the HTTP upgrade must complete within this
    # Seq acks owed to one /v1/ws connection before we stop reading it.
    max_pending_acks: Annotated[int, Meta(ge=1, le=1_000_000)] = 1024


class DownlinkConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    # A command not acknowledged this long after it was accepted is expired.
    command_ttl_s: PositiveFloat = 60.0
    # MQTT: resend with DUP=1 this often until PUBACK, at most max_attempts sends.
    command_retry_s: PositiveFloat = 10.0
    command_max_attempts: Annotated[int, Meta(ge=1, le=1000)] = 5
    # Commands per connection waiting to be sent or acknowledged; more get 503.
    max_queued: Annotated[int, Meta(ge=1, le=10_000)] = 64
    max_command_bytes: Annotated[int, Meta(ge=64, le=16_777_216)] = 65_536
    # TOML or JSON table {device id: config}; pushed as UPDATE_CONFIG on connect
    # together with [devices."<id>"] tables (read once, at start).
    devices_file: str = ""


class ConnectionsConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    idle_timeout_s: PositiveFloat = 300.0
    reap_interval_s: PositiveFloat = 30.0
    # 0 = as many as the open-file limit allows (with room for the spool
    # and the listeners); larger values are capped to that.
    max_connections: NonNegInt = 0


class PipelineConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    # One batch is written at a time, so under a backlog (a QoS 0 flood, bulk
    # HTTP posts) each batch carries the write's fixed costs: its rows built,
    # the writer thread's commit, and the loop noticing it is done, about
    # 1-2 ms. At 1000 that cycle, not the readers, capped QoS 0 at 334-381k
    # readings/s on 2 cores (the readers idled 17% of the time, held back by
    # a full queue); at 5000, 425-452k in the same runs. Closed-loop clients
    # (QoS 1 windows, request/response HTTP) never have that many in flight,
    # so their batches are the same either way; InfluxDB writes at most 5000
    # lines per request too.
    batch_max_records: Annotated[int, Meta(ge=1, le=100_000)] = 5000
    # 0: no timer. The write in progress is the window of the next batch
    # (group commit); waiting for company after a lull put up to this much
    # on every closed-loop client's round trip (wrk, 64 connections: 7.0k
    # requests/s at 2 ms, 9.8-13k at 0).
    batch_max_delay_ms: Annotated[float, Meta(ge=0, le=10_000)] = 0.0
    ack: Literal["durable", "received"] = "durable"
    # Bound of the queue between sessions and the batcher, in work items
    # (one item = what one socket read produced). A full queue stops readers.
    queue_max_items: Annotated[int, Meta(ge=1, le=1_000_000)] = 1024
    # ... and of the readings those items carry (QoS 0 reads are big).
    queue_max_records: Annotated[int, Meta(ge=1, le=10_000_000)] = 20_000


class PayloadConfig(PayloadLimits, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[payload]``: its keys, types and bounds are the validator's (``PayloadLimits``)."""


class SinkConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    kind: Literal["spool", "influxdb", "nats"] = "spool"
    # External sinks (and custom ones) sit behind a circuit breaker with the
    # spool underneath as the store-and-forward buffer (gridgate.sinks.forwarding).
    write_timeout_s: PositiveFloat = 10.0            # a slower write counts as a failure
    failure_threshold: Annotated[int, Meta(ge=1, le=1000)] = 3   # consecutive failures that open it
    open_s: PositiveFloat = 5.0                      # cool-down before a half-open probe
    replay_batch_records: Annotated[int, Meta(ge=1, le=100_000)] = 1000
    replay_max_records_per_s: PositiveFloat = 20_000.0   # leaves the sink room for live traffic


class InfluxDBConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    url: str = "http://127.0.0.1:8086"
    database: str = "telemetry"
    measurement: str = "telemetry"
    max_lines: Annotated[int, Meta(ge=1, le=100_000)] = 5000   # lines per HTTP request
    # Tag a reading that came with a W3C traceparent (MQTT 5) with trace_id:
    # one series per trace, so only on purpose.
    trace_tag: bool = False


class NATSConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    servers: list[str] = msgspec.field(default_factory=lambda: ["nats://127.0.0.1:4222"])
    stream: str = "TELEMETRY"
    subject: str = "telemetry.{region}.{device_id}"
    replicas: Annotated[int, Meta(ge=1, le=5)] = 1
    duplicate_window_s: PositiveFloat = 120.0        # JetStream drops a replayed Nats-Msg-Id within this
    # 1: one message per reading. N > 1: the records of a write grouped by
    # subject, at most N per message (a MessagePack array; gridgate.sinks.nats).
    readings_per_message: Annotated[int, Meta(ge=1, le=10_000)] = 1


class ClusterConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``[cluster]``: gateways that act as one over NATS (DESIGN section 12; gridgate.cluster.node)."""

    # empty: no cluster (a lone gateway; with --workers N > 1 the supervisor
    # starts a private nats-server and fills this in for its workers)
    nats_servers: list[str] = msgspec.field(default_factory=list)
    node: str = ""                                   # default hostname-pid
    subject_prefix: str = "gridgate.cluster"
    heartbeat_s: Annotated[float, Meta(ge=0.05, le=60)] = 1.0
    # a node silent this long is dead: its devices are forgotten
    presence_timeout_s: Annotated[float, Meta(ge=0.2, le=600)] = 5.0
    request_timeout_s: Annotated[float, Meta(ge=0.05, le=60)] = 2.0
    connect_timeout_s: PositiveFloat = 10.0


class SpoolConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    data_dir: str = "./gridgate-data"
    max_bytes: NonNegInt = 0          # 0 = unlimited
    fsync: bool = False


class AuthConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``[auth]``: credential stores, the ACL and what failures cost (DESIGN section 10)."""

    # A listener on a non-loopback address needs a credential store, or this
    # set on purpose (mosquitto 2.0's rule).
    allow_anonymous: bool = False
    password_file: str = ""                          # mosquitto_passwd's format ($7$ and $6$)
    jwt_keys_file: str = ""                          # TOML or JSON {id: PEM | [PEM, ...]}
    jwt_audience: str = "gridgate"
    jwt_max_lifetime_s: Annotated[int, Meta(ge=1, le=31_536_000)] = 86_400
    acl_file: str = ""                               # mosquitto's acl_file format
    failure_delay_ms: Annotated[int, Meta(ge=0, le=60_000)] = 1000
    failures_before_ban: Annotated[int, Meta(ge=1, le=1_000_000)] = 10
    failure_window_s: PositiveFloat = 60.0
    ban_s: Annotated[float, Meta(ge=0)] = 300.0
    cache_s: Annotated[float, Meta(ge=0)] = 300.0    # successful checks remembered this long


class AdminConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``[admin]``: who may use the admin API (DESIGN section 10)."""

    tokens_file: str = ""                            # TOML [[token]] {name, sha256, scopes}
    metrics_token_required: bool = False


class TLSConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``[tls]``: the certificate of every TLS listener, and client certificates."""

    cert_file: str = ""                              # PEM, ECDSA or RSA (chain after the leaf)
    key_file: str = ""
    client_ca_file: str = ""                         # CAs that sign device certificates (mutual TLS)
    require_client_cert: bool = False
    crl_file: str = ""                               # PEM CRLs of client_ca_file's CAs
    identity: Literal["cn", "san"] = "cn"            # which certificate name is the device id
    min_version: Literal["1.2", "1.3"] = "1.2"
    handshake_timeout_s: PositiveFloat = 10.0


RULE_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.@#-]{0,63}$"


class LimitRule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[[limits.rule]]``: one bucket shared by every reading the rule matches
    (the seed's ``protocol@vendor#region`` resources). An absent selector matches all."""

    name: Annotated[str, Meta(pattern=RULE_NAME_RE)]
    protocol: Literal["mqtt", "mqtt-ws", "http", "ws"] | None = None
    vendor: str | None = None
    region: str | None = None
    device: str | None = None                        # a glob: "meter-*"
    readings_per_s: PositiveFloat
    burst: Annotated[int, Meta(ge=0)] = 0            # 0 = one second's worth


class LimitsConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``[limits]``: flow control and abuse resistance (DESIGN section 11); 0 = off."""

    device_readings_per_s: Annotated[float, Meta(ge=0)] = 0.0
    device_readings_burst: NonNegInt = 0             # 0 = one second's worth
    device_bytes_per_s: Annotated[float, Meta(ge=0)] = 0.0
    device_bytes_burst: NonNegInt = 0
    # MQTT 5 clients over a limit: "reject" answers a QoS 1/2 PUBLISH with
    # PUBACK/PUBREC 0x97 instead of pausing (QoS 0 and 3.1.1 are paused).
    mqtt5_on_limit: Literal["pause", "reject"] = "pause"
    accept_rate_per_s: Annotated[float, Meta(ge=0)] = 0.0
    max_connections_per_ip: NonNegInt = 0
    flapping_max_connects: Annotated[int, Meta(ge=1, le=1_000_000)] = 15
    flapping_window_s: PositiveFloat = 60.0
    flapping_ban_s: Annotated[float, Meta(ge=0)] = 300.0    # 0 = flapping detection off
    shed_commit_latency_ms: Annotated[float, Meta(ge=0)] = 0.0
    # Bounds of the per-device and per-client-id tables: the least recently
    # seen entries go first (a flood of fresh ids cannot grow memory).
    max_tracked: Annotated[int, Meta(ge=100, le=10_000_000)] = 200_000
    rule: list[LimitRule] = msgspec.field(default_factory=list)


_SECTIONS: dict[str, type[msgspec.Struct]] = {
    "service": ServiceConfig,
    "mqtt": MQTTConfig,
    "http": HTTPConfig,
    "websocket": WebSocketConfig,
    "downlink": DownlinkConfig,
    "connections": ConnectionsConfig,
    "pipeline": PipelineConfig,
    "payload": PayloadConfig,
    "sink": SinkConfig,
    "spool": SpoolConfig,
    "influxdb": InfluxDBConfig,
    "nats": NATSConfig,
    "cluster": ClusterConfig,
    "auth": AuthConfig,
    "admin": AdminConfig,
    "tls": TLSConfig,
    "limits": LimitsConfig,
}


class Config(msgspec.Struct, kw_only=True):
    """The whole effective configuration. ``Config()`` is the embedded default
    (service identity still has to come from somewhere: see ``validate``)."""

    service: ServiceConfig = msgspec.field(default_factory=ServiceConfig)
    mqtt: MQTTConfig = msgspec.field(default_factory=MQTTConfig)
    http: HTTPConfig = msgspec.field(default_factory=HTTPConfig)
    websocket: WebSocketConfig = msgspec.field(default_factory=WebSocketConfig)
    downlink: DownlinkConfig = msgspec.field(default_factory=DownlinkConfig)
    # [devices."<id>"]: per-device config pushed as UPDATE_CONFIG on connect
    devices: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    connections: ConnectionsConfig = msgspec.field(default_factory=ConnectionsConfig)
    pipeline: PipelineConfig = msgspec.field(default_factory=PipelineConfig)
    payload: PayloadConfig = msgspec.field(default_factory=PayloadConfig)
    fields: dict[str, FieldRule] = msgspec.field(default_factory=lambda: dict(DEFAULT_FIELD_RULES))
    sink: SinkConfig = msgspec.field(default_factory=SinkConfig)
    spool: SpoolConfig = msgspec.field(default_factory=SpoolConfig)
    influxdb: InfluxDBConfig = msgspec.field(default_factory=InfluxDBConfig)
    nats: NATSConfig = msgspec.field(default_factory=NATSConfig)
    cluster: ClusterConfig = msgspec.field(default_factory=ClusterConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    admin: AdminConfig = msgspec.field(default_factory=AdminConfig)
    tls: TLSConfig = msgspec.field(default_factory=TLSConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)

    # -- construction -----------------------------------------------------

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> Config:
        """Build the effective config from a TOML file (optional), the
        environment (``os.environ`` by default) and overrides (the CLI flags,
        as ``{"section": {"key": value}}``), then validate it.

        Raises:
            ConfigError: listing every problem found.
        """
        env = os.environ if env is None else env
        problems: list[str] = []
        raw: dict[str, Any] = {}
        if path is not None:
            try:
                with open(path, "rb") as f:
                    raw = tomllib.load(f)
            except FileNotFoundError:
                raise ConfigError([f"config file {os.fspath(path)!r} does not exist"]) from None
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError([f"config file {os.fspath(path)!r}: {exc}"]) from None

        sections: dict[str, dict[str, Any]] = {}
        field_rules = dict(DEFAULT_FIELD_RULES)
        devices: dict[str, Any] = {}
        for name, value in raw.items():
            if name == "fields":
                _merge_field_rules(value, field_rules, problems)
            elif name == "devices":
                # checked with the devices_file in problems(), below
                devices = value if isinstance(value, dict) else {}
                if not isinstance(value, dict):
                    problems.append('devices: must be tables [devices."<device id>"]')
            elif name not in _SECTIONS:
                problems.append(f"[{name}]: unknown section "
                                f"(known: {', '.join(sorted([*_SECTIONS, 'fields', 'devices']))})")
            elif not isinstance(value, dict):
                problems.append(f"{name}: must be a table ([{name}])")
            else:
                sections[name] = dict(value)

        # ENVIRONMENT / SERVICE_NAME are the platform-wide names (the seed's
        # services read exactly these); GRIDGATE_SERVICE_* below wins over them.
        svc = sections.setdefault("service", {})
        if "ENVIRONMENT" in env:
            svc["environment"] = env["ENVIRONMENT"]
        if "SERVICE_NAME" in env:
            svc["service_name"] = env["SERVICE_NAME"]

        for key, value in env.items():
            if not key.startswith("GRIDGATE_"):
                continue
            rest = key[len("GRIDGATE_"):].lower()
            section = next((s for s in _SECTIONS if rest.startswith(s + "_")), None)
            if section is None:
                if rest.startswith("fields_") or key in _NON_CONFIG_ENV:
                    continue
                problems.append(f"environment {key}: no such config section")
                continue
            sections.setdefault(section, {})[rest[len(section) + 1:]] = _EnvValue(key, value)

        for section, values in (overrides or {}).items():
            for k, v in values.items():
                if v is not None:
                    sections.setdefault(section, {})[k] = v

        built: dict[str, Any] = {}
        for name, struct_type in _SECTIONS.items():
            built[name] = _build_section(name, struct_type, sections.get(name, {}), problems)
        # Keys that failed to convert were left at their defaults, so the
        # semantic checks still run and the operator sees every problem.
        config = cls(fields=field_rules, devices=devices, **built)
        problems.extend(config.problems())
        if problems:
            raise ConfigError(problems)
        return config

    # -- checks -----------------------------------------------------------

    def problems(self) -> list[str]:
        """Every semantic problem of this config (types were checked on load)."""
        out: list[str] = []
        if not self.service.environment:
            out.append("service.environment is not set "
                       "(set ENVIRONMENT, GRIDGATE_SERVICE_ENVIRONMENT or [service] environment)")
        if not self.service.service_name:
            out.append("service.service_name is not set "
                       "(set SERVICE_NAME, GRIDGATE_SERVICE_SERVICE_NAME or [service] service_name)")
        for section, key, value in self._listen_addresses():
            try:
                parse_address(value)
            except ValueError as exc:
                out.append(f"{section}.{key}: {exc}")
        exposed = self.exposed_listeners()
        if any(getattr(self, s).tls_listen for s in ("mqtt", "http", "websocket")):
            if not self.tls.cert_file or not self.tls.key_file:
                out.append("a tls_listen is set but tls.cert_file and tls.key_file are not")
        out.extend(self._proxy_problems())
        if self.tls.require_client_cert and not self.tls.client_ca_file:
            out.append("tls.require_client_cert needs tls.client_ca_file")
        if self.tls.crl_file and not self.tls.client_ca_file:
            out.append("tls.crl_file needs tls.client_ca_file")
        names = [rule.name for rule in self.limits.rule]
        for name in sorted({n for n in names if names.count(n) > 1}):
            out.append(f"limits.rule: the name {name!r} is used more than once (each names its own metrics)")
        if exposed and not self.has_credential_store and not self.auth.allow_anonymous:
            out.append(f"{', '.join(exposed)} is not a loopback address and no credential store is set: "
                       "set auth.password_file, auth.jwt_keys_file or tls.client_ca_file, "
                       "or auth.allow_anonymous = true to serve anyone on purpose")
        if self.cluster.presence_timeout_s < 2 * self.cluster.heartbeat_s:
            out.append("cluster.presence_timeout_s must be at least twice cluster.heartbeat_s "
                       "(one late heartbeat must not declare a node dead)")
        prefix = self.cluster.subject_prefix
        if not prefix or any(not t or any(c in t for c in " *>\t") for t in prefix.split(".")):
            out.append(f"cluster.subject_prefix {prefix!r} must be dot-separated NATS subject tokens without wildcards")
        if self.connections.reap_interval_s > self.connections.idle_timeout_s:
            out.append("connections.reap_interval_s must not exceed connections.idle_timeout_s")
        if not self.payload.location_levels or any(not lvl for lvl in self.payload.location_levels):
            out.append("payload.location_levels must be a non-empty list of non-empty names")
        for name, rule in self.fields.items():
            if rule.min is not None and rule.max is not None and rule.min > rule.max:
                out.append(f"fields.{name}: min {rule.min} is greater than max {rule.max}")
        out.extend(device_config_problems(self.devices, self.downlink.devices_file, self.downlink.max_command_bytes))
        return out

    def _proxy_problems(self) -> list[str]:
        out = []
        for cidr in self.service.trusted_proxies:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                out.append(f"service.trusted_proxies: {cidr!r} is not an address or CIDR (e.g. 10.0.0.0/8, ::1)")
        proxied = [f"{section}.proxy_protocol" for section in ("mqtt", "http", "websocket")
                   if getattr(self, section).proxy_protocol != "off"]
        if proxied and not self.service.trusted_proxies:
            out.append(f"{', '.join(proxied)} is set but service.trusted_proxies is empty: name the load balancers' "
                       "addresses (CIDRs) whose PROXY headers are believed")
        return out

    def _listen_addresses(self) -> list[tuple[str, str, str]]:
        return [(section, key, getattr(getattr(self, section), key))
                for section in ("mqtt", "http", "websocket") for key in ("listen", "tls_listen")]

    def exposed_listeners(self) -> list[str]:
        """``section.key=HOST:PORT`` of every listener bound to a non-loopback
        address (one that does not parse is a problem, not listed here)."""
        out = []
        for section, key, value in self._listen_addresses():
            try:
                address = parse_address(value)
            except ValueError:
                continue
            if address is not None and not is_loopback_host(address[0]):
                out.append(f"{section}.{key}={value}")
        return out

    @property
    def has_credential_store(self) -> bool:
        """Whether any way to authenticate a device is configured."""
        return bool(self.auth.password_file or self.auth.jwt_keys_file or self.tls.client_ca_file)

    def device_configs(self) -> dict[str, dict[str, Any]]:
        """``[devices.*]`` merged with ``[downlink] devices_file`` (read now).

        Raises:
            ConfigError: a device id, a config or the file is unusable.
        """
        configs, problems = load_device_configs(self.devices, self.downlink.devices_file,
                                                self.downlink.max_command_bytes)
        if problems:
            raise ConfigError(problems)
        return configs

    def validate(self) -> None:
        """Raise ConfigError if ``problems()`` finds any."""
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    def payload_rules(self) -> PayloadRules:
        """The validator's rules: ``[payload]`` limits plus ``[fields.*]``."""
        return PayloadRules(fields=dict(self.fields), **msgspec.structs.asdict(self.payload))

    def to_toml(self) -> str:
        """The effective config as TOML (for ``gridgate check-config``)."""
        lines: list[str] = []
        for name in _SECTIONS:
            lines.append(f"[{name}]")
            for key, value in msgspec.to_builtins(getattr(self, name)).items():
                lines.append(f"{key} = {_toml_value(value)}")
            lines.append("")
        for name, rule in self.fields.items():
            lines.append(f"[fields.{_toml_key(name)}]")
            for key, value in msgspec.to_builtins(rule).items():
                if value is None:
                    continue
                lines.append(f"{key} = {_toml_value(value)}")
            lines.append("")
        for device_id, device_config in self.devices.items():
            lines.append(f"[devices.{_toml_key(device_id)}]")
            for key, value in device_config.items():
                lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
            lines.append("")
        return "\n".join(lines)


# Environment variables gridgate reads that are not config keys.
_NON_CONFIG_ENV = {"GRIDGATE_PURE_PYTHON"}


class _EnvValue:
    """A string from the environment: converted leniently to the key's type."""

    __slots__ = ("name", "text")

    def __init__(self, name: str, text: str) -> None:
        self.name = name
        self.text = text


def _build_section(name: str, struct_type: type[msgspec.Struct], values: dict[str, Any], problems: list[str]) -> Any:
    known = {f.name: f for f in msgspec.structs.fields(struct_type)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        where = f"{name}.{key}"
        if isinstance(value, _EnvValue):
            where = f"{name}.{key} (from {value.name})"
        if key not in known:
            problems.append(f"{where}: unknown key (known: {', '.join(sorted(known))})")
            continue
        ftype = known[key].type
        try:
            if isinstance(value, _EnvValue):
                text = value.text
                if _is_list_type(ftype):
                    parsed: Any = [s.strip() for s in text.split(",") if s.strip()]
                else:
                    parsed = text
                kwargs[key] = msgspec.convert(parsed, ftype, strict=False)
            else:
                kwargs[key] = msgspec.convert(value, ftype)
        except msgspec.ValidationError as exc:
            problems.append(f"{where}: {exc} (got {_show(value)})")
    try:
        return struct_type(**kwargs)
    except (TypeError, msgspec.ValidationError) as exc:  # pragma: no cover - all keys were checked above
        problems.append(f"{name}: {exc}")
        return struct_type()


def _merge_field_rules(value: Any, rules: dict[str, FieldRule], problems: list[str]) -> None:
    if not isinstance(value, dict):
        problems.append("fields: must be tables [fields.<name>]")
        return
    for name, spec in value.items():
        try:
            rules[name] = msgspec.convert(spec, FieldRule)
        except msgspec.ValidationError as exc:
            problems.append(f"fields.{name}: {exc}")


def _is_list_type(tp: Any) -> bool:
    return getattr(tp, "__origin__", None) in (list, tuple)


def _show(value: Any) -> str:
    return repr(value.text if isinstance(value, _EnvValue) else value)


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else msgspec.json.encode(key).decode()


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return msgspec.json.encode(value).decode()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # nested device config: an inline table
        # TOML has no null: an absent key is the default
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items() if v is not None) + "}"
    raise TypeError(f"cannot render {value!r} as TOML")


def is_loopback_host(host: str) -> bool:
    """Whether a listen host only accepts connections from this machine.

    A name other than ``localhost`` counts as exposed: what it resolves to can
    change under us.
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_address(text: str) -> tuple[str, int] | None:
    """``"HOST:PORT"`` -> (host, port); ``""`` -> None (listener disabled).

    IPv6 hosts go in brackets: ``"[::1]:1883"``. Port 0 binds an ephemeral port.
    """
    if text == "":
        return None
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{text!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{text!r}: port {port} is out of range 0..65535")
    return host, port
