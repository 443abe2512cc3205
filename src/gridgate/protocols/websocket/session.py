"""The WebSocket listener (DESIGN section 6): the upgrade, then the
connection's own task reads its frames (``ServerWebSocket``), routed by path.

- ``/v1/ws?device_id=ID``: the device channel (``WSDeviceChannel``). Each
  message (text JSON or binary MessagePack) is a reading, a batch, or
  ``{"seq": n, "readings": [...]}``, answered after durable with
  ``{"ack": n, "accepted", "rejected", "errors"}`` in the message's own
  format; ``{"command_ack": id}`` acknowledges a downlink command.
- ``/mqtt`` with subprotocol ``mqtt``: MQTT over binary messages. The socket
  becomes a ``trio.abc.Stream`` (``WebSocketStream``) and the MQTT session
  runs unchanged on it, as protocol ``"mqtt-ws"`` (its own entry in
  ``/v1/connections`` by_protocol and in records' ``protocol``).

Close codes: 1002 a broken frame, 1007 a message that is not a reading,
batch or envelope (or MQTT bytes that break the protocol, or text that is
not UTF-8), 1008 policy (no or bad device_id, no ``mqtt`` subprotocol),
1009 a message over ``max_message_bytes`` (judged from its frame headers,
before its payload is buffered) or a payload over the payload limits, 1003
a text message on ``/mqtt``, 1001 gateway shutdown. Anything the peer
sends - a message, a ping, a pong - counts as a heartbeat for the reaper
(``ServerWebSocket`` stamps ``last_seen`` on every socket read).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated
from urllib.parse import parse_qs

import msgspec
import trio

from gridgate.downlink.commands import CommandOutbox, Send, open_channel
from gridgate.ingest.pipeline import WorkItem
from gridgate.ingest.records import DEVICE_ID_RE, Record, Rejection
from gridgate.protocols.outgoing import Outgoing, wait_acks_sent
from gridgate.protocols.websocket.frames import OP_BINARY, OP_PING, OP_TEXT, WebSocketError, encode_frame
from gridgate.protocols.websocket.handshake import Upgrade, read_upgrade
from gridgate.protocols.websocket.wire import ServerWebSocket
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
_ACKS_BEFORE_CLOSE_S = 5.0      # acks owed when we close on a bad message: then closed without them

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


class _Envelope(msgspec.Struct, forbid_unknown_fields=True):
    """``{"seq": n, "readings": [...]}`` with ``readings`` left undecoded (the
    validator reads it); ``seq`` -1 stands for none (a sent -1 is refused)."""
    readings: msgspec.Raw
    seq: Annotated[int, msgspec.Meta(ge=0)] = -1


_json_envelope = msgspec.json.Decoder(_Envelope).decode
_msgpack_envelope = msgspec.msgpack.Decoder(_Envelope).decode


class WebSocketStream(trio.abc.Stream):
    """A WebSocket connection as a byte stream, for MQTT over WebSocket.

    ``receive_some`` returns the binary messages of the next read joined (in
    pieces of at most ``max_bytes``; an MQTT packet may span messages and a
    message may hold several packets - the codec reassembles), ``b""`` once
    the connection ended. ``send_all`` sends one binary message and waits
    while frames are queued (the MQTT session's backpressure). A text
    message ends the stream and sets ``close_code`` to 1003 (MQTT over
    WebSocket is binary only). ``transport`` is the connection under the
    WebSocket (a trio.SSLStream over wss: its client certificate is the
    MQTT session's identity).
    """

    def __init__(self, ws: ServerWebSocket) -> None:
        self.ws = ws
        self.transport = ws.transport
        self.close_code: int | None = None
        self._pending = b""

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while not self._pending:
            if self.ws.ended or self.close_code is not None:
                return b""
            messages = await self.ws.receive()
            if len(messages) == 1 and messages[0][0] == OP_BINARY:
                self._pending = messages[0][1]
                continue
            parts = []
            for opcode, payload in messages:
                if opcode != OP_BINARY:
                    self.close_code = CLOSE_UNSUPPORTED_DATA
                    break
                parts.append(payload)
            self._pending = b"".join(parts)
        if max_bytes is None or len(self._pending) <= max_bytes:
            chunk, self._pending = self._pending, b""
        else:
            chunk, self._pending = self._pending[:max_bytes], self._pending[max_bytes:]
        return chunk

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        ws = self.ws
        if ws.lost or ws.close_sent:
            raise trio.BrokenResourceError("the WebSocket is closed")
        ws.write([encode_frame(OP_BINARY, data)])
        if ws.out is not None and not ws.out.idle:
            await ws.flush()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()     # the connection's owner closes the WebSocket


async def serve_websocket_connection(stream: trio.abc.Stream, services: Services, session: Session) -> None:
    """Handshake, route by path, run the channel, close with the right code."""
    cfg = services.config.websocket
    upgrade: Upgrade | str = "no WebSocket handshake in time"
    with trio.move_on_after(cfg.handshake_timeout_s):
        upgrade = await read_upgrade(stream)
    if isinstance(upgrade, str):
        session.close_reason = upgrade
        return
    path, query = upgrade.path, upgrade.query
    mqtt = path == "/mqtt"
    offered_mqtt = "mqtt" in upgrade.subprotocols
    if path not in ("/v1/ws", "/mqtt"):
        session.close_reason = f"handshake for unknown path {path}"
        await upgrade.reject(404, [(b"content-type", b"application/json")],
                             _json.encode({"error": "not_found", "detail": f"no WebSocket endpoint {path}"}))
        return
    # /mqtt authenticates in its CONNECT, as MQTT over TCP does
    if services.auth is not None and not mqtt and \
            not await _authorize_upgrade(services.auth, services, session, upgrade, query, stream):
        return
    try:
        await upgrade.accept("mqtt" if mqtt and offered_mqtt else None)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        session.close_reason = "client left during the handshake"
        return
    async with trio.open_nursery() as nursery:
        ws = ServerWebSocket(stream, session, cfg.max_message_bytes, _RECEIVE_BYTES, cfg.max_pending_acks,
                             nursery.start_soon)
        if cfg.ping_interval_s > 0:
            nursery.start_soon(_pinger, ws, cfg.ping_interval_s)
        code, reason = CLOSE_NORMAL, ""
        closing = False
        try:
            if mqtt:
                if not offered_mqtt:
                    code, reason = _policy(services, session, "no_subprotocol", "MQTT over WebSocket needs the "
                                                                                "subprotocol 'mqtt'")
                else:
                    code, reason = await _run_mqtt(ws, services, session)
            else:
                device_id = parse_qs(query).get("device_id", [""])[0]
                if not DEVICE_ID_RE.match(device_id):
                    code, reason = _policy(services, session, "bad_device_id",
                                           "device_id query parameter missing or not a valid device id")
                else:
                    channel = WSDeviceChannel(ws, services, session, device_id)
                    code, reason = await channel.run()
            if ws.error is not None:
                code, reason = _frame_error(services, session, ws.error, cfg.max_message_bytes)
            closing = True
            if not (ws.peer_close or ws.lost):
                services.metrics.ws_closes.labels(str(code)).inc()
            await ws.close(code, reason, _CLOSE_TIMEOUT_S)
        finally:
            if not closing and not ws.lost:
                # cancelled: reaped, taken over or the gateway stopping at once; say why, wait for nothing
                with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT_S):
                    if session.cancel_scope.cancel_called:
                        reason = session.close_reason or reason
                    services.metrics.ws_closes.labels(str(code)).inc()
                    await ws.close_now(code, reason)
            nursery.cancel_scope.cancel()


def _frame_error(services: Services, session: Session, error: WebSocketError,
                 max_message_bytes: int) -> tuple[int, str]:
    """The close for a frame that broke the protocol (or a message over the size limit)."""
    why = {CLOSE_TOO_BIG: "too_large", CLOSE_INVALID_PAYLOAD: "bad_utf8"}.get(error.code, "bad_frame")
    services.metrics.protocol_errors.labels(session.protocol, why).inc()
    if error.code == CLOSE_TOO_BIG:
        session.close_reason = f"message over websocket.max_message_bytes {max_message_bytes}"
    else:
        session.close_reason = f"bad frame: {error.detail}"
    log.warning("closing WebSocket from %s with %d: %s", session.remote, error.code, error.detail)
    return error.code, error.detail


_CHALLENGE = (b"www-authenticate", b'Bearer realm="gridgate", Basic realm="gridgate", charset="UTF-8"')


async def _authorize_upgrade(auth: Authenticator, services: Services, session: Session,
                             upgrade: Upgrade, query: str, stream: trio.abc.Stream) -> bool:
    """Whether a /v1/ws upgrade may proceed: its verified client certificate
    (wss), else its Authorization header, proves an identity that may write
    the ``device_id`` it names. Refused: 401 with
    WWW-Authenticate (missing or invalid credentials, the latter after the
    failure delay), 403 (a banned address, at once; or a device the
    identity may not write). True leaves the request to be accepted."""
    headers = upgrade.header_values(b"authorization")
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
    await upgrade.reject(status, extra, _json.encode({"error": error, "detail": detail}))
    return False


def _policy(services: Services, session: Session, why: str, detail: str) -> tuple[int, str]:
    services.metrics.protocol_errors.labels(session.protocol, why).inc()
    session.close_reason = f"policy: {detail}"
    log.warning("closing WebSocket from %s with 1008: %s", session.remote, detail)
    return CLOSE_POLICY, detail


async def _pinger(ws: ServerWebSocket, interval: float) -> None:
    """Ping every ``interval``: the pong is a heartbeat (a live but quiet
    device is not reaped, a dead one is)."""
    ping = encode_frame(OP_PING, b"")
    while not ws.close_sent:
        await trio.sleep(interval)
        ws.write([ping])


async def _run_mqtt(ws: ServerWebSocket, services: Services, session: Session) -> tuple[int, str]:
    services.conns.set_protocol(session, "mqtt-ws")
    stream = WebSocketStream(ws)
    error = None
    with session.read_scope:         # graceful shutdown: stop reading, send owed acks, close 1001
        error = await services.serve_mqtt_stream(stream, services, session, "mqtt-ws")
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
    """One device on ``/v1/ws``: readings in, seq acks and commands out.

    Per read: every message of it validated, one WorkItem into the pipeline,
    and once that is durable the seq acks of the read go out in one write.
    """

    def __init__(self, ws: ServerWebSocket, services: Services, session: Session, device_id: str) -> None:
        self.ws = ws
        self.svc = services
        self.session = session
        self.device_id = device_id
        self.binary = False          # the device's last message was MessagePack: answer in kind
        self.pending = 0             # reads with seq'd messages submitted, acks not yet written
        self.closed = False
        self.acks_done: trio.Event | None = None
        self.outbox: CommandOutbox | None = None

    @property
    def out(self) -> Outgoing[bytes] | None:
        """Frames the socket has not taken yet (``wait_acks_sent`` waits on them)."""
        return self.ws.out

    async def run(self) -> tuple[int, str]:
        """Serve until the device leaves, breaks the rules or the gateway stops;
        return the close code and reason."""
        svc, session = self.svc, self.session
        svc.conns.bind_device(session, self.device_id)
        try:
            async with trio.open_nursery() as nursery:
                self.outbox = CommandOutbox("ws", svc.config.downlink, svc.metrics, redeliver=False, packet_ids=False)
                self.outbox.set_ready(True)
                open_channel(session, self.outbox, self._send_commands, nursery,
                             svc.device_configs.get(self.device_id))
                result = await self._read_loop()
                ws = self.ws
                # Graceful stop: the acks owed still go out (the gateway bounds the wait).
                if session.read_scope.cancelled_caught:
                    await wait_acks_sent(self)
                elif not (ws.peer_close or ws.eof or ws.lost):
                    # Closing on a bad message or frame: what came before it is stored, and
                    # its acks go out before the close frame (after which no data may follow).
                    with trio.move_on_after(_ACKS_BEFORE_CLOSE_S):
                        await wait_acks_sent(self)
                nursery.cancel_scope.cancel()
        finally:
            self.closed = True
        return result

    async def _read_loop(self) -> tuple[int, str]:
        session, ws = self.session, self.ws
        poll_durable = self.svc.poll_durable
        with session.read_scope:
            while True:
                # (a device that does not read its acks is paused in receive: max_pending_acks)
                messages = await ws.receive()
                if messages:
                    closing = await self._handle(messages)
                    if closing is not None:
                        return closing
                    poll_durable()        # a batch the spool finished meanwhile: its acks go out now
                if ws.ended:
                    if ws.peer_close:
                        session.close_reason = session.close_reason or f"client closed ({ws.decoder.close_code})"
                    elif ws.eof:
                        session.close_reason = session.close_reason or "client closed (-)"
                    return CLOSE_NORMAL, ""
        return CLOSE_GOING_AWAY, "gateway shutting down"

    async def _handle(self, messages: list[tuple[int, bytes]]) -> tuple[int, str] | None:
        """The messages of one read. Returns (code, reason) to close the connection, else None."""
        validate = self.svc.validate
        device_id = self.device_id
        records: list[Record] = []
        rejections: list[Rejection] = []
        acks: list[tuple[int, int, list[Rejection], bool]] = []   # seq, accepted, rejected, binary
        first_ns = 0
        nbytes = 0
        closing = None
        for opcode, data in messages:
            binary = self.binary = opcode == OP_BINARY
            fmt = "msgpack" if binary else "json"
            nbytes += len(data)
            received_ns = time.time_ns()
            first_ns = first_ns or received_ns
            seq: int | None = None
            payload = data
            # Only messages that can be a control message or an envelope pay for
            # a second decode of their top level.
            envelope = None
            if b"readings" in data and b"command_ack" not in data:
                # the usual envelope in one decode; anything else takes the
                # general path below, which also words the errors
                try:
                    envelope = (_msgpack_envelope if binary else _json_envelope)(data)
                except msgspec.DecodeError:
                    pass
            if envelope is not None:
                seq = envelope.seq if envelope.seq >= 0 else None
                payload = bytes(envelope.readings)
            elif b"readings" in data or b"command_ack" in data:
                top = _top_level(data, fmt)
                if top is not None and "command_ack" in top:
                    closing = self._command_ack(top, fmt)
                    if closing is not None:
                        break
                    continue
                if top is not None and "readings" in top:
                    try:
                        seq = _envelope_seq(top, fmt)
                    except (ValueError, msgspec.DecodeError) as exc:
                        detail = f"bad envelope: {exc}"
                        rejections.append(Rejection(reason="malformed", device_id=device_id, raw=bytes(data),
                                                    detail=detail))
                        closing = self._bad_frame(CLOSE_INVALID_PAYLOAD, "malformed", detail)
                        break
                    payload = bytes(top["readings"])
            mine, refused = validate(payload, fmt, "ws", device_id, received_ns)
            records += mine
            rejections += refused
            if seq is not None:
                acks.append((seq, len(mine), refused, binary))
            if len(refused) == 1 and refused[0].index is None:
                # The whole message was refused (undecodable, not an object or
                # array, over the payload limits): dead-lettered below, and a bad frame.
                whole = refused[0]
                code = CLOSE_TOO_BIG if whole.reason == "too_large" else CLOSE_INVALID_PAYLOAD
                closing = self._bad_frame(code, whole.reason, whole.detail)
                break
        if records or rejections or acks:
            await self._submit(records, rejections, first_ns or time.time_ns(), acks)
            limits = self.svc.limits
            if limits.readings_limited and records:
                # over a quota: this read is kept and acked, the next is read later
                await limits.pause(self.session, records, "ws", device_id, nbytes)
        return closing

    def _command_ack(self, top: dict[str, msgspec.Raw], fmt: str) -> tuple[int, str] | None:
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
                      acks: list[tuple[int, int, list[Rejection], bool]]) -> None:
        on_durable = self._make_on_durable(acks) if acks else None
        item = WorkItem(records, rejections, "ws", received_ns, on_durable)
        if acks:
            self.pending += 1
        pipeline = self.svc.pipeline
        if not pipeline.try_submit(item):
            try:
                await pipeline.submit(item, self.session)
            except BaseException:
                if acks:
                    self.pending -= 1   # never queued, so never acked
                raise

    def _make_on_durable(self, acks: list[tuple[int, int, list[Rejection], bool]]) -> Callable[[], None]:
        def on_durable() -> None:
            self.pending -= 1
            if not self.pending and self.acks_done is not None:
                self.acks_done.set()
            if self.closed:
                return
            self.ws.write([_ack_frame(seq, accepted, refused, binary) for seq, accepted, refused, binary in acks])
        return on_durable

    async def _send_commands(self, sends: list[Send]) -> None:
        if self.binary:
            frames = [encode_frame(OP_BINARY, _msgpack.encode({"command": s.command})) for s in sends]
        else:
            frames = [encode_frame(OP_TEXT, _json.encode({"command": s.command})) for s in sends]
        self.ws.write(frames)


def _envelope_seq(top: dict[str, msgspec.Raw], fmt: str) -> int | None:
    """The seq of an envelope ``{"seq": n, "readings": [...]}`` (None without one)."""
    unknown = top.keys() - _ENVELOPE_KEYS
    if unknown:
        raise ValueError(f"unknown envelope key(s) {sorted(unknown)}; an envelope is "
                         "{\"seq\": n, \"readings\": [...]}")
    if "seq" not in top:
        return None
    seq = (_json_seq if fmt == "json" else _msgpack_seq).decode(top["seq"])
    if seq < 0:
        raise ValueError("seq must be a non-negative integer")
    return seq


def _ack_frame(seq: int, accepted: int, rejected: list[Rejection], binary: bool) -> bytes:
    if not rejected and not binary:
        # nearly every ack: the bytes msgspec would write for the dict below, without the dict
        return encode_frame(OP_TEXT, b'{"ack":%d,"accepted":%d,"rejected":0,"errors":[]}' % (seq, accepted))
    ack = {"ack": seq, "accepted": accepted, "rejected": len(rejected),
           "errors": [{"index": r.index, "reason": r.reason, "field": r.field, "detail": r.detail}
                      for r in rejected]}
    if binary:
        return encode_frame(OP_BINARY, _msgpack.encode(ack))
    return encode_frame(OP_TEXT, _json.encode(ack))


def _top_level(data: bytes, fmt: str) -> dict[str, msgspec.Raw] | None:
    """The top-level object with its values undecoded; None if not an object."""
    try:
        return (_json_top if fmt == "json" else _msgpack_top).decode(data)
    except msgspec.DecodeError:  # not decodable or not an object: the validator judges it
        return None
