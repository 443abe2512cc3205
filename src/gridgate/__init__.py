"""gridgate: the ingest front end of an IoT telemetry platform for energy fleets.

Embedding (DESIGN section 7)::

    config = gridgate.Config.load("gridgate.toml")
    async with trio.open_nursery() as nursery:
        gateway = await nursery.start(gridgate.serve, config)
        print(gateway.addresses)
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["Config", "ConfigError", "Gateway", "ListenError", "Record", "Rejection", "Sink", "SinkFullError",
           "serve", "__version__"]

# Imported lazily so that `gridgate --version` and the codecs do not pull in
# the whole server.
_LAZY = {
    "Config": "gridgate.config",
    "ConfigError": "gridgate.config",
    "Gateway": "gridgate.gateway",
    "ListenError": "gridgate.gateway",
    "serve": "gridgate.gateway",
    "Record": "gridgate.ingest.records",
    "Rejection": "gridgate.ingest.records",
    "Sink": "gridgate.sinks.base",
    "SinkFullError": "gridgate.sinks.base",
}

# Type checkers read the names' types from __init__.pyi. No import of a
# submodule here, not even under TYPE_CHECKING: every module that imports the
# compiled extension (``from gridgate import _fastparse``) imports this
# package, and the import walls (pyproject.toml) would see it reach the
# gateway.


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gridgate' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
