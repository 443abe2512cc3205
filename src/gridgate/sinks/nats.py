"""The NATS JetStream sink (DESIGN section 2, ``[nats]``; section 7, the Sink protocol).

Every record is published to JetStream on a subject built from a template
(``telemetry.{region}.{device_id}``) and ``write`` returns only when the
stream has acknowledged every one of them: a JetStream ack means the message
is stored (on a quorum of the stream's replicas when ``replicas`` > 1), which
is what "durable" means for this sink.

Wire format
    The message body is the normalized :class:`~gridgate.ingest.records.Record`
    encoded as **MessagePack** by msgspec: a map with the keys ``device_id``,
    ``ts_ns``, ``received_ns``, ``protocol``, ``fields`` and ``tags`` (the
    same names as the JSON Lines of ``gridgate spool export``). MessagePack
    because it is what the gateway already decodes in its hot path, it is
    smaller than JSON, and keeps ints and floats apart; a consumer decodes
    it with ``msgspec.msgpack.decode(data, type=Record)`` or any msgpack library.

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
    cancels the asyncio task (``future.cancel()``), which cancels every
    publish in flight; records already acked stay stored and de-duplicate if
    the batch is written again.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import logging
import random
import re
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import msgspec
import nats
import nats.errors
import nats.js.errors
import trio
from nats.aio.client import Client as NATSClient
from nats.js.api import StorageType, StreamConfig

from gridgate.ingest.records import Record

__all__ = ["NATSSink", "SinkWriteError", "SinkOpenError", "SubjectTemplate", "sanitize_token", "msg_id",
           "encode_record", "decode_record", "subject_covers"]

log = logging.getLogger("gridgate.sinks.nats")

T = TypeVar("T")

MSG_ID_HEADER = "Nats-Msg-Id"
MAX_TOKEN_CHARS = 128


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

    @property
    def wildcard(self) -> str:
        """The subject filter covering every subject this template renders (``telemetry.*.*``)."""
        return ".".join("*" if is_ph else text for is_ph, text in self._parts)

    def render(self, record: Record) -> str:
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


def msg_id(record: Record) -> str:
    """The deterministic ``Nats-Msg-Id`` of a reading (see the module docstring)."""
    content = _id_encoder.encode((record.device_id, record.ts_ns, record.fields, record.tags))
    digest = hashlib.blake2b(content, digest_size=12).hexdigest()
    return f"{sanitize_token(record.device_id)}:{record.ts_ns}:{digest}"


def encode_record(record: Record) -> bytes:
    """The message body: the record as MessagePack (a map keyed by field name)."""
    return _payload_encoder.encode(record)


def decode_record(data: bytes) -> Record:
    return _payload_decoder.decode(data)


# -- the Trio <-> asyncio bridge ------------------------------------------------------

async def _wait_future(fut: concurrent.futures.Future[T]) -> T:
    """Await a concurrent future from Trio without blocking a worker thread."""
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()

    def wake(_: object) -> None:          # runs on the asyncio thread (or here, if already done)
        try:
            token.run_sync_soon(done.set)
        except trio.RunFinishedError:
            pass

    fut.add_done_callback(wake)
    try:
        await done.wait()
    except BaseException:
        fut.cancel()                      # propagates to the asyncio task
        raise
    return fut.result()


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
_FATAL = (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError, nats.errors.MaxPayloadError,
          nats.errors.BadSubjectError)


def _is_fatal(e: BaseException) -> bool:
    if isinstance(e, _FATAL):
        return True
    return isinstance(e, nats.js.errors.APIError) and e.code is not None and 400 <= e.code < 500


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
    - ``ack_timeout_s``: how long one publish attempt waits for its ack.
    - ``connect_timeout_s``: bound on :meth:`open` (connect and stream set-up).
    - ``reconnect_wait_s``: pause between reconnect attempts to a server; the
      client reconnects forever (across ``servers`` and the cluster's other nodes).
    - ``max_inflight``: publishes in flight at once. A batch up to this size is
      entirely in flight before the sink waits for any ack; a larger one keeps
      this many in flight (bounded memory, DESIGN section 1).
    """

    def __init__(self, *, servers: Sequence[str] | str = ("nats://127.0.0.1:4222",), stream: str = "TELEMETRY",
                 subject: str = "telemetry.{region}.{device_id}", replicas: int = 1,
                 duplicate_window_s: float = 120.0, stream_subjects: Sequence[str] | None = None,
                 write_timeout_s: float = 10.0, ack_timeout_s: float = 2.0, connect_timeout_s: float = 10.0,
                 reconnect_wait_s: float = 0.5, max_inflight: int = 10_000, name: str = "gridgate") -> None:
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
        self.name = name
        # counters, for metrics and tests: records acked, of which JetStream called duplicates
        self.published = 0
        self.duplicates = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._nc: Any = None
        self._js: Any = None
        self._inflight: asyncio.Semaphore | None = None
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

    def _start_loop(self) -> None:
        loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_forever()
            finally:
                try:
                    leftovers = asyncio.all_tasks(loop)
                    for task in leftovers:
                        task.cancel()
                    if leftovers:
                        loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
                    loop.run_until_complete(loop.shutdown_asyncgens())
                finally:
                    loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name=f"gridgate-nats-{self.stream}", daemon=True)
        self._thread.start()

    async def _stop_loop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        # The loop stops at its next iteration; the join is short.
        await trio.to_thread.run_sync(thread.join, 10.0)
        if thread.is_alive():
            log.warning("nats sink: asyncio loop thread did not stop within 10 s")

    async def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the sink's asyncio loop and await it from Trio."""
        loop = self._loop
        if loop is None or loop.is_closed() or self._thread is None or not self._thread.is_alive():
            coro.close()
            raise SinkWriteError("NATS sink is not open")
        return await _wait_future(asyncio.run_coroutine_threadsafe(coro, loop))

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
            self._loop = self._thread = None
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

    async def _disconnected_cb(self) -> None:
        if not self._closed:
            log.warning("nats: disconnected; reconnecting (writes wait, or fail after write_timeout_s)")

    async def _reconnected_cb(self) -> None:
        self._logged_errors.clear()
        url = self._nc.connected_url if self._nc is not None else None
        log.info("nats: reconnected to %s", url.netloc if url else "?")

    async def _async_open(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout_s
        self._inflight = asyncio.Semaphore(self.max_inflight)
        nc = NATSClient()
        try:
            # nats-py annotates the three timeouts int; it hands them to
            # asyncio.wait_for and asyncio.sleep, which take seconds as float.
            await asyncio.wait_for(nc.connect(
                servers=self.servers, name=self.name,
                connect_timeout=min(2.0, self.connect_timeout_s),  # type: ignore[arg-type]
                allow_reconnect=True, max_reconnect_attempts=-1,   # a gateway never gives up on its sink
                reconnect_time_wait=self.reconnect_wait_s,  # type: ignore[arg-type]
                drain_timeout=max(1.0, self.write_timeout_s),  # type: ignore[arg-type]
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
        try:
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

    async def write(self, batch: Sequence[Record]) -> None:
        """Publish every record; return when JetStream acked all of them.

        Raises:
            SinkWriteError: some record was not acked within ``write_timeout_s``
                (or was refused); records that were acked stay stored, and
                writing the batch again de-duplicates them.
        """
        if not batch:
            return
        if self._closed or self._nc is None:
            raise SinkWriteError("NATS sink is not open")
        render = self.template.render
        items = [(render(r), encode_record(r), msg_id(r)) for r in batch]
        duplicates = await self._call(self._publish_all(items))
        self.published += len(items)
        self.duplicates += duplicates

    async def _publish_all(self, items: list[tuple[str, bytes, str]]) -> int:
        """All publishes in flight (up to ``max_inflight``), then wait for every ack."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.write_timeout_s
        tasks = [loop.create_task(self._publish_one(subject, payload, mid, deadline))
                 for subject, payload, mid in items]
        try:
            # Each task gives up by ``deadline`` on its own; the margin is a safety net.
            done, pending = await asyncio.wait(tasks, timeout=self.write_timeout_s + 5.0,
                                               return_when=asyncio.FIRST_EXCEPTION)
        except BaseException:             # the Trio side was cancelled: stop every publish
            for t in tasks:
                t.cancel()
            # collect the outcomes in the background so none is logged as "never retrieved"
            asyncio.gather(*tasks, return_exceptions=True)
            raise
        failure = next((t.exception() for t in tasks if t in done and t.exception() is not None), None)
        if failure is None and not pending:
            return sum(1 for t in tasks if t.result().duplicate)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        acked = sum(1 for t in tasks if t.done() and not t.cancelled() and t.exception() is None)
        n = len(items)
        if isinstance(failure, _PublishFailed):
            what = str(failure)
        elif failure is not None:
            what = f"{type(failure).__name__}: {failure}"
        else:
            what = "no ack before the deadline"
        err = SinkWriteError(f"NATS JetStream stream {self.stream!r}: {acked} of {n} records acked, "
                             f"{n - acked} not (write_timeout_s {self.write_timeout_s:g}); first failure: {what}")
        raise err from (failure.cause if isinstance(failure, _PublishFailed) else failure)

    async def _publish_one(self, subject: str, payload: bytes, mid: str, deadline: float) -> Any:
        loop = asyncio.get_running_loop()
        assert self._inflight is not None
        async with self._inflight:
            backoff = 0.05
            attempts = 0
            last: BaseException | None = None
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise _PublishFailed(subject, mid, last, attempts)
                attempts += 1
                try:
                    return await self._js.publish(subject, payload, timeout=min(remaining, self.ack_timeout_s),
                                                  stream=self.stream, headers={MSG_ID_HEADER: mid})
                except (TimeoutError, OSError, nats.errors.Error) as e:
                    if _is_fatal(e):
                        raise _PublishFailed(subject, mid, e, attempts) from e
                    last = e
                # Transient: the same msg-id again after a jittered, growing pause.
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise _PublishFailed(subject, mid, last, attempts)
                await asyncio.sleep(min(remaining, backoff * (0.5 + random.random())))
                backoff = min(backoff * 2, 1.0)

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
