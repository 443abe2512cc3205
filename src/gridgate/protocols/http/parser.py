"""The HTTP/1.1 request parser in use (fast engine): the compiled one, or its
pure-Python twin (``parser_py``) when ``gridgate.hotpath`` says the extension
is not loaded."""
from __future__ import annotations

from types import ModuleType

from gridgate import hotpath
from gridgate.protocols.http import parser_py

__all__ = ["parser"]

parser: ModuleType = hotpath.fastparse or parser_py
