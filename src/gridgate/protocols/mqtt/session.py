"""The MQTT 3.1.1 session: a thin Trio shell around the sans-IO codec.

Per read: one read of up to ``receive_bytes``, one ``codec.feed`` call that
decodes every complete packet, one validator call per PUBLISH, one WorkItem
into the pipeline, one write for the immediate answers (CONNACK, SUBACK,
PINGRESP, PUBCOMP). PUBACK/PUBREC go out once the batch holding the reading
is durable: the batcher writes them to the socket itself (see ``_write``);
only what the socket does not take waits for a writer task, started then.

On a plain TCP socket, once CONNECT is done, the reads are made by the
gateway's ready loop (gridgate.connections.ready_loop) while the task is
parked in it: ``on_ready`` runs the read's synchronous part
(``_handle_now``) inline, and only what has to wait (a full queue, a
quota's pause, a close) wakes the task (``_finish``).
"""
from __future__ import annotations

import logging
import os
import time
from functools import partial
from typing import TYPE_CHECKING

import trio

from gridgate.connections.fdwait import wait_readable
from gridgate.connections.side_tasks import SideTasks
from gridgate.downlink.commands import (
    UPDATE_CONFIG,
    Command,
    CommandOutbox,
    DownlinkChannel,
    DownlinkSettings,
    Send,
    encode_command,
    new_command,
    open_channel,
)
from gridgate.errors import MQTTProtocolError
from gridgate.ingest.pipeline import WorkItem
from gridgate.ingest.records import DEVICE_ID_RE, Record, Rejection
from gridgate.protocols.mqtt.codec import codec as _mqtt
from gridgate.protocols.mqtt.events import (
    PUBACK,
    PUBREC,
    Connect,
    Disconnect,
    Event,
    PingReq,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    Subscribe,
    Unsubscribe,
)
from gridgate.protocols.outgoing import Outgoing, wait_acks_sent
from gridgate.security.authenticator import ANONYMOUS, Authenticator, AuthFailure, Identity, source_address

if TYPE_CHECKING:
    from gridgate.connections.manager import Session
    from gridgate.protocols.services import Services

__all__ = ["MQTTConnection"]

log = logging.getLogger("gridgate.mqtt")

# CONNACK return codes, MQTT 3.1.1 section 3.2.2.3.
CONNACK_ACCEPTED = 0
CONNACK_IDENTIFIER_REJECTED = 2
CONNACK_SERVER_UNAVAILABLE = 3
CONNACK_BAD_CREDENTIALS = 4
CONNACK_NOT_AUTHORIZED = 5

_take_publishes = _mqtt.take_publishes

# Reads in a row that found data before the session yields to others anyway.
_READS_PER_YIELD = 4

# How long a closing connection waits for the socket to take its last bytes.
FLUSH_TIMEOUT_S = 5.0


class MQTTConnection:
    """One MQTT client connection (TCP, or WebSocket: any Trio Stream).

    An idle connection is one task and a few small objects: the task's
    nursery, the graceful-shutdown scope, the writer task and its events are
    all made on first use (see ``SideTasks``), because at 15,000 idle
    devices every eagerly made object costs megabytes.
    """

    __slots__ = (
        "stream", "svc", "session", "protocol", "codec", "ack_durable", "client_id", "telemetry_topic",
        "subscribed_qos", "qos2_unreleased", "downlink", "protocol_error", "_next_ns", "pending",
        "closed", "_fd", "_side", "out", "acks_done", "identity", "allowed_topics",
    )

    def __init__(self, stream: trio.abc.Stream, services: Services, session: Session,
                 protocol: str = "mqtt") -> None:
        self.stream = stream
        self.svc = services
        self.session = session
        self.protocol = protocol
        self.codec = _mqtt.MQTTCodec(services.config.mqtt.max_packet_bytes)
        self.ack_durable = services.config.pipeline.ack == "durable"
        self.client_id: str | None = None
        self.telemetry_topic = ""
        self.subscribed_qos: int | None = None
        # QoS 2 packet ids received (PUBREC owed or sent) and not yet released;
        # made by the first QoS 2 publish.
        self.qos2_unreleased: set[int] | None = None
        # Downlink commands (gridgate.downlink.commands), set up by the first command.
        self.downlink: DownlinkChannel | None = None
        # The error that closed the connection, for a transport that reports
        # it (MQTT over WebSocket picks its close code from it).
        self.protocol_error: MQTTProtocolError | None = None
        self._next_ns = 0                   # receive times handed out stay increasing (see _handle)
        self.pending = 0                    # items submitted, not yet durable
        self.closed = False
        # The socket's fd when the stream is a plain TCP socket: answers and
        # acks are written to it directly (see _write); -1 otherwise.
        self._fd = -1
        if isinstance(stream, trio.SocketStream):
            self._fd = stream.socket.fileno()
        self._side: SideTasks | None = None
        # Bytes the socket did not take at once, and their writer task: made
        # on first need (most connections never need them).
        self.out: Outgoing[bytes] | None = None
        self.acks_done: trio.Event | None = None
        # Who authenticated (None: anonymous, or no credential store at all).
        self.identity: Identity | None = None
        # With an Authenticator: the telemetry topics the ACL lets this client
        # write. A publish to any other topic is judged one by one (_take_judged).
        # None without one: no check at all.
        self.allowed_topics: frozenset[str] | None = None

    @property
    def command_topic(self) -> str:
        return f"devices/{self.client_id}/commands"

    # -- lifecycle ----------------------------------------------------------

    async def run(self, head: bytes | None = None) -> None:
        """Serve the connection until it ends. ``head``: bytes already read
        from it (a session for another protocol version took them over);
        None: read the CONNECT's protocol level first, and hand a level-5
        connection to the MQTT 5.0 session."""
        # One coroutine frame for the whole read loop: each frame on an idle
        # connection's stack is a few hundred bytes of RSS at 15k connections.
        session = self.session
        codec = self.codec
        size = self.svc.config.mqtt.receive_bytes
        max_outgoing = self.svc.config.mqtt.max_outgoing_bytes
        fd = self._fd
        receive_some = None if fd >= 0 else self.stream.receive_some
        poll_durable = self.svc.poll_durable
        unyielded = 0
        # The last read came back short: the socket is most likely empty now.
        # True at the start: the CONNECT's read took what the client sent, and
        # an EAGAIN there would leave the frame object its traceback made
        # (328 bytes) on every idle connection.
        drained = True
        data: bytes | bytearray | None
        events: list[Event] | None
        try:
            if head is None:
                head = await self._read_connect_head(size)
                if _connect_level(head, self.codec.max_packet_bytes) == 5 and await self._serve_v5(head):
                    return
            keep_reading = await self._handle_head(head)
            head = None             # the CONNECT's bytes would stay for the connection's life
            # The ready loop reads the socket's fd itself: a plain TCP socket
            # only (TLS and WebSocket streams keep this task's read loop).
            # Every session class (3.1.1 and 5.0) splits a read into
            # _handle_now, which the loop runs, and _finish.
            ready_loop = self.svc.ready_loop if fd >= 0 else None
            while keep_reading:
                if self.out is not None and self.out.size > max_outgoing:
                    # The client does not read its acks: stop reading it.
                    session.paused = True
                    await self.out.wait_sent()
                    session.paused = False
                if ready_loop is not None and self.client_id is not None:   # CONNECT done (it may await)
                    if ready_loop.closed:
                        ready_loop = None
                        drained = True
                        continue
                    # The ready loop reads the socket and runs _handle_now for
                    # every read it can finish without waiting; this task
                    # wakes only for what has to wait (see on_ready).
                    got = await ready_loop.park(self)
                    if got is False:
                        break
                    if type(got) is _Tail:
                        if not await self._finish(got):
                            break
                        poll_durable()
                    continue
                if receive_some is None:
                    # Straight to the socket: SocketStream.receive_some and
                    # the trio socket's helpers would add four frames to every
                    # idle connection's stack and a context manager per read.
                    if drained:
                        # A short read emptied the socket: wait before reading
                        # again rather than spend a syscall on the EAGAIN.
                        await wait_readable(fd)
                        unyielded = 0
                    try:
                        data = os.read(fd, size)
                    except BlockingIOError:
                        data = None      # wait outside the handler: it would keep the exception alive
                    except OSError as exc:       # reset by the peer
                        session.close_reason = session.close_reason or f"connection lost: {exc.strerror}"
                        break
                    if data is None:
                        drained = True
                        continue
                    drained = len(data) < size
                    # Only a client that keeps the socket full reads on
                    # without waiting; it yields every few reads, for
                    # fairness and cancellation.
                    unyielded += 1
                    if unyielded >= _READS_PER_YIELD:
                        unyielded = 0
                        await trio.lowlevel.checkpoint()
                else:
                    data = await receive_some(size)
                if not data:
                    session.close_reason = session.close_reason or "client closed"
                    break
                session.last_seen = trio.current_time()
                try:
                    events = codec.feed(data)
                except MQTTProtocolError as exc:
                    self._protocol_error(exc)
                    break
                nbytes = len(data)
                data = None
                if not await self._handle(events, nbytes):
                    break
                events = None
                poll_durable()
            await self._flush()
        except trio.Cancelled:
            deadline = session.drain_deadline
            if deadline is not None:
                # Graceful shutdown stopped the reading: deliver the acks
                # still owed, until the gateway's drain deadline. A client
                # that closed or broke the protocol gets none.
                with trio.CancelScope(deadline=deadline, shield=True):
                    await wait_acks_sent(self)
            raise
        finally:
            self.closed = True
            if self._side is not None:
                self._side.cancel()

    async def _read_connect_head(self, size: int) -> bytes:
        """The connection's first bytes, read until they show the CONNECT's
        protocol level or cannot be a CONNECT (at most 13 bytes decide);
        b"" when the client closed first. Runs once per connection, so the
        read loop itself pays nothing for telling versions apart."""
        head = b""
        chunk: bytes | bytearray
        fd = self._fd
        while True:
            if fd >= 0:
                await wait_readable(fd)
                try:
                    chunk = os.read(fd, size)
                except BlockingIOError:
                    continue
                except OSError as exc:       # reset by the peer
                    self.session.close_reason = self.session.close_reason or f"connection lost: {exc.strerror}"
                    return b""
            else:
                chunk = await self.stream.receive_some(size)
            if not chunk:
                return head
            head += chunk
            self.session.last_seen = trio.current_time()
            if _connect_level(head, self.codec.max_packet_bytes) is not None:
                return head

    async def _serve_v5(self, head: bytes) -> bool:
        """Serve a level-5 CONNECT's connection to its end (True), or leave
        it to this session (False: the 3.1.1 codec answers CONNACK 0x01).
        session5's subclass serves it; this module cannot, as session5
        builds on it."""
        return False

    async def _handle_head(self, head: bytes) -> bool:
        """What ``run`` does with each read, for the bytes read before the
        loop. False: close the connection."""
        if not head:
            self.session.close_reason = self.session.close_reason or "client closed"
            return False
        try:
            events = self.codec.feed(head)
        except MQTTProtocolError as exc:
            self._protocol_error(exc)
            return False
        return await self._handle(events, len(head))

    def _protocol_error(self, exc: MQTTProtocolError) -> None:
        self.protocol_error = exc
        self.svc.metrics.protocol_errors.labels(self.protocol, exc.reason).inc()
        log.warning("closing MQTT connection from %s (%s): %s", self.session.remote,
                    self.client_id or "before CONNECT", exc)
        self.session.close_reason = f"protocol error: {exc.reason}"
        if exc.return_code is not None and not self.codec.connected:
            self._write(_mqtt.encode_connack(False, exc.return_code))

    # -- events -------------------------------------------------------------

    # The codec's CONNECT event and the coroutine that answers it: MQTT 5.0's
    # session sets its own, and shares _handle.
    _connect_event: type = Connect

    async def _answer_connect(self, ev: Connect) -> bytes:
        return await self._connect(ev)

    async def _handle(self, events: list[Event], nbytes: int = 0) -> bool:
        """Act on the events of one read (``nbytes`` long). False: close the connection."""
        if events and type(events[0]) is self._connect_event:     # the codec lets CONNECT be the first packet only
            answer = await self._answer_connect(events[0])  # type: ignore[arg-type]  # the first event is a CONNECT
            if self.client_id is None:
                self._write(answer)
                return False
            done = self._handle_now(events, nbytes, 1, answer)
        else:
            done = self._handle_now(events, nbytes)
        if type(done) is _Tail:
            return await self._finish(done)
        return done is True

    # -- the ready loop's fast path ---------------------------------------------

    def ready_fd(self) -> int:
        return self._fd

    def on_ready(self, now: float) -> object:
        """One read, run by the ready loop (gridgate.connections.ready_loop)
        while this connection's task is parked in it: what run's loop does
        per read, up to what has to wait. None: done, stay parked; False:
        close (close_reason set); True: the task checks its outgoing bytes
        first; a _Tail: the task finishes the read (_finish)."""
        out = self.out
        if out is not None and out.size > self.svc.config.mqtt.max_outgoing_bytes:
            return True             # the client does not read its acks: the task stops reading it
        try:
            data = os.read(self._fd, self.svc.config.mqtt.receive_bytes)
        except BlockingIOError:
            return None
        except OSError as exc:       # reset by the peer
            session = self.session
            session.close_reason = session.close_reason or f"connection lost: {exc.strerror}"
            return False
        if not data:
            session = self.session
            session.close_reason = session.close_reason or "client closed"
            return False
        self.session.last_seen = now
        try:
            events = self.codec.feed(data)
        except MQTTProtocolError as exc:
            self._protocol_error(exc)
            return False
        done = self._handle_now(events, len(data))
        return None if done is True else done

    def _handle_now(self, events: list[Event], nbytes: int, i: int = 0,
                    answer: bytes | None = None) -> bool | _Tail:
        """The part of _handle that never waits, from events[i] on (after a
        CONNECT, whose ``answer`` goes out first). True/False: keep the
        connection open or not; a _Tail: what is left needs to wait."""
        out: list[bytes] = [] if answer is None else [answer]
        records: list[Record] = []
        rejections: list[Rejection] = []
        durable_pubacks: list[int] = []
        durable_pubrecs: list[int] = []
        keep_open = True
        received_ns = 0
        validate_into = self.svc.validate_into
        n_events = len(events)
        while i < n_events:
            ev = events[i]
            if type(ev) is Publish:
                if ev.qos == 2 and self.qos2_unreleased is None:
                    self.qos2_unreleased = set()       # made for the first QoS 2 publish only
                # the publishes that make up nearly every read, in compiled code
                start = i
                run, base = events, 0
                if self.allowed_topics is not None:
                    # an ACL applies: hand on only the publishes to topics it grants
                    end = _granted_run(events, i, self.allowed_topics)
                    if end == i:
                        first_ns = self._take_judged(ev, records, rejections, durable_pubacks, durable_pubrecs)
                        received_ns = received_ns or first_ns
                        i += 1
                        continue
                    if end < n_events:         # a publish to judge alone follows: stop before it
                        run, base, start, i = events[i:end], i, 0, 0
                i, self._next_ns, first_ns = _take_publishes(
                    run, i, self.telemetry_topic, validate_into, self.protocol, self.client_id, self._next_ns,
                    time.time_ns, self.qos2_unreleased, records, rejections, durable_pubacks, durable_pubrecs)
                if i == start:          # cannot happen (the set is made above); never spin on it
                    raise RuntimeError("take_publishes took no publish")
                i += base
                if not received_ns:
                    received_ns = first_ns
                continue
            i += 1
            if type(ev) is PubRel:
                if self.qos2_unreleased is not None:
                    self.qos2_unreleased.discard(ev.packet_id)
                out.append(_mqtt.encode_pubcomp(ev.packet_id))
            elif type(ev) is PingReq:
                out.append(_mqtt.encode_pingresp())
            elif type(ev) is Connect:
                raise RuntimeError("CONNECT after the first packet")    # the codec refuses it
            elif type(ev) is Subscribe:
                command_topic = self.command_topic
                codes = [min(qos, 1) if topic == command_topic else 0x80 for topic, qos in ev.topics]
                if self.svc.auth is not None:
                    codes = self._judge_subscriptions(self.svc.auth, ev.topics, codes)
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
            elif type(ev) is PubRec:
                # gridgate publishes at QoS <= 1, so every PUBREC is unsolicited; its
                # receiver answers PUBREL with the same packet id (MQTT-4.3.3-1), so a
                # client that took a command for QoS 2 finishes its flow, not waits forever
                out.append(_mqtt.encode_pubrel(ev.packet_id))
            elif type(ev) is PubComp:
                pass  # the end of such a flow: nothing is held for it
        acks = b""
        if durable_pubacks:
            acks = _mqtt.encode_acks(PUBACK, durable_pubacks)
        if durable_pubrecs:
            acks += _mqtt.encode_acks(PUBREC, durable_pubrecs)
        if acks and not self.ack_durable:
            out.append(acks)
            acks = b""
        if out:
            self._write(b"".join(out) if len(out) > 1 else out[0])
        if records or rejections or acks:
            if acks:
                item = WorkItem(records, rejections, self.protocol, received_ns or time.time_ns(),
                                partial(self._acks_durable, acks))
                self.pending += 1
            else:
                item = WorkItem(records, rejections, self.protocol, received_ns or time.time_ns())
            svc = self.svc
            try:
                queued = svc.pipeline.try_submit(item)
            except BaseException:
                # Not queued (shutdown): never acked, so nothing owed.
                if acks:
                    self.pending -= 1
                raise
            if not queued:
                return _Tail(item, records, nbytes, keep_open)
            if records and svc.limits.readings_limited:
                return _Tail(None, records, nbytes, keep_open)
        return keep_open

    async def _finish(self, tail: _Tail) -> bool:
        """What _handle_now left to wait for: the queue's room
        (backpressure), then a quota's pause. False: close the connection."""
        item = tail.item
        if item is not None:
            try:
                await self.svc.pipeline.submit(item, self.session)
            except BaseException:
                if item.on_durable is not None:
                    self._unqueued(tail.inflight)
                raise
        records = tail.records
        limits = self.svc.limits
        if records and limits.readings_limited:
            # Over a quota, what arrived is kept and acked as usual; the
            # next read waits (TCP backpressure slows the device).
            await limits.pause(self.session, records, self.protocol, self.client_id, tail.nbytes)
        return tail.keep_open

    def _unqueued(self, inflight: int) -> None:
        """An item with acks owed was not queued after all (e.g. shutdown):
        never acked, so nothing owed. ``inflight``: its QoS 1 acks (MQTT
        5.0 counts them against Receive Maximum)."""
        self.pending -= 1

    async def _connect(self, ev: Connect) -> bytes:
        client_id = ev.client_id
        if not DEVICE_ID_RE.match(client_id):
            self.svc.metrics.protocol_errors.labels(self.protocol, "identifier_rejected").inc()
            log.warning("rejecting MQTT client id %r from %s: not a valid device id", client_id, self.session.remote)
            return self._refuse(CONNACK_IDENTIFIER_REJECTED, "identifier rejected")
        auth = self.svc.auth
        if auth is not None:
            refused = await self._authenticate(auth, ev, client_id)
            if refused is not None:
                return refused
        ban = self.svc.limits.on_connect(client_id, self.protocol)
        if ban is not None:
            # a device stuck in a reconnect loop (or banned by an operator)
            log.warning("refusing MQTT client id %r from %s: banned (%s) for %.0f s more", client_id,
                        self.session.remote, ban.reason, ban.until - trio.current_time())
            return self._refuse(CONNACK_NOT_AUTHORIZED, f"banned: {ban.reason}")
        self.client_id = client_id
        self.telemetry_topic = f"devices/{client_id}/telemetry"
        conns = self.svc.conns
        conns.bind_device(self.session, client_id)
        answer = self._accept(ev)
        # The downlink state is built with the first command, so the many
        # connections that never get one cost nothing for it.
        self.session.send_command = self._offer_command
        device_config = self.svc.device_configs.get(client_id)
        if device_config is not None:
            self._offer_command(new_command(UPDATE_CONFIG, device_config))
        return answer

    def _accept(self, ev: Connect) -> bytes:
        """The accepted client's keepalive set, and its CONNACK."""
        if ev.keepalive:
            self.svc.conns.set_keepalive(self.session, 1.5 * ev.keepalive)
        return _mqtt.encode_connack(False, CONNACK_ACCEPTED)

    async def _authenticate(self, auth: Authenticator, ev: Connect, client_id: str) -> bytes | None:
        """Who the client is (its verified client certificate, else its user
        name and password), and whether it may be ``client_id``: None when
        it may (``identity`` and ``allowed_topics`` set), else the refusing
        CONNACK: 0x04 wrong credentials (after the failure delay), 0x05 not
        authorized (none given where required, a client id it may not use,
        or a banned address: at once)."""
        address = source_address(self.session.remote)
        identity = auth.certificate(self.protocol, self.stream)      # mqtts with a client certificate
        try:
            if identity is not None:
                auth.refuse_banned(self.protocol, address)
            elif ev.username is None and ev.password is None:
                auth.refuse_banned(self.protocol, address)
                if not auth.anonymous_allowed:
                    self.svc.metrics.auth_failures.labels(self.protocol, "no_credentials").inc()
                    return self._refuse(CONNACK_NOT_AUTHORIZED, "not authorized: no credentials")
            else:
                identity = await auth.check_password(self.protocol, address, ev.username or "", ev.password or b"",
                                                     client_id)
        except AuthFailure as exc:
            return self._refuse(CONNACK_NOT_AUTHORIZED if exc.reason == "banned" else CONNACK_BAD_CREDENTIALS,
                                f"not authorized: {exc.reason}")
        if not auth.may_use_client_id(identity, client_id):
            self.svc.metrics.not_authorized.labels(self.protocol, "connect").inc()
            log.warning("refusing MQTT client id %r from %s: identity %r may not use it", client_id,
                        self.session.remote, identity.name if identity else None)
            return self._refuse(CONNACK_NOT_AUTHORIZED, "not authorized: client id")
        self.identity = identity
        self.session.identity = identity if identity is not None else ANONYMOUS      # for a credentials reload
        name = identity.name if identity is not None else None
        telemetry_topic = f"devices/{client_id}/telemetry"
        self.allowed_topics = frozenset(t for t in (telemetry_topic, "telemetry")
                                        if auth.acl.may_write(name, client_id, t))
        return None

    def _refuse(self, code: int, reason: str) -> bytes:
        self.session.close_reason = reason
        return _mqtt.encode_connack(False, code)

    def _take_judged(self, ev: Publish, records: list[Record], rejections: list[Rejection], pubacks: list[int],
                     pubrecs: list[int]) -> int:
        """One publish to a topic not known to be granted: the ACL decides.
        Granted, it goes the usual way (a reading, or bad_topic); refused, it
        is dead-lettered ``not_authorized`` and still acknowledged (nothing
        is lost). Returns its receive time."""
        auth = self.svc.auth
        assert auth is not None and self.client_id is not None
        name = self.identity.name if self.identity is not None else None
        if auth.acl.may_write(name, self.client_id, ev.topic):
            _, self._next_ns, first_ns = _take_publishes(
                [ev], 0, self.telemetry_topic, self.svc.validate_into, self.protocol, self.client_id, self._next_ns,
                time.time_ns, self.qos2_unreleased, records, rejections, pubacks, pubrecs)
            return first_ns
        now = time.time_ns()
        if ev.qos == 2:
            assert self.qos2_unreleased is not None          # made by _handle for the first QoS 2 publish
            pubrecs.append(ev.packet_id)
            if ev.packet_id in self.qos2_unreleased:
                return now                                   # a redelivery: dead-lettered once
            self.qos2_unreleased.add(ev.packet_id)
        elif ev.qos == 1:
            pubacks.append(ev.packet_id)
        self.svc.metrics.not_authorized.labels(self.protocol, "publish").inc()
        rejections.append(Rejection(reason="not_authorized", field="topic", index=None, device_id=self.client_id,
                                    raw=bytes(ev.payload), detail=f"topic {ev.topic!r} is not writable by this client"))
        return now

    def _judge_subscriptions(self, auth: Authenticator, topics: list[tuple[str, int]], codes: list[int]) -> list[int]:
        """The SUBACK codes with the ACL's refusals (0x80) applied, counted."""
        name = self.identity.name if self.identity is not None else None
        client_id = self.client_id or ""
        out = []
        for (topic, _), code in zip(topics, codes, strict=True):
            if code != 0x80 and not auth.acl.may_read(name, client_id, topic):
                code = 0x80
            if code == 0x80:
                self.svc.metrics.not_authorized.labels(self.protocol, "subscribe").inc()
            out.append(code)
        return out

    def _downlink_settings(self) -> DownlinkSettings:
        """``[downlink]`` as this connection's outbox applies it."""
        return self.svc.config.downlink

    def _offer_command(self, command: Command) -> bool:
        if self.downlink is None:
            outbox = CommandOutbox(self.protocol, self._downlink_settings(), self.svc.metrics, redeliver=True,
                                   packet_ids=True)
            if self.subscribed_qos is not None:
                outbox.set_ready(True, tracked=self.subscribed_qos >= 1)
            self.downlink = open_channel(self.session, outbox, self._send_commands, self._side_tasks(), None)
        return self.downlink.offer(command)

    def _side_tasks(self) -> SideTasks:
        if self._side is None:
            nursery = self.svc.connection_nursery()
            self._side = SideTasks(nursery, self.session)
            if self.closed:
                self._side.cancel()
        return self._side

    # -- output ---------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        """Send bytes to the client in order, from any task, without waiting.

        On a TCP socket they are written at once when nothing is queued ahead
        of them and the socket takes them (nearly always): no writer task,
        no scheduler round trip between a durable batch and its PUBACKs.
        What the socket does not take waits in ``Outgoing`` for its writer
        task, and the reader stops reading while that grows past
        ``max_outgoing_bytes``.
        """
        if self.closed:
            return
        out = self.out
        if self._fd >= 0 and (out is None or out.idle):
            try:
                sent = os.write(self._fd, data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:       # reset or EPIPE: the reader sees the close too
                self.session.close(f"connection lost: {exc.strerror}")
                return
            if sent == len(data):
                return
            data = data[sent:]
        if out is None:
            out = self.out = Outgoing(self._send_all, self._side_tasks().start_soon)
        out.put(data)

    async def _send_commands(self, sends: list[Send]) -> None:
        topic = self.command_topic
        # s.key: this outbox keys by MQTT packet id (packet_ids=True), an int; mypy sees Hashable
        frames = [_mqtt.encode_publish(topic, encode_command(s.command), 1 if s.tracked else 0,
                                       s.key if s.tracked else 0, False, s.dup)  # type: ignore[arg-type]
                  for s in sends]
        self._write(b"".join(frames))

    def _acks_durable(self, acks: bytes) -> None:
        """A read's item is durable: send its acks. _handle hands the pipeline
        a partial of this, not a closure: one object per read instead of a
        function, its closure tuple and two cells (at one reading per read,
        as in the fleet shape, that is per reading)."""
        self.pending -= 1
        self._write(acks)
        if not self.pending and self.acks_done is not None:
            self.acks_done.set()

    async def _send_all(self, chunks: list[bytes]) -> None:
        await self.stream.send_all(b"".join(chunks))

    async def _flush(self) -> None:
        """Wait (bounded) until what is queued is sent: a refusing CONNACK,
        the last acks."""
        if self.out is not None:
            with trio.move_on_after(FLUSH_TIMEOUT_S):
                await self.out.wait_sent()


class _Tail:
    """The rest of a read that has to wait (made only then): its item when
    the pipeline's queue was full, the readings (and their bytes) a quota's
    pause is over when one applies, and the item's QoS 1 acks (``inflight``,
    MQTT 5.0's Receive Maximum count, undone if it is never queued)."""

    __slots__ = ("item", "records", "nbytes", "keep_open", "inflight")

    def __init__(self, item: WorkItem | None, records: list[Record], nbytes: int, keep_open: bool,
                 inflight: int = 0) -> None:
        self.item = item
        self.records = records
        self.nbytes = nbytes
        self.keep_open = keep_open
        self.inflight = inflight


def _connect_level(head: bytes, max_packet_bytes: int) -> int | None:
    """The protocol level of the CONNECT that ``head`` starts with (section
    3.1.2.1/2, the same place in 3.1.1 and 5.0); -1 when ``head`` is no
    "MQTT" CONNECT or one over ``max_packet_bytes`` (the 3.1.1 codec judges
    it: 3.1's "MQIsdp", garbage, too large); None while more bytes are
    needed to tell."""
    n = len(head)
    if not n:
        return None
    if head[0] != 0x10:
        return -1
    i, length = 1, 0
    while True:                         # the remaining length, 1 to 4 bytes
        if i >= n:
            return None
        if i > 4:
            return -1
        length |= (head[i] & 0x7F) << (7 * (i - 1))
        i += 1
        if not head[i - 1] & 0x80:
            break
    if i + length > max_packet_bytes:
        return -1
    if n < i + 2:
        return None
    if head[i] != 0 or head[i + 1] != 4:
        return -1
    if n < i + 7:
        return None
    return head[i + 6] if head[i + 2:i + 6] == b"MQTT" else -1


def _granted_run(events: list[Event], i: int, granted: frozenset[str]) -> int:
    """The end of the run of publishes from events[i] whose topics are all in
    ``granted`` (i itself when the first is not)."""
    n = len(events)
    while i < n:
        ev = events[i]
        if type(ev) is not Publish or ev.topic not in granted:
            break
        i += 1
    return i
