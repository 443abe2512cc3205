"""What a protocol session may use of the gateway, and nothing more.

``gateway.py`` builds one ``Services`` and hands it to every session; a
session never imports the gateway. Reading this class tells what sessions
depend on: the configuration, the connection registry, the pipeline and the
validators in front of it, the durable-ack timeouts, metrics, device configs
for the downlink, and the one entry point through which a transport that is
not TCP (MQTT over WebSocket) reaches the MQTT session.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import trio

    from gridgate.config import Config
    from gridgate.connections.manager import ConnManager, Session
    from gridgate.connections.ready_loop import ReadyLoop
    from gridgate.errors import MQTTProtocolError
    from gridgate.ingest.durable_timeouts import DurableTimeouts
    from gridgate.ingest.pipeline import Pipeline
    from gridgate.limits.guard import FlowGuard
    from gridgate.observability.metrics import Metrics
    from gridgate.security.admin_tokens import AdminGate
    from gridgate.security.authenticator import Authenticator

__all__ = ["Services", "ServeMQTTStream", "ClusterView"]

# Serve MQTT on any byte stream as ``protocol``; returns the protocol error
# that closed it, if one did (the WebSocket session picks its close code from
# it). gridgate.protocols.mqtt.session.serve_mqtt_stream.
ServeMQTTStream = Callable[["trio.abc.Stream", "Services", "Session", str], Awaitable["MQTTProtocolError | None"]]


class ClusterView(Protocol):
    """The other gateways of a cluster, as the HTTP API needs them
    (gridgate.cluster.node): questions about devices this node does not
    hold. Each awaitable bounds its own wait and answers (status, JSON
    object, extra headers), never raises."""

    def command(self, device_id: str, body: bytes) -> Awaitable[tuple[int, Any, list[tuple[bytes, bytes]]]]:
        """POST /v1/devices/{id}/commands, delivered and answered by the node that holds the device."""

    def device(self, device_id: str,
               known_here: dict[str, object] | None) -> Awaitable[tuple[int, Any, list[tuple[bytes, bytes]]]]:
        """GET /v1/devices/{id} from the node that holds it (``known_here``: this node's own record, if any)."""

    def connections(self, here: dict[str, Any]) -> Awaitable[tuple[int, Any, list[tuple[bytes, bytes]]]]:
        """GET /v1/connections summed over the cluster (``here``: this node's counts)."""


@dataclass(eq=False, slots=True)
class Services:
    config: Config
    metrics: Metrics
    conns: ConnManager
    pipeline: Pipeline
    # The compiled validator (or its twin): what MQTT, WebSocket and fast HTTP use.
    validator: Any
    # The pure-Python reference validator: the std HTTP engine's.
    std_validator: Any
    durable_timeouts: DurableTimeouts
    # device id -> config, pushed as UPDATE_CONFIG when the device connects
    device_configs: Mapping[str, dict[str, Any]]
    # Sessions call this between reads: the spool's compiled write in flight
    # is finished, and its batch acknowledged, by the first task to see it
    # done instead of at the loop's next I/O poll.
    poll_durable: Callable[[], None]
    # Where connection handlers and their side tasks (SideTasks) run.
    connection_nursery: Callable[[], trio.Nursery]
    # For /readyz: why the gateway is not ready, and the sink's state.
    not_ready_reasons: Callable[[], list[str]]
    sink_status: Callable[[], dict[str, Any]]
    serve_mqtt_stream: ServeMQTTStream
    # Flow control: quotas, bans, shedding (DESIGN section 11).
    limits: FlowGuard
    # Who may use the admin API (DESIGN section 10).
    admin: AdminGate
    # Identity and authorization (gridgate.security); None when no credential
    # store and no ACL is configured: then every check is skipped, anonymous
    # clients are served as before, and a session pays one attribute test.
    auth: Authenticator | None = None
    # The other gateways (gridgate.cluster), set once the node has joined;
    # None on a lone gateway.
    cluster: ClusterView | None = None
    # The task that reads every ready plain-TCP MQTT socket (3.1.1 and 5.0) inline
    # (gridgate.connections.ready_loop), set while the gateway serves; None:
    # each session waits on its own socket.
    ready_loop: ReadyLoop | None = None
    # The validator's bound methods, looked up once (sessions call them per read).
    validate: Callable[..., Any] = field(init=False)
    validate_into: Callable[..., int] = field(init=False)

    def __post_init__(self) -> None:
        self.validate = self.validator.validate
        self.validate_into = self.validator.validate_into
