"""The WebSocket masking in use: the compiled ``ws_unmask``/``ws_mask_frames``,
or their pure-Python twin (``wsmask_py``) when ``gridgate.hotpath`` says the
extension is not loaded.

Public for clients: the load generator masks its frames with ``wsmask``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from gridgate import hotpath
from gridgate.protocols import wsmask_py

__all__ = ["wsmask"]

if TYPE_CHECKING:
    # Checkers see the API both implementations share: the compiled module's stub.
    from gridgate import _fastparse as wsmask
else:
    wsmask = hotpath.fastparse or wsmask_py
