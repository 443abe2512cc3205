"""Which node holds which device, as far as this node has heard (no I/O).

Fed by the other nodes' Bind/Unbind/Heartbeat/SyncChunk messages
(``gridgate.cluster.messages``); read by command routing and device lookups.
It is eventually consistent: a lost message shows up as a heartbeat whose
count or digest differs from this view, and after ``MISMATCHES_BEFORE_SYNC``
such heartbeats in a row (one may just cross a bind in flight) the node is
asked for its whole list. A node not heard for ``presence_timeout_s`` is
dead: its devices are forgotten, and they are reachable again as soon as
they reconnect to a live node (which announces them).

Bounded: at most ``max_devices`` remote devices are kept (a bind past it is
dropped and counted; routing to such a device answers device_offline).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from gridgate.cluster.messages import add_digest

__all__ = ["Directory", "NodeView", "MISMATCHES_BEFORE_SYNC"]

MISMATCHES_BEFORE_SYNC = 2


@dataclass(slots=True)
class NodeView:
    name: str
    incarnation: int
    last_heard: float
    devices: dict[str, int] = field(default_factory=dict)     # device -> since_ns
    digest: int = 0
    mismatches: int = 0
    syncing: dict[str, int] | None = None                      # chunks of a sync being received


class Directory:
    def __init__(self, me: str, *, presence_timeout_s: float, max_devices: int) -> None:
        self.me = me
        self.presence_timeout_s = presence_timeout_s
        self.max_devices = max_devices
        self.nodes: dict[str, NodeView] = {}
        # device -> (node, since_ns) of the newest session any other node announced
        self._holder: dict[str, tuple[str, int]] = {}
        self.dropped = 0               # binds not kept: max_devices reached

    def __len__(self) -> int:
        return len(self._holder)

    def holder(self, device: str) -> str | None:
        entry = self._holder.get(device)
        return None if entry is None else entry[0]

    def live_nodes(self) -> list[str]:
        return sorted(self.nodes)

    def _view(self, node: str, now: float, incarnation: int = 0) -> NodeView:
        view = self.nodes.get(node)
        if view is None:
            view = self.nodes[node] = NodeView(node, incarnation, now)
        return view

    # -- messages -------------------------------------------------------------------

    def bind(self, node: str, device: str, since_ns: int, now: float) -> None:
        if node == self.me:
            return
        view = self._view(node, now)
        if device not in view.devices:
            if len(self._holder) >= self.max_devices and device not in self._holder:
                self.dropped += 1
                return
            view.digest = add_digest(view.digest, device)
        view.devices[device] = since_ns
        current = self._holder.get(device)
        if current is None or current[1] <= since_ns:
            self._holder[device] = (node, since_ns)

    def unbind(self, node: str, device: str, now: float) -> None:
        view = self.nodes.get(node)
        if view is None or view.devices.pop(device, None) is None:
            return
        view.digest = add_digest(view.digest, device, -1)
        self._forget(node, device)

    def _forget(self, node: str, device: str) -> None:
        current = self._holder.get(device)
        if current is None or current[0] != node:
            return
        # another node may hold it too (a takeover in flight): the newest of those
        best: tuple[str, int] | None = None
        for view in self.nodes.values():
            since = view.devices.get(device)
            if since is not None and view.name != node and (best is None or since > best[1]):
                best = (view.name, since)
        if best is None:
            del self._holder[device]
        else:
            self._holder[device] = best

    def heartbeat(self, node: str, incarnation: int, count: int, digest: int, now: float) -> bool:
        """Note that ``node`` is alive; True when this view of it is off long
        enough that it should be asked for a sync."""
        if node == self.me:
            return False
        view = self.nodes.get(node)
        if view is not None and view.incarnation and view.incarnation != incarnation:
            self.drop(node)            # restarted under the same name: what it held is gone
            view = None
        if view is None:
            view = self._view(node, now, incarnation)
        view.incarnation = incarnation
        view.last_heard = now
        if len(view.devices) == count and view.digest == digest:
            view.mismatches = 0
            return False
        view.mismatches += 1
        if view.mismatches >= MISMATCHES_BEFORE_SYNC:
            view.mismatches = 0
            return True
        return False

    def sync_chunk(self, node: str, incarnation: int, index: int, last: bool, devices: list[tuple[str, int]],
                   now: float) -> None:
        """Take a node's whole list, chunk by chunk; applied at the last chunk."""
        if node == self.me:
            return
        view = self._view(node, now, incarnation)
        if index == 0 or view.syncing is None:
            view.syncing = {}
        view.syncing.update(devices)
        if not last:
            return
        fresh, view.syncing = view.syncing, None
        for device in [d for d in view.devices if d not in fresh]:
            self.unbind(node, device, now)
        for device, since in fresh.items():
            self.bind(node, device, since, now)

    def drop(self, node: str) -> int:
        """Forget a node (it said bye, or was silent too long); returns how many devices it held."""
        view = self.nodes.pop(node, None)
        if view is None:
            return 0
        for device in view.devices:
            self._forget(node, device)
        return len(view.devices)

    def expire(self, now: float) -> list[tuple[str, int]]:
        """Drop every node silent for ``presence_timeout_s``: [(node, devices it held)]."""
        dead = [name for name, view in self.nodes.items() if now - view.last_heard >= self.presence_timeout_s]
        return [(name, self.drop(name)) for name in dead]
