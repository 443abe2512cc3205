"""Which hot path is loaded, and the switch to the pure-Python twins."""
from __future__ import annotations

import importlib.machinery
import subprocess
import sys

import pytest

from gridgate import _fastparse, hotpath


def test_installed_package_loads_the_compiled_extension():
    assert _fastparse.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    assert isinstance(_fastparse.__loader__, importlib.machinery.ExtensionFileLoader)
    assert hotpath.COMPILED and hotpath.COMPILED_PATH == _fastparse.__file__
    assert hotpath.fastparse is _fastparse and hotpath.spool is _fastparse
    # every stage picks the compiled implementation
    from gridgate.ingest.validator import validator
    from gridgate.protocols.http.parser import parser
    from gridgate.protocols.mqtt.codec import codec
    assert codec is _fastparse and parser is _fastparse and validator is _fastparse
    # the codec and validator are extension types (no instance __dict__)
    from gridgate.ingest.rules import PayloadRules
    for obj in (_fastparse.MQTTCodec(), _fastparse.Validator(PayloadRules())):
        assert type(obj).__module__ == "gridgate._fastparse"
        with pytest.raises(AttributeError, match=f"^'gridgate._fastparse.{type(obj).__name__}' object has no "
                                                 "attribute 'anything'$"):
            obj.anything = 1


def test_pure_python_switch():
    code = ("from gridgate import hotpath\n"
            "from gridgate.protocols.mqtt.codec import codec\n"
            "from gridgate.protocols.http.parser import parser\n"
            "from gridgate.ingest.validator import validator\n"
            "print(codec.__name__, parser.__name__, validator.__name__, hotpath.fastparse, hotpath.describe())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"GRIDGATE_PURE_PYTHON": "1", "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == ("gridgate.protocols.mqtt.codec_py gridgate.protocols.http.parser_py "
                                  "gridgate.ingest.validator_py None "
                                  "hot path: pure Python (forced by GRIDGATE_PURE_PYTHON)")
