"""One gateway as a node of a cluster over NATS (DESIGN section 12).

A node knows its own devices and which other nodes are alive (``Peers``),
nothing more; it asks the cluster when it needs a device it does not hold:

- takeover across nodes: binding a device, a node announces it (``Bind``);
  a node holding an older session of the device closes it, as a second
  CONNECT does on one node (the newest session wins: bind time, then node
  name);
- a downlink command POSTed to any node is asked of every node (``Ask``);
  the holder delivers it and its answer is the HTTP answer (202, 503
  device_busy); ``GET /v1/devices/{id}`` the same way, and
  ``/v1/connections`` sums every node's counts (``Services.cluster``, read
  by the HTTP API). No node answering that it holds the device: 404
  ``device_offline``, at once when every live node answered, else after
  ``request_timeout_s`` a 504 ``cluster_timeout`` naming the silent nodes;
- presence: every node sends a heartbeat every ``heartbeat_s``; a node not
  heard for ``presence_timeout_s`` is dead (no longer waited for); stopping
  gracefully, a node says ``Bye``. Its devices are reachable again as soon
  as they reconnect to a live node: there is no directory to go stale.

Why no directory of every device on every node: at a million devices it
would cost each node more memory than its own connections, and every bind
in the cluster would have to be stored everywhere; a command or a device
lookup (rare, operator-driven) costs one question to the cluster instead.
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
from gridgate.cluster.bus import Bus, BusError, BusMessage
from gridgate.cluster.peers import Peers
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


def _held(data: bytes) -> bool:
    # runs on the bus's asyncio thread for each answer: the holder's ends the wait
    try:
        answer = m.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return False
    return isinstance(answer, m.Answer) and answer.held


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
        self.peers = Peers(self.name, presence_timeout_s=config.presence_timeout_s)
        self.bus = Bus(config.nats_servers, f"gridgate-{self.name}", connect_timeout_s=config.connect_timeout_s)
        self.bus.on_reconnect = self._heartbeat
        # when each device bound here was bound (wall clock, ns): a takeover compares it
        self._since: dict[str, int] = {}
        r = gateway.metrics.registry
        self.m_nodes = Gauge("gridgate_cluster_nodes", "Other gateway nodes heard within presence_timeout_s",
                             registry=r, multiprocess_mode="livemax")
        self.m_takeovers = Counter("gridgate_cluster_takeovers",
                                   "Sessions closed here because another node took the device over", registry=r)
        self.m_lost = Counter("gridgate_cluster_nodes_lost",
                              "Nodes forgotten without a bye, silent for presence_timeout_s", registry=r)
        self.m_asks = Counter("gridgate_cluster_asks", "Questions to the cluster about a device, by kind and outcome",
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
            for subject, handler in ((f"{p}.bind", self._on_bind), (f"{p}.hb", self._on_heartbeat),
                                     (f"{p}.bye", self._on_bye), (f"{p}.ask", self._on_ask),
                                     (f"{p}.connections", self._on_connections)):
                await self.bus.subscribe(subject, handler)
            # devices bound before the node joined
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
        self.bus.publish(f"{self.prefix}.hb", m.encode(m.Heartbeat(self.name, self.incarnation, len(self._since))))

    def _expire(self) -> None:
        for peer in self.peers.expire(trio.current_time()):
            self.m_lost.inc()
            log.warning("cluster: node %s not heard for %gs: it is gone (it held %d devices)", peer.name,
                        self.config.presence_timeout_s, peer.devices)
        self.m_nodes.set(len(self.peers))

    # -- the registry's observer (DeviceObserver) -------------------------------------

    def device_bound(self, session: Session) -> None:
        device = session.device_id
        assert device is not None
        since = self._since[device] = time.time_ns()
        self.bus.publish(f"{self.prefix}.bind", m.encode(m.Bind(self.name, device, since)))

    def device_unbound(self, session: Session) -> None:
        assert session.device_id is not None
        self._since.pop(session.device_id, None)

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
        since = self._since.get(bind.device)
        if since is None or (since, self.name) >= (bind.since_ns, bind.node):
            return
        session = self.conns.get_device(bind.device)
        if session is not None:
            self.m_takeovers.inc()
            self.gateway.metrics.connections_taken_over.labels(session.protocol).inc()
            log.info("takeover of %s by node %s: closing its connection from %s here", bind.device, bind.node,
                     session.remote)
            session.close(f"taken over by node {bind.node}")

    def _on_heartbeat(self, msg: BusMessage) -> None:
        hb = self._decode(msg)
        if not isinstance(hb, m.Heartbeat):
            return
        if hb.node == self.name:
            if hb.incarnation != self.incarnation and not self._name_clash_logged:
                # two gateways configured with one [cluster] node name: each would take the other's
                # answers for its own; say so loudly, once
                self._name_clash_logged = True
                log.error("cluster: another gateway uses this node's name %r: give each its own "
                          "[cluster] node (or leave it unset: hostname-pid)", self.name)
            return
        if self.peers.heartbeat(hb.node, hb.incarnation, hb.devices, trio.current_time()):
            log.info("cluster: node %s joined (%d devices)", hb.node, hb.devices)
            self._heartbeat()              # so it hears of this node at once too
            self.m_nodes.set(len(self.peers))

    def _on_bye(self, msg: BusMessage) -> None:
        bye = self._decode(msg)
        if isinstance(bye, m.Bye) and bye.node != self.name:
            peer = self.peers.drop(bye.node)
            if peer is not None:
                log.info("cluster: node %s left (it held %d devices)", bye.node, peer.devices)
            self.m_nodes.set(len(self.peers))

    def _on_connections(self, msg: BusMessage) -> None:
        if msg.reply:
            self.bus.publish(msg.reply, m.encode(m.ConnectionCount(self.name, len(self.conns),
                                                                   self.conns.by_protocol())))

    def _on_ask(self, msg: BusMessage) -> None:
        ask = self._decode(msg)
        if not isinstance(ask, m.Ask) or ask.node == self.name or not msg.reply:
            return
        session = self.conns.get_device(ask.device)
        if session is None or session.cancel_scope.cancel_called:
            answer = m.Answer(self.name, False)
        elif ask.kind == "command":
            status, body, _ = deliver_command(self.services, ask.device, ask.body)
            answer = m.Answer(self.name, True, status, body)
        else:
            info = self.conns.device_info(ask.device)
            answer = m.Answer(self.name, True, 200, {**(info or {}), "node": self.name})
        self.bus.publish(msg.reply, m.encode(answer))

    # -- the HTTP API's view of the cluster (ClusterView) ---------------------------------

    async def _ask(self, ask: m.Ask) -> tuple[m.Answer | None, list[str]]:
        """The holder's answer, if a node holds the device; and the live nodes that did not answer."""
        expected = set(self.peers.names())
        if not expected:
            return None, []
        try:
            replies = await self.bus.gather(f"{self.prefix}.ask", m.encode(ask), self.config.request_timeout_s,
                                            len(expected), enough=_held)
        except BusError as exc:
            log.warning("cluster: cannot ask the other nodes about %s: %s", ask.device, exc)
            self.m_asks.labels(ask.kind, "unreachable").inc()
            return None, sorted(expected)
        answered: set[str] = set()
        for data in replies:
            answer = self._decode(BusMessage("", data, ""))
            if not isinstance(answer, m.Answer):
                continue
            if answer.held:
                self.m_asks.labels(ask.kind, "held").inc()
                return answer, []
            answered.add(answer.node)
        silent = sorted(expected - answered)
        self.m_asks.labels(ask.kind, "silent" if silent else "offline").inc()
        return None, silent

    def _not_held(self, silent: list[str], device_id: str, offline: RemoteReply) -> RemoteReply:
        if silent:
            return 504, {"error": "cluster_timeout",
                         "detail": f"no node said it holds {device_id!r}, and {', '.join(silent)} did not answer "
                                   f"within {self.config.request_timeout_s:g}s"}, []
        return offline

    async def command(self, device_id: str, body: bytes) -> RemoteReply:
        answer, silent = await self._ask(m.Ask(self.name, "command", device_id, body))
        if answer is not None:
            extra = [(b"retry-after", b"1")] if answer.status == 503 else []
            return answer.status, answer.body, extra
        return self._not_held(silent, device_id, (404, {"error": "device_offline",
                                                        "detail": f"no live connection holds device {device_id!r}"},
                                                  []))

    async def device(self, device_id: str, known_here: dict[str, object] | None) -> RemoteReply:
        answer, silent = await self._ask(m.Ask(self.name, "device", device_id))
        if answer is not None:
            return answer.status, answer.body, []
        if known_here is not None:
            return 200, known_here, []
        return self._not_held(silent, device_id, (404, {"error": "not_found", "detail": "device never seen"}, []))

    async def connections(self, here: dict[str, Any]) -> RemoteReply:
        expected = set(self.peers.names())
        replies: list[bytes] = []
        if expected:
            try:
                replies = await self.bus.gather(f"{self.prefix}.connections", b"", self.config.request_timeout_s,
                                                len(expected) + 1)   # our own answer comes too
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
        missing = sorted(expected - set(nodes))
        return 200, {"total": total, "by_protocol": by_protocol, "nodes": nodes, "nodes_missing": missing}, []
