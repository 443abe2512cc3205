"""The MQTT 5.0 codec in use: the compiled one when ``gridgate.hotpath``
has loaded the extension, else the pure-Python twin (``codec5_py``).

The API both share is the twin's: ``codec5.MQTT5Codec``,
``codec5.MAX_PACKET_BYTES`` and the ``codec5.encode_*`` functions with the
twin's signatures, and ``codec5.take_publishes5``. The compiled module holds the 3.1.1 codec's encoders
under the plain ``encode_*`` names, so its 5.0 encoders are
``mqtt5_encode_*`` there and ``compiled_codec5`` gives them the twin's names.
"""
from __future__ import annotations

from types import ModuleType, SimpleNamespace
from typing import TYPE_CHECKING

from gridgate import hotpath
from gridgate.protocols.mqtt import codec5_py

__all__ = ["codec5", "compiled_codec5"]

_ENCODERS = ("connack", "publish", "puback", "pubrec", "pubrel", "pubcomp", "suback", "unsuback", "pingresp",
             "disconnect", "auth")


def compiled_codec5(fastparse: ModuleType) -> SimpleNamespace:
    """The compiled 5.0 codec of ``fastparse`` (gridgate._fastparse) under the twin's names."""
    names: dict[str, object] = {"MQTT5Codec": fastparse.MQTT5Codec,
                                "MAX_PACKET_BYTES": fastparse.MQTT5_MAX_PACKET_BYTES,
                                "take_publishes5": fastparse.take_publishes5}
    for name in _ENCODERS:
        names[f"encode_{name}"] = getattr(fastparse, f"mqtt5_encode_{name}")
    return SimpleNamespace(**names)


if TYPE_CHECKING:
    # Checkers see the twin's API, which the compiled codec keeps (src/gridgate/_fastparse.pyi).
    from gridgate.protocols.mqtt import codec5_py as codec5
else:
    codec5 = codec5_py if hotpath.fastparse is None else compiled_codec5(hotpath.fastparse)
