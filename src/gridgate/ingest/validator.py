"""The payload validator in use: the compiled one, or its pure-Python twin
(``validator_py``, also the std HTTP engine's) when ``gridgate.hotpath`` says
the extension is not loaded."""
from __future__ import annotations

from types import ModuleType

from gridgate import hotpath
from gridgate.ingest import validator_py

__all__ = ["validator", "validator_py"]

validator: ModuleType = hotpath.fastparse or validator_py
