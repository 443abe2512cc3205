"""Whether the compiled hot path is loaded (the yarl pattern).

``GRIDGATE_PURE_PYTHON=1`` forces the pure-Python twins. Otherwise the
compiled extension is used; if it cannot be imported (not built), gridgate
falls back to the twins and says so in ``gridgate --version`` and in the
start-up log, so a slow install is never silent.

This module decides, and knows no codec: each stage picks its own
implementation from ``fastparse`` (``gridgate.protocols.mqtt.codec``,
``gridgate.protocols.http.parser``, ``gridgate.ingest.validator``), so a
stage importing this module pulls in no other stage. Tests never import
through here for the compiled variant: they import ``gridgate._fastparse``
directly and fail loudly if it is missing.
"""
from __future__ import annotations

import os
from types import ModuleType

__all__ = ["fastparse", "spool", "COMPILED", "COMPILED_PATH", "FORCED_PURE", "IMPORT_ERROR", "describe"]

FORCED_PURE = os.environ.get("GRIDGATE_PURE_PYTHON", "") not in ("", "0")

COMPILED: bool = False
COMPILED_PATH: str | None = None
IMPORT_ERROR: str | None = None

# The compiled extension, or None when the twins run.
fastparse: ModuleType | None = None
# The compiled spool writer (SpoolWriter) has no twin: without it the spool
# commits through Python's sqlite3 on a worker thread (gridgate.storage.spool).
spool: ModuleType | None = None

if not FORCED_PURE:
    try:
        from gridgate import _fastparse
    except ImportError as exc:  # not built: run on the twins, loudly
        IMPORT_ERROR = str(exc)
    else:
        fastparse = spool = _fastparse
        COMPILED = True
        COMPILED_PATH = _fastparse.__file__


def describe() -> str:
    """One line saying which hot path is loaded, for --version and logs."""
    if COMPILED:
        return f"hot path: compiled ({COMPILED_PATH})"
    if FORCED_PURE:
        return "hot path: pure Python (forced by GRIDGATE_PURE_PYTHON)"
    return f"hot path: pure Python (compiled extension not importable: {IMPORT_ERROR})"
