"""The NATS JetStream sink (DESIGN section 2, ``[nats]``; section 7, the Sink protocol).

Every record is published to JetStream on a subject built from a template
(``telemetry.{region}.{device_id}``) and ``write`` returns only when the
stream has acknowledged every one of them: a JetStream ack means the message
is stored (on a quorum of the stream's replicas when ``replicas`` > 1), which
is what "durable" means for this sink.

Publishing
    A sliding window of at most ``max_inflight`` publishes (default
    ``DEFAULT_MAX_INFLIGHT``, shared by concurrent writes) is in flight;
    each ack lets the next message go. Every publish asks for its ack on a
    reply subject ``<inbox>.<slot>`` under one inbox subscription of the sink,
    so there is no task or timer per message. A slot is one of the window's
    ``max_inflight`` places: it carries one publish at a time and is given to
    the next only once the ack (or error) of that publish came in on it, so an
    answer on a slot is always the answer of the publish it carries now. A
    publish that gets no answer (its ack timed out, the connection dropped,
    its write ended first) retires its slot for good: a new slot number
    replaces it, and a late ack there still counts for that message while its
    write runs (and is dropped after). Reusing the same few hundred reply subjects, rather than a new
    one per publish, lets nats-server route each ack from its subject cache:
    about 1 us of the server's 10-12 us of CPU per stored message, measured
    with a raw publisher on loopback. A publish is retried (same msg-id) only
    when it failed itself: no ack within ``ack_timeout_s`` of when THAT publish
    was sent, the connection dropped after it was sent, no stream answered,
    or JetStream answered with a transient error. The window keeps the acks
    waiting to be read few enough that, even with the machine under load,
    they are read long before their timeouts: timeouts do not cascade.

Wire format
    The message body is the normalized :class:`~gridgate.ingest.records.Record`
    encoded as **MessagePack** by msgspec: a map with the keys ``device_id``,
    ``ts_ns``, ``received_ns``, ``protocol``, ``fields`` and ``tags`` (the
    same names as the JSON Lines of ``gridgate spool export``; ``traceparent``
    and ``tracestate`` too when the device sent a W3C Trace Context, which
    a one-reading message also carries as headers of those names). MessagePack
    because it is what the gateway already decodes in its hot path, it is
    smaller than JSON, and keeps ints and floats apart; a consumer decodes
    it with ``msgspec.msgpack.decode(data, type=Record)`` or any msgpack library.

Batched format (opt-in: ``readings_per_message`` > 1, ``[nats] readings_per_message``)
    The records of one write are grouped by their rendered subject (groups in
    the order their first record came, records in their order within a
    group) and each group is cut into messages of at most
    ``readings_per_message`` readings. The body is a MessagePack **array** of
    the same record maps (``msgspec.msgpack.decode(data, type=list[Record])``)
    and the header ``Gridgate-Readings: <count>`` says so (it is on every
    message of this format, a message of one reading too; a message without
    it is the one-reading format above). A message that would pass the
    server's ``max_payload`` is halved until it fits.

    The subject rule: every reading in a message has that message's subject.
    So batching only helps where many readings of a write share a subject:
    with ``subject = "telemetry.{region}"`` a write of 1,000 readings from
    three regions is a handful of messages, while with the default
    ``telemetry.{region}.{device_id}`` most messages still carry one reading
    (and a consumer filtering on a device's subject still gets only that
    device's readings). A write is durable only when the ack of every one of
    its messages is in; if one is missing the write fails as a whole.

    The ``Nats-Msg-Id`` of a batch message is ``readings:<count>:<hash>``, the
    hash being BLAKE2b-128 of the very content each reading's own msg-id is
    a hash of (device id, ts_ns, fields, tags), for all its readings in
    order: two messages get the same id exactly when they carry the same
    readings (the same per-reading msg-ids) in the same order. So the replay
    of a failed write, or of pending records in the same batches, is
    de-duplicated by JetStream. A replay grouped differently (the pipeline
    cut the batch elsewhere, a device resent a subset, the store-and-forward
    replayer's batches do not line up with the live ones) makes different
    messages and is stored again: the batched format is at-least-once per
    reading, and a consumer that must be exact de-duplicates by reading
    (:func:`msg_id` of each decoded record gives the same id the one-reading
    format would have used).

Subjects
    ``{device_id}``, ``{protocol}`` and ``{<tag name>}`` (for instance
    ``{region}``, ``{site}``, ``{zone}``) are filled per record. A placeholder
    must be a whole subject token. Each value is made a valid subject token:
    every character outside ``[A-Za-z0-9_:-]`` (so ``.``, ``*``, ``>``, spaces,
    non-ASCII) becomes ``_``, it is cut at 128 characters, and an empty or
    missing value becomes ``_``. Sanitizing may map two device ids to one
    subject; the body carries the exact device id.

De-duplication
    Each message has the header ``Nats-Msg-Id = <device token>:<ts_ns>:<hash>``
    where the hash is BLAKE2b-96 of the reading's content (device id, ts_ns,
    fields, tags; keys sorted). It leaves out ``received_ns`` and ``protocol``
    on purpose: a device replaying the same reading after a reconnect, or the
    gateway retrying a batch after a failed write, produces the same id, and
    JetStream drops it if it arrives within the stream's ``duplicate_window``.
    Replays older than the window are stored again (at-least-once, like the
    rest of gridgate): consumers that must be exact de-duplicate by the id.

Trio and asyncio
    nats-py is asyncio-only; gridgate is Trio. The sink runs ONE asyncio event
    loop on its own daemon thread for its whole life and hands it coroutines
    with ``asyncio.run_coroutine_threadsafe``. To wait for the result, Trio
    does not park a worker thread on ``future.result()`` (that would hold one
    of Trio's worker threads, a limited pool, for every write in flight):
    the future's done-callback, which runs on the asyncio thread, calls
    ``TrioToken.run_sync_soon(event.set)`` - the one thread-safe way into Trio
    - and the Trio task sleeps on a ``trio.Event``. Cancelling the Trio task
    cancels the asyncio task (``future.cancel()``): no further record is
    published and the write's window slots are given back. Records already
    acked, or published and still to be stored, de-duplicate if the batch
    is written again.
"""
from __future__ import annotations

import asyncio
import functools
import hashlib
import heapq
import itertools
import logging
import random
import re
import threading
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATSClient
from nats.js.api import StorageType, StreamConfig
from nats.protocol.parser import AWAITING_CONTROL_LINE, Parser

from gridgate import hotpath
from gridgate.asyncio_thread import AsyncioThread, LoopClosed
from gridgate.ingest.records import Record
from gridgate.sinks import nats_acks_py, nats_frames_py

__all__ = ["NATSSink", "SinkWriteError", "SinkOpenError", "SubjectTemplate", "sanitize_token", "msg_id",
           "encode_record", "decode_record", "subject_covers", "batch_msg_id", "encode_records", "decode_records",
           "READINGS_HEADER", "MAX_READINGS_PER_MESSAGE", "TRACEPARENT_HEADER", "TRACESTATE_HEADER"]

log = logging.getLogger("gridgate.sinks.nats")

T = TypeVar("T")

MSG_ID_HEADER = "Nats-Msg-Id"
EXPECTED_STREAM_HEADER = "Nats-Expected-Stream"
NO_RESPONDERS_STATUS = "503"
# Publishes in flight at once, across every write of one sink. Enough to keep
# a local or LAN JetStream busy (the acks of a window come back long before
# ack_timeout_s), small enough that a loaded machine reads every ack of the
# window in a few ms rather than letting them queue past their timeouts.
DEFAULT_MAX_INFLIGHT = 512
# One-reading messages are encoded and sent this many at a time, so that
# JetStream stores the first of a write while the rest are encoded.
_BUILD_CHUNK = 128
MAX_TOKEN_CHARS = 128
# Frame heads kept (one per subject): beyond this many the cache starts over.
_MAX_HEADS = 65536
# The batched format's header: its value is the number of readings in the body.
READINGS_HEADER = "Gridgate-Readings"
# W3C Trace Context (the device's MQTT 5 User Properties), on a one-reading
# message whose record carries it.
TRACEPARENT_HEADER = "traceparent"
TRACESTATE_HEADER = "tracestate"
MAX_READINGS_PER_MESSAGE = 10_000
# Bytes of a message's max_payload left to its headers (msg-id, expected
# stream, readings, and the NATS/1.0 header line): a batch body is cut to
# fit the rest.
HEADER_ROOM = 1024


class SinkWriteError(Exception):
    """A batch was not (wholly) acknowledged by JetStream: treat it as not written."""


class SinkOpenError(Exception):
    """The sink could not connect to NATS or set up its stream."""


# -- pure helpers: subjects, ids, encoding ------------------------------------------

_BAD_TOKEN_CHARS = re.compile(r"[^A-Za-z0-9_:\-]")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_LITERAL_TOKEN = re.compile(r"[A-Za-z0-9_:\-$]+")
_STREAM_NAME = re.compile(r"[A-Za-z0-9_\-]{1,255}")


@functools.lru_cache(maxsize=65536)
def sanitize_token(value: str) -> str:
    """``value`` as one valid NATS subject token (no ``.``, ``*``, ``>``, whitespace)."""
    token = _BAD_TOKEN_CHARS.sub("_", value[:MAX_TOKEN_CHARS])
    return token or "_"


class SubjectTemplate:
    """A subject template such as ``telemetry.{region}.{device_id}``, checked once."""

    def __init__(self, template: str) -> None:
        if not isinstance(template, str) or not template:
            raise ValueError("nats subject template must be a non-empty string")
        self.template = template
        # (is_placeholder, literal text or placeholder name) per token
        self._parts: list[tuple[bool, str]] = []
        for token in template.split("."):
            m = _PLACEHOLDER.fullmatch(token)
            if m:
                self._parts.append((True, m.group(1)))
            elif not token:
                raise ValueError(f"nats subject template {template!r} has an empty token")
            elif "{" in token or "}" in token:
                raise ValueError(f"nats subject template {template!r}: a placeholder must be a whole token "
                                 f"({token!r}), e.g. telemetry.{{region}}.{{device_id}}")
            elif not _LITERAL_TOKEN.fullmatch(token):
                raise ValueError(f"nats subject template {template!r}: token {token!r} is not a valid subject "
                                 f"token (letters, digits, _ - : only; no spaces, * or >)")
            else:
                self._parts.append((False, token))
        self.placeholders = tuple(name for is_ph, name in self._parts if is_ph)
        # the subject of a record: this template's compiled twin of render_parts
        self.render: Callable[[Record], str] = self._compile()

    def _compile(self) -> Callable[[Record], str]:
        """``render`` made for this template: one expression, no walk over its parts.

        It runs once per reading of the one-reading format: the walk over the
        parts took 0.9 us per reading of the default template here, this
        0.4-0.6 us (encoding the record takes 0.4). Generated source is
        safe here: a literal token matched ``_LITERAL_TOKEN`` and goes in as its
        ``repr``, a placeholder name matched ``_PLACEHOLDER`` (an identifier)
        and is only ever a dict key.
        """
        terms: list[str] = []
        for is_ph, text in self._parts:
            if not is_ph:
                terms.append(repr(text))
            elif text == "device_id":
                terms.append("st(r.device_id)")
            elif text == "protocol":
                terms.append("st(r.protocol)")
            else:
                terms.append(f"st(r.tags.get({text!r}, ''))")
        source = "lambda r: " + " + '.' + ".join(terms)
        render: Callable[[Record], str] = eval(compile(source, f"<subject {self.template!r}>", "eval"),
                                               {"__builtins__": {}, "st": sanitize_token})
        return render

    @property
    def wildcard(self) -> str:
        """The subject filter covering every subject this template renders (``telemetry.*.*``)."""
        return ".".join("*" if is_ph else text for is_ph, text in self._parts)

    def render_parts(self, record: Record) -> str:
        """The subject of ``record``, by a walk over the parts: the reference ``render`` agrees with."""
        out = []
        for is_ph, text in self._parts:
            if not is_ph:
                out.append(text)
            elif text == "device_id":
                out.append(sanitize_token(record.device_id))
            elif text == "protocol":
                out.append(sanitize_token(record.protocol))
            else:
                out.append(sanitize_token(record.tags.get(text, "")))
        return ".".join(out)

    def __repr__(self) -> str:
        return f"SubjectTemplate({self.template!r})"


def subject_covers(pattern: str, subject: str) -> bool:
    """True when every subject matched by ``subject`` (itself possibly a wildcard)
    is matched by the stream subject ``pattern`` (NATS ``*`` and ``>`` rules)."""
    p, s = pattern.split("."), subject.split(".")
    for i, pt in enumerate(p):
        if pt == ">":
            return len(s) > i            # ">" matches one or more remaining tokens of any kind
        if i >= len(s):
            return False
        if s[i] == ">":
            return False                 # the filter reaches further than a single token
        if pt != "*" and pt != s[i]:
            return False
    return len(p) == len(s)


_id_encoder = msgspec.msgpack.Encoder(order="deterministic")
_payload_encoder = msgspec.msgpack.Encoder()
_payload_decoder = msgspec.msgpack.Decoder(Record)


# copied per id: a third cheaper than a new hashlib.blake2b(..., digest_size=12)
_blake2b_96 = hashlib.blake2b(digest_size=12)


def msg_id(record: Record) -> str:
    """The deterministic ``Nats-Msg-Id`` of a reading (see the module docstring)."""
    h = _blake2b_96.copy()
    h.update(_id_encoder.encode((record.device_id, record.ts_ns, record.fields, record.tags)))
    return f"{sanitize_token(record.device_id)}:{record.ts_ns}:{h.hexdigest()}"


@functools.lru_cache(maxsize=65536)
def _token_bytes(device_id: str) -> bytes:
    return sanitize_token(device_id).encode()


def encode_record(record: Record) -> bytes:
    """The message body: the record as MessagePack (a map keyed by field name)."""
    return _payload_encoder.encode(record)


def decode_record(data: bytes) -> Record:
    return _payload_decoder.decode(data)


_batch_decoder = msgspec.msgpack.Decoder(list[Record])


def batch_msg_id(records: Sequence[Record]) -> str:
    """The ``Nats-Msg-Id`` of a batched message (see the module docstring).

    One hash over what every reading's :func:`msg_id` hashes, in order,
    rather than a hash of the msg-ids themselves: the same readings in the
    same order give the same id either way, and this costs a fifth (one
    encode and one digest per message instead of one per reading).
    """
    content = _id_encoder.encode([(r.device_id, r.ts_ns, r.fields, r.tags) for r in records])
    return f"readings:{len(records)}:{hashlib.blake2b(content, digest_size=16).hexdigest()}"


def encode_records(records: Sequence[Record]) -> bytes:
    """A batched message's body: a MessagePack array of record maps."""
    return _payload_encoder.encode(records)


def decode_records(data: bytes) -> list[Record]:
    return _batch_decoder.decode(data)


class _PublishFailed(Exception):
    def __init__(self, subject: str, mid: str, cause: BaseException | None, attempts: int) -> None:
        super().__init__(subject, mid, cause, attempts)
        self.subject, self.msg_id, self.cause, self.attempts = subject, mid, cause, attempts

    def __str__(self) -> str:
        cause = self.cause
        if isinstance(cause, nats.js.errors.NoStreamResponseError):
            why = "no stream answered (stream leader down or being elected, or no stream on this subject)"
        elif isinstance(cause, asyncio.TimeoutError) or cause is None:
            why = "no ack before the deadline"
        else:
            why = f"{type(cause).__name__}: {cause}"
        return f"subject {self.subject!r} msg-id {self.msg_id!r}: {why} (after {self.attempts} attempt(s))"


# Errors no retry can fix: the connection is gone for good, the message is
# too big, or JetStream refused the request itself (4xx: wrong stream, ...).
_FATAL: tuple[type[BaseException], ...] = (
    nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError, nats.errors.MaxPayloadError,
    nats.errors.BadSubjectError)


def _is_fatal(e: BaseException) -> bool:
    if isinstance(e, _FATAL) or isinstance(e, _WrongStream):
        return True
    return isinstance(e, nats.js.errors.APIError) and e.code is not None and 400 <= e.code < 500


class _Disconnected(Exception):
    """The connection dropped while a publish waited for its ack."""

    def __str__(self) -> str:
        return "the connection dropped before the ack came"


class _PubAck(msgspec.Struct):
    """A JetStream publish ack: ``{"stream", "seq", "duplicate"}``, or ``{"error": {...}}``."""
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: dict[str, Any] | None = None


_ack_decoder = msgspec.json.Decoder(_PubAck)


class _WrongStream(Exception):
    """An ack from a stream other than the sink's (the subject is captured by another stream)."""

    def __init__(self, got: str, want: str) -> None:
        super().__init__(got, want)
        self.got, self.want = got, want

    def __str__(self) -> str:
        return f"acked by stream {self.got!r}, not {self.want!r}"


# The scan of a read's plain acks: compiled (src/_fastparse_nats.pxi), or its
# twin when the extension is not loaded (or was built before it had the scan).
_scan_plain_acks: Callable[[bytearray, int, bytes, bytes, bytes, list[bytes]], int] = (
    getattr(hotpath.fastparse, "nats_scan_plain_acks", None) or nats_acks_py.scan_plain_acks)


# The build of one-reading messages: compiled (src/_fastparse_nats.pxi), or its twin.
_build_frames: Callable[..., int] = (
    getattr(hotpath.fastparse, "nats_build_frames", None) or nats_frames_py.build_frames)


class _Parser(Parser):
    """nats-py's protocol parser, reading the acks at the head of a read in one pass.

    nats-py's parser matches a regex per control line, copies the payload
    and deletes what it consumed from the front of its buffer, then awaits
    the client's ``_process_msg``, for every message. A read of a window's
    acks is hundreds of ``MSG <inbox>.<write>.<index>.<attempt> <ack sid>
    <size>`` lines, each with a small PubAck body: those at the head of the
    buffer are handed to ``on_acks`` in one list, the buffer is cut once, and
    whatever else comes (a status message with headers, PING, INFO, -ERR,
    a reply to the JetStream API, a message cut by the read) goes to
    nats-py's own parse from there on, as before.

    Most acks are the plain ``{"stream":"<ours>", "seq":N}`` of a message
    stored once. Given the form of those (``take_acks(plain=...)``), the
    parser takes each run of them, line and body, in one call of
    ``_scan_plain_acks`` (compiled, or its twin ``nats_acks_py``) and hands
    over only their reply slots, to ``on_plain``; the others (a duplicate,
    an error) still take the split-and-convert per ack.
    """

    nc: _Client

    async def parse(self, data: bytes = b"") -> None:
        buf = self.buf
        buf.extend(data)
        nc = self.nc
        on_acks = nc.on_acks
        if self.state == AWAITING_CONTROL_LINE and on_acks is not None:
            sid, end, pos = nc.ack_sid_bytes, len(buf), 0
            acks: list[tuple[bytes, bytes, bytes | None]] = []
            plain: list[bytes] = []
            plain_form = nc.plain_form
            waiting = False                      # an ack at the head is cut: wait for the rest
            while True:
                if plain_form is not None:
                    # a run of plain acks; what stops it is read below
                    pos = _scan_plain_acks(buf, pos, plain_form[0], sid, plain_form[1], plain)
                if not buf.startswith(b"MSG ", pos):
                    break
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    waiting = True               # nats-py would wait for the line's end too
                    break
                # an ack carries no reply subject: <subject> <sid> <size>
                # (nats-server writes two spaces where the reply would be)
                args = buf[pos + 4:eol].split()
                if len(args) != 3 or args[1] != sid:
                    break
                start = eol + 2
                stop = start + int(args[2])
                if stop + 2 > end:
                    # its body is still to come; left whole in the buffer, so
                    # that the next read starts with it here again (nats-py's
                    # parse would take its line and the rest of that read)
                    waiting = True
                    break
                acks.append((bytes(args[0]), bytes(buf[start:stop]), None))
                pos = stop + 2
            if pos:
                del buf[:pos]
                if plain:
                    nc.on_plain(plain)           # type: ignore[misc]  # set with plain_form
                if acks:
                    on_acks(acks)
            if waiting:
                return
        await super().parse()


class _Client(NATSClient):
    """nats-py's client with the sink's ack subscription taken off its per-message path.

    nats-py hands every incoming message to a subscription as a ``Msg`` (its
    headers parsed into a dict) through an asyncio queue and a task per
    subscription: about 10 us of Python per ack, as much again as the rest
    of a reading's way through the gateway. The acks of the sink's inbox
    subscription (``ack_sid``) go straight from the protocol parser to
    ``on_acks`` instead, as the raw subject, body and header bytes; every
    other message (the JetStream API's replies) takes nats-py's own path.
    """

    ack_sid = -1
    ack_sid_bytes = b""
    on_acks: Callable[[list[tuple[bytes, bytes, bytes | None]]], None] | None = None
    # (reply prefix, ack body up to the sequence number) of the plain acks
    plain_form: tuple[bytes, bytes] | None = None
    on_plain: Callable[[list[bytes]], None] | None = None

    def __init__(self) -> None:
        super().__init__()
        self._ps = _Parser(self)

    def take_acks(self, sid: int, on_acks: Callable[[list[tuple[bytes, bytes, bytes | None]]], None],
                  plain: tuple[bytes, str, Callable[[list[bytes]], None]] | None = None) -> None:
        """Hand the messages of subscription ``sid`` to ``on_acks``: (subject, body, header bytes or None) each.

        ``plain``: (reply prefix, stream, on_plain). The plain acks of that
        stream on ``<reply prefix><slot>`` go to ``on_plain`` instead, as the
        slot's digits each.
        """
        self.ack_sid, self.ack_sid_bytes, self.on_acks = sid, b"%d" % sid, on_acks
        if plain is None:
            self.plain_form = self.on_plain = None
            return
        prefix, stream, self.on_plain = plain
        self.plain_form = (prefix, b'{"stream":%b, "seq":' % msgspec.json.encode(stream))

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes,
                           headers: bytes) -> None:
        on_acks = self.on_acks
        if sid == self.ack_sid and on_acks is not None:
            on_acks([(subject, data, headers)])
            return
        await super()._process_msg(sid, subject, reply, data, headers)


def _api_error(err: dict[str, Any]) -> nats.js.errors.APIError:
    """The nats-py error of an ack's ``error`` object (``from_error`` raises it)."""
    fields = {"code": err.get("code"), "err_code": err.get("err_code"), "description": err.get("description")}
    try:
        nats.js.errors.APIError.from_error(fields)
    except nats.js.errors.APIError as e:
        return e
    return nats.js.errors.APIError(**fields)      # pragma: no cover - from_error always raises


def _header_block(mid: str, tail: bytes, readings: int | None, record: Record | None) -> bytes:
    """A message's header block, ``tail`` being the Nats-Expected-Stream line and the blank line."""
    lines = [b"NATS/1.0\r\nNats-Msg-Id: ", mid.encode()]
    if readings is not None:
        lines.append(b"\r\n%b: %d" % (READINGS_HEADER.encode(), readings))
    if record is not None and record.traceparent is not None:
        lines.append(b"\r\n%b: %b" % (TRACEPARENT_HEADER.encode(), _header_value(record.traceparent)))
        if record.tracestate is not None:
            lines.append(b"\r\n%b: %b" % (TRACESTATE_HEADER.encode(), _header_value(record.tracestate)))
    lines.append(tail)
    return b"".join(lines)


_HEADER_VALUE_NEWLINES = str.maketrans({"\r": " ", "\n": " "})


def _header_value(value: str) -> bytes:
    return value.strip().translate(_HEADER_VALUE_NEWLINES).encode()


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _Window:
    """One ``write``'s publishes, driven on the asyncio thread.

    A sliding window: a message is published while the sink has a free slot
    (``max_inflight``, shared by concurrent writes), and every ack frees one.
    Each publish asks for its ack on its slot's reply subject ``<inbox>.<slot>``
    (the module docstring); one subscription of the sink routes acks here. A publish is retried, with the
    same msg-id, only when THAT publish failed: its ack did not come within
    ``ack_timeout_s`` of when it was sent, the connection dropped after it
    was sent, no stream answered, or JetStream answered with a transient
    error; after a jittered backoff that grows per message. An ack of any
    attempt of a message counts (the message is stored). Errors no retry
    fixes end the write at once; so does the write's deadline.

    ``readings`` is None for the one-reading format, else the number of
    readings in each message (the batched format: its header says so).
    ``records``: the one-reading format's records (``items`` empty: the
    messages are made from them as they are first published, a record's
    ``traceparent`` and ``tracestate`` becoming headers); None in the
    batched format, whose ``items`` are made by ``write``.
    """

    def __init__(self, sink: NATSSink, key: int, items: list[tuple[str, bytes, str]],
                 readings: list[int] | None = None, records: Sequence[Record] | None = None) -> None:
        self.sink = sink
        self.key = key
        self.items = items
        self.readings = readings
        self.loop = asyncio.get_running_loop()
        # the reply subject of a publish is this prefix and its slot
        self.reply_prefix = f"{sink._inbox}.".encode()
        # Each message's header block, built once rather than by nats-py per
        # publish (a dict walked, a regex per key): it is the same for every
        # attempt. Values are ours (msg-ids, counts) or, for a trace context,
        # the device's with CR and LF made spaces as nats-py does.
        self.headers: list[bytes] = []
        # Each message's size (header block and body) and the HPUB frame of
        # its first publish, made with the message as the part before its
        # slot (``HPUB <subject> <inbox>.``) and the part after: most
        # messages are published once, so a run of them goes out as those
        # parts and the slots they were given, with no formatting then.
        self.sizes: list[int] = []
        self.heads: list[bytes] = []
        self.tails: list[bytes] = []
        self.records = records
        if records is None:                     # the batched format: every message made by write()
            self.n = len(items)
            tail, prefix = sink._header_tail, self.reply_prefix
            self.headers = [_header_block(mid, tail, None if readings is None else readings[i], None)
                            for i, (_, _, mid) in enumerate(items)]
            for (subject, payload, _), hdr in zip(items, self.headers, strict=True):
                size = len(hdr) + len(payload)
                self.sizes.append(size)
                self.heads.append(b"HPUB %b %b" % (subject.encode(), prefix))
                self.tails.append(b" %d %d\r\n%b%b\r\n" % (len(hdr), size, hdr, payload))
        else:
            # One reading per message: made here, _BUILD_CHUNK at a time as
            # they are first published, so the first messages are on the wire
            # (and JetStream storing them) while the next are encoded.
            self.n = len(records)
        self.built = len(items)                 # messages made so far
        self.attempts = [0] * self.n            # publishes sent so far, per message
        self.outstanding = bytearray(self.n)    # 1: its latest publish waits for an ack
        # the slot each message's outstanding publish holds (None: none out);
        # slots this write retired (their publish got no answer), to forget at its end
        self.slot_of: list[bytes | None] = [None] * self.n
        self.retired: list[bytes] = []
        self.acked = bytearray(self.n)
        self.n_acked = 0
        self.duplicates = 0                     # readings in messages JetStream called duplicates
        self.inflight = 0                       # slots this write holds
        self.freed = 0                          # of those, acked in the read being handled
        # the body of most acks, up to the sequence number (nats-server's spacing;
        # an ack in any other form is decoded in full)
        self.plain_ack = b'{"stream":%b, "seq":' % msgspec.json.encode(sink.stream)
        self.next = 0                           # first message never published
        self.retries: list[tuple[float, int]] = []              # heap of (not before, index)
        # (ack due, first index, end index, attempt, epoch), in send order: a
        # run of messages published together (their first publish), or one retry
        self.sent: deque[tuple[float, int, int, int, int]] = deque()
        self.last_error: dict[int, BaseException] = {}
        self.failure: int | None = None          # index of a message that failed for good
        self.starved = False                    # waiting for a slot another write holds
        self.wake: asyncio.Future[None] | None = None

    # -- driven by run() ---------------------------------------------------------------

    def _build(self, upto: int) -> None:
        """Make the one-reading messages up to index ``upto``: each one's size and first-publish frame parts.

        The rest (subject, msg-id, header block) is only wanted again for a
        retry or a failure, and :meth:`_message` makes it again then.
        """
        records, sizes, heads, tails = self.records, self.sizes, self.heads, self.tails
        assert records is not None
        render, tail, prefix = self.sink.template.render, self.sink._header_tail, self.reply_prefix
        head_of = self.sink._heads
        if len(head_of) > _MAX_HEADS:          # bounded: a fleet's subjects, not every subject ever seen
            head_of.clear()
        index = self.built
        while index < upto:
            # every record without a trace context in one call (compiled, or its twin)
            index = _build_frames(records, index, upto, render, head_of, prefix, tail, _id_encoder.encode,
                                  _payload_encoder.encode, _blake2b_96.copy, _token_bytes, sizes, heads, tails)
            if index < upto:
                # a trace context (or a ts_ns beyond int64): the message the long way, as a retry makes it
                subject, payload, _, hdr = self._message(index)
                size = len(hdr) + len(payload)
                sizes.append(size)
                head = head_of.get(subject)
                if head is None:
                    head = head_of[subject] = b"HPUB %b %b" % (subject.encode(), prefix)
                heads.append(head)
                tails.append(b" %d %d\r\n%b%b\r\n" % (len(hdr), size, hdr, payload))
                index += 1
        self.built = max(self.built, upto)

    def _message(self, index: int) -> tuple[str, bytes, str, bytes]:
        """Message ``index``'s subject, body, msg-id and header block (for a retry or a failure)."""
        records = self.records
        if records is None:
            subject, payload, mid = self.items[index]
            return subject, payload, mid, self.headers[index]
        r = records[index]
        mid = msg_id(r)
        return self.sink.template.render(r), encode_record(r), mid, _header_block(mid, self.sink._header_tail, None, r)

    async def run(self) -> int:
        """Publish every message; the number of readings in those JetStream called duplicates.

        Raises:
            _PublishFailed: a message failed for good, or was not acked by the deadline.
        """
        loop, sink = self.loop, self.sink
        deadline = loop.time() + sink.write_timeout_s
        while self.n_acked < self.n:
            if self.failure is not None:
                raise self._failed(self.failure)
            now = loop.time()
            if now >= deadline:
                raise self._failed(self._first_unacked())
            self._expire(now)
            await self._fill()
            if self.n_acked >= self.n or self.failure is not None:
                continue
            wake_at = deadline
            if self.sent:
                wake_at = min(wake_at, self.sent[0][0])
            if self.retries and not self.starved:
                wake_at = min(wake_at, self.retries[0][0])
            await self._sleep_until(wake_at)
        return self.duplicates

    async def _sleep_until(self, when: float) -> None:
        """Sleep until loop time ``when``, or until an ack, a failure or a freed slot pokes us."""
        fut: asyncio.Future[None] = self.loop.create_future()
        self.wake = fut
        handle = self.loop.call_at(when, _wake, fut)
        try:
            await fut
        finally:
            handle.cancel()
            self.wake = None

    def poke(self) -> None:
        fut = self.wake
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _expire(self, now: float) -> None:
        """Fail the publishes whose ack is overdue, or that were sent before a disconnect."""
        sent, epoch = self.sent, self.sink._connection_epoch
        outstanding, attempts = self.outstanding, self.attempts
        while sent:
            due, lo, hi, attempt, sent_epoch = sent[0]
            why: BaseException
            if sent_epoch != epoch:
                why = _Disconnected()
            elif due <= now:
                why = nats.errors.TimeoutError()
            else:
                # An entry whose messages were all acked stays until its due
                # time (one wake then, for nothing): checking each entry's
                # messages after every read would cost a pass per ack.
                break
            sent.popleft()
            for index in range(lo, hi):
                if outstanding[index] and attempts[index] == attempt:   # else acked, or retried since
                    self._attempt_failed(index, attempt, why)

    async def _fill(self) -> None:
        """Publish retries that are due, then new messages, while the sink has free slots.

        The HPUB frames of one fill are built here and handed to nats-py's
        write buffer as one command, with one flush: nats-py's ``publish``
        would build the header block and take a flush-queue round per call.
        The checks it would make are made here (closed, draining, too big,
        reconnect buffer full), with the same errors.
        """
        sink, loop, retries = self.sink, self.loop, self.retries
        ack_timeout = sink.ack_timeout_s
        prefix, free_slots, owners = self.reply_prefix, sink._slot_free, sink._slot_owner
        self.starved = False
        frames: list[bytes] = []
        pending = 0                             # messages in frames
        closed, connected, max_payload, room = self._conn_state()
        while self.failure is None:
            if pending >= _BUILD_CHUNK:
                # let these go out (the client's flusher writes them) before
                # making the next; then the connection may have changed
                await self._send(frames, pending)
                frames, pending = [], 0
                await asyncio.sleep(0)
                closed, connected, max_payload, room = self._conn_state()
                continue
            now = loop.time()
            if retries and retries[0][0] <= now:
                if self.acked[retries[0][1]]:   # acked by an earlier attempt meanwhile
                    heapq.heappop(retries)
                    continue
                from_retries = True
            elif self.next < self.n:
                from_retries = False
            else:
                break
            free = len(free_slots)
            if free <= 0:
                self.starved = sink._starving = True
                break
            if not from_retries and closed is None and connected:
                # First publishes of the next messages, as many as the window
                # and this chunk take, in one step: their frames were made
                # with them, and they share one entry in ``sent``.
                lo = self.next
                hi = min(self.n, lo + free, lo + _BUILD_CHUNK - pending)
                if hi > self.built:
                    self._build(min(self.n, max(hi, lo + _BUILD_CHUNK)))
                if max(self.sizes[lo:hi]) <= max_payload:      # else one at a time, below
                    count = hi - lo
                    self.next = hi
                    self.attempts[lo:hi] = [1] * count
                    self.outstanding[lo:hi] = b"\x01" * count
                    self.inflight += count
                    sink.publishes += count
                    self.sent.append((now + ack_timeout, lo, hi, 1, sink._connection_epoch))
                    slots = free_slots[-count:]
                    del free_slots[-count:]
                    self.slot_of[lo:hi] = slots
                    owners.update(zip(slots, zip(itertools.repeat(self), range(lo, hi), strict=False), strict=True))
                    # each frame is its head, its slot, its tail
                    parts: list[bytes] = [b""] * (3 * count)
                    parts[0::3] = self.heads[lo:hi]
                    parts[1::3] = slots
                    parts[2::3] = self.tails[lo:hi]
                    frames += parts
                    pending += count
                    continue
            if from_retries:
                index = heapq.heappop(retries)[1]
                sink.retries += 1
            else:
                index = self.next
                self.next += 1
                if index >= self.built:
                    self._build(min(self.n, index + _BUILD_CHUNK))
            subject, payload, _, hdr = self._message(index)
            attempt = self.attempts[index] + 1
            self.attempts[index] = attempt
            sink.publishes += 1
            size = len(hdr) + len(payload)
            if closed is not None:
                self._attempt_failed(index, attempt, closed)
                continue
            if size > max_payload:
                self._attempt_failed(index, attempt, nats.errors.MaxPayloadError())
                continue
            slot = free_slots.pop()
            frame = b"HPUB %b %b%b %d %d\r\n%b%b\r\n" % (subject.encode(), prefix, slot, len(hdr), size, hdr,
                                                            payload)
            if not connected:
                # nats-py keeps what is published while it reconnects, up to
                # its pending buffer size, and sends it once reconnected
                room -= len(frame)
                if room < 0:
                    free_slots.append(slot)     # never sent: the slot carries nothing
                    self._attempt_failed(index, attempt, nats.errors.OutboundBufferLimitError())
                    continue
            self.slot_of[index] = slot
            owners[slot] = (self, index)
            self.outstanding[index] = 1
            self.inflight += 1
            self.sent.append((now + ack_timeout, index, index + 1, attempt, sink._connection_epoch))
            frames.append(frame)
            pending += 1
        if frames:
            await self._send(frames, pending)

    def _conn_state(self) -> tuple[BaseException | None, bool, int, int]:
        """(why nothing can be published, or None; connected; max payload; reconnect buffer room)."""
        nc = self.sink._nc
        closed: BaseException | None = None
        if nc.is_closed:
            closed = nats.errors.ConnectionClosedError()
        elif nc.is_draining_pubs:
            closed = nats.errors.ConnectionDrainingError()
        connected = nc.is_connected
        room = nc._max_pending_size - nc._pending_data_size if not connected else 0
        return closed, connected, nc.max_payload, room

    async def _send(self, frames: list[bytes], count: int) -> None:
        """Hand ``count`` messages, whose frames' parts are ``frames``, to nats-py's write buffer."""
        nc = self.sink._nc
        nc.stats["out_msgs"] += count
        try:
            await nc._send_command(b"".join(frames))
            if nc._flush_queue is not None and nc._flush_queue.empty():
                await nc._flush_pending()
        except (OSError, nats.errors.Error) as e:
            # not sent: the connection failed under the write; each attempt
            # waits for its ack timeout or the disconnect, then is retried
            log.debug("nats sink: publish: %s: %s", type(e).__name__, e)

    # -- ack routing (the sink's subscription callback) ------------------------------------

    def on_ack(self, index: int, slot: bytes, data: bytes, headers: bytes | None) -> None:
        """The answer on ``slot`` to a publish of message ``index``; the slots it frees are given
        back, and the write woken, by :meth:`settle`."""
        live = self.slot_of[index] == slot
        if live:
            # the answer of the publish the slot carries: the slot may carry the next
            self.slot_of[index] = None
            self.outstanding[index] = 0
            self.sink._slot_free.append(slot)
            self.freed += 1
        if self.acked[index]:
            return                              # a later ack of a message already acked
        # an error on a retired slot is news of an attempt that already counted as failed
        attempt = self.attempts[index] if live else 0
        if headers:
            # a status message: 503 is "no responders" (no stream, or its
            # leader is being elected); any other has no PubAck body and
            # fails to decode below
            if headers.startswith(b"NATS/1.0 503"):
                self._attempt_failed(index, attempt, nats.js.errors.NoStreamResponseError())
                return
        plain = self.plain_ack
        if data.startswith(plain) and data.endswith(b"}") and data[len(plain):-1].isdigit():
            pass                                # {"stream":"<ours>", "seq":N}: stored, not a duplicate
        else:
            try:
                ack = _ack_decoder.decode(data)
            except msgspec.DecodeError as e:
                self._attempt_failed(index, attempt, e)
                return
            if ack.error is not None:
                self._attempt_failed(index, attempt, _api_error(ack.error))
                return
            if ack.stream != self.sink.stream:
                self._attempt_failed(index, attempt, _WrongStream(ack.stream, self.sink.stream))
                return
            if ack.duplicate:
                self.duplicates += 1 if self.readings is None else self.readings[index]
        self.acked[index] = 1
        self.n_acked += 1

    def settle(self) -> None:
        """After a read's acks: give back the slots they freed, wake the write."""
        if self.freed:
            count, self.freed = self.freed, 0
            self._release(count)
        self.poke()

    def _attempt_failed(self, index: int, attempt: int, error: BaseException) -> None:
        """Publish ``attempt`` of message ``index`` failed: retry it after a pause, or end the write.

        A publish still out (no answer: its ack timed out, or the connection
        dropped) retires its slot, whose late answer must not be taken for a
        later publish's.
        """
        if attempt != self.attempts[index]:
            return                              # an older attempt's news: the newer one is still out
        slot = self.slot_of[index]
        if slot is not None:
            self.slot_of[index] = None
            self.outstanding[index] = 0
            self.retired.append(slot)
            self.sink._replace_slot()
            self._release(1)
        if self.acked[index]:
            return
        self.last_error[index] = error
        if _is_fatal(error):
            if self.failure is None:
                self.failure = index
        else:
            pause = min(1.0, 0.05 * 2 ** min(attempt - 1, 5)) * (0.5 + random.random())
            heapq.heappush(self.retries, (self.loop.time() + pause, index))
        self.poke()

    def _release(self, count: int) -> None:
        self.inflight -= count
        self.sink._release_slots(count, self)

    def release_all(self) -> None:
        """The write is over (done, failed or cancelled): give back every slot it holds.

        A publish of it still out retires its slot (a new one takes its
        place); the slots it retired are forgotten, so late answers there
        are dropped as a finished write's.
        """
        sink = self.sink
        owners = sink._slot_owner
        if self.inflight > self.freed:
            for slot in [s for s in self.slot_of if s is not None]:
                owners.pop(slot, None)
                sink._replace_slot()
        for slot in self.retired:
            owners.pop(slot, None)
        self.retired.clear()
        count, self.inflight, self.freed = self.inflight, 0, 0
        sink._release_slots(count, self)

    # -- outcome -----------------------------------------------------------------------

    def _first_unacked(self) -> int:
        return next(i for i in range(self.n) if not self.acked[i])

    def _failed(self, index: int) -> _PublishFailed:
        subject, _, mid, _ = self._message(index)
        return _PublishFailed(subject, mid, self.last_error.get(index), self.attempts[index])


# -- the sink -------------------------------------------------------------------------

class NATSSink:
    """Publish records to a JetStream stream; ``write`` returns once every one is acked.

    Parameters ``servers``, ``stream`` and ``subject`` are the ``[nats]`` config
    keys of DESIGN section 2. The others:

    - ``replicas``, ``duplicate_window_s``: used only when the stream is
      created (an existing stream is used as it is, with a warning if these differ).
    - ``stream_subjects``: the subjects a created stream captures; default the
      template's wildcard (``telemetry.*.*``). An existing stream must cover it.
    - ``write_timeout_s``: the whole ``write`` (every ack) must finish in this
      time, else :class:`SinkWriteError`. Transient failures (no ack yet, the
      stream leader being re-elected, the client reconnecting) are retried
      with backoff within it, with the same msg-id, so retries never duplicate.
    - ``ack_timeout_s``: how long one publish attempt waits for its ack, counted
      from when that publish was sent (not from the start of the write).
    - ``connect_timeout_s``: bound on :meth:`open` (connect and stream set-up).
    - ``reconnect_wait_s``: pause between reconnect attempts to a server; the
      client reconnects forever (across ``servers`` and the cluster's other nodes).
    - ``max_inflight``: publishes in flight at once, shared by every write of the
      sink (a sliding window: each ack lets the next message go). Bounded memory
      (DESIGN section 1), and bounded ack latency: a window's acks are read in
      milliseconds even on a loaded machine, so they do not queue past their
      ``ack_timeout_s`` and set off retries that load the machine further.
    - ``readings_per_message``: 1 (the default) publishes one message per
      record; N > 1 the batched format of the module docstring (records
      grouped by subject, at most N per message).
    """

    def __init__(self, *, servers: Sequence[str] | str = ("nats://127.0.0.1:4222",), stream: str = "TELEMETRY",
                 subject: str = "telemetry.{region}.{device_id}", replicas: int = 1,
                 duplicate_window_s: float = 120.0, stream_subjects: Sequence[str] | None = None,
                 write_timeout_s: float = 10.0, ack_timeout_s: float = 2.0, connect_timeout_s: float = 10.0,
                 reconnect_wait_s: float = 0.5, max_inflight: int = DEFAULT_MAX_INFLIGHT,
                 readings_per_message: int = 1, name: str = "gridgate") -> None:
        self.servers = [servers] if isinstance(servers, str) else list(servers)
        if not self.servers or not all(isinstance(s, str) and s for s in self.servers):
            raise ValueError("nats servers must be a non-empty list of URLs")
        if not isinstance(stream, str) or not _STREAM_NAME.fullmatch(stream):
            raise ValueError(f"nats stream name {stream!r} is invalid (letters, digits, _ and - only)")
        if not 1 <= replicas <= 5:
            raise ValueError(f"nats replicas must be 1..5, not {replicas}")
        for key, value in (("duplicate_window_s", duplicate_window_s), ("write_timeout_s", write_timeout_s),
                           ("ack_timeout_s", ack_timeout_s), ("connect_timeout_s", connect_timeout_s),
                           ("reconnect_wait_s", reconnect_wait_s)):
            if not value > 0:
                raise ValueError(f"nats {key} must be > 0, not {value}")
        if max_inflight < 1:
            raise ValueError(f"nats max_inflight must be >= 1, not {max_inflight}")
        if not 1 <= readings_per_message <= MAX_READINGS_PER_MESSAGE:
            raise ValueError(f"nats readings_per_message must be 1..{MAX_READINGS_PER_MESSAGE}, "
                             f"not {readings_per_message}")
        self.stream = stream
        self.template = SubjectTemplate(subject)
        self.stream_subjects = list(stream_subjects) if stream_subjects else [self.template.wildcard]
        self.replicas = replicas
        self.duplicate_window_s = float(duplicate_window_s)
        self.write_timeout_s = float(write_timeout_s)
        self.ack_timeout_s = float(ack_timeout_s)
        self.connect_timeout_s = float(connect_timeout_s)
        self.reconnect_wait_s = float(reconnect_wait_s)
        self.max_inflight = max_inflight
        self.readings_per_message = readings_per_message
        self.name = name
        # Counters, for /metrics (read at scrape time) and tests. Records acked
        # by successful writes, and how many of them JetStream called duplicates:
        self.published = 0
        self.duplicates = 0
        # messages acked by successful writes (equals ``published`` in the one-reading format)
        self.messages = 0
        # publish attempts sent, and of those the retries (a retry counts in both):
        # ``publishes`` equals ``messages`` when nothing was retried or failed
        self.publishes = 0
        self.retries = 0
        # a batch body is cut to fit the server's max_payload (known once connected)
        self._max_body = 1024 * 1024 - HEADER_ROOM
        # nats-py's asyncio loop, on a thread of its own (gridgate.asyncio_thread)
        self._io = AsyncioThread(f"gridgate-nats-{stream}")
        self._nc: Any = None
        self._js: Any = None
        # the write side, all on the asyncio thread: the ack inbox, the writes in
        # progress by key, the sink-wide window, and a count of disconnects
        self._inbox = ""
        self._inbox_len = 0
        self._windows: dict[int, _Window] = {}
        # every header block ends with the stream JetStream must store the message in
        self._header_tail = b"\r\n%b: %b\r\n\r\n" % (EXPECTED_STREAM_HEADER.encode(), stream.encode())
        self._window_seq = 0
        # The window's slots (reply subject ``<inbox>.<slot>``): the free ones,
        # and the owner (write, message index) of each that carries a publish
        # or was retired by a write still running. Every slot not free is in
        # ``_slot_owner``; retired ones are replaced by new numbers from ``_slot_seq``.
        self._slot_free: list[bytes] = [b"%d" % i for i in range(max_inflight - 1, -1, -1)]
        self._slot_owner: dict[bytes, tuple[_Window, int]] = {}
        self._slot_seq = max_inflight
        # a subject's frame head, ``HPUB <subject> <inbox>.`` (the inbox is set once connected)
        self._heads: dict[str, bytes] = {}
        self._starving = False          # some write found no free slot since the last release
        self._connection_epoch = 0
        self._last_conn_error: BaseException | None = None
        self._logged_errors: set[str] = set()
        self._closed = False

    @classmethod
    async def open(cls, **kwargs: Any) -> NATSSink:
        """Construct, connect and ensure the stream (like ``SpoolSink.open``)."""
        sink = cls(**kwargs)
        await sink.connect()
        return sink

    async def __aenter__(self) -> NATSSink:
        if self._nc is None:
            await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- loop thread ----------------------------------------------------------------

    @property
    def _loop(self) -> asyncio.AbstractEventLoop | None:
        return self._io.loop

    @property
    def _thread(self) -> threading.Thread | None:
        return self._io.thread

    def _start_loop(self) -> None:
        self._io.start()

    async def _stop_loop(self) -> None:
        await self._io.stop()

    async def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the sink's asyncio loop and await it from Trio."""
        try:
            return await self._io.call(coro)
        except LoopClosed:
            raise SinkWriteError("NATS sink is not open") from None

    # -- open -----------------------------------------------------------------------

    async def connect(self) -> None:
        """Start the loop thread, connect to NATS and make sure the stream exists.

        Raises:
            SinkOpenError: no server answered within ``connect_timeout_s``, JetStream
                is not enabled, or the stream cannot be created or does not fit.
        """
        if self._closed:
            raise SinkOpenError("NATS sink was closed")
        if self._nc is not None:
            return
        self._start_loop()
        try:
            await self._call(self._async_open())
        except BaseException:
            await self._stop_loop()
            raise

    async def _error_cb(self, e: Exception) -> None:
        # The client retries every reconnect_wait_s while a server is down: log
        # each distinct error once per outage, the repeats at debug level.
        self._last_conn_error = e
        key = f"{type(e).__name__}: {e}"
        if key in self._logged_errors:
            log.debug("nats: %s", key)
        else:
            self._logged_errors.add(key)
            log.warning("nats: %s", key)

    async def _reconnected_cb(self) -> None:
        self._logged_errors.clear()
        url = self._nc.connected_url if self._nc is not None else None
        log.info("nats: reconnected to %s", url.netloc if url else "?")

    async def _async_open(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout_s
        nc = _Client()
        try:
            # nats-py annotates the three timeouts int; it hands them to
            # asyncio.wait_for and asyncio.sleep, which take seconds as float.
            await asyncio.wait_for(nc.connect(
                servers=self.servers, name=self.name,
                connect_timeout=min(2.0, self.connect_timeout_s),  # type: ignore[arg-type]
                allow_reconnect=True, max_reconnect_attempts=-1,   # a gateway never gives up on its sink
                reconnect_time_wait=self.reconnect_wait_s,  # type: ignore[arg-type]
                drain_timeout=max(1.0, self.write_timeout_s),  # type: ignore[arg-type]
                # subjects are sanitized tokens of a checked template, replies our own inbox:
                # the client's per-publish regex checks would find nothing
                skip_subject_validation=True,
                error_cb=self._error_cb, disconnected_cb=self._disconnected_cb,
                reconnected_cb=self._reconnected_cb,
            ), timeout=self.connect_timeout_s)
        except (TimeoutError, OSError, nats.errors.Error) as e:
            await _close_quietly(nc)
            last = self._last_conn_error or e
            raise SinkOpenError(f"cannot connect to NATS at {', '.join(self.servers)} within "
                                f"{self.connect_timeout_s:g}s: {type(last).__name__}: {last}") from e
        except BaseException:
            await _close_quietly(nc)
            raise
        self._nc = nc
        self._js = nc.jetstream(timeout=min(5.0, self.connect_timeout_s))
        self._max_body = max(1, nc.max_payload - HEADER_ROOM)
        try:
            # One subscription takes the acks of every publish: <inbox>.<write>.<index>.<attempt>
            self._inbox = nc.new_inbox()
            self._heads.clear()              # they name the inbox
            self._inbox_len = len(self._inbox) + 1
            # no callback: _Client hands this subscription's messages to _on_acks itself
            sub = await nc.subscribe(self._inbox + ".>")
            nc.take_acks(sub._id, self._on_acks, plain=((self._inbox + ".").encode(), self.stream,
                                                        self._on_plain_acks))
            await self._ensure_stream(deadline)
        except BaseException:
            self._nc = self._js = None
            await _close_quietly(nc)
            raise
        # connected_url is None while the client reconnects (the connection
        # may have dropped while the stream was set up)
        url = nc.connected_url
        log.info("nats sink: connected to %s, stream %s, subject %s", url.netloc if url else "?", self.stream,
                 self.template.template)

    async def _ensure_stream(self, deadline: float) -> None:
        """Find the stream or create it; retry transient JetStream unavailability until ``deadline``."""
        loop = asyncio.get_running_loop()
        js = self._js
        last: BaseException | None = None
        while True:
            try:
                try:
                    info = await js.stream_info(self.stream)
                except nats.js.errors.NotFoundError:
                    info = await self._create_stream()
                    if info is None:      # someone else created it meanwhile
                        info = await js.stream_info(self.stream)
                self._check_stream(info.config)
                return
            except SinkOpenError:
                raise
            except nats.js.errors.APIError as e:
                if e.code is not None and e.code != 503 and e.code < 500:
                    raise SinkOpenError(f"NATS JetStream refused stream {self.stream!r}: {e.description} "
                                        f"(code {e.code}, err_code {e.err_code})") from e
                last = e
            except (TimeoutError, OSError, nats.errors.Error) as e:
                last = e
            if loop.time() >= deadline:
                hint = ("is JetStream enabled (nats-server -js, or a jetstream {} block) and, in a cluster, "
                        "does it have a meta leader?")
                raise SinkOpenError(f"NATS JetStream not available for stream {self.stream!r} at "
                                    f"{', '.join(self.servers)} within {self.connect_timeout_s:g}s: "
                                    f"{type(last).__name__}: {last}; {hint}") from last
            await asyncio.sleep(min(0.2, max(0.0, deadline - loop.time())))

    async def _create_stream(self) -> Any:
        config = StreamConfig(name=self.stream, subjects=self.stream_subjects, num_replicas=self.replicas,
                              duplicate_window=self.duplicate_window_s, storage=StorageType.FILE)
        try:
            info = await self._js.add_stream(config)
        except nats.js.errors.BadRequestError as e:
            if e.err_code == 10058:       # stream name already in use: created concurrently
                return None
            raise SinkOpenError(f"cannot create JetStream stream {self.stream!r} (subjects "
                                f"{self.stream_subjects}, replicas {self.replicas}): {e.description} "
                                f"(err_code {e.err_code})") from e
        log.info("nats sink: created stream %s (subjects %s, replicas %d, duplicate window %gs)",
                 self.stream, self.stream_subjects, self.replicas, self.duplicate_window_s)
        return info

    def _check_stream(self, config: StreamConfig) -> None:
        have = list(config.subjects or [])
        missing = [s for s in self.stream_subjects if not any(subject_covers(p, s) for p in have)]
        if missing:
            raise SinkOpenError(f"JetStream stream {self.stream!r} captures subjects {have}, which do not cover "
                                f"{missing} (subject template {self.template.template!r}); fix the stream's "
                                f"subjects or [nats] subject")
        if (config.num_replicas or 1) != self.replicas:
            log.warning("nats sink: stream %s has %s replicas, config asks %d; using the stream as it is",
                        self.stream, config.num_replicas, self.replicas)
        if config.duplicate_window is not None and config.duplicate_window < self.duplicate_window_s:
            log.warning("nats sink: stream %s has a %gs duplicate window (config %gs): replays older than that "
                        "are stored twice", self.stream, config.duplicate_window, self.duplicate_window_s)

    # -- write ----------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        """Publishes sent and waiting for their ack now, across every write."""
        return self.max_inflight - self._free_slots

    async def write(self, batch: Sequence[Record]) -> None:
        """Publish every record; return when JetStream acked all of them.

        Raises:
            SinkWriteError: some message was not acked within ``write_timeout_s``
                (or was refused); messages that were acked stay stored, and
                writing the batch again de-duplicates them.
        """
        if not batch:
            return
        if self._closed or self._nc is None:
            raise SinkWriteError("NATS sink is not open")
        if self.readings_per_message == 1:
            # the messages are made on the loop thread as they are published (_Window._build)
            duplicates = await self._call(self._publish_all([], None, batch))
            self.messages += len(batch)
        else:
            items, readings = self._batch_messages(batch)
            duplicates = await self._call(self._publish_all(items, readings))
            self.messages += len(items)
        self.published += len(batch)
        self.duplicates += duplicates

    def _batch_messages(self, batch: Sequence[Record]) -> tuple[list[tuple[str, bytes, str]], list[int]]:
        """The batched format's messages of one write, and the readings in each."""
        render, per_message = self.template.render, self.readings_per_message
        groups: dict[str, list[Record]] = {}     # by subject, in the order each first came
        for r in batch:
            subject = render(r)
            group = groups.get(subject)
            if group is None:
                groups[subject] = [r]
            else:
                group.append(r)
        items: list[tuple[str, bytes, str]] = []
        readings: list[int] = []
        for subject, group in groups.items():
            for start in range(0, len(group), per_message):
                self._add_message(subject, group[start:start + per_message], items, readings)
        return items, readings

    def _add_message(self, subject: str, records: list[Record], items: list[tuple[str, bytes, str]],
                     readings: list[int]) -> None:
        body = encode_records(records)
        if len(body) > self._max_body and len(records) > 1:
            # Too big for the server: halves, each cut again if need be. The
            # same records always split alike, so a replay keeps its msg-ids.
            half = len(records) // 2
            self._add_message(subject, records[:half], items, readings)
            self._add_message(subject, records[half:], items, readings)
            return
        items.append((subject, body, batch_msg_id(records)))
        readings.append(len(records))

    async def _publish_all(self, items: list[tuple[str, bytes, str]], readings: list[int] | None,
                           records: Sequence[Record] | None = None) -> int:
        """Publish ``items`` through a :class:`_Window`; the readings JetStream called duplicates."""
        self._window_seq += 1
        window = _Window(self, self._window_seq, items, readings, records)
        self._windows[window.key] = window
        try:
            return await window.run()
        except _PublishFailed as failure:
            n, acked = window.n, window.n_acked
            if readings is None:
                what = f"{acked} of {n} records acked, {n - acked} not"
            else:
                stored = sum(c for c, ok in zip(readings, window.acked, strict=True) if ok)
                what = (f"{acked} of {n} messages acked ({stored} of {sum(readings)} records), "
                        f"{n - acked} not")
            raise SinkWriteError(f"NATS JetStream stream {self.stream!r}: {what} "
                                 f"(write_timeout_s {self.write_timeout_s:g}); "
                                 f"first failure: {failure}") from failure.cause
        finally:
            self._windows.pop(window.key, None)
            window.release_all()          # wakes a write that waits for these slots

    @property
    def _free_slots(self) -> int:
        return len(self._slot_free)

    def _replace_slot(self) -> None:
        """A slot was retired: a slot of a number never used takes its place among the free."""
        self._slot_free.append(b"%d" % self._slot_seq)
        self._slot_seq += 1

    def _release_slots(self, count: int, by: _Window) -> None:
        """``count`` slots of ``by`` were given back: wake a write that waited for one."""
        if count and self._starving:
            # one pass per slot freed while some write waits for one, not per ack
            self._starving = False
            for w in self._windows.values():
                if w is not by and w.starved:
                    w.poke()

    def _on_acks(self, acks: list[tuple[bytes, bytes, bytes | None]]) -> None:
        """The acks (or no-responders statuses) of one read, each on ``<inbox>.<slot>``."""
        skip, owners = self._inbox_len, self._slot_owner
        touched: list[_Window] = []
        for subject, data, headers in acks:
            slot = subject[skip:]
            # one answer per publish: the slot is its owner's no more
            owner = owners.pop(slot, None)
            if owner is None:
                # a late ack of a finished write (its record is stored, nothing
                # waits), or not a reply subject of ours
                log.debug("nats sink: reply on %r, which no write waits for", subject)
                continue
            window, index = owner
            if window not in touched:
                touched.append(window)
            window.on_ack(index, slot, data, headers)
        for w in touched:
            w.settle()

    def _on_plain_acks(self, slots: list[bytes]) -> None:
        """Plain acks (the message stored, not a duplicate) of one read, as the digits of their slots."""
        owners, free = self._slot_owner, self._slot_free
        touched: list[_Window] = []
        last: _Window | None = None
        acked = outstanding = bytearray()      # the window's, while its acks come in a row
        slot_of: list[bytes | None] = []
        for slot in slots:
            owner = owners.pop(slot, None)
            if owner is None:                  # a late ack of a finished write: its record is stored
                continue
            window, i = owner
            if window is not last:
                last = window
                if window not in touched:
                    touched.append(window)
                acked, outstanding, slot_of = window.acked, window.outstanding, window.slot_of
            if slot_of[i] == slot:             # the publish it carries now: the slot carries the next
                slot_of[i] = None
                outstanding[i] = 0
                free.append(slot)
                window.freed += 1
            if not acked[i]:                   # else a later ack of a message already acked
                acked[i] = 1
                window.n_acked += 1
        for w in touched:
            w.settle()

    async def _disconnected_cb(self) -> None:
        self._connection_epoch += 1
        for w in list(self._windows.values()):
            w.poke()
        if not self._closed:
            log.warning("nats: disconnected; reconnecting (writes wait, or fail after write_timeout_s)")

    # -- close ----------------------------------------------------------------------

    async def aclose(self) -> None:
        """Drain the connection (flush what is buffered), close it, stop the loop thread."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._nc is not None and self._loop is not None:
                try:
                    await self._call(self._async_close())
                except SinkWriteError:
                    pass
        finally:
            await self._stop_loop()
            self._nc = self._js = None

    async def _async_close(self) -> None:
        nc = self._nc
        try:
            if nc.is_connected:
                await asyncio.wait_for(nc.drain(), timeout=max(1.0, self.write_timeout_s))
        except (TimeoutError, OSError, nats.errors.Error) as e:
            log.warning("nats sink: drain failed (%s: %s); closing", type(e).__name__, e)
        finally:
            await _close_quietly(nc)


async def _close_quietly(nc: Any) -> None:
    try:
        if not nc.is_closed:
            await nc.close()
    except Exception as e:   # closing a half-open client must not hide the real error
        log.debug("nats: close: %s: %s", type(e).__name__, e)
