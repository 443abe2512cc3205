"""External programs the tests drive (mosquitto, mosquitto_pub, mosquitto_sub,
wrk, curl, stdbuf, haproxy): skipped on a developer's machine that lacks one, a
failure where every one must be there.

CI (``.ci/run``) installs every binary the suite uses and sets
``REQUIRE_TEST_BINARIES=1``: there a missing binary means the
installation broke, and a skip would hide that the test never ran.
"""
from __future__ import annotations

import os
import shutil

import pytest

__all__ = ["REQUIRE_ENV", "require"]

REQUIRE_ENV = "REQUIRE_TEST_BINARIES"


def require(name: str) -> str:
    """The path of the executable ``name``, found on PATH.

    Call it inside the test (or a fixture it uses), never at import time, so
    only the tests that run the program are skipped or failed.

    Returns:
        The absolute path ``shutil.which`` finds; run that, not ``name``.

    Error handling: when ``name`` is not on PATH, ``pytest.fail`` if the
    environment variable ``REQUIRE_TEST_BINARIES`` is ``1``, else
    ``pytest.skip``.
    """
    path = shutil.which(name)
    if path is not None:
        return path
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{name} is not on PATH, and {REQUIRE_ENV}=1 says every binary the suite uses is installed",
                    pytrace=False)
    pytest.skip(f"{name} is not installed (.ci/run installs it)")
