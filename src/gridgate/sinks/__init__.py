"""Sinks: where normalized records are written."""
from gridgate.sinks.base import Sink, SinkFullError

__all__ = ["Sink", "SinkFullError"]
