"""The MQTT 5.0 session (DESIGN section 4): the 3.1.1 session's Trio shell
and connection lifecycle around the 5.0 codec.

``MQTTConnection.run`` reads the first CONNECT's protocol level and hands a
level-5 connection here with the bytes it read. What 5.0 changes is this
module's: the CONNACK with the server's properties and the 5.0 reason codes,
a PUBACK/PUBREC per reading that says what became of it (0x00 only once
durable, 0x99 with the rejection's reason code as Reason String, 0x90, 0x87),
Receive Maximum, the decoder chosen by Payload Format Indicator / Content
Type, and a DISCONNECT with a reason before the server closes. The read
loop (on a plain TCP socket, the gateway's ready loop running
``_handle_now``), authentication, takeover, acks on durable and downlink are
the 3.1.1 session's, shared by inheritance.
"""
from __future__ import annotations

import logging
import math
import os
import time
import weakref
from functools import partial
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from gridgate.downlink.commands import (
    Command,
    CommandOutbox,
    DownlinkChannel,
    DownlinkSettings,
    Send,
    encode_command,
    open_channel,
)
from gridgate.ingest.pipeline import WorkItem
from gridgate.ingest.records import MAX_TRACESTATE_CHARS, TRACEPARENT_RE, Record, Rejection
from gridgate.protocols.mqtt.codec5 import codec5
from gridgate.protocols.mqtt.events import PingReq
from gridgate.protocols.mqtt.events5 import (
    Auth,
    Connect5,
    Disconnect5,
    Event5,
    PubAck5,
    Publish5,
    PubRec5,
    PubRel5,
    Subscribe5,
    Unsubscribe5,
)
from gridgate.protocols.mqtt.session import (
    CONNACK_BAD_CREDENTIALS,
    CONNACK_IDENTIFIER_REJECTED,
    CONNACK_NOT_AUTHORIZED,
    CONNACK_SERVER_UNAVAILABLE,
    MQTTConnection,
    _connect_level,
    _Tail,
)
from gridgate.protocols.mqtt.session_store import SessionStore, StoredSession
from gridgate.protocols.mqtt.v5 import (
    BAD_AUTHENTICATION_METHOD,
    BAD_USER_NAME_OR_PASSWORD,
    BANNED,
    CLIENT_IDENTIFIER_NOT_VALID,
    IMPLEMENTATION_SPECIFIC_ERROR,
    KEEP_ALIVE_TIMEOUT,
    NO_PROPERTIES,
    NO_SUBSCRIPTION_EXISTED,
    NOT_AUTHORIZED,
    PACKET_IDENTIFIER_NOT_FOUND,
    PAYLOAD_FORMAT_INVALID,
    QUOTA_EXCEEDED,
    RECEIVE_MAXIMUM_EXCEEDED,
    RETAIN_NOT_SUPPORTED,
    SERVER_BUSY,
    SERVER_SHUTTING_DOWN,
    SESSION_TAKEN_OVER,
    SHARED_SUBSCRIPTIONS_NOT_SUPPORTED,
    SUCCESS,
    TOPIC_FILTER_INVALID,
    TOPIC_NAME_INVALID,
    UNSPECIFIED_ERROR,
    WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED,
    MQTT5Error,
    Properties,
    valid_topic_filter,
)
from gridgate.sinks.forwarding import sink_refusal, sink_refused_any

if TYPE_CHECKING:
    from gridgate.connections.manager import Session
    from gridgate.errors import MQTTProtocolError
    from gridgate.protocols.services import Services

__all__ = ["MQTT5Connection", "VersionedMQTTConnection", "serve_mqtt_stream", "puback_reason", "decoder_format",
           "close_code", "trace_context", "response_topic", "refuse_at_accept", "ACCEPT_REFUSALS"]

log = logging.getLogger("gridgate.mqtt")

_take_publishes5 = codec5.take_publishes5

# The 3.1.1 session's refusals (its CONNACK codes) as 5.0 reason codes.
_REFUSALS = {
    CONNACK_IDENTIFIER_REJECTED: CLIENT_IDENTIFIER_NOT_VALID,
    CONNACK_BAD_CREDENTIALS: BAD_USER_NAME_OR_PASSWORD,
    CONNACK_NOT_AUTHORIZED: NOT_AUTHORIZED,
}

# A rejection's reason code (DESIGN section 3) -> the PUBACK/PUBREC reason
# code; every other reason is the payload's fault: 0x99.
_PUBLISH_REASONS = {
    "bad_topic": TOPIC_NAME_INVALID,
    "not_authorized": NOT_AUTHORIZED,
    "sink_refused": IMPLEMENTATION_SPECIFIC_ERROR,
}

# Longest command id an answer may name (gridgate's are 32 hex digits).
MAX_COMMAND_ID = 128


def response_topic(client_id: str) -> str:
    """Where device ``client_id`` answers its commands: each command PUBLISH
    names it as Response Topic, with the command id as Correlation Data."""
    return f"devices/{client_id}/commands/ack"


# Session.close_reason (set by whoever closed it: the reaper, a takeover, a
# graceful stop) -> the reason code of the DISCONNECT sent before closing.
_CLOSE_REASONS = (
    ("taken over", SESSION_TAKEN_OVER),
    ("reaped: ", KEEP_ALIVE_TIMEOUT),
    ("gateway shutting down", SERVER_SHUTTING_DOWN),
    ("credentials removed", NOT_AUTHORIZED),                 # a SIGHUP reload dropped its identity
    ("client certificate ", NOT_AUTHORIZED),                 # ... revoked its certificate
    ("a client certificate is now required", NOT_AUTHORIZED),
)

_CONTENT_TYPES = {"application/json": "json", "application/msgpack": "msgpack",
                  "application/x-msgpack": "msgpack", "application/vnd.msgpack": "msgpack"}
# The bytes that can start a JSON document: 3.1.1's rule (codec_py.take_publishes) when nothing says.
_JSON_FIRST = frozenset(b'{["-0123456789tfn \t\r\n')


def decoder_format(payload: bytes | memoryview, props: Properties) -> str:
    """The decoder for a PUBLISH's payload: its Content Type when that names
    JSON or MessagePack, else JSON when the Payload Format Indicator says
    UTF-8, else the first byte decides (as for 3.1.1)."""
    if props.content_type is not None:
        fmt = _CONTENT_TYPES.get(props.content_type.split(";", 1)[0].strip().lower())
        if fmt is not None:
            return fmt
    if props.payload_format_indicator == 1:
        return "json"
    return "json" if not payload or payload[0] in _JSON_FIRST else "msgpack"


def _describe(rejection: Rejection) -> str:
    """``out_of_range: temperature``: the dead letter's reason code and what it blames."""
    return f"{rejection.reason}: {rejection.field or rejection.detail}"


def puback_reason(stored: int, rejections: list[Rejection]) -> tuple[int, str | None]:
    """The PUBACK/PUBREC reason code and Reason String for one PUBLISH whose
    payload gave ``stored`` records and ``rejections`` (DESIGN section 4):
    0x00 when anything was stored (a batch's rejected items counted in the
    Reason String), else the first rejection's code."""
    if not rejections:
        return SUCCESS, None
    first = _describe(rejections[0])
    total = stored + len(rejections)
    if stored:
        return SUCCESS, f"{len(rejections)} of {total} items rejected, first {first}"
    code = _PUBLISH_REASONS.get(rejections[0].reason, PAYLOAD_FORMAT_INVALID)
    if len(rejections) > 1:
        return code, f"{first} ({len(rejections)} of {total} items rejected)"
    return code, first


def trace_context(user_properties: tuple[tuple[str, str], ...]) -> tuple[str | None, str | None]:
    """The W3C Trace Context among a PUBLISH's User Properties: the first
    ``traceparent`` that is valid (TRACEPARENT_RE; an invalid one is ignored,
    as a W3C participant restarts the trace) and, with it only, the first
    ``tracestate`` of at most MAX_TRACESTATE_CHARS. Other names are ignored."""
    traceparent = tracestate = None
    for name, value in user_properties:
        if name == "traceparent":
            if traceparent is None and TRACEPARENT_RE.match(value):
                traceparent = value
        elif name == "tracestate":
            if tracestate is None and len(value) <= MAX_TRACESTATE_CHARS:
                tracestate = value
    if traceparent is None:
        return None, None
    return traceparent, tracestate


# One session store per gateway, found by its ConnManager: sessions outlive
# their connections, gateways embedded in one process (tests) must not share
# them, and a stopped gateway's store goes with its ConnManager.
_STORES: weakref.WeakKeyDictionary[Any, SessionStore] = weakref.WeakKeyDictionary()


def session_store(conns: Any) -> SessionStore:
    """The MQTT 5 session store of the gateway whose ConnManager is ``conns``."""
    store = _STORES.get(conns)
    if store is None:
        store = _STORES[conns] = SessionStore()
    return store


def close_code(reason: str | None) -> int | None:
    """The reason code of the DISCONNECT owed to a connection closed for
    ``reason`` (``Session.close_reason``); None: close without one."""
    if reason is None:
        return None
    for prefix, code in _CLOSE_REASONS:
        if reason.startswith(prefix):
            return code
    return None


def _packet_end(data: bytes, offset: int) -> int:
    """Where the packet at ``offset`` in ``data`` ends: after its first byte,
    its Remaining Length (a Variable Byte Integer, 1.5.5) and that many bytes."""
    i, length, shift = offset + 1, 0, 0
    while True:
        byte = data[i]
        length |= (byte & 0x7F) << shift
        i += 1
        if not byte & 0x80:
            return i + length
        shift += 7


class MQTT5Connection(MQTTConnection):
    """One MQTT 5.0 client connection (TCP, TLS or WebSocket)."""

    __slots__ = ("problem_info", "client_max_packet", "client_receive_maximum", "receive_maximum", "inflight",
                 "goodbye", "session_expiry", "resumed", "response_topic", "refusable")

    def __init__(self, stream: trio.abc.Stream, services: Services, session: Session,
                 protocol: str = "mqtt") -> None:
        super().__init__(stream, services, session, protocol)
        config = services.config.mqtt
        # the shared read loop uses what both codecs have: feed() and connected
        self.codec = codec5.MQTT5Codec(  # type: ignore[assignment]
            config.max_packet_bytes, config.topic_alias_maximum)
        # Request Problem Information (3.1.2.11.7): 0 -> no Reason String
        # on anything but CONNACK and DISCONNECT.
        self.problem_info = True
        self.client_max_packet: int | None = None      # the client's Maximum Packet Size
        self.client_receive_maximum = 65535             # its Receive Maximum (65,535 when absent, 3.1.2.11.3)
        self.receive_maximum = config.receive_maximum
        # QoS 1 publishes whose PUBACK is not written yet (QoS 2 ones are
        # qos2_unreleased): against receive_maximum.
        self.inflight = 0
        self.goodbye = False        # a DISCONNECT was sent or is owed no more
        # Session Expiry Interval (s): from CONNECT, changed by the client's DISCONNECT
        self.session_expiry = 0
        self.resumed: StoredSession | None = None     # the stored session this CONNECT resumes
        # where the device answers its commands (their Response Topic): set at CONNECT
        self.response_topic = ""
        # Whether a reading acked on durable may be refused for good by the sink (an external one,
        # behind store-and-forward: gridgate.sinks.forwarding; the spool refuses none): only then
        # does a read keep its acks' spans for 0x83 (_sink_refused).
        self.refusable = self.ack_durable and services.sink_status().get("kind", "spool") != "spool"

    async def run(self, head: bytes | None = None) -> None:
        try:
            await super().run(head)
        except trio.Cancelled:
            await self._say_goodbye(close_code(self.session.close_reason))
            raise
        finally:
            self._keep_session()

    def _keep_session(self) -> None:
        """Store what the device may resume (Session Expiry Interval > 0):
        its command subscription and the commands not acknowledged yet, taken
        from the outbox before its channel closes (so they are kept, not
        counted expired). Not after a takeover: the session went on in the
        newer connection."""
        if not self.session_expiry or self.client_id is None:
            return
        if (self.session.close_reason or "").startswith("taken over"):
            return
        commands: list[tuple[Command, float, int | None, int]] = []
        answerable: dict[str, tuple[float, bool]] = {}
        if self.downlink is not None:
            outbox = self.downlink.outbox
            # in flight: the packet id it was sent with (MQTT-4.4.0-1 resends it with that id)
            commands = [(e.command, e.expires, e.key, e.attempts) for e in outbox.inflight.values()]  # type: ignore[misc]
            commands += [(e.command, e.expires, None, 0) for e in outbox.waiting]
            answerable = dict(outbox.answerable)      # a device back in time may still answer them
            outbox.inflight.clear()
            outbox.waiting.clear()
        # 0xFFFFFFFF: the session does not expire (3.1.2.11.2); the store's bound still holds
        until = math.inf if self.session_expiry == 0xFFFFFFFF else trio.current_time() + self.session_expiry
        session_store(self.svc.conns).save(self.client_id, StoredSession(self.subscribed_qos, commands, until,
                                                                                 answerable))

    def _resume(self, stored: StoredSession) -> None:
        """The stored session's subscription and commands, in this connection.
        A command that was in flight is sent again with DUP=1 and its
        original packet id (section 4.4, MQTT-4.4.0-1), one that was waiting
        waits again; both keep their original TTL (Message Expiry says what
        is left of it)."""
        if stored.subscribed_qos is not None:
            self.subscribed_qos = stored.subscribed_qos
        if stored.commands or stored.answerable:
            channel = self._channel()
            for command, expires, key, attempts in stored.commands:
                channel.outbox.restore(command, expires, key, attempts)
            channel.outbox.answerable.update(stored.answerable)
        if self.downlink is not None:
            if stored.subscribed_qos is not None:
                self.downlink.outbox.set_ready(True, tracked=stored.subscribed_qos >= 1)
            self.downlink.wake()

    def _channel(self) -> DownlinkChannel:
        """This connection's downlink, made on first use (``_offer_command``'s
        outbox, which also takes answers on the Response Topic)."""
        if self.downlink is None:
            outbox = CommandOutbox(self.protocol, self._downlink_settings(), self.svc.metrics, redeliver=True,
                                   packet_ids=True, responses=True)
            if self.subscribed_qos is not None:
                outbox.set_ready(True, tracked=self.subscribed_qos >= 1)
            self.downlink = open_channel(self.session, outbox, self._send_commands, self._side_tasks(), None)
        return self.downlink

    def _offer_command(self, command: Command) -> bool:
        return self._channel().offer(command)

    async def _say_goodbye(self, code: int | None) -> None:
        """The DISCONNECT a server sends before it closes (section 4.13): to
        a socket, only if it takes it now; to another stream, within a
        second. A closing connection waits for nobody."""
        if code is None or self.goodbye or not self.codec.connected:
            return
        self.goodbye = True
        data = codec5.encode_disconnect(code, None, self.client_max_packet)
        if self._fd >= 0:
            if self.out is None or self.out.idle:
                try:
                    os.write(self._fd, data)
                except OSError:
                    pass             # full or gone: the close says enough
            return
        with trio.CancelScope(shield=True), trio.move_on_after(1.0):
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
                pass

    def _protocol_error(self, exc: MQTTProtocolError) -> None:
        self.protocol_error = exc
        self.svc.metrics.protocol_errors.labels(self.protocol, exc.reason).inc()
        log.warning("closing MQTT 5 connection from %s (%s): %s", self.session.remote,
                    self.client_id or "before CONNECT", exc)
        self.session.close_reason = f"protocol error: {exc.reason}"
        if not isinstance(exc, MQTT5Error):
            return
        if exc.return_code is not None and not self.codec.connected:
            self._write(codec5.encode_connack(False, exc.return_code, self._reason_props(exc.detail), None))
        elif self.codec.connected:
            self._disconnect(exc.reason_code, exc.detail)

    def _disconnect(self, code: int, detail: str) -> None:
        self.goodbye = True
        self._write(codec5.encode_disconnect(code, self._reason_props(detail, always=True), self.client_max_packet))

    def _reason_props(self, text: str | None, always: bool = False) -> Properties | None:
        """A Reason String, unless the client asked for none (always: CONNACK
        and DISCONNECT, where the spec lets the server send it anyway)."""
        if text is None or not (self.problem_info or always):
            return None
        return Properties(reason_string=text[:256])

    # -- CONNECT --------------------------------------------------------------

    def _refuse(self, code: int, reason: str) -> bytes:
        self.session.close_reason = reason
        v5_code = BANNED if "banned" in reason else _REFUSALS[code]
        return codec5.encode_connack(False, v5_code, self._reason_props(reason, always=True), self.client_max_packet)

    _connect_event = Connect5

    async def _answer_connect(self, ev: Connect5) -> bytes:  # type: ignore[override]
        return await self._connect5(ev)

    async def _connect5(self, ev: Connect5) -> bytes:
        props = ev.properties
        if props.request_problem_information == 0:
            self.problem_info = False
        self.client_max_packet = props.maximum_packet_size
        if props.receive_maximum is not None:
            self.client_receive_maximum = props.receive_maximum
        if props.authentication_method is not None:
            # enhanced authentication (section 4.12): no method is configured
            self.svc.metrics.protocol_errors.labels(self.protocol, "bad_authentication_method").inc()
            self.session.close_reason = "bad authentication method"
            return codec5.encode_connack(False, BAD_AUTHENTICATION_METHOD, self._reason_props(
                f"authentication method {props.authentication_method[:64]!r} is not supported", always=True),
                self.client_max_packet)
        if ev.will is not None and ev.will.retain:
            # Retain Available is 0: a retained Will is refused (MQTT-3.2.2-13)
            self.svc.metrics.protocol_errors.labels(self.protocol, "retain_not_supported").inc()
            self.session.close_reason = "retained will"
            return codec5.encode_connack(False, RETAIN_NOT_SUPPORTED, self._reason_props(
                "retained messages are not supported", always=True), self.client_max_packet)
        store = session_store(self.svc.conns)
        now = trio.current_time()
        if not ev.clean_start:
            self.resumed = store.peek(ev.client_id, now)     # CONNACK says Session Present
        answer = await self._connect(ev)    # type: ignore[arg-type]  # same fields as a 3.1.1 Connect
        if self.client_id is None:         # refused: whatever is stored stays for the device itself
            self.resumed = None
            return answer
        self.session_expiry = props.session_expiry_interval or 0
        self.response_topic = response_topic(self.client_id)
        if ev.clean_start:
            store.drop(self.client_id)      # MQTT-3.1.2-4
        elif self.resumed is not None:
            stored = store.take(self.client_id, now)
            if stored is not None:
                self._resume(stored)
        return answer

    def _accept(self, ev: object) -> bytes:
        assert isinstance(ev, Connect5)
        config = self.svc.config.mqtt
        keepalive = ev.keepalive
        server_keepalive = None
        if config.max_keepalive_s and (keepalive == 0 or keepalive > config.max_keepalive_s):
            keepalive = server_keepalive = config.max_keepalive_s
        if keepalive:
            self.svc.conns.set_keepalive(self.session, 1.5 * keepalive)
        props = Properties(
            receive_maximum=self.receive_maximum,
            maximum_packet_size=config.max_packet_bytes,
            topic_alias_maximum=config.topic_alias_maximum or None,
            retain_available=0,
            wildcard_subscription_available=0,
            subscription_identifier_available=0,
            shared_subscription_available=0,
            server_keep_alive=server_keepalive,
        )
        return codec5.encode_connack(self.resumed is not None, SUCCESS, props, self.client_max_packet)

    # -- events -----------------------------------------------------------------

    def _handle_now(self, events: list[Event5], nbytes: int, i: int = 0,  # type: ignore[override]
                    answer: bytes | None = None) -> bool | _Tail:
        """The part of _handle that never waits, from events[i] on (after a
        CONNECT, whose ``answer`` goes out first); the ready loop runs it
        (MQTTConnection.on_ready). True/False: keep the connection open or
        not; a _Tail: what is left needs to wait (_finish)."""
        out: list[bytes] = [] if answer is None else [answer]
        records: list[Record] = []
        rejections: list[Rejection] = []
        acks = bytearray()          # the read's PUBACKs/PUBRECs, in order, as they go out
        # 0x00 acks that wait for durable: (offset in acks, qos, packet id, its records' span), so that
        # a reading the external sink refuses gets 0x83 instead (_sink_refused); only behind a sink
        # that can refuse one
        spans: list[tuple[int, int, int, int, int]] | None = [] if self.refusable else None
        qos1_acks = 0
        received_ns = 0
        keep_open = True
        limits = self.svc.limits
        # Over a quota a QoS 1/2 reading is refused with 0x97 instead of the
        # connection being paused (QoS 0 has no answer to carry it: paused).
        reject_over_limit = limits.readings_limited and limits.config.mqtt5_on_limit == "reject"
        # under "reject": QoS 0 readings, which only a pause can charge (no list made otherwise)
        unpaid: list[Record] | None = [] if reject_over_limit else None
        unpaid_bytes = 0
        client_id, telemetry, protocol = self.client_id, self.telemetry_topic, self.protocol
        validate_into = self.svc.validate_into
        plain_ok = client_id is not None and self.allowed_topics is None and not reject_over_limit
        n = len(events)
        while i < n:
            ev = events[i]
            i += 1
            if type(ev) is Publish5:
                rejected: tuple[int, int, int] | None = None
                stored, code = 0, SUCCESS
                text: str | None = None
                if (plain_ok and ev.properties is NO_PROPERTIES
                        and (room := self.receive_maximum - self.inflight - qos1_acks
                             - len(self.qos2_unreleased or ())) >= 0):
                    # the common readings (no properties, the device's own topic, no ACL or quota to
                    # judge): the run of them taken in one compiled call, as 3.1.1's take_publishes does;
                    # each 0x00 PUBACK (4 bytes) and its span for _sink_refused appended there. It takes
                    # nothing if this one is not plain after all (retained, QoS 2, another topic: below),
                    # stops before a QoS 1 publish over what Receive Maximum still allows (below:
                    # DISCONNECT 0x93) and after one whose payload had rejections (below: its reason code).
                    a_before = len(acks)
                    stop, self._next_ns, first_ns, rejected = _take_publishes5(
                        events, i - 1, telemetry, validate_into, protocol, client_id, self._next_ns, time.time_ns,
                        room, records, rejections, acks, spans)
                    if stop >= i:
                        received_ns = received_ns or first_ns
                        qos1_acks += (len(acks) - a_before) >> 2
                        i = stop
                        if rejected is None:
                            continue
                        ev = events[i - 1]
                        assert type(ev) is Publish5
                        _, r_before, n_before = rejected
                        stored = len(records) - r_before
                        code, text = puback_reason(stored, rejections[n_before:])
                if rejected is None:      # else: a plain reading with rejections, its PUBACK below
                    if self.client_id is None:
                        continue      # cannot happen: the codec takes nothing before CONNECT
                    if ev.retain:
                        # Retain Available is 0: the client may not set RETAIN (MQTT-3.2.2-14);
                        # DISCONNECT 0x9A (3.3.1.3)
                        self._disconnect(RETAIN_NOT_SUPPORTED, "retained messages are not supported")
                        self.session.close_reason = "protocol error: retain_not_supported"
                        keep_open = False
                        break
                    now = time.time_ns()
                    publish_ns = now if now > self._next_ns else self._next_ns
                    received_ns = received_ns or publish_ns
                    if ev.qos == 2:
                        if self.qos2_unreleased is None:
                            self.qos2_unreleased = set()
                        if ev.packet_id in self.qos2_unreleased:
                            acks += codec5.encode_pubrec(ev.packet_id, SUCCESS, None, self.client_max_packet)
                            continue      # a redelivery of readings already held: stored once
                    stored = 0
                    if ev.topic == self.response_topic:
                        # a command's answer, not a reading: acked in order with the readings before it
                        code, text = self._command_ack(ev)
                    else:
                        n_before, r_before = len(rejections), len(records)
                        stored = self._take(ev, publish_ns, records, rejections)
                        code, text = puback_reason(stored, rejections[n_before:])
                        if stored and unpaid is not None and not ev.qos:
                            unpaid.extend(records[r_before:])
                            unpaid_bytes += len(ev.payload)
                        elif stored and reject_over_limit:
                            charge = limits.refuse_over_quota(records[r_before:], self.protocol, self.client_id,
                                                              len(ev.payload))
                            if charge.wait > 0:
                                # counted, not dead-lettered (a flood must not fill the store); the device keeps
                                # the reading and may send it again
                                del records[r_before:]
                                del rejections[n_before:]
                                code, text = QUOTA_EXCEEDED, f"quota_exceeded: {charge.name.lstrip('_')}"
                if stored and code == SUCCESS and ev.qos and spans is not None:
                    spans.append((len(acks), ev.qos, ev.packet_id, len(records) - stored, len(records)))
                if ev.qos == 1:
                    qos1_acks += 1
                    acks += codec5.encode_puback(ev.packet_id, code, None if text is None else self._reason_props(text),
                                                 self.client_max_packet)
                elif ev.qos == 2:
                    if code < 0x80:
                        # held until PUBREL; a failed PUBREC ends the exchange (4.3.3)
                        self.qos2_unreleased.add(ev.packet_id)      # type: ignore[union-attr]
                    acks += codec5.encode_pubrec(ev.packet_id, code, self._reason_props(text), self.client_max_packet)
                if self.inflight + qos1_acks + len(self.qos2_unreleased or ()) > self.receive_maximum:
                    self._disconnect(RECEIVE_MAXIMUM_EXCEEDED,
                                     f"more than Receive Maximum {self.receive_maximum} publishes unacknowledged")
                    self.session.close_reason = "protocol error: receive_maximum_exceeded"
                    self.svc.metrics.protocol_errors.labels(self.protocol, "receive_maximum_exceeded").inc()
                    keep_open = False
                    break
            elif type(ev) is PubRel5:
                known = self.qos2_unreleased is not None and ev.packet_id in self.qos2_unreleased
                if known:
                    self.qos2_unreleased.discard(ev.packet_id)      # type: ignore[union-attr]
                out.append(codec5.encode_pubcomp(ev.packet_id, SUCCESS if known else PACKET_IDENTIFIER_NOT_FOUND))
            elif type(ev) is PingReq:
                out.append(codec5.encode_pingresp())
            elif type(ev) is Connect5:
                raise RuntimeError("CONNECT after the first packet")    # the codec refuses it
            elif type(ev) is Subscribe5:
                out.append(self._subscribe(ev))
            elif type(ev) is Unsubscribe5:
                subscribed = self.subscribed_qos is not None and self.command_topic in ev.topic_filters
                if subscribed:
                    self.subscribed_qos = None
                    if self.downlink is not None:
                        self.downlink.outbox.set_ready(False)
                command_topic = self.command_topic
                out.append(codec5.encode_unsuback(
                    ev.packet_id, [SUCCESS if subscribed and t == command_topic else NO_SUBSCRIPTION_EXISTED
                                   for t in ev.topic_filters], None, self.client_max_packet))
            elif type(ev) is Disconnect5:
                if ev.properties.session_expiry_interval is not None:
                    self.session_expiry = ev.properties.session_expiry_interval     # 3.14.2.2.2
                self.session.close_reason = "client disconnected"
                self.goodbye = True
                keep_open = False
                break
            elif type(ev) is PubAck5:
                if self.downlink is not None:
                    self.downlink.outbox.ack(ev.packet_id)  # a downlink command arrived
            elif type(ev) is PubRec5:
                # gridgate publishes at QoS <= 1: no QoS 2 flow of ours has this id, which
                # PUBREL says (4.3.3, 3.6.2.1), so the client's flow ends instead of waiting
                out.append(codec5.encode_pubrel(ev.packet_id, PACKET_IDENTIFIER_NOT_FOUND))
            elif type(ev) is Auth:
                pass  # the codec lets AUTH through only after a CONNECT with a method, which is refused
        ack_bytes = bytes(acks) if acks else b""
        if ack_bytes and not self.ack_durable:
            out.append(ack_bytes)
            ack_bytes = b""
            qos1_acks = 0
        if out:
            self._write(b"".join(out) if len(out) > 1 else out[0])
        if records or rejections or ack_bytes:
            # a partial, not a closure: one object per read (see _acks_durable)
            on_durable = None if not ack_bytes else (
                partial(self._acks_durable5, ack_bytes, qos1_acks) if not spans
                else partial(self._acks_refusable, ack_bytes, qos1_acks, spans, records))
            item = WorkItem(records, rejections, self.protocol, received_ns or time.time_ns(), on_durable)
            if ack_bytes:
                self.pending += 1
                self.inflight += qos1_acks
            try:
                queued = self.svc.pipeline.try_submit(item)
            except BaseException:
                if ack_bytes:
                    self._unqueued(qos1_acks)
                raise
            if not queued or limits.readings_limited:
                # What has to wait: the queue's room, then a quota's pause (the
                # next read waits: TCP backpressure slows the device). Under
                # "reject" the pause is over the QoS 0 readings only, the
                # others were charged or refused (0x97) above.
                paused = records if unpaid is None else unpaid
                if not queued or paused:
                    return _Tail(None if queued else item, paused, unpaid_bytes if reject_over_limit else nbytes,
                                 keep_open, qos1_acks)
        return keep_open

    def _unqueued(self, inflight: int) -> None:
        self.pending -= 1
        self.inflight -= inflight       # no longer unacknowledged: Receive Maximum's count

    def _command_ack(self, ev: Publish5) -> tuple[int, str | None]:
        """A PUBLISH to the Response Topic: its Correlation Data (else its
        payload, the bare command id) names the command it acknowledges, as
        WebSocket's ``{"command_ack": id}`` does. 0x00 when a command of this
        connection's with that id is in flight or still answerable; else
        0x80 with ``unknown_command: <id>``, counted (an unknown, forged or
        expired id changes nothing)."""
        data = ev.properties.correlation_data
        if data is None:
            data = bytes(ev.payload).strip().strip(b'"')
        command_id = data[:MAX_COMMAND_ID].decode("utf-8", "replace")
        if (len(data) <= MAX_COMMAND_ID and self.downlink is not None
                and self.downlink.outbox.answer(command_id, trio.current_time())):
            return SUCCESS, None
        self.svc.metrics.command_acks_refused.labels(self.protocol).inc()
        log.info("command_ack from %s for unknown or expired command %r", self.client_id, command_id[:64])
        return UNSPECIFIED_ERROR, f"unknown_command: {command_id[:64]}"

    def _take(self, ev: Publish5, publish_ns: int, records: list[Record], rejections: list[Rejection]) -> int:
        """Validate one PUBLISH into ``records`` and ``rejections``; returns
        how many records it gave."""
        client_id = self.client_id
        assert client_id is not None
        topic = ev.topic
        if self.allowed_topics is not None and topic not in self.allowed_topics:
            auth = self.svc.auth
            assert auth is not None
            name = self.identity.name if self.identity is not None else None
            if not auth.acl.may_write(name, client_id, topic):
                self.svc.metrics.not_authorized.labels(self.protocol, "publish").inc()
                rejections.append(Rejection(reason="not_authorized", field="topic", index=None, device_id=client_id,
                                            raw=bytes(ev.payload),
                                            detail=f"topic {topic!r} is not writable by this client"))
                return 0
        if topic != self.telemetry_topic and topic != "telemetry":
            rejections.append(Rejection(
                reason="bad_topic", field="topic", index=None, device_id=client_id, raw=bytes(ev.payload),
                detail=f"topic {topic!r} is not 'telemetry' or {self.telemetry_topic!r}"))
            return 0
        n_before = len(records)
        props = ev.properties
        fmt = decoder_format(ev.payload, props)
        taken = self.svc.validate_into(ev.payload, fmt, self.protocol, client_id, publish_ns, records, rejections)
        self._next_ns = publish_ns + taken + 1
        stored = len(records) - n_before
        if stored and props.user_properties:
            traceparent, tracestate = trace_context(props.user_properties)
            if traceparent is not None:
                for i in range(n_before, len(records)):
                    record = records[i]
                    record.traceparent = traceparent
                    record.tracestate = tracestate
        return stored

    def _subscribe(self, ev: Subscribe5) -> bytes:
        command_topic = self.command_topic
        # 0x80 stands for "refused" while the 3.1.1 session's ACL check runs
        codes = [min(s.qos, 1) if s.topic_filter == command_topic else 0x80 for s in ev.subscriptions]
        if self.svc.auth is not None:
            codes = self._judge_subscriptions(self.svc.auth, [(s.topic_filter, s.qos) for s in ev.subscriptions],
                                              codes)
        v5_codes = []
        for sub, code in zip(ev.subscriptions, codes, strict=True):
            if code == 0x80:
                topic = sub.topic_filter
                if not valid_topic_filter(topic):
                    code = TOPIC_FILTER_INVALID
                elif topic.startswith("$share/"):
                    code = SHARED_SUBSCRIPTIONS_NOT_SUPPORTED
                elif "+" in topic or "#" in topic:
                    code = WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED
                else:
                    code = NOT_AUTHORIZED
            v5_codes.append(code)
        granted = [c for c in v5_codes if c < 0x80]
        if granted:
            self.subscribed_qos = max(granted)
            if self.downlink is not None:
                self.downlink.outbox.set_ready(True, tracked=self.subscribed_qos >= 1)
                self.downlink.wake()
        return codec5.encode_suback(ev.packet_id, v5_codes, None, self.client_max_packet)

    # -- output ---------------------------------------------------------------

    def _acks_durable5(self, acks: bytes, qos1_acks: int) -> None:
        """A read's item is durable: send its acks, which are no longer
        unacknowledged for Receive Maximum."""
        self.pending -= 1
        self.inflight -= qos1_acks
        self._write(acks)
        if not self.pending and self.acks_done is not None:
            self.acks_done.set()

    def _acks_refusable(self, acks: bytes, qos1_acks: int, spans: list[tuple[int, int, int, int, int]],
                        records: list[Record]) -> None:
        """As _acks_durable5, behind an external sink: a PUBLISH whose every
        reading it refused in the write just made gets 0x83 instead."""
        if sink_refused_any():
            acks = self._sink_refused(acks, spans, records)
        self._acks_durable5(acks, qos1_acks)

    def _sink_refused(self, acks: bytes, spans: list[tuple[int, int, int, int, int]], records: list[Record]) -> bytes:
        """The acks with 0x83 Implementation specific error for each PUBLISH
        whose every reading the external sink refused in the write just
        made (dead-lettered ``sink_refused``); a batch with some readings in
        the sink keeps its 0x00. ``spans``: each 0x00 ack's offset in
        ``acks``, in order."""
        parts: list[bytes] = []
        at = 0
        for offset, qos, packet_id, start, end in spans:
            why = [sink_refusal(records[j]) for j in range(start, end)]
            if why[0] is None or None in why:
                continue
            text = f"sink_refused: {why[0]}"
            if len(why) > 1:
                text += f" ({len(why)} of {len(why)} items refused)"
            props = self._reason_props(text)
            parts.append(acks[at:offset])
            if qos == 1:
                parts.append(codec5.encode_puback(packet_id, IMPLEMENTATION_SPECIFIC_ERROR, props,
                                                  self.client_max_packet))
            else:
                # a failed PUBREC ends the exchange (4.3.3): no PUBREL follows
                if self.qos2_unreleased is not None:
                    self.qos2_unreleased.discard(packet_id)
                parts.append(codec5.encode_pubrec(packet_id, IMPLEMENTATION_SPECIFIC_ERROR, props,
                                                  self.client_max_packet))
            at = _packet_end(acks, offset)
        if not parts:
            return acks
        parts.append(acks[at:])
        return b"".join(parts)

    def _downlink_settings(self) -> DownlinkSettings:
        """The client's Receive Maximum bounds its commands: the outbox holds
        at most that many (waiting and in flight), so no more than that many
        QoS 1 command PUBLISHes are ever unacknowledged (MQTT-3.3.4-9); more
        are refused at once (503 device_busy) instead of queued."""
        config = self.svc.config.downlink
        if self.client_receive_maximum < config.max_queued:
            return msgspec.structs.replace(config, max_queued=self.client_receive_maximum)
        return config

    async def _send_commands(self, sends: list[Send]) -> None:
        """Commands as MQTT 5 PUBLISHes: what is left of the command's TTL as
        Message Expiry Interval (whole seconds, rounded up: a redelivery or a
        resumed session's command says what is left, not the original), the
        Response Topic and the command id as Correlation Data, which the
        device's PUBLISH there may echo to acknowledge it. One over the
        client's Maximum Packet Size is never sent (MQTT-3.1.2-24), and
        expires unanswered like a command the device never acknowledged."""
        topic = self.command_topic
        response_topic = self.response_topic
        limit = self.client_max_packet
        now = trio.current_time()
        ttl_s = self.svc.config.downlink.command_ttl_s
        frames = []
        for s in sends:
            left = s.expires - now if s.expires != math.inf else ttl_s
            if left <= 0:
                continue     # expired since the poll: never sent (the outbox counts it at its next poll)
            props = Properties(message_expiry_interval=max(1, math.ceil(left)), response_topic=response_topic,
                               correlation_data=s.command.id.encode())
            # s.key: this outbox keys by MQTT packet id (packet_ids=True), an int; mypy sees Hashable
            frame = codec5.encode_publish(topic, encode_command(s.command), 1 if s.tracked else 0,
                                          s.key if s.tracked else 0, False, s.dup, props)  # type: ignore[arg-type]
            if limit is not None and len(frame) > limit:
                log.warning("not sending command %s to %s: %d bytes, over its Maximum Packet Size %d",
                            s.command.id, self.client_id, len(frame), limit)
                continue
            frames.append(frame)
        if frames:
            self._write(b"".join(frames))


class VersionedMQTTConnection(MQTTConnection):
    """What a listener serves: a 3.1/3.1.1 session that hands a level-5
    CONNECT's connection to ``MQTT5Connection``. No slots of its own, so a
    3.1.1 connection costs what it did."""

    __slots__ = ()

    async def _serve_v5(self, head: bytes) -> bool:
        conn = MQTT5Connection(self.stream, self.svc, self.session, self.protocol)
        try:
            await conn.run(head)
        finally:
            self.protocol_error = conn.protocol_error
        return True


async def serve_mqtt_stream(stream: trio.abc.Stream, services: Services, session: Session,
                            protocol: str) -> MQTTProtocolError | None:
    """The MQTT session's one entry point for transports other than TCP.

    Serves MQTT 3.1, 3.1.1 or 5.0 on any Trio byte stream (MQTT over
    WebSocket hands in its message stream) as ``protocol``, until the
    connection ends; returns the protocol error that closed it, if one did,
    so the transport can choose how to close. Other protocols reach this
    through ``Services.serve_mqtt_stream``, never by importing this module.
    """
    conn = VersionedMQTTConnection(stream, services, session, protocol=protocol)
    await conn.run()
    return conn.protocol_error


# Why the listener refused a connection before serving it -> the 5.0 CONNACK
# reason code and Reason String it gets (a 3.1/3.1.1 client gets 0x03).
ACCEPT_REFUSALS = {
    "max_connections": (SERVER_BUSY, "server busy: max_connections reached"),
    "shedding": (SERVER_BUSY, "server busy: the sink's commit latency is over its threshold"),
    "max_connections_per_ip": (QUOTA_EXCEEDED, "quota exceeded: max_connections_per_ip reached"),
}
# What a refused connection may cost: the CONNECT's first bytes (enough for
# its protocol level: 1 + 4 + 2 + 4 + 1) within this long, no more.
ACCEPT_HEAD_BYTES = 12
ACCEPT_HEAD_TIMEOUT_S = 0.5


async def refuse_at_accept(stream: trio.abc.Stream, why: str, max_packet_bytes: int) -> None:
    """The CONNACK for a connection the listener refuses before serving it
    (``why``: a key of ACCEPT_REFUSALS), shaped for the client's version:
    read at most ACCEPT_HEAD_BYTES of its CONNECT, for at most
    ACCEPT_HEAD_TIMEOUT_S, and a level-5 one gets the 5.0 reason code with a
    Reason String; anything else (3.1, 3.1.1, garbage, silence) 3.1.1's
    0x03 server unavailable. The caller counts and closes."""
    head = b""
    with trio.move_on_after(ACCEPT_HEAD_TIMEOUT_S):
        try:
            while len(head) < ACCEPT_HEAD_BYTES and _connect_level(head, max_packet_bytes) is None:
                chunk = await stream.receive_some(ACCEPT_HEAD_BYTES - len(head))
                if not chunk:
                    break
                head += chunk
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
    if _connect_level(head, max_packet_bytes) == 5:
        code, text = ACCEPT_REFUSALS[why]
        answer = codec5.encode_connack(False, code, Properties(reason_string=text), None)
    else:
        answer = b"\x20\x02\x00" + bytes([CONNACK_SERVER_UNAVAILABLE])
    with trio.move_on_after(1.0):
        try:
            await stream.send_all(answer)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
