"""The open-loop schedule: when each reading *should* be sent.

Latency is measured from this intended time, not from when the sender got
round to it, so a server that stalls cannot hide the readings that piled up
behind the stall (no coordinated omission).
"""
from __future__ import annotations

__all__ = ["intended_time", "Schedule"]


def intended_time(start: float, rate_per_device: float, k: int, offset: float = 0.0) -> float:
    """Time of the k-th reading (k = 0, 1, ...) of a device sending at ``rate_per_device``/s."""
    return start + offset + k / rate_per_device


class Schedule:
    """Per-device sequence of intended send times; ``rate = 0`` means closed loop."""

    __slots__ = ("start", "rate", "offset", "k")

    def __init__(self, start: float, rate_per_device: float, offset: float = 0.0) -> None:
        self.start, self.rate, self.offset, self.k = start, rate_per_device, offset, 0

    def next_due(self) -> float:
        return intended_time(self.start, self.rate, self.k, self.offset)

    def advance(self) -> float:
        due = self.next_due()
        self.k += 1
        return due
