"""tests/binaries.require: a missing program skips on a developer's machine
and fails where REQUIRE_TEST_BINARIES=1 (CI)."""
from __future__ import annotations

import os

import pytest

from binaries import REQUIRE_ENV, require

MISSING = "gridgate-test-no-such-program-7f3c"


def test_a_present_binary_gives_its_path_whatever_the_environment(monkeypatch):
    for value in (None, "1"):
        if value is None:
            monkeypatch.delenv(REQUIRE_ENV, raising=False)
        else:
            monkeypatch.setenv(REQUIRE_ENV, value)
        path = require("sh")
        assert os.path.isabs(path) and os.access(path, os.X_OK)


@pytest.mark.parametrize("value", [None, "", "0"], ids=["unset", "empty", "zero"])
def test_a_missing_binary_skips_on_a_developer_machine(monkeypatch, value):
    if value is None:
        monkeypatch.delenv(REQUIRE_ENV, raising=False)
    else:
        monkeypatch.setenv(REQUIRE_ENV, value)
    with pytest.raises(pytest.skip.Exception) as info:
        require(MISSING)
    assert str(info.value) == f"{MISSING} is not installed (.ci/run installs it)"


def test_a_missing_binary_fails_in_ci(monkeypatch):
    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception) as info:
        require(MISSING)
    assert str(info.value) == (f"{MISSING} is not on PATH, and {REQUIRE_ENV}=1 says every binary the suite "
                               "uses is installed")
