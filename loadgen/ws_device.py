"""One simulated device on the gateway's WebSocket channel ``/v1/ws``.

Each message is an envelope ``{"seq": n, "readings": [...K readings...]}``
(a text JSON message, or a binary MessagePack one), built once per device:
only ``n`` is spliced in per message. The gateway answers each envelope,
after durable and in order, with ``{"ack": n, "accepted", "rejected",
"errors"}``; up to ``--inflight`` envelopes are unacknowledged per device.
A downlink ``{"command": {"id", ...}}`` is answered with
``{"command_ack": id}`` and counted.

The client is trio-websocket: its reader task (one per connection) runs in
the device's ``background`` nursery, so ``connect()`` can hand back an open
connection like the other devices do.
"""
from __future__ import annotations

from urllib.parse import quote

import msgspec
import trio
import trio_websocket
from trio_websocket import ConnectionClosed, HandshakeError, WebSocketConnection

from loadgen.device import READING, Device, DeviceOptions
from loadgen.stats import Stats

__all__ = ["WsDevice", "build_envelope"]

_RECEIVE_BYTES = 65536
_MAX_MESSAGE_BYTES = 1 << 20
_HANDSHAKE_ERRORS = (HandshakeError, ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError)


class _Command(msgspec.Struct):
    id: str


class _ServerMessage(msgspec.Struct):
    """An ack or a command; other fields (``errors``, a command's type and
    payload) are skipped by the decoder."""
    ack: int | None = None
    accepted: int = 0
    rejected: int = 0
    command: _Command | None = None


_decode_json = msgspec.json.Decoder(_ServerMessage).decode
_decode_msgpack = msgspec.msgpack.Decoder(_ServerMessage).decode


def build_envelope(readings: list[dict], fmt: str) -> tuple[bytes, bytes]:
    """``(head, tail)`` of ``{"seq": n, "readings": readings}``: a message is
    ``head + n + tail``, n as decimal digits (JSON) or a MessagePack uint32."""
    if fmt == "msgpack":
        # fixmap of 2, "seq", uint32 (0xce + 4 bytes, valid for every n < 2**32), "readings", array
        whole = msgspec.msgpack.encode({"seq": 0xFFFFFFFF, "readings": readings})
        marker = b"\xa3seq\xce\xff\xff\xff\xff"
    else:
        whole = msgspec.json.encode({"seq": 0, "readings": readings})
        marker = b'"seq":0'
    cut = whole.index(marker) + len(marker)
    return whole[:cut - (4 if fmt == "msgpack" else 1)], whole[cut:]


class WsDevice(Device):
    """Sends seq'd envelopes of ``--batch`` readings, up to ``--inflight`` unacknowledged."""

    def __init__(self, index: int, opts: DeviceOptions, stats: Stats, local_address: str | None) -> None:
        super().__init__(index, opts, stats, local_address)
        self.resource = "/v1/ws?device_id=" + quote(self.client_id, safe="")
        host = f"[{opts.host}]" if ":" in opts.host else opts.host
        self.host_header = f"{host}:{opts.port}"
        head, tail = build_envelope([READING] * opts.batch, opts.payload)
        self.binary = opts.payload == "msgpack"
        if self.binary:
            self.head_b, self.tail_b = head, tail
        else:
            self.head_s, self.tail_s = head.decode(), tail.decode()
        self.next_seq = 1
        self.inflight: dict[int, float] = {}        # seq -> intended send time
        self._connection_scope: trio.CancelScope | None = None

    # -- connection ----------------------------------------------------------------

    async def connect(self) -> WebSocketConnection:
        assert self.background is not None
        try:
            with trio.fail_after(self.opts.connect_timeout):
                return await self.background.start(self._hold_connection)
        except _HANDSHAKE_ERRORS as exc:
            raise ConnectionError(f"WebSocket handshake failed: {exc!r}") from None
        except BaseExceptionGroup as group:   # raised in trio-websocket's reader task during the handshake
            matched, rest = group.split(_HANDSHAKE_ERRORS + (OSError,))
            if rest is None and matched is not None:
                raise ConnectionError(f"WebSocket handshake failed: {matched.exceptions[0]!r}") from None
            raise

    async def _hold_connection(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Open the TCP connection (from ``local_address``), do the WebSocket
        handshake and host the connection's reader task until it is closed."""
        tcp = await self.open_stream(self.opts.host, self.opts.port, local_address=self.local_address)
        started = False
        try:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    ws = await trio_websocket.wrap_client_stream(
                        nursery, tcp, self.host_header, self.resource,
                        message_queue_size=self.opts.inflight + 16, max_message_size=_MAX_MESSAGE_BYTES,
                        receive_buffer_size=_RECEIVE_BYTES)
                    self._connection_scope = scope
                    task_status.started(ws)
                    started = True
        except Exception:
            if not started:
                raise
            # The reader failed after the handshake: its channel is closed, so
            # the session's get_message() sees the end and the device reconnects.
        finally:
            await trio.aclose_forcefully(tcp)

    async def say_goodbye(self, stream: WebSocketConnection) -> None:
        await stream.aclose()          # the closing handshake, code 1000

    async def close(self, stream: WebSocketConnection) -> None:
        await trio.aclose_forcefully(stream)
        if self._connection_scope is not None:
            self._connection_scope.cancel()   # ends the reader task even if it waits on a full queue
            self._connection_scope = None

    # -- traffic ----------------------------------------------------------------------

    async def send(self, stream: WebSocketConnection, dues: list[float]) -> None:
        """One message per due. Each is in ``inflight`` before it is written
        (its ack may arrive while the write yields); one whose write fails
        goes back to the replay buffer, so ``sent`` counts only what went out."""
        inflight, send_message = self.inflight, stream.send_message
        seq, sent = self.next_seq, 0
        try:
            if self.binary:
                head, tail = self.head_b, self.tail_b
                for due in dues:
                    inflight[seq] = due
                    await send_message(head + seq.to_bytes(4, "big") + tail)
                    seq += 1
                    sent += 1
            else:
                head_s, tail_s = self.head_s, self.tail_s
                for due in dues:
                    inflight[seq] = due
                    await send_message(head_s + str(seq) + tail_s)
                    seq += 1
                    sent += 1
        except BaseException as exc:
            if seq in inflight:
                self.replay.append(inflight.pop(seq))
            if isinstance(exc, ConnectionClosed):
                raise ConnectionError(f"WebSocket closed while sending: {exc.reason}") from None
            raise
        finally:
            self.next_seq = seq
            self.stats.sent += sent * self.opts.batch

    async def reader(self, stream: WebSocketConnection) -> None:
        stats, inflight, batch = self.stats, self.inflight, self.opts.batch
        record = stats.histogram.record_value
        get_message = stream.get_message
        try:
            while True:
                message = await get_message()
                try:
                    m = _decode_json(message) if isinstance(message, str) else _decode_msgpack(message)
                except msgspec.DecodeError:
                    stats.errors += 1       # not an ack nor a command: the server broke the protocol
                    continue
                if m.ack is not None:
                    due = inflight.pop(m.ack, None)
                    if due is None:
                        continue
                    if m.accepted:
                        stats.acked += m.accepted
                        record(min(max(int((trio.current_time() - due) * 1e6), 1), 60_000_000), m.accepted)
                    if m.rejected:
                        stats.rejected += m.rejected
                        stats.errors += m.rejected
                    elif m.accepted != batch:
                        stats.errors += 1   # an ack that accounts for fewer readings than were sent
                    self.ack_event.set()
                elif m.command is not None:
                    ack = {"command_ack": m.command.id}
                    await stream.send_message(msgspec.msgpack.encode(ack) if self.binary
                                              else msgspec.json.encode(ack).decode())
                    stats.commands += 1
        except ConnectionClosed as exc:
            raise ConnectionError(f"WebSocket closed by the server: {exc.reason}") from None

    async def pinger(self, stream: WebSocketConnection) -> None:
        """A WebSocket ping whenever nothing was sent for keepalive/2 seconds;
        no pong in time means the connection is dead."""
        interval = max(self.opts.keepalive / 2, 0.5)
        while True:
            await trio.sleep(interval)
            if trio.current_time() - self.last_send >= interval:
                try:
                    with trio.move_on_after(max(interval, 10.0)) as wait:
                        await stream.ping()
                except ConnectionClosed as exc:
                    raise ConnectionError(f"WebSocket closed: {exc.reason}") from None
                if wait.cancelled_caught:
                    raise ConnectionError("no pong to a WebSocket ping")
                self.last_send = trio.current_time()
