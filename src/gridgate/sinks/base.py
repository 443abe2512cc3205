"""The sink protocol every sink implements (DESIGN section 7)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from gridgate.ingest.records import Record

__all__ = ["Sink", "SinkFullError"]


@runtime_checkable
class Sink(Protocol):
    """Where normalized records go.

    ``write`` returning means the batch is durable (gridgate acknowledges the
    readings only then); raising means it was not written (gridgate retries,
    holding the readers back). ``aclose`` is called once at shutdown.
    """

    async def write(self, batch: Sequence[Record]) -> None: ...

    async def aclose(self) -> None: ...


class SinkFullError(Exception):
    """The sink is at capacity and refuses writes (spool ``max_bytes``)."""
