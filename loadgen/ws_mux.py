"""WebSocket devices on the one-task-per-process driver (``loadgen.mqtt_mux.Mux``).

With a reader and a sender task per device, each window of acks cost two
Trio task wake-ups, an ``epoll_ctl`` per wait and the scheduler's
bookkeeping: about half of the ws load generator's CPU. Here the device's
socket sits in the mux's epoll after the handshake (which stays in the
device's own task, through wsproto), and each read of acks is counted and
answered by the device's next window in the same pass, as for MQTT.

What a device does is ``ws_device.WsDevice``'s: the same masked frames,
the same parsing of a read (``take_read``), commands and server pings
answered, a WebSocket ping when nothing was sent for keepalive/2 s (and the
connection dropped when its pong is not back within max(keepalive/2, 10) s
of the next check), a close frame at the end.
"""
from __future__ import annotations

from loadgen.mqtt_mux import MuxSlot
from loadgen.ws_device import OP_CLOSE, OP_PING, WsDevice, client_frame

__all__ = ["WsMuxDevice"]

_CLOSE_NORMAL = (1000).to_bytes(2, "big")


class WsMuxDevice(MuxSlot, WsDevice):
    """A ``WsDevice`` whose connection the ``Mux`` runs."""

    @property  # type: ignore[override]
    def goodbye(self) -> bytes:
        """A close frame (1000), masked with a fresh key each time."""
        return client_frame(OP_CLOSE, _CLOSE_NORMAL)

    def ping_bytes(self, now: float) -> bytes:
        if self.pong_due is None:
            self.pong_due = now + max(self.opts.keepalive / 2, 10.0)
        return client_frame(OP_PING, b"")

    def got_pong(self) -> None:
        self.pong_due = None
