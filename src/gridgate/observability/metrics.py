"""Prometheus metrics of one gateway.

Each Gateway owns its own CollectorRegistry, so several gateways can live in
one process (tests, embedding) without their counters colliding. Hot paths
increment once per socket read or per batch, never per byte.

The workers of ``gridgate serve --workers N`` run in prometheus-client's
multiprocess mode: their supervisor sets PROMETHEUS_MULTIPROC_DIR, every
value lives in a file there, and /metrics on any worker reports the sum over
all of them (gauges: over the live ones). The JetStream collector is the
exception: read from the worker's own sink, so per worker.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Protocol, runtime_checkable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

__all__ = ["Metrics", "JetStreamCounters"]


@runtime_checkable
class JetStreamCounters(Protocol):
    """The counts the NATS JetStream sink keeps (``gridgate.sinks.nats.NATSSink``)."""

    @property
    def published(self) -> int: ...
    @property
    def duplicates(self) -> int: ...
    @property
    def messages(self) -> int: ...
    @property
    def publishes(self) -> int: ...
    @property
    def retries(self) -> int: ...
    @property
    def inflight(self) -> int: ...


class _JetStreamCollector(Collector):
    """The JetStream sink's own counters, read when /metrics is scraped.

    Read at scrape time rather than mirrored into Counter objects: the sink
    counts on its asyncio thread and per write already, so the hot path
    pays nothing more, and a sink opened later (after a failed start) or
    none at all is simply what the source returns then.
    """

    def __init__(self, source: Callable[[], object]) -> None:
        self._source = source

    def describe(self) -> Iterable[Metric]:
        # the names, so the registry refuses a clash at register time whatever the sink is then
        return self._families(None)

    def collect(self) -> Iterable[Metric]:
        sink = self._source()
        if isinstance(sink, JetStreamCounters):
            return self._families(sink)
        return []

    @staticmethod
    def _families(sink: JetStreamCounters | None) -> list[Metric]:
        out: list[Metric] = []
        for name, doc, value in (
                ("gridgate_nats_published_readings", "Readings JetStream acknowledged (successful writes; "
                 "duplicates included)", None if sink is None else sink.published),
                ("gridgate_nats_duplicate_readings", "Readings in messages JetStream acknowledged as duplicates "
                 "(Nats-Msg-Id seen within the duplicate window)", None if sink is None else sink.duplicates),
                ("gridgate_nats_messages", "Messages JetStream acknowledged (successful writes; with "
                 "readings_per_message > 1 a message carries several readings)",
                 None if sink is None else sink.messages),
                ("gridgate_nats_publishes", "Publish attempts sent to JetStream (a retry counts again)",
                 None if sink is None else sink.publishes),
                ("gridgate_nats_retries", "Publish attempts that were retries (no ack in time, disconnect, "
                 "transient JetStream error)", None if sink is None else sink.retries)):
            family = CounterMetricFamily(name, doc)
            if value is not None:
                family.add_metric([], value)
            out.append(family)
        inflight = GaugeMetricFamily("gridgate_nats_publishes_in_flight",
                                     "Publishes sent to JetStream and waiting for their ack")
        if sink is not None:
            inflight.add_metric([], sink.inflight)
        out.append(inflight)
        return out


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.connections = Gauge(
            "gridgate_connections", "Live device connections", ["protocol"], registry=r,
            multiprocess_mode="livesum")
        self.connections_opened = Counter(
            "gridgate_connections_opened", "Connections accepted", ["protocol"], registry=r)
        self.connections_refused = Counter(
            "gridgate_connections_refused",
            "Connections refused at accept (max_connections, max_connections_per_ip, shedding)", ["protocol"],
            registry=r)
        self.connections_reaped = Counter(
            "gridgate_connections_reaped", "Connections dropped for silence", ["why"], registry=r)
        self.connections_taken_over = Counter(
            "gridgate_connections_taken_over", "Older connections closed by a new one with the same device id",
            ["protocol"], registry=r)
        self.protocol_errors = Counter(
            "gridgate_protocol_errors", "Connections closed for a protocol violation", ["protocol", "reason"],
            registry=r)
        self.accept_errors = Counter(
            "gridgate_accept_errors", "accept() failures: EMFILE and the like (backed off), handshakes that "
            "failed before accept (skipped)", ["errno"], registry=r)
        self.readings_accepted = Counter(
            "gridgate_readings_accepted", "Readings accepted and written", ["protocol"], registry=r)
        self.readings_rejected = Counter(
            "gridgate_readings_rejected", "Readings rejected and dead-lettered", ["protocol", "reason"], registry=r)
        self.batches = Counter(
            "gridgate_batches", "Batches written to the sink", registry=r)
        self.batch_records = Histogram(
            "gridgate_batch_records", "Records per written batch", registry=r,
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000))
        self.sink_write_seconds = Histogram(
            "gridgate_sink_write_seconds", "Sink write latency per batch", registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.sink_write_errors = Counter(
            "gridgate_sink_write_errors", "Failed sink writes (retried; nothing is dropped)", ["error"], registry=r)
        self.breaker_state = Gauge(
            "gridgate_sink_breaker_state", "Circuit breaker of the external sink: 0 closed, 1 half-open, 2 open",
            ["sink"], registry=r, multiprocess_mode="livemax")     # the worst worker's
        self.pending_records = Gauge(
            "gridgate_pending_records", "Records stored in the spool awaiting replay to the external sink",
            registry=r, multiprocess_mode="livesum")
        self.replayed_records = Counter(
            "gridgate_replayed_records", "Pending records replayed to the external sink", ["sink"], registry=r)
        self.external_write_seconds = Histogram(
            "gridgate_external_sink_write_seconds", "Write latency of the external sink (successful writes)",
            ["sink"], registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.commands_sent = Counter(
            "gridgate_commands_sent", "Downlink commands sent to a device (first sends)", ["protocol"], registry=r)
        self.commands_redelivered = Counter(
            "gridgate_commands_redelivered", "Downlink commands resent (MQTT DUP) for want of an ack",
            ["protocol"], registry=r)
        self.commands_acknowledged = Counter(
            "gridgate_commands_acknowledged", "Downlink commands the device acknowledged", ["protocol"], registry=r)
        self.command_acks_refused = Counter(
            "gridgate_command_acks_refused", "Command acknowledgements (MQTT 5 Response Topic) naming no command "
            "in flight or awaiting its answer: unknown, forged or expired", ["protocol"], registry=r)
        self.commands_expired = Counter(
            "gridgate_commands_expired", "Downlink commands given up: ttl, attempts used up, or disconnected",
            ["protocol", "reason"], registry=r)
        self.ws_closes = Counter(
            "gridgate_ws_closes", "WebSocket connections closed by the gateway, by close code", ["code"], registry=r)
        self.readings_unwritten_at_shutdown = Counter(
            "gridgate_readings_unwritten_at_shutdown", "Readings (records and rejections) still queued at "
            "shutdown that could not be written in time: lost, and logged", ["protocol"], registry=r)
        self.pipeline_queue = Gauge(
            "gridgate_pipeline_queue_items", "Work items waiting for the batcher", registry=r,
            multiprocess_mode="livesum")

        # -- security (DESIGN section 10); labels never carry a secret or an id
        self.auth_successes = Counter(
            "gridgate_auth_successes", "Successful authentications", ["protocol", "method"], registry=r)
        self.auth_failures = Counter(
            "gridgate_auth_failures", "Failed authentications, by reason", ["protocol", "reason"], registry=r)
        self.auth_cache_hits = Counter(
            "gridgate_auth_cache_hits", "Authentications answered from the cache of successful checks",
            ["protocol"], registry=r)
        self.auth_bans = Counter(
            "gridgate_auth_bans", "Source addresses banned for repeated authentication failures", registry=r)
        self.auth_banned_connections = Counter(
            "gridgate_auth_banned_connections", "Connections closed because their source address is banned",
            ["protocol"], registry=r)
        self.not_authorized = Counter(
            "gridgate_not_authorized", "Publishes, readings and subscriptions the ACL refused",
            ["protocol", "action"], registry=r)
        self.tls_handshake_failures = Counter(
            "gridgate_tls_handshake_failures", "TLS handshakes that failed", ["listener", "reason"], registry=r)
        self.tls_handshake_seconds = Histogram(
            "gridgate_tls_handshake_seconds", "Time to complete a TLS handshake", ["listener"], registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.proxy_protocol_refused = Counter(
            "gridgate_proxy_protocol_refused", "Connections to a proxy_protocol listener closed before a valid "
            "PROXY header from a trusted proxy", ["listener", "reason"], registry=r)
        self.credential_reloads = Counter(
            "gridgate_credential_reloads", "SIGHUP reloads of certificates, credentials, ACL and tokens",
            ["result"], registry=r)

        # -- flow control (DESIGN section 11); "limit" is a rule name or "_device"
        self.readings_limited = Counter(
            "gridgate_readings_limited", "Readings that found their bucket empty (paused or refused)",
            ["limit", "protocol"], registry=r)
        self.limit_paused_seconds = Counter(
            "gridgate_limit_paused_seconds", "Seconds connections stopped reading for a limit", ["limit"], registry=r)
        self.http_429 = Counter(
            "gridgate_http_429", "HTTP requests answered 429 for a limit", ["limit"], registry=r)
        self.bans = Counter(
            "gridgate_bans", "Bans issued, by reason", ["reason"], registry=r)
        self.banned_connects = Counter(
            "gridgate_banned_connects", "Connections refused because their client id or address is banned",
            ["protocol", "reason"], registry=r)
        self.connections_shed = Counter(
            "gridgate_connections_shed", "New connections refused while the sink's commit p99 is over the threshold",
            ["protocol"], registry=r)
        self.reloads = Counter(
            "gridgate_reloads", "SIGHUP reloads of the configuration, by result", ["result"], registry=r)
        self.connections_over_ip_limit = Counter(
            "gridgate_connections_over_ip_limit", "Connections refused: max_connections_per_ip reached",
            ["protocol"], registry=r)

    def watch_jetstream(self, source: Callable[[], object]) -> None:
        """Export the counters of the JetStream sink ``source()`` returns at each
        scrape (nothing while it returns None or another kind of sink)."""
        self._jetstream = _JetStreamCollector(source)
        self.registry.register(self._jetstream)

    _jetstream: _JetStreamCollector | None = None

    def render(self) -> bytes:
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not directory:
            return generate_latest(self.registry)
        # a worker of --workers N: every worker's values, from their files
        summed = CollectorRegistry()
        multiprocess.MultiProcessCollector(summed, directory)  # type: ignore[no-untyped-call]
        if self._jetstream is not None:
            summed.register(self._jetstream)
        return generate_latest(summed)
