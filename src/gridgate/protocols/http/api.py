"""What the HTTP listener answers, whichever engine parsed the request.

Both engines hand a parsed Request here and send back what it returns, so
they differ only in how they parse and frame, never in behaviour.
"""
from __future__ import annotations

import math
import time
import zlib
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, final
from urllib.parse import unquote

import msgspec
import trio
from prometheus_client import CONTENT_TYPE_LATEST

from gridgate.downlink import commands as downlink
from gridgate.ingest.pipeline import WorkItem
from gridgate.ingest.records import DEVICE_ID_RE, Record, Rejection
from gridgate.security.authenticator import Authenticator, AuthFailure, Identity, source_address

if TYPE_CHECKING:
    from gridgate.connections.manager import Session
    from gridgate.protocols.services import Services

__all__ = ["Request", "HttpError", "Pending", "Done", "NeedsAuth", "NEEDS_AUTH", "begin_request", "begin_authenticated",
           "handle_request", "authenticate", "CHALLENGE", "deliver_command", "RemoteReply"]

# What another cluster node answered (gridgate.cluster): status, the JSON
# object, extra headers.
RemoteReply = tuple[int, Any, list[tuple[bytes, bytes]]]

_json = msgspec.json.Encoder()
JSON = b"application/json"
_FORMATS = {
    "": "json", "application/json": "json", "text/json": "json",
    "application/x-ndjson": "ndjson", "application/ndjson": "ndjson", "application/jsonl": "ndjson",
    "application/msgpack": "msgpack", "application/x-msgpack": "msgpack", "application/vnd.msgpack": "msgpack",
}
# Content-Type header values as sent -> _FORMATS' format (bounded: only
# accepted values up to 64 characters are kept, at most 256 of them)
_FORMAT_OF: dict[str, str] = {}
# RFC 9110 9.1: the methods the gateway serves on some resource, and the
# others it knows of. A known method a resource does not allow gets 405 with
# Allow; a method the gateway does not recognize at all, or one it serves on
# no resource asked for an unknown one, gets 501 (never 404: the method, not
# the path, is what cannot be served).
_SERVED = frozenset({"GET", "HEAD", "POST", "DELETE"})
_KNOWN = _SERVED | {"PUT", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
# A 401 of the admin API says how to authenticate (RFC 9110 11.6.1).
_ADMIN_CHALLENGE = [(b"www-authenticate", b'Bearer realm="gridgate-admin"')]
# Whole-payload rejections and the status they map to.
_WHOLE_STATUS = {"malformed": 400, "not_object": 400, "too_large": 413}


@dataclass
class Request:
    """The std engine's request: a fresh object and header dict per request.

    The fast engine passes its per-connection parser instead; both offer
    method, target, body, content_type, content_encoding, authorization
    and has_length.
    """
    method: str
    target: str
    headers: dict[str, str]          # lower-case names
    body: bytes = b""

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")

    @property
    def content_encoding(self) -> str:
        return self.headers.get("content-encoding", "")

    @property
    def authorization(self) -> str:
        return self.headers.get("authorization", "")

    @property
    def has_length(self) -> bool:
        return "content-length" in self.headers or "transfer-encoding" in self.headers


class RequestView(Protocol):
    """What routing reads of a request: a std Request, or the fast engine's
    per-connection parser (gridgate._fastparse.HTTPRequestParser)."""

    @property
    def method(self) -> str: ...
    @property
    def target(self) -> str: ...
    @property
    def body(self) -> bytes | memoryview: ...
    @property
    def content_type(self) -> str: ...
    @property
    def content_encoding(self) -> str: ...
    @property
    def authorization(self) -> str: ...
    @property
    def has_length(self) -> bool: ...


@dataclass
class HttpError(Exception):
    status: int
    error: str
    detail: str = ""
    extra: list[tuple[bytes, bytes]] = field(default_factory=list)

    def body(self) -> bytes:
        return _json.encode({"error": self.error, "detail": self.detail})


Answer = tuple[int, bytes, bytes, list[tuple[bytes, bytes]]]


def _ok(status: int, obj: object) -> Answer:
    return status, _json.encode(obj), JSON, []


class Waitable(Protocol):
    """What Pending needs of its ``done``: trio.Event has it, and Done."""

    def is_set(self) -> bool: ...

    def set(self) -> None: ...

    async def wait(self) -> None: ...


class Answered(Protocol):
    """Who a Done tells that it is set (``Done.then``): the fast engine's
    connection that owes the answer (an object it has anyway, where a
    bound method would be one more per connection)."""

    def answered(self) -> None: ...


@final
class Done:
    """trio.Event for one waiter, the connection's task: trio.Event keeps
    its waiters in a set (216 bytes, made with the event), and one is made
    per telemetry request, so at 1,000 connections each with a request in
    flight the sets alone were about 0.2 KiB per connection (issue 24).

    ``then``, when set, is told once by ``set`` (after waking the waiter,
    if any): the fast engine writes an answer from there, so the
    connection's task need not be woken by the commit at all.
    """
    __slots__ = ("_flag", "_task", "then")

    def __init__(self) -> None:
        self._flag = False
        self._task: trio.lowlevel.Task | None = None
        self.then: Answered | None = None

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        if not self._flag:
            self._flag = True
            task = self._task
            if task is not None:
                self._task = None
                trio.lowlevel.reschedule(task)
            then = self.then
            if then is not None:
                self.then = None
                then.answered()

    # the pipeline's on_durable: the Done itself, no bound method per request
    __call__ = set

    async def wait(self) -> None:
        """A checkpoint, as trio.Event.wait is, whether or not it blocks."""
        if self._flag:
            await trio.lowlevel.checkpoint()
            return
        if self._task is not None:
            raise RuntimeError("a Done has one waiter")
        self._task = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(self._abort)

    def _abort(self, _: object) -> trio.lowlevel.Abort:
        self._task = None
        return trio.lowlevel.Abort.SUCCEEDED


# never appended to: what an answered Pending holds instead of its readings
_ANSWERED: list[Any] = []


@final        # callers tell it from an Answer with `type(x) is Pending`
class Pending:
    """A telemetry request handed to the pipeline, waiting to be durable;
    or (``later``) a request another cluster node answers.

    The fast engine begins every request of a pipelined read before it
    waits for the first, so their records share one group commit.
    """
    __slots__ = ("done", "records", "rejections", "expired", "final")

    def __init__(self, done: Waitable, records: list[Record], rejections: list[Rejection]) -> None:
        self.done = done
        self.records = records
        self.rejections = rejections
        self.expired = False
        self.final: Answer | None = None

    @classmethod
    def later(cls, svc: Services, reply: Awaitable[RemoteReply]) -> Pending:
        """A request answered by ``reply`` (a cluster node's; it bounds its own
        wait), awaited by a task of the connection nursery so the engine waits
        for it as for a durable write."""
        pending = cls(Done(), [], [])

        async def wait() -> None:
            try:
                status, obj, extra = await reply
                pending.final = (status, _json.encode(obj), JSON, extra)
            finally:
                if pending.final is None:      # cancelled (the gateway stops): answer, do not hang
                    pending.final = _error(HttpError(503, "cluster_unavailable", "the gateway is stopping"))
                pending.done.set()

        svc.connection_nursery().start_soon(wait)
        return pending

    def expire(self) -> None:
        """The durable timeout passed (gridgate.ingest.durable_timeouts): answer 503 now."""
        self.expired = True
        self.done.set()

    async def answer(self) -> Answer:
        await self.done.wait()          # set by the commit, or by services.durable_timeouts
        return self.result()

    def result(self) -> Answer:
        """The answer once done is set: 202/400/413..., or the 503 of a durable timeout."""
        if self.final is not None:
            return self.final
        if self.expired:
            return _error(HttpError(503, "sink_unavailable", "not yet durable; retry later (it may be stored twice)",
                                    [(b"retry-after", b"5")]))
        rejections = self.rejections
        answer: Answer
        if len(rejections) == 1 and rejections[0].index is None:
            whole = rejections[0]
            answer = _error(HttpError(_WHOLE_STATUS.get(whole.reason, 400), whole.reason, whole.detail))
        elif not rejections:
            answer = 202, b'{"accepted":%d,"rejected":0,"errors":[]}' % len(self.records), JSON, []
        else:
            answer = _ok(202, {"accepted": len(self.records), "rejected": len(rejections),
                               "errors": [{"index": r.index, "reason": r.reason, "field": r.field,
                                           "detail": r.detail} for r in rejections]})
        # The answer is all a request needs now. The durable-timeout sweep
        # lets go of a done request up to SWEEP_S later: its records (a
        # fields dict, a Record, lists per request) must not wait for that,
        # under wrk-1000 that was thousands of answered requests' readings.
        self.final = answer
        self.records = self.rejections = _ANSWERED
        return answer


def _error(err: HttpError) -> Answer:
    return err.status, err.body(), JSON, err.extra


@final
class NeedsAuth:
    """What ``begin_request`` returns for a request that must be
    authenticated first (a check may wait: the failure delay): the engine
    calls ``begin_authenticated``, which awaits it and begins the request."""
    __slots__ = ()


NEEDS_AUTH = NeedsAuth()
# RFC 9110 11.6.1: the schemes a 401 offers.
CHALLENGE = (b"www-authenticate", b'Bearer realm="gridgate", Basic realm="gridgate", charset="UTF-8"')


async def handle_request(services: Services, request: Request, engine: str, remote: str = "",
                         certificate: Identity | None = None) -> Answer:
    """Route and answer one request (waits for durable on telemetry);
    ``remote`` is the peer (bans are per address), ``certificate`` the
    identity its verified client certificate proves, if any."""
    started = begin_request(services, request, engine)
    if type(started) is NeedsAuth:
        started = await begin_authenticated(services, request, engine, remote, certificate)
    if type(started) is Pending:
        return await started.answer()
    assert type(started) is tuple
    return started


def begin_request(services: Services, request: RequestView, engine: str, authenticated: bool = False,
                  identity: Identity | None = None) -> Answer | Pending | NeedsAuth:
    """Route one request without waiting: an Answer, a Pending telemetry
    write, or NEEDS_AUTH (then see ``begin_authenticated``). ``identity``:
    who ``begin_authenticated`` found the client to be (None: anonymous).

    Everything the request holds (the body included) is used before this
    returns, so the caller may reuse its buffers at once.
    """
    try:
        return _route(services, request, engine, authenticated, identity)
    except HttpError as err:
        return _error(err)


async def authenticate(auth: Authenticator, authorization: str, remote: str, protocol: str) -> Identity | None:
    """Who the ``Authorization`` header proves the client to be.

    Raises:
        HttpError: 401 with WWW-Authenticate for missing or invalid
            credentials (invalid ones after the failure delay); 403 at once
            from a banned address. The body never says which part was wrong.
    """
    try:
        return await auth.check_authorization(protocol, source_address(remote), authorization)
    except AuthFailure as exc:
        if exc.reason == "banned":
            raise HttpError(403, "banned", "too many failed authentications from this address") from None
        detail = "credentials required" if exc.reason == "no_credentials" else "invalid credentials"
        raise HttpError(401, "unauthorized", detail, [CHALLENGE]) from None


async def begin_authenticated(services: Services, request: RequestView, engine: str, remote: str,
                              certificate: Identity | None = None) -> Answer | Pending:
    """Authenticate a request ``begin_request`` said NEEDS_AUTH, then begin
    it. A connection's verified client certificate (https) is its identity,
    before any Authorization header."""
    assert services.auth is not None
    if certificate is not None:
        identity: Identity | None = certificate
    else:
        try:
            identity = await authenticate(services.auth, request.authorization, remote, "http")
        except HttpError as err:
            return _error(err)
    started = begin_request(services, request, engine, True, identity)
    assert type(started) is not NeedsAuth
    return started


def _route(svc: Services, req: RequestView, engine: str, authenticated: bool,
           identity: Identity | None) -> Answer | Pending | NeedsAuth:
    path = req.target
    if "?" in path:
        path = path.split("?", 1)[0]
    if path == "/v1/telemetry":
        if req.method != "POST":
            _allow(req, "POST")
        if svc.auth is not None and not authenticated:
            return NEEDS_AUTH           # before the body is even looked at
        return _telemetry(svc, req, engine, identity)
    if path == "/healthz":
        _allow(req, "GET")
        return _ok(200, {"status": "ok"})
    if path == "/readyz":
        _allow(req, "GET")
        reasons = svc.not_ready_reasons()
        if reasons:
            return _ok(503, {"status": "not_ready", "reasons": reasons, "sink": svc.sink_status()})
        return _ok(200, {"status": "ready", "sink": svc.sink_status()})
    if path == "/metrics":
        _allow(req, "GET")
        if svc.admin.metrics_token_required:
            _admin(svc, req, ())
        return 200, svc.metrics.render(), CONTENT_TYPE_LATEST.encode(), []
    if path == "/v1/connections":
        _allow(req, "GET")
        _admin(svc, req, ("devices:read",))
        here = {"total": len(svc.conns), "by_protocol": svc.conns.by_protocol()}
        if svc.cluster is not None:
            return Pending.later(svc, svc.cluster.connections(here))
        return _ok(200, here)
    if path == "/v1/bans":
        _allow(req, "GET")
        _admin(svc, req, ("devices:read", "bans:write"))
        now = trio.current_time()
        bans = [{"kind": b.kind, "key": b.key, "reason": b.reason, "expires_in_s": round(b.until - now, 3)}
                for b in svc.limits.bans.active(now)]
        if svc.auth is not None:     # addresses banned for failed authentications (security.authenticator)
            bans += [{"kind": "address", "key": address, "reason": "auth_failures",
                      "expires_in_s": round(until - now, 3)} for address, until in svc.auth.active_bans()]
        return _ok(200, {"bans": bans})
    if path.startswith("/v1/bans/") and path.count("/") == 4:
        _allow(req, "DELETE")
        _admin(svc, req, ("bans:write",))
        kind, _, key = path[len("/v1/bans/"):].partition("/")
        key = unquote(key)
        if kind == "address" and svc.auth is not None:
            lifted = svc.auth.lift_ban(key)
        else:
            lifted = svc.limits.bans.lift(kind, key)
        if not lifted:
            raise HttpError(404, "not_found", f"no {kind} ban on {key!r}")
        return _ok(200, {"lifted": {"kind": kind, "key": key}})
    if path.startswith("/v1/devices/") and path.endswith("/commands") and path.count("/") == 4:
        _allow(req, "POST")
        _admin(svc, req, ("commands:write",))
        return _command(svc, req, path[len("/v1/devices/"):-len("/commands")])
    if path.startswith("/v1/devices/") and path.count("/") == 3:
        _allow(req, "GET")
        _admin(svc, req, ("devices:read",))
        device_id = path[len("/v1/devices/"):]
        info = svc.conns.device_info(device_id)
        if svc.cluster is not None and (info is None or not info["online"]) and DEVICE_ID_RE.match(device_id):
            return Pending.later(svc, svc.cluster.device(device_id, info))
        if info is None:
            raise HttpError(404, "not_found", "device never seen")
        return _ok(200, info)
    if req.method not in _SERVED:
        raise _not_implemented(req.method)
    raise HttpError(404, "not_found", f"no resource {path}")


def _admin(svc: Services, req: RequestView, scopes: tuple[str, ...]) -> None:
    """The admin API's gate: 401 without a known admin token, 403 without the scope."""
    refused = svc.admin.check(req.authorization, scopes)
    if refused is not None:
        status, error, detail = refused
        raise HttpError(status, error, detail, list(_ADMIN_CHALLENGE) if status == 401 else [])


def _not_implemented(method: str) -> HttpError:
    return HttpError(501, "not_implemented", f"method {method!r} is not implemented")


def _allow(req: RequestView, method: str) -> None:
    """Only ``method`` here (HEAD too where it is GET: RFC 9110 9.3.2)."""
    got = req.method
    if got == method or (got == "HEAD" and method == "GET"):
        return
    if got not in _KNOWN:
        raise _not_implemented(got)
    allow = b"GET, HEAD" if method == "GET" else method.encode()
    raise HttpError(405, "method_not_allowed", f"use {allow.decode()}", [(b"allow", allow)])


def _decompress(body: bytes | memoryview, encoding: str, limit: int) -> bytes | memoryview:
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "x-gzip"):
        raise HttpError(415, "unsupported_encoding", f"Content-Encoding {encoding!r} is not supported (gzip is)")
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(body, limit + 1)
        if len(out) > limit:
            raise HttpError(413, "too_large", f"decompressed body exceeds max_body_bytes {limit}")
        if not d.eof:
            raise HttpError(400, "malformed", "gzip body is truncated")
    except zlib.error as exc:
        raise HttpError(400, "malformed", f"gzip body is corrupt: {exc}") from None
    return out


def _telemetry(svc: Services, req: RequestView, engine: str, identity: Identity | None) -> Pending:
    cfg = svc.config.http
    if not req.has_length:
        raise HttpError(411, "length_required", "send Content-Length or Transfer-Encoding: chunked")
    raw_type = req.content_type
    fmt = _FORMAT_OF.get(raw_type)       # a client sends the same header every time
    if fmt is None:
        ctype = raw_type.split(";", 1)[0].strip().lower()
        fmt = _FORMATS.get(ctype)
        if fmt is None:
            raise HttpError(415, "unsupported_media_type", f"Content-Type {ctype!r}; use application/json, "
                            "application/x-ndjson or application/msgpack")
        if len(_FORMAT_OF) < 256 and len(raw_type) <= 64:
            _FORMAT_OF[raw_type] = fmt
    encoding = req.content_encoding
    body = _decompress(req.body, encoding.strip().lower(), cfg.max_body_bytes) if encoding else req.body
    received_ns = time.time_ns()
    validator = svc.std_validator if engine == "std" else svc.validator
    records, rejections = validator.validate(body, fmt, "http", None, received_ns)
    if svc.auth is not None and records:
        records = authorize_readings(svc.auth, identity, records, rejections, "http")
    limits = svc.limits
    if limits.readings_limited and records:
        # all or nothing: a request over a quota stores nothing and is not
        # dead-lettered (a flood must not fill the dead-letter store)
        charge = limits.admit(records, "http", records[0].device_id, len(body))
        if charge.wait > 0:
            raise HttpError(429, "rate_limited", f"over the limit {charge.name!r}; retry later",
                            [(b"retry-after", b"%d" % max(1, math.ceil(charge.wait)))])
    done = Done()
    item = WorkItem(records, rejections, "http", received_ns, done)
    if not svc.pipeline.try_submit(item):
        raise HttpError(503, "overloaded", "the ingest pipeline is full; retry later", [(b"retry-after", b"1")])
    pending = Pending(done, records, rejections)
    svc.durable_timeouts.add(pending)
    return pending


def authorize_readings(auth: Authenticator, identity: Identity | None, records: list[Record],
                       rejections: list[Rejection], protocol: str) -> list[Record]:
    """The records whose device ``identity`` may write (a write to
    ``devices/{id}/telemetry``); each other one becomes a ``not_authorized``
    rejection at its batch index (``rejections`` grows, kept in index order),
    its raw bytes the normalized record, as sink_refused ones are."""
    name = identity.name if identity is not None else None
    may = auth.acl.may_write_device
    if all(may(name, r.device_id) for r in records):
        return records                   # the usual case: nothing allocated
    # a record's batch index: the validator emits one record or one
    # rejection per item, in order, so records fill the indices rejections leave
    taken = {r.index for r in rejections}
    kept: list[Record] = []
    index = 0
    refused = 0
    for record in records:
        while index in taken:
            index += 1
        if may(name, record.device_id):
            kept.append(record)
        else:
            refused += 1
            rejections.append(Rejection(reason="not_authorized", field="device_id", index=index,
                                        device_id=record.device_id, raw=_json.encode(record),
                                        detail="this identity may not write readings of this device"))
        index += 1
    rejections.sort(key=lambda r: -1 if r.index is None else r.index)
    if auth.metrics is not None:
        auth.metrics.not_authorized.labels(protocol, "write").inc(refused)
    return kept


def _command(svc: Services, req: RequestView, device_id: str) -> Answer | Pending:
    """POST /v1/devices/{id}/commands (DESIGN section 6): hand the command to
    the connection that holds the device now; 202 once it has it."""
    if not DEVICE_ID_RE.match(device_id):
        raise HttpError(400, "bad_device_id", "device id must match [A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
    if not req.has_length:
        raise HttpError(411, "length_required", "send Content-Length or Transfer-Encoding: chunked")
    ctype = req.content_type.split(";", 1)[0].strip().lower()
    if _FORMATS.get(ctype) != "json":
        raise HttpError(415, "unsupported_media_type", f"Content-Type {ctype!r}; a command is application/json")
    limit = svc.config.downlink.max_command_bytes
    body = _decompress(req.body, req.content_encoding.strip().lower(), limit)
    if len(body) > limit:
        raise HttpError(413, "too_large", f"command body exceeds downlink.max_command_bytes {limit}")
    command = _parse_command(bytes(body), limit)
    session = svc.conns.get_device(device_id)
    if session is None and svc.cluster is not None:
        # another gateway of the cluster may hold it: the one that does delivers
        return Pending.later(svc, svc.cluster.command(device_id, bytes(body)))
    return _deliver(svc, device_id, command, session)


def _parse_command(body: bytes, limit: int) -> downlink.Command:
    try:
        return downlink.parse_command(body, limit)
    except downlink.CommandError as exc:
        raise HttpError(exc.status, exc.error, exc.detail) from None


def deliver_command(svc: Services, device_id: str, body: bytes) -> RemoteReply:
    """A command another cluster node was POSTed for a device this node
    holds (the body was checked there, and is checked again here): what
    POST /v1/devices/{id}/commands answers, for that node to send on."""
    try:
        if not DEVICE_ID_RE.match(device_id):
            raise HttpError(400, "bad_device_id", "device id must match [A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
        command = _parse_command(body, svc.config.downlink.max_command_bytes)
        status, data, _, extra = _deliver(svc, device_id, command, svc.conns.get_device(device_id))
        return status, msgspec.json.decode(data), extra
    except HttpError as err:
        return err.status, {"error": err.error, "detail": err.detail}, err.extra


def _deliver(svc: Services, device_id: str, command: downlink.Command, session: Session | None) -> Answer:
    send = session.send_command if session is not None and not session.cancel_scope.cancel_called else None
    if send is None:
        raise HttpError(404, "device_offline", f"no live connection holds device {device_id!r}")
    if not send(command):
        raise HttpError(503, "device_busy", f"device {device_id!r} already has downlink.max_queued commands pending",
                        [(b"retry-after", b"1")])
    return _ok(202, {"command_id": command.id, "delivered": True})
