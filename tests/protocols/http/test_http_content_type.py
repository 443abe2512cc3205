"""The Content-Type of a telemetry request picks its format as before, when
the header value is remembered (api._FORMAT_OF: one lookup per request
instead of split, strip and lower) and when it is not; the memory is
bounded. Both engines route through api, so Request stands for either."""
from __future__ import annotations

import pytest

import gridgate
from gridgate.config import HTTPConfig
from gridgate.protocols.http import api
from inprocess import READING, MemorySink, make_config

BODY = READING


async def _begin(gateway, content_type: str) -> int:
    request = api.Request("POST", "/v1/telemetry", {"content-type": content_type, "content-length": str(len(BODY))},
                          BODY)
    started = api.begin_request(gateway.services, request, "fast")
    if type(started) is api.Pending:
        return (await started.answer())[0]
    assert type(started) is tuple
    return started[0]


@pytest.fixture
async def gateway(tmp_path, nursery, monkeypatch):
    monkeypatch.setattr(api, "_FORMAT_OF", {})
    return await nursery.start(gridgate.serve, make_config(tmp_path, http=HTTPConfig(listen="")), MemorySink())


async def test_a_remembered_content_type_answers_as_the_first_time(gateway):
    for content_type in ("application/json", "Application/JSON ; charset=utf-8", "text/plain", "text/plain"):
        first = await _begin(gateway, content_type)
        again = await _begin(gateway, content_type)
        assert first == again == (415 if content_type == "text/plain" else 202)
    # what was refused is not remembered
    assert set(api._FORMAT_OF) == {"application/json", "Application/JSON ; charset=utf-8"}


async def test_the_memory_is_bounded_and_keeps_no_long_values(gateway):
    long_type = "application/json; " + "x" * 64
    assert await _begin(gateway, long_type) == 202
    assert long_type not in api._FORMAT_OF
    for i in range(300):
        assert await _begin(gateway, f"application/json; n={i}") == 202
    assert len(api._FORMAT_OF) == 256
