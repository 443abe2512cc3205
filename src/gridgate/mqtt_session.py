"""The MQTT 3.1.1 session: a thin Trio shell around the sans-IO codec.

Per read: one ``receive_some`` of up to ``receive_bytes``, one ``codec.feed``
call that decodes every complete packet, one validator call per PUBLISH, one
WorkItem into the pipeline, one ``send_all`` for the immediate answers
(CONNACK, SUBACK, PINGRESP, PUBCOMP). PUBACK/PUBREC go out once the batch
holding the reading is durable: the batcher appends them to this
connection's outgoing buffer and a writer task (started on the first such
ack, so idle connections have no second task) sends each buffer's contents
in one ``send_all``.
"""
from __future__ import annotations

import logging
import re
import time
from typing import TYPE_CHECKING

import trio

from gridgate import hotpath
from gridgate.downlink import (
    UPDATE_CONFIG, Command, CommandOutbox, DownlinkChannel, Send, encode_command, new_command, open_channel,
)
from gridgate.errors import MQTTProtocolError
from gridgate.mqtt_events import (
    PUBACK, PUBCOMP, PUBREC, Connect, Disconnect, PingReq, PubAck, PubComp, Publish, PubRec, PubRel,
    Subscribe, Unsubscribe,
)
from gridgate.pipeline import WorkItem
from gridgate.records import DEVICE_ID_PATTERN, Rejection

if TYPE_CHECKING:
    from gridgate.connmanager import Session
    from gridgate.gateway import Gateway

__all__ = ["MQTTConnection", "DEVICE_ID_RE"]

log = logging.getLogger("gridgate.mqtt")

DEVICE_ID_RE = re.compile(DEVICE_ID_PATTERN + r"\Z")

# CONNACK return codes, MQTT 3.1.1 section 3.2.2.3.
CONNACK_ACCEPTED = 0
CONNACK_IDENTIFIER_REJECTED = 2
CONNACK_SERVER_UNAVAILABLE = 3

# Bytes a JSON document can start with (whitespace or the first byte of a
# value); anything else is taken as MessagePack. A MessagePack payload that
# starts with one of these is a bare positive integer, not a reading, so
# nothing valid is misjudged.
_JSON_FIRST = frozenset(b'{["-0123456789tfn \t\r\n')

_mqtt = hotpath.mqtt


class MQTTConnection:
    """One MQTT client connection (TCP, later WebSocket: any Trio Stream)."""

    def __init__(self, stream: trio.abc.Stream, gateway: "Gateway", session: "Session",
                 protocol: str = "mqtt") -> None:
        self.stream = stream
        self.gw = gateway
        self.session = session
        self.protocol = protocol
        cfg = gateway.config.mqtt
        self.codec = _mqtt.MQTTCodec(cfg.max_packet_bytes)
        self.receive_bytes = cfg.receive_bytes
        self.max_outgoing = cfg.max_outgoing_bytes
        self.ack_durable = gateway.config.pipeline.ack == "durable"
        self.client_id: str | None = None
        self.telemetry_topic = ""
        self.command_topic = ""
        self.subscribed_qos: int | None = None
        # QoS 2 packet ids received (PUBREC owed or sent) and not yet released.
        self.qos2_unreleased: set[int] = set()
        # Downlink commands (gridgate.downlink), set up once CONNECT names the device.
        self.downlink: DownlinkChannel | None = None
        # The error that closed the connection, for a transport that reports
        # it (MQTT over WebSocket picks its close code from it).
        self.protocol_error: MQTTProtocolError | None = None
        self._next_ns = 0                   # receive times handed out stay increasing (see _handle)
        self.outbuf = bytearray()
        self.pending = 0                    # items submitted, not yet durable
        self.send_lock = trio.Lock()
        self.writer_started = False
        self.closed = False
        self._nursery: trio.Nursery | None = None
        self._out_ready = trio.Event()
        self._drained = trio.Event()
        self._idle = trio.Event()

    # -- lifecycle ----------------------------------------------------------

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self._read_loop()
                # Reading stopped for a graceful shutdown: deliver the acks
                # still owed before closing (the gateway bounds this wait).
                # A client that closed or broke the protocol gets none.
                while self.session.read_scope.cancelled_caught and (self.pending or self.outbuf):
                    self._idle = trio.Event()
                    if not self.writer_started and not self.pending:
                        break
                    await self._idle.wait()
                nursery.cancel_scope.cancel()
        finally:
            self.closed = True

    async def _read_loop(self) -> None:
        session = self.session
        receive_some = self.stream.receive_some
        feed = self.codec.feed
        size = self.receive_bytes
        with session.read_scope:
            while True:
                if len(self.outbuf) > self.max_outgoing:
                    # The client does not read its acks: stop reading it.
                    session.paused = True
                    self._drained = trio.Event()
                    await self._drained.wait()
                    session.paused = False
                data = await receive_some(size)
                if not data:
                    session.close_reason = session.close_reason or "client closed"
                    return
                session.last_seen = trio.current_time()
                try:
                    events = feed(data)
                except MQTTProtocolError as exc:
                    await self._protocol_error(exc)
                    return
                if not await self._handle(events):
                    return

    async def _protocol_error(self, exc: MQTTProtocolError) -> None:
        self.protocol_error = exc
        self.gw.metrics.protocol_errors.labels(self.protocol, exc.reason).inc()
        log.warning("closing MQTT connection from %s (%s): %s", self.session.remote,
                    self.client_id or "before CONNECT", exc)
        self.session.close_reason = f"protocol error: {exc.reason}"
        if exc.return_code is not None and not self.codec.connected:
            await self._send_now(_mqtt.encode_connack(False, exc.return_code))

    # -- events -------------------------------------------------------------

    async def _handle(self, events: list) -> bool:
        """Act on the events of one read. False: close the connection."""
        out: list[bytes] = []
        records: list = []
        rejections: list = []
        durable_pubacks: list[int] = []
        durable_pubrecs: list[int] = []
        keep_open = True
        received_ns = 0
        validate = self.gw.validate
        for ev in events:
            if type(ev) is Publish:
                # Readings without a device timestamp take their receive time;
                # each publish gets a later ns than the last one's readings, so
                # a burst stays distinct points in a time-series sink.
                now_ns = time.time_ns()
                publish_ns = now_ns if now_ns > self._next_ns else self._next_ns
                if not received_ns:
                    received_ns = publish_ns
                qos = ev.qos
                if qos == 2:
                    pid = ev.packet_id
                    if pid in self.qos2_unreleased:
                        # A redelivery of a reading we already hold: store it
                        # once, answer PUBREC again (MQTT 4.3.3, method B).
                        durable_pubrecs.append(pid)
                        continue
                    self.qos2_unreleased.add(pid)
                topic = ev.topic
                if topic == self.telemetry_topic or topic == "telemetry":
                    payload = ev.payload
                    fmt = "json" if not payload or payload[0] in _JSON_FIRST else "msgpack"
                    recs, rejs = validate(payload, fmt, self.protocol, self.client_id, publish_ns)
                    self._next_ns = publish_ns + len(recs) + len(rejs) + 1
                    if recs:
                        records.extend(recs)
                    if rejs:
                        rejections.extend(rejs)
                else:
                    rejections.append(Rejection(
                        reason="bad_topic", field="topic", index=None, device_id=self.client_id,
                        raw=bytes(ev.payload),
                        detail=f"topic {topic!r} is not 'telemetry' or {self.telemetry_topic!r}"))
                if qos == 1:
                    durable_pubacks.append(ev.packet_id)
                elif qos == 2:
                    durable_pubrecs.append(ev.packet_id)
            elif type(ev) is PubRel:
                self.qos2_unreleased.discard(ev.packet_id)
                out.append(_mqtt.encode_pubcomp(ev.packet_id))
            elif type(ev) is PingReq:
                out.append(_mqtt.encode_pingresp())
            elif type(ev) is Connect:
                answer = self._connect(ev)
                out.append(answer)
                if self.client_id is None:
                    keep_open = False
                    break
            elif type(ev) is Subscribe:
                codes = [min(qos, 1) if topic == self.command_topic else 0x80 for topic, qos in ev.topics]
                if codes and any(c != 0x80 for c in codes):
                    self.subscribed_qos = max(c for c in codes if c != 0x80)
                    if self.downlink is not None:
                        # commands waiting for this subscription go out right after the SUBACK
                        self.downlink.outbox.set_ready(True, tracked=self.subscribed_qos >= 1)
                        self.downlink.wake()
                out.append(_mqtt.encode_suback(ev.packet_id, codes))
            elif type(ev) is Unsubscribe:
                if self.command_topic in ev.topics:
                    self.subscribed_qos = None
                    if self.downlink is not None:
                        self.downlink.outbox.set_ready(False)
                out.append(_mqtt.encode_unsuback(ev.packet_id))
            elif type(ev) is Disconnect:
                self.session.close_reason = "client disconnected"
                keep_open = False
                break
            elif type(ev) is PubAck:
                if self.downlink is not None:
                    self.downlink.outbox.ack(ev.packet_id)  # a downlink command arrived
            elif type(ev) in (PubRec, PubComp):
                pass  # QoS 2 acks: gridgate publishes at QoS <= 1, so none are owed
        acks = b""
        if durable_pubacks:
            acks = _mqtt.encode_acks(PUBACK, durable_pubacks)
        if durable_pubrecs:
            acks += _mqtt.encode_acks(PUBREC, durable_pubrecs)
        if acks and not self.ack_durable:
            out.append(acks)
            acks = b""
        if out:
            await self._send_now(b"".join(out) if len(out) > 1 else out[0])
        if records or rejections or acks:
            item = WorkItem(records, rejections, self.protocol, received_ns or time.time_ns(),
                            self._make_on_durable(acks) if acks else None)
            if acks:
                self.pending += 1
            pipeline = self.gw.pipeline
            if not pipeline.try_submit(item):
                self.session.paused = True
                try:
                    await pipeline.submit(item)
                except BaseException:
                    # Not queued (e.g. shutdown): never acked, so nothing owed.
                    if acks:
                        self.pending -= 1
                    raise
                finally:
                    self.session.paused = False
        return keep_open

    def _connect(self, ev: Connect) -> bytes:
        client_id = ev.client_id
        if not DEVICE_ID_RE.match(client_id):
            self.gw.metrics.protocol_errors.labels(self.protocol, "identifier_rejected").inc()
            log.warning("rejecting MQTT client id %r from %s: not a valid device id", client_id, self.session.remote)
            self.session.close_reason = "identifier rejected"
            return _mqtt.encode_connack(False, CONNACK_IDENTIFIER_REJECTED)
        self.client_id = client_id
        self.telemetry_topic = f"devices/{client_id}/telemetry"
        self.command_topic = f"devices/{client_id}/commands"
        conns = self.gw.conns
        conns.bind_device(self.session, client_id)
        if ev.keepalive:
            conns.set_keepalive(self.session, 1.5 * ev.keepalive)
        # The downlink state is built with the first command, so the many
        # connections that never get one cost nothing for it.
        self.session.send_command = self._offer_command
        device_config = self.gw.device_configs.get(client_id)
        if device_config is not None:
            self._offer_command(new_command(UPDATE_CONFIG, device_config))
        return _mqtt.encode_connack(False, CONNACK_ACCEPTED)

    def _offer_command(self, command: Command) -> bool:
        if self.downlink is None:
            assert self._nursery is not None
            outbox = CommandOutbox(self.protocol, self.gw.config.downlink, self.gw.metrics, redeliver=True,
                                   packet_ids=True)
            if self.subscribed_qos is not None:
                outbox.set_ready(True, tracked=self.subscribed_qos >= 1)
            self.downlink = open_channel(self.session, outbox, self._send_commands, self._nursery, None)
        return self.downlink.offer(command)

    # -- output ---------------------------------------------------------------

    async def _send_now(self, data: bytes) -> None:
        async with self.send_lock:
            await self.stream.send_all(data)

    async def _send_commands(self, sends: list[Send]) -> None:
        topic = self.command_topic
        frames = [_mqtt.encode_publish(topic, encode_command(s.command), 1 if s.tracked else 0,
                                       s.key if s.tracked else 0, False, s.dup)
                  for s in sends]
        try:
            await self._send_now(b"".join(frames))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.session.close("peer stopped reading")

    def _make_on_durable(self, acks: bytes):
        def on_durable() -> None:
            self.pending -= 1
            if self.closed:
                return
            self.outbuf += acks
            if not self.writer_started:
                self.writer_started = True
                assert self._nursery is not None
                self._nursery.start_soon(self._writer)
            else:
                self._out_ready.set()
        return on_durable

    async def _writer(self) -> None:
        try:
            while True:
                while not self.outbuf:
                    if not self.pending:
                        self._idle.set()
                    self._out_ready = trio.Event()
                    await self._out_ready.wait()
                data = bytes(self.outbuf)
                self.outbuf.clear()
                async with self.send_lock:
                    await self.stream.send_all(data)
                self._drained.set()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.session.close("peer stopped reading")
