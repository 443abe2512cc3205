"""One gateway as a node of a cluster over NATS (DESIGN section 12).

The node tells the others which devices it holds (``Bind``/``Unbind`` as
the connection registry binds and unbinds them), hears which they hold
(``Directory``), and answers their requests for the devices it holds. So:

- takeover across nodes: a node that hears a newer ``Bind`` of a device it
  holds closes its own session (MQTT: as on one node; the newest session
  wins, by bind time, ties broken by node name);
- a downlink command POSTed to any node reaches the device where it is
  connected; ``GET /v1/devices/{id}`` and ``/v1/connections`` answer for the
  whole cluster (``Services.cluster``, read by the HTTP API);
- presence: every node sends a heartbeat every ``heartbeat_s``; a node not
  heard for ``presence_timeout_s`` is dead, its devices forgotten; they are
  reachable again when they reconnect to a live node. Stopping gracefully, a
  node says ``Bye`` and is forgotten at once.

Requests between nodes are bounded by ``request_timeout_s``; a node that
does not answer in time gets the HTTP client a 504 ``cluster_timeout``.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any

import msgspec
import trio
from prometheus_client import Counter, Gauge

from gridgate.cluster import messages as m
from gridgate.cluster.bus import Bus, BusError, BusMessage, BusTimeout
from gridgate.cluster.directory import Directory
from gridgate.protocols.http.api import RemoteReply, deliver_command

if TYPE_CHECKING:
    from gridgate.config import ClusterConfig
    from gridgate.connections.manager import Session
    from gridgate.gateway import Gateway

__all__ = ["ClusterNode", "default_node_name", "node_token"]

log = logging.getLogger("gridgate.cluster")

_NODE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


def node_token(name: str) -> str:
    """A node name as one NATS subject token (no dots, spaces or wildcards)."""
    return "".join(c if c in _NODE_CHARS else "_" for c in name)[:128] or "node"


def default_node_name() -> str:
    """hostname-pid: unique per process on a host, and per host in a fleet."""
    return node_token(f"{socket.gethostname()}-{os.getpid()}")


class ClusterNode:
    """Joins ``gateway`` to the cluster of ``config``; ``run`` until cancelled."""

    def __init__(self, gateway: Gateway, config: ClusterConfig) -> None:
        self.gateway = gateway
        self.services = gateway.services
        self.conns = gateway.conns
        self.config = config
        self.name = node_token(config.node) if config.node else default_node_name()
        self.prefix = config.subject_prefix
        self.incarnation = time.time_ns()
        self.joined = trio.Event()
        self._name_clash_logged = False
        self.directory = Directory(self.name, presence_timeout_s=config.presence_timeout_s,
                                   max_devices=config.max_devices)
        self.bus = Bus(config.nats_servers, f"gridgate-{self.name}", connect_timeout_s=config.connect_timeout_s)
        self.bus.on_reconnect = self._heartbeat
        # the devices bound here: device -> (session id, since_ns); and their digest
        self._local: dict[str, tuple[int, int]] = {}
        self._digest = 0
        r = gateway.metrics.registry
        self.m_nodes = Gauge("gridgate_cluster_nodes", "Other gateway nodes heard within presence_timeout_s",
                             registry=r, multiprocess_mode="livemax")
        self.m_remote = Gauge("gridgate_cluster_remote_devices", "Devices other nodes hold, as this node knows",
                              registry=r, multiprocess_mode="livemax")
        self.m_takeovers = Counter("gridgate_cluster_takeovers",
                                   "Sessions closed here because another node took the device over", registry=r)
        self.m_lost = Counter("gridgate_cluster_nodes_lost",
                              "Nodes forgotten without a bye: silent for presence_timeout_s, or unreachable "
                              "by a request", ["why"], registry=r)
        self.m_requests = Counter("gridgate_cluster_requests", "Requests to other nodes, by kind and outcome",
                                  ["kind", "outcome"], registry=r)
        self.m_bad = Counter("gridgate_cluster_bad_messages", "Cluster messages that could not be decoded, dropped",
                             registry=r)

    # -- lifecycle ------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[ClusterNode] = trio.TASK_STATUS_IGNORED) -> None:
        """Join (retrying while NATS is unreachable: the gateway serves its
        devices meanwhile, as a lone node), then keep the heartbeat until cancelled."""
        task_status.started(self)
        wait = 0.5
        while True:
            try:
                await self.bus.connect()
                break
            except BusError as exc:
                log.warning("cluster: cannot join yet (retrying in %gs): %s", wait, exc)
                await trio.sleep(wait)
                wait = min(wait * 2, 30.0)
        try:
            p = self.prefix
            for subject, handler in ((f"{p}.bind", self._on_bind), (f"{p}.unbind", self._on_unbind),
                                     (f"{p}.hb", self._on_heartbeat), (f"{p}.bye", self._on_bye),
                                     (f"{p}.connections", self._on_connections),
                                     (f"{p}.node.{self.name}.*", self._on_request)):
                await self.bus.subscribe(subject, handler)
            # devices already bound (none at start, but a node may join late)
            for session in self.conns:
                if session.device_id is not None and self.conns.get_device(session.device_id) is session:
                    self.device_bound(session)
            self.conns.observer = self
            self.services.cluster = self
            self._heartbeat()
            log.info("cluster: node %s joined over NATS %s (subjects %s.*)", self.name,
                     ", ".join(self.config.nats_servers), p)
            self.joined.set()
            while True:
                await trio.sleep(self.config.heartbeat_s)
                self._heartbeat()
                self._expire()
        finally:
            self.services.cluster = None
            self.conns.observer = None
            with trio.CancelScope(shield=True):
                self.bus.publish(f"{self.prefix}.bye", m.encode(m.Bye(self.name)))
                await self.bus.aclose()

    def _heartbeat(self) -> None:
        self.bus.publish(f"{self.prefix}.hb",
                         m.encode(m.Heartbeat(self.name, self.incarnation, len(self._local), self._digest)))

    def _expire(self) -> None:
        for node, held in self.directory.expire(trio.current_time()):
            self.m_lost.labels("silent").inc()
            log.warning("cluster: node %s not heard for %gs: forgetting the %d devices it held", node,
                        self.config.presence_timeout_s, held)
        self._gauges()

    def _gauges(self) -> None:
        self.m_nodes.set(len(self.directory.nodes))
        self.m_remote.set(len(self.directory))

    # -- the registry's observer (DeviceObserver) -------------------------------------

    def device_bound(self, session: Session) -> None:
        device = session.device_id
        assert device is not None
        since = time.time_ns()
        if device not in self._local:
            self._digest = m.add_digest(self._digest, device)
        self._local[device] = (session.id, since)
        self.bus.publish(f"{self.prefix}.bind", m.encode(m.Bind(self.name, device, since)))

    def device_unbound(self, session: Session) -> None:
        device = session.device_id
        assert device is not None
        entry = self._local.get(device)
        if entry is None or entry[0] != session.id:
            return
        del self._local[device]
        self._digest = m.add_digest(self._digest, device, -1)
        self.bus.publish(f"{self.prefix}.unbind", m.encode(m.Unbind(self.name, device, entry[1])))

    # -- what others say ----------------------------------------------------------------

    def _decode(self, msg: BusMessage) -> Any:
        try:
            return m.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.m_bad.inc()
            log.debug("cluster: undecodable message on %s: %s", msg.subject, exc)
            return None

    def _on_bind(self, msg: BusMessage) -> None:
        bind = self._decode(msg)
        if not isinstance(bind, m.Bind) or bind.node == self.name:
            return
        self.directory.bind(bind.node, bind.device, bind.since_ns, trio.current_time())
        entry = self._local.get(bind.device)
        if entry is None:
            return
        _, since = entry
        if (since, self.name) < (bind.since_ns, bind.node):
            session = self.conns.get_device(bind.device)
            if session is not None:
                self.m_takeovers.inc()
                self.gateway.metrics.connections_taken_over.labels(session.protocol).inc()
                log.info("takeover of %s by node %s: closing its connection from %s here", bind.device,
                         bind.node, session.remote)
                session.close(f"taken over by node {bind.node}")

    def _on_unbind(self, msg: BusMessage) -> None:
        unbind = self._decode(msg)
        if isinstance(unbind, m.Unbind) and unbind.node != self.name:
            self.directory.unbind(unbind.node, unbind.device, trio.current_time())

    def _on_heartbeat(self, msg: BusMessage) -> None:
        hb = self._decode(msg)
        if not isinstance(hb, m.Heartbeat):
            return
        if hb.node == self.name:
            if hb.incarnation != self.incarnation and not self._name_clash_logged:
                # two gateways configured with one [cluster] node name: each would take the other's
                # requests and announcements for its own; say so loudly, once
                self._name_clash_logged = True
                log.error("cluster: another gateway uses this node's name %r: give each its own "
                          "[cluster] node (or leave it unset: hostname-pid)", self.name)
            return
        known = hb.node in self.directory.nodes
        if self.directory.heartbeat(hb.node, hb.incarnation, hb.count, hb.digest, trio.current_time()) or (
                not known and hb.count):
            # new to us, or our view of it drifted: ask for its whole list
            self.bus.publish(f"{self.prefix}.node.{node_token(hb.node)}.sync", m.encode(m.SyncRequest(self.name)))
        if not known:
            log.info("cluster: node %s joined (%d devices)", hb.node, hb.count)
            # it does not know ours yet either
            self._heartbeat()
        self._gauges()

    def _on_bye(self, msg: BusMessage) -> None:
        bye = self._decode(msg)
        if isinstance(bye, m.Bye) and bye.node != self.name:
            held = self.directory.drop(bye.node)
            log.info("cluster: node %s left (it held %d devices)", bye.node, held)
            self._gauges()

    def _on_connections(self, msg: BusMessage) -> None:
        if msg.reply:
            self.bus.publish(msg.reply, m.encode(m.ConnectionCount(self.name, len(self.conns),
                                                                   self.conns.by_protocol())))

    def _on_request(self, msg: BusMessage) -> None:
        req = self._decode(msg)
        if isinstance(req, m.SyncRequest):
            self._send_sync(req.node)
        elif isinstance(req, m.SyncChunk):
            self.directory.sync_chunk(req.node, req.incarnation, req.index, req.last, req.devices,
                                      trio.current_time())
            self._gauges()
        elif isinstance(req, m.CommandRequest) and msg.reply:
            status, body, extra = deliver_command(self.services, req.device, req.body)
            self._answer(msg.reply, status, body)
            del extra       # only a 503 device_busy has one (retry-after), rebuilt by the asking node
        elif isinstance(req, m.DeviceRequest) and msg.reply:
            info = self.conns.device_info(req.device)
            if info is None or not info["online"]:
                self._answer(msg.reply, 404, {"error": "device_offline",
                                              "detail": f"node {self.name} does not hold {req.device!r}"})
            else:
                self._answer(msg.reply, 200, {**info, "node": self.name})

    def _answer(self, reply: str, status: int, body: Any) -> None:
        self.bus.publish(reply, m.encode(m.RemoteAnswer(self.name, status, body)))

    def _send_sync(self, asker: str) -> None:
        devices = [(d, since) for d, (_, since) in self._local.items()]
        subject = f"{self.prefix}.node.{node_token(asker)}.synced"
        chunks = [devices[i:i + m.SYNC_CHUNK] for i in range(0, len(devices), m.SYNC_CHUNK)] or [[]]
        for i, chunk in enumerate(chunks):
            self.bus.publish(subject, m.encode(m.SyncChunk(self.name, self.incarnation, i, i == len(chunks) - 1,
                                                          chunk)))

    # -- the HTTP API's view of the cluster (ClusterView) ---------------------------------

    def holder(self, device_id: str) -> str | None:
        return self.directory.holder(device_id)

    async def _ask(self, kind: str, node: str, request: m.CommandRequest | m.DeviceRequest) -> RemoteReply:
        subject = f"{self.prefix}.node.{node_token(node)}.{kind}"
        try:
            data = await self.bus.request(subject, m.encode(request), self.config.request_timeout_s)
        except BusTimeout:
            self.m_requests.labels(kind, "timeout").inc()
            return 504, {"error": "cluster_timeout",
                         "detail": f"node {node} did not answer within {self.config.request_timeout_s:g}s"}, []
        except BusError as exc:
            self.m_requests.labels(kind, "unreachable").inc()
            # nobody listens for that node any more: it is gone
            if node in self.directory.nodes:
                held = self.directory.drop(node)
                self.m_lost.labels("unreachable").inc()
                log.warning("cluster: node %s is unreachable: forgetting the %d devices it held", node, held)
                self._gauges()
            return 404, {"error": "device_offline", "detail": f"node {node} is unreachable: {exc}"}, []
        answer = self._decode(BusMessage(subject, data, ""))
        if not isinstance(answer, m.RemoteAnswer):
            return 502, {"error": "cluster_error", "detail": f"node {node} answered something else"}, []
        self.m_requests.labels(kind, str(answer.status)).inc()
        extra = [(b"retry-after", b"1")] if answer.status == 503 else []
        return answer.status, answer.body, extra

    async def command(self, node: str, device_id: str, body: bytes) -> RemoteReply:
        status, obj, extra = await self._ask("command", node, m.CommandRequest(self.name, device_id, body))
        if status == 404 and isinstance(obj, dict) and obj.get("error") == "device_offline":
            # it left that node meanwhile: the directory hears of it by the unbind
            obj = {"error": "device_offline", "detail": f"no live connection holds device {device_id!r}"}
        return status, obj, extra

    async def device(self, node: str, device_id: str, known_here: dict[str, object] | None) -> RemoteReply:
        status, obj, extra = await self._ask("device", node, m.DeviceRequest(self.name, device_id))
        if status == 404:
            if known_here is not None:
                return 200, known_here, []
            return 404, {"error": "not_found", "detail": "device never seen"}, []
        return status, obj, extra

    async def connections(self, here: dict[str, Any]) -> RemoteReply:
        want = len(self.directory.nodes)
        replies: list[bytes] = []
        if want:
            try:
                replies = await self.bus.gather(f"{self.prefix}.connections", b"", self.config.request_timeout_s,
                                                want + 1)   # our own answer comes too
            except BusError:
                replies = []
        total = here["total"]
        by_protocol = dict(here["by_protocol"])
        nodes = {self.name: here}
        for data in replies:
            count = self._decode(BusMessage("", data, ""))
            if not isinstance(count, m.ConnectionCount) or count.node in nodes:
                continue
            nodes[count.node] = {"total": count.total, "by_protocol": count.by_protocol}
            total += count.total
            for proto, n in count.by_protocol.items():
                by_protocol[proto] = by_protocol.get(proto, 0) + n
        missing = sorted(set(self.directory.nodes) - set(nodes))
        return 200, {"total": total, "by_protocol": by_protocol, "nodes": nodes, "nodes_missing": missing}, []
