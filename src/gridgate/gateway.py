"""The gateway: listeners, sessions, pipeline and sink wired together.

``serve(config)`` is the whole gateway as one Trio task (DESIGN section 7):
it binds every listener, reports ``task_status.started(gateway)`` only once
all of them accept, and runs until ``gateway.stop()`` (graceful: stop
accepting, stop reading, write what is queued, deliver owed acks, close) or
until cancelled (hard: whatever was accepted but not yet written is still
written before returning, acknowledged or not). Neither waits forever for a
sink: what is not written within DRAIN_TIMEOUT_S is kept in the spool as
pending when an external sink is the one that is slow, and otherwise
logged and counted (``gridgate_readings_unwritten_at_shutdown_total``) as
lost: never dropped silently.
"""
from __future__ import annotations

import errno
import logging
import os
import resource
import socket
import ssl
import sys
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from typing import Any, Protocol

import trio

# The accept() errors Trio's own SocketListener.accept skips (the peer's
# handshake failed between SYN and accept; the listener is fine). Private,
# but taken from Trio rather than copied so the burst path below (which
# calls accept() itself) skips exactly what Trio's path skips; should a Trio
# release move it, the list as of Trio 0.35 keeps the gateway importable.
try:
    from trio._highlevel_socket import _ignorable_accept_errnos
except ImportError:  # pragma: no cover - depends on the Trio release
    _ignorable_accept_errnos = {
        getattr(errno, name) for name in (
            "EPERM", "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN", "ENONET",
            "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH", "ENOSR", "ESOCKTNOSUPPORT", "EPROTONOSUPPORT",
            "ETIMEDOUT", "ECONNRESET",
        ) if hasattr(errno, name)
    }

from gridgate import hotpath
from gridgate.config import Config, ConfigError, parse_address
from gridgate.connections import ready_loop
from gridgate.connections.manager import ConnManager, Session
from gridgate.ingest.durable_timeouts import DurableTimeouts
from gridgate.ingest.pipeline import Pipeline, WorkItem
from gridgate.ingest.records import Record, Rejection
from gridgate.ingest.validator import validator, validator_py
from gridgate.limits.buckets import TokenBucket
from gridgate.limits.guard import FlowGuard
from gridgate.observability.metrics import Metrics
from gridgate.protocols.http.fast import serve_fast_http
from gridgate.protocols.http.std import serve_std_http
from gridgate.protocols.mqtt.session5 import VersionedMQTTConnection, refuse_at_accept, serve_mqtt_stream
from gridgate.protocols.proxied import FirstRefusals, ProxiedStream, TrustedProxies, accept_proxy_header
from gridgate.protocols.proxy_protocol import ProxyProtocolError
from gridgate.protocols.services import Services
from gridgate.protocols.websocket.session import serve_websocket_connection
from gridgate.security.admin_tokens import AdminGate, AdminTokens
from gridgate.security.authenticator import Authenticator, load_authenticator
from gridgate.security.tls import CertificateJudge, handshake as tls_handshake, peer_certificate, server_context
from gridgate.sinks.base import Sink
from gridgate.sinks.forwarding import Forwarder
from gridgate.storage.spool import SpoolSink

__all__ = ["Gateway", "ListenError", "serve", "raise_open_file_limit"]

log = logging.getLogger("gridgate")

# File descriptors kept free for the spool (db, WAL, shm, journal), the
# listeners, the log and the odd file a thread opens.
FD_RESERVE = 64

# accept() failures of the whole process, not of one peer: back off, keep
# serving the open connections, and try again.
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
# accept() failures of one connection: skip it and take the next.
_ACCEPT_SKIPPED_ERRNOS = frozenset(_ignorable_accept_errnos)

# Connections taken from the backlog per wake-up of an accept loop, at most,
# before it yields to the connections it already serves.
ACCEPT_BURST = 256

# How long a graceful stop waits for queued batches and owed acks, and how
# long the final write of what is still queued may take after that.
DRAIN_TIMEOUT_S = 10.0

# What an accept loop starts per connection (Gateway.handle_mqtt and the like).
StreamHandler = Callable[[trio.abc.Stream], Awaitable[None]]

# A client's (address, port) as a trusted proxy's PROXY header names it.
ClientAddress = tuple[str, int]


class ClientHandler(Protocol):
    """A StreamHandler that can be told the client's address (behind a PROXY
    protocol header the TCP peer is the load balancer, not the client)."""

    def __call__(self, stream: trio.abc.Stream, /, *, client: ClientAddress | None = None) -> Awaitable[None]: ...


# A protocol handler: serves one connection until it ends.
ServeFn = Callable[[trio.abc.Stream, Services, Session], Awaitable[None]]


def _serve_mqtt(stream: trio.abc.Stream, services: Services, session: Session) -> Coroutine[Any, Any, None]:
    return VersionedMQTTConnection(stream, services, session).run()     # no wrapping frame (see Gateway.handle_mqtt)


def raise_open_file_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:  # pragma: no cover - depends on the host
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, exc)
    return soft, hard


def effective_max_connections(configured: int, fd_limit: int) -> int:
    cap = max(1, fd_limit - FD_RESERVE)
    if configured == 0:
        return cap
    if configured > cap:
        log.warning("connections.max_connections=%d exceeds what %d open files allow; capping at %d",
                    configured, fd_limit, cap)
        return cap
    return configured


async def open_external_sink(config: Config) -> Sink:
    """The sink of ``[sink] kind`` (influxdb or nats), connected and ready.

    Imported here, not at module level: each needs its own client library.
    """
    if config.sink.kind == "influxdb":
        from gridgate.sinks.influxdb import InfluxDBSink
        influx = config.influxdb
        return await InfluxDBSink.open(influx.url, influx.database, influx.measurement,
                                       timeout_s=config.sink.write_timeout_s, max_lines=influx.max_lines,
                                       trace_tag=influx.trace_tag)
    if config.sink.kind == "nats":
        from gridgate.sinks.nats import NATSSink
        nats = config.nats
        return await NATSSink.open(servers=nats.servers, stream=nats.stream, subject=nats.subject,
                                   replicas=nats.replicas, duplicate_window_s=nats.duplicate_window_s,
                                   readings_per_message=nats.readings_per_message,
                                   write_timeout_s=config.sink.write_timeout_s,
                                   connect_timeout_s=config.sink.write_timeout_s)
    raise ValueError(f"sink kind {config.sink.kind!r} has no external sink")


class ListenError(OSError):
    """A listener could not bind: which one, on what address, and the OS error.

    ``errno`` and ``strerror`` are the OS error's; the message reads
    ``cannot listen on mqtt 127.0.0.1:1883: [Errno 98] Address already in use``.
    """

    def __init__(self, listener: str, address: str, error: OSError) -> None:
        super().__init__(*error.args)
        self.listener = listener
        self.address = address
        self.message = f"cannot listen on {listener} {address}: {error}"

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[type[ListenError], tuple[str, str, OSError]]:
        # OSError's own would call __init__ with the errno and strerror alone
        return (type(self), (self.listener, self.address, OSError(*self.args)))


def _errno_name(number: int | None) -> str:
    return errno.errorcode.get(number, str(number)) if number is not None else "unknown"


def _dup_listening_socket(listener: trio.abc.Listener[trio.abc.Stream]) -> socket.socket | None:
    """The listener's socket again, non-blocking, for the accept burst; None
    for a listener that is not a plain socket or is closed already (its
    accept says so), or when no descriptor is left (accepting one at a
    time still works)."""
    if not isinstance(listener, trio.SocketListener) or listener.socket.fileno() == -1:
        return None
    try:
        fd = os.dup(listener.socket.fileno())
    except OSError as exc:
        log.warning("accepting one connection at a time on %s: %s", listener.socket.getsockname(), exc)
        return None
    burst_socket = socket.socket(fileno=fd)
    burst_socket.setblocking(False)
    return burst_socket


def _accept_backlog(burst_socket: socket.socket, nursery: trio.Nursery,
                    handler: StreamHandler, task_name: str,
                    metrics: Metrics) -> None:
    """Start a handler for each connection waiting in the backlog, up to ACCEPT_BURST, without yielding.

    Error handling: a connection that failed before it was accepted is
    skipped and counted, as Trio's accept does; any other OSError (EMFILE
    and the like) is raised for the accept loop to back off from.
    """
    for _ in range(ACCEPT_BURST):
        try:
            sock, _addr = burst_socket.accept()
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno not in _ACCEPT_SKIPPED_ERRNOS:
                raise
            metrics.accept_errors.labels(_errno_name(exc.errno)).inc()
            continue
        nursery.start_soon(handler, trio.SocketStream(trio.socket.from_stdlib_socket(sock)), name=task_name)


class Gateway:
    """A running gateway. Created by ``serve``; read ``addresses`` for the
    bound listeners, call ``stop()`` for a graceful shutdown."""

    def __init__(self, config: Config, spool: SpoolSink, sink: Sink | None, metrics: Metrics,
                 auth: Authenticator | None = None, *, tls_context: ssl.SSLContext | None = None,
                 admin_tokens: AdminTokens | None = None) -> None:
        self.config = config
        # the server context of the mqtts, https and wss listeners (security.tls); None: none is set
        self.tls_context = tls_context
        # the TLS stream under each live TLS connection, for a SIGHUP that
        # revokes or distrusts the certificate it was accepted with
        self._tls_streams: dict[Session, trio.SSLStream[Any]] = {}
        self.metrics = metrics
        self.spool = spool
        # a record the spool can never store is kept as a sink_refused dead letter: count it as such
        spool.on_refused = lambda protocol: metrics.readings_rejected.labels(protocol, "sink_refused").inc()
        self.addresses: dict[str, tuple[str, int]] = {}
        _, fd_limit = raise_open_file_limit()
        self.max_connections = effective_max_connections(config.connections.max_connections, fd_limit)
        self.conns = ConnManager(
            idle_timeout_s=config.connections.idle_timeout_s,
            reap_interval_s=config.connections.reap_interval_s,
            max_connections=self.max_connections,
            metrics=metrics,
        )
        rules = config.payload_rules()
        self.ready = False
        # Any sink but the spool goes through store-and-forward (the spool
        # stays underneath: gridgate.sinks.forwarding).
        self.forwarder: Forwarder | None = None
        if sink is not None or config.sink.kind != "spool":
            self.forwarder = Forwarder("custom" if sink is not None else config.sink.kind,
                                       lambda: open_external_sink(config), spool, config.sink, metrics, sink)
        self.pipeline = Pipeline(
            self._write,
            batch_max_records=config.pipeline.batch_max_records,
            batch_max_delay_s=config.pipeline.batch_max_delay_ms / 1000.0,
            queue_max_items=config.pipeline.queue_max_items,
            queue_max_records=config.pipeline.queue_max_records,
            metrics=metrics,
        )
        self.durable_timeouts = DurableTimeouts(config.http.durable_timeout_s)
        device_configs = config.device_configs()
        self.limits = FlowGuard(config.limits, metrics, region_tag=config.payload.location_levels[0],
                                device_configs=device_configs)
        self.admin = AdminGate(admin_tokens or AdminTokens({}), required=admin_required(config),
                               metrics_token_required=config.admin.metrics_token_required)
        # All a session gets of the gateway (gridgate.protocols.services).
        self.services = Services(
            config=config, metrics=metrics, conns=self.conns, pipeline=self.pipeline,
            validator=validator.Validator(rules),
            # the std HTTP engine's validator: always the pure-Python reference
            std_validator=validator_py.Validator(rules),
            durable_timeouts=self.durable_timeouts,
            device_configs=device_configs,
            poll_durable=spool.poll,
            connection_nursery=lambda: self.connection_nursery,
            not_ready_reasons=self.not_ready_reasons,
            sink_status=self.sink_status,
            serve_mqtt_stream=serve_mqtt_stream,
            auth=auth,
            limits=self.limits,
            admin=self.admin,
        )
        self._stop = trio.Event()
        self._listeners: list[trio.SocketListener] = []
        # --workers N (gridgate.cluster): every worker binds the same ports
        # with SO_REUSEPORT and the kernel spreads the connections among them.
        self.reuse_port = False
        self._accept_scopes: list[trio.CancelScope] = []
        self._conn_nursery: trio.Nursery | None = None
        # Listeners whose accept loop ended while the gateway runs on (for
        # /readyz): "mqtt listener 127.0.0.1:1883" -> why.
        self._stopped_listeners: dict[str, str] = {}
        # peers already logged for a refused PROXY header (each logged once)
        self._proxy_refusals_logged = FirstRefusals()

    # -- sink composition ---------------------------------------------------

    @property
    def connection_nursery(self) -> trio.Nursery:
        """Where connection handlers and their side tasks (``SideTasks``) run."""
        assert self._conn_nursery is not None, "the gateway is not serving"
        return self._conn_nursery

    async def _write(self, records: list[Record], dead: list[tuple[str, int, Rejection]],
                     on_commit: Callable[[], None] | None = None) -> None:
        # Commit latency feeds shedding (DESIGN section 11) when it is on.
        started = trio.current_time() if self.limits.latency.enabled else None
        if self.forwarder is None:
            if started is not None and on_commit is not None:
                on_commit = partial(self._timed_commit, on_commit, started)
                started = None
            await self.spool.write_batch(records, dead, on_commit=on_commit)
        else:
            # dead letters always stay in the spool; records go to the sink or pending
            await self.forwarder.write(records, dead)
        if started is not None:
            self.limits.record_commit(trio.current_time() - started)

    def _timed_commit(self, on_commit: Callable[[], None], started: float) -> None:
        self.limits.record_commit(trio.current_time() - started)
        on_commit()

    # What a SIGHUP applies without a restart; other changed sections are named
    # in the log and wait for one.
    RELOADABLE = ("limits", "admin tokens")

    def reload(self, config: Config) -> None:
        """Apply a re-read configuration (SIGHUP): the limits and the admin
        tokens (a tokens file with any problem keeps the old tokens);
        connections stay."""
        import msgspec

        self.limits.reload(config.limits)
        self.reload_tls(config)
        if config.admin.tokens_file:
            tokens, problems = AdminTokens.load(config.admin.tokens_file)
            if problems:
                self.metrics.reloads.labels("failed").inc()
                for problem in problems:
                    log.error("SIGHUP: admin tokens not reloaded, the old ones stay: %s", problem)
            else:
                self.admin.tokens = tokens
        ignored = [name for name in ("mqtt", "http", "websocket", "connections", "pipeline", "payload", "sink",
                                     "spool", "influxdb", "nats", "cluster", "downlink", "service")
                   if msgspec.to_builtins(getattr(config, name)) != msgspec.to_builtins(getattr(self.config, name))]
        self.config.limits = config.limits
        self.metrics.reloads.labels("ok").inc()
        log.info("SIGHUP: reloaded %s%s", ", ".join(self.RELOADABLE),
                 f"; changed and applied only at restart: {', '.join(ignored)}" if ignored else "")

    def reload_tls(self, config: Config) -> None:
        """SIGHUP: the certificate, key, client CAs and CRL read again; new
        handshakes use them at once. A connection whose client certificate the
        new set refuses (revoked, expired, its CA gone; none where one is now
        required) is closed; the others stay. Any problem keeps the old set."""
        if self.tls_context is None:
            return
        try:
            context = server_context(config.tls)
            judge = CertificateJudge(config.tls)
        except (ConfigError, OSError, ValueError) as exc:   # OSError, ValueError: what cryptography refused
            self.metrics.reloads.labels("failed").inc()
            for problem in exc.problems if isinstance(exc, ConfigError) else [f"tls: {exc}"]:
                log.error("SIGHUP: TLS not reloaded, the old certificates and CRL stay: %s", problem)
            return
        self.tls_context = context
        self.config.tls = config.tls
        closed = 0
        for session, stream in list(self._tls_streams.items()):
            der = peer_certificate(stream)
            if der is None:
                why = "a client certificate is now required" if config.tls.require_client_cert else None
            elif config.tls.client_ca_file:
                refusal = judge.refusal(der)
                why = f"client certificate {refusal}" if refusal else None
            else:
                why = None
            if why is not None:
                session.close(why)
                closed += 1
        log.info("SIGHUP: TLS reloaded; %d connections whose certificate is no longer accepted closed", closed)

    def sink_status(self) -> dict[str, object]:
        """For /readyz: which sink, and for an external one its breaker and pending records."""
        if self.forwarder is None:
            return {"kind": "spool"}
        return self.forwarder.describe()

    # -- lifecycle ------------------------------------------------------------

    def stop(self) -> None:
        """Begin a graceful shutdown; ``serve`` returns once it is done."""
        self._stop.set()

    def reload_credentials(self) -> list[str]:
        """SIGHUP: read the password file, JWT keys and ACL again and close
        the connections whose identity is gone (security.authenticator).
        A reload with any problem keeps the old set: returns the problems
        (each also logged), and closes nothing."""
        auth = self.services.auth
        if auth is None:
            return []
        problems = auth.reload(self.config)
        if problems:
            self.metrics.credential_reloads.labels("failed").inc()
            for problem in problems:
                log.error("credentials reload failed, the old set stays: %s", problem)
            return problems
        self.metrics.credential_reloads.labels("ok").inc()
        closed = 0
        for session in self.conns:
            if session.identity is not None and not auth.still_valid(session.identity):
                session.close("credentials removed")
                closed += 1
        log.info("credentials reloaded; %d connections whose credentials were removed closed", closed)
        return []

    async def _run(self, task_status: trio.TaskStatus[Gateway]) -> None:
        try:
            # Bound before any task starts, so a port in use is raised as the
            # ListenError itself, not wrapped in the nursery's ExceptionGroup.
            bound = await self._bind_listeners()
            async with trio.open_nursery() as nursery:
                await nursery.start(self.conns.run_reaper)
                await nursery.start(self.pipeline.run)
                if ready_loop.AVAILABLE:
                    # started before any connection and stopped after them all
                    # (the nursery's cancel comes after the graceful drain)
                    self.services.ready_loop = ready_loop.ReadyLoop(self.services.poll_durable)
                    await nursery.start(self.services.ready_loop.run)
                await nursery.start(self.durable_timeouts.run)
                if self.forwarder is not None:
                    await nursery.start(self.forwarder.run_replayer)
                nursery.start_soon(self._summary_loop)
                conn_nursery = await nursery.start(_nursery_holder)
                self._conn_nursery = conn_nursery
                for name, listener, handler in bound:
                    # labelled now: a listener closed before its loop runs has no address to read
                    nursery.start_soon(partial(self._accept_loop, listener, name, handler,
                                               label=_listener_label(name, listener)))
                self.ready = True
                log.info("listening %s", " ".join(f"{k}={_fmt_addr(v)}" for k, v in self.addresses.items()))
                log.info("%s; %s; max_connections=%d; data_dir=%s", hotpath.describe(),
                         self.spool.writer_description, self.max_connections,
                         self.config.spool.data_dir)
                task_status.started(self)
                await self._stop.wait()
                await self._graceful_stop()
                nursery.cancel_scope.cancel()
        finally:
            self.ready = False
            # a hard stop skips _graceful_stop: the ports must not outlive serve()
            for listener in self._listeners:
                await trio.aclose_forcefully(listener)

    async def _graceful_stop(self) -> None:
        self.ready = False
        log.info("stopping: no new connections; draining %d connections", len(self.conns))
        for scope in self._accept_scopes:
            scope.cancel()
        for listener in self._listeners:
            await listener.aclose()
        with trio.move_on_after(DRAIN_TIMEOUT_S) as drain:
            for session in self.conns:
                session.stop_reading(drain.deadline)
            # Sessions finish once their owed acks are out; then the queue is
            # closed and the batcher writes the rest.
            await self.conns.wait_empty()
            await self.pipeline.close_input()
            await self.pipeline.wait_finished()
        if drain.cancelled_caught:
            log.warning("drain did not finish within %.0fs: connections still owed acks are closed without them; "
                        "readings still queued or being written get one more write of up to %.0fs, and any not "
                        "written then are logged and counted as lost", DRAIN_TIMEOUT_S, DRAIN_TIMEOUT_S)

    async def _flush_unwritten(self) -> None:
        """Write what was accepted but not written, within DRAIN_TIMEOUT_S.

        Bounded in time, not only in size (``queue_max_records``): a sink
        that hangs or keeps failing must not keep the process from exiting. What
        an external sink does not take in time goes to the spool as pending,
        replayed at the next start; what cannot be written at all is logged
        and counted in ``readings_unwritten_at_shutdown``.
        """
        items = self.pipeline.take_unwritten()
        if not items:
            return
        records = [r for item in items for r in item.records]
        dead = [(item.protocol, item.received_ns, r) for item in items for r in item.rejections]
        log.info("writing %d records and %d rejections still queued at shutdown", len(records), len(dead))
        with trio.move_on_after(DRAIN_TIMEOUT_S) as attempt:
            await self.pipeline.write_with_retry(records, dead)
        if not attempt.cancelled_caught:
            return
        if self.forwarder is not None and await self._keep_as_pending(records, dead):
            return
        self._count_unwritten(items)

    async def _keep_as_pending(self, records: list[Record], dead: list[tuple[str, int, Rejection]]) -> bool:
        assert self.forwarder is not None
        try:
            # One try, not write_with_retry: the spool is local, and if it
            # fails now, waiting will not make it take the batch.
            await self.spool.write_batch(records, dead, pending=True)
        except Exception as exc:       # Cancelled is not an Exception: it passes
            log.error("keeping %d records and %d rejections in the spool at shutdown failed: %s",
                      len(records), len(dead), exc)
            return False
        log.warning("the %s sink did not take %d records within %.0fs at shutdown: kept in the spool as "
                    "pending (replayed to it at the next start), with %d rejections", self.forwarder.name,
                    len(records), DRAIN_TIMEOUT_S, len(dead))
        return True

    def _count_unwritten(self, items: list[WorkItem]) -> None:
        by_protocol: dict[str, list[int]] = {}
        for item in items:
            counts = by_protocol.setdefault(item.protocol, [0, 0])
            counts[0] += len(item.records)
            counts[1] += len(item.rejections)
        for protocol, (records, rejections) in by_protocol.items():
            self.metrics.readings_unwritten_at_shutdown.labels(protocol).inc(records + rejections)
        if self.config.pipeline.ack == "durable":
            resent = "devices send again only those still owed an ack"
        else:
            resent = 'they were acknowledged on receipt (ack = "received"): no device sends them again'
        log.error("lost at shutdown: %d records and %d rejections were not written within %.0fs (%s); %s",
                  sum(c[0] for c in by_protocol.values()), sum(c[1] for c in by_protocol.values()),
                  DRAIN_TIMEOUT_S, ", ".join(f"{p}: {r} records, {d} rejections"
                                             for p, (r, d) in sorted(by_protocol.items())), resent)

    # -- listeners --------------------------------------------------------------

    async def _bind_listeners(self) -> list[tuple[str, trio.SocketListener, StreamHandler]]:
        """Bind every configured listener; raise ListenError for the first that cannot bind.

        The TLS listeners (mqtts, https, wss) serve the same handlers as the
        plain ones, on the stream their handshake made (``_tls_handler``).
        """
        config = self.config
        listeners_wanted: list[tuple[str, str, ClientHandler, str]] = [
            ("mqtt", config.mqtt.listen, self.handle_mqtt, config.mqtt.proxy_protocol),
            ("http", config.http.listen, self.handle_http, config.http.proxy_protocol),
            ("ws", config.websocket.listen, self.handle_ws, config.websocket.proxy_protocol),
        ]
        if self.tls_context is not None:
            listeners_wanted += [
                ("mqtts", config.mqtt.tls_listen, self._tls_handler("mqtts", self.handle_mqtt),
                 config.mqtt.proxy_protocol),
                ("https", config.http.tls_listen, self._tls_handler("https", self.handle_http),
                 config.http.proxy_protocol),
                ("wss", config.websocket.tls_listen, self._tls_handler("wss", self.handle_ws),
                 config.websocket.proxy_protocol),
            ]
        bound: list[tuple[str, trio.SocketListener, StreamHandler]] = []
        for name, address, client_handler, proxy_protocol in listeners_wanted:
            parsed = parse_address(address)
            if parsed is None:
                continue
            handler: StreamHandler = client_handler
            if proxy_protocol != "off":
                # the PROXY header comes first, before any TLS handshake
                handler = self._proxy_handler(name, 1 if proxy_protocol == "v1" else 2, client_handler,
                                              tls=name in ("mqtts", "https", "wss"))
            host, port = parsed
            try:
                if self.reuse_port:
                    listeners = await open_reuseport_listeners(port, host)
                else:
                    listeners = await trio.open_tcp_listeners(port, host=host, backlog=4096)
            except OSError as exc:
                raise ListenError(name, _fmt_addr((host, port)), exc) from exc
            self._listeners.extend(listeners)
            sockname = listeners[0].socket.getsockname()
            self.addresses[name] = (sockname[0], sockname[1])
            bound.extend((name, listener, handler) for listener in listeners)
        return bound

    def _tls_handler(self, listener: str, handler: ClientHandler) -> ClientHandler:
        """``handler`` behind a TLS server handshake.

        The handshake runs in the connection's own task (the accept loop
        only starts it), under ``[tls] handshake_timeout_s``: a client that
        stalls or sends plaintext costs its own task, never the accept loop
        or other connections, and is closed and counted
        (``gridgate_tls_handshake_failures``). A finished handshake hands
        ``handler`` the ``trio.SSLStream``; having no ``.socket`` and not
        being a SocketStream, it takes the sessions' generic
        receive_some/send_all path, never their raw-socket shortcut.
        """
        timeout_s = self.config.tls.handshake_timeout_s
        metrics = self.metrics

        async def handle_tls(stream: trio.abc.Stream, /, *, client: ClientAddress | None = None) -> None:
            context = self.tls_context      # read per connection: a SIGHUP may have replaced it
            assert context is not None
            # https_compatible: devices drop TCP without a close_notify, and
            # every protocol here frames its own messages (MQTT lengths,
            # Content-Length, WebSocket frames), so an EOF without one is an
            # end like any other, and closing does not wait for the client's.
            tls_stream = trio.SSLStream(stream, context, server_side=True, https_compatible=True)
            try:
                done = await tls_handshake(tls_stream, listener=listener, timeout_s=timeout_s, metrics=metrics)
            except Exception as exc:       # a bug must cost this connection only; Cancelled passes
                metrics.tls_handshake_failures.labels(listener, "other").inc()
                log.error("%s TLS handshake from %s failed: %s", listener,
                          _fmt_addr(client) if client is not None else _peer(stream), exc, exc_info=exc)
                done = False
            if not done:
                await trio.aclose_forcefully(tls_stream)
                return
            await handler(tls_stream, client=client)

        return handle_tls

    def _proxy_handler(self, listener: str, version: int, handler: ClientHandler, *, tls: bool) -> StreamHandler:
        """``handler`` behind a PROXY protocol header (DESIGN section 12):
        only from ``[service] trusted_proxies``, complete within
        ``proxy_header_timeout_s``, read in the connection's own task like a
        TLS handshake. Anything else closes the connection, counted in
        ``gridgate_proxy_protocol_refused{listener, reason}`` and logged once
        per peer address. The handler then sees the client's address (logs,
        limits, bans); LOCAL (the proxy's health check) and UNKNOWN keep the
        proxy's. On a plain listener a client certificate the proxy verified
        (PP2_SUBTYPE_SSL_CN) is the connection's certificate identity; on a
        TLS listener the gateway's own handshake decides.
        """
        trusted = TrustedProxies(self.config.service.trusted_proxies)
        timeout_s = self.config.service.proxy_header_timeout_s
        refused = self.metrics.proxy_protocol_refused
        logged = self._proxy_refusals_logged

        async def handle_proxied(stream: trio.abc.Stream) -> None:
            assert isinstance(stream, trio.SocketStream), "PROXY listeners are socket listeners"
            try:
                header = await accept_proxy_header(stream, version=version, trusted=trusted, timeout_s=timeout_s)
            except ProxyProtocolError as exc:
                refused.labels(listener, exc.reason).inc()
                peer = _peer_host(stream)
                # "?": gone before it was looked at (a probe that connects and leaves): no one to name
                if peer != "?" and logged.first(peer, trio.current_time()):
                    unlogged = logged.take_unlogged()
                    log.warning("%s: closing a connection from %s: PROXY v%d header refused (%s); further "
                                "refusals from this address are only counted%s", listener, _peer(stream), version,
                                exc, f" ({unlogged} from other addresses were counted, not logged, before this)"
                                if unlogged else "")
                await trio.aclose_forcefully(stream)
                return
            except Exception as exc:       # a bug must cost this connection only; Cancelled passes
                refused.labels(listener, "internal_error").inc()
                log.error("%s: reading the PROXY header from %s failed: %s", listener, _peer(stream), exc,
                          exc_info=exc)
                await trio.aclose_forcefully(stream)
                return
            cn = header.ssl.verified_cn if header.ssl is not None and not tls else None
            await handler(ProxiedStream(stream, cn) if cn else stream, client=header.client_address)

        return handle_proxied

    async def _accept_loop(self, listener: trio.abc.Listener[trio.abc.Stream], name: str,
                           handler: StreamHandler, *,
                           label: str | None = None) -> None:
        """Accept until the gateway stops. ``label`` names the listener in
        logs and /readyz (default: from its socket's address).

        Error handling: a failed handshake is skipped, a process out of file
        descriptors (or memory) backs off; any other error, or the listener
        closed under it, ends this loop only: the gateway keeps serving its
        connections and other listeners, and /readyz names the listener.
        """
        if label is None:
            label = _listener_label(name, listener)
        # The same listening socket, for accepting without a checkpoint: trio's
        # accept yields after every connection, a whole scheduler pass each,
        # and 1,000 clients connecting at once to a busy gateway waited
        # seconds in the backlog (wrk's p99 was 7 s). Closed with the loop,
        # so the port stops listening when the listener is closed.
        # With accept_rate_per_s the excess waits in the kernel backlog: one
        # accept at a time, paced by the listener's bucket.
        burst_socket = None if self.config.limits.accept_rate_per_s else _dup_listening_socket(listener)
        try:
            await self._accept_connections(listener, name, handler, burst_socket)
        except Exception as exc:       # Cancelled is not an Exception: a stop passes through
            why = str(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
            self._stopped_listeners[label] = why
            log.error("%s stopped accepting: %s; not ready, still serving the %d open connections", label, why,
                      len(self.conns), exc_info=exc)
            # refused, not left in a backlog nobody takes from: clients try another gateway
            await trio.aclose_forcefully(listener)
        else:
            if not self._stop.is_set():
                self._stopped_listeners[label] = "the listener was closed"
                log.error("%s was closed; not ready, still serving the %d open connections", label,
                          len(self.conns))
        finally:
            if burst_socket is not None:
                burst_socket.close()

    async def _accept_connections(self, listener: trio.abc.Listener[trio.abc.Stream], name: str,
                                  handler: StreamHandler,
                                  burst_socket: socket.socket | None) -> None:
        """The accept loop proper; returns when the listener is closed."""
        backoff = 0.01
        failing = False
        assert self._conn_nursery is not None
        conn_nursery = self._conn_nursery
        metrics = self.metrics
        scope = trio.CancelScope()
        self._accept_scopes.append(scope)
        # one name for all: trio would otherwise format a new string per task
        task_name = f"gridgate.{name}-connection"
        rate = self.config.limits.accept_rate_per_s
        pace = TokenBucket(rate, rate, trio.current_time()) if rate else None
        with scope:
            while True:
                try:
                    if pace is not None:
                        wait = pace.wait_for(1, trio.current_time())
                        if wait:
                            await trio.sleep(wait)
                        pace.take(1, trio.current_time())
                    stream = await listener.accept()
                    conn_nursery.start_soon(handler, stream, name=task_name)
                    if burst_socket is not None:
                        _accept_backlog(burst_socket, conn_nursery, handler, task_name, metrics)
                except trio.ClosedResourceError:
                    return
                except OSError as exc:
                    if exc.errno in _ACCEPT_SKIPPED_ERRNOS:
                        # trio's own listener never raises these; another Listener may
                        metrics.accept_errors.labels(_errno_name(exc.errno)).inc()
                        continue
                    if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                        raise
                    metrics.accept_errors.labels(_errno_name(exc.errno)).inc()
                    if not failing:
                        failing = True
                        log.error("%s accept failed: %s; backing off and serving the %d open connections",
                                  name, exc, len(self.conns))
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, 1.0)
                    continue
                if failing:
                    failing = False
                    backoff = 0.01
                    log.warning("%s accept recovered", name)

    # -- per-connection wrapper ---------------------------------------------------

    def handle_mqtt(self, stream: trio.abc.Stream, /, *,
                    client: ClientAddress | None = None) -> Coroutine[Any, Any, None]:
        """Serve one MQTT connection on any Trio stream (TCP, WebSocket,
        in-memory): ``await`` it or ``start_soon`` it. ``client``: the
        client's address when the stream's peer is a proxy in front of it.

        A plain function returning the coroutine to run, not an ``async def``
        wrapping it: that would be one more frame on the stack of every idle
        device connection.
        """
        held = self._admit(stream, "mqtt", client)
        if held is None:
            # why, told now (no await since _admit): it picks a v5 client's CONNACK reason code
            why = ("max_connections" if self.conns.full() else
                   "shedding" if self.limits.latency.shedding(trio.current_time()) else "max_connections_per_ip")
            return self._refuse_mqtt(stream, why)
        return self._serve_connection(stream, "mqtt", _serve_mqtt, held, client)

    async def _refuse_mqtt(self, stream: trio.abc.Stream, why: str) -> None:
        self.metrics.connections_refused.labels("mqtt").inc()
        try:
            await refuse_at_accept(stream, why, self.config.mqtt.max_packet_bytes)
        finally:
            await trio.aclose_forcefully(stream)

    def handle_http(self, stream: trio.abc.Stream, /, *,
                    client: ClientAddress | None = None) -> Coroutine[Any, Any, None]:
        """Serve one HTTP/1.1 connection (keep-alive, pipelining) on any Trio
        stream: ``await`` it or ``start_soon`` it. A plain function, as
        handle_mqtt is: one frame less on every idle connection's stack."""
        held = self._admit(stream, "http", client)
        if held is None:
            body = b'{"error": "overloaded", "detail": "not taking new connections now"}'
            return self._refuse(stream, "http", b"HTTP/1.1 503 Service Unavailable\r\n"
                                b"content-type: application/json\r\nretry-after: 1\r\nconnection: close\r\n"
                                b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        serve = serve_fast_http if self.config.http.engine == "fast" else serve_std_http
        return self._serve_connection(stream, "http", serve, held, client)

    async def handle_ws(self, stream: trio.abc.Stream, /, *, client: ClientAddress | None = None) -> None:
        """Serve one WebSocket connection (/v1/ws or MQTT on /mqtt) on any Trio stream."""
        held = self._admit(stream, "ws", client)
        if held is None:
            await self._refuse(stream, "ws", b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\n"
                               b"connection: close\r\ncontent-length: 0\r\n\r\n")
            return
        await self._serve_connection(stream, "ws", serve_websocket_connection, held, client)

    def not_ready_reasons(self) -> list[str]:
        """Why /readyz is 503; empty when listeners are up and the sink takes writes."""
        reasons = []
        if not self.ready:
            reasons.append("listeners are not accepting")
        reasons.extend(f"{label} stopped accepting: {why}" for label, why in self._stopped_listeners.items())
        if not self.spool.accepting_writes():
            reasons.append("the spool refuses writes (max_bytes reached)")
        return reasons

    async def _refuse(self, stream: trio.abc.Stream, protocol: str, answer: bytes) -> None:
        self.metrics.connections_refused.labels(protocol).inc()
        try:
            with trio.move_on_after(1.0):
                await stream.send_all(answer)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    def _admit(self, stream: trio.abc.Stream, protocol: str, client: ClientAddress | None = None) -> str | None:
        """Whether a new connection is taken: None when refused
        (max_connections, shedding while the sink's commit p99 is over the
        threshold, max_connections_per_ip); else the address whose place it
        holds until _serve_connection ends."""
        limits = self.limits
        if self.conns.full() or limits.shedding(protocol):
            return None
        # counted whether or not a limit is set, so a limit set by SIGHUP
        # counts the connections already open
        address = client[0] if client is not None else _peer_host(stream)
        return address if limits.acquire_address(address, protocol) else None

    async def _serve_connection(self, stream: trio.abc.Stream, protocol: str, serve: ServeFn,
                                held_address: str = "", client: ClientAddress | None = None) -> None:
        # This coroutine is the bottom frame of every connection's task, so
        # its size (its locals and stack, paid twice: in the coroutine and in
        # the frame object trio makes of a task's first frame) is RSS on
        # every idle connection: the work around the await is in plain
        # methods, and no except* (its matching takes stack slots).
        session = self._open_session(stream, protocol, client)
        try:
            with session.cancel_scope:
                await serve(stream, self.services, session)
        except BaseException:
            self._session_failed(session, sys.exception())      # not "as exc": one slot less
        finally:
            self._close_session(session, held_address)
            await trio.aclose_forcefully(stream)

    def _open_session(self, stream: trio.abc.Stream, protocol: str, client: ClientAddress | None) -> Session:
        remote = _fmt_addr(client) if client is not None else _peer(stream)
        session = Session(protocol, remote, trio.CancelScope())
        self.conns.register(session)
        if isinstance(stream, trio.SSLStream):
            self._tls_streams[session] = stream
        return session

    def _session_failed(self, session: Session, exc: BaseException | None) -> None:
        """What ``except* (Broken, Closed)`` then ``except* Exception`` did:
        a lost connection is noted, a bug in a session is logged with the
        peer and closes just this connection (never the server); anything
        else (Cancelled, KeyboardInterrupt) is raised again."""
        lost: BaseException | None
        rest: BaseException | None
        if exc is None:             # cannot be: called from an except clause
            return
        if isinstance(exc, BaseExceptionGroup):
            lost, rest = exc.split((trio.BrokenResourceError, trio.ClosedResourceError))
        elif isinstance(exc, (trio.BrokenResourceError, trio.ClosedResourceError)):
            lost, rest = exc, None
        else:
            lost, rest = None, exc
        if lost is not None:
            session.close_reason = session.close_reason or "connection lost"
        if rest is None:
            return
        errors: BaseException | None
        if isinstance(rest, BaseExceptionGroup):
            errors, rest = rest.split(Exception)
        elif isinstance(rest, Exception):
            errors, rest = rest, None
        else:
            errors = None
        if errors is not None:
            session.close_reason = "internal error"
            log.error("error on %s connection from %s (%s)", session.protocol, session.remote,
                      session.device_id or "-", exc_info=errors)
        if rest is not None:
            raise rest

    def _close_session(self, session: Session, held_address: str) -> None:
        self.conns.unregister(session)
        self._tls_streams.pop(session, None)
        if held_address:
            self.limits.release_address(held_address)

    # -- logs ----------------------------------------------------------------------

    async def _summary_loop(self) -> None:
        interval = self.config.service.summary_interval_s
        last_accepted = self.pipeline.accepted
        while True:
            await trio.sleep(interval)
            p = self.pipeline
            rate = (p.accepted - last_accepted) / interval
            last_accepted = p.accepted
            log.info("summary connections=%d readings=%d (%.0f/s) rejected=%d batches=%d queued=%d "
                     "reaped=%d taken_over=%d", len(self.conns), p.accepted, rate, p.rejected, p.batches,
                     p.queued(), self.conns.reaped, self.conns.taken_over)


async def _nursery_holder(*, task_status: trio.TaskStatus[trio.Nursery] = trio.TASK_STATUS_IGNORED) -> None:
    async with trio.open_nursery() as nursery:
        task_status.started(nursery)
        await trio.sleep_forever()


def _listener_label(name: str, listener: trio.abc.Listener[trio.abc.Stream]) -> str:
    """``mqtt listener 127.0.0.1:1883`` (without the address for a listener that has no socket)."""
    sock = getattr(listener, "socket", None)
    try:
        return f"{name} listener {_fmt_addr(sock.getsockname())}" if sock is not None else f"{name} listener"
    except OSError:
        return f"{name} listener"


def _peer_address(stream: trio.abc.Stream) -> Any:
    """The peer's socket address (looking through TLS to the TCP connection
    under it); None for a stream without a socket, "?" once it is gone."""
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream         # the TCP connection under TLS
    sock = getattr(stream, "socket", None)
    try:
        return sock.getpeername() if sock is not None else None
    except OSError:
        return "?"


def _peer(stream: trio.abc.Stream) -> str:
    addr = _peer_address(stream)
    if addr == "?":
        return "?"
    return _fmt_addr(addr) if addr is not None else type(stream).__name__


def _peer_host(stream: trio.abc.Stream) -> str:
    """The peer's address without the port: what per-address limits count
    (under TLS too: otherwise every TLS client would share one place)."""
    addr = _peer_address(stream)
    if addr == "?":
        return "?"
    return addr[0] if isinstance(addr, tuple) else type(stream).__name__


def admin_required(config: Config) -> bool:
    """DESIGN section 10: the admin API needs a token whenever a credential
    store or a tokens file is configured, or a listener is not loopback-only."""
    return bool(config.has_credential_store or config.admin.tokens_file or config.exposed_listeners())


def _fmt_addr(addr: Any) -> str:
    if isinstance(addr, (str, bytes)):       # AF_UNIX (an embedder's socket pair: "")
        return f"unix:{addr!r}" if addr else "unix"
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def open_reuseport_listeners(port: int, host: str) -> list[trio.SocketListener]:
    """``trio.open_tcp_listeners`` with SO_REUSEPORT: one listening socket per
    address of ``host``, each joining the port's group (same user) so the
    kernel balances new connections among the processes that listen on it."""
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    listeners: list[trio.SocketListener] = []
    try:
        for family, type_, proto, _, sockaddr in infos:
            sock = trio.socket.socket(family, type_, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:   # as trio does: the IPv4 address gets its own socket
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                await sock.bind(sockaddr)
                sock.listen(4096)
            except BaseException:
                sock.close()
                raise
            listeners.append(trio.SocketListener(sock))
    except BaseException:
        for listener in listeners:
            listener.socket.close()
        raise
    return listeners


async def serve(config: Config, sink: Sink | None = None, *, reuse_port: bool = False,
                task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED) -> None:
    """Run a gateway until ``gateway.stop()`` or cancellation.

    Args:
        config: the effective configuration (``Config.load(...)`` or ``Config(...)``).
        sink: a custom sink (``write(batch)`` / ``aclose()``), behind the same
            circuit breaker and store-and-forward as the built-in external
            sinks; None = the sink of ``config.sink.kind``.
        reuse_port: bind the listeners with SO_REUSEPORT (a worker of
            ``gridgate serve --workers N``; the port is shared, not refused).

    Returns once the gateway stopped. ``task_status.started(gateway)`` is
    called when every listener is bound, so ``await nursery.start(serve,
    config)`` returns the Gateway with its ``addresses``.

    Error handling: raises ConfigError for an invalid config and ListenError
    (an OSError naming the listener and its address) if a listener cannot
    bind; nothing a client sends can make it raise. A listener that fails
    later stops only itself: ``/readyz`` turns 503 and names it.

    Resource handling: on any exit, queued readings are written (within
    DRAIN_TIMEOUT_S; with an external sink, what it does not take by then is
    kept in the spool as pending), then the sink and the spool are closed.
    Readings that could not be written are logged and counted in
    ``gridgate_readings_unwritten_at_shutdown_total``, never dropped silently.
    """
    config.validate()
    metrics = Metrics()
    # the password file, JWT keys and ACL: every problem of every file at once (ConfigError)
    auth = load_authenticator(config, metrics)
    admin_tokens = None
    if config.admin.tokens_file:       # every problem of the file at once, before anything opens
        admin_tokens, problems = AdminTokens.load(config.admin.tokens_file)
        if problems:
            raise ConfigError(problems)
    # the certificate, key, client CAs and CRL of the TLS listeners (ConfigError)
    tls_context: ssl.SSLContext | None = None
    if config.mqtt.tls_listen or config.http.tls_listen or config.websocket.tls_listen:
        tls_context = server_context(config.tls)
    spool = await SpoolSink.open(config.spool.data_dir, fsync=config.spool.fsync,
                                 max_bytes=config.spool.max_bytes)
    gateway = Gateway(config, spool, sink, metrics, auth, tls_context=tls_context, admin_tokens=admin_tokens)
    gateway.reuse_port = reuse_port
    try:
        await gateway._run(task_status)
    finally:
        with trio.CancelScope(shield=True):
            await gateway._flush_unwritten()
            if gateway.forwarder is not None:
                try:
                    await gateway.forwarder.aclose()
                except Exception:
                    log.exception("closing the sink failed")
            await spool.aclose()
            log.info("stopped: %d readings written, %d rejected", gateway.pipeline.accepted,
                     gateway.pipeline.rejected)
