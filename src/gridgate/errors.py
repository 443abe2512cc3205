"""The exceptions that escape gridgate's codecs.

Both the compiled hot path (gridgate._fastparse) and the pure-Python twins
import these classes from here, so callers catch one class whichever
implementation is loaded (the httptools pattern).
"""
from __future__ import annotations

__all__ = ["MQTTProtocolError", "HTTPParseError"]


class MQTTProtocolError(Exception):
    """A client broke MQTT 3.1.1: the connection must be closed.

    Attributes:
        reason: a short machine-readable code (see ``MQTT_ERROR_REASONS``).
        return_code: the CONNACK return code to send before closing, or None
            when the spec says to close without a CONNACK.
    """

    def __init__(self, reason: str, detail: str = "", return_code: int | None = None) -> None:
        self.reason = reason
        self.detail = detail
        self.return_code = return_code
        super().__init__(f"{reason}: {detail}" if detail else reason)

    def __eq__(self, other: object) -> bool:
        # Differential tests compare errors raised by the two implementations.
        if not isinstance(other, MQTTProtocolError):
            return NotImplemented
        return (self.reason, self.return_code) == (other.reason, other.return_code)

    def __hash__(self) -> int:
        return hash((self.reason, self.return_code))

    def __reduce__(self) -> tuple[type[MQTTProtocolError], tuple[str, str, int | None]]:
        # keep picklable with the extra constructor args
        return (type(self), (self.reason, self.detail, self.return_code))


class HTTPParseError(Exception):
    """A request the HTTP parsers refuse: answer ``status`` and close.

    Attributes:
        status: the HTTP status to answer (400, 413, 431, 501 or 505).
        error: the machine-readable ``error`` of the JSON body.
        detail: what was wrong, for people.
    """

    def __init__(self, status: int, error: str, detail: str = "") -> None:
        self.status = status
        self.error = error
        self.detail = detail
        super().__init__(f"{status} {error}: {detail}" if detail else f"{status} {error}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HTTPParseError):
            return NotImplemented
        return (self.status, self.error) == (other.status, other.error)

    def __hash__(self) -> int:
        return hash((self.status, self.error))

    def __reduce__(self) -> tuple[type[HTTPParseError], tuple[int, str, str]]:
        return (type(self), (self.status, self.error, self.detail))
