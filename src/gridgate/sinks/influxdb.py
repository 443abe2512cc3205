"""InfluxDB 1.x sink: batches of records -> ``POST /write`` (line protocol).

Why it is built this way:

- Idempotent writes. A point is identified by measurement + tag set +
  timestamp; writing it again overwrites its field values instead of adding a
  point. gridgate acknowledges only what is durable and a crash may replay a
  batch (DESIGN section 1: duplicate, never lose), so replays, retries after a
  timeout whose write did land, and retries of a batch of which some chunks
  landed cannot create duplicates here. The flip side: two readings of one
  device with the same tags and the same ``ts_ns`` are one point (the later
  one's fields win).
- ``write`` returns only after InfluxDB answered 204 to every chunk. With the
  default ``[data] wal-fsync-delay = "0s"`` InfluxDB fsyncs its WAL before
  that answer, so returning means durable, as the Sink protocol requires.
  Anything else raises a :class:`SinkWriteError` and the batch counts as not
  written (parts of it may have been; see the first point).
- Records are encoded (and so checked) for the whole batch before anything is
  sent: a record that line protocol cannot carry fails the batch up front
  with :class:`InfluxDBEncodeError`, without a partial write.
- Large batches are split into chunks of at most ``max_lines`` lines (one
  record is one line); InfluxDB's docs recommend 5,000-10,000 points per
  request, and ``[http] max-body-size`` (25 MB by default) caps a request.
- Bodies are gzip-compressed at level 1 (fleet telemetry is repetitive: about
  20x smaller, for ~2 ms per 5,000 lines), which InfluxDB 1.x accepts with
  ``Content-Encoding: gzip``.
- One ``httpx.AsyncClient`` with keep-alive connections; it runs under Trio
  (and asyncio) through anyio. Each request has a total deadline of
  ``timeout_s`` (connect + send + answer), so a hung server cannot hold the
  pipeline longer than that. Proxy variables from the environment are ignored
  (``trust_env=False``): the sink talks to exactly the configured ``url``.
- ``create_database`` (``CREATE DATABASE`` is a no-op when it exists) runs at
  :meth:`InfluxDBSink.open` by default, so a fresh server works.

Constructor names follow DESIGN section 2's ``[influxdb]`` keys: ``url``,
``database``, ``measurement``.
"""
from __future__ import annotations

import gzip
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import anyio
import httpx

from gridgate.ingest.records import Record
from gridgate.sinks.line_protocol import DEFAULT_MEASUREMENT, LineProtocolError, encode, escape_measurement

__all__ = [
    "InfluxDBSink", "SinkWriteError", "InfluxDBHTTPError", "InfluxDBUnavailableError",
    "InfluxDBEncodeError", "DEFAULT_URL", "DEFAULT_DATABASE",
]

DEFAULT_URL = "http://127.0.0.1:8086"
DEFAULT_DATABASE = "telemetry"
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_LINES = 5000
GZIP_LEVEL = 1
_ERROR_TEXT_MAX = 2000


class SinkWriteError(Exception):
    """The batch was not (fully) written; the caller keeps it and retries.

    Attributes:
        retryable: whether sending the same batch again can succeed without
            changing it (False when InfluxDB refused its content, or a record
            cannot be encoded: retrying that batch unchanged would fail
            forever, so the caller should dead-letter it or alert).
    """

    retryable: bool = True


class InfluxDBHTTPError(SinkWriteError):
    """InfluxDB answered, but not with success.

    Attributes:
        status: the HTTP status code.
        error: InfluxDB's error text (its JSON ``error``, or the body).
        retryable: False for 400 (unparsable line, field type conflict,
            "partial write": InfluxDB stored the points it could and dropped
            the rest) and 413 (body too large); True otherwise (404 database
            not found, 401/403, 5xx: the same batch can succeed once the
            server or its setup is fixed).
    """

    def __init__(self, status: int, error: str, *, what: str = "write") -> None:
        self.status = status
        self.error = error
        self.retryable = status not in (400, 413)
        super().__init__(f"InfluxDB {what} failed: HTTP {status}: {error}")


class InfluxDBUnavailableError(SinkWriteError):
    """No answer from InfluxDB: connection refused or lost, or ``timeout_s`` ran out."""

    retryable = True


class InfluxDBEncodeError(SinkWriteError):
    """A record cannot be carried by line protocol unchanged; nothing was sent.

    Attributes:
        index: the record's position in the batch given to ``write``.
        reason: what is wrong with it.
    """

    retryable = False

    def __init__(self, index: int, reason: str) -> None:
        self.index = index
        self.reason = reason
        super().__init__(f"record {index} of the batch cannot be written to InfluxDB: {reason}")


def _quote_identifier(name: str) -> str:
    """An InfluxQL double-quoted identifier."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _error_text(response: httpx.Response) -> str:
    text = ""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        if isinstance(body.get("error"), str):
            text = body["error"]
        else:
            errors = [r["error"] for r in body.get("results", ()) if isinstance(r, dict) and "error" in r]
            text = "; ".join(map(str, errors))
    if not text:
        text = response.headers.get("X-Influxdb-Error", "") or response.text.strip() or response.reason_phrase
    return text[:_ERROR_TEXT_MAX]


class InfluxDBSink:
    """Writes record batches to one InfluxDB 1.x database (see the module docstring).

    Use :meth:`open` (creates the database unless told not to) or construct
    directly (no I/O); call :meth:`aclose` once at the end. Also an async
    context manager.
    """

    def __init__(self, url: str = DEFAULT_URL, database: str = DEFAULT_DATABASE,
                 measurement: str = DEFAULT_MEASUREMENT, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 max_lines: int = DEFAULT_MAX_LINES, trace_tag: bool = False,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        """
        Args:
            url: InfluxDB's base URL, ``http(s)://host:port`` (a path prefix
                is kept, for a server behind a reverse proxy).
            database: the database written to.
            measurement: the measurement every record is written as.
            timeout_s: total deadline per HTTP request.
            max_lines: at most this many records (lines) per request.
            trace_tag: tag each record that carries a ``traceparent`` with
                ``trace_id`` (``[influxdb] trace_tag``; line_protocol.encode_lines).
            transport: an httpx transport to use instead of the default
                (tests use ``httpx.MockTransport``).

        Raises:
            ValueError: an argument is invalid (a config error).
        """
        parsed = httpx.URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"[influxdb] url must be http(s)://host:port, not {url!r}")
        if not isinstance(database, str) or not database:
            raise ValueError("[influxdb] database must be a non-empty string")
        try:
            escape_measurement(measurement)
        except LineProtocolError as exc:
            raise ValueError(f"[influxdb] measurement: {exc}") from None
        if not timeout_s > 0:
            raise ValueError("timeout_s must be > 0")
        if type(max_lines) is not int or max_lines < 1:
            raise ValueError("max_lines must be an integer >= 1")
        self.url = url.rstrip("/")
        self.database = database
        self.measurement = measurement
        self.timeout_s = float(timeout_s)
        self.max_lines = max_lines
        self.trace_tag = trace_tag
        self._write_params = {"db": database, "precision": "ns"}
        self._client = httpx.AsyncClient(
            base_url=self.url, timeout=httpx.Timeout(self.timeout_s), trust_env=False, transport=transport,
            headers={"User-Agent": "gridgate-influxdb-sink"})

    @classmethod
    async def open(cls, url: str = DEFAULT_URL, database: str = DEFAULT_DATABASE,
                   measurement: str = DEFAULT_MEASUREMENT, *, create_database: bool = True,
                   timeout_s: float = DEFAULT_TIMEOUT_S, max_lines: int = DEFAULT_MAX_LINES,
                   trace_tag: bool = False, transport: httpx.AsyncBaseTransport | None = None) -> InfluxDBSink:
        """Make a sink and, with ``create_database``, create its database.

        Raises:
            ValueError: invalid arguments.
            SinkWriteError: the database could not be created.
        """
        sink = cls(url, database, measurement, timeout_s=timeout_s, max_lines=max_lines, trace_tag=trace_tag,
                   transport=transport)
        if create_database:
            try:
                await sink.create_database()
            except BaseException:
                await sink.aclose()
                raise
        return sink

    async def _request(self, what: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            with anyio.fail_after(self.timeout_s):
                return await self._client.request(method, path, **kwargs)
        except (TimeoutError, httpx.TimeoutException):
            raise InfluxDBUnavailableError(
                f"InfluxDB {what} to {self.url} timed out after {self.timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            raise InfluxDBUnavailableError(
                f"InfluxDB {what} to {self.url} failed: {type(exc).__name__}: {exc}") from exc

    async def create_database(self) -> None:
        """``CREATE DATABASE`` (a no-op if it exists).

        Raises:
            InfluxDBHTTPError, InfluxDBUnavailableError.
        """
        q = f"CREATE DATABASE {_quote_identifier(self.database)}"
        response = await self._request("CREATE DATABASE", "POST", "/query", data={"q": q})
        if response.status_code != 200:
            raise InfluxDBHTTPError(response.status_code, _error_text(response), what="CREATE DATABASE")
        # InfluxQL errors come back as 200 with {"results": [{"error": ...}]}.
        try:
            results = response.json().get("results", [])
        except (ValueError, AttributeError):
            results = []
        errors = [str(r["error"]) for r in results if isinstance(r, dict) and "error" in r]
        if errors:
            raise InfluxDBHTTPError(response.status_code, "; ".join(errors), what="CREATE DATABASE")

    async def write(self, batch: Sequence[Record]) -> None:
        """Write ``batch``; return once InfluxDB has acknowledged every record.

        Raises:
            InfluxDBEncodeError: a record cannot be encoded; nothing was sent.
            InfluxDBHTTPError: InfluxDB refused a chunk (earlier chunks were written).
            InfluxDBUnavailableError: no answer within ``timeout_s``, or no connection.
        """
        n = len(batch)
        if not n:
            return
        step = self.max_lines
        bodies = []
        for start in range(0, n, step):
            try:
                body = encode(batch[start:start + step], self.measurement, self.trace_tag)
            except LineProtocolError as exc:
                raise InfluxDBEncodeError(start + (exc.index or 0), exc.reason) from None
            bodies.append(gzip.compress(body, GZIP_LEVEL))
        headers = {"Content-Encoding": "gzip", "Content-Type": "text/plain; charset=utf-8"}
        for body in bodies:
            response = await self._request("write", "POST", "/write", params=self._write_params,
                                           content=body, headers=headers)
            if response.status_code != 204:
                raise InfluxDBHTTPError(response.status_code, _error_text(response))

    async def aclose(self) -> None:
        """Close the HTTP client and its connections."""
        await self._client.aclose()

    async def __aenter__(self) -> InfluxDBSink:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()
