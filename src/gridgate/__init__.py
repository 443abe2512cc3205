"""gridgate: the ingest front end of an IoT telemetry platform for energy fleets.

Embedding (DESIGN section 7)::

    config = gridgate.Config.load("gridgate.toml")
    async with trio.open_nursery() as nursery:
        gateway = await nursery.start(gridgate.serve, config)
        print(gateway.addresses)
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Config", "ConfigError", "Gateway", "Record", "Rejection", "Sink", "SinkFullError", "serve",
           "__version__"]

# Imported lazily so that `gridgate --version` and the codecs do not pull in
# the whole server.
_LAZY = {
    "Config": "gridgate.config",
    "ConfigError": "gridgate.config",
    "Gateway": "gridgate.gateway",
    "serve": "gridgate.gateway",
    "Record": "gridgate.ingest.records",
    "Rejection": "gridgate.ingest.records",
    "Sink": "gridgate.sinks.base",
    "SinkFullError": "gridgate.sinks.base",
}

if TYPE_CHECKING:
    from gridgate.config import Config, ConfigError
    from gridgate.gateway import Gateway, serve
    from gridgate.ingest.records import Record, Rejection
    from gridgate.sinks.base import Sink, SinkFullError


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gridgate' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
