"""Shared fixtures.

The compiled module is imported directly, never inside try/except: a failed
build must fail the suite loudly instead of testing the Python twin twice.
"""
from __future__ import annotations

import pytest

from gridgate import _fastparse
from gridgate.protocols.mqtt import codec_py as _mqtt_py
from gridgate.ingest import validator_py as _payload_py


@pytest.fixture(params=[_mqtt_py, _fastparse], ids=["py-mqtt", "c-mqtt"])
def mqtt_impl(request):
    """The module implementing the MQTT codec (pure Python twin, then compiled)."""
    return request.param


@pytest.fixture(params=[_payload_py, _fastparse], ids=["py-payload", "c-payload"])
def payload_impl(request):
    """The module implementing the payload validator (twin, then compiled)."""
    return request.param
