"""The payload validator in use: the compiled one, or its pure-Python twin
(``validator_py``, also the std HTTP engine's) when ``gridgate.hotpath`` says
the extension is not loaded."""
from __future__ import annotations

from typing import TYPE_CHECKING

from gridgate import hotpath
from gridgate.ingest import validator_py

__all__ = ["validator", "validator_py"]

if TYPE_CHECKING:
    # Checkers see the API both implementations share: the compiled module's stub.
    from gridgate import _fastparse as validator
else:
    validator = hotpath.fastparse or validator_py
