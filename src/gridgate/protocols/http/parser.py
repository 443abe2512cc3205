"""The HTTP/1.1 request parser in use (fast engine): the compiled one, or its
pure-Python twin (``parser_py``) when ``gridgate.hotpath`` says the extension
is not loaded."""
from __future__ import annotations

from typing import TYPE_CHECKING

from gridgate import hotpath
from gridgate.protocols.http import parser_py

__all__ = ["parser"]

if TYPE_CHECKING:
    # Checkers see the API both implementations share: the compiled module's stub.
    from gridgate import _fastparse as parser
else:
    parser = hotpath.fastparse or parser_py
