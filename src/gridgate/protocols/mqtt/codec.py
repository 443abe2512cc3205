"""The MQTT codec in use: the compiled one, or its pure-Python twin
(``codec_py``) when ``gridgate.hotpath`` says the extension is not loaded.

Public for clients: the load generator encodes its frames with ``codec``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from gridgate import hotpath
from gridgate.protocols.mqtt import codec_py

__all__ = ["codec"]

if TYPE_CHECKING:
    # Checkers see the API both implementations share: the compiled module's stub.
    from gridgate import _fastparse as codec
else:
    codec = hotpath.fastparse or codec_py
