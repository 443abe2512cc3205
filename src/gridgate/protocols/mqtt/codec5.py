"""The MQTT 5.0 codec in use: the compiled one when ``gridgate.hotpath``
has loaded the extension and it carries the 5.0 codec, else the pure-Python
twin (``codec5_py``).

The API both share is the twin's: ``codec5.MQTT5Codec`` and the
``codec5.encode_*`` functions with the twin's signatures.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from gridgate.protocols.mqtt import codec5_py

__all__ = ["codec5"]

if TYPE_CHECKING:
    from gridgate.protocols.mqtt import codec5_py as codec5
else:
    # The compiled twin joins here (issue 21); until then the twin serves.
    codec5 = codec5_py
