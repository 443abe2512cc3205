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
    assert hotpath.mqtt is _fastparse and hotpath.payload is _fastparse
    # the codec and validator are extension types (no instance __dict__)
    from gridgate.rules import PayloadRules
    for obj in (_fastparse.MQTTCodec(), _fastparse.Validator(PayloadRules())):
        assert type(obj).__module__ == "gridgate._fastparse"
        with pytest.raises(AttributeError):
            obj.anything = 1


def test_pure_python_switch():
    code = "from gridgate import hotpath; print(hotpath.mqtt.__name__, hotpath.payload.__name__, hotpath.describe())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"GRIDGATE_PURE_PYTHON": "1", "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == ("gridgate._mqtt_py gridgate._payload_py "
                                  "hot path: pure Python (forced by GRIDGATE_PURE_PYTHON)")
