"""Shared fixtures.

The compiled module is imported directly, never inside try/except: a failed
build must fail the suite loudly instead of testing the Python twin twice.
"""
from __future__ import annotations

import pytest
import trio
import trio.testing

import gridgate
from autojump import start_still
from binaries import require
from gridgate import _fastparse
from gridgate.ingest import validator_py as _payload_py
from gridgate.protocols.mqtt import codec_py as _mqtt_py
from influxproc import InfluxProcess
from inprocess import make_config


@pytest.fixture(params=[_mqtt_py, _fastparse], ids=["py-mqtt", "c-mqtt"])
def mqtt_impl(request):
    """The module implementing the MQTT codec (pure Python twin, then compiled)."""
    return request.param


@pytest.fixture(params=[_payload_py, _fastparse], ids=["py-payload", "c-payload"])
def payload_impl(request):
    """The module implementing the payload validator (twin, then compiled)."""
    return request.param


@pytest.fixture
async def start_gateway(nursery, tmp_path):
    """An embedded gateway in the test's own nursery (pytest-trio), the DESIGN
    section 7 way: ``gateway = await start_gateway(custom_sink, mqtt=MQTTConfig(...))``
    runs ``await nursery.start(gridgate.serve, config, custom_sink)`` on
    ``make_config(tmp_path, **sections)``; the test's end cancels it. The
    custom sink is positional so that ``sink=SinkConfig(...)`` stays the
    ``[sink]`` section."""
    async def start(custom_sink=None, /, **sections):
        config = make_config(tmp_path, **sections)
        if isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock):
            # under autojump_clock: start with the clock standing still (tests/autojump.py)
            return await start_still(nursery, config, custom_sink)
        return await nursery.start(gridgate.serve, config, custom_sink)
    return start


@pytest.fixture
def influxd_binary() -> str:
    """influxd's path: skipped without it on a developer's machine, failed in CI."""
    return require("influxd")


@pytest.fixture
def influx(tmp_path, influxd_binary):
    """A real influxd of the test's own, on a free loopback port (a test
    module may define its own ``influx`` with another scope)."""
    proc = InfluxProcess(tmp_path / "influx")
    proc.start()
    yield proc
    proc.kill()


@pytest.fixture
def nats_server_binary() -> str:
    """nats-server's path: skipped without it on a developer's machine, failed in CI."""
    return require("nats-server")
