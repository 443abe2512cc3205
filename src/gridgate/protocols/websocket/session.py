"""The WebSocket listener (DESIGN section 6): one trio-websocket connection
per accepted socket, routed by path.

- ``/v1/ws?device_id=ID``: the device channel (``WSDeviceChannel``). Each
  message (text JSON or binary MessagePack) is a reading, a batch, or
  ``{"seq": n, "readings": [...]}``, answered after durable with
  ``{"ack": n, "accepted", "rejected", "errors"}`` in the message's own
  format; ``{"command_ack": id}`` acknowledges a downlink command.
- ``/mqtt`` with subprotocol ``mqtt``: MQTT over binary messages. The socket
  becomes a ``trio.abc.Stream`` (``WebSocketStream``) and the MQTT session
  runs unchanged on it, as protocol ``"mqtt-ws"`` (its own entry in
  ``/v1/connections`` by_protocol and in records' ``protocol``).

Close codes: 1007 a message that is not a reading, batch or envelope (or
MQTT bytes that break the protocol), 1008 policy (no or bad device_id, no
``mqtt`` subprotocol), 1009 a message over ``max_message_bytes`` (checked
by trio-websocket while the message arrives) or a payload over the payload
limits, 1003 a text message on ``/mqtt``, 1001 gateway shutdown. Anything
the peer sends - a message, a ping, a pong - counts as a heartbeat for the
reaper (``_HeartbeatStream`` stamps ``last_seen`` on every socket read).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

import msgspec
import trio
import trio_websocket
from trio_websocket import ConnectionClosed, WebSocketConnection

from gridgate.downlink.commands import CommandOutbox, Send, open_channel
from gridgate.ingest.pipeline import WorkItem
from gridgate.ingest.records import DEVICE_ID_RE, Record, Rejection
from gridgate.protocols.outgoing import Outgoing, wait_acks_sent
from gridgate.security.authenticator import ANONYMOUS, Authenticator, AuthFailure, Identity, source_address

if TYPE_CHECKING:
    from gridgate.connections.manager import Session
    from gridgate.protocols.services import Services

__all__ = ["serve_websocket_connection", "WebSocketStream", "WSDeviceChannel"]

log = logging.getLogger("gridgate.protocols.websocket.session")

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_INVALID_PAYLOAD = 1007
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009

_RECEIVE_BYTES = 65536
_CLOSE_TIMEOUT_S = 1.0          # the closing handshake; then the socket is closed anyway
_MAX_REASON_BYTES = 120         # a close frame's reason must fit in 123 bytes

_json = msgspec.json.Encoder()
_msgpack = msgspec.msgpack.Encoder()
# The top level of a control message or envelope, values left undecoded.
_json_top = msgspec.json.Decoder(dict[str, msgspec.Raw])
_msgpack_top = msgspec.msgpack.Decoder(dict[str, msgspec.Raw])
_json_seq = msgspec.json.Decoder(int)
_msgpack_seq = msgspec.msgpack.Decoder(int)
_json_str = msgspec.json.Decoder(str)
_msgpack_str = msgspec.msgpack.Decoder(str)
_ENVELOPE_KEYS = frozenset(("seq", "readings"))


class _HeartbeatStream(trio.abc.Stream):
    """The accepted socket, stamping ``session.last_seen`` on every read:
    messages, pings and pongs all keep the connection alive."""

    def __init__(self, stream: trio.abc.Stream, session: Session) -> None:
        self._stream = stream
        self._session = session

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self._stream.receive_some(max_bytes)
        self._session.last_seen = trio.current_time()
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()


class WebSocketStream(trio.abc.Stream):
    """A WebSocket connection as a byte stream, for MQTT over WebSocket.

    ``receive_some`` returns the next binary message (in pieces of at most
    ``max_bytes``; an MQTT packet may span messages and a message may hold
    several packets - the codec reassembles), ``b""`` once the peer closed.
    ``send_all`` sends one binary message. A text message ends the stream
    and sets ``close_code`` to 1003 (MQTT over WebSocket is binary only).
    ``transport`` is the connection under the WebSocket (a trio.SSLStream
    over wss: its client certificate is the MQTT session's identity).
    """

    def __init__(self, ws: WebSocketConnection, transport: trio.abc.Stream | None = None) -> None:
        self.ws = ws
        self.transport = transport
        self.close_code: int | None = None
        self._pending = memoryview(b"")

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self._pending:
            try:
                message = await self.ws.get_message()
            except ConnectionClosed:
                return b""
            if isinstance(message, str):
                self.close_code = CLOSE_UNSUPPORTED_DATA
                return b""
            self._pending = memoryview(message)
        n = len(self._pending) if max_bytes is None else max_bytes
        chunk, self._pending = self._pending[:n], self._pending[n:]
        return bytes(chunk)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self.ws.send_message(bytes(data))
        except ConnectionClosed:
            raise trio.BrokenResourceError("the WebSocket is closed") from None

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await self.ws.aclose()


async def serve_websocket_connection(stream: trio.abc.Stream, services: Services, session: Session) -> None:
    """Handshake, route by path, run the channel, close with the right code."""
    cfg = services.config.websocket
    async with trio.open_nursery() as nursery:
        request = None
        with trio.move_on_after(cfg.handshake_timeout_s):
            request = await trio_websocket.wrap_server_stream(
                nursery, _HeartbeatStream(stream, session), message_queue_size=1,
                max_message_size=cfg.max_message_bytes, receive_buffer_size=_RECEIVE_BYTES)
        if request is None:
            session.close_reason = "no WebSocket handshake in time"
            nursery.cancel_scope.cancel()
            return
        path, _, query = request.path.partition("?")
        mqtt = path == "/mqtt"
        offered_mqtt = "mqtt" in request.proposed_subprotocols
        try:
            if path not in ("/v1/ws", "/mqtt"):
                session.close_reason = f"handshake for unknown path {path}"
                await request.reject(404, extra_headers=[(b"content-type", b"application/json")],
                                     body=_json.encode({"error": "not_found",
                                                        "detail": f"no WebSocket endpoint {path}"}))
                nursery.cancel_scope.cancel()
                return
            # /mqtt authenticates in its CONNECT, as MQTT over TCP does
            if services.auth is not None and not mqtt and \
                    not await _authorize_upgrade(services.auth, services, session, request, query, stream):
                nursery.cancel_scope.cancel()
                return
            ws = await request.accept(subprotocol="mqtt" if mqtt and offered_mqtt else None)
        except ConnectionClosed:
            session.close_reason = "client left during the handshake"
            nursery.cancel_scope.cancel()
            return
        code, reason = CLOSE_NORMAL, ""
        try:
            if mqtt:
                if not offered_mqtt:
                    code, reason = _policy(services, session, "no_subprotocol", "MQTT over WebSocket needs the "
                                                                                "subprotocol 'mqtt'")
                else:
                    code, reason = await _run_mqtt(ws, services, session, stream)
            else:
                device_id = parse_qs(query).get("device_id", [""])[0]
                if not DEVICE_ID_RE.match(device_id):
                    code, reason = _policy(services, session, "bad_device_id",
                                           "device_id query parameter missing or not a valid device id")
                else:
                    channel = WSDeviceChannel(ws, services, session, device_id)
                    code, reason = await channel.run()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT_S):
                if ws.closed is None:
                    if session.cancel_scope.cancel_called:   # reaped or taken over: say so
                        reason = session.close_reason or reason
                    services.metrics.ws_closes.labels(str(code)).inc()
                    await ws.aclose(code, reason.encode()[:_MAX_REASON_BYTES].decode(errors="ignore") or None)
                elif ws.closed.code == CLOSE_TOO_BIG:
                    # trio-websocket closed it for a message over max_message_bytes
                    services.metrics.ws_closes.labels(str(CLOSE_TOO_BIG)).inc()
                    services.metrics.protocol_errors.labels(session.protocol, "too_large").inc()
                    session.close_reason = f"message over websocket.max_message_bytes {cfg.max_message_bytes}"
            nursery.cancel_scope.cancel()


_CHALLENGE = (b"www-authenticate", b'Bearer realm="gridgate", Basic realm="gridgate", charset="UTF-8"')


async def _authorize_upgrade(auth: Authenticator, services: Services, session: Session,
                             request: trio_websocket.WebSocketRequest, query: str, stream: trio.abc.Stream) -> bool:
    """Whether a /v1/ws upgrade may proceed: its verified client certificate
    (wss), else its Authorization header, proves an identity that may write
    the ``device_id`` it names. Refused: 401 with
    WWW-Authenticate (missing or invalid credentials, the latter after the
    failure delay), 403 (a banned address, at once; or a device the
    identity may not write). True leaves the request to be accepted."""
    headers = [v for k, v in request.headers if k.lower() == b"authorization"]
    status, error, detail = 0, "", ""
    identity: Identity | None = None
    if len(headers) > 1:
        status, error, detail = 400, "bad_request", "more than one Authorization header"
    else:
        header = headers[0].decode("latin-1") if headers else ""
        try:
            identity = auth.certificate("ws", stream)
            if identity is None:
                identity = await auth.check_authorization("ws", source_address(session.remote), header)
        except AuthFailure as exc:
            if exc.reason == "banned":
                status, error, detail = 403, "banned", "too many failed authentications from this address"
            else:
                status, error = 401, "unauthorized"
                detail = "credentials required" if exc.reason == "no_credentials" else "invalid credentials"
        else:
            device_id = parse_qs(query).get("device_id", [""])[0]
            name = identity.name if identity is not None else None
            # a bad or missing device_id is refused after the upgrade (1008), as without credentials
            if DEVICE_ID_RE.match(device_id) and not (auth.may_use_client_id(identity, device_id)
                                                      and auth.acl.may_write_device(name, device_id)):
                services.metrics.not_authorized.labels("ws", "connect").inc()
                status, error, detail = 403, "not_authorized", "this identity may not write this device"
    if not status:
        session.identity = identity if identity is not None else ANONYMOUS      # for a credentials reload
        return True
    session.close_reason = f"upgrade refused: {error}"
    extra = [(b"content-type", b"application/json")] + ([_CHALLENGE] if status == 401 else [])
    try:
        await request.reject(status, extra_headers=extra, body=_json.encode({"error": error, "detail": detail}))
    except ConnectionClosed:
        pass
    return False


def _policy(services: Services, session: Session, why: str, detail: str) -> tuple[int, str]:
    services.metrics.protocol_errors.labels(session.protocol, why).inc()
    session.close_reason = f"policy: {detail}"
    log.warning("closing WebSocket from %s with 1008: %s", session.remote, detail)
    return CLOSE_POLICY, detail


async def _pinger(ws: WebSocketConnection, interval: float) -> None:
    """Ping every ``interval``: the pong is a heartbeat (a live but quiet
    device is not reaped, a dead one is)."""
    while True:
        await trio.sleep(interval)
        try:
            with trio.move_on_after(interval):
                await ws.ping()
        except ConnectionClosed:
            return


async def _run_mqtt(ws: WebSocketConnection, services: Services, session: Session,
                    transport: trio.abc.Stream) -> tuple[int, str]:
    services.conns.set_protocol(session, "mqtt-ws")
    stream = WebSocketStream(ws, transport)
    error = None
    async with trio.open_nursery() as nursery:
        if services.config.websocket.ping_interval_s > 0:
            nursery.start_soon(_pinger, ws, services.config.websocket.ping_interval_s)
        with session.read_scope:         # graceful shutdown: stop reading, send owed acks, close 1001
            error = await services.serve_mqtt_stream(stream, services, session, "mqtt-ws")
        nursery.cancel_scope.cancel()
    if stream.close_code is not None:
        services.metrics.protocol_errors.labels("mqtt-ws", "text_message").inc()
        session.close_reason = "text message on /mqtt"
        return stream.close_code, "MQTT over WebSocket takes binary messages only"
    if error is not None:
        return (CLOSE_TOO_BIG if error.reason == "too_large" else CLOSE_INVALID_PAYLOAD), f"MQTT {error}"
    if session.read_scope.cancelled_caught:
        return CLOSE_GOING_AWAY, "gateway shutting down"
    return CLOSE_NORMAL, ""


class WSDeviceChannel:
    """One device on ``/v1/ws``: readings in, seq acks and commands out."""

    def __init__(self, ws: WebSocketConnection, services: Services, session: Session, device_id: str) -> None:
        self.ws = ws
        self.svc = services
        self.session = session
        self.device_id = device_id
        self.max_pending_acks = services.config.websocket.max_pending_acks
        self.binary = False          # the device's last message was MessagePack: answer in kind
        # Acks, in the order their readings became durable, and their writer
        # task: made with the first ack.
        self.out: Outgoing[bytes | str] | None = None
        self.pending = 0             # seq'd messages submitted, ack not yet queued
        self.closed = False
        self.acks_done: trio.Event | None = None
        self._nursery: trio.Nursery | None = None
        self.outbox: CommandOutbox | None = None

    async def run(self) -> tuple[int, str]:
        """Serve until the device leaves, breaks the rules or the gateway stops;
        return the close code and reason."""
        svc, session = self.svc, self.session
        svc.conns.bind_device(session, self.device_id)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.outbox = CommandOutbox("ws", svc.config.downlink, svc.metrics, redeliver=False, packet_ids=False)
                self.outbox.set_ready(True)
                open_channel(session, self.outbox, self._send_commands, nursery,
                             svc.device_configs.get(self.device_id))
                if svc.config.websocket.ping_interval_s > 0:
                    nursery.start_soon(_pinger, self.ws, svc.config.websocket.ping_interval_s)
                result = await self._read_loop()
                # Graceful stop: the acks owed still go out (the gateway bounds the wait).
                if session.read_scope.cancelled_caught:
                    await wait_acks_sent(self)
                nursery.cancel_scope.cancel()
        finally:
            self.closed = True
        return result

    async def _read_loop(self) -> tuple[int, str]:
        session = self.session
        with session.read_scope:
            while True:
                if self.out is not None and len(self.out) >= self.max_pending_acks:
                    # The device does not read its acks: stop reading it.
                    session.paused = True
                    await self.out.wait_sent()
                    session.paused = False
                try:
                    message = await self.ws.get_message()
                except ConnectionClosed as exc:
                    session.close_reason = (session.close_reason
                                            or f"client closed ({exc.reason.code if exc.reason else '-'})")
                    return CLOSE_NORMAL, ""
                if isinstance(message, str):
                    data, fmt = message.encode(), "json"
                    self.binary = False
                else:
                    data, fmt = message, "msgpack"
                    self.binary = True
                closing = await self._handle(data, fmt)
                if closing is not None:
                    return closing
        return CLOSE_GOING_AWAY, "gateway shutting down"

    async def _handle(self, data: bytes, fmt: str) -> tuple[int, str] | None:
        """One message. Returns (code, reason) to close the connection, else None."""
        received_ns = time.time_ns()
        seq: int | None = None
        payload = data
        # Only messages that can be a control message or an envelope pay for
        # a second decode of their top level.
        if b"readings" in data or b"command_ack" in data:
            top = _top_level(data, fmt)
            if top is not None and "command_ack" in top:
                return self._command_ack(top, data, fmt, received_ns)
            if top is not None and "readings" in top:
                unknown = top.keys() - _ENVELOPE_KEYS
                try:
                    if unknown:
                        raise ValueError(f"unknown envelope key(s) {sorted(unknown)}; an envelope is "
                                         "{\"seq\": n, \"readings\": [...]}")
                    if "seq" in top:
                        seq = (_json_seq if fmt == "json" else _msgpack_seq).decode(top["seq"])
                        if seq < 0:
                            raise ValueError("seq must be a non-negative integer")
                except (ValueError, msgspec.DecodeError) as exc:
                    detail = f"bad envelope: {exc}"
                    await self._submit([], [Rejection(reason="malformed", device_id=self.device_id, raw=bytes(data),
                                                      detail=detail)], received_ns, None)
                    return self._bad_frame(CLOSE_INVALID_PAYLOAD, "malformed", detail)
                payload = bytes(top["readings"])
        records, rejections = self.svc.validate(payload, fmt, "ws", self.device_id, received_ns)
        await self._submit(records, rejections, received_ns, seq)
        limits = self.svc.limits
        if limits.readings_limited and records:
            # over a quota: this message is kept and acked, the next is read later
            await limits.pause(self.session, records, "ws", self.device_id, len(data))
        if len(rejections) == 1 and rejections[0].index is None:
            # The whole message was refused (undecodable, not an object or
            # array, over the payload limits): dead-lettered above, and a bad frame.
            whole = rejections[0]
            code = CLOSE_TOO_BIG if whole.reason == "too_large" else CLOSE_INVALID_PAYLOAD
            return self._bad_frame(code, whole.reason, whole.detail)
        return None

    def _command_ack(self, top: dict[str, msgspec.Raw], data: bytes, fmt: str,
                     received_ns: int) -> tuple[int, str] | None:
        try:
            command_id = (_json_str if fmt == "json" else _msgpack_str).decode(top["command_ack"])
        except msgspec.DecodeError:
            return self._bad_frame(CLOSE_INVALID_PAYLOAD, "malformed", "command_ack must be a command id string")
        assert self.outbox is not None
        if not self.outbox.ack(command_id):
            log.info("command_ack from %s for unknown or expired command %r", self.device_id, command_id[:64])
        return None

    def _bad_frame(self, code: int, reason: str, detail: str) -> tuple[int, str]:
        self.svc.metrics.protocol_errors.labels("ws", reason).inc()
        self.session.close_reason = f"bad frame: {reason}"
        log.warning("closing WebSocket of %s from %s with %d: %s", self.device_id, self.session.remote, code, detail)
        return code, f"{reason}: {detail}"

    async def _submit(self, records: list[Record], rejections: list[Rejection], received_ns: int,
                      seq: int | None) -> None:
        on_durable = None if seq is None else self._make_on_durable(seq, records, rejections, self.binary)
        item = WorkItem(records, rejections, "ws", received_ns, on_durable)
        if seq is not None:
            self.pending += 1
        pipeline = self.svc.pipeline
        if not pipeline.try_submit(item):
            try:
                await pipeline.submit(item, self.session)
            except BaseException:
                if seq is not None:
                    self.pending -= 1   # never queued, so never acked
                raise

    def _make_on_durable(self, seq: int, records: list[Record], rejections: list[Rejection],
                         binary: bool) -> Callable[[], None]:
        def on_durable() -> None:
            self.pending -= 1
            if not self.pending and self.acks_done is not None:
                self.acks_done.set()
            if self.closed:
                return
            ack = {"ack": seq, "accepted": len(records), "rejected": len(rejections),
                   "errors": [{"index": r.index, "reason": r.reason, "field": r.field, "detail": r.detail}
                              for r in rejections]}
            if self.out is None:
                assert self._nursery is not None
                self.out = Outgoing(self._send_acks, self._nursery.start_soon)
            self.out.put(_msgpack.encode(ack) if binary else _json.encode(ack).decode())
        return on_durable

    async def _send_acks(self, acks: list[bytes | str]) -> None:
        try:
            for ack in acks:
                await self.ws.send_message(ack)
        except ConnectionClosed:
            self.session.close("peer gone while acks were owed")

    async def _send_commands(self, sends: list[Send]) -> None:
        try:
            for send in sends:
                message = {"command": send.command}
                await self.ws.send_message(_msgpack.encode(message) if self.binary else _json.encode(message).decode())
        except ConnectionClosed:
            self.session.close("peer gone while a command was sent")


def _top_level(data: bytes, fmt: str) -> dict[str, msgspec.Raw] | None:
    """The top-level object with its values undecoded; None if not an object."""
    try:
        return (_json_top if fmt == "json" else _msgpack_top).decode(data)
    except msgspec.DecodeError:  # not decodable or not an object: the validator judges it
        return None
