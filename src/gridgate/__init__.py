"""gridgate: the ingest front end of an IoT telemetry platform for energy fleets."""
from __future__ import annotations

__version__ = "0.1.0"
