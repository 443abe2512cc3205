"""WebSocket devices on the one-task-per-process driver (``loadgen.mqtt_mux.Mux``).

With a reader and a sender task per device, each window of acks cost two
Trio task wake-ups, an ``epoll_ctl`` per wait and the scheduler's
bookkeeping: about half of the ws load generator's CPU. Here the device's
socket sits in the mux's epoll after the handshake (which stays in the
device's own task, through wsproto), and each read of acks is counted and
answered by the device's next window in the same pass, as for MQTT.

An earlier try of ws on this mux gained nothing (6.2-7.6 against 5.6-7.8 us
per reading at 20 x 10): then a cancel scope per wait-readable cost more than
the few reads each wake-up found, and each ack was still parsed on its own.
With one scope per deadline (``Mux.run``) and a read of acks compared whole
(``WsDevice.take_read``), measured on 2 shared cores (load average 6-7),
against one gateway, alternating with the per-device tasks of before (which
sent unmasked frames): 4.6-5.0 against 6.2-6.5 us of CPU per acked reading at
100 devices x 10 in flight, 5.1-5.5 against 6.2-7.1 at 20 x 10
(``loadgen_cpu_us_per_reading_steady``), every frame now masked.

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
