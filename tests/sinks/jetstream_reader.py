"""Reading a JetStream stream back, as a consumer would: a separate nats-py
client on its own asyncio loop. The functions block; from a Trio test call
them with ``await trio.to_thread.run_sync(fn, ...)``."""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats
import nats.js.errors

from gridgate.ingest.records import Record
from gridgate.sinks.nats import MSG_ID_HEADER, decode_record

__all__ = ["stream_info", "stream_messages", "stream_raw", "in_asyncio"]

STREAM = "TELEMETRY"
_GET_AT_ONCE = 500          # get_msg requests in flight at once

T = TypeVar("T")


def in_asyncio(urls: list[str], fn: Callable[[Any], Awaitable[T]]) -> T:
    """``fn(jetstream_context)`` on a fresh connection, closed afterwards."""
    async def go() -> T:
        nc = await nats.connect(servers=urls, connect_timeout=2, max_reconnect_attempts=2, reconnect_time_wait=0.1)
        try:
            return await fn(nc.jetstream(timeout=5))
        finally:
            await nc.close()
    return asyncio.run(go())


def stream_info(urls: list[str], stream: str = STREAM) -> Any:
    async def fn(js: Any) -> Any:
        return await js.stream_info(stream)
    return in_asyncio(urls, fn)


def stream_messages(urls: list[str], stream: str = STREAM, limit: int | None = None) -> list[tuple[str, str, Record]]:
    """(subject, Nats-Msg-Id, record) of the stream's messages (the first ``limit``), in order.

    A stream gridgate has not created yet reads as empty.
    """
    return [(subject, headers[MSG_ID_HEADER], decode_record(data))
            for subject, headers, data in stream_raw(urls, stream, limit)]


def stream_raw(urls: list[str], stream: str = STREAM,
               limit: int | None = None) -> list[tuple[str, dict[str, str], bytes]]:
    """(subject, headers, body) of the stream's messages (the first ``limit``), in order."""
    async def fn(js: Any) -> list[tuple[str, dict[str, str], bytes]]:
        try:
            info = await js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            return []
        if not info.state.messages:
            return []
        first, last = info.state.first_seq, info.state.last_seq
        if limit is not None:
            last = min(last, first + limit - 1)
        out = []
        for start in range(first, last + 1, _GET_AT_ONCE):
            msgs = await asyncio.gather(*(js.get_msg(stream, seq)
                                          for seq in range(start, min(start + _GET_AT_ONCE, last + 1))))
            out += [(m.subject, dict(m.headers or {}), m.data) for m in msgs]
        return out
    return in_asyncio(urls, fn)
