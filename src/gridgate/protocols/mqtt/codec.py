"""The MQTT codec in use: the compiled one, or its pure-Python twin
(``codec_py``) when ``gridgate.hotpath`` says the extension is not loaded.

Public for clients: the load generator encodes its frames with ``codec``.
"""
from __future__ import annotations

from types import ModuleType

from gridgate import hotpath
from gridgate.protocols.mqtt import codec_py

__all__ = ["codec"]

codec: ModuleType = hotpath.fastparse or codec_py
