"""Types of gridgate's public API (the module itself imports them lazily)."""
from gridgate.config import Config as Config, ConfigError as ConfigError
from gridgate.gateway import Gateway as Gateway, ListenError as ListenError, serve as serve
from gridgate.ingest.records import Record as Record, Rejection as Rejection
from gridgate.sinks.base import Sink as Sink, SinkFullError as SinkFullError

__version__: str
__all__ = ["Config", "ConfigError", "Gateway", "ListenError", "Record", "Rejection", "Sink", "SinkFullError",
           "serve", "__version__"]
