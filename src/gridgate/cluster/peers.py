"""Which other nodes are alive, as far as this node has heard (no I/O).

Fed by the other nodes' heartbeats and byes; read to know how many answers
a question to the whole cluster should wait for, and who did not answer. A
node not heard for ``presence_timeout_s`` is dead. Nothing per device is
kept here: a node knows only its own devices, and asks the cluster when it
needs another's (``gridgate.cluster.node``), so a node's memory grows with
its own connections, not with the cluster's (at a million devices a full
directory on every node would cost more than the node's own connections).
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Peers", "Peer"]


@dataclass(slots=True)
class Peer:
    name: str
    incarnation: int
    last_heard: float
    devices: int = 0               # as its last heartbeat said


class Peers:
    def __init__(self, me: str, *, presence_timeout_s: float) -> None:
        self.me = me
        self.presence_timeout_s = presence_timeout_s
        self.nodes: dict[str, Peer] = {}

    def __len__(self) -> int:
        return len(self.nodes)

    def names(self) -> list[str]:
        return sorted(self.nodes)

    def heartbeat(self, node: str, incarnation: int, devices: int, now: float) -> bool:
        """Note that ``node`` is alive; True when it is new (or restarted under its name)."""
        if node == self.me:
            return False
        peer = self.nodes.get(node)
        new = peer is None or peer.incarnation != incarnation
        if peer is None or new:
            peer = self.nodes[node] = Peer(node, incarnation, now)
        peer.last_heard = now
        peer.devices = devices
        return new

    def drop(self, node: str) -> Peer | None:
        """Forget a node (it said bye); what was known of it."""
        return self.nodes.pop(node, None)

    def expire(self, now: float) -> list[Peer]:
        """Drop and return every node silent for ``presence_timeout_s``."""
        dead = [p for p in self.nodes.values() if now - p.last_heard >= self.presence_timeout_s]
        for p in dead:
            del self.nodes[p.name]
        return dead
